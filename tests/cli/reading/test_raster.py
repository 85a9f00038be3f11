"""Reading rasters (raster.py): tiled or striped, 8 and 16 bit, float with NaN, alpha and nodata
masks, bands; every read gives the model what the file holds."""

import numpy as np
import rasterio
from rasterio.transform import Affine

from querydet_cli.pipeline.detect import run_detect

from tests.cli.oracle import OracleModel, paint, write_tif
from tests.cli.pipeline.test_detect import CFG, CPU, OBJECTS, OPTS, _boxes, _run, replace_opts


def test_tiled_and_striped_geotiffs_give_the_same_detections(tmp_path):
    data = paint(300, 260, OBJECTS)
    a = write_tif(tmp_path / "tiled.tif", data, Affine(1, 0, 0, 0, -1, 0), tiled=True)
    b = write_tif(tmp_path / "striped.tif", data, Affine(1, 0, 0, 0, -1, 0), tiled=False)
    with rasterio.open(b) as src:
        assert src.profile.get("tiled") in (False, None)
    assert _boxes(_run(a, tmp_path / "a.ndjson")[1]) == _boxes(_run(b, tmp_path / "b.ndjson")[1])


def test_uint16_input_is_stretched(tmp_path):
    data = paint(200, 200, [(10, 10, 30, 30)], dtype="uint16", scale=1)
    data[1] += 1000
    path = write_tif(tmp_path / "u16.tif", data, Affine(1, 0, 0, 0, -1, 0))
    from querydet_cli.reading.raster import RasterSource

    with RasterSource(path) as src:
        pixels, valid = src.read(0, 0, 200, 200)
        assert src.stretch is not None and pixels.min() >= 0 and pixels.max() <= 1
        assert valid.all()


def test_rgba_alpha_and_nodata_masks(tmp_path):
    data = paint(200, 200, [(10, 10, 30, 30), (150, 150, 170, 170)])
    alpha = np.full((1, 200, 200), 255, np.uint8)
    alpha[0, 140:, 140:] = 0  # the second object lies under transparency
    path = write_tif(tmp_path / "rgba.tif", np.concatenate([data, alpha]),
                     Affine(1, 0, 0, 0, -1, 0), photometric="RGB", alpha="YES")
    _, records = _run(path, tmp_path / "rgba.ndjson")
    assert _boxes(records) == [(10.0, 10.0, 30.0, 30.0)]
    nod = paint(300, 260, [(10, 10, 30, 30)])
    nod[:, :, 200:] = 7  # a nodata block: whole tiles of it are skipped
    nod[0, 100:110, 20:30] = 7
    path = write_tif(tmp_path / "nodata.tif", nod, Affine(1, 0, 0, 0, -1, 0), nodata=7)
    model = OracleModel()
    _, records = _run(path, tmp_path / "nodata.ndjson", model=model)
    assert _boxes(records) == [(10.0, 10.0, 30.0, 30.0)]


def test_an_8_bit_window_reads_as_value_over_255_with_nodata_zeroed(tmp_path):
    """The reader's one-pass cast and scale gives the float32 values of astype then / 255,
    bit for bit, and zeros where the mask says nodata."""
    from querydet_cli.reading.raster import RasterSource

    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (3, 90, 70), dtype=np.uint8)
    data[:, 40:, :30] = 7  # nodata
    path = write_tif(tmp_path / "n.tif", data, Affine(1, 0, 0, 0, -1, 0), nodata=7)
    with RasterSource(path) as src:
        pixels, valid = src.read(0, 0, 70, 90)
    expected_valid = (data != 7).all(axis=0)
    expected = data.astype(np.float32)
    expected /= 255.0
    expected[:, ~expected_valid] = 0.0
    assert np.array_equal(valid, expected_valid)
    assert pixels.dtype == np.float32 and pixels.tobytes() == expected.tobytes()


def test_float_raster_with_nan_and_inf(tmp_path):
    data = paint(200, 200, [(10, 10, 30, 30), (120, 120, 140, 140)]).astype("float32") / 255
    data[:, 125:135, 125:135] = np.nan  # the second object's centre is not a number
    data[2, 0:5, 0:5] = np.inf
    path = write_tif(tmp_path / "f.tif", data, Affine(1, 0, 0, 0, -1, 0))
    from querydet_cli.reading.raster import RasterSource

    with RasterSource(path) as src:
        pixels, valid = src.read(0, 0, 200, 200)
        assert np.isfinite(pixels).all() and not valid[130, 130] and not valid[2, 2]
    _, records = _run(path, tmp_path / "f.ndjson", model=OracleModel())
    assert all(r["bbox"][0] < 100 for r in records)  # nothing reported centred on NaN


def test_bad_bands_are_one_clear_error(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(200, 200, [(10, 10, 30, 30)]), Affine(1, 0, 0, 0, -1, 0))
    out = tmp_path / "o.ndjson"
    summary = run_detect(OracleModel(), CFG, [str(path)], str(out), "ndjson",
                         replace_opts(OPTS, bands=(9,)), CPU)
    assert summary.done == 0
    assert summary.failed[0][1].endswith("--bands 9 does not exist (the raster has bands 1..3)")
    # nothing succeeded: no output, no journal (an old output would stay as it was)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]
    out.write_text("old\n")
    run_detect(OracleModel(), CFG, [str(path)], str(out), "ndjson",
               replace_opts(OPTS, bands=(9,)), CPU)
    assert out.read_text() == "old\n"
