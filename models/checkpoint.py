"""Checkpoints: weights plus the config and class names they were trained with.

`--weights x.pt` alone is enough to rebuild the model. Writes are atomic.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError

FORMAT = "querydet-checkpoint-v1"


class CheckpointError(ModelError):
    """A checkpoint file is missing, unreadable or not a querydet checkpoint."""


def save_checkpoint(path: str | Path, model: nn.Module, config: dict[str, Any],
                    class_names: list[str], extra: dict[str, Any] | None = None) -> None:
    """Write {format, config, class_names, model, extra} to `path` via a temporary file."""
    path = Path(path)
    payload = {"format": FORMAT, "config": config, "class_names": list(class_names),
               "model": model.state_dict(), "extra": extra or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (weights on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in first.lower() or "weights_only" in first.lower():
            # torch's text goes on to advise weights_only=False: never pass that on
            first = "it holds Python objects other than tensors and plain data"
        raise CheckpointError(f"cannot read checkpoint {path}: {first} (not a querydet "
                              "checkpoint?)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a querydet checkpoint")
    return payload


def save_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file in the same folder, then rename."""
    import json

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_matching_weights(model: nn.Module, state: dict[str, torch.Tensor],
                          skip: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Copy `state` into `model` by name and shape, except the keys in `skip`.

    Returns (copied keys, model keys left as initialised). Used to start training from another
    checkpoint (`querydet train --init`).
    """
    own = model.state_dict()
    copied, kept = [], []
    with torch.no_grad():
        for key, value in own.items():
            other = state.get(key)
            if key not in skip and other is not None and other.shape == value.shape:
                value.copy_(other)
                copied.append(key)
            else:
                kept.append(key)
    return copied, kept
