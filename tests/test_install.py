"""Installed as a user installs it: a wheel in a fresh environment, run from an empty folder."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, check=True, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel installed; torch & co. come from this venv via a .pth line
    (the registry's torch is 5 GB, so it is not downloaded again), querydet only from the wheel."""
    tmp = tmp_path_factory.mktemp("install")
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          str(ROOT), "-w", dist], cwd=tmp)
    wheel = next(dist.glob("querydet-*.whl"))
    env_dir = tmp / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp).stdout.strip())
    # a plain path line: the dependencies' folder is added, its .pth files (our editable
    # install among them) are not processed
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp)
    empty = tmp / "work"
    empty.mkdir()
    return env_dir / "bin", empty


def test_wheel_runs_from_an_empty_folder(installed):
    bindir, work = installed
    files = _run([bindir / "python", "-c",
                  "from querydet_cli.core import resources as r; import querydet_models as m; "
                  "print(r.sample_scene()); print(r.sample_model()); print(m.__file__)"],
                 cwd=work).stdout.split()
    for f in files:
        assert str(bindir.parent) in f, f  # from the wheel, not the checkout
        assert Path(f).is_file()
    assert "querydet 0.1" in _run([bindir / "querydet", "--version"], cwd=work).stdout
    listing = _run([bindir / "querydet", "configs"], cwd=work).stdout
    assert "querydet_mobilenet_synthetic" in listing and "faster_rcnn" in listing
    proc = _run([bindir / "querydet", "detect", files[0], "-o", "a.geojson", "--quiet", "--html"],
                cwd=work)
    assert "1/1 inputs" in proc.stderr and (work / "a.geojson").stat().st_size > 1000
    page = (work / "a.html").read_text(encoding="utf-8")  # the viewer's files ship in the wheel
    assert "querydet-data" in page and "L.GridLayer" in page and "leaflet-container" in page
    _run([bindir / "querydet", "train", "--config", "querydet_mobilenet_synthetic",
          "--max-iter", "1", "--out", "run"], cwd=work)
    assert (work / "run" / "model_final.pt").is_file()


def test_no_generic_import_names(installed):
    bindir, work = installed
    proc = _run([bindir / "python", "-c", "import models"], cwd=work, check=False)
    assert proc.returncode != 0 and "No module named 'models'" in proc.stderr
    proc = _run([bindir / "python", "-c", "import configs"], cwd=work, check=False)
    assert proc.returncode != 0


def test_help_does_not_import_torch(installed):
    bindir, work = installed
    code = ("import sys; sys.argv = ['querydet', '--help']\n"
            "from querydet_cli.app import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'rasterio' not in sys.modules, 'rasterio imported'\n")
    _run([bindir / "python", "-c", code], cwd=work)


def test_an_export_made_and_run_from_another_folder(installed, tmp_path):
    pytest.importorskip("onnxruntime")
    bindir, work = installed
    _run([bindir / "querydet", "export", "-o", "exported"], cwd=work)  # the bundled model
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (work / "exported").rename(elsewhere / "exported")  # an export travels as a folder
    scene = _run([bindir / "python", "-c", "from querydet_cli.core import resources as r; "
                  "print(r.sample_scene())"], cwd=elsewhere).stdout.strip()
    proc = _run([bindir / "querydet", "detect", scene, "--weights", "exported", "--runtime",
                 "onnxruntime", "-o", "b.geojson", "--json", "--quiet"], cwd=elsewhere)
    import json

    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["runtime"] == "onnxruntime" and summary["detections"] > 10
