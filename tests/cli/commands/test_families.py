"""train, eval, detect and bench work for every detector family from the config alone."""

import json
from dataclasses import replace

import pytest
import yaml
from affine import Affine
from typer.testing import CliRunner

from querydet_models.checkpoint import load_checkpoint
from querydet_cli.app import app
from querydet_cli.bench.heads import BenchOptions, run_bench
from querydet_cli.core.config import load_config
from tests.cli.oracle import paint, write_tif

runner = CliRunner()


def tiny_config(tmp_path, name):
    """A config file of the named family, shrunk to run in seconds on a CPU."""
    cfg = load_config(name)
    cfg = replace(
        cfg,
        model=replace(cfg.model, backbone="resnet18", fpn_channels=16, roi_head_channels=32),
        data=replace(cfg.data, synthetic_train_scenes=2, synthetic_val_scenes=2, synthetic_size=96),
        train=replace(cfg.train, batch_size=2, max_iter=2, warmup_iters=1, steps=(1000,),
                      short_sides=(96,), max_size=96, test_short_side=96, checkpoint_period=2,
                      log_period=1, workers=0))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("name,detector", [("querydet_fcos_mobilenet_synthetic", "fcos"),
                                           ("querydet_faster_rcnn_mobilenet_synthetic",
                                            "faster_rcnn")])
def test_train_eval_detect_from_the_config_alone(tmp_path, name, detector):
    config = tiny_config(tmp_path, name)
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    weights = tmp_path / "run" / "model_final.pt"
    assert load_checkpoint(weights)["config"]["model"]["detector"] == detector

    result = runner.invoke(app, ["eval", "--weights", str(weights), "--sigma", "0,0.5",
                                 "--out", str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["run"] for r in rows] == ["dense", "csq sigma=0", "csq sigma=0.5"]
    assert all(r["images_per_s"] > 0 for r in rows)

    img = write_tif(tmp_path / "a.tif", paint(200, 160, [(10, 10, 30, 30)]),
                    Affine(1, 0, 0, 0, -1, 0))
    out = tmp_path / "dets.geojson"
    result = runner.invoke(app, ["detect", str(img), "-o", str(out), "--weights", str(weights),
                                 "--score-threshold", "0.0", "--quiet", "--tile-size", "128",
                                 "--overlap", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["type"] == "FeatureCollection"


@pytest.mark.parametrize("detector,baseline", [("fcos", "fcos_p3_p7"),
                                               ("faster_rcnn", "faster_rcnn_rpn1")])
def test_bench_rows_for_each_family(detector, baseline):
    opts = BenchOptions(detector=detector, backbone="resnet18", image_size=128, repeats=1,
                        query_density=0.05, backends=("torch",))
    report = run_bench(opts)
    modes = report["modes"]
    assert report["baseline"] == baseline
    assert {"dense_hr", "csq_exact_torch", "cq", "ccq", baseline} <= set(modes)
    for name in ("csq_exact_torch", "cq", "ccq"):
        assert modes[name]["max_rel_err"] < 1e-4, name
        assert "speedup_vs_dense" in modes[name] and "speedup_vs_baseline" in modes[name]
    if detector == "faster_rcnn":  # fewer RPN positions, fewer RoIs for the second stage
        assert sum(modes["csq_exact_torch"]["proposals"]) <= sum(modes["dense_hr"]["proposals"])


def test_bench_cli_rejects_unknown_detector():
    result = runner.invoke(app, ["bench", "--detector", "yolo", "--image-size", "96"])
    # an enum option: a usage error (exit 2) that lists the families
    assert result.exit_code == 2
    assert "'yolo'" in result.output
