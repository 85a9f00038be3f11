"""Writes sample_scene.png: a 512x512 synthetic aerial scene (ground, a road, small cars, trees).

Deterministic (seed 0). It is the input of `make demo` until the trained sample model and the
GeoTIFF scene of the training issue land here.  Run: python sample_data/make_sample.py
"""

from pathlib import Path

import numpy as np
from PIL import Image


def make_scene(size: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ground = np.array([96, 110, 70], float) + rng.normal(0, 12, (size, size, 3))
    img = ground
    yy, xx = np.mgrid[0:size, 0:size]
    road = np.abs(yy - (0.35 * xx + 150)) < 14  # a diagonal road
    img[road] = np.array([120, 120, 124]) + rng.normal(0, 5, (road.sum(), 3))
    for _ in range(40):  # trees: dark green discs
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(5, 12))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[disc & ~road] = np.array([40, 75, 35]) + rng.normal(0, 6, ((disc & ~road).sum(), 3))
    for _ in range(30):  # cars along the road: small bright rectangles
        x = int(rng.integers(10, size - 20))
        y = int(0.35 * x + 150 + rng.integers(-10, 10))
        w, h = int(rng.integers(6, 14)), int(rng.integers(4, 8))
        color = rng.choice([[200, 30, 30], [230, 230, 230], [20, 20, 25], [40, 70, 180]])
        img[max(y, 0):y + h, x:x + w] = color
    return np.clip(img, 0, 255).astype(np.uint8)


if __name__ == "__main__":
    out = Path(__file__).with_name("sample_scene.png")
    Image.fromarray(make_scene()).save(out)
    print(out)
