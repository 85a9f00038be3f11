"""Where a raster has data, as it travels from the producer to the consumer.

The producer reads each tile's pixels and knows which of them are valid (nodata, alpha, masks,
NaN). It drops a detection centred on nodata itself, but a box fused from fragments of several
tiles only exists after the consumer's merge, and its centre must be checked too. So each tile's
valid mask travels with its detections: nothing for a tile full of data, else the mask packed
to bits and deflated (a footprint's straight collar shrinks to a few hundred bytes). The
consumer keeps the masks of the tiles that a pending detection can still reach, and saves them
with the journal's checkpoint, so a resumed run answers as the uninterrupted one did; it never
reads pixels.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

from .tiling import Tile

NO_DATA = "none"  # a tile without one valid pixel


def pack_valid(valid: np.ndarray) -> bytes | None:
    """A tile's (h, w) valid mask as it travels: None when every pixel is valid, else its bits
    deflated."""
    if valid.all():
        return None
    return zlib.compress(np.packbits(valid, axis=1).tobytes(), 1)


def unpack_valid(packed: bytes, height: int, width: int) -> np.ndarray:
    """`pack_valid`'s (h, w) bool mask back."""
    bits = np.frombuffer(zlib.decompress(packed), np.uint8).reshape(height, -(-width // 8))
    return np.unpackbits(bits, axis=1, count=width).astype(bool)


class TileValidity:
    """The consumer's view of where an input has data: the masks of tiles that are not full of
    data, kept while a pending detection can still reach them. A tile not held is full of data
    (or no longer reachable)."""

    def __init__(self) -> None:
        self._tiles: dict[int, tuple[Tile, bytes | str]] = {}

    def add(self, tile: Tile, packed: bytes | str | None) -> None:
        """A tile's mask as the producer sent it (`pack_valid`), or `NO_DATA`."""
        if packed is not None:
            self._tiles[tile.index] = (tile, packed)

    def valid_at(self, x: int, y: int) -> bool:
        """Whether pixel (x, y) holds data, by the first held tile that contains it."""
        for tile, packed in self._tiles.values():
            if tile.x <= x < tile.x + tile.width and tile.y <= y < tile.y + tile.height:
                if packed == NO_DATA:
                    return False
                mask = unpack_valid(packed, tile.height, tile.width)
                return bool(mask[y - tile.y, x - tile.x])
        return True

    def forget_above(self, y: float) -> None:
        """Drop the tiles that end at or above pixel row `y` (no pending detection reaches
        them)."""
        self._tiles = {i: (t, p) for i, (t, p) in self._tiles.items() if t.y + t.height > y}

    def snapshot(self) -> dict[str, str]:
        """The held masks as text, for the journal: tile index -> base64 or `NO_DATA`."""
        return {str(i): p if p == NO_DATA else base64.b64encode(p).decode("ascii")
                for i, (_, p) in self._tiles.items()}

    def restore(self, snap: dict[str, Any], tiles: list[Tile]) -> None:
        """`snapshot`'s masks back, for the tiles of the input's plan `tiles`."""
        by_index = {t.index: t for t in tiles}
        for key, text in snap.items():
            self._tiles[int(key)] = (by_index[int(key)],
                                     text if text == NO_DATA else base64.b64decode(text))
