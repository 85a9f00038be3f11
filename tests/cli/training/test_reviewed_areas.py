"""A corrected labels file (a `labels` layer and a `reviewed_areas` layer, as a person's review
on the map leaves it): `tile --labels` cuts chips only inside the reviewed areas, the empty ones
too, and nowhere else."""

import json
import subprocess
import sys

import geopandas as gpd
from rasterio.transform import Affine
from shapely.geometry import box

from tests.cli.oracle import paint, write_tif

# 400 x 300 px of 0.5 m from (1000, 2000): x 1000..1200, y 1850..2000 (EPSG:32617)
TRANSFORM = Affine(0.5, 0, 1000, 0, -0.5, 2000)


def _corrected(path, reviewed):
    labels = gpd.GeoDataFrame({"label": ["car", "car", "car"]},
                              geometry=[box(1010, 1980, 1020, 1990), box(1150, 1900, 1160, 1910),
                                        box(1060, 1870, 1070, 1880)], crs="EPSG:32617")
    labels.to_file(path, layer="labels", driver="GPKG")
    if reviewed:
        areas = gpd.GeoDataFrame({"note": ["west half"]}, geometry=[box(1000, 1850, 1100, 2000)],
                                 crs="EPSG:32617").to_crs("EPSG:4326")  # any CRS
        areas.to_file(path, layer="reviewed_areas", driver="GPKG")
    return path


def _tile(tmp_path, labels, out):
    raster = write_tif(tmp_path / "site.tif", paint(400, 300, []), TRANSFORM, crs="EPSG:32617")
    run = subprocess.run([sys.executable, "-m", "querydet_cli", "tile", raster, "--labels",
                          labels, "--size", "100", "--overlap", "0", "--out", out],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads((out / "annotations.json").read_text()), run.stderr


def test_chips_only_inside_the_reviewed_areas_empty_ones_included(tmp_path):
    coco, said = _tile(tmp_path, _corrected(tmp_path / "c.gpkg", True), tmp_path / "chips")
    assert "chips only inside its 1 reviewed area(s)" in said
    windows = [im["window"] for im in coco["images"]]
    # the west half (200 px of 400) in 100 px chips: 2 columns x 3 rows, nothing east of it
    assert sorted((x, y) for x, y, _, _ in windows) == [(0, 0), (0, 100), (0, 200), (100, 0),
                                                        (100, 100), (100, 200)]
    boxes = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert len(boxes) == 2  # the label in the east half is not taught
    with_labels = {a["image_id"] for a in boxes}
    assert len(with_labels) == 2 and len(coco["images"]) == 6  # 4 empty chips kept


def test_without_reviewed_areas_every_labelled_chip_is_cut(tmp_path):
    coco, said = _tile(tmp_path, _corrected(tmp_path / "c.gpkg", False), tmp_path / "chips")
    assert "reviewed area" not in said
    assert len(coco["images"]) == 3  # the chips holding a label (empty ones not asked for)
