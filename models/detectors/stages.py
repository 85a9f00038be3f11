"""One inference pass, stage by stage: the same four public stages for a PyTorch model
(`FPNDetector`) and its exported graphs (`graph_infer.GraphDetector`), with a hook a caller
times them by, and what the caller may keep besides the detections.

Stages, in order: preprocess (normalise and pad into one batch; the valid masks padded alike),
backbone, coarse_heads (FPN, dense levels, query heads and the sparse levels they lead to:
`predict_levels`), postprocess (boxes per image).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

STAGES = ("preprocess", "backbone", "coarse_heads", "postprocess")


@dataclass
class InferencePass:
    """What one pass leaves: detections per image (tile pixels), each level's output (CSQ's
    decisions and timings, the query maps), the padded batch's (H, W) and each image's size."""

    detections: list[dict[str, torch.Tensor]]
    levels: list[Any]  # LevelOutput per FPN level
    batch_shape: tuple[int, int] | None  # None when the model batches into no tensor
    sizes: list[tuple[int, int]]


def run_stages(model: Any, images, *, masks: list[torch.Tensor] | None = None,
               score_threshold: float | None = None,
               stage: Callable[[str], ContextManager] | None = None, **mode) -> InferencePass:
    """The model's stages on a list of (3, h, w) images, in the caller's `compute` context.

    `masks`: each image's valid pixels (h, w) bool: queries fire only where there is data.
    `score_threshold`: this call's, instead of the model's. `stage(name)`: entered around each
    stage (a timer); `mode`: the keyword arguments of `predict_levels`."""
    stage = stage or (lambda name: nullcontext())
    with stage("preprocess"):
        batch, sizes = model.preprocess(images)
        valid = batch_mask(masks, sizes, batch)
    with stage("backbone"):
        features = model.extract_features(batch)
    with stage("coarse_heads"):
        levels = model.predict_levels(features, **mode, valid=valid)
    with stage("postprocess"):
        dets = model.detections(levels, sizes, features, score_threshold=score_threshold)
    shape = tuple(batch.shape[-2:]) if isinstance(batch, torch.Tensor) else None
    return InferencePass(dets, levels, shape, sizes)


def batch_mask(masks: list[torch.Tensor] | None, sizes, tensor: torch.Tensor
               ) -> torch.Tensor | None:
    """(N, H, W) bool over the padded batch: each image's valid pixels, padding invalid. None
    (no masking) without masks, or when preprocessing resized an image."""
    if masks is None or not isinstance(tensor, torch.Tensor) or \
            any(tuple(m.shape) != tuple(s) for m, s in zip(masks, sizes)):
        return None
    if all(bool(m.all()) for m in masks):
        return None  # nothing to mask: the outputs are those of a run without masks
    n, _, h, w = tensor.shape
    valid = torch.zeros(n, h, w, dtype=torch.bool, device=tensor.device)
    for i, m in enumerate(masks):
        if bool(m.all()):  # an image full of data is queried as without a mask, padding too
            valid[i] = True
        else:
            valid[i, :m.shape[0], :m.shape[1]] = m.to(tensor.device)
    return valid
