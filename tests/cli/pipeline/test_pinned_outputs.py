"""Pinned outputs: the bundled sample's detections are the ones recorded in
`pinned/sample_scene_fp32.json`, through the CLI and through a multi-raster run; every way of
running one input (CSV, NDJSON, GeoJSON; one raster or several) writes the same boxes.

The pin allows for a change of torch build (last-digit float differences) but not for a change of
behaviour. Resume and Ray are pinned against an uninterrupted local run byte for byte in
test_detect.py and test_ray.py. Regenerate after a deliberate change:
`python tests/cli/test_pinned_outputs.py`.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "sample_data" / "sample_scene.tif"
PIN = Path(__file__).parent / "pinned" / "sample_scene_fp32.json"
SCORE_TOL, BOX_TOL = 2e-3, 0.05  # pixels; a torch build may move a last digit, no more


def _detect(cwd: Path, *args) -> None:
    run = subprocess.run([sys.executable, "-m", "querydet_cli", "detect", *map(str, args),
                          "--precision", "fp32", "--quiet"], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def _rows(geojson: Path, source: str | None = None) -> list[dict]:
    feats = json.loads(geojson.read_text())["features"]
    return [{k: f["properties"][k] for k in ("class_name", "score", "bbox_px")}
            for f in feats if source is None or Path(f["properties"]["source"]).name == source]


def _assert_matches_pin(rows: list[dict]) -> None:
    pinned = json.loads(PIN.read_text())["detections"]
    assert len(rows) == len(pinned)
    left = list(rows)
    for want in pinned:
        near = min(left, key=lambda r: max(abs(a - b) for a, b in zip(r["bbox_px"], want["bbox_px"])))
        assert near["class_name"] == want["class_name"]
        assert max(abs(a - b) for a, b in zip(near["bbox_px"], want["bbox_px"])) <= BOX_TOL, near
        assert abs(near["score"] - want["score"]) <= SCORE_TOL, near
        left.remove(near)


def test_sample_detections_are_the_pinned_ones(tmp_path):
    _detect(tmp_path, SAMPLE, "-o", tmp_path / "one.geojson")
    _assert_matches_pin(_rows(tmp_path / "one.geojson"))


def test_a_multi_raster_run_gives_each_raster_its_own_pinned_answer(tmp_path):
    copy = tmp_path / "copy.tif"
    shutil.copy(SAMPLE, copy)
    _detect(tmp_path, SAMPLE, "-o", tmp_path / "one.geojson")
    _detect(tmp_path, SAMPLE, copy, "-o", tmp_path / "two.geojson")
    both = json.loads((tmp_path / "two.geojson").read_text())["features"]
    one = json.loads((tmp_path / "one.geojson").read_text())["features"]
    for name in (SAMPLE.name, copy.name):
        mine = [f for f in both if Path(f["properties"]["source"]).name == name]
        assert [(f["geometry"], f["properties"]["score"], f["properties"]["bbox_px"]) for f in mine] \
            == [(f["geometry"], f["properties"]["score"], f["properties"]["bbox_px"]) for f in one]
    _assert_matches_pin(_rows(tmp_path / "two.geojson", copy.name))


def _regenerate() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _detect(Path(tmp), SAMPLE, "-o", Path(tmp) / "one.geojson")
        rows = _rows(Path(tmp) / "one.geojson")
    PIN.parent.mkdir(exist_ok=True)
    PIN.write_text(json.dumps({"about": "querydet detect sample_data/sample_scene.tif --precision "
                               "fp32: the pinned detections (tests/cli/test_pinned_outputs.py)",
                               "detections": rows}, indent=0) + "\n")
    print(f"{len(rows)} detections -> {PIN}")


if __name__ == "__main__":
    _regenerate()
