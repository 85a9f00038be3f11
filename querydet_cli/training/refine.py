"""The second fine-tune: a model that already knows the class learns a new site from a few
corrected labels without forgetting the site it came from.

`train --init` takes this recipe by default when the checkpoint was trained on real imagery
(not the synthetic scenes) and already knows every class of the new data; otherwise the first
fine-tuning recipe (`finetune_recipe`), which also starts new classes. The differences: half the
learning rate (the heads are already good and a few labels must not throw them off), a short
warm-up, epochs counted over the new chips, so a handful of corrected chips make a short run and
a few hundred a longer one, and the earlier site's chips mixed in (`train.replay` of them per new
chip), drawn from the training data the checkpoint records where it is still on disk.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..core.config import Config
from ..core.errors import QueryDetError
from .datasets import Sample, load_coco, load_visdrone

MAX_ITER = 200  # the refine run's cap: 40 epochs of a few corrected chips, less of many
REPLAY_FILE = "replay.json"  # the run's earlier chips, kept so --resume mixes in the same ones


def data_class_names(cfg: Config) -> list[str] | None:
    """The classes of the configured training data, in the order training numbers them (a
    COCO JSON's categories by id); None when they cannot be read here (training says why)."""
    from .datasets import VISDRONE_CLASSES
    from .synthetic import CLASSES

    d = cfg.data
    if d.dataset == "synthetic":
        return list(CLASSES)
    if d.dataset == "visdrone":
        return list(VISDRONE_CLASSES)
    try:
        data = json.loads(Path(d.train_annotations).read_text())
        return [str(c["name"]) for c in sorted(data["categories"], key=lambda c: c["id"])]
    except (OSError, TypeError, ValueError, KeyError):
        return None


def knows_every_class(checkpoint: Config, names: list[str] | None) -> bool:
    """Whether a checkpoint already knows the classes `names`: trained on real imagery (a model
    of the synthetic scenes has seen no real object) with every one of them in its list."""
    return (names is not None and checkpoint.data.dataset != "synthetic"
            and set(names) <= set(checkpoint.names()))


def refine_recipe(cfg: Config, validation: bool) -> Config:
    """The schedule of a second fine-tune (module docstring): SGD at 0.005 with the backbone at
    a tenth, 20 warm-up iterations, 40 epochs over the new chips with as many earlier chips
    mixed in (at most 200 iterations), 30% of the chips grey, native scale, adapting batch-norm statistics; with
    validation data an evaluation every 10 iterations and a stop after 8 without a better one."""
    augment = replace(cfg.train.augment, grayscale_prob=0.3)
    t = replace(cfg.train, epochs=40, max_iter=MAX_ITER, batch_size=4, base_lr=0.005, momentum=0.9, augment=augment,
                weight_decay=0.0001, warmup_iters=20, warmup_factor=0.01, lr_gamma=0.1,
                backbone_lr_factor=0.1, freeze_backbone=False, resize="native",
                clip_grad_norm=35.0, checkpoint_period=100, log_period=10,
                eval_period=10 if validation else 0, early_stop=8 if validation else 0,
                replay=1.0)
    return replace(cfg, train=t)


def replay_samples(earlier: Config, names: list[str], count: int, seed: int,
                   out: Path | None) -> list[Sample]:
    """Up to `count` chips of the checkpoint's recorded training data (`earlier`), drawn at
    random with `seed`, their labels renumbered to `names` (a class the new run does not train
    becomes an ignore region); written to out/replay.json (unless `out` is None: another rank
    writes it) so that --resume draws none anew.
    Says on stderr what was mixed in, or why nothing was."""
    d = earlier.data
    where = d.train_annotations if d.dataset == "coco" else d.train_root
    try:
        if d.dataset == "coco" and where and Path(where).is_file():
            samples, old_names, _ = load_coco(where, d.train_root)
        elif d.dataset == "visdrone" and where and Path(where).is_dir():
            samples, old_names, _ = load_visdrone(where)
        else:
            samples, old_names = [], []
    except QueryDetError as err:
        print(f"querydet: --init: its training data cannot be read ({err}); training on the "
              "new chips alone", file=sys.stderr)
        return []
    if not samples or count <= 0:
        if count > 0:
            print(f"querydet: --init: its training data ({where or d.dataset}) is not here; "
                  "training on the new chips alone", file=sys.stderr)
        return []
    chosen = random.Random(seed).sample(samples, min(count, len(samples)))
    mixed = [renumber(s, old_names, names) for s in chosen]
    if out is not None:
        write_replay(out / REPLAY_FILE, mixed, names)
    print(f"querydet: --init: {len(mixed)} earlier chips of {where} mixed in with the new ones "
          "(train.replay)", file=sys.stderr)
    return mixed


def renumber(sample: Sample, old: list[str], new: list[str]) -> Sample:
    """A sample's labels from the class list `old` to `new`; boxes of classes `new` lacks
    become ignore regions."""
    index = {n: i for i, n in enumerate(new)}
    mapped = np.array([index.get(old[int(k)], -1) for k in sample.labels], np.int64)
    keep = mapped >= 0
    ignore = np.concatenate([sample.ignore, sample.boxes[~keep]]).reshape(-1, 4)
    return replace(sample, boxes=sample.boxes[keep], labels=mapped[keep], ignore=ignore)


def write_replay(path: Path, samples: list[Sample], names: list[str]) -> None:
    """The mixed-in chips as a COCO file of absolute image paths (ignore regions as crowds)."""
    from .chips import coco_annotation, write_json

    images, annotations = [], []
    for k, s in enumerate(samples, start=1):
        images.append({"id": k, "file_name": str(Path(s.image).resolve()), "width": s.width,
                       "height": s.height})
        for boxes, labels, crowd in ((s.boxes, s.labels, 0),
                                     (s.ignore, np.zeros(len(s.ignore), np.int64), 1)):
            for box, label in zip(boxes, labels):
                annotations.append(coco_annotation(len(annotations) + 1, k, int(label) + 1, box,
                                                   crowd))
    write_json(path, {"images": images, "annotations": annotations,
                      "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]})


def read_replay(out: Path) -> list[Sample]:
    """The chips a run mixed in (for --resume), or none."""
    path = out / REPLAY_FILE
    if not path.is_file():
        return []
    samples, _, _ = load_coco(path, "/")
    return samples
