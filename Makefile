# Two entry points: `make demo` (the main job on the bundled sample) and `make test`.
# Both create .venv/ on first use; nothing needs installing by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/querydet detect sample_data/sample_scene.tif -o out/sample_detections.geojson --save-vis out/ --html

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/querydet bench

clean:
	rm -rf $(VENV) build *.egg-info
