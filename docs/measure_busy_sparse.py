"""Is exact sparse P2 cheaper than dense on a busy tile? (README, "Where a busy tile's time goes")

    python docs/measure_busy_sparse.py busy_8192.tif [--precision bf16] [--rounds 3]

In process, the bundled model, 2304 px windows of RASTER. For each window: how much of P3 and P2
the CSQ keys cover, the exact plan's share of the dense multiply-adds, the share of the map that
blocks of 8 / 16 / 32 / 64 positions holding a key cover and what computing those blocks densely
(with the halo five 3x3 layers need) costs against dense; then, on the window at (2144, 2144),
the head and FPN seconds of each level with CSQ's busy-tile decision (default) and forced sparse
(`sparse_max_fraction=1`), `--rounds` times.
"""

import argparse
import time

import numpy as np
import torch
from torch.nn import functional as F

import querydet_models.query.query_infer as query_infer
from querydet_cli.runtimes.loading import load_model
from querydet_cli.reading.raster import RasterSource
from querydet_cli.core.resources import sample_model
from querydet_models.layers.sparse import TowerPlan

TILE, DEPTH = 2304, 5
WINDOWS = [(0, 0), (2144, 2144), (4288, 2144), (2144, 4288)]


def window(src: RasterSource, x: int, y: int) -> torch.Tensor:
    pixels, _ = src.read(x, y, TILE, TILE)
    return torch.from_numpy(pixels)  # (3, H, W)


def key_sets(model, image: torch.Tensor, precision: str) -> list[tuple[int, tuple, torch.Tensor]]:
    """(level, shape, keys) of every level CSQ runs sparsely when forced to."""
    seen = []
    real = query_infer.QueryInference._sparse_level

    def spy(self, level, features, keys, with_query):
        seen.append((level, features.shape(level), keys.clone()))
        return real(self, level, features, keys, with_query)

    query_infer.QueryInference._sparse_level = spy
    try:
        with model.compute(precision):
            batch, _ = model.preprocess([image])
            model.predict_levels(model.extract_features(batch), sparse_max_fraction=1.0)
    finally:
        query_infer.QueryInference._sparse_level = real
    return seen


def cover_report(level: int, shape: tuple, keys: torch.Tensor) -> str:
    n, h, w = shape
    hit = torch.zeros(n * h * w)
    hit[keys] = 1.0
    hit = hit.view(n, 1, h, w)
    plan = TowerPlan.exact(keys, shape, DEPTH)
    parts = [f"P{level}: keys {keys.numel() / (n * h * w):.2f} of the map, exact plan "
             f"{plan.positions_computed() / (DEPTH * n * h * w):.2f} of dense"]
    for block in (8, 16, 32, 64):
        active = float(F.max_pool2d(hit, block, block, ceil_mode=True).mean())
        halo = sum((block + 2 * j) ** 2 for j in range(DEPTH)) / (DEPTH * block * block)
        parts.append(f"{block}-blocks {active:.2f} (cost {active * halo:.2f})")
    return ", ".join(parts)


def level_seconds(model, image: torch.Tensor, precision: str, fraction: float | None) -> str:
    with model.compute(precision):
        batch, _ = model.preprocess([image])
        features = model.extract_features(batch)
        start = time.perf_counter()
        outs = model.predict_levels(features, sparse_max_fraction=fraction)
        total = time.perf_counter() - start
    levels = " ".join(f"P{o.level} {o.seconds:.3f}+{o.fpn_seconds:.3f}" for o in outs[:2])
    return f"{total:.3f} s ({levels} s heads+FPN)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raster")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    model, _ = load_model(sample_model())
    src = RasterSource(a.raster)
    for x, y in WINDOWS:
        image = window(src, x, y)
        for level, shape, keys in key_sets(model, image, a.precision):
            print(f"window ({x}, {y}) {cover_report(level, shape, keys)}")
    image = window(src, 2144, 2144)
    for r in range(a.rounds):
        print(f"round {r + 1}: decided {level_seconds(model, image, a.precision, None)}; "
              f"forced sparse {level_seconds(model, image, a.precision, 1.0)}")


if __name__ == "__main__":
    main()
