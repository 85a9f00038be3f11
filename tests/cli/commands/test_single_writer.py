"""One writer per output, truthful summaries, Ctrl-C, palette rasters: with real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import ColorInterp
from rasterio.transform import Affine

from querydet_cli.training.synthetic import write_big_raster
from querydet_cli.core.config import Config
from querydet_cli.pipeline.detect import DetectOptions, run_detect
from querydet_cli.core.locking import OutputLock, claim_output
from querydet_cli.core.errors import QueryDetError
from tests.cli.oracle import OracleModel, paint, read_ndjson, write_tif

ROOT = Path(__file__).resolve().parents[3]
SLOW_TILES = ["--tile-size", "128", "--overlap", "16", "--batch-size", "1", "--quiet"]


def _querydet(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-m", "querydet_cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _features(path):
    return len(json.loads(Path(path).read_text())["features"])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return write_big_raster(tmp_path_factory.mktemp("big") / "big.tif", 1024)


def test_second_detect_on_one_output_is_refused_at_once(big, tmp_path):
    out = tmp_path / "out.geojson"
    out.write_text("old output\n")
    journal = tmp_path / ".out.geojson.querydet-partial"
    first = _querydet("detect", big, "-o", out, *SLOW_TILES, cwd=tmp_path)
    _wait_for(journal / "state.json", first)  # the first has finished a tile row
    for extra in ([], ["--resume"]):
        second = _querydet("detect", big, "-o", out, *SLOW_TILES, *extra, cwd=tmp_path)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert err.strip() == (f"querydet: error: {out} is being written by another querydet run "
                               f"(pid {first.pid}); wait for it to end, or stop it")
        assert first.poll() is None  # refused while the first still runs
        assert out.read_text() == "old output\n" and (journal / "state.json").is_file()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    summary = err.strip().splitlines()[-1]
    assert f"{_features(out)} detections" in summary
    assert not journal.exists()


def test_kill_9_leaves_an_output_the_next_run_takes(big, tmp_path):
    out = tmp_path / "out.geojson"
    ref = _querydet("detect", big, "-o", tmp_path / "ref.geojson", *SLOW_TILES, cwd=tmp_path)
    ref.communicate(timeout=300)
    first = _querydet("detect", big, "-o", out, *SLOW_TILES, cwd=tmp_path)
    _wait_for(tmp_path / ".out.geojson.querydet-partial" / "state.json", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = _querydet("detect", big, "-o", out, *SLOW_TILES, "--resume", "--json", cwd=tmp_path)
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    summary = json.loads(stdout)
    assert summary["detections"] == _features(out) == _features(tmp_path / "ref.geojson")
    assert summary["resumed_detections"] + summary["new_detections"] == summary["detections"]
    assert f"{summary['detections']} detections (" in err


def test_ctrl_c_says_where_it_stopped_and_how_to_resume(big, tmp_path):
    out = tmp_path / "out.geojson"
    first = _querydet("detect", big, "-o", out, *SLOW_TILES, cwd=tmp_path)
    _wait_for(tmp_path / ".out.geojson.querydet-partial" / "state.json", first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"querydet: interrupted in {big} after ")
    assert "tile rows" in line and "journal" in line and "is kept" in line
    command = line.split("continue with: ")[1]
    assert command.endswith("--resume") and command.startswith("querydet detect ")
    assert not out.exists()


def test_train_and_tile_into_one_folder_do_not_interleave(tmp_path):
    first = _querydet("train", "--config", "querydet_mobilenet_synthetic", "--max-iter", "200",
                      "--out", "run", "--device", "cpu", cwd=tmp_path)
    try:
        _wait_for(tmp_path / "run" / ".querydet.lock", first)
        time.sleep(0.5)
        second = _querydet("train", "--config", "querydet_mobilenet_synthetic", "--max-iter", "1",
                           "--out", "run", cwd=tmp_path)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and f"(pid {first.pid})" in err, err
        tiler = _querydet("tile", "--out", "run", "--annotations",
                          ROOT / "sample_data" / "sample_scene.json", "--images",
                          ROOT / "sample_data", cwd=tmp_path)
        _, err = tiler.communicate(timeout=120)
        assert tiler.returncode == 2 and "being written by another querydet run" in err, err
        assert not (tmp_path / "run" / "annotations.json").exists()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the dead holder's lock: the folder is free again
    with OutputLock(tmp_path / "run" / ".querydet.lock", "run"):
        pass


def test_lock_in_process_and_claim_cleanup(tmp_path):
    out = tmp_path / "o.geojson"
    with pytest.raises(RuntimeError):
        with claim_output(out):
            raise RuntimeError("model failed to load")
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    with claim_output(out):
        with pytest.raises(QueryDetError, match="being written by another"):
            OutputLock(tmp_path / ".o.geojson.querydet-partial" / "lock", str(out)).acquire()


def _palette_raster(path, rgb):
    """The same picture as a one-band palette GeoTIFF (colour table from the distinct colours)."""
    flat = rgb.reshape(3, -1).T
    colours, index = np.unique(flat, axis=0, return_inverse=True)
    assert len(colours) <= 256
    # reversed table: index values differ from every colour's red value, so a reader that
    # took the indices for pixels would see other objects (and the background as one)
    index = len(colours) - 1 - index.ravel()
    colours = colours[::-1]
    with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[2], height=rgb.shape[1],
                       count=1, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(0.5, 0, 1000, 0, -0.5, 2000)) as dst:
        dst.write(index.reshape(rgb.shape[1:]).astype(np.uint8), 1)
        dst.write_colormap(1, {i: (*map(int, c), 255) for i, c in enumerate(colours)})
        dst.colorinterp = [ColorInterp.palette]
    return path


def test_palette_raster_gives_the_rgb_detections(tmp_path):
    objects = [(10, 10, 30, 25), (80, 40, 150, 60), (85, 80, 140, 140), (250, 100, 299, 130)]
    rgb = paint(300, 260, objects)
    a = write_tif(tmp_path / "rgb.tif", rgb, Affine(0.5, 0, 1000, 0, -0.5, 2000))
    b = _palette_raster(tmp_path / "pal.tif", rgb)
    opts = DetectOptions(tile_size=128, overlap=32, batch_size=2)
    found = []
    for path in (a, b):
        out = tmp_path / f"{path.stem}.ndjson"
        run_detect(OracleModel(), Config(), [str(path)], str(out), "ndjson", opts,
                   torch.device("cpu"))
        found.append(sorted(tuple(r["bbox"]) for r in read_ndjson(out)))
    assert found[0] == found[1] and len(found[0]) == len(objects)
