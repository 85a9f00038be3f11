# Two entry points: `make demo` (the main job on the bundled sample) and `make test`.
# Both create .venv/ on first use; nothing needs installing by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test docs bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/querydet detect sample_data/sample_scene.tif -o out/sample_detections.geojson --save-vis out/ --html

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the documentation site into site/, strictly (a broken link or a missing page fails), offline
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: $(STAMP)
	$(BIN)/querydet bench

clean:
	rm -rf $(VENV) build site *.egg-info
