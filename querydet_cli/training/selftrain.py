"""Self-training on unlabelled imagery of the next site (`train --pseudo-labels RASTER`).

Before a person looks, the model labels the new imagery itself: each round detects with
test-time augmentation (the eight dihedral views voted into one, so a box seen in one view scores
an eighth), keeps the confident boxes as labels and the uncertain band below them as ignore
regions (neither taught as objects nor as background). Confidence is relative: a model brought to
another site scores everything low and alike (the NEON model of one forest scores its best boxes
on the other 0.27, its fortieth 0.22), so a label is a box scoring at least `label_share` of the
best box of the imagery (and at least 0.1), an ignore region one from half of that up. Then it
cuts chips around the pseudo-labels (a chip without one is not cut: the objects a weak model
missed would be taught as background there, and measured, a round of mostly empty chips taught
the model to find nothing) and fine-tunes with the refine recipe, the first site's chips mixed
in. A round that finds no pseudo-label ends the rounds with the model as it was. The next round
labels with the model the last one made. With labelled data too (corrections),
a last refine run on them starts from the self-trained model.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.config import Config
from ..core.errors import QueryDetError
from .chips import cut_chips
from .datasets import Sample

CHIP, CHIP_OVERLAP = 128, 64  # the chips of the fine-tuning recipe (docs/training.md)
MIN_LABEL_SCORE = 0.1  # no pseudo-label below this, however low the best box scores
FLOOR = 0.05  # detections kept for labelling


@dataclass(frozen=True)
class PseudoLabelling:
    """How a round turns detections into labels: boxes scoring at least `label_share` of the
    best box (and at least MIN_LABEL_SCORE) are labels, those from half of that up are ignore
    regions, below that background."""

    rasters: tuple[str, ...]
    rounds: int = 2
    label_share: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.label_share <= 1:
            raise QueryDetError(f"--pseudo-share must be in (0, 1], got {self.label_share}")
        if not 1 <= self.rounds <= 20:
            raise QueryDetError(f"--pseudo-rounds must be 1..20, got {self.rounds}")


def pseudo_samples(model: Any, cfg: Config, rasters: tuple[str, ...], device: Any,
                   label_share: float) -> tuple[list[Sample], float]:
    """One Sample per raster, the model's boxes (TTA) scoring at least `label_share` of the best
    one as labels, from half of that up as ignore regions; and the label threshold used."""
    import rasterio

    from ..pipeline.detect import run_detect
    from ..pipeline.options import DetectOptions

    options = DetectOptions(tta=True, score_threshold=FLOOR)
    found = []
    for raster in rasters:
        records = []
        run_detect(model, cfg, [raster], records.extend, None, options, device)
        found.append(records)
    best = max((d.score for records in found for d in records), default=0.0)
    threshold = max(MIN_LABEL_SCORE, label_share * best)
    samples = []
    for k, (raster, records) in enumerate(zip(rasters, found), start=1):
        boxes = np.array([d.bbox for d in records], np.float32).reshape(-1, 4)
        scores = np.array([d.score for d in records], np.float32)
        labels = np.array([d.class_id for d in records], np.int64)
        sure, doubt = scores >= threshold, (scores >= threshold / 2) & (scores < threshold)
        with rasterio.open(raster) as src:
            width, height = src.width, src.height
        samples.append(Sample(Path(raster), boxes[sure], labels[sure], boxes[doubt], k, width,
                              height))
    return samples, threshold


def self_train(cfg: Config, init: str | Path, pseudo: PseudoLabelling, out: Path, device: str,
               load_model: Callable[[str, str], tuple[Any, Config]], train: Callable[..., dict],
               corrections: bool, schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rounds of pseudo-labelling and fine-tuning under out/self-training/round-N; the last
    model becomes out/model_final.pt, or, with `corrections` (cfg's own training data), the
    start of a last refine run on them into `out`. `load_model(weights, device)` and
    `train(cfg, out, device=, init=, earlier=)` are passed in (runtimes and training.train).
    `schedule`: train-config fields the rounds take instead of the refine recipe's (the
    command's --epochs, --max-iter, --seed, ...)."""
    from querydet_models.checkpoint import load_checkpoint

    from ..core.config import config_from_dict
    from .refine import refine_recipe

    earlier = config_from_dict(load_checkpoint(init)["config"])  # the first site's chips
    current, rounds = Path(init), []
    for r in range(1, pseudo.rounds + 1):
        folder = out / "self-training" / f"round-{r}"
        model, mcfg = load_model(str(current), device)
        samples, threshold = pseudo_samples(model, mcfg, pseudo.rasters, model_device(model),
                                            pseudo.label_share)
        del model
        found = sum(len(s.boxes) for s in samples)
        print(f"querydet: self-training round {r}/{pseudo.rounds}: {found} pseudo-labels "
              f"(score >= {threshold:.3f}), {sum(len(s.ignore) for s in samples)} uncertain "
              "boxes ignored", file=sys.stderr)
        if found == 0:  # nothing the model is sure of: learning from it would unlearn
            print(f"querydet: self-training stops at round {r}: no pseudo-label; the model "
                  "is kept as it was", file=sys.stderr)
            break
        if folder.exists():
            shutil.rmtree(folder)  # a round is redone whole
        chips = cut_chips(samples, list(mcfg.names()), folder / "chips", size=CHIP,
                          overlap=CHIP_OVERLAP, keep_empty=False)
        round_cfg = refine_recipe(_on_chips(mcfg, chips), validation=False)
        round_cfg = replace(round_cfg, train=replace(round_cfg.train, **(schedule or {})))
        summary = train(round_cfg, folder, device=device, init=current, earlier=earlier)
        current = folder / "model_final.pt"
        rounds.append({"round": r, "pseudo_labels": found, "threshold": round(threshold, 4),
                       "iterations": summary["iterations"]})
    if corrections:
        summary = train(cfg, out, device=device, init=current, earlier=earlier)
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".model_final.pt.tmp"
        shutil.copyfile(current, tmp)
        tmp.replace(out / "model_final.pt")
        summary = {"out_dir": str(out), "class_names": list(config_from_dict(
            load_checkpoint(current)["config"]).names())}
    return summary | {"self_training": rounds}


def _on_chips(cfg: Config, annotations: Path) -> Config:
    """`cfg` training on a chip folder's COCO file, without validation data."""
    data = replace(cfg.data, dataset="coco", train_annotations=str(annotations), train_root=None,
                   val_annotations=None, val_root=None)
    return replace(cfg, data=data)


def model_device(model: Any) -> Any:
    import torch

    return next(model.parameters()).device if isinstance(model, torch.nn.Module) \
        else torch.device("cpu")
