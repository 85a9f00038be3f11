"""Tiles into batches for the model, and the results back in tile order.

A batch never spans two tile rows, nor two groups of `batch_size` tiles of a row: the batches
(and so the sums) are the same whichever row a run starts from (--resume, a Ray band), so every
way of running gives bit-identical detections. An all-nodata tile is not computed: it passes
through in its place.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import numpy as np

from .tiling import Tile

Item = tuple[Tile, np.ndarray, np.ndarray]  # a tile, its pixels and its valid mask


class TileBatcher:
    """Collects read tiles into batches, hands each full batch to `submit` (which returns its
    results, or a Future of them), and gives finished batches back in tile order."""

    def __init__(self, tiles: list[Tile], batch_size: int,
                 submit: Callable[[list[Item]], Any]) -> None:
        self.batch_size = batch_size
        self.submit = submit
        self.batch: list[Item] = []
        # in tile order: (items, their future or results), or ([(tile, None, None)], None) for
        # an all-nodata tile
        self.pending: deque = deque()
        self.row_first: dict[int, int] = {}
        for t in tiles:
            self.row_first.setdefault(t.row, t.index)

    def group(self, tile: Tile) -> tuple[int, int]:
        """The batch a tile belongs to: its row, and its group of `batch_size` in the row."""
        return tile.row, (tile.index - self.row_first[tile.row]) // self.batch_size

    def add(self, tile: Tile, pixels: np.ndarray | None, valid: np.ndarray) -> None:
        """A read tile (pixels None: all nodata)."""
        if self.batch and (pixels is None or self.group(self.batch[-1][0]) != self.group(tile)):
            self.flush()
        if pixels is None:
            self.pending.append(([(tile, None, None)], None))
            return
        self.batch.append((tile, pixels, valid))
        if len(self.batch) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Submit the batch being collected, if any."""
        if self.batch:
            items, self.batch = self.batch, []
            self.pending.append((items, self.submit(items)))

    def done(self, in_flight: int) -> Iterator[tuple[list[Item], Any]]:
        """Finished batches in tile order, (items, results; None for an all-nodata tile),
        until at most `in_flight` submitted ones are left (waiting for them as needed)."""
        while len(self.pending) > in_flight:
            items, work = self.pending.popleft()
            yield items, (work.result() if isinstance(work, Future) else work)
