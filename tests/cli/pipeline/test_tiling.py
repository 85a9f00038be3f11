import numpy as np
import pytest

from querydet_cli.core.errors import QueryDetError
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


def test_one_overlap_rule_in_pixels_for_every_door(tmp_path):
    """detect, bench-detect, tile and the Python API refuse an overlap over half a tile with
    the same sentence (each naming its own options), before anything is created."""
    from typer.testing import CliRunner

    from querydet_cli.api import Detector
    from querydet_cli.core.config import Config
    from querydet_cli.app import app
    from querydet_cli.core.errors import QueryDetError
    from querydet_cli.core.resources import sample_scene

    from tests.cli.oracle import OracleModel

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
