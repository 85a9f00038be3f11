"""Training losses: focal classification, smooth-L1 / GIoU boxes, focal query loss (Eq. 4-5).

Letters: N batch, R anchors over all levels, K classes, G ground-truth boxes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from .. import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .box_coder import BoxCoder
from .matcher import BACKGROUND, IGNORE, Matcher


def anchor_targets(anchors: torch.Tensor, targets: list[dict[str, torch.Tensor]],
                   matcher: Matcher, num_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class per anchor (N, R) int64 (K = background, -1 = ignored) and matched boxes (N, R, 4)."""
    classes, boxes = [], []
    for target in targets:
        gt = target["boxes"]
        idx, labels = matcher(gt, anchors)
        if gt.numel() == 0:
            cls = torch.full_like(idx, num_classes)
            matched = torch.zeros_like(anchors)
        else:
            cls = target["labels"][idx].clone()
            matched = gt[idx]
            cls[labels == BACKGROUND] = num_classes
            cls[labels == IGNORE] = -1
        if "ignore" in target and target["ignore"].numel():
            # anchors centred in an ignored region (VisDrone category 0) count neither way
            centre = (anchors[:, :2] + anchors[:, 2:]) / 2
            reg = target["ignore"]
            inside = ((centre[:, None, 0] >= reg[None, :, 0]) & (centre[:, None, 0] <= reg[None, :, 2])
                      & (centre[:, None, 1] >= reg[None, :, 1]) & (centre[:, None, 1] <= reg[None, :, 3]))
            cls[inside.any(dim=1) & (cls == num_classes)] = -1
        classes.append(cls)
        boxes.append(matched)
    return torch.stack(classes), torch.stack(boxes)


def level_detection_loss(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                         gt_classes: torch.Tensor, gt_boxes: torch.Tensor, box_coder: BoxCoder,
                         num_classes: int, alpha: float, gamma: float, box_loss: str,
                         beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed focal and box losses of one level (not yet normalised).

    logits (N, R_l, K), deltas (N, R_l, 4), anchors (R_l, 4), gt_classes (N, R_l),
    gt_boxes (N, R_l, 4).
    """
    valid = gt_classes >= 0
    foreground = valid & (gt_classes != num_classes)
    onehot = torch.zeros_like(logits)
    onehot[foreground] = F.one_hot(gt_classes[foreground], num_classes).to(logits.dtype)
    cls_loss = sigmoid_focal_loss(logits[valid], onehot[valid], alpha=alpha, gamma=gamma,
                                  reduction="sum")
    if not foreground.any():
        return cls_loss, deltas.sum() * 0.0
    fg_anchors = anchors.expand(gt_classes.shape[0], -1, -1)[foreground]  # (F, 4)
    if box_loss == "giou":
        pred = box_coder.decode(deltas[foreground], fg_anchors)
        reg = generalized_box_iou_loss(pred, gt_boxes[foreground], reduction="sum")
    else:
        target = box_coder.encode(fg_anchors, gt_boxes[foreground])
        reg = F.smooth_l1_loss(deltas[foreground], target, beta=beta, reduction="sum")
    return cls_loss, reg


def query_loss(logits: torch.Tensor, targets: torch.Tensor, has_objects: torch.Tensor,
               alpha: float, gamma: float) -> torch.Tensor:
    """Mean focal loss of the query map over the images that have any ground truth.

    logits (N, H, W), targets (N, H, W), has_objects (N,) bool. Images without objects give no
    query loss, so a batch of empty images gives exactly 0.
    """
    if not has_objects.any():
        return logits.sum() * 0.0
    return sigmoid_focal_loss(logits[has_objects], targets[has_objects], alpha=alpha,
                              gamma=gamma, reduction="mean")
