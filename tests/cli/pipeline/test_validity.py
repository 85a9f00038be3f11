"""The valid masks that travel with each tile's detections: the consumer checks a fused box's
centre against them, never against the raster's pixels, and a resumed run answers as the
uninterrupted one did."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from querydet_cli.core.config import Config
from querydet_cli.pipeline.detect import TileConsumer
from querydet_cli.pipeline.options import DetectOptions
from querydet_cli.pipeline.producer import TileDetections
from querydet_cli.pipeline.profile import Profile
from querydet_cli.reading.raster import RasterSource
from querydet_cli.pipeline.tiling import make_tiles
from querydet_cli.pipeline.validity import NO_DATA, TileValidity, pack_valid, unpack_valid


@pytest.mark.parametrize("width", [1, 7, 8, 13, 1024])
def test_a_mask_travels_and_comes_back_bit_for_bit(width):
    rng = np.random.default_rng(width)
    valid = rng.random((9, width)) < 0.7
    valid[0, 0] = False  # never all valid
    packed = pack_valid(valid)
    assert isinstance(packed, bytes)
    assert np.array_equal(unpack_valid(packed, 9, width), valid)


def test_a_tile_full_of_data_sends_nothing():
    assert pack_valid(np.ones((64, 64), bool)) is None


def test_a_straight_collar_travels_in_few_bytes():
    valid = np.ones((1024, 1024), bool)
    valid[:, :300] = False
    assert len(pack_valid(valid)) < 2000  # against 1 MB unpacked


def test_validity_answers_from_the_tile_that_holds_the_pixel_and_forgets_rows_above():
    tiles = make_tiles(200, 200, 120, 40)
    held = TileValidity()
    mask = np.ones((tiles[0].height, tiles[0].width), bool)
    mask[5, 7] = False
    held.add(tiles[0], pack_valid(mask))
    held.add(tiles[1], None)  # full of data: nothing held
    held.add(tiles[2], NO_DATA)
    assert not held.valid_at(7, 5) and held.valid_at(8, 5)
    t2 = tiles[2]
    assert not held.valid_at(t2.x + 1, t2.y + t2.height - 1)
    again = TileValidity()
    again.restore(held.snapshot(), tiles)
    assert not again.valid_at(7, 5) and again.valid_at(8, 5)
    held.forget_above(tiles[0].y + tiles[0].height)
    assert held.valid_at(7, 5)  # no longer held: not reachable by any pending detection


def _raster(path, width, height):
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3,
                       dtype="uint8", crs="EPSG:32617", transform=from_origin(0, 0, 0.3, 0.3)) as dst:
        dst.write(np.full((3, height, width), 100, np.uint8))
    return path


def _found(tile, boxes, cut, valid):
    boxes = np.array(boxes, np.float64).reshape(-1, 4)
    n = len(boxes)
    return TileDetections(boxes, np.full(n, 0.9), np.zeros(n, np.int64), np.array(cut, bool),
                          np.zeros(n, bool), valid)


def _run(src, tiles, results, state, saved):
    consumer = TileConsumer(Config(), DetectOptions(), Profile())
    records = []
    consumer.run(src, 1, records.extend, saved.append, state, iter(results), tiles)
    return records


@pytest.mark.parametrize("hole", [True, False])
def test_a_fused_box_centred_on_nodata_is_dropped_from_the_tiles_masks_alone(tmp_path, hole,
                                                                              monkeypatch):
    """An object cut by the seam between tile rows 0 and 1: its fused box's centre lies where
    only row 0's tiles reach. With a hole in the mask there, the box is dropped; the raster's
    pixels are never read (they are all valid, and reading them fails here)."""
    tiles = make_tiles(120, 200, 120, 40)  # one column, two rows
    assert [t.row for t in tiles] == [0, 1]
    top, bottom = tiles
    src = RasterSource(str(_raster(tmp_path / "r.tif", 120, 200)))
    monkeypatch.setattr(RasterSource, "read", lambda *a, **k: pytest.fail("consumer read pixels"))
    a = [30, 20, 60, top.height]  # cut by row 0's bottom edge
    b = [30, bottom.y, 60, bottom.y + 6]  # cut by row 1's top edge
    cx, cy = 45, int((a[1] + max(a[3], b[3])) / 2)  # the centre of the union
    assert cy < bottom.y  # only row 0 reaches the centre
    mask = np.ones((top.height, top.width), bool)
    if hole:
        mask[cy, cx] = False
    results = [(top, _found(top, a, [True], pack_valid(mask)), None),
               (bottom, _found(bottom, b, [True], None), None)]
    saved = []
    whole = _run(src, tiles, results, {}, saved)
    assert len(whole) == (0 if hole else 1)
    # interrupted after row 0: the checkpoint carries the pending fragment and row 0's mask
    first = saved[0]
    assert first["rows_done"] == 1 and first["pending"]["boxes"]
    assert bool(first["masks"]) == hole
    resumed = _run(src, tiles, results[1:], first, [])  # the whole plan, row 1 produced
    assert resumed == whole
    src.close()
