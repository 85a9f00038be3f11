import json
from dataclasses import replace

import torch

from querydet_models.checkpoint import load_checkpoint
from querydet_cli.core.config import load_config
from querydet_cli.training.train import lr_at, train


def tiny_cfg(max_iter, **train_changes):
    cfg = load_config("querydet_mobilenet_synthetic")
    return replace(
        cfg,
        model=replace(cfg.model, backbone="resnet18", backbone_weights=None, fpn_channels=16,
                      head_convs=2),
        data=replace(cfg.data, synthetic_train_scenes=4, synthetic_size=96),
        train=replace(cfg.train, batch_size=2, max_iter=max_iter, warmup_iters=5, steps=(1000,),
                      short_sides=(96,), max_size=96, checkpoint_period=3, log_period=1,
                      workers=0, **{"base_lr": 0.01, **train_changes}))


def test_lr_schedule_warmup_and_steps():
    cfg = load_config("querydet_r50_visdrone")
    assert lr_at(cfg, 0) == cfg.train.base_lr * cfg.train.warmup_factor
    assert lr_at(cfg, 10_000) == cfg.train.base_lr
    assert abs(lr_at(cfg, 35_000) - cfg.train.base_lr * 0.1) < 1e-12
    assert abs(lr_at(cfg, 45_000) - cfg.train.base_lr * 0.01) < 1e-12


def test_short_cpu_training_loss_goes_down(tmp_path):
    cfg = tiny_cfg(40, base_lr=0.02)
    train(cfg, tmp_path, quiet=True)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 40
    first = sum(r["loss"] for r in log[:8]) / 8
    last = sum(r["loss"] for r in log[-8:]) / 8
    assert last < first * 0.8, (first, last)
    final = load_checkpoint(tmp_path / "model_final.pt")
    assert final["class_names"][0] == "car"
    assert final["config"]["train"]["max_iter"] == 40


def test_resume_continues_the_same_schedule(tmp_path):
    straight = tmp_path / "straight"
    train(tiny_cfg(6), straight, quiet=True)
    resumed = tmp_path / "resumed"
    train(tiny_cfg(3), resumed, quiet=True)  # "interrupted" after iteration 3
    train(tiny_cfg(6), resumed, resume=True, quiet=True)
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(resumed / "last.pt")
    assert b["extra"]["iteration"] == 6
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), k
    log = [json.loads(line)["iter"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]


def test_resume_after_a_kill_repeats_no_iteration_and_cleans_temporaries(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(3), run, quiet=True)  # last.pt at iteration 3
    # what a run killed at iteration 5 (-9, during a checkpoint save) leaves behind
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 4, "loss": 1.0}\n{"iter": 5, "loss": 1.0}\n{"iter": 6, "lo')
    stale = run / ".last.pt.k3j2.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_cfg(6), run, resume=True, quiet=True)
    log = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    assert not stale.exists()
