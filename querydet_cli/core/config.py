"""The full config of a run: model, inference and class names, loaded from one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from querydet_models.config import ConfigError, InferenceConfig, ModelConfig, from_dict, to_dict

from .errors import QueryDetError
from .resources import config_names, config_path


@dataclass(frozen=True)
class DataConfig:
    """Where training and evaluation images come from."""

    dataset: Literal["synthetic", "coco", "visdrone"] = "synthetic"
    # visdrone: folder with images/ and annotations/; coco: the image folder (default: images/
    # next to the JSON)
    train_root: str | None = None
    train_annotations: str | None = None  # COCO JSON
    val_root: str | None = None
    val_annotations: str | None = None
    synthetic_train_scenes: int = 64
    synthetic_val_scenes: int = 16
    synthetic_size: int = 384
    synthetic_seed: int = 0
    # ground sample distance of the training data, metres per pixel; `detect` reads rasters at
    # it. None: unknown (plain images, older checkpoints), inputs are read at their own pixels
    gsd: float | None = None

    def __post_init__(self) -> None:
        if self.gsd is not None and not 0 < self.gsd <= 10000:
            raise ConfigError(f"data.gsd: {self.gsd} is not allowed (allowed: metres per pixel, "
                              "> 0 and at most 10000, or null)")
        if self.synthetic_size < 64 or self.synthetic_size > 8192:
            raise ConfigError(f"data.synthetic_size: {self.synthetic_size} is not allowed "
                              "(allowed: 64..8192)")
        if self.synthetic_train_scenes < 1 or self.synthetic_val_scenes < 1:
            raise ConfigError("data.synthetic_train_scenes / synthetic_val_scenes: must be >= 1")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (augment.py); each part off at 0 or false."""

    dihedral: bool = True  # the eight 90-degree rotations and flips (nadir imagery has no up)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    gamma: float = 0.2  # gamma drawn from [1 - g, 1 + g]
    blur_prob: float = 0.1  # share of images blurred (Gaussian, sigma 0.1..1 px)
    noise_std: float = 0.02  # Gaussian noise on half the images, pixel values in [0, 1]
    grayscale_prob: float = 0.0  # share of images turned grey (colour is not what a class is)
    scale_jitter: float = 0.2  # scale drawn log-uniformly from [1/(1+j), 1+j]
    crop: int = 0  # random crop of this side in pixels after scaling; 0: none
    min_visible: float = 0.5  # a box cut by the crop below this share becomes an ignore region

    def __post_init__(self) -> None:
        checks = [(0 <= self.brightness <= 1, "brightness", "0..1"),
                  (0 <= self.contrast <= 1, "contrast", "0..1"),
                  (0 <= self.saturation <= 1, "saturation", "0..1"),
                  (0 <= self.hue <= 0.5, "hue", "0..0.5"),
                  (0 <= self.gamma < 1, "gamma", "0 up to 1"),
                  (0 <= self.blur_prob <= 1, "blur_prob", "0..1"),
                  (0 <= self.noise_std <= 0.5, "noise_std", "0..0.5"),
                  (0 <= self.grayscale_prob <= 1, "grayscale_prob", "0..1"),
                  (0 <= self.scale_jitter <= 3, "scale_jitter", "0..3"),
                  (self.crop == 0 or 32 <= self.crop <= 8192, "crop", "0 or 32..8192"),
                  (0 < self.min_visible <= 1, "min_visible", "(0, 1]")]
        for ok, key, allowed in checks:
            if not ok:
                raise ConfigError(f"train.augment.{key}: {getattr(self, key)!r} is not allowed "
                                  f"(allowed: {allowed})")


@dataclass(frozen=True)
class TrainConfig:
    """The schedule: SGD with linear warm-up and step decay (paper 4.1)."""

    batch_size: int = 8
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0001
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    max_iter: int = 50000
    steps: tuple[int, ...] = (30000, 40000)
    lr_gamma: float = 0.1
    short_sides: tuple[int, ...] = (800,)
    max_size: int = 1333
    test_short_side: int = 800
    hflip: bool = True
    clip_grad_norm: float = 35.0  # 0 disables clipping
    freeze_backbone: bool = False  # fine-tuning: train FPN and heads only
    amp: bool = True  # mixed precision, CUDA only
    checkpoint_period: int = 1000
    log_period: int = 20
    seed: int = 0
    workers: int = 2
    augment: AugmentConfig = AugmentConfig()
    # short_side: resize to train.short_sides (photographs); native: the chips' own pixel scale
    # (their GSD against the model's, when both are known), as aerial chips want
    resize: Literal["short_side", "native"] = "short_side"
    epochs: int = 0  # > 0: max_iter and steps from epochs over the training set (small sets)
    backbone_lr_factor: float = 1.0  # the backbone's learning rate, as a share of base_lr
    freeze_bn: bool = False  # batch-norm statistics and affine kept as loaded (fine-tuning)
    eval_period: int = 0  # iterations between validation AP runs (0: none)
    early_stop: int = 0  # stop after this many validations without a better one (0: never)
    best_metric: Literal["AP50", "AP"] = "AP50"  # what model_best.pt is the best of
    # earlier chips mixed in per new chip (the refine recipe): drawn from the --init checkpoint's
    # recorded training data where it is still there, so a second site does not erase the first
    replay: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, "train.epochs", ">= 0"),
            (0 <= self.backbone_lr_factor <= 10, "train.backbone_lr_factor", "0..10"),
            (self.eval_period >= 0, "train.eval_period", ">= 0"),
            (self.early_stop >= 0, "train.early_stop", ">= 0"),
            (0 <= self.replay <= 10, "train.replay", "0..10"),
            (self.batch_size >= 1, "train.batch_size", ">= 1"),
            (self.base_lr > 0, "train.base_lr", "> 0"),
            (self.max_iter >= 1, "train.max_iter", ">= 1"),
            (all(0 < s for s in self.steps) and list(self.steps) == sorted(self.steps),
             "train.steps", "increasing positive iterations"),
            (len(self.short_sides) >= 1 and all(32 <= s <= 8192 for s in self.short_sides),
             "train.short_sides", "one or more sizes in 32..8192"),
            (32 <= self.max_size <= 16384, "train.max_size", "32..16384"),
            (32 <= self.test_short_side <= 8192, "train.test_short_side", "32..8192"),
            (self.checkpoint_period >= 1, "train.checkpoint_period", ">= 1"),
            (self.log_period >= 1, "train.log_period", ">= 1"),
            (self.workers >= 0, "train.workers", ">= 0"),
            (self.clip_grad_norm >= 0, "train.clip_grad_norm", ">= 0"),
        ]
        for ok, key, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}: {getattr(self, key.split('.')[1])!r} is not allowed "
                                  f"(allowed: {allowed})")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; a checkpoint embeds it so `--weights x.pt` alone rebuilds the model."""

    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    class_names: tuple[str, ...] = ()
    # the dataset's own category ids (COCO `category_id`), one per class; () means 1..K
    class_ids: tuple[int, ...] = ()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.model.num_classes:
            raise ConfigError(f"class_names: {len(self.class_names)} names but model.num_classes "
                              f"is {self.model.num_classes}")
        if self.class_ids and (len(self.class_ids) != self.model.num_classes
                               or len(set(self.class_ids)) != len(self.class_ids)):
            raise ConfigError(f"class_ids: {len(self.class_ids)} distinct ids needed, one per "
                              f"class (model.num_classes is {self.model.num_classes})")

    def category_ids(self) -> list[int]:
        """The dataset's category id of each class (1..K when the config has none)."""
        return list(self.class_ids) or list(range(1, self.model.num_classes + 1))

    def names(self) -> list[str]:
        """Class names, or class_0.. when the config has none."""
        return list(self.class_names) or [f"class_{i}" for i in range(self.model.num_classes)]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def config_from_dict(data: Any) -> Config:
    try:
        return from_dict(Config, data)
    except ConfigError as err:
        raise QueryDetError(f"bad config: {err}") from None


def load_config(path: str | Path) -> Config:
    """Load a YAML config: a file path, or the name of a bundled config (`querydet configs`)."""
    path = Path(path)
    if not path.suffix and not path.exists():
        if str(path) not in config_names():
            raise QueryDetError(f"config not found: {path} is neither a file nor a bundled config "
                                "(`querydet configs` lists them)")
        path = config_path(str(path))
    if not path.is_file():
        raise QueryDetError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise QueryDetError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return from_dict(Config, data)
    except ConfigError as err:
        raise QueryDetError(f"bad config {path.name}: {err}") from None


def with_changes(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of `cfg` with fields of one section changed (None values ignored), validated."""
    changes = {k: v for k, v in changes.items() if v is not None}
    try:
        return replace(cfg, **{section: replace(getattr(cfg, section), **changes)})
    except ConfigError as err:
        raise QueryDetError(str(err)) from None


def with_inference(cfg: Config, **changes: Any) -> Config:
    """A copy of `cfg` with inference fields changed (None values ignored), validated."""
    changes = {k: v for k, v in changes.items() if v is not None}
    try:
        return replace(cfg, inference=replace(cfg.inference, **changes))
    except ConfigError as err:
        raise QueryDetError(str(err)) from None
