"""QueryDet: RetinaNet with P2, a query head, loss re-balancing and Cascade Sparse Query.

Letters: N batch, C channels, A anchors per position, K classes, L levels, M detections.

The same class is the RetinaNet P3-P7 baseline when built with levels 3..7 and no query head.
"""

from __future__ import annotations

import torch
from torch import nn

from .anchors import AnchorGenerator
from .backbones import Backbone, build_backbone
from .box_coder import BoxCoder
from .config import InferenceConfig, ModelConfig
from .fpn import FPN, Pyramid
from .heads import QueryHead, RetinaHead
from .losses import anchor_targets, level_detection_loss, query_loss
from .matcher import Matcher
from .postprocess import detections_from_levels
from .query_infer import LevelOutput, QueryInference, QueryOptions
from .query_targets import query_target_map


class ModelInputError(ValueError):
    """Images or targets handed to the model are unusable (NaN/Inf, wrong shape, bad boxes)."""


class QueryDet(nn.Module):
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
        super().__init__()
        self.backbone = backbone
        first = levels[0] - 2  # c2 feeds P2, c3 feeds P3
        self.fpn = FPN(backbone.out_channels[first:], fpn_channels, levels[0])
        self.head = head
        self.query_head = query_head
        self.anchors = anchors
        self.num_classes = num_classes
        self.levels = tuple(levels)
        self.query_levels = tuple(query_levels) if query_head is not None else ()
        self.level_weights = dict(zip(self.levels, level_weights))
        self.matcher = matcher or Matcher()
        self.box_coder = box_coder or BoxCoder()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.query_alpha, self.query_gamma = query_alpha, query_gamma
        self.query_loss_weight = query_loss_weight
        self.size_divisibility = size_divisibility
        self.inference = inference or InferenceConfig()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)

    @property
    def fpn_channels(self) -> int:
        return self.head.cls.convs[0].in_channels

    @torch.no_grad()
    def randomize_heads(self, seed: int) -> None:
        """Random head weights whose outputs vary (He-normal weights, N(0, 0.1) biases).

        For benchmarks and accuracy checks without a checkpoint: RetinaNet's own init (std 0.01,
        bias -4.6) makes every logit nearly the same constant, so a sparse-vs-dense comparison
        on it would prove nothing.
        """
        gen = torch.Generator().manual_seed(seed)
        towers = [self.head.cls, self.head.box] + ([self.query_head] if self.query_head else [])
        for tower in towers:
            for conv in tower.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen)
                                  * (2.0 / fan_in) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)

    # -- shared steps -----------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor | list[torch.Tensor]
                   ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise images with values in [0, 1] and pad them into one batch.

        Returns the batch (N, 3, H', W'), H' and W' multiples of `size_divisibility`, and each
        image's (height, width) before padding.
        """
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ModelInputError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
            images = list(images)
        if not images:
            raise ModelInputError("no images given")
        sizes = []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ModelInputError(f"expected an image of shape (3, H, W), got {tuple(img.shape)}")
            if img.shape[1] < 1 or img.shape[2] < 1:
                raise ModelInputError(f"image is empty: shape {tuple(img.shape)}")
            if not img.is_floating_point():
                raise ModelInputError(f"expected float images in [0, 1], got dtype {img.dtype}")
            if not torch.isfinite(img).all():
                raise ModelInputError("image contains NaN or Inf values")
            sizes.append((int(img.shape[1]), int(img.shape[2])))
        d = self.size_divisibility
        height = -(-max(h for h, _ in sizes) // d) * d
        width = -(-max(w for _, w in sizes) // d) * d
        batch = self.pixel_mean.new_zeros(len(images), 3, height, width)
        for i, img in enumerate(images):
            h, w = sizes[i]
            batch[i, :, :h, :w] = (img.to(batch.device) - self.pixel_mean[0]) / self.pixel_std[0]
        return batch, sizes

    def extract_features(self, batch: torch.Tensor) -> Pyramid:
        """Backbone maps of a preprocessed batch, wrapped so FPN levels are computed on demand:
        densely for dense levels, only at the needed positions for CSQ's sparse levels."""
        return Pyramid(self.fpn, self.backbone(batch))

    # -- entry points -----------------------------------------------------------------------------
    def forward(self, images, targets=None, **kwargs):
        """Losses when training (targets required), detections otherwise."""
        if self.training:
            if targets is None:
                raise ModelInputError("training needs targets")
            return self.forward_training(images, targets)
        return self.forward_inference(images, **kwargs)

    def forward_training(self, images, targets: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """Eq. 5: sum over levels of beta_l * (focal cls + box + query loss)."""
        batch, _ = self.preprocess(images)
        targets = [self._check_target(t, batch.device) for t in targets]
        if len(targets) != batch.shape[0]:
            raise ModelInputError(f"{batch.shape[0]} images but {len(targets)} targets")
        feats = self.fpn(self.backbone(batch))  # {level: (N, C, H, W)}, every level dense
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
            has_objects = torch.tensor([t["boxes"].shape[0] > 0 for t in targets], device=batch.device)
            loss_q = batch.new_zeros(())
            for lvl in self.query_levels:
                x = feats[lvl]
                q = self.query_head(x)[:, 0]  # (N, H, W)
                s_l = self.anchors.base_size(lvl)
                tgt = torch.stack([query_target_map(t["boxes"], lvl, x.shape[2], x.shape[3], s_l)
                                   for t in targets])  # (N, H, W)
                loss_q = loss_q + self.level_weights[lvl] * self.query_loss_weight * query_loss(
                    q, tgt, has_objects, self.query_alpha, self.query_gamma)
            losses["loss_query"] = loss_q
        return losses

    @torch.no_grad()
    def forward_inference(self, images, *, mode: str | None = None, sigma: float | None = None,
                          start_level: int | None = None, context: str | None = None,
                          backend: str | None = None,
                          forced_queries: dict[int, torch.Tensor] | None = None,
                          sparse_max_fraction: float | None = None,
                          ) -> list[dict[str, torch.Tensor]]:
        """Detections per image: boxes (M, 4) xyxy pixels, scores (M,), labels (M,), levels (M,)."""
        batch, sizes = self.preprocess(images)
        outputs = self.predict_levels(self.extract_features(batch), mode=mode, sigma=sigma,
                                      start_level=start_level, context=context, backend=backend,
                                      forced_queries=forced_queries,
                                      sparse_max_fraction=sparse_max_fraction)
        return self.detections(outputs, sizes)

    @torch.no_grad()
    def predict_levels(self, features: Pyramid, *, mode: str | None = None,
                       sigma: float | None = None, start_level: int | None = None,
                       context: str | None = None, backend: str | None = None,
                       forced_queries: dict[int, torch.Tensor] | None = None,
                       sparse_max_fraction: float | None = None,
                       ) -> list[LevelOutput]:
        """Head outputs of every level under one inference mode (see `query_infer`)."""
        d = self.inference
        options = QueryOptions(
            mode=d.mode if mode is None else mode,
            sigma=d.sigma if sigma is None else sigma,
            start_level=d.start_level if start_level is None else start_level,
            context=d.context if context is None else context,
            backend=d.backend if backend is None else backend,
            sparse_max_fraction=(d.sparse_max_fraction if sparse_max_fraction is None
                                 else sparse_max_fraction),
        )
        if self.query_head is None and options.mode != "dense":
            options = QueryOptions(mode="dense")  # the baseline has nothing to query with
        return QueryInference(self.head, self.query_head, options, forced_queries)(features)

    def detections(self, outputs: list[LevelOutput], image_sizes: list[tuple[int, int]]
                   ) -> list[dict[str, torch.Tensor]]:
        """Post-process level outputs into per-image detections."""
        d = self.inference
        return detections_from_levels(outputs, image_sizes, self.anchors, self.box_coder,
                                      self.num_classes, d.score_threshold, d.topk_per_level,
                                      d.nms_iou, d.max_detections)

    def _check_target(self, target: dict[str, torch.Tensor], device: torch.device
                      ) -> dict[str, torch.Tensor]:
        boxes = target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        labels = target["labels"].to(device=device, dtype=torch.int64).reshape(-1)
        if boxes.shape[0] != labels.shape[0]:
            raise ModelInputError(f"{boxes.shape[0]} boxes but {labels.shape[0]} labels")
        if not torch.isfinite(boxes).all():
            raise ModelInputError("target boxes contain NaN or Inf")
        if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise ModelInputError("target boxes must have x2 > x1 and y2 > y1 (degenerate box)")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ModelInputError(f"target labels must be in 0..{self.num_classes - 1}")
        out = {"boxes": boxes, "labels": labels}
        if "ignore" in target:
            out["ignore"] = target["ignore"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        return out


def build_querydet(cfg: ModelConfig, inference: InferenceConfig | None = None) -> QueryDet:
    """Map config fields to constructor arguments. No registry."""
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
