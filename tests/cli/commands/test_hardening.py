"""Data loss, exact resume keys and outputs other tools read (the interoperability issue)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rasterio.transform import Affine

from querydet_cli.core.config import Config
from querydet_cli.pipeline.detect import DetectOptions, run_detect
from querydet_cli.core.errors import QueryDetError
from querydet_cli.reading.inputs import refuse_output_over_inputs
from querydet_cli.training.metrics import ImageDetections, ImageTruth, coco_metrics
from querydet_cli.outputs.geometry import signed_area
from tests.cli.oracle import OracleModel, paint, write_tif

CPU = torch.device("cpu")
OPTS = DetectOptions(tile_size=128, overlap=32, batch_size=2)
OBJECTS = [(10, 10, 30, 25), (80, 40, 150, 60)]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "querydet_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_output_that_is_an_input_is_refused_and_nothing_is_touched(tmp_path, link):
    src = write_tif(tmp_path / "scene.tif", paint(200, 160, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    before = src.read_bytes()
    out = src
    if link == "symlink":
        out = tmp_path / "alias.geojson"
        out.symlink_to(src)
    elif link == "hardlink":
        out = tmp_path / "hard.geojson"
        os.link(src, out)
    with pytest.raises(QueryDetError, match="is the input"):
        refuse_output_over_inputs(str(out), [str(src)])
    proc = _cli("detect", src, "-o", out, "--format", "geojson", "--quiet")
    assert proc.returncode == 2 and "is the input" in proc.stderr
    assert src.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if "querydet-partial" in p.name]


def test_resume_refuses_other_weights_and_changed_inputs(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    out = tmp_path / "out.ndjson"
    model = OracleModel(fail_after=2)
    from querydet_cli.pipeline.detect import DetectInterrupted

    with pytest.raises(DetectInterrupted):
        run_detect(model, Config(), [str(path)], str(out), "ndjson", OPTS, CPU)
    resume = DetectOptions(**{**OPTS.__dict__, "resume": True})
    # the same inputs, but the file changed since (new mtime): refused
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(QueryDetError, match="changed since"):
        run_detect(OracleModel(), Config(), [str(path)], str(out), "ndjson", resume, CPU)


def test_resume_refuses_other_weights(tmp_path):
    from querydet_cli.pipeline.identity import weights_digest
    from tests.conftest import tiny_model

    a, b = tiny_model(seed=0), tiny_model(seed=1)
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) == weights_digest(tiny_model(seed=0))


def _features(path):
    return json.loads(path.read_text())["features"]


@pytest.mark.parametrize("rfc7946", [False, True])
@pytest.mark.parametrize("transform", [Affine(0.5, 0, 500000, 0, -0.5, 4500000),
                                       Affine(0.5, 0, 500000, 0, 0.5, 4500000)])  # south-up
def test_geojson_rings_are_counter_clockwise_with_sensible_precision(tmp_path, rfc7946,
                                                                     transform):
    path = write_tif(tmp_path / "a.tif", paint(200, 160, OBJECTS), transform)
    out = tmp_path / "o.geojson"
    run_detect(OracleModel(), Config(), [str(path)], str(out), "geojson",
               DetectOptions(**{**OPTS.__dict__, "rfc7946": rfc7946}), CPU)
    feats = _features(out)
    assert len(feats) == len(OBJECTS)
    for f in feats:
        ring = f["geometry"]["coordinates"][0]
        assert signed_area(ring) > 0  # counter-clockwise
        decimals = max(len(repr(v).split(".")[1]) if "." in repr(v) else 0
                       for xy in ring for v in xy)
        assert decimals <= (7 if rfc7946 else 3)
        assert f["properties"]["category_id"] == f["properties"]["class_id"] + 1


def test_csv_rows_carry_their_crs(tmp_path):
    a = write_tif(tmp_path / "a.tif", paint(200, 160, OBJECTS), Affine(1, 0, 500000, 0, -1, 0),
                  crs="EPSG:32633")
    b = write_tif(tmp_path / "b.tif", paint(200, 160, OBJECTS), Affine(1, 0, 0, 0, -1, 0),
                  crs="EPSG:3857")
    out = tmp_path / "o.csv"
    run_detect(OracleModel(), Config(), [str(a), str(b)], str(out), "csv", OPTS, CPU)
    rows = list(csv.DictReader(open(out)))
    assert {r["crs"] for r in rows if r["source"] == str(a)} == {"EPSG:32633"}
    assert {r["crs"] for r in rows if r["source"] == str(b)} == {"EPSG:3857"}


def test_coco_metrics_at_any_max_dets():
    truth = [ImageTruth(np.array([[10, 10, 30, 30], [50, 50, 90, 80]], np.float32),
                        np.array([0, 1]), np.zeros((0, 4), np.float32), 128, 128)]
    dets = [ImageDetections(np.array([[10, 10, 30, 31], [50, 50, 90, 80], [0, 0, 5, 5]],
                                     np.float32), np.array([0.9, 0.8, 0.3]), np.array([0, 1, 0]))]
    for max_dets in (1, 100, 500):
        m = coco_metrics(truth, dets, ["a", "b"], max_dets)
        assert m["AP"] is not None and m["AP50"] is not None
    assert coco_metrics(truth, dets, ["a", "b"], 500)["AP50"] == pytest.approx(1.0)


def test_two_sources_of_one_name_give_distinct_chips(tmp_path):
    from querydet_cli.training.chips import cut_chips
    from querydet_cli.training.datasets import load_coco

    for folder in ("a", "b"):
        (tmp_path / "src" / "images" / folder).mkdir(parents=True)
        write_tif(tmp_path / "src" / "images" / folder / "x.tif", paint(64, 64, [(5, 5, 20, 20)]))
    gt = {"images": [{"id": 1, "file_name": "a/x.tif", "width": 64, "height": 64},
                     {"id": 2, "file_name": "b/x.tif", "width": 64, "height": 64}],
          "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [5, 5, 15, 15],
                           "area": 225, "iscrowd": 0} for k in (1, 2)],
          "categories": [{"id": 1, "name": "car"}]}
    (tmp_path / "src" / "gt.json").write_text(json.dumps(gt))
    samples, names, _ = load_coco(tmp_path / "src" / "gt.json")
    path = cut_chips(samples, names, tmp_path / "chips", size=64)
    data = json.loads(path.read_text())
    files = [im["file_name"] for im in data["images"]]
    assert len(files) == 2 and len(set(files)) == 2
    assert len(list((tmp_path / "chips" / "images").iterdir())) == 2


def test_ndjson_is_geojson_text_sequence_read_by_pyogrio(tmp_path):
    import geopandas as gpd
    import pyogrio

    path = write_tif(tmp_path / "a.tif", paint(200, 160, OBJECTS),
                     Affine(0.5, 0, 500000, 0, -0.5, 4500000), crs="EPSG:32633")
    out = tmp_path / "o.ndjson"
    run_detect(OracleModel(), Config(), [str(path)], str(out), "ndjson", OPTS, CPU)
    info = pyogrio.read_info(f"GeoJSONSeq:{out}")
    assert info["features"] == len(OBJECTS) and info["crs"] == "EPSG:4326"
    frame = gpd.read_file(f"GeoJSONSeq:{out}")
    assert frame.crs.to_epsg() == 4326 and len(frame) == len(OBJECTS)
    # the lon/lat polygon is the projected box, reprojected: compare in EPSG:32633
    back = frame.to_crs("EPSG:32633")
    x1, y1 = 500000 + 0.5 * 10, 4500000 - 0.5 * 10
    assert any(abs(b[0] - x1) < 0.01 and abs(b[3] - y1) < 0.01 for b in back.geometry.bounds.values)
    assert set(frame.columns) >= {"class_name", "score", "crs", "category_id"}


def test_checkpoint_errors_never_advise_unsafe_loading(tmp_path):
    import pickle

    from querydet_models.checkpoint import CheckpointError, load_checkpoint

    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Path}))  # a class reference: refused by weights_only
    for path in (text, evil):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert "weights_only" not in message and "\n" not in message
        assert message.startswith(f"cannot read checkpoint {path}")


def test_visdrone_lines_with_nan_inf_or_bytes_are_reported_and_skipped(tmp_path):
    from querydet_cli.training.datasets import load_visdrone

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    write_tif(tmp_path / "images" / "f.png", paint(64, 64, [(5, 5, 20, 20)]), driver="PNG",
              tiled=False)
    (tmp_path / "annotations" / "f.txt").write_bytes(
        b"5,5,15,15,1,4,0,0\n1,1,5,5,nan,4,0,0\n1,1,5,5,1,inf,0,0\n\xff\xfe\x00binary\n"
        b"nan,1,5,5,1,4,0,0\n")
    samples, _, problems = load_visdrone(tmp_path)
    assert len(samples) == 1 and len(samples[0].boxes) == 1
    assert len(problems) == 4 and all("f.txt:" in p.where for p in problems)


def test_coco_image_without_width_reads_the_file(tmp_path):
    from querydet_cli.training.datasets import load_coco

    (tmp_path / "images").mkdir()
    write_tif(tmp_path / "images" / "a.tif", paint(80, 60, [(5, 5, 20, 20)]))
    (tmp_path / "gt.json").write_text(json.dumps({
        "images": [{"id": 3, "file_name": "a.tif"}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [5, 5, 15, 15],
                         "area": 225, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "car"}]}))
    samples, _, problems = load_coco(tmp_path / "gt.json")
    assert (samples[0].width, samples[0].height) == (80, 60) and not problems


def test_tile_cuts_a_16_bit_plain_image(tmp_path):
    from querydet_cli.training.chips import cut_chips
    from querydet_cli.training.datasets import load_coco

    (tmp_path / "src" / "images").mkdir(parents=True)
    write_tif(tmp_path / "src" / "images" / "a.tif",
              paint(96, 80, [(5, 5, 30, 30)], dtype="uint16", scale=200))
    (tmp_path / "src" / "gt.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.tif", "width": 96, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 25, 25],
                         "area": 625, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "car"}]}))
    samples, names, _ = load_coco(tmp_path / "src" / "gt.json")
    path = cut_chips(samples, names, tmp_path / "chips", size=64)
    files = [im["file_name"] for im in json.loads(path.read_text())["images"]]
    assert files and all(f.endswith(".tif") for f in files)


class _RangeHandler:
    """A static file server on 127.0.0.1 that answers HTTP Range requests (GDAL's /vsicurl/)."""

    @staticmethod
    def serve(folder):
        import http.server
        import re as _re
        import threading

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.translate_path(self.path)
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                data = open(path, "rb").read()
                match = _re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    body = data[start:end + 1]
                else:
                    self.send_response(200)
                    body = data
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def test_gdal_paths_go_straight_to_rasterio(tmp_path, monkeypatch):
    import zipfile

    src = write_tif(tmp_path / "scene.tif", paint(200, 160, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as z:
        z.write(src, "inner/scene.tif")
    reference = tmp_path / "ref.ndjson"
    run_detect(OracleModel(), Config(), [str(src)], str(reference), "ndjson", OPTS, CPU)
    expected = sorted(tuple(f["properties"]["bbox_px"]) for f in map(json.loads, open(reference)))
    server = _RangeHandler.serve(tmp_path)
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "10")
    monkeypatch.setenv("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", ".tif")
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    try:
        url = f"/vsicurl/http://127.0.0.1:{server.server_address[1]}/scene.tif"
        for name in (f"/vsizip/{tmp_path / 'scenes.zip'}/inner/scene.tif", url):
            out = tmp_path / "o.ndjson"
            summary = run_detect(OracleModel(), Config(), [name], str(out), "ndjson", OPTS, CPU)
            assert summary.done == 1, summary.failed
            feats = [json.loads(line) for line in open(out)]
            assert sorted(tuple(f["properties"]["bbox_px"]) for f in feats) == expected
            assert {f["properties"]["source"] for f in feats} == {name}  # not collapsed by Path
    finally:
        server.shutdown()
    from querydet_cli.reading.inputs import expand_inputs

    assert expand_inputs(["s3://bucket/a.tif"]) == ["s3://bucket/a.tif"]


def test_vrt_with_a_missing_source_names_it(tmp_path):
    src = write_tif(tmp_path / "part.tif", paint(200, 160, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    vrt = tmp_path / "mosaic.vrt"
    with open(vrt, "w") as f:
        f.write(f"""<VRTDataset rasterXSize="200" rasterYSize="160">
  <GeoTransform>0, 1, 0, 0, 0, -1</GeoTransform>
""" + "".join(f"""  <VRTRasterBand dataType="Byte" band="{b}">
    <SimpleSource><SourceFilename relativeToVRT="1">part.tif</SourceFilename>
      <SourceBand>{b}</SourceBand></SimpleSource>
  </VRTRasterBand>
""" for b in (1, 2, 3)) + "</VRTDataset>\n")
    src.unlink()
    summary = run_detect(OracleModel(), Config(), [str(vrt)], str(tmp_path / "o.ndjson"),
                         "ndjson", OPTS, CPU)
    assert summary.done == 0
    assert "part.tif" in summary.failed[0][1] and "missing" in summary.failed[0][1]


def test_file_size_limit_while_writing_is_one_line_and_keeps_the_journal(tmp_path):
    import resource

    def limit():  # EFBIG after 4 kB per file; Python ignores SIGXFSZ, so writes fail cleanly
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    objects = [(x, y, x + 12, y + 12) for x in range(5, 380, 25) for y in range(5, 300, 25)]
    src = write_tif(tmp_path / "many.tif", paint(400, 320, objects[:250]), Affine(1, 0, 0, 0, -1, 0))
    from querydet_models.checkpoint import save_checkpoint
    from tests.conftest import tiny_model

    model = tiny_model()
    weights = tmp_path / "m.pt"
    cfg = Config()
    from dataclasses import replace as dc_replace

    cfg = dc_replace(cfg, model=dc_replace(cfg.model, backbone="resnet18", fpn_channels=32,
                                           num_classes=3), class_names=("a", "b", "c"))
    save_checkpoint(weights, model, cfg.to_dict(), ["a", "b", "c"])
    proc = subprocess.run([sys.executable, "-m", "querydet_cli", "detect", str(src), "-o",
                           str(tmp_path / "o.ndjson"), "--weights", str(weights),
                           "--score-threshold", "0.0", "--tile-size", "128", "--overlap", "16",
                           "--quiet"], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("querydet: error: cannot write") and "--resume" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.ndjson").exists()


def test_planted_symlink_and_unwritable_outputs_are_one_line(tmp_path):
    src = write_tif(tmp_path / "a.tif", paint(200, 160, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (tmp_path / ".o.ndjson.querydet-partial").symlink_to(victim)
    for out in (tmp_path / "o.ndjson", "/proc/o.ndjson"):
        proc = _cli("detect", src, "-o", out, "--quiet")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("querydet: error: ")
    assert (victim / "keep.txt").read_text() == "precious"  # nothing followed the link
    with pytest.raises(QueryDetError, match="in the way"):
        run_detect(OracleModel(), Config(), [str(src)], str(tmp_path / "o.ndjson"), "ndjson",
                   OPTS, CPU)


def test_checkpoint_without_config_and_bad_max_dets_are_one_line(tmp_path):
    weights = tmp_path / "noconfig.pt"
    torch.save({"format": "querydet-checkpoint-v1", "model": {}}, weights)
    src = write_tif(tmp_path / "a.tif", paint(200, 160, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    proc = _cli("detect", src, "-o", tmp_path / "o.ndjson", "--weights", weights, "--quiet")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"querydet: error: checkpoint {weights} has no config or no weights: not written by "
        "querydet train (or damaged)"]
    assert not (tmp_path / "o.ndjson").exists()
    for bad in ("0", "-5"):
        proc = _cli("eval", "--weights", weights, "--max-dets", bad, "--out", tmp_path / "ev")
        assert proc.returncode == 2 and "'--max-dets'" in proc.stderr
        assert not (tmp_path / "ev").exists()


def test_progress_counts_tiles_to_exactly_its_total(tmp_path):
    src = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), Affine(1, 0, 0, 0, -1, 0))
    bars = []

    class Bar:
        def __init__(self, name, total):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    run_detect(OracleModel(), Config(), [str(src)], str(tmp_path / "o.ndjson"), "ndjson", OPTS,
               CPU, progress_factory=Bar)
    assert bars and bars[0].n == bars[0].total == 9  # 3 x 3 tiles of 128 px
