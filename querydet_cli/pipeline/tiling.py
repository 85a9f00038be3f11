"""Tiles over a large raster, each with the core region it owns: detect's tiles and, as fixed
windows (`even=False`), `querydet tile`'s training chips. One plan, one rule (`check_plan`), one
unit: pixels.

Tiles of at most `size` pixels overlap their neighbours by at least `overlap` pixels. Along each
axis the fewest tiles that can do so are spread evenly, all of one extent, the smallest multiple
of `align` (the model's size divisibility) that covers the axis: no tile reaches past the edge
and none is shifted back over its neighbour, so no pixel is computed more often than the overlap
asks. (Fixed-size tiles with the last one moved back to the edge, as SAHI slices, compute a
4096-pixel axis as 5 x 1024 = 5120 pixels; these tiles compute it as 5 x 928 = 4640.)

A tile's core is its area minus half the overlap on each inner side, so the cores partition the
raster: every pixel lies in exactly one core. An object no larger than half the overlap whose centre lies in a tile's core
is seen whole by that tile. Larger objects are cut and repaired by the cross-tile merge.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import QueryDetError

# part of a --resume journal's key: a journal written under another tile plan is not continued
TILING_VERSION = 2


@dataclass(frozen=True)
class Tile:
    index: int
    row: int  # tile row, for incremental finalisation
    x: int
    y: int
    width: int
    height: int
    core: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive) in raster pixels
    exclusive: tuple[int, int, int, int]  # the part no other tile covers (may be empty)

    def inner_edges(self, raster_width: int, raster_height: int) -> tuple[bool, bool, bool, bool]:
        """Which sides (left, top, right, bottom) border another tile rather than the raster edge."""
        return (self.x > 0, self.y > 0, self.x + self.width < raster_width,
                self.y + self.height < raster_height)


def check_plan(size: int, overlap: int, size_option: str = "--tile-size",
               overlap_option: str = "--overlap") -> None:
    """The one rule for a tile (or chip) plan, in pixels: tiles of at least 32 pixels, neighbours
    overlapping by 0 to half a tile. Commands check it before anything is created; the option
    names are the caller's."""
    if size < 32:
        raise QueryDetError(f"{size_option} must be at least 32 pixels, got {size}")
    if overlap < 0 or overlap > size // 2:
        raise QueryDetError(f"{overlap_option} ({overlap}) must be at most half of {size_option} "
                            f"({size}) and not negative, in pixels")


# the smallest of the devices' default tile sides (CUDA's; the CPU's is 2304, producer.py): an
# overlap is checked against it when no tile size is given
SMALLEST_DEFAULT_TILE = 1024


def check_default_plan(size: int | None, overlap: int) -> None:
    """`check_plan` for a command whose `--tile-size` may be left to the device (None)."""
    if size is None and overlap > SMALLEST_DEFAULT_TILE // 2:
        raise QueryDetError(f"--overlap ({overlap}) above {SMALLEST_DEFAULT_TILE // 2} needs a "
                            "--tile-size of at least twice it (the default tile is "
                            f"{SMALLEST_DEFAULT_TILE} px on CUDA)")
    check_plan(size or SMALLEST_DEFAULT_TILE, overlap)


def _axis(length: int, size: int, overlap: int, align: int = 1, even: bool = True
          ) -> list[tuple[int, int, int, int, int, int]]:
    """(start, extent, core_start, core_end, exclusive_start, exclusive_end) along one axis."""
    if length <= size:
        return [(0, length, 0, length, 0, length)]
    if even:
        count = -(-(length - overlap) // (size - overlap))  # fewest tiles of `size` that cover
        # the smallest extent at which `count` tiles overlapping by `overlap` cover the axis
        extent = -(-(length + (count - 1) * overlap) // count)
        extent = min(size, -(-extent // align) * align)
        # even spacing; each step <= extent - overlap, since count * extent - (count - 1) *
        # overlap >= length, and the step is an integer
        starts = [i * (length - extent) // (count - 1) for i in range(count)]
    else:  # windows of `size` every size - overlap pixels, the last one flush with the edge
        extent = size
        starts = list(range(0, length - size + 1, size - overlap))
        if starts[-1] + size < length:
            starts.append(length - size)
    out = []
    for i, s in enumerate(starts):
        core_start = 0 if i == 0 else (s + starts[i - 1] + extent) // 2  # middle of the overlap
        core_end = length if i == len(starts) - 1 else (starts[i + 1] + s + extent) // 2
        excl_start = 0 if i == 0 else starts[i - 1] + extent
        excl_end = length if i == len(starts) - 1 else starts[i + 1]
        out.append((s, extent, core_start, core_end, excl_start, excl_end))
    return out


def make_tiles(width: int, height: int, size: int, overlap: int, align: int = 1,
               even: bool = True) -> list[Tile]:
    """Row-major tiles covering a width x height raster: at most `size` pixels a side, extents a
    multiple of `align` where possible, neighbours overlapping by at least `overlap` (pixels).
    `even=False`: fixed windows of `size` (training chips), the last of each axis moved back
    flush with the edge."""
    check_plan(size, overlap)
    cols = _axis(width, size, overlap, align, even)
    rows = _axis(height, size, overlap, align, even)
    tiles = []
    for r, (y, h, cy1, cy2, ey1, ey2) in enumerate(rows):
        for x, w, cx1, cx2, ex1, ex2 in cols:
            tiles.append(Tile(len(tiles), r, x, y, w, h, (cx1, cy1, cx2, cy2), (ex1, ey1, ex2, ey2)))
    return tiles


def row_starts(tiles: list[Tile]) -> dict[int, int]:
    """First pixel row of each tile row."""
    starts: dict[int, int] = {}
    for t in tiles:
        starts.setdefault(t.row, t.y)
    return starts
