"""Would cutting a collar tile's data rectangle in two save backbone work? (README, busy-tile list)

    python docs/measure_collar_split.py survey_8192.tif [--tile-size 2304] [--overlap 128]

For each tile of detect's plan that holds data: the pixels of its data rectangle (what `detect`
computes, aligned to the model's 32 px) against the best single cut across rows or columns into
two rectangles that overlap by --overlap, each around its own data. Prints the totals.
"""

import argparse

import numpy as np

from querydet_cli.pipeline.producer import data_window
from querydet_cli.reading.raster import RasterSource
from querydet_cli.pipeline.tiling import make_tiles

ALIGN = 32


def best_cut(valid: np.ndarray, overlap: int) -> int:
    """Pixels of the two aligned rectangles of the best cut (or of the one rectangle)."""
    x0, y0, x1, y1 = data_window(valid, ALIGN)
    best = (x1 - x0) * (y1 - y0)
    for grid in (valid, valid.T):  # cuts across rows, then across columns
        rows = grid.any(axis=1)
        first = np.where(rows, grid.argmax(axis=1), grid.shape[1])
        last = np.where(rows, grid.shape[1] - 1 - grid[:, ::-1].argmax(axis=1), -1)
        found = np.flatnonzero(rows)
        top, bottom = found[0] // ALIGN * ALIGN, found[-1] + 1

        def area(a: int, b: int) -> int:
            lo, hi = first[a:b].min(), last[a:b].max()
            if hi < 0:
                return 0
            lo = lo // ALIGN * ALIGN
            width = min(-(-(hi + 1 - lo) // ALIGN) * ALIGN, grid.shape[1] - lo)
            return width * -(-(b - a) // ALIGN) * ALIGN

        for cut in range(top + ALIGN, bottom, ALIGN):
            pieces = (area(top, min(bottom, cut + overlap // 2))
                      + area(max(top, cut - overlap // 2), bottom))
            best = min(best, pieces)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raster")
    p.add_argument("--tile-size", type=int, default=2304)
    p.add_argument("--overlap", type=int, default=128)
    a = p.parse_args()
    src = RasterSource(a.raster)
    data = whole = cut = 0
    for t in make_tiles(src.width, src.height, a.tile_size, a.overlap, ALIGN):
        _, valid = src.read(t.x, t.y, t.width, t.height)
        if not valid.any():
            continue
        x0, y0, x1, y1 = data_window(valid, ALIGN)
        data += int(valid.sum())
        whole += (x1 - x0) * (y1 - y0)
        cut += best_cut(valid, a.overlap)
    print(f"{a.raster}: data {data / 1e6:.1f} Mpx; data rectangles {whole / 1e6:.1f} Mpx; "
          f"best cut in two {cut / 1e6:.1f} Mpx ({1 - cut / whole:.1%} fewer)")


if __name__ == "__main__":
    main()
