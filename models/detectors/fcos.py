"""FCOS (anchor-free, FCOS 2-3) on P2-P7 with a query head and Cascade Sparse Query (Table 8).

Letters: N batch, P points over all levels, K classes, G ground-truth boxes, Q positions.

Position (y, x) of P_l (stride s = 2**l) is the point ((x + .5) s, (y + .5) s), as for anchors. A
point is positive for the smallest box that contains it (within `center_radius` strides of the box
centre, FCOS's centre sampling) and whose largest distance max(l, t, r, b) lies in P_l's
regression range [scale 2**l, scale 2**(l + 1)] (open below on the first level, above on the
last). With scale 4 that is FCOS's 0-64-128-256-512-inf on P3-P7 and 0-32-64-... on P2-P7. The
query head's s_l is the minimum regression range on P_l (paper 3.2), 32 on P3 and 64 on P4, so
the query targets are those of the RetinaNet QueryDet.

The box branch predicts log((l, t, r, b) / s) (FCOS's exp parametrisation: every prediction is a
proper box, so the GIoU loss has a gradient from the first iteration, also when training from
scratch) and the centre-ness logit; a detection's score is sqrt(sigmoid(cls) * sigmoid(ctr)).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from .. import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ..layers.backbones import Backbone
from ..config import InferenceConfig
from .detector import FPNDetector
from ..layers.fpn import Pyramid
from ..layers.heads import Branch, FCOSHead, QueryHead, tower_branches
from .postprocess import (clip_boxes, image_bounds, level_budget, merge_with_nms,
                          top_candidates)
from ..query.query_infer import LevelOutput
from ..layers.sparse import unravel

_POINT_CHUNK = 8192  # points matched against all boxes at once while building targets
_MAX_LOG_DISTANCE = 10.0  # exp(10) strides: far beyond any image, and no overflow


def regression_ranges(levels: tuple[int, ...], scale: float) -> dict[int, tuple[float, float]]:
    """{level: (low, high)} of max(l, t, r, b) in pixels; open at both ends of the pyramid."""
    ranges = {}
    for lvl in levels:
        low = 0.0 if lvl == levels[0] else scale * 2.0 ** lvl
        high = math.inf if lvl == levels[-1] else scale * 2.0 ** (lvl + 1)
        ranges[lvl] = (low, high)
    return ranges


def level_points(level: int, height: int, width: int, device: torch.device | None = None
                 ) -> torch.Tensor:
    """Pixel coordinates (x, y) of every position of an (height, width) P_level, (HW, 2)."""
    stride = 2.0 ** level
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], dim=1)


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """FCOS Eq. 3: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for (P, 4) distances."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values.clamp(min=1e-6)) * \
        (tb.min(dim=1).values / tb.max(dim=1).values.clamp(min=1e-6))
    return ratio.clamp(min=0).sqrt()


def fcos_targets(points: torch.Tensor, strides: torch.Tensor, ranges: torch.Tensor,
                 target: dict[str, torch.Tensor], num_classes: int, center_radius: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class per point (P,) int64 (K = background, -1 = ignored) and (l, t, r, b) (P, 4) pixels.

    points (P, 2) x, y; strides (P,); ranges (P, 2) low, high of max(l, t, r, b).
    """
    P = points.shape[0]
    gt, labels = target["boxes"], target["labels"]
    classes = torch.full((P,), num_classes, dtype=torch.int64, device=points.device)
    ltrb_out = torch.zeros(P, 4, device=points.device)
    if gt.numel():
        area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])  # (G,)
        centre = (gt[:, :2] + gt[:, 2:]) / 2  # (G, 2)
        for start in range(0, P, _POINT_CHUNK):
            pt = points[start:start + _POINT_CHUNK]  # (p, 2)
            x, y = pt[:, 0:1], pt[:, 1:2]  # (p, 1)
            ltrb = torch.stack([x - gt[:, 0], y - gt[:, 1], gt[:, 2] - x, gt[:, 3] - y],
                               dim=2)  # (p, G, 4)
            inside = ltrb.min(dim=2).values > 0  # (p, G)
            if center_radius > 0:  # centre sampling: within radius * stride of the box centre
                r = strides[start:start + _POINT_CHUNK, None] * center_radius  # (p, 1)
                inside &= ((x - centre[:, 0]).abs() < r) & ((y - centre[:, 1]).abs() < r)
            reach = ltrb.max(dim=2).values  # (p, G)
            rng = ranges[start:start + _POINT_CHUNK]
            ok = inside & (reach >= rng[:, 0:1]) & (reach <= rng[:, 1:2])
            cand = torch.where(ok, area[None, :], torch.full_like(reach, math.inf))  # (p, G)
            best_area, best = cand.min(dim=1)  # smallest box wins (FCOS 3.2)
            positive = torch.isfinite(best_area)
            cls = labels[best]
            cls[~positive] = num_classes
            classes[start:start + _POINT_CHUNK] = cls
            ltrb_out[start:start + _POINT_CHUNK] = ltrb[torch.arange(pt.shape[0], device=pt.device),
                                                        best]  # (p, 4)
    if "ignore" in target and target["ignore"].numel():
        reg = target["ignore"]
        x, y = points[:, 0:1], points[:, 1:2]
        inside = ((x >= reg[:, 0]) & (x <= reg[:, 2]) & (y >= reg[:, 1]) & (y <= reg[:, 3]))
        classes[inside.any(dim=1) & (classes == num_classes)] = -1
    return classes, ltrb_out


def decode_distances(raw: torch.Tensor, stride: torch.Tensor | float) -> torch.Tensor:
    """(l, t, r, b) in pixels from the box branch's raw outputs (.., 4): exp(raw) * stride."""
    return torch.exp(raw.clamp(max=_MAX_LOG_DISTANCE)) * stride


def ltrb_to_boxes(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Boxes (P, 4) xyxy from points (P, 2) and distances (P, 4)."""
    return torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], dim=1)


class QueryFCOS(FPNDetector):
    """FCOS with P2 (or the P3-P7 baseline), a query head, Eq. 5 re-balancing and CSQ.

    Args:
        backbone: returns c2..c5 feature maps.
        head: FCOS classification and box (+ centre-ness) towers shared by all levels.
        query_head: query tower for the query levels, or None (the baseline).
        size_scale: regression ranges are [size_scale 2**l, size_scale 2**(l + 1)] on P_l.
        center_radius: centre sampling radius in strides (0 = the whole box).
    """

    def __init__(self, backbone: Backbone, head: FCOSHead, query_head: QueryHead | None, *,
                 num_classes: int, levels: tuple[int, ...], query_levels: tuple[int, ...],
                 level_weights: tuple[float, ...], fpn_channels: int = 256,
                 size_scale: float = 4.0, center_radius: float = 1.5,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 query_alpha: float = 0.25, query_gamma: float = 1.3,
                 query_loss_weight: float = 10.0,
                 pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 size_divisibility: int = 32, inference: InferenceConfig | None = None) -> None:
        super().__init__(backbone, num_classes=num_classes, levels=levels,
                         query_levels=query_levels if query_head is not None else (),
                         level_weights=level_weights, fpn_channels=fpn_channels,
                         pixel_mean=pixel_mean, pixel_std=pixel_std,
                         size_divisibility=size_divisibility, inference=inference)
        self.head = head
        self.query_head = query_head
        self.size_scale = size_scale
        self.ranges = regression_ranges(self.levels, size_scale)
        self.center_radius = center_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.query_alpha, self.query_gamma = query_alpha, query_gamma
        self.query_loss_weight = query_loss_weight

    def head_branches(self, with_query: bool) -> dict[str, Branch]:
        return tower_branches(self.head, self.query_head, with_query)

    def query_scale(self, level: int) -> float:
        return self.size_scale * 2.0 ** level  # paper 3.2: the minimum regression range on P_l

    # -- training ---------------------------------------------------------------------------------
    def forward_training(self, images, targets: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """Eq. 5 over levels: beta_l * (focal cls + centre-ness-weighted GIoU + centre-ness BCE),
        plus the query loss."""
        batch, _, targets, feats = self.prepare_training(images, targets)
        K = self.num_classes
        maps = self.dense_level_maps(feats, with_query=False)
        logits, boxes, points, strides, ranges, weights = [], [], [], [], [], []
        for lvl in self.levels:
            cls, box = maps[lvl]["cls"], maps[lvl]["box"]
            N, _, H, W = cls.shape
            logits.append(cls.permute(0, 2, 3, 1).reshape(N, H * W, K))  # (N, HW, K)
            boxes.append(box.permute(0, 2, 3, 1).reshape(N, H * W, 5))  # (N, HW, 5)
            points.append(level_points(lvl, H, W, batch.device))  # (HW, 2)
            strides.append(torch.full((H * W,), 2.0 ** lvl, device=batch.device))
            ranges.append(torch.tensor(self.ranges[lvl], device=batch.device).expand(H * W, 2))
            weights.append(torch.full((H * W,), self.level_weights[lvl], device=batch.device))
        logits, boxes = torch.cat(logits, dim=1), torch.cat(boxes, dim=1)  # (N, P, K), (N, P, 5)
        points, strides = torch.cat(points), torch.cat(strides)  # (P, 2), (P,)
        ranges, beta = torch.cat(ranges), torch.cat(weights)  # (P, 2), (P,) Eq. 5
        per_image = [fcos_targets(points, strides, ranges, t, K, self.center_radius)
                     for t in targets]
        classes = torch.stack([c for c, _ in per_image])  # (N, P)
        ltrb = torch.stack([r for _, r in per_image])  # (N, P, 4)
        valid = classes >= 0
        fg = valid & (classes != K)
        num_fg = max(1.0, float(fg.sum()))
        onehot = torch.zeros_like(logits)
        onehot[fg] = F.one_hot(classes[fg], K).to(logits.dtype)
        beta_n = beta.expand_as(classes)  # (N, P)
        loss_cls = (sigmoid_focal_loss(logits[valid], onehot[valid], self.focal_alpha,
                                       self.focal_gamma, reduction="none").sum(dim=1)
                    * beta_n[valid]).sum() / num_fg
        if fg.any():
            pts = points.expand(classes.shape[0], -1, -1)[fg]  # (F, 2)
            stride_fg = strides.expand_as(classes)[fg][:, None]  # (F, 1)
            pred = ltrb_to_boxes(pts, decode_distances(boxes[..., :4][fg], stride_fg))  # (F, 4)
            true = ltrb_to_boxes(pts, ltrb[fg])
            ctr = centerness_target(ltrb[fg])  # (F,)
            w = beta_n[fg]
            loss_box = (generalized_box_iou_loss(pred, true, reduction="none") * ctr * w).sum() \
                / ctr.sum().clamp(min=1e-6)
            loss_ctr = (F.binary_cross_entropy_with_logits(boxes[..., 4][fg], ctr, reduction="none")
                        * w).sum() / num_fg
        else:
            loss_box = loss_ctr = boxes.sum() * 0.0
        losses = {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}
        if self.query_head is not None:
            losses["loss_query"] = self.query_losses(
                {lvl: self.query_head(feats[lvl])[:, 0] for lvl in self.query_levels},  # (N, H, W)
                targets, self.query_alpha, self.query_gamma, self.query_loss_weight)
        return losses

    # -- inference --------------------------------------------------------------------------------
    def detections(self, outputs: list[LevelOutput], image_sizes: list[tuple[int, int]],
                   features: Pyramid | None = None, score_threshold: float | None = None
                   ) -> list[dict[str, torch.Tensor]]:
        """Per image: boxes (M, 4), scores sqrt(cls * centre-ness) (M,), labels (M,), levels (M,)."""
        d = self.inference_for(score_threshold)
        K = self.num_classes
        per_image: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in image_sizes]
        for out in outputs:
            stride = 2.0 ** out.level
            for i, (lo, hi) in enumerate(image_bounds(out, len(image_sizes))):
                if hi == lo:
                    continue
                ctr = torch.sigmoid(out.box[lo:hi, 4])  # (Q_i,)
                scores = torch.sqrt(torch.sigmoid(out.cls[lo:hi]) * ctr[:, None]).reshape(-1)
                keep = top_candidates(scores, d.score_threshold,
                                      level_budget(d.topk_per_level, out.shape))
                if keep.numel() == 0:
                    continue
                row, label = keep // K, keep % K
                _, ys, xs = unravel(out.positions[lo:hi][row], out.shape)
                pts = torch.stack([(xs.float() + 0.5) * stride, (ys.float() + 0.5) * stride], 1)
                boxes = ltrb_to_boxes(pts, decode_distances(out.box[lo:hi][row, :4], stride))
                per_image[i].append((clip_boxes(boxes, image_sizes[i]), scores[keep], label,
                                     torch.full_like(label, out.level)))
        device = outputs[0].cls.device if outputs else torch.device("cpu")
        return merge_with_nms(per_image, device, d.nms_iou, d.max_detections, image_sizes)


__all__ = ["QueryFCOS", "fcos_targets", "regression_ranges", "level_points", "centerness_target"]
