"""Importable functions behind the CLI commands: files and configs in, models and reports out."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import CheckpointError, load_checkpoint
from models.detector import FPNDetector as QueryDet
from models.querydet import build_querydet

from .config import Config, config_from_dict
from .errors import QueryDetError


def load_model(weights: str | Path, device: str = "cpu") -> tuple[QueryDet, Config]:
    """Rebuild a model from a checkpoint alone (its embedded config) and load its weights."""
    try:
        payload = load_checkpoint(weights)
    except CheckpointError as err:
        raise QueryDetError(str(err)) from None
    cfg = config_from_dict(payload["config"])
    model = build_querydet(cfg.model, cfg.inference)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise QueryDetError(f"checkpoint {weights} does not match its own config: "
                            f"{str(err).splitlines()[0]}") from None
    return model.to(torch.device(device)).eval(), cfg


def progress_bar(name: str, total_pixels: int):
    """A tqdm bar on stderr counting megapixels of one raster."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total_pixels, unit="px", unit_scale=True, desc=name, file=sys.stderr,
                leave=False, dynamic_ncols=True)
