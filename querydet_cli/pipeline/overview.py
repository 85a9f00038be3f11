"""`detect --save-vis`: a downsampled picture of a raster with its detections and the query
heatmap, and the helpers that place a tile's heatmap in it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .merge import Detections
from ..reading.raster import RasterSource
from .tiling import Tile


def heat_in_tile(heat: np.ndarray, padded: tuple[int, int], crop: tuple[int, int, int, int],
                  height: int, width: int) -> np.ndarray:
    """A heatmap of a (cropped, padded) network input placed in a map of the whole tile at the
    same stride; the rest of the tile is 0 (not looked at)."""
    stride = max(1, round(padded[0] / heat.shape[0]))
    x0, y0, x1, y1 = crop
    out = np.zeros((-(-height // stride), -(-width // stride)), np.float32)
    h = min(heat.shape[0], -(-(y1 - y0) // stride), out.shape[0] - y0 // stride)
    w = min(heat.shape[1], -(-(x1 - x0) // stride), out.shape[1] - x0 // stride)
    out[y0 // stride:y0 // stride + h, x0 // stride:x0 // stride + w] = heat[:h, :w]
    return out


def query_heatmaps(levels, n: int) -> list[np.ndarray | None]:
    """Per image: sigmoid query scores on the densely computed query level, if there is one."""
    for lv in sorted(levels, key=lambda o: o.level):
        if lv.query is not None and lv.is_dense:
            _, h, w = lv.shape
            q = torch.sigmoid(lv.query.float()).view(n, h, w).cpu().numpy()
            return list(q)
    return [None] * n


class Overview:
    """A downsampled picture of a raster with its detections and query heatmap (--save-vis)."""

    MAX_BOXES = 200_000

    def __init__(self, src: RasterSource, max_side: int = 2048) -> None:
        self.pixels, self.scale = src.overview(max_side)
        self.heat = np.zeros(self.pixels.shape[:2], np.float32)
        self.boxes: list[np.ndarray] = []
        self.count = 0

    def add_heat(self, tile: Tile, heat: np.ndarray | None) -> None:
        if heat is None:
            return
        from PIL import Image

        x1, y1 = int(tile.x / self.scale), int(tile.y / self.scale)
        w = max(1, int(tile.width / self.scale))
        h = max(1, int(tile.height / self.scale))
        img = Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        patch = np.asarray(img, np.float32) / 255
        region = self.heat[y1:y1 + h, x1:x1 + w]
        region[...] = np.maximum(region, patch[:region.shape[0], :region.shape[1]])

    def add_boxes(self, dets: Detections) -> None:
        if self.count < self.MAX_BOXES:
            self.boxes.append(np.column_stack([dets.boxes / self.scale, dets.labels]))
            self.count += len(dets)

    def save(self, path: Path, names: list[str]) -> None:
        from PIL import Image, ImageDraw

        from ..outputs.drawing import PALETTE

        base = self.pixels.astype(np.float32)
        red = np.zeros_like(base)
        red[..., 0] = 255
        alpha = (self.heat * 0.5)[..., None]
        img = Image.fromarray((base * (1 - alpha) + red * alpha).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for part in self.boxes:
            for x1, y1, x2, y2, label in part:
                draw.rectangle([x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)],
                               outline=PALETTE[int(label) % len(PALETTE)])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        img.save(tmp)
        os.replace(tmp, path)
