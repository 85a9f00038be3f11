"""`querydet train`: SGD with warm-up and step decay, checkpoints, resume, JSONL metrics.

Runs on the CPU or CUDA (mixed precision there); under `torchrun` it trains with
DistributedDataParallel, one process per GPU, and only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from querydet_models.checkpoint import (CheckpointError, copy_matching_weights, load_checkpoint,
                                        save_checkpoint)
from querydet_models.detectors.querydet import ModelInputError, build_querydet

from ..core.config import Config, config_from_dict
from .datasets import (DetectionDataset, Problem, Sample, coco_category_ids, collate, load_coco,
                       load_visdrone)
from ..core.errors import QueryDetError
from ..core.locking import OutputLock
from ..core.progress import progress
from ..reading.gsd import training_gsd
from .synthetic import PIXEL_SIZE, write_dataset


def category_ids_of(cfg: Config, split: str = "train") -> list[int] | None:
    """The dataset's own category ids per class (COCO JSON), or None (1..K)."""
    d = cfg.data
    annotations = d.train_annotations if split == "train" else d.val_annotations
    if d.dataset == "coco" and annotations:
        return coco_category_ids(annotations)
    return None


def load_split(cfg: Config, split: str, work_dir: Path
               ) -> tuple[list[Sample], list[str], list[Problem]]:
    """Samples of the train or val split of the configured dataset.

    Synthetic data is generated on first use under work_dir/synthetic-{split}; the two splits
    use different seeds, so validation scenes are never training scenes.
    """
    d = cfg.data
    if d.dataset == "synthetic":
        n = d.synthetic_train_scenes if split == "train" else d.synthetic_val_scenes
        seed = d.synthetic_seed if split == "train" else d.synthetic_seed + 1
        folder = work_dir / f"synthetic-{split}-{seed}-{n}-{d.synthetic_size}"
        ann = folder / "annotations.json"
        if not ann.is_file():
            write_dataset(folder, n, d.synthetic_size, seed)
        return load_coco(ann)
    root = d.train_root if split == "train" else d.val_root
    annotations = d.train_annotations if split == "train" else d.val_annotations
    if d.dataset == "visdrone":
        if not root:
            raise QueryDetError(f"data.{split}_root is required for the visdrone dataset")
        return load_visdrone(root)
    if not annotations:
        raise QueryDetError(f"data.{split}_annotations (a COCO JSON) is required for coco data")
    return load_coco(annotations, root)


def report_problems(problems: list[Problem], limit: int = 20) -> None:
    for p in problems[:limit]:
        print(f"querydet: warning: {p}", file=sys.stderr)
    if len(problems) > limit:
        print(f"querydet: warning: ... and {len(problems) - limit} more annotation problems",
              file=sys.stderr)


def lr_at(cfg: Config, iteration: int) -> float:
    """Learning rate at `iteration`: linear warm-up, then x lr_gamma at each step."""
    t = cfg.train
    lr = t.base_lr * t.lr_gamma ** sum(iteration >= s for s in t.steps)
    if iteration < t.warmup_iters:
        alpha = iteration / t.warmup_iters
        lr *= t.warmup_factor * (1 - alpha) + alpha
    return lr


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def train(cfg: Config, out_dir: str | Path, device: str = "cpu", resume: bool = False,
          quiet: bool = False, init: str | Path | None = None,
          earlier: Config | None = None) -> dict[str, Any]:
    """Train `cfg` into out_dir (last.pt, model_final.pt, metrics.jsonl); returns a summary.
    `earlier`: whose recorded training data a refine run mixes in (default: --init's)."""
    out = Path(out_dir)
    rank, world = _distributed()
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QueryDetError("--device cuda given but no CUDA device is available")
    last = out / "last.pt"
    if resume and not last.is_file():
        raise QueryDetError(f"--resume: no checkpoint to resume from at {last}")
    if resume and init is not None:
        raise QueryDetError("--init starts a new run; --resume continues OUT/last.pt: give one")
    init_payload = None
    if init is not None:
        try:
            init_payload = load_checkpoint(init)
        except CheckpointError as err:
            raise QueryDetError(f"--init: {err}") from None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out / ".querydet.lock", str(out))
    if rank == 0:  # one run per folder (the ranks of one torchrun job share it)
        lock.acquire()
    try:
        return _train(cfg, out, dev, resume, quiet, rank, world, last, init, init_payload,
                      earlier)
    except QueryDetError:  # a user's mistake found late leaves nothing behind
        if rank == 0 and not any(p.name != ".querydet.lock" for p in out.iterdir()):
            lock.release(remove=True)
            if created:
                out.rmdir()
        raise
    finally:
        lock.release()


def _train(cfg: Config, out: Path, dev: torch.device, resume: bool, quiet: bool, rank: int,
           world: int, last: Path, init: str | Path | None = None,
           init_payload: dict[str, Any] | None = None, earlier: Config | None = None
           ) -> dict[str, Any]:
    samples, cfg = _training_data(cfg, out)
    start_iter = 0
    payload = None
    if resume:
        try:
            payload = load_checkpoint(last)
        except CheckpointError as err:
            raise QueryDetError(str(err)) from None
        # the run's own config, except how far to go: a resumed run may be extended
        cfg = replace(config_from_dict(payload["config"]),
                      train=replace(config_from_dict(payload["config"]).train,
                                    max_iter=cfg.train.max_iter, epochs=cfg.train.epochs))
        start_iter = int(payload["extra"].get("iteration", 0))
        if "optimizer" not in payload["extra"]:
            raise QueryDetError(f"--resume: {last} has no optimizer state (it is not a training "
                                "checkpoint of querydet train); start from it with --init")
    if earlier is None and init_payload is not None:
        earlier = config_from_dict(init_payload["config"])
    samples = samples + _mixed_in(cfg, out, resume, earlier, len(samples), rank == 0)
    t = cfg.train
    dataset = DetectionDataset(samples, t.short_sides, t.max_size, train=True, hflip=t.hflip,
                               seed=t.seed + rank, augment=t.augment, resize=t.resize,
                               target_gsd=cfg.data.gsd)
    per_epoch = -(-len(dataset) // (t.batch_size * world))
    cfg = schedule_in_epochs(cfg, per_epoch)
    t = cfg.train
    validator = Validator(cfg, out, dev) if t.eval_period and rank == 0 else None

    torch.manual_seed(t.seed + rank)
    model, optimizer, scaler, use_amp = _build(cfg, dev, payload, init, init_payload, rank)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    log_path = out / "metrics.jsonl"
    if rank == 0:
        _remove_stale_temporaries(out)
        _truncate_metrics(log_path, start_iter)
    train_mode(model, t.freeze_bn)
    bar = progress(t.max_iter, "train", initial=start_iter, disable=quiet or rank != 0,
                   every=t.log_period)
    losses: dict[str, float] = {}
    started = time.time()
    it = start_iter
    for images, targets in batches(dataset, t, world, rank, start_iter, per_epoch):
        if it >= t.max_iter or (validator is not None and validator.should_stop()):
            break
        losses = _step(cfg, net, optimizer, scaler, use_amp, images, targets, it, dev)
        it += 1
        if rank != 0:
            continue
        bar.update(1)
        row = {"iter": it, "lr": lr_at(cfg, it - 1), **losses,
               "elapsed_s": round(time.time() - started, 2)}
        if validator is not None and (it % t.eval_period == 0 or it == t.max_iter):
            row |= validator.run(model, it)
            train_mode(model, t.freeze_bn)
        bar.set_postfix(_postfix(losses, validator), refresh=False)
        if it % t.log_period == 0 or it == t.max_iter or "val_AP" in row:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if it % t.checkpoint_period == 0 or it == t.max_iter:
            _save(last, model, cfg, optimizer, scaler, it)
    bar.close()
    if rank == 0:
        save_checkpoint(out / "model_final.pt", model, cfg.to_dict(), list(cfg.class_names))
        if it % t.checkpoint_period and it < t.max_iter:  # stopped early: last.pt is this one
            _save(last, model, cfg, optimizer, scaler, it)
    if world > 1:
        torch.distributed.barrier()
    summary = {"iterations": it, "final_losses": losses, "out_dir": str(out),
               "class_names": list(cfg.class_names), "gsd": cfg.data.gsd}
    if validator is not None:
        summary |= validator.summary()
    return summary


def batches(dataset: DetectionDataset, t, world: int, rank: int, start_iter: int,
            per_epoch: int):
    """The same batches, in the same order, whether or not the run was resumed."""
    epoch, skip = divmod(start_iter, per_epoch)
    while True:
        dataset.epoch = epoch
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(dataset, world, rank, seed=t.seed)
            sampler.set_epoch(epoch)
        else:
            gen = torch.Generator().manual_seed(t.seed * 1000 + epoch)
            sampler = torch.utils.data.RandomSampler(dataset, generator=gen)
        order = list(sampler)[skip * t.batch_size:]
        loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, sampler=order,
                                             collate_fn=collate, num_workers=t.workers)
        yield from loader
        skip = 0
        epoch += 1


def _training_data(cfg: Config, out: Path) -> tuple[list[Sample], Config]:
    """The training samples, and the config with their classes, category ids and GSD."""
    samples, names, problems = load_split(cfg, "train", out)
    report_problems(problems)
    if not samples:
        raise QueryDetError("no usable training images (see the warnings above)")
    ids = tuple(category_ids_of(cfg) or ())
    if (cfg.model.num_classes != len(names) or tuple(cfg.class_names) != tuple(names)
            or tuple(cfg.class_ids) != ids):
        cfg = replace(cfg, model=replace(cfg.model, num_classes=len(names)),
                      class_names=tuple(names), class_ids=ids)
    gsd = training_gsd(cfg.data.dataset, cfg.data.gsd, [s.image for s in samples], PIXEL_SIZE)
    if gsd != cfg.data.gsd:
        cfg = replace(cfg, data=replace(cfg.data, gsd=gsd))
    return samples, cfg


def _mixed_in(cfg: Config, out: Path, resume: bool, earlier: Config | None, new: int,
              write: bool) -> list[Sample]:
    """The earlier site's chips a refine run mixes in (refine.py): drawn once from the training
    data `earlier` records, read back from the run's replay.json on --resume."""
    from .refine import read_replay, replay_samples

    if cfg.train.replay <= 0:
        return []
    if resume:
        return read_replay(out)
    if earlier is None:
        return []
    return replay_samples(earlier, list(cfg.class_names), round(cfg.train.replay * new),
                          cfg.train.seed, out if write else None)


def finetune_recipe(cfg: Config, validation: bool) -> Config:
    """The schedule `train --init` uses unless told otherwise, made for a few hundred labels:
    counted in epochs, a short warm-up, the pretrained backbone at a tenth of the heads' rate,
    batch-norm statistics adapting (measured better across sites; --freeze-bn keeps them), chips
    at their own pixel scale, the config's augmentation with 30% of the chips turned grey, and with
    validation data an evaluation every 25 iterations and a stop after 8 without a better one."""
    # grey copies of a quarter-plus of the chips: the next site's crowns (or roofs, or cars) rarely
    # share this site's colours; measured across the two NEON forests (README), it carried over
    augment = replace(cfg.train.augment, grayscale_prob=0.3)
    t = replace(cfg.train, epochs=40, max_iter=100_000, batch_size=4, base_lr=0.01, momentum=0.9,
                augment=augment,
                weight_decay=0.0001, warmup_iters=50, warmup_factor=0.01, lr_gamma=0.1,
                backbone_lr_factor=0.1, freeze_backbone=False, resize="native",
                clip_grad_norm=35.0, checkpoint_period=100,
                log_period=10, eval_period=25 if validation else 0,
                early_stop=8 if validation else 0)
    return replace(cfg, train=t)


def schedule_in_epochs(cfg: Config, per_epoch: int) -> Config:
    """With train.epochs > 0: max_iter = epochs x iterations per epoch (at most the config's
    max_iter, a recipe's cap), the steps at 2/3 and 8/9 of it, warm-up at most a fifth of it.
    The config records what ran."""
    t = cfg.train
    if t.epochs <= 0:
        return cfg
    total = max(1, min(t.epochs * per_epoch, t.max_iter))
    steps = tuple(sorted({max(1, total * 2 // 3), max(2, total * 8 // 9)}))
    return replace(cfg, train=replace(t, max_iter=total, steps=steps,
                                      warmup_iters=max(1, min(t.warmup_iters, total // 5))))


def _build(cfg: Config, dev: torch.device, payload, init, init_payload, rank: int):
    """Model, optimizer (the backbone at backbone_lr_factor of the rate) and AMP scaler, from a
    --resume payload, an --init checkpoint or the config's start weights."""
    # a resumed or initialised run gets every weight from its checkpoint: no backbone file
    weights_file = cfg.model.backbone_weights if payload is None and init_payload is None else None
    model = build_querydet(replace(cfg.model, backbone_weights=weights_file), cfg.inference)
    model = model.to(dev)
    if init_payload is not None:
        _initialise_from(model, cfg, init, init_payload, rank)
    t = cfg.train
    if t.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    if t.freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)
    backbone = {id(p) for p in model.backbone.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) in backbone],
               "lr_factor": t.backbone_lr_factor},
              {"params": [p for p in model.parameters()
                          if p.requires_grad and id(p) not in backbone], "lr_factor": 1.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=t.base_lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    use_amp = t.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["extra"]["optimizer"])
        if "scaler" in payload["extra"]:
            scaler.load_state_dict(payload["extra"]["scaler"])
    return model, optimizer, scaler, use_amp


def train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """Training mode; with `freeze_bn`, batch-norm layers keep their loaded statistics."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _step(cfg: Config, net, optimizer, scaler, use_amp: bool, images, targets, it: int,
          dev: torch.device) -> dict[str, float]:
    """One SGD step at iteration `it`; returns the losses."""
    t = cfg.train
    lr = lr_at(cfg, it)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
    images = [im.to(dev) for im in images]
    targets = [{k: v.to(dev) for k, v in tg.items()} for tg in targets]
    with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
        try:
            loss_dict = net(images, targets)
        except ModelInputError as err:
            raise QueryDetError(f"bad training sample at iteration {it}: {err}") from None
    total = sum(loss_dict.values())
    if not torch.isfinite(total):
        raise QueryDetError(f"loss became {float(total)} at iteration {it}; lower "
                            "train.base_lr or check the annotations")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if t.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    losses = {k: float(v.detach()) for k, v in loss_dict.items()}
    losses["loss"] = float(total.detach())
    return losses


def _postfix(losses: dict[str, float], validator: "Validator | None") -> dict[str, str]:
    shown = {k.replace("loss_", ""): f"{v:.3f}" for k, v in losses.items()}
    if validator is not None and validator.history:
        shown |= {f"val_{validator.metric}": f"{validator.history[-1][1]:.3f}",
                  "best": f"{validator.best:.3f}"}
    return shown


class Validator:
    """Validation AP every train.eval_period iterations: `model_best.pt` keeps the best (by
    train.best_metric), and after train.early_stop evaluations without a better one, the run
    stops."""

    def __init__(self, cfg: Config, out: Path, dev: torch.device) -> None:
        d = cfg.data
        if d.dataset != "synthetic" and not (d.val_annotations or d.val_root):
            raise QueryDetError("train.eval_period needs validation data: --val-annotations "
                                "(e.g. the val.json of `querydet tile --val-fraction`)")
        samples, _, problems = load_split(cfg, "val", out)
        report_problems(problems)
        if not samples:
            raise QueryDetError("no usable validation images (see the warnings above)")
        self.samples, self.cfg, self.out, self.dev = samples, cfg, out, dev
        self.metric = cfg.train.best_metric
        self.best = -1.0
        self.best_iter = 0
        self.history: list[tuple[int, float]] = []

    def run(self, model, iteration: int) -> dict[str, float]:
        """Evaluate (CSQ, the model's own inference settings) and keep the best checkpoint."""
        from .evaluation import predict, truths_of
        from .metrics import coco_metrics

        t = self.cfg.train
        model.eval()
        dets, _, _ = predict(model, self.samples, t.test_short_side, t.max_size, self.dev,
                             quiet=True, resize=t.resize, target_gsd=self.cfg.data.gsd)
        metrics = coco_metrics(truths_of(self.samples), dets, list(self.cfg.names()), 100)
        value = max(0.0, metrics[self.metric] if metrics[self.metric] is not None else 0.0)
        self.history.append((iteration, value))
        if value > self.best:
            self.best, self.best_iter = value, iteration
            save_checkpoint(self.out / "model_best.pt", model, self.cfg.to_dict(),
                            list(self.cfg.class_names), {"iteration": iteration,
                                                         f"val_{self.metric}": value})
        return {"val_AP": metrics["AP"], "val_AP50": metrics["AP50"]}

    def should_stop(self) -> bool:
        patience = self.cfg.train.early_stop
        since_best = sum(1 for i, _ in self.history if i > self.best_iter)
        return bool(patience) and bool(self.history) and since_best >= patience

    def summary(self) -> dict[str, Any]:
        return {f"best_val_{self.metric}": self.best, "best_iteration": self.best_iter,
                "validations": len(self.history),
                "stopped_early": self.should_stop()}


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary checkpoint files a killed run left (this run holds the folder's lock)."""
    for tmp in out.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def _truncate_metrics(log_path: Path, start_iter: int) -> None:
    """Drop logged iterations after the checkpoint a run resumes from (a new run: all of them),
    so metrics.jsonl never repeats an iteration."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if int(json.loads(line)["iter"]) <= start_iter:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut by the kill
            continue
    tmp = log_path.with_name(f".{log_path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, log_path)


def _initialise_from(model, cfg: Config, init, payload: dict[str, Any], rank: int) -> None:
    """Copy the --init checkpoint's weights by name and shape; the classification predictor
    starts afresh when the class list differs. Says on stderr what was kept."""
    old = config_from_dict(payload["config"])
    new_names, old_names = list(cfg.names()), list(old.names())
    skip = set() if new_names == old_names else model.class_parameter_names()
    copied, fresh = copy_matching_weights(model, payload["model"], skip)
    shared = [old_names.index(n) if n in old_names else None for n in new_names]
    carried = model.copy_class_rows(payload["model"], shared) if skip else 0
    if rank != 0:
        return
    print(f"querydet: --init {init}: copied {len(copied)} of {len(copied) + len(fresh)} tensors",
          file=sys.stderr)
    if skip:
        print(f"querydet: --init: classes differ ({', '.join(old_names)} -> "
              f"{', '.join(new_names)}): classification predictor re-initialised "
              f"({', '.join(sorted(skip))})" + (f"; {carried} class(es) of the same name start "
                                                 "from their old predictor" if carried else ""),
              file=sys.stderr)
    other = [k for k in fresh if k not in skip]
    if other:
        print(f"querydet: --init: {len(other)} tensors did not match by name and shape and start "
              f"from scratch: {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}",
              file=sys.stderr)


def _save(path: Path, model, cfg: Config, optimizer, scaler, iteration: int) -> None:
    extra = {"iteration": iteration, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict()}
    save_checkpoint(path, model, cfg.to_dict(), list(cfg.class_names), extra)
