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


def _rank_in_image(image: torch.Tensor) -> torch.Tensor:
    """For entries already ordered best first within each image, grouped by `image` after a
    stable sort: each entry's rank within its image (0 for the image's best)."""
    first = torch.searchsorted(image, image)  # index of each image's first entry
    return torch.arange(image.numel(), device=image.device) - first


def detections_from_levels_batched(
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
    """`detections_from_levels` for the whole batch at once, on the device: per level one sort
    picks every image's best candidates into fixed slots (no count leaves the device), one NMS
    runs over all images (classes and images apart), and the host learns the sizes once, at
    the end. The same detections, in the same order; for GPUs, where each host
    synchronisation of the per-image loop stalls the stream."""
    num_images, K = len(image_sizes), num_classes
    device = levels[0].cls.device if levels else torch.device("cpu")
    sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device)  # (N, 2) h, w
    parts = []
    for out in levels:
        if out.positions.numel() == 0:
            continue
        A = out.box.shape[1] // 4
        _, H, W = out.shape
        budget = level_budget(topk_per_level, out.shape)
        scores = torch.sigmoid(out.cls.reshape(-1))  # (Q*A*K,)
        image = (out.positions // (H * W)).repeat_interleave(A * K)  # (Q*A*K,)
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[torch.sort(image[order], stable=True).indices]  # by image, best first
        rank = _rank_in_image(image[order])
        keep = (rank < budget) & (scores[order] > score_threshold)
        # each image's kept candidates into its own `budget` slots; the rest into a spare one
        slot = torch.where(keep, image[order] * budget + rank, num_images * budget)
        chosen = torch.full((num_images * budget + 1,), -1, dtype=torch.int64, device=device)
        chosen[slot] = order
        chosen = chosen[:-1]  # (N*budget,) candidate indices, -1 where an image has fewer
        valid = chosen >= 0
        flat = chosen.clamp(min=0)
        row, anchor, label = flat // (A * K), (flat // K) % A, flat % K
        n, ys, xs = unravel(out.positions[row], out.shape)
        anchor_boxes = anchors.anchors_at(out.level, ys, xs)  # (m, A, 4)
        anchor_boxes = anchor_boxes[torch.arange(row.numel(), device=device), anchor]  # (m, 4)
        deltas = out.box.view(-1, A, 4)[row, anchor]  # (m, 4)
        boxes = box_coder.decode(deltas, anchor_boxes)  # (m, 4)
        h, w = sizes[n, 0], sizes[n, 1]  # (m,)
        boxes = torch.stack([boxes[:, 0].clamp(min=0).minimum(w), boxes[:, 1].clamp(min=0).minimum(h),
                             boxes[:, 2].clamp(min=0).minimum(w), boxes[:, 3].clamp(min=0).minimum(h)],
                            1)  # (m, 4) clipped to each image
        parts.append((boxes, scores[flat], label, torch.full_like(label, out.level), n, valid))
    if not parts:
        return [empty_detections(device) for _ in range(num_images)]
    boxes, scores, labels, lvls, image, valid = (torch.cat(t) for t in zip(*parts))
    # the order the per-image path concatenates in: image by image, each level's best first
    order = torch.sort(image, stable=True).indices
    live = order[valid[order]]  # one synchronisation: how many candidates there are
    boxes, scores, labels, lvls, image = (t[live] for t in (boxes, scores, labels, lvls, image))
    keep = batched_nms(boxes, scores, image * K + labels, nms_iou)  # best first, all images
    keep = keep[torch.sort(image[keep], stable=True).indices]  # by image, best first within
    budgets = torch.tensor([detection_budget(max_detections, s) for s in image_sizes],
                           device=device)
    keep = keep[_rank_in_image(image[keep]) < budgets[image[keep]]]
    counts = torch.bincount(image[keep], minlength=num_images).tolist()  # the sizes, once
    return [{"boxes": b, "scores": s, "labels": l, "levels": v} for b, s, l, v in zip(
        *(t[keep].split(counts) for t in (boxes, scores, labels, lvls)))]
