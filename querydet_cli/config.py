"""The full config of a run: model, inference and class names, loaded from one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from models.config import ConfigError, InferenceConfig, ModelConfig, from_dict, to_dict

from .errors import QueryDetError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Config:
    """Everything a checkpoint needs to be rebuilt and run."""

    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.model.num_classes:
            raise ConfigError(f"class_names: {len(self.class_names)} names but model.num_classes "
                              f"is {self.model.num_classes}")

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
    """Load a YAML config; a bare name such as `querydet_r50_visdrone` is looked up in configs/."""
    path = Path(path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{path}.yaml"
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


def with_inference(cfg: Config, **changes: Any) -> Config:
    """A copy of `cfg` with inference fields changed (None values ignored), validated."""
    changes = {k: v for k, v in changes.items() if v is not None}
    try:
        return replace(cfg, inference=replace(cfg.inference, **changes))
    except ConfigError as err:
        raise QueryDetError(str(err)) from None
