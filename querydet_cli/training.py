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
from tqdm import tqdm

from querydet_models.checkpoint import (CheckpointError, copy_matching_weights, load_checkpoint,
                                        save_checkpoint)
from querydet_models.querydet import ModelInputError, build_querydet

from .config import Config, config_from_dict
from .datasets import (DetectionDataset, Problem, Sample, coco_category_ids, collate, load_coco,
                       load_visdrone)
from .errors import QueryDetError
from .locking import OutputLock
from .gsd import training_gsd
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
          quiet: bool = False, init: str | Path | None = None) -> dict[str, Any]:
    """Train `cfg` into out_dir (last.pt, model_final.pt, metrics.jsonl); returns a summary."""
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
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out / ".querydet.lock", str(out))
    if rank == 0:  # one run per folder (the ranks of one torchrun job share it)
        lock.acquire()
    try:
        return _train(cfg, out, dev, resume, quiet, rank, world, last, init, init_payload)
    finally:
        lock.release()


def _train(cfg: Config, out: Path, dev: torch.device, resume: bool, quiet: bool, rank: int,
           world: int, last: Path, init: str | Path | None = None,
           init_payload: dict[str, Any] | None = None) -> dict[str, Any]:
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
                                    max_iter=cfg.train.max_iter))
        start_iter = int(payload["extra"].get("iteration", 0))
        if "optimizer" not in payload["extra"]:
            raise QueryDetError(f"--resume: {last} has no optimizer state (it is not a training "
                                "checkpoint of querydet train); start from it with --init")

    torch.manual_seed(cfg.train.seed + rank)
    # a resumed or initialised run gets every weight from its checkpoint: no backbone file
    weights_file = cfg.model.backbone_weights if payload is None and init_payload is None else None
    model = build_querydet(replace(cfg.model, backbone_weights=weights_file), cfg.inference)
    model = model.to(dev)
    if init_payload is not None:
        _initialise_from(model, cfg, init, init_payload, rank)
    if cfg.train.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.train.base_lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    use_amp = cfg.train.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["extra"]["optimizer"])
        if "scaler" in payload["extra"]:
            scaler.load_state_dict(payload["extra"]["scaler"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    t = cfg.train
    dataset = DetectionDataset(samples, t.short_sides, t.max_size, train=True, hflip=t.hflip,
                               seed=t.seed + rank)
    per_epoch = -(-len(dataset) // (t.batch_size * world))

    def batches():
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

    log_path = out / "metrics.jsonl"
    if rank == 0:
        _remove_stale_temporaries(out)
        _truncate_metrics(log_path, start_iter)
    model.train()
    bar = tqdm(total=t.max_iter, initial=start_iter, file=sys.stderr, disable=quiet or rank != 0,
               desc="train", dynamic_ncols=True)
    losses: dict[str, float] = {}
    started = time.time()
    it = start_iter
    for images, targets in batches():
        if it >= t.max_iter:
            break
        lr = lr_at(cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
            torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        it += 1
        losses = {k: float(v.detach()) for k, v in loss_dict.items()}
        losses["loss"] = float(total.detach())
        if rank == 0:
            bar.update(1)
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in losses.items()},
                            refresh=False)
            if it % t.log_period == 0 or it == t.max_iter:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"iter": it, "lr": lr, **losses,
                                        "elapsed_s": round(time.time() - started, 2)}) + "\n")
            if it % t.checkpoint_period == 0 or it == t.max_iter:
                _save(last, model, cfg, optimizer, scaler, it)
    bar.close()
    if rank == 0:
        final = out / "model_final.pt"
        save_checkpoint(final, model, cfg.to_dict(), list(cfg.class_names))
    if world > 1:
        torch.distributed.barrier()
    return {"iterations": it, "final_losses": losses, "out_dir": str(out),
            "class_names": list(cfg.class_names)}


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
    if rank != 0:
        return
    print(f"querydet: --init {init}: copied {len(copied)} of {len(copied) + len(fresh)} tensors",
          file=sys.stderr)
    if skip:
        print(f"querydet: --init: classes differ ({', '.join(old_names)} -> "
              f"{', '.join(new_names)}): classification predictor re-initialised "
              f"({', '.join(sorted(skip))})", file=sys.stderr)
    other = [k for k in fresh if k not in skip]
    if other:
        print(f"querydet: --init: {len(other)} tensors did not match by name and shape and start "
              f"from scratch: {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}",
              file=sys.stderr)


def _save(path: Path, model, cfg: Config, optimizer, scaler, iteration: int) -> None:
    extra = {"iteration": iteration, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict()}
    save_checkpoint(path, model, cfg.to_dict(), list(cfg.class_names), extra)
