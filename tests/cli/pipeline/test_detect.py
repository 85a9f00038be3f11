import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from rasterio.transform import Affine

from querydet_cli.core.config import Config
from querydet_cli.pipeline.detect import DetectOptions, run_detect
from querydet_cli.reading.inputs import expand_inputs
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


def test_profile_stages_add_up_to_the_wall_time(tmp_path):
    from querydet_cli.pipeline.producer import TileProducer
    from tests.conftest import tiny_model, with_random_heads

    path = write_tif(tmp_path / "a.tif", paint(400, 300, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    model = with_random_heads(tiny_model())
    model.prepare_inference("fp32")
    cfg = Config()
    from dataclasses import replace as dc_replace

    cfg = dc_replace(cfg, model=dc_replace(cfg.model, num_classes=3, backbone="resnet18",
                                           fpn_channels=32), class_names=("a", "b", "c"))
    opts = DetectOptions(tile_size=128, overlap=16, batch_size=2, profile=True)
    producer = TileProducer(model, cfg, opts, CPU)
    summary = run_detect(model, cfg, [str(path)], str(tmp_path / "o.geojson"), "geojson",
                         opts, CPU, producer=producer)
    prof = summary.profile
    stages = prof["stages"]
    named = sum(v["s"] for k, v in stages.items() if k != "other")
    assert prof["tiles"] == 12
    # what the stages time is each piece of the run, once each: 12 tiles in 3 rows of 4, in
    # batches of 2 within a row: 6 batches through the network's four stages, 13 waits for the
    # reader (12 tiles and its end), one setup, and the journal's write per row plus the output
    entered = producer.profile.entered
    assert {k: entered[k] for k in ("setup", "read", "preprocess", "backbone", "coarse_heads")} \
        == {"setup": 1, "read": 13, "preprocess": 12, "backbone": 6, "coarse_heads": 6}
    assert entered["postprocess"] == 12 and entered["write"] >= 3 + 1
    # the named stages and `other` (what they did not cover) are the wall time
    assert named + stages["other"]["s"] == pytest.approx(prof["wall_s"], abs=1e-3)


def _sample_run(tmp_path, name, model, cfg, **opts):
    from querydet_cli.core.resources import sample_scene

    out = tmp_path / f"{name}.ndjson"
    run_detect(model, cfg, [str(sample_scene())], str(out), "ndjson",
               DetectOptions(tile_size=256, overlap=32, **opts), CPU)
    return out.read_bytes()


