"""Anchor boxes: per-level cell templates and their placement at feature-map positions.

Letters: A anchors per position, Q positions, L levels.

Position (y, x) on level l (stride s = 2**l) stands for the pixel centre ((x + 0.5) s, (y + 0.5) s);
anchors and query targets (Eq. 2) both use that centre.
"""

from __future__ import annotations

import math

import torch


class AnchorGenerator:
    """RetinaNet anchors: base size `scale * 2**l` on P_l, `octave_scales` sizes x `ratios`.

    With scale 4, P2 starts at 16 px and P7 at 512 px; sizes within a level are
    base * 2**(i / octave_scales).
    """

    def __init__(self, levels: tuple[int, ...], scale: float = 4.0, octave_scales: int = 3,
                 ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> None:
        self.levels = tuple(levels)
        self.scale = scale
        self.octave_scales = octave_scales
        self.ratios = tuple(ratios)

    @property
    def num_anchors(self) -> int:
        return self.octave_scales * len(self.ratios)

    def base_size(self, level: int) -> float:
        """Smallest anchor size on P_level, in pixels (s_l of Eq. 3)."""
        return self.scale * 2.0 ** level

    def cell_anchors(self, level: int, device: torch.device | None = None) -> torch.Tensor:
        """Anchor templates centred on (0, 0), shape (A, 4) xyxy; sizes outer, ratios inner."""
        rows = []
        for i in range(self.octave_scales):
            size = self.base_size(level) * 2.0 ** (i / self.octave_scales)
            for ratio in self.ratios:  # ratio = h / w, area kept at size**2
                w = size / math.sqrt(ratio)
                h = size * math.sqrt(ratio)
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def anchors_at(self, level: int, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Anchors at positions (ys, xs) of P_level, shape (Q, A, 4) xyxy pixels."""
        stride = 2.0 ** level
        cx = (xs.to(torch.float32) + 0.5) * stride
        cy = (ys.to(torch.float32) + 0.5) * stride
        shifts = torch.stack([cx, cy, cx, cy], dim=1)  # (Q, 4)
        return shifts[:, None, :] + self.cell_anchors(level, ys.device)[None]  # (Q, A, 4)

    def grid_anchors(self, level: int, height: int, width: int,
                     device: torch.device | None = None) -> torch.Tensor:
        """Anchors of every position of an (height, width) map, row-major, shape (HWA, 4)."""
        ys, xs = torch.meshgrid(torch.arange(height, device=device),
                                torch.arange(width, device=device), indexing="ij")
        return self.anchors_at(level, ys.reshape(-1), xs.reshape(-1)).reshape(-1, 4)  # (HWA, 4)
