"""Query-head targets, Eq. 2-3 of the paper.

Letters: N batch, H/W map size, G ground-truth boxes.

On P_l (stride 2**l) a position (x, y) stands for the pixel centre ((x + .5) 2**l, (y + .5) 2**l).
An object is small on P_l when its scale sqrt(w * h) is below s_l, the level's smallest anchor
size. D_l is the distance, in pixels, from each position centre to the nearest small-object centre
(Eq. 2) and the target is 1 where D_l < s_l, else 0 (Eq. 3). With s_l = 4 * 2**l the positive
disc has a radius of 4 positions on every level.
"""

from __future__ import annotations

import torch


def small_object_centres(boxes: torch.Tensor, s_l: float) -> torch.Tensor:
    """Centres (g, 2) of the boxes (G, 4) whose scale sqrt(w h) is below s_l."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    small = torch.sqrt(wh[:, 0] * wh[:, 1]) < s_l
    return (boxes[small, :2] + boxes[small, 2:]) / 2


def query_target_map(boxes: torch.Tensor, level: int, height: int, width: int, s_l: float,
                     chunk: int = 64) -> torch.Tensor:
    """Binary target (H, W) float for one image's boxes (G, 4) on P_level (Eq. 2-3)."""
    stride = 2.0 ** level
    target = torch.zeros(height, width, device=boxes.device)
    centres = small_object_centres(boxes, s_l)
    if centres.numel() == 0:
        return target
    ys = (torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # (HW, 2) x, y
    nearest = torch.full((grid.shape[0],), float("inf"), device=boxes.device)
    for start in range(0, centres.shape[0], chunk):
        dist = torch.cdist(grid, centres[start:start + chunk])  # (HW, g)
        nearest = torch.minimum(nearest, dist.min(dim=1).values)  # Eq. 2
    return (nearest < s_l).to(torch.float32).view(height, width)  # Eq. 3
