"""Feature Pyramid Network (P2/P3 .. P7) that can also be evaluated lazily at chosen positions.

Letters: N batch, C channels, Q positions.

The layers are torchvision's FPN layout (1x1 lateral, nearest top-down, 3x3 output; P6 from P5
by a stride-2 3x3, P7 from ReLU(P6), RetinaNet's "P6P7" block). The difference is `Pyramid`:
in CSQ the fine levels are read only at the sparse heads' positions, so their maps are computed
only there. The lateral and top-down steps are per-position, and the 3x3 output conv runs by
gather-GEMM at the positions asked for, so no dense map of a queried level is ever built while
the values stay exactly those of the dense FPN.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from .sparse import (TowerPlan, dilate_keys, gather_positions, ravel, sparse_conv_torch,
                     unique_positions, unravel)


class FPN(nn.Module):
    """FPN over backbone maps c{first}..c5, giving P{first}..P{last} (last 6 or 7)."""

    def __init__(self, in_channels: list[int], channels: int, first_level: int,
                 last_level: int = 7) -> None:
        super().__init__()
        if last_level not in (6, 7):
            raise ValueError(f"FPN last level must be 6 or 7, got {last_level}")
        self.first_level = first_level
        self.last_level = last_level
        self.lateral = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in in_channels])
        self.output = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1)
                                     for _ in in_channels])
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = (nn.Conv2d(channels, channels, 3, stride=2, padding=1) if last_level == 7
                   else None)
        for conv in [*self.lateral, *self.output, self.p6] + ([self.p7] if self.p7 else []):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision's FPN init
            nn.init.constant_(conv.bias, 0.0)

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(self.first_level, self.last_level + 1))

    def forward(self, feats: OrderedDict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every level densely: {level: (N, C, H_l, W_l)}."""
        pyramid = Pyramid(self, feats)
        return {lvl: pyramid.dense(lvl) for lvl in self.levels}


class Pyramid:
    """FPN maps computed on demand: whole maps with `dense`, or rows at positions with `rows`.

    Dense maps (and the inner top-down maps they need) are cached for the lifetime of the object,
    one forward pass.
    """

    def __init__(self, fpn: FPN, feats: OrderedDict[str, torch.Tensor]) -> None:
        self.fpn = fpn
        self.c = {int(k[1:]): v for k, v in feats.items() if int(k[1:]) >= fpn.first_level}
        self._dense: dict[int, torch.Tensor] = {}
        self._inner: dict[int, torch.Tensor] = {}

    @property
    def levels(self) -> tuple[int, ...]:
        return self.fpn.levels

    def shape(self, level: int) -> tuple[int, int, int]:
        """(N, H, W) of P_level."""
        if level in self.c:
            n, _, h, w = self.c[level].shape
            return (n, h, w)
        n, h, w = self.shape(level - 1)
        return (n, (h - 1) // 2 + 1, (w - 1) // 2 + 1)  # stride-2 3x3 conv, padding 1

    def is_dense(self, level: int) -> bool:
        return level in self._dense

    # -- dense ------------------------------------------------------------------------------------
    def inner(self, level: int) -> torch.Tensor:
        """The inner (lateral + top-down) map of a level <= 5 before its 3x3 output conv,
        (N, C, H, W): what an exported CSQ graph hands to a fine level's graph."""
        return self._inner_dense(level)

    def _inner_dense(self, level: int) -> torch.Tensor:
        if level not in self._inner:
            lateral = self.fpn.lateral[level - self.fpn.first_level](self.c[level])
            if level < 5:
                top = self._inner_dense(level + 1)
                lateral = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            self._inner[level] = lateral
        return self._inner[level]

    def dense(self, level: int) -> torch.Tensor:
        """P_level as a dense (N, C, H, W) map."""
        if level not in self._dense:
            if level <= 5:
                out = self.fpn.output[level - self.fpn.first_level](self._inner_dense(level))
            elif level == 6:
                out = self.fpn.p6(self.dense(5))
            else:
                out = self.fpn.p7(F.relu(self.dense(6)))
            self._dense[level] = out
        return self._dense[level]

    # -- sparse -----------------------------------------------------------------------------------
    def _inner_rows(self, level: int, pos: torch.Tensor) -> torch.Tensor:
        """Inner (lateral + top-down) features at positions `pos` of `level`, (Q, C)."""
        if level in self._inner:
            return gather_positions(self._inner[level], pos)
        conv = self.fpn.lateral[level - self.fpn.first_level]
        c_rows = gather_positions(self.c[level], pos)  # (Q, C_in)
        lateral = torch.addmm(conv.bias, c_rows, conv.weight.flatten(1).t())  # 1x1 conv, (Q, C)
        if level < 5:
            shape, coarse = self.shape(level), self.shape(level + 1)
            n, y, x = unravel(pos, shape)
            # nearest upsampling as F.interpolate does it: source index floor(i * in / out)
            yy = (y * coarse[1]) // shape[1]
            xx = (x * coarse[2]) // shape[2]
            parent = ravel(n, yy, xx, coarse)
            uniq, inverse = unique_positions(parent, coarse)
            lateral = lateral + self._inner_rows(level + 1, uniq)[inverse]
        return lateral

    def rows(self, level: int, pos: torch.Tensor) -> torch.Tensor:
        """P_level at positions `pos` (sorted), (Q, C); computed sparsely unless already dense."""
        if level in self._dense or level > 5:
            return gather_positions(self.dense(level), pos)
        shape = self.shape(level)
        ring = dilate_keys(pos, shape, 1)
        plan = TowerPlan(shape, [ring, pos])
        conv = self.fpn.output[level - self.fpn.first_level]
        return sparse_conv_torch(self._inner_rows(level, ring), plan, 1, conv)

    def sparse_map(self, level: int, pos: torch.Tensor) -> torch.Tensor:
        """P_level as an (N, C, H, W) map holding the FPN's values at `pos` and zeros elsewhere
        (for RoIAlign, which reads only where its RoIs lie); the dense map if already computed."""
        if level in self._dense:
            return self._dense[level]
        N, H, W = self.shape(level)
        C = self.fpn.output[0].out_channels
        flat = self.c[min(level, 5)].new_zeros(N * H * W, C)
        if pos.numel():
            flat[pos] = self.rows(level, pos)
        return flat.view(N, H, W, C).permute(0, 3, 1, 2)  # (N, C, H, W), channels-last strides

