"""Usage errors found before anything is created: one line, exit 2, nothing left behind."""

import subprocess
import sys

import pytest
from PIL import Image

from querydet_cli.core.resources import sample_model, sample_scene


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "querydet_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


@pytest.mark.parametrize("args", [
    ["detect", sample_scene(), "-o", "o.geojson", "--save-vis", "afile", "--quiet"],
    ["train", "--out", "afile", "--max-iter", "1"],
    ["eval", "--weights", sample_model(), "--out", "afile"],
    ["train", "--out", "run", "--dataset", "coco", "--train-annotations", "nope.json"],
    ["detect", sample_scene(), "-o", "x.geojson", "--bands", "99", "--quiet"],
    ["detect", "p.png", "-o", "y.geojson", "--quiet", "--gsd", "native"],
    ["export", "-o", "afile"],
    ["detect", sample_scene(), "-o", "z.geojson", "--runtime", "onnxruntime", "--quiet"],
])
def test_a_late_found_mistake_is_exit_2_and_leaves_nothing(tmp_path, args):
    (tmp_path / "afile").write_text("keep me")
    Image.new("RGB", (64, 64)).save(tmp_path / "p.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "querydet: error:" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("args", [
    ["tile", "--annotations", "data/annotations.json", "--out", "chips", "--overlap", "1.0"],
    ["tile", "--annotations", "data/annotations.json", "--out", "chips", "--overlap", "0.5"],
    ["detect", sample_scene(), "-o", "d.geojson", "--overlap", "1.0", "--quiet"],
    ["bench-detect", "--overlap", "0.25"],
])
def test_an_overlap_is_whole_pixels_never_a_fraction(tmp_path, args):
    """The old unit (a fraction of the tile) is refused, 1.0 as much as 0.5, not read as 1 px."""
    from querydet_cli.training.synthetic import write_dataset

    write_dataset(tmp_path / "data", 1, size=128)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "is not a whole number of pixels" in proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_finished_tile_run_leaves_only_its_chips(tmp_path):
    from querydet_cli.training.synthetic import write_dataset

    write_dataset(tmp_path / "data", 1, size=128)
    proc = _cli("tile", "--annotations", "data/annotations.json", "--out", "chips", "--size", "64",
                "--overlap", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "chips").iterdir()) == ["annotations.json", "images"]
