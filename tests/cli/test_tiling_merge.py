import numpy as np
import pytest

from querydet_cli.core.errors import QueryDetError
from querydet_cli.pipeline.merge import TileMerger
from querydet_cli.pipeline.tiling import make_tiles


@pytest.mark.parametrize("w,h,size,overlap", [(1000, 700, 256, 64), (300, 300, 512, 64),
                                              (513, 257, 256, 32)])
def test_cores_partition_the_raster(w, h, size, overlap):
    tiles = make_tiles(w, h, size, overlap)
    owner = np.zeros((h, w), int)
    for t in tiles:
        x1, y1, x2, y2 = t.core
        assert t.x <= x1 < x2 <= t.x + t.width and t.y <= y1 < y2 <= t.y + t.height
        owner[y1:y2, x1:x2] += 1
    assert (owner == 1).all()
    covered = np.zeros((h, w), int)
    for t in tiles:
        covered[t.y:t.y + t.height, t.x:t.x + t.width] += 1
        ex1, ey1, ex2, ey2 = t.exclusive
        if ex2 > ex1 and ey2 > ey1:
            assert (covered[ey1:ey2, ex1:ex2] >= 1).all()
    assert (covered >= 1).all()


def _shifted_plan_pixels(length, size, overlap):
    """Pixels one axis costs with fixed-size tiles, the last moved back to the edge (SAHI)."""
    if length <= size:
        return length
    starts = list(range(0, length - size + 1, size - overlap))
    return size * (len(starts) + (starts[-1] + size < length))


@pytest.mark.parametrize("length,size,overlap,align", [
    (4096, 1024, 128, 32), (8192, 1024, 128, 32), (5000, 1000, 100, 32), (1025, 1024, 128, 32),
    (2000, 1024, 0, 32), (700, 256, 64, 1), (10000, 512, 256, 32), (1000, 1000, 0, 32)])
def test_tiles_are_even_and_never_cost_more_than_fixed_ones(length, size, overlap, align):
    tiles = make_tiles(length, 64, size, overlap, align)
    xs = [t.x for t in tiles]
    extents = {t.width for t in tiles}
    assert len(extents) == 1 and max(extents) <= size
    extent = extents.pop()
    assert xs[0] == 0 and xs[-1] + extent == length
    assert all(extent - (b - a) >= overlap for a, b in zip(xs, xs[1:]))  # at least the overlap
    assert extent % align == 0 or extent == size or len(tiles) == 1
    # the same number of tiles as fixed-size ones, never more pixels
    assert len(tiles) * extent <= _shifted_plan_pixels(length, size, overlap)
    assert len(tiles) == -(-_shifted_plan_pixels(length, size, overlap) // min(size, length))


def test_a_4096_axis_takes_five_928_pixel_tiles():
    tiles = make_tiles(4096, 4096, 1024, 128, align=32)
    assert len(tiles) == 25 and {(t.width, t.height) for t in tiles} == {(928, 928)}
    assert sorted({t.x for t in tiles}) == [0, 792, 1584, 2376, 3168]


def test_bad_tile_geometry_refused():
    with pytest.raises(QueryDetError):
        make_tiles(100, 100, 16, 0)
    with pytest.raises(QueryDetError):
        make_tiles(100, 100, 64, 64)


def _add(m, tile, boxes, cut, labels=None):
    boxes = np.array(boxes, float).reshape(-1, 4)
    n = len(boxes)
    labels = np.zeros(n, np.int64) if labels is None else np.array(labels)
    return m.add(tile, boxes, np.full(n, 0.8), labels, np.array(cut, bool), np.zeros(n, bool))


def test_duplicate_views_become_one():
    m = TileMerger()
    _add(m, 0, [[100, 10, 110, 20]], [False])
    _add(m, 1, [[100.5, 10, 110.5, 20]], [False])
    out = m.release()
    assert len(out) == 1 and m.pending == 0


def test_fragments_become_the_full_extent():
    m = TileMerger()
    _add(m, 0, [[80, 10, 128, 30]], [True])  # cut by tile 0's right edge at 128
    _add(m, 1, [[96, 10, 140, 30]], [True])  # cut by tile 1's left edge at 96
    out = m.release()
    assert len(out) == 1 and out.boxes[0].tolist() == [80, 10, 140, 30]


def test_complete_view_beats_fragment():
    m = TileMerger()
    _add(m, 0, [[100, 10, 128, 30]], [True])
    _add(m, 1, [[100, 10, 120.5, 30]], [False])
    _add(m, 1, [[100, 10, 121, 30]], [False])  # same tile: never merged with its neighbour
    out = m.release()
    assert len(out) == 2
    assert sorted(out.boxes[:, 2].tolist()) == [120.5, 121]


def test_neighbours_and_classes_stay_apart():
    m = TileMerger()
    _add(m, 0, [[100, 10, 110, 20], [112, 10, 122, 20]], [False, False])
    _add(m, 1, [[100, 10, 110, 20], [112, 10, 122, 20]], [False, False], labels=[1, 0])
    out = m.release()
    assert len(out) == 3  # box 1 merged (class 0 twice); the class-1 view of box 0 stays


def test_release_holds_clusters_reaching_the_next_row():
    m = TileMerger()
    _add(m, 0, [[10, 10, 20, 20], [10, 90, 20, 110]], [False, True])
    out = m.release(below_y=100)
    assert len(out) == 1 and m.pending == 1
    out = m.release()
    assert len(out) == 1 and m.pending == 0


def test_no_seam_duplicates_with_objects_across_every_seam(tmp_path):
    """Objects on every vertical and horizontal seam and on every tile corner of a 4 x 4 tile
    grid: each is reported exactly once, with its full box."""
    import json

    import torch
    from rasterio.transform import Affine

    from querydet_cli.core.config import Config
    from querydet_cli.pipeline.detect import DetectOptions, run_detect
    from tests.cli.oracle import OracleModel, paint, read_ndjson, write_tif

    # 128 px tiles overlapping by 32 on 416 px: seams (overlap zones) at 96..128, 192..224, 288..320
    seams = (112, 208, 304)
    objects = []
    for s in seams:  # across each vertical and horizontal seam, away from the others
        for t in (40, 160, 256, 370):
            objects.append((s - 18, t - 8, s + 18, t + 8))
            objects.append((t - 8, s - 18, t + 8, s + 18))
        for s2 in seams:  # on each tile corner
            objects.append((s - 14, s2 - 14, s + 14, s2 + 14))
    objects = sorted(set(objects))
    # paint gives each object its own id (1..255) in band 1: keep them apart (no overlaps)
    path = write_tif(tmp_path / "seams.tif", paint(416, 416, objects), Affine(1, 0, 0, 0, -1, 0))
    out = tmp_path / "o.ndjson"
    run_detect(OracleModel(), Config(), [str(path)], str(out), "ndjson",
               DetectOptions(tile_size=128, overlap=32, batch_size=2), torch.device("cpu"))
    found = sorted(tuple(r["bbox"]) for r in read_ndjson(out))
    assert found == sorted(tuple(float(v) for v in o) for o in objects)


def test_data_window_is_the_aligned_rectangle_around_valid_pixels():
    from querydet_cli.pipeline.producer import data_window

    valid = np.zeros((100, 90), bool)
    valid[37:41, 50:52] = True
    assert data_window(valid) == (50, 37, 52, 41)
    assert data_window(valid, 32) == (32, 32, 64, 64)  # start down, size up to multiples of 32
    valid[99, 89] = True
    assert data_window(valid, 32) == (32, 32, 90, 100)  # clipped to the tile
    assert data_window(np.zeros((100, 90), bool), 32) == (0, 0, 90, 100)


def test_a_nodata_collar_is_not_computed_and_boxes_stay_in_place(tmp_path):
    """Tiles are cropped to the rectangle around their data before the network: on a raster
    whose data is a window inside a nodata collar, fewer pixels are computed, and every object
    (on seams and tile corners too) is still found once with its exact box."""
    import torch
    from rasterio.transform import Affine

    from querydet_cli.core.config import Config
    from querydet_cli.pipeline.detect import DetectOptions, run_detect
    from tests.cli.oracle import OracleModel, paint, read_ndjson, write_tif

    objects = [(150, 60, 170, 75), (205, 100, 230, 120), (300, 200, 318, 230), (110, 90, 130, 104),
               (190, 200, 230, 226), (350, 120, 372, 140), (270, 265, 300, 282)]
    data = paint(416, 416, objects)
    collar = np.ones((416, 416), bool)
    collar[45:300, 101:390] = False  # data only here
    data[:, collar] = 255  # nodata in every band
    path = write_tif(tmp_path / "collar.tif", data, Affine(1, 0, 0, 0, -1, 0), nodata=255)
    out = tmp_path / "o.ndjson"
    summary = run_detect(OracleModel(), Config(), [str(path)], str(out), "ndjson",
                         DetectOptions(tile_size=128, overlap=32), torch.device("cpu"))
    found = sorted(tuple(r["bbox"]) for r in read_ndjson(out))
    assert found == sorted(tuple(float(v) for v in o) for o in objects)
    assert summary.profile["computed_pixel_share"] < 0.8


def test_nested_duplicates_in_a_tile_are_dropped_by_ios():
    from querydet_cli.pipeline.merge import suppress_nested

    boxes = np.array([[0, 0, 80, 110], [5, 0, 70, 70],  # a building and a partial box inside it
                      [200, 200, 205, 205], [201, 201, 206, 206],  # a 5 px object seen twice
                      [300, 300, 305, 305], [303, 300, 308, 305],  # two 5 px objects side by side
                      [10, 10, 60, 60]], float)  # inside the building, but another class
    scores = np.array([0.9, 0.5, 0.45, 0.4, 0.8, 0.7, 0.3])
    labels = np.array([1, 1, 0, 0, 0, 0, 2])
    keep = suppress_nested(boxes, scores, labels, 0.5)
    assert keep.tolist() == [True, False, True, False, True, True, True]
    # the better box stays whichever comes first
    order = np.arange(7)[::-1]
    assert suppress_nested(boxes[order], scores[order], labels[order], 0.5).tolist() == \
        keep[order].tolist()


def test_a_cropped_tiles_heatmap_lands_where_its_pixels_are():
    from querydet_cli.pipeline.overview import heat_in_tile as _heat_in_tile

    heat = np.ones((6, 6), np.float32)  # stride 16 over a 96 x 96 crop
    out = _heat_in_tile(heat, (96, 96), (64, 32, 160, 128), 256, 256)
    assert out.shape == (16, 16)
    expected = np.zeros((16, 16), np.float32)
    expected[2:8, 4:10] = 1
    assert (out == expected).all()


def test_one_overlap_rule_in_pixels_for_every_door(tmp_path):
    """detect, bench-detect, tile and the Python API refuse an overlap over half a tile with
    the same sentence (each naming its own options), before anything is created."""
    from typer.testing import CliRunner

    from querydet_cli.api import Detector
    from querydet_cli.core.config import Config
    from querydet_cli.app import app
    from querydet_cli.core.errors import QueryDetError
    from querydet_cli.core.resources import sample_scene

    from .oracle import OracleModel

    scene = str(sample_scene())
    doors = {
        "detect": (["detect", scene, "-o", str(tmp_path / "d" / "o.geojson"), "--tile-size", "256",
                    "--overlap", "129"], "--overlap (129) must be at most half of --tile-size (256)"),
        "bench-detect": (["bench-detect", "--sizes", "", "--tile-size", "256", "--overlap", "129",
                          "--workdir", str(tmp_path / "b")],
                         "--overlap (129) must be at most half of --tile-size (256)"),
        "tile": (["tile", scene, "--labels", scene, "--size", "256", "--overlap", "129", "--out",
                  str(tmp_path / "t")], "--overlap (129) must be at most half of --size (256)"),
    }
    for name, (args, words) in doors.items():
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, QueryDetError), (name, result.output)
        assert words in str(result.exception), (name, str(result.exception))
    # tile's overlap was a fraction before: one is now refused as a usage error (exit 2)
    result = CliRunner().invoke(app, ["tile", scene, "--labels", scene, "--overlap", "0.2",
                                      "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "'--overlap'" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing created by any of them
    detector = Detector.from_model(OracleModel(), Config(), tile_size=256, overlap=129)
    with pytest.raises(QueryDetError, match=r"overlap \(129\) must be at most half of tile_size"):
        detector.detect(np.zeros((300, 300, 3), np.uint8))
