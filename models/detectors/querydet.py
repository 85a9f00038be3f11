"""QueryDet: RetinaNet with P2, a query head, loss re-balancing and Cascade Sparse Query.

Letters: N batch, C channels, A anchors per position, K classes, L levels, M detections.

The same class is the RetinaNet P3-P7 baseline when built with levels 3..7 and no query head.
"""

from __future__ import annotations

import torch

from ..layers.anchors import AnchorGenerator
from ..layers.backbones import Backbone, build_backbone
from ..layers.box_coder import BoxCoder
from ..config import InferenceConfig, ModelConfig
from .detector import FPNDetector, ModelInputError  # noqa: F401  (re-exported)
from ..layers.fpn import Pyramid
from .faster_rcnn import QueryFasterRCNN, build_roi_heads
from .fcos import QueryFCOS
from ..layers.heads import Branch, FCOSHead, QueryHead, RetinaHead, RPNHead, tower_branches
from ..layers.losses import anchor_targets, level_detection_loss
from ..layers.matcher import Matcher
from .postprocess import detections_from_levels, detections_from_levels_batched
from ..query.query_infer import LevelOutput


class QueryDet(FPNDetector):
    """Backbone + FPN + shared RetinaNet heads (+ query head) with dense or sparse inference.

    Args:
        backbone: returns c2..c5 feature maps; `out_channels` lists their widths.
        head: classification and box towers shared by all levels.
        query_head: query tower shared by the query levels, or None (the baseline).
        anchors: anchor generator for `levels`.
        levels: FPN levels with heads, (2..7) or (3..7).
        query_levels: levels whose query head is trained (Eq. 2-3).
        level_weights: beta_l of Eq. 5, one per level.
        inference: default inference settings; every call may override them.
    """

    def __init__(self, backbone: Backbone, head: RetinaHead, query_head: QueryHead | None,
                 anchors: AnchorGenerator, *, num_classes: int, levels: tuple[int, ...],
                 query_levels: tuple[int, ...], level_weights: tuple[float, ...],
                 fpn_channels: int = 256, matcher: Matcher | None = None,
                 box_coder: BoxCoder | None = None, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, box_loss: str = "smooth_l1",
                 smooth_l1_beta: float = 0.1, query_alpha: float = 0.25,
                 query_gamma: float = 1.3, query_loss_weight: float = 10.0,
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
        self.anchors = anchors
        self.matcher = matcher or Matcher()
        self.box_coder = box_coder or BoxCoder()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.query_alpha, self.query_gamma = query_alpha, query_gamma
        self.query_loss_weight = query_loss_weight

    def head_branches(self, with_query: bool) -> dict[str, Branch]:
        return tower_branches(self.head, self.query_head, with_query)

    def query_scale(self, level: int) -> float:
        return self.anchors.base_size(level)  # paper 3.2: the minimum anchor scale on P_l

    # -- training ---------------------------------------------------------------------------------
    def forward_training(self, images, targets: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """Eq. 5: sum over levels of beta_l * (focal cls + box + query loss)."""
        batch, _, targets, feats = self.prepare_training(images, targets)  # feats: every level dense
        K, A = self.num_classes, self.anchors.num_anchors
        logits, deltas, level_anchors = [], [], []
        for lvl in self.levels:
            x = feats[lvl]
            N, _, H, W = x.shape
            logits.append(self.head.cls(x).view(N, A, K, H, W).permute(0, 3, 4, 1, 2)
                          .reshape(N, -1, K))  # (N, HWA, K)
            deltas.append(self.head.box(x).view(N, A, 4, H, W).permute(0, 3, 4, 1, 2)
                          .reshape(N, -1, 4))  # (N, HWA, 4)
            level_anchors.append(self.anchors.grid_anchors(lvl, H, W, x.device))  # (HWA, 4)
        all_anchors = torch.cat(level_anchors)  # (R, 4)
        gt_classes, gt_boxes = anchor_targets(all_anchors, targets, self.matcher, K)
        num_fg = max(1.0, float(((gt_classes >= 0) & (gt_classes != K)).sum()))
        loss_cls = loss_box = batch.new_zeros(())
        start = 0
        for lvl, lg, dl, an in zip(self.levels, logits, deltas, level_anchors):
            end = start + an.shape[0]
            c, b = level_detection_loss(lg, dl, an, gt_classes[:, start:end], gt_boxes[:, start:end],
                                        self.box_coder, K, self.focal_alpha, self.focal_gamma,
                                        self.box_loss, self.smooth_l1_beta)
            beta = self.level_weights[lvl]  # Eq. 5
            loss_cls = loss_cls + beta * c / num_fg
            loss_box = loss_box + beta * b / num_fg
            start = end
        losses = {"loss_cls": loss_cls, "loss_box": loss_box}
        if self.query_head is not None:
            loss_q = self.query_losses({lvl: self.query_head(feats[lvl])[:, 0]  # (N, H, W)
                                        for lvl in self.query_levels}, targets,
                                       self.query_alpha, self.query_gamma, self.query_loss_weight)
            losses["loss_query"] = loss_q
        return losses

    # -- inference --------------------------------------------------------------------------------
    def detections(self, outputs: list[LevelOutput], image_sizes: list[tuple[int, int]],
                   features: Pyramid | None = None, score_threshold: float | None = None
                   ) -> list[dict[str, torch.Tensor]]:
        """Post-process level outputs into per-image detections (`features` is not needed)."""
        d = self.inference_for(score_threshold)
        # on a GPU the whole batch at once (no host synchronisation per level and image); on
        # the CPU image by image, where nothing waits on a stream and small sorts are cheaper
        post = detections_from_levels_batched if self.pixel_mean.device.type == "cuda" \
            else detections_from_levels
        return post(outputs, image_sizes, self.anchors, self.box_coder, self.num_classes,
                    d.score_threshold, d.topk_per_level, d.nms_iou, d.max_detections)


def build_querydet(cfg: ModelConfig, inference: InferenceConfig | None = None) -> FPNDetector:
    """Map config fields to constructor arguments of the chosen detector family. No registry."""
    if cfg.detector == "fcos":
        return build_fcos(cfg, inference)
    if cfg.detector == "faster_rcnn":
        return build_faster_rcnn(cfg, inference)
    levels = tuple(cfg.levels)
    anchors = AnchorGenerator(levels, cfg.anchor_scale, cfg.anchor_octave_scales, cfg.anchor_ratios)
    head = RetinaHead(cfg.fpn_channels, anchors.num_anchors, cfg.num_classes, cfg.head_convs,
                      cfg.prior_prob)
    query_head = (QueryHead(cfg.fpn_channels, cfg.head_convs, cfg.prior_prob)
                  if cfg.query_levels else None)
    return QueryDet(
        build_backbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_norm), head, query_head,
        anchors, num_classes=cfg.num_classes, levels=levels, query_levels=tuple(cfg.query_levels),
        level_weights=tuple(cfg.level_weights), fpn_channels=cfg.fpn_channels,
        matcher=Matcher(*cfg.iou_thresholds), focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma, box_loss=cfg.box_loss, smooth_l1_beta=cfg.smooth_l1_beta,
        query_alpha=cfg.query_alpha, query_gamma=cfg.query_gamma,
        query_loss_weight=cfg.query_loss_weight, pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std, size_divisibility=cfg.size_divisibility, inference=inference)


def build_fcos(cfg: ModelConfig, inference: InferenceConfig | None = None) -> QueryFCOS:
    """FCOS (P2-P7 QueryDet or the P3-P7 baseline) from its config."""
    head = FCOSHead(cfg.fpn_channels, cfg.num_classes, cfg.head_convs, cfg.prior_prob)
    query_head = (QueryHead(cfg.fpn_channels, cfg.head_convs, cfg.prior_prob)
                  if cfg.query_levels else None)
    return QueryFCOS(
        build_backbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_norm), head, query_head,
        num_classes=cfg.num_classes, levels=tuple(cfg.levels),
        query_levels=tuple(cfg.query_levels), level_weights=tuple(cfg.level_weights),
        fpn_channels=cfg.fpn_channels, size_scale=cfg.anchor_scale, focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma, query_alpha=cfg.query_alpha, query_gamma=cfg.query_gamma,
        query_loss_weight=cfg.query_loss_weight, pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std, size_divisibility=cfg.size_divisibility, inference=inference)


def build_faster_rcnn(cfg: ModelConfig, inference: InferenceConfig | None = None
                      ) -> QueryFasterRCNN:
    """Faster R-CNN with an RPN of `head_convs` trunk convs (+ query branch) from its config."""
    inference = inference or InferenceConfig()
    anchors = AnchorGenerator(tuple(cfg.levels), cfg.anchor_scale, cfg.anchor_octave_scales,
                              cfg.anchor_ratios)
    rpn = RPNHead(cfg.fpn_channels, anchors.num_anchors, cfg.head_convs,
                  with_query=bool(cfg.query_levels), prior_prob=cfg.prior_prob)
    roi_heads = build_roi_heads(cfg.fpn_channels, cfg.num_classes, cfg.roi_head_channels,
                                inference.score_threshold, inference.nms_iou,
                                inference.max_detections)
    return QueryFasterRCNN(
        build_backbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_norm), rpn, anchors,
        roi_heads, num_classes=cfg.num_classes, levels=tuple(cfg.levels),
        query_levels=tuple(cfg.query_levels), level_weights=tuple(cfg.level_weights),
        fpn_channels=cfg.fpn_channels, matcher=Matcher(*cfg.iou_thresholds),
        query_alpha=cfg.query_alpha, query_gamma=cfg.query_gamma,
        query_loss_weight=cfg.query_loss_weight, pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std, size_divisibility=cfg.size_divisibility, inference=inference)
