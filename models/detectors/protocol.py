"""What a detector that `detect` runs declares: the interface `FPNDetector` (PyTorch) and
`export.graph_infer.GraphDetector` (exported graphs) both implement, so that no caller needs to
probe a model for what it has, and nothing is attached to a model after it is built.

The inference pass itself (`stages.run_stages`) calls the four stage methods; the rest is what
the run around it reads: how to pad a tile, what runs the network, which precision it computes
in, and a digest of the weights it runs (part of a journal's key).
"""

from __future__ import annotations

from typing import Any, ClassVar, ContextManager, Protocol, runtime_checkable

import torch


@runtime_checkable
class InferenceDetector(Protocol):
    """A detector that runs inference on tiles.

    Attributes:
        size_divisibility: tile sides are padded to a multiple of this.
        runtime: what runs the network ("torch", "onnxruntime", "openvino").
        own_threads: True when the runtime keeps threads of its own, so tiles are not
            computed side by side on threads of the caller.
        num_classes: K, the classes it predicts.
    """

    size_divisibility: int
    runtime: str
    own_threads: ClassVar[bool]
    num_classes: int

    def resolved_precision(self, precision: str = "auto") -> str:
        """The precision `precision` ("auto", "fp32", "bf16", ...) means on this model."""

    def set_precision(self, precision: str = "auto") -> str:
        """Compute in `precision` from now on; returns the resolved one."""

    def compute(self, precision: str | None = None) -> ContextManager:
        """The context inference runs in (inference mode, autocast)."""

    def weights_digest(self) -> str:
        """SHA-256 of the weights it runs."""

    def preprocess(self, images: Any) -> tuple[Any, list[tuple[int, int]]]:
        """Stage 1: images into one padded batch, and each image's (h, w)."""

    def extract_features(self, batch: Any) -> Any:
        """Stage 2: the backbone."""

    def predict_levels(self, features: Any, **mode: Any) -> list[Any]:
        """Stage 3: FPN, dense levels, query heads and the sparse levels they lead to."""

    def detections(self, outputs: list[Any], image_sizes: list[tuple[int, int]], features: Any,
                   score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Stage 4: boxes, scores and labels per image."""
