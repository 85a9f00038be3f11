"""What a `detect` run is: its inputs, options, config and weights, as one key for --resume;
and COCO image ids matched to inputs by file name."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..core.config import Config
from ..core.errors import QueryDetError
from .journal import JOURNAL_VERSION
from .tiling import TILING_VERSION

if TYPE_CHECKING:
    from .options import DetectOptions


def run_key(inputs: list[str], options: "DetectOptions", cfg: Config, model: Any = None) -> str:
    """What a journal belongs to: inputs (and their size and mtime), options, config, weights.

    `--resume` refuses a journal whose key differs: other weights or a changed input would
    mix two runs' detections in one output."""
    data = json.dumps({"inputs": inputs, "identity": [input_identity(p) for p in inputs],
                       "options": asdict(options) | {"resume": None, "workers": None,
                                                    "threads": None, "readers": None},
                       "config": cfg.to_dict(), "weights": weights_digest(model),
                       "tiling": TILING_VERSION, "journal": JOURNAL_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def input_identity(path: Any) -> list[int] | None:
    """(size, mtime in ns) of an input file (a video frame's: its video's); None for what is
    not a local file."""
    try:
        st = os.stat(str(path).split("#frame=")[0])
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def weights_digest(model: Any) -> str:
    """The digest of the weights `model` runs (its `weights_digest`); "" without a model."""
    return "" if model is None else model.weights_digest()


def coco_image_ids(gt_path: str | Path, inputs: list[str]) -> tuple[int, ...]:
    """Each input's image id in a COCO ground-truth JSON, matched by file name."""
    try:
        data = json.loads(Path(gt_path).read_text())
        by_name = {Path(im["file_name"]).name: int(im["id"]) for im in data["images"]}
    except FileNotFoundError:
        raise QueryDetError(f"--coco-gt: file not found: {gt_path}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise QueryDetError(f"--coco-gt: {gt_path} is not a COCO JSON with images "
                            f"(id, file_name): {err}") from None
    missing = [p for p in inputs if Path(p).name not in by_name]
    if missing:
        raise QueryDetError(f"--coco-gt: {Path(missing[0]).name} is not an image of {gt_path} "
                            f"({len(missing)} inputs are not)")
    return tuple(by_name[Path(p).name] for p in inputs)
