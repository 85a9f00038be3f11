import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine

from querydet_cli.core.config import Config
from querydet_cli.pipeline.detect import DetectInterrupted, DetectOptions, run_detect
from querydet_cli.pipeline.inputs import expand_inputs
from querydet_cli.core.errors import QueryDetError
from querydet_cli.outputs.geometry import pixel_box_ring
from tests.cli.oracle import OracleModel, paint, parse_ndjson, read_ndjson, write_tif

CFG = Config()
CPU = torch.device("cpu")
# tiles of 128 px overlapping by 32 over a 300 x 260 raster: borders at x = 96..128, 192..224
OPTS = DetectOptions(tile_size=128, overlap=32, batch_size=3)
OBJECTS = [
    (10, 10, 30, 25),     # inside one tile
    (80, 40, 150, 60),    # straddles a vertical tile border, longer than the overlap
    (85, 80, 140, 140),   # on a tile corner: seen cut by four tiles
    (200, 200, 212, 210),  # small, inside an overlap zone
    (250, 100, 299, 130),  # touches the raster's right edge
]


def _run(path, out, fmt="ndjson", model=None, opts=OPTS, **kw):
    summary = run_detect(model or OracleModel(), CFG, [str(path)], str(out), fmt, opts, CPU, **kw)
    records = read_ndjson(out) if fmt == "ndjson" else None
    return summary, records


def _boxes(records):
    return sorted(tuple(r["bbox"]) for r in records)


def test_objects_cut_by_tiles_are_reported_once_with_full_extent(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), Affine(0.5, 0, 1000, 0, -0.5, 2000))
    summary, records = _run(path, tmp_path / "out.ndjson")
    assert summary.done == 1 and not summary.failed
    assert _boxes(records) == sorted(tuple(float(v) for v in o) for o in OBJECTS)


def test_tiled_and_striped_geotiffs_give_the_same_detections(tmp_path):
    data = paint(300, 260, OBJECTS)
    a = write_tif(tmp_path / "tiled.tif", data, Affine(1, 0, 0, 0, -1, 0), tiled=True)
    b = write_tif(tmp_path / "striped.tif", data, Affine(1, 0, 0, 0, -1, 0), tiled=False)
    with rasterio.open(b) as src:
        assert src.profile.get("tiled") in (False, None)
    assert _boxes(_run(a, tmp_path / "a.ndjson")[1]) == _boxes(_run(b, tmp_path / "b.ndjson")[1])


@pytest.mark.parametrize("name,transform", [
    ("north-up", Affine(0.5, 0, 1000, 0, -0.5, 2000)),
    ("rotated", Affine.translation(500, 800) @ Affine.rotation(30) @ Affine.scale(2, -2)),
    ("south-up", Affine(0.5, 0, 1000, 0, 0.5, 2000)),
])
def test_pixel_boxes_map_to_exact_crs_coordinates(tmp_path, name, transform):
    path = write_tif(tmp_path / f"{name}.tif", paint(300, 260, [(10, 20, 30, 50)]), transform)
    out = tmp_path / "out.geojson"
    run_detect(OracleModel(), CFG, [str(path)], str(out), "geojson", OPTS, CPU)
    data = json.loads(out.read_text())
    assert data["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    ring = data["features"][0]["geometry"]["coordinates"][0]
    t = transform
    expected = [(t.a * c + t.b * r + t.c, t.d * c + t.e * r + t.f)
                for c, r in [(10, 20), (30, 20), (30, 50), (10, 50), (10, 20)]]
    # the same four corners (GeoJSON writes them counter-clockwise, to the millimetre)
    assert np.allclose(sorted(map(tuple, ring[:-1])), sorted(expected[:-1]), atol=1e-3)
    assert ring[0] == ring[-1]
    assert np.allclose(pixel_box_ring((10, 20, 30, 50), tuple(transform)[:6]), expected)


def test_rfc7946_gives_lon_lat(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(200, 200, [(10, 20, 30, 50)]),
                     Affine(0.5, 0, 500000, 0, -0.5, 4500000))
    out = tmp_path / "out.geojson"
    run_detect(OracleModel(), CFG, [str(path)], str(out), "geojson",
               DetectOptions(tile_size=128, overlap=32, rfc7946=True), CPU)
    data = json.loads(out.read_text())
    assert "crs" not in data
    lon, lat = data["features"][0]["geometry"]["coordinates"][0][0]
    assert 14.9 < lon < 15.1 and 40.6 < lat < 40.7  # UTM 33N origin near 15E, 40.6N


def test_uint16_input_is_stretched(tmp_path):
    data = paint(200, 200, [(10, 10, 30, 30)], dtype="uint16", scale=1)
    data[1] += 1000
    path = write_tif(tmp_path / "u16.tif", data, Affine(1, 0, 0, 0, -1, 0))
    from querydet_cli.pipeline.raster import RasterSource

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
    from querydet_cli.pipeline.raster import RasterSource

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


def test_plain_images_and_geojson_refusal(tmp_path):
    from PIL import Image

    img = paint(200, 150, [(10, 10, 30, 30)]).transpose(1, 2, 0)
    Image.fromarray(img).save(tmp_path / "frame.png")
    _, records = _run(tmp_path / "frame.png", tmp_path / "o.ndjson")
    assert records[0]["feature_geometry"] is None and records[0]["bbox"] == [10, 10, 30, 30]
    summary = run_detect(OracleModel(), CFG, [str(tmp_path / "frame.png")],
                         str(tmp_path / "o.geojson"), "geojson", OPTS, CPU)
    assert "not georeferenced" in summary.failed[0][1] and ".csv" in summary.failed[0][1]


@pytest.mark.parametrize("fmt,suffix", [("coco", "json"), ("csv", "csv"), ("gpkg", "gpkg")])
def test_other_formats(tmp_path, fmt, suffix):
    path = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), Affine(0.5, 0, 1000, 0, -0.5, 2000))
    out = tmp_path / f"out.{suffix}"
    run_detect(OracleModel(), CFG, [str(path)], str(out), fmt, OPTS, CPU)
    if fmt == "coco":
        data = json.loads(out.read_text())
        assert len(data) == len(OBJECTS) and data[0]["image_id"] == 1
        assert {tuple(d["bbox"]) for d in data} >= {(10.0, 10.0, 20.0, 15.0)}
    elif fmt == "csv":
        lines = out.read_text().splitlines()
        assert lines[0].startswith("source,image_id") and len(lines) == len(OBJECTS) + 1
    else:
        import geopandas as gpd

        frame = gpd.read_file(out)
        assert len(frame) == len(OBJECTS) and frame.crs.to_epsg() == 32633


def test_bad_inputs_are_reported_and_the_rest_processed(tmp_path):
    good = write_tif(tmp_path / "good.tif", paint(200, 200, [(10, 10, 30, 30)]), Affine(1, 0, 0, 0, -1, 0))
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00garbage" * 20)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    inputs = [str(tmp_path / "missing.tif"), str(empty), str(corrupt), str(text), str(good)]
    out = tmp_path / "out.ndjson"
    summary = run_detect(OracleModel(), CFG, inputs, str(out), "ndjson", OPTS, CPU)
    assert summary.done == 1 and len(summary.failed) == 4
    reasons = dict(summary.failed)
    assert "file not found" in reasons[inputs[0]]
    assert "empty (0 bytes)" in reasons[inputs[1]]
    assert "not a readable raster" in reasons[inputs[2]]
    assert "not a readable raster" in reasons[inputs[3]]
    assert len(out.read_text().splitlines()) == 1


def test_interrupted_run_leaves_no_output_and_resume_finishes(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), Affine(0.5, 0, 1000, 0, -0.5, 2000))
    out = tmp_path / "out.ndjson"
    opts = DetectOptions(tile_size=128, overlap=32, batch_size=1)
    with pytest.raises(DetectInterrupted, match=r"after \d+/\d+ tile rows") as info:
        run_detect(OracleModel(fail_after=5), CFG, [str(path)], str(out), "ndjson", opts, CPU)
    assert info.value.exit_code == 130 and info.value.resumable
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out") or ".partial" in p.name]
    resumed = OracleModel()
    run_detect(resumed, CFG, [str(path)], str(out), "ndjson", replace_opts(opts, resume=True), CPU)
    assert resumed.calls < 9  # the finished tile rows were not redone
    records = read_ndjson(out)
    assert _boxes(records) == sorted(tuple(float(v) for v in o) for o in OBJECTS)


def replace_opts(opts, **kw):
    from dataclasses import replace

    return replace(opts, **kw)


def test_expand_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for n in ("b.tif", "a.png", "skip.txt"):
        (tmp_path / "d" / n).write_bytes(b"x")
    assert expand_inputs([str(tmp_path / "d")]) == [str(tmp_path / "d" / "a.png"),
                                                    str(tmp_path / "d" / "b.tif")]
    assert expand_inputs([str(tmp_path / "d" / "*.tif")]) == [str(tmp_path / "d" / "b.tif")]
    assert expand_inputs(["-"], stdin=["x.tif\n", "\n", "y.png\n"]) == ["x.tif", "y.png"]
    with pytest.raises(QueryDetError):
        expand_inputs([str(tmp_path / "d" / "*.jp2")])


def test_cli_pipeline_stdin_to_stdout(tmp_path):
    from dataclasses import replace

    from querydet_models.checkpoint import save_checkpoint
    from querydet_models.config import ModelConfig
    from querydet_models.detectors.querydet import build_querydet

    cfg = replace(Config(), model=ModelConfig(backbone="resnet18", fpn_channels=16, head_convs=2,
                                              num_classes=3))
    torch.manual_seed(0)
    model = build_querydet(cfg.model, cfg.inference)
    weights = tmp_path / "m.pt"
    save_checkpoint(weights, model, cfg.to_dict(), ["a", "b", "c"])
    img = write_tif(tmp_path / "a.tif", paint(200, 160, [(10, 10, 30, 30)]), Affine(1, 0, 0, 0, -1, 0))
    proc = subprocess.run([sys.executable, "-m", "querydet_cli", "detect", "-", "-o", "-",
                           "--weights", str(weights), "--score-threshold", "0.0", "--quiet",
                           "--tile-size", "128", "--overlap", "32"],
                          input=f"{img}\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = parse_ndjson(proc.stdout)
    assert rows and all(r["source"] == str(img) for r in rows)
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "querydet_cli", "detect", str(tmp_path / "nope.tif"),
                           "-o", str(tmp_path / "o.ndjson"), "--weights", str(weights), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # no input succeeded: an input error, nothing written
    assert "querydet: error:" in proc.stderr and "file not found" in proc.stderr
    assert not (tmp_path / "o.ndjson").exists() or (tmp_path / "o.ndjson").read_text() == ""


def test_float_raster_with_nan_and_inf(tmp_path):
    data = paint(200, 200, [(10, 10, 30, 30), (120, 120, 140, 140)]).astype("float32") / 255
    data[:, 125:135, 125:135] = np.nan  # the second object's centre is not a number
    data[2, 0:5, 0:5] = np.inf
    path = write_tif(tmp_path / "f.tif", data, Affine(1, 0, 0, 0, -1, 0))
    from querydet_cli.pipeline.raster import RasterSource

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


def test_profile_stages_add_up_to_the_wall_time(tmp_path):
    from tests.conftest import tiny_model, with_random_heads

    path = write_tif(tmp_path / "a.tif", paint(400, 300, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    model = with_random_heads(tiny_model())
    model.prepare_inference("fp32")
    cfg = Config()
    from dataclasses import replace as dc_replace

    cfg = dc_replace(cfg, model=dc_replace(cfg.model, num_classes=3, backbone="resnet18",
                                           fpn_channels=32), class_names=("a", "b", "c"))
    summary = run_detect(model, cfg, [str(path)], str(tmp_path / "o.geojson"), "geojson",
                         DetectOptions(tile_size=128, overlap=16, batch_size=2, profile=True), CPU)
    prof = summary.profile
    stages = prof["stages"]
    named = sum(v["s"] for k, v in stages.items() if k != "other")
    assert prof["tiles"] == 12
    assert named >= 0.95 * prof["wall_s"], stages  # the named stages cover the run
    assert abs(named + stages["other"]["s"] - prof["wall_s"]) < 1e-3
    assert stages["backbone"]["s"] > 0 and stages["write"]["s"] > 0


def test_resume_after_every_row_equals_an_uninterrupted_run(tmp_path):
    """Ctrl-C after each possible number of batches (so after every tile row and inside rows),
    then --resume: the output equals an uninterrupted run's, objects on row seams included."""
    # 128 px tiles overlapping by 32 on 400 x 420 px: 4 tile rows (seams near y = 96..128, ...)
    objects = [(20, 90, 60, 135), (150, 185, 200, 230), (260, 280, 330, 330), (40, 300, 90, 410),
               (300, 20, 390, 60), (110, 100, 140, 125)]
    path = write_tif(tmp_path / "a.tif", paint(400, 420, objects), Affine(1, 0, 0, 0, -1, 0))
    opts = DetectOptions(tile_size=128, overlap=32, batch_size=2)
    full = tmp_path / "full.ndjson"
    reference = OracleModel()
    run_detect(reference, CFG, [str(path)], str(full), "ndjson", opts, CPU)
    expected = _boxes(read_ndjson(full))
    assert len(expected) == len(objects)
    for stop_after in range(1, reference.calls):
        out = tmp_path / f"r{stop_after}.ndjson"
        with pytest.raises(DetectInterrupted):
            run_detect(OracleModel(fail_after=stop_after), CFG, [str(path)], str(out), "ndjson",
                       opts, CPU)
        run_detect(OracleModel(), CFG, [str(path)], str(out), "ndjson",
                   replace_opts(opts, resume=True), CPU)
        assert _boxes(read_ndjson(out)) == expected, stop_after


def test_a_run_passes_its_precision_per_call_and_leaves_the_model_as_it_was(tmp_path):
    from querydet_cli.runtimes.loading import load_model
    from querydet_cli.core.resources import sample_model, sample_scene

    model, cfg = load_model(sample_model(), "cpu")
    before = model.precision
    other = "fp32" if before != "fp32" else "bf16"
    summary = run_detect(model, cfg, [str(sample_scene())], str(tmp_path / "o.ndjson"), "ndjson",
                         DetectOptions(precision=other), CPU)
    assert summary.precision == other and model.precision == before


def _sample_run(tmp_path, name, model, cfg, **opts):
    from querydet_cli.core.resources import sample_scene

    out = tmp_path / f"{name}.ndjson"
    run_detect(model, cfg, [str(sample_scene())], str(out), "ndjson",
               DetectOptions(tile_size=256, overlap=32, **opts), CPU)
    return out.read_bytes()


def test_two_workers_give_the_same_bytes_and_leave_torch_threads_as_they_were(tmp_path):
    """Tiles computed two at once (the CPU default) come back in tile order with the very
    values of one worker: 25 tiles of the sample scene, batches of one and of two."""
    from querydet_cli.runtimes.loading import load_model
    from querydet_cli.pipeline.producer import TileProducer
    from querydet_cli.core.resources import sample_model

    model, cfg = load_model(sample_model(), "cpu")
    threads = torch.get_num_threads()
    for batch in (1, 2):
        one = _sample_run(tmp_path, f"one{batch}", model, cfg, workers=1, batch_size=batch)
        two = _sample_run(tmp_path, f"two{batch}", model, cfg, workers=2, threads=1,
                          batch_size=batch)
        assert one == two and one.count(b"\n") > 20
    assert torch.get_num_threads() == threads
    producer = TileProducer(model, cfg, DetectOptions(workers=3, profile=True), CPU)
    assert producer.workers == 1  # --profile: stage times that add up need one worker


def test_resume_with_two_workers_after_an_interrupt_equals_one_uninterrupted_run(tmp_path):
    import threading

    from querydet_cli.runtimes.loading import load_model
    from querydet_cli.core.resources import sample_model

    model, cfg = load_model(sample_model(), "cpu")
    reference = _sample_run(tmp_path, "reference", model, cfg, workers=1)
    real, calls, lock = model.predict_levels, [0], threading.Lock()

    def interrupted(*args, **kwargs):
        with lock:
            calls[0] += 1
            if calls[0] > 9:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    model.predict_levels = interrupted
    with pytest.raises(DetectInterrupted):
        _sample_run(tmp_path, "resumed", model, cfg, workers=2)
    model.predict_levels = real
    assert _sample_run(tmp_path, "resumed", model, cfg, workers=2, resume=True) == reference


def test_the_run_key_does_not_depend_on_workers():
    from querydet_cli.pipeline.identity import run_key

    keys = {run_key(["a.tif"], DetectOptions(workers=w, threads=t), CFG) for w, t in
            ((None, None), (1, 2), (2, 1), (4, 4))}
    assert len(keys) == 1


def test_a_journal_of_another_format_is_not_continued(monkeypatch):
    """Checkpoints now carry the tiles' valid masks: a journal written before (without them)
    has another run key, so --resume refuses it instead of checking fused boxes without masks."""
    from querydet_cli.pipeline import identity

    now = identity.run_key(["a.tif"], DetectOptions(), CFG)
    monkeypatch.setattr(identity, "JOURNAL_VERSION", identity.JOURNAL_VERSION - 1)
    assert identity.run_key(["a.tif"], DetectOptions(), CFG) != now
