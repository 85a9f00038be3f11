"""Faster R-CNN with FPN whose RPN carries a query branch, so CSQ speeds up the RPN (Table 9).

Letters: N batch, C channels, A anchors per position, K classes, R RoIs, Q positions.

Paper 4.4: the RPN runs on P2-P6 with a trunk of 3 convolutions (instead of 1) followed by three
branches: objectness, box regression and the query logit (focal loss, gamma 1.2, alpha 0.25).
At inference CSQ starts on P4: the query branch's positions above sigma pick the P3 positions,
and P3's the P2 ones, where the RPN trunk runs sparsely. Fewer positions give fewer proposals,
so CSQ also shrinks the second stage's work.

The second stage is torchvision's: MultiScaleRoIAlign over P2-P5, TwoMLPHead and
FastRCNNPredictor inside `RoIHeads` (sampling, losses, per-class NMS). RoIAlign needs maps; on
a level that CSQ did not compute densely, the map holds the exact FPN values at the positions
the RoIs mapped to that level can read (`roi_support`) and zeros elsewhere, so the pooled
features equal those of the dense FPN without computing it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.nn import functional as F
from .. import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, batched_nms, remove_small_boxes
from torchvision.ops.poolers import LevelMapper

from ..layers.anchors import AnchorGenerator
from ..layers.backbones import Backbone
from ..layers.box_coder import BoxCoder
from ..config import InferenceConfig
from .detector import FPNDetector
from ..layers.fpn import Pyramid
from ..layers.heads import Branch, RPNHead
from ..layers.losses import anchor_targets
from ..layers.matcher import Matcher
from .postprocess import clip_boxes, detection_budget, image_bounds
from ..query.query_infer import LevelOutput, rows_of_map
from ..layers.sparse import ravel, unravel

ROI_LEVELS = (2, 3, 4, 5)  # RoIAlign levels (FPN paper Eq. 1 with k0 = 4, canonical 224)


def roi_support(rois: list[torch.Tensor], mapper: LevelMapper, level: int,
                shape: tuple[int, int, int], chunk: int = 256) -> torch.Tensor:
    """Sorted positions of P_level that RoIAlign reads for the RoIs `mapper` sends to `level`.

    rois: per image (R_i, 4) xyxy pixels. RoIAlign (aligned=False) samples inside
    [x1 s, x1 s + max(w s, 1)] and interpolates from the two neighbouring cells, so the cells
    floor(x1 s) - 1 .. ceil(x1 s + max(w s, 1)) + 1 (clipped) cover it, likewise in y.
    """
    N, H, W = shape
    device = rois[0].device if rois else torch.device("cpu")
    if not rois or sum(r.shape[0] for r in rois) == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    boxes = torch.cat(rois)  # (R, 4)
    image = torch.cat([torch.full((r.shape[0],), i, device=device) for i, r in enumerate(rois)])
    on_level = mapper(rois) + ROI_LEVELS[0] == level  # (R,)
    boxes, image = boxes[on_level], image[on_level]
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    s = 2.0 ** -level
    x0 = torch.floor(boxes[:, 0] * s).long() - 1
    y0 = torch.floor(boxes[:, 1] * s).long() - 1
    x1 = torch.ceil(boxes[:, 0] * s + ((boxes[:, 2] - boxes[:, 0]) * s).clamp(min=1)).long() + 1
    y1 = torch.ceil(boxes[:, 1] * s + ((boxes[:, 3] - boxes[:, 1]) * s).clamp(min=1)).long() + 1
    x0, y0 = x0.clamp(0, W - 1), y0.clamp(0, H - 1)
    x1, y1 = x1.clamp(0, W - 1), y1.clamp(0, H - 1)
    found = []
    for start in range(0, boxes.shape[0], chunk):
        sl = slice(start, start + chunk)
        span_y = int((y1[sl] - y0[sl]).max()) + 1
        span_x = int((x1[sl] - x0[sl]).max()) + 1
        ys = y0[sl, None, None] + torch.arange(span_y, device=device)[None, :, None]  # (r, Y, 1)
        xs = x0[sl, None, None] + torch.arange(span_x, device=device)[None, None, :]  # (r, 1, X)
        ok = (ys <= y1[sl, None, None]) & (xs <= x1[sl, None, None])  # (r, Y, X)
        lin = ravel(image[sl, None, None], ys, xs, shape)  # (r, Y, X)
        found.append(torch.unique(lin[ok]))
    return torch.unique(torch.cat(found))


class QueryFasterRCNN(FPNDetector):
    """Faster R-CNN + FPN (P2-P6 RPN) with the paper's 3-conv RPN, its query branch and CSQ.

    Args:
        backbone: returns c2..c5 feature maps.
        rpn: the RPN head (trunk + objectness / deltas / query 1x1 branches).
        anchors: RPN anchors on `levels` (the smallest size on P_l is also the query's s_l).
        roi_heads: torchvision's second stage over P2-P5.
        matcher: RPN anchor labelling (Faster R-CNN: 0.3 / 0.7 with low-quality matches).
        rpn_batch, rpn_positive_fraction: anchors sampled per image for the RPN loss.
        rpn_pre_nms_topk, rpn_post_nms_topk: (training, inference) proposal counts.
    """

    def __init__(self, backbone: Backbone, rpn: RPNHead, anchors: AnchorGenerator,
                 roi_heads: RoIHeads, *, num_classes: int, levels: tuple[int, ...],
                 query_levels: tuple[int, ...], level_weights: tuple[float, ...],
                 fpn_channels: int = 256, matcher: Matcher | None = None,
                 box_coder: BoxCoder | None = None, rpn_batch: int = 256,
                 rpn_positive_fraction: float = 0.5, rpn_nms_iou: float = 0.7,
                 rpn_pre_nms_topk: tuple[int, int] = (2000, 1000),
                 rpn_post_nms_topk: tuple[int, int] = (2000, 1000),
                 query_alpha: float = 0.25, query_gamma: float = 1.2,
                 query_loss_weight: float = 1.0,
                 pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 size_divisibility: int = 32, inference: InferenceConfig | None = None) -> None:
        super().__init__(backbone, num_classes=num_classes, levels=levels,
                         query_levels=query_levels if rpn.query is not None else (),
                         level_weights=level_weights, fpn_channels=fpn_channels,
                         pixel_mean=pixel_mean, pixel_std=pixel_std,
                         size_divisibility=size_divisibility, inference=inference)
        self.rpn = rpn
        self.anchors = anchors
        self.roi_heads = roi_heads
        # under bf16/fp16 autocast the predictor's linear layers return reduced precision, and
        # torchvision decodes boxes in the dtype of the deltas: cast them to float32 first, so
        # box coordinates keep float32 resolution (an 8-bit mantissa is 4 px at x = 1000)
        self.roi_heads.box_predictor.register_forward_hook(_outputs_to_float32)
        self.matcher = matcher or Matcher(0.3, 0.7)
        self.box_coder = box_coder or BoxCoder()
        self.rpn_batch, self.rpn_positive_fraction = rpn_batch, rpn_positive_fraction
        self.rpn_nms_iou = rpn_nms_iou
        self.rpn_pre_nms_topk, self.rpn_post_nms_topk = rpn_pre_nms_topk, rpn_post_nms_topk
        self.query_alpha, self.query_gamma = query_alpha, query_gamma
        self.query_loss_weight = query_loss_weight
        self.roi_mapper = LevelMapper(ROI_LEVELS[0], ROI_LEVELS[-1])

    def head_branches(self, with_query: bool) -> dict[str, Branch]:
        return self.rpn.branches(with_query)

    def query_scale(self, level: int) -> float:
        return self.anchors.base_size(level)  # paper 3.2: the minimum anchor scale on P_l

    # -- first stage ------------------------------------------------------------------------------
    def proposals(self, outputs: list[LevelOutput], image_sizes: list[tuple[int, int]]
                  ) -> list[torch.Tensor]:
        """RPN proposals per image (R_i, 4): per-level top-k, decode, clip, per-level NMS, top-k."""
        pre = self.rpn_pre_nms_topk[0 if self.training else 1]
        post = self.rpn_post_nms_topk[0 if self.training else 1]
        A = self.anchors.num_anchors
        result = []
        bounds = [image_bounds(out, len(image_sizes)) for out in outputs]
        for i, size in enumerate(image_sizes):
            boxes, scores, lvls = [], [], []
            for out, b in zip(outputs, bounds):
                lo, hi = b[i]
                if hi == lo:
                    continue
                obj = out.cls[lo:hi].reshape(-1)  # (Q_i*A,)
                top = obj.topk(min(pre, obj.numel())).indices
                row, a = top // A, top % A
                _, ys, xs = unravel(out.positions[lo:hi][row], out.shape)
                anchor = self.anchors.anchors_at(out.level, ys, xs)[
                    torch.arange(row.numel(), device=row.device), a]  # (k, 4)
                deltas = out.box[lo:hi].view(-1, A, 4)[row, a]  # (k, 4)
                box = clip_boxes(self.box_coder.decode(deltas.float(), anchor), size)
                keep = remove_small_boxes(box, 1e-3)
                boxes.append(box[keep])
                scores.append(torch.sigmoid(obj[top][keep]))
                lvls.append(torch.full((keep.numel(),), out.level, device=box.device))
            if not boxes:
                result.append(torch.zeros(0, 4, device=outputs[0].cls.device))
                continue
            boxes_i, scores_i, lvls_i = torch.cat(boxes), torch.cat(scores), torch.cat(lvls)
            keep = batched_nms(boxes_i, scores_i, lvls_i, self.rpn_nms_iou)[:post]
            result.append(boxes_i[keep].detach())
        return result

    def rpn_loss(self, outputs: list[LevelOutput], targets: list[dict[str, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness BCE and smooth-L1 box loss over `rpn_batch` sampled anchors per image,
        each anchor weighted by its level's beta_l (Eq. 5)."""
        A = self.anchors.num_anchors
        N = len(targets)
        obj, deltas, anchors, beta = [], [], [], []
        for out in outputs:
            _, H, W = out.shape
            obj.append(out.cls.reshape(N, H * W * A))  # (N, HWA)
            deltas.append(out.box.reshape(N, H * W * A, 4))  # (N, HWA, 4)
            anchors.append(self.anchors.grid_anchors(out.level, H, W, out.cls.device))  # (HWA, 4)
            beta.append(torch.full((H * W * A,), self.level_weights[out.level],
                                   device=out.cls.device))
        obj, deltas = torch.cat(obj, dim=1), torch.cat(deltas, dim=1)
        anchors, beta = torch.cat(anchors), torch.cat(beta)
        one_class = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
        cls, matched = anchor_targets(anchors, one_class, self.matcher, 1)  # 0 fg, 1 bg, -1 ignore
        sampled = []
        for i in range(N):
            fg = torch.nonzero(cls[i] == 0).squeeze(1)
            bg = torch.nonzero(cls[i] == 1).squeeze(1)
            n_fg = min(fg.numel(), int(self.rpn_batch * self.rpn_positive_fraction))
            n_bg = min(bg.numel(), self.rpn_batch - n_fg)
            fg = fg[torch.randperm(fg.numel(), device=fg.device)[:n_fg]]
            bg = bg[torch.randperm(bg.numel(), device=bg.device)[:n_bg]]
            sampled.append((torch.full_like(fg, i), fg, torch.full_like(bg, i), bg))
        n_img = torch.cat([torch.cat([a, c]) for a, _, c, _ in sampled])
        n_idx = torch.cat([torch.cat([b, d]) for _, b, _, d in sampled])
        pos_img = torch.cat([a for a, _, _, _ in sampled])
        pos_idx = torch.cat([b for _, b, _, _ in sampled])
        total = max(1, n_idx.numel())
        labels = (cls[n_img, n_idx] == 0).to(obj.dtype)
        loss_obj = (F.binary_cross_entropy_with_logits(obj[n_img, n_idx], labels, reduction="none")
                    * beta[n_idx]).sum() / total
        if pos_idx.numel():
            target = self.box_coder.encode(anchors[pos_idx], matched[pos_img, pos_idx])
            loss_box = (F.smooth_l1_loss(deltas[pos_img, pos_idx], target, beta=1 / 9,
                                         reduction="none").sum(dim=1) * beta[pos_idx]).sum() / total
        else:
            loss_box = deltas.sum() * 0.0
        return loss_obj, loss_box

    # -- second stage -----------------------------------------------------------------------------
    def roi_feature_maps(self, features: Pyramid, rois: list[torch.Tensor]
                         ) -> OrderedDict[str, torch.Tensor]:
        """P2-P5 for RoIAlign: dense maps where computed, else exact at `roi_support` only.

        As for the sparse heads, a level whose support exceeds `inference.sparse_max_fraction`
        of the map is computed densely: row-wise FPN costs more than the dense conv there.
        """
        maps: OrderedDict[str, torch.Tensor] = OrderedDict()
        for lvl in ROI_LEVELS:
            if features.is_dense(lvl):
                maps[str(lvl)] = features.dense(lvl)
                continue
            N, H, W = features.shape(lvl)
            pos = roi_support(rois, self.roi_mapper, lvl, (N, H, W))
            if pos.numel() > self.inference.sparse_max_fraction * N * H * W:
                maps[str(lvl)] = features.dense(lvl)
            else:
                maps[str(lvl)] = features.sparse_map(lvl, pos)
        return maps

    def class_parameter_names(self) -> set[str]:
        """The second stage's predictor: class scores and per-class box deltas."""
        return {k for k in self.state_dict() if k.startswith("roi_heads.box_predictor.")}

    def copy_class_rows(self, state: dict[str, torch.Tensor], rows: list[int | None]) -> int:
        """Not carried over for the second stage's predictor (its classes start afresh)."""
        return 0

    def detections(self, outputs: list[LevelOutput], image_sizes: list[tuple[int, int]],
                   features: Pyramid | None = None, score_threshold: float | None = None
                   ) -> list[dict[str, torch.Tensor]]:
        """Second stage on the RPN's proposals: boxes (M, 4), scores, labels (0-based), levels
        (the FPN level whose features the box was pooled from)."""
        if features is None:
            raise ValueError("Faster R-CNN's second stage needs the FPN features")
        rois = self.proposals(outputs, image_sizes)
        d = self.inference_for(score_threshold)
        heads = self.roi_heads
        heads.score_thresh, heads.nms_thresh = d.score_threshold, d.nms_iou
        heads.detections_per_img = max(detection_budget(d.max_detections, size)
                                       for size in image_sizes)
        results, _ = heads(self.roi_feature_maps(features, rois), rois, image_sizes)
        out = []
        for r, size in zip(results, image_sizes):  # each image its own budget (sorted by score)
            r = {k: v[:detection_budget(d.max_detections, size)] for k, v in r.items()}
            boxes = r["boxes"]
            levels = (self.roi_mapper([boxes]) + ROI_LEVELS[0] if boxes.numel()
                      else torch.zeros(0, dtype=torch.int64, device=boxes.device))
            out.append({"boxes": boxes, "scores": r["scores"], "labels": r["labels"] - 1,
                        "levels": levels.to(torch.int64)})
        return out

    # -- training ---------------------------------------------------------------------------------
    def forward_training(self, images, targets: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """RPN (objectness + box, Eq. 5 weights) + query + second-stage losses."""
        batch, sizes, targets, feats = self.prepare_training(images, targets)
        maps = self.dense_level_maps(feats, with_query=True)
        outputs = []
        for lvl in self.levels:
            obj, box = maps[lvl]["cls"], maps[lvl]["box"]
            n, _, h, w = obj.shape
            outputs.append(LevelOutput(lvl, (n, h, w), torch.arange(n * h * w, device=obj.device),
                                       rows_of_map(obj), rows_of_map(box), None, 0.0, 0.0))
        loss_obj, loss_rpn_box = self.rpn_loss(outputs, targets)
        with torch.no_grad():
            detached = [LevelOutput(o.level, o.shape, o.positions, o.cls.detach(), o.box.detach(),
                                    None, 0.0, 0.0) for o in outputs]
            rois = self.proposals(detached, sizes)
        roi_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        roi_maps = OrderedDict((str(lvl), feats[lvl]) for lvl in ROI_LEVELS)
        _, roi_losses = self.roi_heads(roi_maps, rois, sizes, roi_targets)
        losses = {"loss_objectness": loss_obj, "loss_rpn_box": loss_rpn_box,
                  "loss_cls": roi_losses["loss_classifier"], "loss_box": roi_losses["loss_box_reg"]}
        if self.query_levels:
            losses["loss_query"] = self.query_losses(
                {lvl: maps[lvl]["query"][:, 0] for lvl in self.query_levels},  # (N, H, W)
                targets, self.query_alpha, self.query_gamma, self.query_loss_weight)
        return losses


def build_roi_heads(channels: int, num_classes: int, representation: int = 1024,
                    score_threshold: float = 0.05, nms_iou: float = 0.5,
                    max_detections: int = 100) -> RoIHeads:
    """torchvision's Faster R-CNN second stage over P2-P5 (Faster R-CNN / FPN defaults)."""
    pool = MultiScaleRoIAlign([str(lvl) for lvl in ROI_LEVELS], output_size=7, sampling_ratio=2)
    return RoIHeads(pool, TwoMLPHead(channels * 7 * 7, representation),
                    FastRCNNPredictor(representation, num_classes + 1),
                    fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512,
                    positive_fraction=0.25, bbox_reg_weights=None, score_thresh=score_threshold,
                    nms_thresh=nms_iou, detections_per_img=max_detections)


__all__ = ["QueryFasterRCNN", "build_roi_heads", "roi_support", "ROI_LEVELS"]


def _outputs_to_float32(module: torch.nn.Module, inputs, outputs):
    """Forward hook: the box predictor's (class logits, box deltas) as float32."""
    return tuple(o.float() for o in outputs)
