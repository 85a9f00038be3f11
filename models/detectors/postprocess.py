"""From head outputs to detections: per-level top-k, score threshold, decode, class-aware NMS.

Letters: A anchors per position, K classes, Q positions, M detections.
"""

from __future__ import annotations

import torch
from .. import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
from torchvision.ops import batched_nms

from ..layers.anchors import AnchorGenerator
from ..layers.box_coder import BoxCoder
from ..query.query_infer import LevelOutput
from ..layers.sparse import unravel


def empty_detections(device: torch.device) -> dict[str, torch.Tensor]:
    """A detection dict with no rows (never a tuple of Nones)."""
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
        "levels": torch.zeros(0, dtype=torch.int64, device=device),
    }


def image_bounds(out: LevelOutput, num_images: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of each image's positions in a level output (positions are sorted)."""
    _, H, W = out.shape
    bounds = torch.searchsorted(
        out.positions, torch.arange(num_images + 1, device=out.positions.device) * H * W)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(num_images)]


# `topk_per_level` is the candidate budget of a level map of up to this many positions (P3 of a
# 1024 x 1024 image); a larger map gets a proportional budget. A fixed 1000 (RetinaNet's, set
# for P3-P7 of COCO-sized images) starves P2 of big tiles: on a 1024 px tile of a busy aerial
# scene P2 has 2353 candidates above a 0.3 score, mostly many anchors of a few strong objects,
# and keeping the best 1000 left 39 detections of the 105 found without a cap.
BUDGET_POSITIONS = 128 * 128


def level_budget(topk: int, shape: tuple[int, int, int]) -> int:
    """Candidates kept per image on a level map of `shape` (N, H, W)."""
    _, height, width = shape
    return max(topk, -(-topk * height * width // BUDGET_POSITIONS))


# `max_detections` is the budget of an image of up to this many pixels (a 1024 x 1024 tile, the
# default); a larger image gets a proportional one, as a larger level map gets more candidates.
# A fixed 300 cut a busy 1741 px tile's ~350 objects to the best 300 scores.
BUDGET_PIXELS = 1024 * 1024


def detection_budget(max_detections: int, size: tuple[int, int]) -> int:
    """Detections kept for an image of `size` (height, width) after NMS."""
    height, width = size
    return max(max_detections, -(-max_detections * height * width // BUDGET_PIXELS))


def top_candidates(scores: torch.Tensor, score_threshold: float, topk: int) -> torch.Tensor:
    """Indices of the flat `scores` above the threshold, at most the `topk` best."""
    keep = torch.nonzero(scores > score_threshold).squeeze(1)
    if keep.numel() > topk:
        keep = keep[scores[keep].topk(topk).indices]
    return keep


def merge_with_nms(per_image: list[list[tuple[torch.Tensor, ...]]], device: torch.device,
                   nms_iou: float, max_detections: int, image_sizes: list[tuple[int, int]]
                   ) -> list[dict[str, torch.Tensor]]:
    """Per image: concatenate (boxes, scores, labels, levels) parts, class-aware NMS, keep the
    best (`detection_budget` of the image's size)."""
    results = []
    for parts, size in zip(per_image, image_sizes):
        if not parts:
            results.append(empty_detections(device))
            continue
        boxes, scores, labels, lvls = (torch.cat(t) for t in zip(*parts))
        keep = batched_nms(boxes, scores, labels, nms_iou)[:detection_budget(max_detections, size)]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                        "levels": lvls[keep]})
    return results


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes (M, 4) clipped in place to an image of (height, width)."""
    h, w = size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes


def detections_from_levels(
    levels: list[LevelOutput],
    image_sizes: list[tuple[int, int]],
    anchors: AnchorGenerator,
    box_coder: BoxCoder,
    num_classes: int,
    score_threshold: float = 0.05,
    topk_per_level: int = 1000,
    nms_iou: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """RetinaNet: one dict per image: boxes (M, 4) xyxy pixels, scores (M,), labels (M,), levels (M,)."""
    num_images = len(image_sizes)
    per_image: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(num_images)]
    K = num_classes
    for out in levels:
        A = out.box.shape[1] // 4
        for i, (lo, hi) in enumerate(image_bounds(out, num_images)):
            if hi == lo:
                continue
            scores = torch.sigmoid(out.cls[lo:hi].reshape(-1))  # (Q_i*A*K,)
            keep = top_candidates(scores, score_threshold, level_budget(topk_per_level, out.shape))
            if keep.numel() == 0:
                continue
            row = keep // (A * K)
            anchor = (keep // K) % A
            label = keep % K
            _, ys, xs = unravel(out.positions[lo:hi][row], out.shape)
            anchor_boxes = anchors.anchors_at(out.level, ys, xs)  # (m, A, 4)
            anchor_boxes = anchor_boxes[torch.arange(row.numel(), device=row.device), anchor]  # (m, 4)
            deltas = out.box[lo:hi].view(-1, A, 4)[row, anchor]  # (m, 4)
            boxes = clip_boxes(box_coder.decode(deltas, anchor_boxes), image_sizes[i])
            lvl = torch.full_like(label, out.level)
            per_image[i].append((boxes, scores[keep], label, lvl))
    device = levels[0].cls.device if levels else torch.device("cpu")
    return merge_with_nms(per_image, device, nms_iou, max_detections, image_sizes)
