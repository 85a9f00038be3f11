"""The eight dihedral views of a nadir image (90-degree turns and a flip), boxes moved with the
pixels, and the vote that makes one answer of a tile seen in all eight (`detect --tta`).
Training's augmentation (training/augment.py) shows each image in one of the same views."""

from __future__ import annotations

import torch


def dihedral_boxes(boxes: torch.Tensor, k: int, flip: bool, height: int, width: int
                   ) -> torch.Tensor:
    """Boxes (N, 4) xyxy of a height x width image, in its view `dihedral(_, _, k, flip)`."""
    w = width
    for _ in range(k % 4):  # counter-clockwise: (x, y) -> (y, W - x)
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], 1)
        height, width = width, height
        w = width
    if flip:
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    return boxes.reshape(-1, 4)


def dihedral(image: torch.Tensor, boxes: torch.Tensor, k: int, flip: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) rotated by k * 90 degrees counter-clockwise, then flipped left-right if `flip`;
    boxes (N, 4) xyxy move with the pixels. The eight (k, flip) are the dihedral group."""
    view = torch.rot90(image, k % 4, dims=(-2, -1))
    if flip:
        view = view.flip(-1)
    return view, dihedral_boxes(boxes, k, flip, *image.shape[-2:])


def undo_dihedral(boxes: torch.Tensor, k: int, flip: bool, height: int, width: int
                  ) -> torch.Tensor:
    """Boxes found in `dihedral(image, _, k, flip)` of a height x width image, back in the
    image's own pixels (the inverse: flip first, then the remaining turns)."""
    vh, vw = (width, height) if k % 2 else (height, width)  # the view's size
    if flip:
        boxes = torch.stack([vw - boxes[:, 2], boxes[:, 1], vw - boxes[:, 0], boxes[:, 3]], 1)
    return dihedral_boxes(boxes, (4 - k % 4) % 4, False, vh, vw)


# the eight dihedral views (turns counter-clockwise, then a left-right flip); identity first
TTA_VIEWS = [(k, flip) for flip in (False, True) for k in range(4)]


def vote(views: list[dict[str, torch.Tensor]], iou: float = 0.5, min_score: float = 0.0
         ) -> dict[str, torch.Tensor]:
    """One answer from the detections of several views of one image (boxes already mapped
    back): views of one object (same class, IoU >= `iou` with the best-scoring one) become one
    box, their score-weighted mean, scoring the sum of each view's best score over the number
    of views, so an object seen in one view of eight scores an eighth; those below `min_score`
    are dropped."""
    from torchvision.ops import box_iou

    boxes = torch.cat([v["boxes"].float() for v in views])
    scores = torch.cat([v["scores"].float() for v in views])
    labels = torch.cat([v["labels"] for v in views])
    view = torch.cat([torch.full((len(v["scores"]),), i) for i, v in enumerate(views)])
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, scores, labels, view = boxes[order], scores[order], labels[order], view[order]
    free = torch.ones(len(scores), dtype=torch.bool)
    overlap = box_iou(boxes, boxes) if len(boxes) else boxes.new_zeros(0, 0)
    out_boxes, out_scores, out_labels = [], [], []
    for i in range(len(scores)):
        if not free[i]:
            continue
        members = free & (labels == labels[i]) & (overlap[i] >= iou)
        idx = torch.nonzero(members).flatten()
        best = {}  # one member per view: its best-scoring box
        for j in idx.tolist():
            best.setdefault(int(view[j]), j)
        chosen = torch.tensor(sorted(best.values()))
        weights = scores[chosen]
        free[idx] = False
        if weights.sum() / len(views) < min_score:
            continue
        out_boxes.append((boxes[chosen] * weights[:, None]).sum(0) / weights.sum())
        out_scores.append(weights.sum() / len(views))
        out_labels.append(labels[i])
    if not out_boxes:
        return {"boxes": boxes.new_zeros(0, 4), "scores": scores.new_zeros(0),
                "labels": labels.new_zeros(0)}
    return {"boxes": torch.stack(out_boxes), "scores": torch.stack(out_scores),
            "labels": torch.stack(out_labels)}
