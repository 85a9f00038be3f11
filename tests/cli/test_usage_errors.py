"""Usage errors found before anything is created: one line, exit 2, nothing left behind."""

import subprocess
import sys

import pytest
from PIL import Image

from querydet_cli.resources import sample_model, sample_scene


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
