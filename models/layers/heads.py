"""Detection heads shared across FPN levels: classification, box regression and query.

Letters: N batch, C channels, A anchors per position, K classes, H/W map size.

Each head is built from `ConvTower`s: `num_convs` x (3x3 conv + ReLU) then a 3x3 predictor
(RetinaNet 4). The towers are plain lists of 3x3 convolutions so the sparse paths (`sparse.py`)
can run the very same parameters at selected positions.

Every head describes its outputs as `Branch`es (a tower and an optional 1x1 predictor on the
tower's output), which is all the inference code (`query_infer.py`) needs to know about it:

* RetinaNet: cls (A*K) and box (A*4) towers, plus the separate query tower.
* FCOS: cls (K) and box towers; the box tower predicts l, t, r, b and centre-ness together
  (one 3x3 conv with 5 outputs equals FCOS's two predictors on the regression tower).
* RPN (paper 4.4): one trunk of 3x3 conv + ReLU layers and three 1x1 branches: objectness (A),
  box deltas (A*4) and the query logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class ConvTower(nn.Module):
    """`num_convs` 3x3 conv + ReLU layers followed by a 3x3 predictor conv with `out_channels`.

    With `relu_last` the last conv is followed by a ReLU too (a trunk such as the RPN's, whose
    outputs feed 1x1 predictors).
    """

    def __init__(self, channels: int, num_convs: int, out_channels: int, bias_init: float = 0.0,
                 relu_last: bool = False) -> None:
        super().__init__()
        self.relu_last = relu_last
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
        x = self.convs[-1](x)
        return F.relu(x) if self.relu_last else x


@dataclass(frozen=True)
class Branch:
    """One head output: `tower` then, when given, a 1x1 `predictor` on the tower's output."""

    tower: ConvTower
    predictor: nn.Conv2d | None = None

    def macs_per_position(self) -> float:
        """Multiply-accumulates of the 1x1 predictor at one position (the tower is counted apart)."""
        p = self.predictor
        return 0.0 if p is None else float(p.in_channels * p.out_channels)


class RetinaHead(nn.Module):
    """Classification (A*K outputs) and box (A*4 outputs) towers, one set of weights for all levels."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 prior_prob: float = 0.01, box_outputs: int = 4) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        prior_bias = -math.log((1 - prior_prob) / prior_prob)  # focal-loss prior, RetinaNet 3.3
        self.cls = ConvTower(channels, num_convs, num_anchors * num_classes, prior_bias)
        self.box = ConvTower(channels, num_convs, num_anchors * box_outputs)

    def branches(self) -> dict[str, Branch]:
        return {"cls": Branch(self.cls), "box": Branch(self.box)}

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits (N, A*K, H, W) and deltas (N, A*4, H, W)."""
        return [self.cls(f) for f in features], [self.box(f) for f in features]


class QueryHead(ConvTower):
    """Query head (paper 3.2): a tower with one output, the logit of 'a small object is here'."""

    def __init__(self, channels: int, num_convs: int = 4, prior_prob: float = 0.01) -> None:
        super().__init__(channels, num_convs, 1, -math.log((1 - prior_prob) / prior_prob))


def branch_maps(branches: dict[str, Branch], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every branch densely on one level's map x (N, C, H, W): {name: (N, C_out, H, W)}.

    A tower shared by several branches (the RPN trunk) runs once.
    """
    towers: dict[int, torch.Tensor] = {}
    maps = {}
    for name, b in branches.items():
        if id(b.tower) not in towers:
            towers[id(b.tower)] = b.tower(x)
        t = towers[id(b.tower)]
        maps[name] = t if b.predictor is None else b.predictor(t)
    return maps


def tower_branches(head: RetinaHead, query_head: QueryHead | None, with_query: bool
                   ) -> dict[str, Branch]:
    """Branches of a one-stage head (RetinaNet, FCOS) plus its separate query tower."""
    branches = head.branches()
    if with_query and query_head is not None:
        branches["query"] = Branch(query_head)
    return branches


class FCOSHead(RetinaHead):
    """FCOS head (FCOS 2): cls tower with K outputs, box tower with l, t, r, b and centre-ness.

    No GroupNorm in the towers: its statistics span the whole map, so a sparse head could not
    reproduce the dense one (the RetinaNet heads of the paper have none either).
    """

    def __init__(self, channels: int, num_classes: int, num_convs: int = 4,
                 prior_prob: float = 0.01) -> None:
        super().__init__(channels, 1, num_classes, num_convs, prior_prob, box_outputs=5)


class RPNHead(nn.Module):
    """RPN with a `num_convs`-layer trunk and 1x1 objectness, box and (optional) query branches.

    The paper (4.4) uses 3 trunk convs instead of the usual 1 and adds the query branch; with
    `num_convs=1` and no query this is the standard FPN RPN head.
    """

    def __init__(self, channels: int, num_anchors: int, num_convs: int = 3,
                 with_query: bool = True, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        # the trunk: num_convs 3x3 convs, each with ReLU (ConvTower's last conv is the num_convs-th)
        self.trunk = ConvTower(channels, num_convs - 1, channels, relu_last=True)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        self.query = nn.Conv2d(channels, 1, 1) if with_query else None
        for conv in [self.objectness, self.deltas] + ([self.query] if with_query else []):
            nn.init.normal_(conv.weight, std=0.01)  # torchvision's RPN init
            nn.init.constant_(conv.bias, 0.0)
        if self.query is not None:
            # the query branch is a focal-loss classifier: start it at the prior (RetinaNet 3.3)
            nn.init.constant_(self.query.bias, -math.log((1 - prior_prob) / prior_prob))

    def branches(self, with_query: bool) -> dict[str, Branch]:
        out = {"cls": Branch(self.trunk, self.objectness), "box": Branch(self.trunk, self.deltas)}
        if with_query and self.query is not None:
            out["query"] = Branch(self.trunk, self.query)
        return out
