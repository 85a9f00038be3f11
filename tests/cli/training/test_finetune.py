"""From one labelled site to the next: spatial validation split, validation while training,
model_best.pt, early stopping, the fine-tuning recipe, carried classes, log-file progress, --tta."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.transform import from_origin
from typer.testing import CliRunner

from querydet_models.checkpoint import load_checkpoint
from querydet_cli.app import app
from querydet_cli.training.chips import cut_chips
from querydet_cli.training.datasets import Sample
from querydet_cli.core.resources import sample_model, sample_scene
from querydet_cli.training.train import Validator, schedule_in_epochs, train
from tests.cli.training.test_train import tiny_cfg

runner = CliRunner()


def _raster(path, size=300):
    rng = np.random.default_rng(0)
    data = rng.integers(20, 80, (3, size, size), dtype=np.uint8)
    boxes = []
    for y in range(10, size - 30, 45):
        for x in range(15, size - 30, 50):
            data[:, y:y + 20, x:x + 22] = 220
            boxes.append([x, y, x + 22, y + 20])
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3,
                       dtype="uint8", crs="EPSG:32617", transform=from_origin(4e5, 3e6, 0.1, 0.1)
                       ) as dst:
        dst.write(data)
    return Sample(path, np.array(boxes, np.float32), np.zeros(len(boxes), np.int64), image_id=1,
                  width=size, height=size)


def _windows(path):
    coco = json.loads(path.read_text())
    return [tuple(im["window"]) for im in coco["images"]], coco


def _disjoint(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay


@pytest.mark.parametrize("how", ["fraction", "bounds"])
def test_the_spatial_split_shares_no_pixel(tmp_path, how):
    sample = _raster(tmp_path / "site.tif")
    kwargs = {"val_fraction": 0.25} if how == "fraction" else \
        {"val_bounds": (4e5 + 10, 3e6 - 20, 4e5 + 20, 3e6 - 10)}  # pixels 100..200 x 100..200
    cut_chips([sample], ["tree"], tmp_path / "chips", size=64, overlap=32, keep_empty=True,
              **kwargs)
    train_w, train = _windows(tmp_path / "chips" / "annotations.json")
    val_w, val = _windows(tmp_path / "chips" / "val.json")
    assert train_w and val_w
    assert all(_disjoint(a, b) for a in train_w for b in val_w)
    if how == "fraction":  # the east quarter
        assert min(x for x, _, _, _ in val_w) == 225 and max(x + w for x, _, w, _ in train_w) <= 225
    else:
        assert all(100 <= x and x + w <= 200 and 100 <= y and y + h <= 200 for x, y, w, h in val_w)
    names = {im["file_name"] for im in train["images"]} | {im["file_name"] for im in val["images"]}
    assert len(names) == len(train["images"]) + len(val["images"])  # one image, one split


def test_tile_refuses_both_split_options(tmp_path):
    sample_path = tmp_path / "site.tif"
    _raster(sample_path)
    result = runner.invoke(app, ["tile", str(sample_path), "--labels", str(sample_path),
                                 "--out", str(tmp_path / "o"), "--val-fraction", "0.2",
                                 "--val-bounds", "0,0,1,1"])
    assert result.exit_code != 0 and not (tmp_path / "o").exists()


def test_model_best_is_the_checkpoint_with_the_best_validation_ap(tmp_path):
    cfg = tiny_cfg(12, eval_period=3, base_lr=0.02)
    cfg = replace(cfg, data=replace(cfg.data, synthetic_val_scenes=2))
    summary = train(cfg, tmp_path, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = [r for r in rows if "val_AP50" in r]
    assert [r["iter"] for r in validated] == [3, 6, 9, 12]
    best = max(validated, key=lambda r: (r["val_AP50"], -r["iter"]))  # the first of the best
    saved = load_checkpoint(tmp_path / "model_best.pt")
    assert saved["extra"]["iteration"] == best["iter"] == summary["best_iteration"]
    assert saved["extra"]["val_AP50"] == pytest.approx(best["val_AP50"])
    # evaluated again from the file, the saved model scores what was logged
    from querydet_cli.runtimes.loading import load_model

    model, saved_cfg = load_model(tmp_path / "model_best.pt")
    again = Validator(saved_cfg, tmp_path, torch.device("cpu"))
    again.out = tmp_path / "again"
    again.out.mkdir()
    assert again.run(model, 0)["val_AP50"] == pytest.approx(best["val_AP50"], abs=1e-6)


def test_early_stop_counts_validations_since_the_best():
    v = Validator.__new__(Validator)
    v.cfg = replace(tiny_cfg(10), train=replace(tiny_cfg(10).train, early_stop=2))
    v.best_iter, v.history = 3, [(3, 0.5), (6, 0.4)]
    assert not v.should_stop()
    v.history.append((9, 0.5))  # not better than the best
    assert v.should_stop()
    v.cfg = replace(v.cfg, train=replace(v.cfg.train, early_stop=0))
    assert not v.should_stop()


def test_a_schedule_in_epochs_sets_iterations_and_steps():
    cfg = replace(tiny_cfg(5), train=replace(tiny_cfg(5).train, epochs=10, warmup_iters=100,
                                             max_iter=100_000))
    t = schedule_in_epochs(cfg, 6).train
    assert (t.max_iter, t.steps, t.warmup_iters) == (60, (40, 53), 12)
    capped = schedule_in_epochs(replace(cfg, train=replace(cfg.train, max_iter=30)), 6).train
    assert (capped.max_iter, capped.steps, capped.warmup_iters) == (30, (20, 26), 6)  # a cap
    assert schedule_in_epochs(tiny_cfg(5), 6) == tiny_cfg(5)  # epochs 0: as configured


def test_a_class_of_the_same_name_keeps_its_predictor():
    from querydet_cli.runtimes.loading import load_model
    from querydet_models.detectors.querydet import build_querydet

    old, cfg = load_model(sample_model())
    new = build_querydet(replace(cfg.model, num_classes=2, backbone_weights=None), cfg.inference)
    state = old.state_dict()
    rows = [cfg.names().index("tree"), None]
    assert new.copy_class_rows(state, rows) == 1
    last = len(new.head.cls.convs) - 1
    w_new, w_old = new.head.cls.convs[last].weight, state[f"head.cls.convs.{last}.weight"]
    anchors = new.head.num_anchors
    for a in range(anchors):
        assert torch.equal(w_new[a * 2], w_old[a * 5 + 3])
        assert not torch.equal(w_new[a * 2 + 1], w_old[a * 5 + 3])


def test_train_init_uses_the_finetune_recipe_and_logs_lines_to_a_file(tmp_path):
    sample = _raster(tmp_path / "site.tif", size=256)
    cut_chips([sample], ["tree"], tmp_path / "chips", size=96, overlap=24, val_fraction=0.25)
    log = tmp_path / "train.log"
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "querydet_cli", "train", "--init", str(sample_model()),
             "--dataset", "coco", "--train-annotations", str(tmp_path / "chips/annotations.json"),
             "--val-annotations", str(tmp_path / "chips/val.json"), "--epochs", "2", "--freeze-bn",
             "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=err, text=True,
            cwd=tmp_path)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text  # no carriage-return bars in a log file
    lines = [line for line in text.splitlines() if line.startswith("querydet: train: ")]
    assert lines and lines[-1].startswith("querydet: train: ") and "val_AP50" in lines[-1]
    saved = load_checkpoint(tmp_path / "run" / "model_final.pt")
    t = saved["config"]["train"]
    assert (t["resize"], t["freeze_bn"], t["backbone_lr_factor"], t["epochs"]) == \
        ("native", True, 0.1, 2)
    assert t["augment"]["grayscale_prob"] == 0.3 and t["augment"]["dihedral"]
    assert saved["config"]["data"]["gsd"] == pytest.approx(0.1)  # from the chips' GeoTIFFs
    assert (tmp_path / "run" / "model_best.pt").is_file()
    # frozen BN: running statistics are the loaded ones
    init = load_checkpoint(sample_model())["model"]
    key = next(k for k in init if k.endswith("running_mean"))
    assert torch.equal(saved["model"][key], init[key])


def test_tta_on_an_image_and_its_rotation_gives_the_same_boxes_rotated(tmp_path):
    from querydet_cli.api import Detector

    with rasterio.open(sample_scene()) as src:
        pixels = src.read(window=rasterio.windows.Window(256, 256, 320, 256))  # (3, 256, 320)
    turned = np.rot90(pixels, 1, axes=(1, 2)).copy()  # counter-clockwise: (3, 320, 256)
    detector = Detector.load(device="cpu", precision="fp32", tta=True, gsd="native",
                             score_threshold=0.05)
    a = detector.detect(pixels)
    b = detector.detect(turned)
    assert len(a) > 3 and len(a) == len(b)
    # a box (x1, y1, x2, y2) of the image is (y1, W - x2, y2, W - x1) in the turned one
    width = pixels.shape[2]
    expected = np.stack([a.y1, width - a.x2, a.y2, width - a.x1], 1)
    got = np.stack([b.x1, b.y1, b.x2, b.y2], 1)
    order_e = np.lexsort(expected.T[::-1])
    order_g = np.lexsort(got.T[::-1])
    assert np.abs(expected[order_e] - got[order_g]).max() < 0.02
    assert np.allclose(np.sort(a.score), np.sort(b.score), atol=1e-3)
    plain = Detector.load(device="cpu", precision="fp32", gsd="native",
                          score_threshold=0.05).detect(pixels)
    assert len(plain) > 0
