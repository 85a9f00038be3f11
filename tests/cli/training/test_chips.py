import json

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from querydet_cli.training.chips import clip_boxes, quadrant_windows, sliding_windows, Window, cut_chips
from querydet_cli.training.datasets import Sample, load_coco
from querydet_cli.core.errors import QueryDetError


def test_quadrants_cover_the_image_once():
    wins = quadrant_windows(101, 51)
    assert [(w.x, w.y, w.width, w.height) for w in wins] == [
        (0, 0, 50, 25), (50, 0, 51, 25), (0, 25, 50, 26), (50, 25, 51, 26)]


def test_sliding_windows_overlap_and_reach_the_edges():
    wins = sliding_windows(1000, 300, 400, 100)  # overlap in pixels, as detect's
    xs = sorted({w.x for w in wins})
    assert xs == [0, 300, 600]  # stride 300; last window flush with the right edge
    assert all(w.x + w.width <= 1000 for w in wins)
    assert max(w.x + w.width for w in wins) == 1000
    assert {w.height for w in wins} == {300}  # the image is shorter than a chip
    with pytest.raises(QueryDetError, match="--overlap .30. must be at most half of --size"):
        sliding_windows(100, 100, 50, 30)


def test_default_chip_overlap_is_a_fifth_of_the_chip_in_pixels():
    from querydet_cli.training.chips import default_overlap

    assert default_overlap(512) == 102 and default_overlap(128) == 26
    # the stride the old fraction 0.2 gave, round(size * 0.8), at every size
    for size in range(32, 2049):
        assert size - default_overlap(size) == round(size * 0.8)


def test_clip_boxes_visible_fraction():
    boxes = np.array([[90, 10, 110, 20],   # half visible in a 100-wide window
                      [95, 30, 105, 40],   # half
                      [10, 10, 20, 20],    # fully inside
                      [150, 10, 160, 20]], np.float32)  # outside
    kept, idx, partial = clip_boxes(boxes, Window(0, 0, 100, 100), min_visible=0.6)
    assert idx.tolist() == [2]
    assert len(partial) == 2 and partial[0].tolist() == [90, 10, 100, 20]
    kept, idx, _ = clip_boxes(boxes, Window(0, 0, 100, 100), min_visible=0.5)
    assert idx.tolist() == [0, 1, 2] and kept[0].tolist() == [90, 10, 100, 20]
    kept, idx, _ = clip_boxes(boxes, Window(50, 0, 100, 100), min_visible=0.5)
    assert idx.tolist() == [0, 1]  # the window covers x 50..150; box 3 starts at 150
    assert kept[0].tolist() == [40, 10, 60, 20]  # shifted into chip coordinates


def test_geotiff_chips_keep_georeference(tmp_path):
    src_path = tmp_path / "big.tif"
    transform = from_origin(1000.0, 2000.0, 0.5, 0.5)
    data = np.random.default_rng(0).integers(0, 255, (3, 300, 400), dtype=np.uint8)
    with rasterio.open(src_path, "w", driver="GTiff", width=400, height=300, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=transform) as dst:
        dst.write(data)
    sample = Sample(src_path, np.array([[210, 110, 230, 120]], np.float32), np.array([0]),
                    width=400, height=300)
    ann = cut_chips([sample], ["car"], tmp_path / "chips", size=200, overlap=0)
    samples, names, problems = load_coco(ann)
    coco = json.loads(ann.read_text())
    chip = next(im for im in coco["images"] if im["window"] == [200, 100, 200, 200])
    with rasterio.open(tmp_path / "chips" / "images" / chip["file_name"]) as c:
        assert c.crs.to_string() == "EPSG:32633"
        # chip pixel (0, 0) is source pixel (200, 100): x = 1000 + 200 * 0.5, y = 2000 - 100 * 0.5
        assert c.xy(0, 0, offset="ul") == pytest.approx((1100.0, 1950.0))
        assert np.array_equal(c.read(), data[:, 100:300, 200:400])
    box = next(a for a in coco["annotations"] if a["image_id"] == chip["id"])
    assert box["bbox"] == [10.0, 10.0, 20.0, 10.0]


def test_plain_image_chips_are_png(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    sample = Sample(tmp_path / "a.png", np.array([[5, 5, 15, 15]], np.float32), np.array([0]),
                    width=64, height=64)
    ann = cut_chips([sample], ["x"], tmp_path / "out", quadrants=True)
    coco = json.loads(ann.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["a_0_0000.png"]
