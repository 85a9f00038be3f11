"""Importable functions behind the CLI commands: files and configs in, models and reports out."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from querydet_models.checkpoint import CheckpointError, load_checkpoint
from querydet_models.detector import FPNDetector as QueryDet
from querydet_models.querydet import build_querydet

from .config import Config, config_from_dict
from .errors import QueryDetError

log = logging.getLogger("querydet")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda` without a GPU is a user error."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise QueryDetError(f"--device: {name!r} is not one of auto, cpu, cuda (or cuda:N)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QueryDetError(f"--device {name}: no CUDA device is available here "
                                "(use --device cpu, or auto)")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise QueryDetError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                "device(s) here")
    log.info("device: %s", name)
    return torch.device(name)


def load_model(weights: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[QueryDet, Config]:
    """Rebuild a model from a checkpoint alone (its embedded config) and load its weights."""
    try:
        payload = load_checkpoint(weights)
    except CheckpointError as err:
        raise QueryDetError(str(err)) from None
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("model"), dict):
        raise QueryDetError(f"checkpoint {weights} has no config or no weights: not written by "
                            "querydet train (or damaged)")
    cfg = config_from_dict(payload["config"])
    # every weight is in the checkpoint: the backbone's start weights are not read again
    model = build_querydet(replace(cfg.model, backbone_weights=None), cfg.inference)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise QueryDetError(f"checkpoint {weights} does not match its own config: "
                            f"{str(err).splitlines()[0]}") from None
    model = model.to(resolve_device(device))
    model.prepare_inference(cfg.inference.precision)  # frozen BN folded; eval mode
    return model, cfg


def progress_bar(name: str, total_tiles: int):
    """A tqdm bar on stderr counting the tiles of one raster (each advances it by one)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total_tiles, unit="tile", desc=name, file=sys.stderr, leave=False,
                dynamic_ncols=True)
