"""What every detector family shares: backbone + FPN, preprocessing, checks and sparse inference.

Letters: N batch, C channels, L levels, M detections.

`FPNDetector` holds the parts common to RetinaNet (`querydet.py`), FCOS (`fcos.py`) and Faster
R-CNN (`faster_rcnn.py`). A family supplies its head as `Branch`es (`head_branches`), its losses
(`forward_training`) and its post-processing (`detections`); dense, CSQ, CQ and CCQ inference
(`query_infer.py`) then work for it unchanged.
"""

from __future__ import annotations

import hashlib
import dataclasses

import torch
from torch import nn

from ..layers.backbones import Backbone
from ..config import InferenceConfig
from ..errors import ModelError
from ..layers.fpn import FPN, Pyramid
from ..layers.heads import Branch, branch_maps
from ..layers.losses import query_loss
from ..layers.precision import (compute_context, fold_batchnorm, fuse_conv_activations,
                        resolve_precision)
from ..query.query_infer import LevelOutput, QueryInference, QueryOptions
from ..query.query_targets import query_target_map
from .stages import run_stages


class ModelInputError(ModelError):
    """Images or targets handed to the model are unusable (NaN/Inf, wrong shape, bad boxes)."""


class FPNDetector(nn.Module):
    """Backbone + FPN with dense or sparse head inference; subclasses add heads and losses.

    Args:
        backbone: returns c2..c5 feature maps; `out_channels` lists their widths.
        num_classes: object classes (without background).
        levels: FPN levels with heads, e.g. (2..7), (3..7) or (2..6).
        query_levels: levels whose query output is trained (Eq. 2-3); empty = no query.
        level_weights: beta_l of Eq. 5, one per level.
        inference: default inference settings; every call may override them.

    It implements `protocol.InferenceDetector`: PyTorch runs it, on the caller's threads.
    """

    runtime = "torch"
    own_threads = False

    def __init__(self, backbone: Backbone, *, num_classes: int, levels: tuple[int, ...],
                 query_levels: tuple[int, ...], level_weights: tuple[float, ...],
                 fpn_channels: int = 256,
                 pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 size_divisibility: int = 32, inference: InferenceConfig | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        first = levels[0] - 2  # c2 feeds P2, c3 feeds P3
        self.fpn = FPN(backbone.out_channels[first:], fpn_channels, levels[0], levels[-1])
        self.num_classes = num_classes
        self.levels = tuple(levels)
        self.query_levels = tuple(query_levels)
        self.level_weights = dict(zip(self.levels, level_weights))
        self.size_divisibility = size_divisibility
        self.inference = inference or InferenceConfig()
        self.precision = "fp32"  # of inference; `prepare_inference` / `set_precision` change it
        # the inference form (`prepare_inference`): what it folded and fused, and the layout
        self.folded_batchnorms = 0
        self.fused_activations = 0
        self.channels_last = False
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)

    # -- what a family provides -------------------------------------------------------------------
    def head_branches(self, with_query: bool) -> dict[str, Branch]:
        """The head as {"cls", "box"[, "query"]} branches (see `heads.Branch`)."""
        raise NotImplementedError

    def query_scale(self, level: int) -> float:
        """s_l of Eq. 3 on P_level: objects with sqrt(w h) below it are small there."""
        raise NotImplementedError

    def detections(self, outputs: list[LevelOutput], image_sizes: list[tuple[int, int]],
                   features: Pyramid | None = None, score_threshold: float | None = None
                   ) -> list[dict[str, torch.Tensor]]:
        """Post-process level outputs (and, for two-stage models, the features) into detections;
        `score_threshold` replaces the inference config's for this call only."""
        raise NotImplementedError

    def inference_for(self, score_threshold: float | None = None) -> InferenceConfig:
        """The inference settings of one call: the model's, with a per-call score threshold."""
        if score_threshold is None:
            return self.inference
        return dataclasses.replace(self.inference, score_threshold=score_threshold)

    def forward_training(self, images, targets: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def class_parameter_names(self) -> set[str]:
        """State-dict keys that encode the class list (the classification predictor): fine-tuning
        on other classes re-initialises them instead of copying them."""
        last = len(self.head.cls.convs) - 1
        return {f"head.cls.convs.{last}.weight", f"head.cls.convs.{last}.bias"}

    def copy_class_rows(self, state: dict[str, torch.Tensor], rows: list[int | None]) -> int:
        """Start new class j's predictor from old class rows[j] of another checkpoint's `state`
        (same anchors; None leaves class j as initialised). Returns how many classes were copied.

        The predictor's output channels are (A, K): channel a * K + k is class k of anchor a.
        """
        last = len(self.head.cls.convs) - 1
        conv = self.head.cls.convs[last]
        old_w, old_b = state[f"head.cls.convs.{last}.weight"], state[f"head.cls.convs.{last}.bias"]
        anchors, new_k = self.head.num_anchors, self.num_classes
        old_k = old_w.shape[0] // anchors
        if old_w.shape[1:] != conv.weight.shape[1:] or old_k * anchors != old_w.shape[0]:
            return 0
        copied = 0
        with torch.no_grad():
            for j, r in enumerate(rows):
                if r is None or not 0 <= r < old_k:
                    continue
                for a in range(anchors):
                    conv.weight[a * new_k + j] = old_w[a * old_k + r]
                    conv.bias[a * new_k + j] = old_b[a * old_k + r]
                copied += 1
        return copied

    # -- shared -----------------------------------------------------------------------------------
    @property
    def has_query(self) -> bool:
        """True when the model can run CSQ / CQ / CCQ (it has a trained query output)."""
        return "query" in self.head_branches(True)

    @property
    def fpn_channels(self) -> int:
        return self.fpn.output[0].out_channels

    @torch.no_grad()
    def randomize_heads(self, seed: int) -> None:
        """Random head weights whose outputs vary (He-normal weights, N(0, 0.1) biases).

        For benchmarks and accuracy checks without a checkpoint: the detectors' own init (std 0.01,
        prior bias) makes every logit nearly the same constant, so a sparse-vs-dense comparison
        on it would prove nothing.
        """
        gen = torch.Generator().manual_seed(seed)
        convs: dict[int, nn.Conv2d] = {}
        for b in self.head_branches(True).values():
            for conv in [*b.tower.convs] + ([b.predictor] if b.predictor is not None else []):
                convs.setdefault(id(conv), conv)
        for conv in convs.values():
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)

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
        sizes, ends = [], []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ModelInputError(f"expected an image of shape (3, H, W), got {tuple(img.shape)}")
            if img.shape[1] < 1 or img.shape[2] < 1:
                raise ModelInputError(f"image is empty: shape {tuple(img.shape)}")
            if not img.is_floating_point():
                raise ModelInputError(f"expected float images in [0, 1], got dtype {img.dtype}")
            ends += torch.aminmax(img)  # NaN propagates to both; one pass, no mask
            sizes.append((int(img.shape[1]), int(img.shape[2])))
        # one answer for the batch: on a GPU each bool() waits for the stream
        if not bool(torch.isfinite(torch.stack(ends).float()).all()):
            raise ModelInputError("image contains NaN or Inf values")
        d = self.size_divisibility
        height = -(-max(h for h, _ in sizes) // d) * d
        width = -(-max(w for _, w in sizes) // d) * d
        # the batch is made in the layout the backbone runs in, so it is written once
        layout = torch.channels_last if self.channels_last else \
            torch.contiguous_format
        batch = torch.empty(len(images), 3, height, width, dtype=self.pixel_mean.dtype,
                            device=self.pixel_mean.device, memory_format=layout)
        if any(size != (height, width) for size in sizes):
            batch.zero_()  # padding
        for i, img in enumerate(images):
            h, w = sizes[i]
            img = img.to(batch.device)
            if torch.promote_types(img.dtype, batch.dtype) != batch.dtype:  # float64: as written
                batch[i, :, :h, :w] = (img - self.pixel_mean[0]) / self.pixel_std[0]
                continue
            # straight into the batch, in place: the same two roundings, without two temporaries
            # and a copy (a 2304 px tile, one thread, glibc's default malloc: 102 -> 53 ms; in
            # `detect`, which keeps freed memory, no change a whole run can measure)
            dst = batch[i, :, :h, :w]  # (3, h, w) view
            torch.sub(img, self.pixel_mean[0], out=dst)
            dst.div_(self.pixel_std[0])
        return batch, sizes

    def extract_features(self, batch: torch.Tensor) -> Pyramid:
        """Backbone maps of a preprocessed batch, wrapped so FPN levels are computed on demand:
        densely for dense levels, only at the needed positions for CSQ's sparse levels."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return Pyramid(self.fpn, self.backbone(batch))

    def forward(self, images, targets=None, **kwargs):
        """Losses when training (targets required), detections otherwise."""
        if self.training:
            if targets is None:
                raise ModelInputError("training needs targets")
            return self.forward_training(images, targets)
        return self.forward_inference(images, **kwargs)

    def forward_inference(self, images, **mode) -> list[dict[str, torch.Tensor]]:
        """Detections per image: boxes (M, 4) xyxy pixels, scores (M,), labels (M,), levels (M,).

        `mode` takes the keyword arguments of `predict_levels`. Runs in `self.precision`.
        """
        with self.compute():
            return run_stages(self, images, **mode).detections

    # -- inference form ---------------------------------------------------------------------------
    def resolved_precision(self, precision: str = "auto") -> str:
        """The precision (auto, fp32, bf16, fp16) resolved for this model's device; changes
        nothing (a caller passes it to `compute` for its own calls)."""
        return resolve_precision(precision, self.pixel_mean.device)

    def weights_digest(self) -> str:
        """SHA-256 over every tensor of the state, by name (the weights as they run)."""
        h = hashlib.sha256()
        for key, value in self.state_dict().items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                     .tobytes())
        return h.hexdigest()

    def set_precision(self, precision: str = "auto") -> str:
        """Set the default inference precision (auto, fp32, bf16, fp16); returns it resolved."""
        self.precision = self.resolved_precision(precision)
        return self.precision

    def prepare_inference(self, precision: str = "auto", channels_last: bool = True) -> str:
        """Turn the model into its inference form, in place: eval mode, every batch norm (frozen,
        or trainable with its running statistics) folded into the conv before it, each conv and
        the ReLU or ReLU6 after it one op on the CPU (`fuse_conv_activations`), weights and
        inputs channels_last (NHWC: measured faster for the convolutions in fp32 and bf16 on
        this CPU, and the layout tensor cores want), and the precision resolved. Not for
        training afterwards."""
        self.eval()
        self.folded_batchnorms = fold_batchnorm(self.backbone)
        self.fused_activations = fuse_conv_activations(self.backbone)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self.set_precision(precision)

    def compute(self, precision: str | None = None):
        """Context for inference calls: inference_mode, autocast to `precision` (resolved, see
        `resolved_precision`), by default the model's own."""
        return compute_context(self.pixel_mean.device, precision or self.precision)

    @torch.no_grad()
    def predict_levels(self, features: Pyramid, *, mode: str | None = None,
                       sigma: float | None = None, start_level: int | None = None,
                       context: str | None = None, backend: str | None = None,
                       forced_queries: dict[int, torch.Tensor] | None = None,
                       sparse_max_fraction: float | None = None,
                       valid: torch.Tensor | None = None,
                       ) -> list[LevelOutput]:
        """Head outputs of every level under one inference mode (see `query_infer`).

        `valid` (N, H, W) bool at the batch's size: where the images hold data. Queries fire
        only on cells that hold some (a nodata collar is not an object to look for)."""
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
        if not self.has_query and options.mode != "dense":
            options = QueryOptions(mode="dense")  # a baseline has nothing to query with
        outputs = QueryInference(self.head_branches, options, forced_queries)(features, valid)
        for out in outputs:  # post-processing (anchors, decoding, NMS) runs in float32
            out.cls, out.box = out.cls.float(), out.box.float()
            if out.query is not None:
                out.query = out.query.float()
        return outputs

    def dense_level_maps(self, features: dict[int, torch.Tensor], with_query: bool
                         ) -> dict[int, dict[str, torch.Tensor]]:
        """Training: every branch on every level, {level: {name: (N, C_out, H, W)}}."""
        return {lvl: branch_maps(self.head_branches(with_query and lvl in self.query_levels),
                                 features[lvl]) for lvl in self.levels}

    def check_target(self, target: dict[str, torch.Tensor], device: torch.device
                     ) -> dict[str, torch.Tensor]:
        """A training target with float boxes (G, 4), int64 labels (G,) and ignore regions,
        or ModelInputError naming what is wrong."""
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

    def query_losses(self, query_maps: dict[int, torch.Tensor],
                     targets: list[dict[str, torch.Tensor]], alpha: float, gamma: float,
                     weight: float) -> torch.Tensor:
        """Eq. 4-5's query term: sum over query levels of beta_l * weight * focal(V_l, Eq. 3).

        `query_maps` holds {level: (N, H, W) logits}; images without objects contribute nothing.
        """
        device = next(iter(query_maps.values())).device
        has_objects = torch.tensor([t["boxes"].shape[0] > 0 for t in targets], device=device)
        total = torch.zeros((), device=device)
        for lvl, q in query_maps.items():
            s_l = self.query_scale(lvl)
            tgt = torch.stack([query_target_map(t["boxes"], lvl, q.shape[1], q.shape[2], s_l)
                               for t in targets])  # (N, H, W)
            total = total + self.level_weights[lvl] * weight * query_loss(q, tgt, has_objects,
                                                                          alpha, gamma)
        return total

    def prepare_training(self, images, targets: list[dict[str, torch.Tensor]]
                         ) -> tuple[torch.Tensor, list[tuple[int, int]],
                                    list[dict[str, torch.Tensor]], dict[int, torch.Tensor]]:
        """Preprocessed batch, sizes, checked targets and every FPN level densely."""
        batch, sizes = self.preprocess(images)
        targets = [self.check_target(t, batch.device) for t in targets]
        if len(targets) != batch.shape[0]:
            raise ModelInputError(f"{batch.shape[0]} images but {len(targets)} targets")
        return batch, sizes, targets, self.fpn(self.backbone(batch))


__all__ = ["FPNDetector", "ModelInputError"]
