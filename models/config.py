"""Model and inference settings as frozen dataclasses, and a strict loader for them.

A config is a plain nested dict (from YAML or from a checkpoint). `from_dict` builds the
dataclass, rejecting unknown keys and values outside their allowed set with a message that
names the key. There is no inheritance, no cross-reference and no `eval`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .backbone_specs import BACKBONES
from .errors import ModelError

CONTEXTS = ("exact", "1x1", "3x3", "5x5", "7x7", "9x9", "11x11")


class ConfigError(ModelError):
    """A config key is unknown, missing or holds a value outside its allowed set."""


@dataclass(frozen=True)
class ModelConfig:
    """What the network is: every field maps to one constructor argument in `build_querydet`."""

    # retinanet (anchor-based, the paper's main model), fcos (anchor-free) or faster_rcnn (two
    # stages; the query branch sits on the RPN), paper 4.4
    detector: Literal["retinanet", "fcos", "faster_rcnn"] = "retinanet"
    backbone: str = "resnet50"
    # Local torchvision state_dict for the backbone; None = random initialisation (no downloads).
    backbone_weights: str | None = None
    backbone_norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    num_classes: int = 10
    # FPN levels with detection heads: [2..7] for QueryDet, [3..7] for the RetinaNet / FCOS
    # baselines; faster_rcnn: the RPN's levels, [2..6].
    levels: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    fpn_channels: int = 256
    head_convs: int = 4
    # Anchor base size on P_l is anchor_scale * 2**l (16 on P2 ... 512 on P7). fcos: P_l
    # regresses max(l, t, r, b) in [anchor_scale * 2**l, anchor_scale * 2**(l + 1)].
    anchor_scale: float = 4.0
    anchor_octave_scales: int = 3
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # anchor matching (faster_rcnn: the RPN's, 0.3 / 0.7); unused by fcos
    iou_thresholds: tuple[float, float] = (0.4, 0.5)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: Literal["smooth_l1", "giou"] = "smooth_l1"
    smooth_l1_beta: float = 0.1
    # Eq. 5 beta_l, one per entry of `levels` (paper: 1 -> 3 linearly on COCO, 1 -> 2.6 on VisDrone).
    level_weights: tuple[float, ...] = (1.0, 1.4, 1.8, 2.2, 2.6, 3.0)
    # Levels whose query head is trained (Eq. 2-3); empty = no query head (the baseline).
    query_levels: tuple[int, ...] = (3, 4)
    query_gamma: float = 1.3
    query_alpha: float = 0.25
    query_loss_weight: float = 10.0
    prior_prob: float = 0.01
    # faster_rcnn: width of the second stage's two-layer MLP box head
    roi_head_channels: int = 1024
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisibility: int = 32

    def __post_init__(self) -> None:
        _check(self.backbone in BACKBONES, "model.backbone", self.backbone, BACKBONES)
        _check(self.num_classes >= 1, "model.num_classes", self.num_classes, "an integer >= 1")
        levels = tuple(self.levels)
        if self.detector == "faster_rcnn":
            _check(levels == (2, 3, 4, 5, 6), "model.levels", list(levels),
                   "[2, 3, 4, 5, 6] for faster_rcnn (the RPN's levels)")
        else:
            _check(
                levels in ((2, 3, 4, 5, 6, 7), (3, 4, 5, 6, 7)),
                "model.levels", list(levels), "[2, 3, 4, 5, 6, 7] or [3, 4, 5, 6, 7]",
            )
        _check(self.roi_head_channels >= 8, "model.roi_head_channels", self.roi_head_channels,
               "an integer >= 8")
        _check(len(self.level_weights) == len(levels), "model.level_weights",
               list(self.level_weights), f"{len(levels)} numbers, one per level")
        _check(all(w >= 0 and math.isfinite(w) for w in self.level_weights),
               "model.level_weights", list(self.level_weights), "finite numbers >= 0")
        _check(all(q in levels and q > levels[0] for q in self.query_levels),
               "model.query_levels", list(self.query_levels),
               f"levels from {list(levels[1:])} (a query level needs a finer level below it)")
        _check(1 <= self.head_convs <= 8, "model.head_convs", self.head_convs, "1..8")
        _check(self.fpn_channels >= 8, "model.fpn_channels", self.fpn_channels, "an integer >= 8")
        lo, hi = self.iou_thresholds
        _check(0 < lo <= hi < 1, "model.iou_thresholds", [lo, hi], "0 < low <= high < 1")
        _check(0 < self.prior_prob < 1, "model.prior_prob", self.prior_prob, "0 < p < 1")
        _check(self.anchor_octave_scales >= 1, "model.anchor_octave_scales",
               self.anchor_octave_scales, "an integer >= 1")
        _check(len(self.anchor_ratios) >= 1 and all(r > 0 for r in self.anchor_ratios),
               "model.anchor_ratios", list(self.anchor_ratios), "positive numbers")
        _check(self.size_divisibility in (1, 8, 16, 32, 64, 128), "model.size_divisibility",
               self.size_divisibility, "1, 8, 16, 32, 64 or 128")

    @property
    def num_anchors(self) -> int:
        return self.anchor_octave_scales * len(self.anchor_ratios)


@dataclass(frozen=True)
class InferenceConfig:
    """How to run a trained network: chosen per call, the weights stay the same."""

    mode: Literal["dense", "csq", "cq", "ccq"] = "csq"
    sigma: float = 0.15
    start_level: int = 4
    context: str = "exact"
    backend: Literal["auto", "torch", "spconv", "blocks", "triton"] = "auto"
    # exact CSQ runs a level densely when its sparse plan would cost more than this fraction of
    # the dense heads (1.0: always sparse)
    sparse_max_fraction: float = 0.3
    score_threshold: float = 0.05
    # candidates per level and image before NMS, for maps up to 128 x 128 positions; larger maps
    # (P2 of a big tile) get a proportional budget (`postprocess.level_budget`)
    topk_per_level: int = 1000
    nms_iou: float = 0.5
    max_detections: int = 100
    # auto: bf16 on CPUs with native bf16 and on CUDA devices that support it, fp16 on other
    # CUDA devices, fp32 otherwise (`precision.resolve_precision`); training keeps train.amp
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        _check(0 <= self.sigma <= 1, "inference.sigma", self.sigma, "0 <= sigma <= 1")
        _check(3 <= self.start_level <= 7, "inference.start_level", self.start_level, "3..7")
        _check(self.context in CONTEXTS, "inference.context", self.context, CONTEXTS)
        _check(0 < self.sparse_max_fraction <= 1, "inference.sparse_max_fraction",
               self.sparse_max_fraction, "0 < f <= 1")
        _check(0 <= self.score_threshold < 1, "inference.score_threshold",
               self.score_threshold, "0 <= t < 1")
        _check(self.topk_per_level >= 1, "inference.topk_per_level", self.topk_per_level, ">= 1")
        _check(0 < self.nms_iou <= 1, "inference.nms_iou", self.nms_iou, "0 < iou <= 1")
        _check(self.max_detections >= 1, "inference.max_detections", self.max_detections, ">= 1")


def _check(ok: bool, key: str, value: Any, allowed: Any) -> None:
    if not ok:
        if isinstance(allowed, tuple):
            allowed = ", ".join(map(str, allowed))
        raise ConfigError(f"{key}: {value!r} is not allowed (allowed: {allowed})")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types.

    Missing keys take the dataclass default. Lists become tuples for tuple fields.
    """
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a nested dataclass given a scalar
        raise ConfigError(f"{where}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list form of a config dataclass (for YAML and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed (allowed: "
                              f"{', '.join(map(str, allowed))})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    return value


__all__ = ["ModelConfig", "InferenceConfig", "ConfigError", "from_dict", "to_dict"]
