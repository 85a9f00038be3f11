"""`detect --ray`: the same output as one process, for many rasters, for one raster in bands,
with an actor killed mid-run, and (slow) against a `ray start --head` cluster on loopback."""

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch
from rasterio.transform import Affine

ray = pytest.importorskip("ray")

from querydet_cli.core.config import Config  # noqa: E402
from querydet_cli.pipeline.detect import DetectOptions, run_detect  # noqa: E402
from querydet_cli.pipeline.ray_producer import RayProducer, RaySettings  # noqa: E402
from querydet_cli.runtimes.loading import load_model  # noqa: E402
from querydet_models.checkpoint import save_checkpoint  # noqa: E402
from querydet_models.config import ModelConfig  # noqa: E402
from tests.cli.oracle import paint, read_ndjson, write_tif  # noqa: E402
from tests.conftest import with_random_heads  # noqa: E402

OPTS = DetectOptions(tile_size=128, overlap=16, batch_size=2, score_threshold=0.05,
                     precision="fp32")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from querydet_models.detectors.querydet import build_querydet

    cfg = replace(Config(), model=ModelConfig(backbone="resnet18", fpn_channels=16,
                                              head_convs=2, num_classes=3),
                  class_names=("a", "b", "c"))
    torch.manual_seed(0)
    model = with_random_heads(build_querydet(cfg.model, cfg.inference))
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint(path, model, cfg.to_dict(), list(cfg.class_names))
    return path


def _rasters(folder, n, width=300, height=260):
    paths = []
    for i in range(n):
        objects = [(10 + 7 * i, 10, 40 + 7 * i, 30), (100, 100 + 3 * i, 180, 140 + 3 * i),
                   (200, 20, 260, 90)]
        paths.append(str(write_tif(folder / f"r{i}.tif", paint(width, height, objects),
                                   Affine(0.5, 0, 1000 * i, 0, -0.5, 2000))))
    return paths


def _detections(path):
    return sorted((r["source"], tuple(r["bbox"]), r["score"], r["class_id"])
                  for r in read_ndjson(path))


def _single(checkpoint, inputs, out, opts=OPTS):
    model, cfg = load_model(checkpoint, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor runs: the same sums in the same order
    try:
        run_detect(model, cfg, inputs, str(out), "ndjson", opts, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return _detections(out)


def _on_ray(checkpoint, inputs, out, settings, opts=OPTS):
    model, cfg = load_model(checkpoint, "cpu")
    producer = RayProducer(settings, checkpoint, opts, "cpu", load_model)
    summary = run_detect(model, cfg, inputs, str(out), "ndjson", opts, torch.device("cpu"),
                         producer=producer)
    return summary, _detections(out)


def test_many_rasters_equal_one_process(local_ray, checkpoint, tmp_path):
    inputs = _rasters(tmp_path, 4)
    expected = _single(checkpoint, inputs, tmp_path / "single.ndjson")
    summary, got = _on_ray(checkpoint, inputs, tmp_path / "ray.ndjson", RaySettings(workers=2))
    assert summary.done == 4 and not summary.failed
    assert expected and got == expected


def test_one_raster_in_bands_equals_one_process(local_ray, checkpoint, tmp_path):
    # 700 x 650 px in 128 px tiles: 6 tile rows, one per unit, objects across every seam
    objects = [(x, y, x + 40, y + 30) for x in range(60, 640, 110) for y in range(90, 620, 112)]
    path = str(write_tif(tmp_path / "big.tif", paint(700, 650, objects[:250]),
                         Affine(0.5, 0, 0, 0, -0.5, 0)))
    expected = _single(checkpoint, [path], tmp_path / "single.ndjson")
    _, got = _on_ray(checkpoint, [path], tmp_path / "ray.ndjson",
                     RaySettings(workers=2, rows_per_unit=1))
    assert expected and got == expected


def test_bad_input_fails_that_input_only(local_ray, checkpoint, tmp_path):
    inputs = _rasters(tmp_path, 2)
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    summary, got = _on_ray(checkpoint, [inputs[0], str(bad), inputs[1]],
                           tmp_path / "ray.ndjson", RaySettings(workers=2))
    assert summary.done == 2 and [p for p, _ in summary.failed] == [str(bad)]
    assert got == _single(checkpoint, inputs, tmp_path / "single.ndjson")


def test_killed_actor_is_restarted_and_the_output_is_complete(local_ray, checkpoint, tmp_path):
    inputs = _rasters(tmp_path, 6)
    expected = _single(checkpoint, inputs, tmp_path / "single.ndjson")
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            names = [a["name"] if isinstance(a, dict) else a
                     for a in ray.util.list_named_actors()]
            workers = [n for n in names if n.startswith("querydet-worker-")]
            if workers:
                time.sleep(1.0)  # mid-run: loading the model or on its first units
                ray.kill(ray.get_actor(sorted(workers)[0]), no_restart=False)
                killed.append(sorted(workers)[0])
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    summary, got = _on_ray(checkpoint, inputs, tmp_path / "ray.ndjson",
                           RaySettings(workers=2, rows_per_unit=1))
    thread.join()
    assert killed, "no actor was killed"
    assert summary.done == 6 and not summary.failed
    assert got == expected


def test_ray_option_without_ray_installed_says_how(monkeypatch, tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from querydet_cli.app import app
    from querydet_cli.core.errors import QueryDetError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    result = CliRunner().invoke(app, ["detect", "x.tif", "-o", str(tmp_path / "o.geojson"),
                                      "--ray", "auto"])
    assert isinstance(result.exception, QueryDetError)
    assert "pip install 'querydet[ray]'" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_against_a_ray_start_head_cluster_on_loopback(checkpoint, tmp_path):
    """A real cluster: `ray start --head` on 127.0.0.1, the CLI with --ray 127.0.0.1:PORT."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    port = 26379
    # token authentication, as a real cluster runs it (Ray >= 2.52): the same token on the
    # head node and on the driver
    import secrets

    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                    str(port), "--num-cpus", "2", "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env,
                   timeout=180)
    try:
        inputs = _rasters(tmp_path, 3)
        expected = _single(checkpoint, inputs, tmp_path / "single.ndjson")
        proc = subprocess.run(
            [sys.executable, "-m", "querydet_cli", "detect", *inputs, "-o",
             str(tmp_path / "cluster.ndjson"), "--weights", str(checkpoint), "--tile-size", "128",
             "--overlap", "16", "--batch-size", "2", "--score-threshold", "0.05",
             "--precision", "fp32", "--ray", f"127.0.0.1:{port}", "--workers", "2", "--quiet"],
            capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        assert _detections(tmp_path / "cluster.ndjson") == expected
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
