"""Ground resolution: GSD of rasters and checkpoints, and detect reading rasters at the model's."""

import json
import math

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from typer.testing import CliRunner

from querydet_cli.app import app
from querydet_cli.bench.gsd import placement, write_resampled
from querydet_cli.core.errors import QueryDetError
from querydet_cli.reading.gsd import (metres_per_degree, model_grid, parse_gsd_option, raster_gsd,
                              resolve, training_gsd)
from querydet_cli.reading.raster import RasterSource
from querydet_cli.core.resources import sample_model, sample_scene

runner = CliRunner()


# --- GSD of a raster -------------------------------------------------------------------------

def test_gsd_of_a_projected_raster_in_metres_and_in_feet():
    assert raster_gsd(CRS.from_epsg(32633), from_origin(5e5, 4.5e6, 0.3, 0.3), 100, 100) == \
        pytest.approx((0.3, 0.3))
    # New York Long Island, US survey feet: 1 ft = 1200/3937 m
    gx, gy = raster_gsd(CRS.from_epsg(2263), from_origin(1e6, 2e5, 1.0, 2.0), 100, 100)
    assert gx == pytest.approx(1200 / 3937, rel=1e-6)
    assert gy == pytest.approx(2 * 1200 / 3937, rel=1e-6)


def test_gsd_of_a_non_square_and_rotated_raster():
    rot = Affine.rotation(30) @ Affine.scale(0.2, -0.5)
    gx, gy = raster_gsd(CRS.from_epsg(32617), Affine.translation(4e5, 3e6) @ rot, 10, 10)
    assert (gx, gy) == pytest.approx((0.2, 0.5))


def test_gsd_of_a_raster_in_degrees_matches_geodesic_distance():
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    step = 1e-5  # degrees, about a metre
    transform = from_origin(-82.0, 29.701, step, step)  # centre near 29.7 N (Florida)
    gx, gy = raster_gsd(CRS.from_epsg(4326), transform, 200, 200)
    lat = 29.701 - 100 * step
    _, _, along_x = geod.inv(-82.0, lat, -82.0 + step, lat)
    _, _, along_y = geod.inv(-82.0, lat, -82.0, lat + step)
    assert gx == pytest.approx(along_x, rel=1e-4)
    assert gy == pytest.approx(along_y, rel=1e-4)
    assert metres_per_degree(0.0)[0] == pytest.approx(111319.49, rel=1e-6)


def test_a_raster_in_degrees_near_a_pole_is_refused_in_one_line():
    with pytest.raises(QueryDetError, match="near the poles.*--input-gsd"):
        raster_gsd(CRS.from_epsg(4326), from_origin(10.0, 88.0, 1e-4, 1e-4), 100, 100, "x.tif")


def test_no_georeference_means_no_gsd():
    assert raster_gsd(None, Affine.identity(), 10, 10) is None


# --- options and the resampling factor -----------------------------------------------------

@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("NATIVE", "native"),
                                           ("0.15", 0.15), (None, "auto")])
def test_gsd_option_values(text, expected):
    assert parse_gsd_option(text) == expected


@pytest.mark.parametrize("bad", ["fast", "0", "-1", "nan", "inf"])
def test_bad_gsd_option_is_one_line(bad):
    with pytest.raises(QueryDetError, match="--gsd"):
        parse_gsd_option(bad)


def test_resolve_scale_native_unknown_and_past_sixteen():
    assert resolve("auto", 0.3, (0.15, 0.15)).scale == pytest.approx((2.0, 2.0))
    assert resolve("auto", 0.3, (0.6, 0.3)).scale == pytest.approx((0.5, 1.0))
    assert not resolve("auto", 0.3, (0.3000001, 0.3)).resampled  # the same GSD: no resampling
    assert not resolve("native", 0.3, (0.15, 0.15)).resampled
    assert not resolve("auto", None, (0.15, 0.15)).resampled  # an older checkpoint
    assert not resolve("auto", 0.3, None).resampled  # a frame without a GSD
    assert resolve(0.6, None, (0.15, 0.15)).scale == pytest.approx((4.0, 4.0))
    with pytest.raises(QueryDetError, match="past the 16x"):
        resolve("auto", 0.3, (0.01, 0.01))
    with pytest.raises(QueryDetError, match="past the 16x"):
        resolve("auto", 0.3, (10.0, 10.0))


def test_model_grid_spans_the_raster_exactly():
    cols, rows, sx, sy = model_grid(1001, 333, (2.0, 2.0))
    assert (cols, rows) == (500, 166)
    assert cols * sx == pytest.approx(1001) and rows * sy == pytest.approx(333)


# --- reading at another GSD ------------------------------------------------------------------

def _write(path, data, transform, nodata=None, crs="EPSG:32633"):
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1],
               "count": data.shape[0], "dtype": data.dtype.name, "crs": crs,
               "transform": transform}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_a_box_on_the_model_grid_maps_back_within_half_a_source_pixel(tmp_path):
    data = np.full((3, 300, 300), 40, np.uint8)
    data[:, 101:131, 61:97] = 250  # a bright rectangle at x 61..97, y 101..131 (source pixels)
    path = _write(tmp_path / "fine.tif", data, from_origin(0, 0, 0.1, 0.1))
    with RasterSource(path) as src:
        src.resample((3.0, 3.0))  # model pixels of 0.3 m
        pixels, valid = src.read(0, 0, src.width, src.height)
        info = src.info()
    assert (info.width, info.height, info.source_width) == (100, 100, 300)
    assert valid.all()
    bright = pixels[0] > 0.5
    ys, xs = np.nonzero(bright)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float)
    # edges of a 3-pixel-aligned rectangle land on model pixel edges when the cut is partial:
    # the half-covered model pixels on the edges average to mid grey
    back = info.to_source(box)[0]
    assert np.abs(back - [60, 99, 99, 132]).max() <= 3.0  # within one model pixel
    # an exact round trip: model -> source -> model, to 0.5 source pixel
    model_box = np.array([[20.0, 33.0, 32.5, 44.0]])
    assert np.abs(info.to_source(model_box) / 3.0 - model_box).max() < 0.5 / 3


def test_nodata_is_resampled_with_the_pixels(tmp_path):
    data = np.full((3, 64, 64), 120, np.uint8)
    data[:, :, :32] = 0  # left half nodata
    data[:, :, 31] = 0
    path = _write(tmp_path / "collar.tif", data, from_origin(0, 0, 0.15, 0.15), nodata=0)
    with RasterSource(path) as src:
        src.resample((2.0, 2.0))
        pixels, valid = src.read(0, 0, 32, 32)
    assert valid.shape == (32, 32)
    assert not valid[:, :16].any() and valid[:, 16:].all()  # the boundary stays a boundary
    assert np.allclose(pixels[:, :, 16:], 120 / 255)  # no nodata zeros averaged in
    assert (pixels[:, :, :16] == 0).all()


def test_enlarging_reads_bilinear_and_keeps_the_size(tmp_path):
    data = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (3, 16, 1))
    path = _write(tmp_path / "coarse.tif", data, from_origin(0, 0, 0.6, 0.6))
    with RasterSource(path) as src:
        src.resample((0.5, 0.5))
        pixels, valid = src.read(0, 0, src.width, src.height)
    assert pixels.shape == (3, 32, 32) and valid.all()
    row = pixels[0, 5] * 255
    assert np.all(np.diff(row[2:-2]) > 0)  # interpolated, not repeated pairs


# --- detect end to end -----------------------------------------------------------------------

def _finer_sample(tmp_path):
    """The bundled 0.3 m sample scene resampled to 0.15 m (bilinear), with its truth."""
    truth = tmp_path / "truth.json"
    scene = sample_scene()
    gt = json.loads((scene.parent / "sample_scene.json").read_text())
    truth.write_text(json.dumps(gt))
    return write_resampled(scene, truth, 0.5, tmp_path / "fine.tif", tmp_path / "fine.json")


def _detect(args):
    result = runner.invoke(app, ["detect", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def test_detect_reads_a_finer_raster_at_the_model_gsd(tmp_path):
    fine = _finer_sample(tmp_path)
    _detect([str(sample_scene()), "-o", str(tmp_path / "native.ndjson")])
    _detect([str(fine), "-o", str(tmp_path / "fine.ndjson")])
    _detect([str(fine), "-o", str(tmp_path / "own.ndjson"), "--gsd", "native"])

    def records(name):
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    native, fine_dets, own = records("native.ndjson"), records("fine.ndjson"), records("own.ndjson")
    # boxes are in the 0.15 m raster's own pixels: halved, they sit on the 0.3 m detections
    coarse = [{"class_id": r["properties"]["class_id"], "bbox": r["properties"]["bbox_px"]}
              for r in native]
    finer = [{"class_id": r["properties"]["class_id"], "bbox": r["properties"]["bbox_px"]}
             for r in fine_dets]
    where = placement(coarse, finer, 2.0)
    assert where["pairs"] >= 0.9 * len(coarse)
    assert where["median_px"] < 0.5 and where["p95_px"] <= 1.0
    # and in map coordinates: the lon/lat geometry of a matched pair is the same place
    assert len(own) != len(fine_dets) or own != fine_dets  # reading at own pixels differs


def test_a_frame_without_georeference_takes_input_gsd(tmp_path, caplog):
    from PIL import Image

    fine = _finer_sample(tmp_path)
    with rasterio.open(fine) as src:
        Image.fromarray(src.read().transpose(1, 2, 0)).save(tmp_path / "frame.png")
    frame = str(tmp_path / "frame.png")
    plain = _detect([frame, "-o", str(tmp_path / "plain.json")])
    assert "no georeference and no --input-gsd" in plain.output
    assert plain.output.count("no georeference") == 1
    _detect([frame, "-o", str(tmp_path / "own.json"), "--gsd", "native"])
    _detect([frame, "-o", str(tmp_path / "given.json"), "--input-gsd", "0.15"])
    _detect([str(fine), "-o", str(tmp_path / "geo.json")])
    plain_dets = json.loads((tmp_path / "plain.json").read_text())
    assert plain_dets == json.loads((tmp_path / "own.json").read_text())  # said, then as today
    given = [d | {"file_name": None} for d in json.loads((tmp_path / "given.json").read_text())]
    geo = [d | {"file_name": None} for d in json.loads((tmp_path / "geo.json").read_text())]
    assert given and given == geo  # --input-gsd does what the georeference does


def test_a_checkpoint_without_gsd_behaves_as_before(tmp_path):
    payload = torch.load(sample_model(), weights_only=True)
    payload["config"]["data"].pop("gsd")
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    fine = _finer_sample(tmp_path)
    _detect([str(fine), "-o", str(tmp_path / "old.json"), "--weights", str(old)])
    _detect([str(fine), "-o", str(tmp_path / "native.json"), "--gsd", "native"])
    assert json.loads((tmp_path / "old.json").read_text()) == \
        json.loads((tmp_path / "native.json").read_text())
    shown = runner.invoke(app, ["info", str(old)])
    assert "not recorded" in shown.output


def test_a_factor_past_sixteen_is_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "x.geojson"
    for args, code, text in ((["--gsd", "6"], 2, "past the 16x"),  # the input fails
                             (["--gsd", "fast"], 2, "--gsd: expected auto"),  # a usage error
                             (["--input-gsd", "-1"], 2, "--input-gsd")):
        proc = subprocess.run([sys.executable, "-m", "querydet_cli", "detect", str(sample_scene()),
                               "-o", str(out), "--quiet", *args], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == code, proc.stderr
        assert text in proc.stderr and "Traceback" not in proc.stderr
        assert list(tmp_path.iterdir()) == []  # no output, no journal


def test_info_names_the_bundled_models_gsd():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "0.3 m per pixel" in result.output and "car, truck" in result.output
    data = json.loads(runner.invoke(app, ["info", "--json"]).output)
    assert data["gsd_m"] == 0.3 and data["config"]["data"]["gsd"] == 0.3


# --- training records its GSD ------------------------------------------------------------------

def test_training_gsd_from_generator_chips_or_flag(tmp_path):
    geo = _write(tmp_path / "chip.tif", np.zeros((3, 8, 8), np.uint8), from_origin(0, 0, 0.1, 0.1))
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "chip.png")
    assert training_gsd("synthetic", None, [], 0.3) == 0.3
    assert training_gsd("coco", None, [geo], 0.3) == pytest.approx(0.1)
    assert training_gsd("coco", 0.5, [tmp_path / "chip.png"], 0.3) == 0.5
    assert training_gsd("coco", None, [tmp_path / "chip.png"], 0.3) is None
    assert training_gsd("coco", 0.5, [geo], 0.3) == pytest.approx(0.1)  # the georeference wins
    assert math.isfinite(training_gsd("coco", None, [geo, geo], 0.3))


def test_tile_cuts_chips_at_a_chosen_gsd(tmp_path):
    from querydet_cli.training.chips import cut_chips
    from querydet_cli.training.datasets import Sample

    data = np.full((3, 400, 400), 30, np.uint8)
    data[:, 100:140, 200:260] = 240  # an object at x 200..260, y 100..140 (0.1 m pixels)
    path = _write(tmp_path / "src.tif", data, from_origin(1000, 2000, 0.1, 0.1))
    sample = Sample(path, np.array([[200, 100, 260, 140]], np.float32), np.array([0]),
                    image_id=1, width=400, height=400)
    gt = cut_chips([sample], ["tree"], tmp_path / "chips", size=100, overlap=0, gsd=0.2)
    coco = json.loads(gt.read_text())
    image = next(im for im in coco["images"]
                 if any(a["image_id"] == im["id"] and not a["iscrowd"] for a in coco["annotations"]))
    ann = next(a for a in coco["annotations"] if a["image_id"] == image["id"])
    assert (image["width"], image["height"]) == (100, 100)
    x, y, w, h = ann["bbox"]
    assert (w, h) == (30, 20)  # half the pixels at twice the pixel size
    with rasterio.open(tmp_path / "chips" / "images" / image["file_name"]) as chip:
        assert chip.transform.a == pytest.approx(0.2) and chip.transform.e == pytest.approx(-0.2)
        pixels = chip.read(1)
        # the object lies where its box says, in the chip and on the map
        assert pixels[int(y) + 1:int(y + h) - 1, int(x) + 1:int(x + w) - 1].min() == 240
        left, top = chip.transform * (x, y)
    assert (left, top) == pytest.approx((1000 + 200 * 0.1, 2000 - 100 * 0.1))
    from PIL import Image

    Image.fromarray(data.transpose(1, 2, 0)).save(tmp_path / "plain.png")
    plain = Sample(tmp_path / "plain.png", sample.boxes, sample.labels, image_id=2)
    with pytest.raises(QueryDetError, match="--gsd needs georeferenced"):
        cut_chips([plain], ["tree"], tmp_path / "chips2", size=100, gsd=0.2)


def test_native_scale_training_and_eval_bring_chips_to_the_model_gsd(tmp_path):
    from querydet_cli.training.datasets import DetectionDataset, Sample
    from PIL import Image

    geo = _write(tmp_path / "fine.tif", np.full((3, 64, 96), 90, np.uint8),
                 from_origin(0, 0, 0.15, 0.15))
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "plain.png")
    box = np.array([[10, 20, 30, 40]], np.float32)
    samples = [Sample(geo, box, np.array([0])), Sample(tmp_path / "plain.png", box, np.array([0]))]
    ds = DetectionDataset(samples, (800,), 4096, train=False, resize="native", target_gsd=0.3)
    image, target = ds[0]
    assert image.shape == (3, 32, 48) and float(target["scale"]) == pytest.approx(0.5)
    assert target["boxes"][0].tolist() == pytest.approx([5, 10, 15, 20])
    image, target = ds[1]  # no georeference: its own pixels
    assert image.shape == (3, 64, 96) and float(target["scale"]) == 1.0
    same = DetectionDataset(samples, (800,), 4096, train=False, resize="native")
    assert same[0][0].shape == (3, 64, 96)  # no model GSD: as before
