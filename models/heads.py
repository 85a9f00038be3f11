"""Detection heads shared across FPN levels: classification, box regression and query.

Letters: N batch, C channels, A anchors per position, K classes, H/W map size.

Each head is a `ConvTower`: `num_convs` x (3x3 conv + ReLU) then a 3x3 predictor (RetinaNet 4).
The towers are plain lists of 3x3 convolutions so the sparse paths (`sparse.py`) can run the very
same parameters at selected positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ConvTower(nn.Module):
    """`num_convs` 3x3 conv + ReLU layers followed by a 3x3 predictor conv with `out_channels`."""

    def __init__(self, channels: int, num_convs: int, out_channels: int, bias_init: float = 0.0
                 ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_convs)]
            + [nn.Conv2d(channels, out_channels, 3, padding=1)])
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.01)  # RetinaNet 4.1: Gaussian sigma = 0.01
            nn.init.constant_(conv.bias, 0.0)
        nn.init.constant_(self.convs[-1].bias, bias_init)

    @property
    def depth(self) -> int:
        """Number of 3x3 convolutions, i.e. the receptive radius in positions."""
        return len(self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        return self.convs[-1](x)


class RetinaHead(nn.Module):
    """Classification (A*K outputs) and box (A*4 outputs) towers, one set of weights for all levels."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        prior_bias = -math.log((1 - prior_prob) / prior_prob)  # focal-loss prior, RetinaNet 3.3
        self.cls = ConvTower(channels, num_convs, num_anchors * num_classes, prior_bias)
        self.box = ConvTower(channels, num_convs, num_anchors * 4)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits (N, A*K, H, W) and deltas (N, A*4, H, W)."""
        return [self.cls(f) for f in features], [self.box(f) for f in features]


class QueryHead(ConvTower):
    """Query head (paper 3.2): a tower with one output, the logit of 'a small object is here'."""

    def __init__(self, channels: int, num_convs: int = 4, prior_prob: float = 0.01) -> None:
        super().__init__(channels, num_convs, 1, -math.log((1 - prior_prob) / prior_prob))
