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


def test_a_narrow_area_gets_chips_of_its_own_width_and_a_geojson_marks_areas_by_role(tmp_path):
    """A strip narrower than a chip is still cut (chips of its width), and a one-layer GeoJSON
    (as view --edit's offline page downloads it) marks its areas with role=reviewed_area."""
    feats = gpd.GeoDataFrame(
        {"label": ["car", "car", None], "role": ["label", "label", "reviewed_area"]},
        geometry=[box(1010, 1980, 1020, 1990), box(1150, 1900, 1160, 1910),
                  box(1000, 1850, 1030, 2000)], crs="EPSG:32617")  # a 60 px wide west strip
    feats.to_file(tmp_path / "c.geojson", driver="GeoJSON")
    coco, said = _tile(tmp_path, tmp_path / "c.geojson", tmp_path / "chips")
    assert "2 labels in" in said and "1 reviewed area(s)" in said
    assert sorted(tuple(im["window"]) for im in coco["images"]) == [
        (0, 0, 60, 100), (0, 100, 60, 100), (0, 200, 60, 100)]
    assert [a["bbox"] for a in coco["annotations"]] == [[20.0, 20.0, 20.0, 20.0]]


def test_a_coco_image_with_reviewed_areas_is_cut_inside_them_only(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(paint(300, 200, []).transpose(1, 2, 0)).save(tmp_path / "img" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 300, "height": 200,
                        "reviewed_areas": [[0, 0, 100, 200], [200, 0, 100, 100]]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [150, 150, 20, 20],
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "tree"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    run = subprocess.run([sys.executable, "-m", "querydet_cli", "tile", "--annotations",
                          tmp_path / "a.json", "--images", tmp_path / "img", "--size", "100",
                          "--overlap", "0", "--out", tmp_path / "chips"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads((tmp_path / "chips" / "annotations.json").read_text())
    assert sorted(tuple(im["window"]) for im in out["images"]) == [
        (0, 0, 100, 100), (0, 100, 100, 100), (200, 0, 100, 100)]
    assert len(out["annotations"]) == 1  # the tree outside every area is not taught
    bad = dict(coco, images=[dict(coco["images"][0], reviewed_areas=[[0, 0, -5, 10]])])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    run = subprocess.run([sys.executable, "-m", "querydet_cli", "tile", "--annotations",
                          tmp_path / "bad.json", "--images", tmp_path / "img", "--out",
                          tmp_path / "chips2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "reviewed_areas must be a list" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "chips2").exists()
