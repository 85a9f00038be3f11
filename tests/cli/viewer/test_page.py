"""`querydet view`, `detect --html`, `eval --save-vis` pages, and `view --serve` tiles.

Pages are opened in a real headless browser (Debian's chromium, no network) where one is
installed; the page marks its map element with data-features (boxes drawn after filtering) and
data-ready. Tests that drive a control append a script to a copy of the page: it moves the real
slider (an `input` event) or clicks a real checkbox and records the counts the page shows.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("xstatic.pkg.leaflet")

from querydet_cli.viewer.page import read_detections  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "sample_data" / "sample_scene.tif"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


def _querydet(*args, cwd, check=True):
    run = subprocess.run([sys.executable, "-m", "querydet_cli", *map(str, args)], cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def _open(page: Path, *, extra_script: str = "") -> dict[str, str]:
    """The map element's data attributes once the page has run, in headless chromium."""
    if extra_script:
        copy = page.with_name("driven_" + page.name)
        html = page.read_text(encoding="utf-8")
        copy.write_text(html.replace("</body>", f"<script>{extra_script}</script></body>"),
                        encoding="utf-8")
        page = copy
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    tag = re.search(r'<div id="map"[^>]*>', dom)
    assert tag, dom[-2000:]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag[0]))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("view")
    # as make demo runs it: the output's folder does not exist yet
    _querydet("detect", SAMPLE, "-o", d / "new" / "cars.geojson", "--html", "--quiet", cwd=d)
    for f in (d / "new").iterdir():
        f.rename(d / f.name)
    return d


def test_detect_html_writes_a_page_next_to_the_output(sample_run):
    page = sample_run / "cars.html"
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in \
        html.split('id="querydet-data"')[1].split("</script>")[0]  # no network in the data
    data = json.loads(re.search(r'id="querydet-data">(.*?)</script>', html, re.S)[1])
    features = json.loads((sample_run / "cars.geojson").read_text())["features"]
    assert len(data["boxes"]["score"]) == len(features) > 0
    assert data["sources"][0]["image"].startswith("data:image/png;base64,")
    assert data["sources"][0]["width"] == 1024


@browser
def test_the_page_draws_every_box_of_the_sample(sample_run):
    n = len(json.loads((sample_run / "cars.geojson").read_text())["features"])
    seen = _open(sample_run / "cars.html")
    assert seen["ready"] == "true" and int(seen["features"]) == n


@browser
def test_the_score_slider_and_class_toggles_change_the_count(sample_run):
    feats = [f["properties"] for f in
             json.loads((sample_run / "cars.geojson").read_text())["features"]]
    script = """
      const m = document.getElementById('map'), s = document.getElementById('score');
      s.value = '0.8'; s.dispatchEvent(new Event('input'));
      m.dataset.atEight = m.dataset.features;
      s.value = '0'; s.dispatchEvent(new Event('input'));
      document.getElementById('group-0').click();
      m.dataset.withoutFirst = m.dataset.features;
      m.dataset.firstCount = document.getElementById('count-0').textContent;"""
    seen = _open(sample_run / "cars.html", extra_script=script)
    first = sorted({p["class_name"] for p in feats})[0]
    assert int(seen["at-eight"]) == sum(round(p["score"], 4) >= 0.8 for p in feats) < len(feats)
    assert int(seen["without-first"]) == sum(p["class_name"] != first for p in feats)
    assert int(seen["first-count"]) == 0


def _many_boxes(path: Path, n: int, side: int = 16384) -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, side - 40, (n, 2)).round(1)
    wh = rng.uniform(6, 40, (n, 2)).round(1)
    score = rng.uniform(0.3, 1.0, n).round(4)
    classes = ["car", "truck", "person", "tree", "building"]
    with path.open("w") as fh:
        for k in range(n):
            x, y = xy[k]
            w, h = wh[k]
            fh.write(json.dumps({"type": "Feature", "geometry": None, "properties": {
                "source": "big.tif", "image_id": 1, "class_id": k % 5,
                "category_id": k % 5 + 1, "class_name": classes[k % 5], "score": float(score[k]),
                "bbox_px": [float(x), float(y), float(x + w), float(y + h)]}}) + "\n")


@browser
def test_a_hundred_thousand_boxes_are_drawn_and_filtered(tmp_path):
    _many_boxes(tmp_path / "many.ndjson", 100_000)
    _querydet("view", tmp_path / "many.ndjson", "-o", tmp_path / "many.html", cwd=tmp_path)
    script = """
      const m = document.getElementById('map'), s = document.getElementById('score');
      const t = performance.now();
      s.value = '0.9'; s.dispatchEvent(new Event('input'));
      m.dataset.filterMs = String(Math.round(performance.now() - t));
      m.dataset.atNine = m.dataset.features;"""
    seen = _open(tmp_path / "many.html", extra_script=script)
    scores = [b.score for b in read_detections(tmp_path / "many.ndjson")]
    assert seen["ready"] == "true"
    assert int(seen["at-nine"]) == sum(s >= 0.9 for s in scores)


@browser
def test_a_screenshot_of_the_sample_page_is_not_blank(sample_run):
    shot = sample_run / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--virtual-time-budget=10000", "--window-size=1000,700",
                    f"--screenshot={shot}", (sample_run / "cars.html").as_uri()],
                   capture_output=True, timeout=180)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    map_part = pixels[:, 300:]
    assert map_part.std() > 20  # imagery and boxes, not one flat colour
    # the class colours are on screen: the tree boxes' green (#7cff4f)
    green = (abs(map_part - [124, 255, 79]).sum(axis=2) < 60).sum()
    assert green > 50


@pytest.mark.parametrize("fmt", ["gpkg", "json", "csv", "ndjson"])
def test_every_output_format_reads_back_the_same_boxes(sample_run, fmt):
    out = sample_run / f"again.{fmt}"
    _querydet("detect", SAMPLE, "-o", out, "--quiet", cwd=sample_run)
    want = read_detections(sample_run / "cars.geojson")
    got = read_detections(out)
    key = lambda b: (b.class_name, b.score, tuple(round(v, 2) for v in b.bbox))  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, want))
    assert {Path(b.source).name for b in got} == {SAMPLE.name}


def test_eval_save_vis_marks_true_and_false_positives_and_misses(tmp_path):
    from querydet_cli.training.metrics import ImageDetections
    from querydet_cli.viewer.page import review_boxes

    truth = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], np.float32)
    dets = ImageDetections(np.array([[1, 1, 10, 10], [0, 0, 9, 9], [200, 200, 210, 210],
                                     [50, 50, 60, 60]], np.float32),
                           np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 0, 0, 1]))
    boxes = review_boxes("a.png", ["car", "tree"], dets, truth, np.array([0, 0, 0]), 0.3)
    groups = [b.group for b in boxes]
    # best score first: the 0.9 box takes the first truth; the 0.8 duplicate is false; the
    # 0.6 box of another class does not match; truths 2 and 3 are misses
    assert groups == ["true positive", "false positive", "false positive", "false positive",
                      "miss", "miss"]
    assert [b.score for b in boxes[-2:]] == [-1.0, -1.0]


def test_eval_save_vis_writes_the_review_page(tmp_path):
    _querydet("eval", "--weights", ROOT / "sample_data" / "sample_model.pt", "--dataset", "coco",
              "--val-annotations", ROOT / "sample_data" / "sample_scene.json", "--val-root",
              ROOT / "sample_data", "--sigma", "0.15", "--save-vis", "--out", tmp_path / "ev",
              cwd=tmp_path)
    html = (tmp_path / "ev" / "vis" / "review.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="querydet-data">(.*?)</script>', html, re.S)[1])
    assert [g["name"] for g in data["groups"]] == ["true positive", "false positive", "miss"]
    truth = json.loads((ROOT / "sample_data" / "sample_scene.json").read_text())["annotations"]
    tp = data["boxes"]["group"].count(0)
    assert tp + data["boxes"]["group"].count(2) == len(truth)  # every truth box: found or missed


@pytest.mark.parametrize("args, message", [
    (["missing.geojson"], "file not found"),
    (["bad.geojson"], "not a querydet detections file"),
    (["cars.geojson", "-o", "cars.geojson"], "is the detections file"),
    (["cars.geojson", "--raster", "nothere.tif", "-o", "p.html"], "file not found"),
    (["cars.geojson", "-o", "nofolder/p.html"], "does not exist"),
    (["truth.json"], "expected a GeoJSON FeatureCollection, COCO results list, CSV, NDJSON or GeoPackage"),
])
def test_bad_input_is_one_line_and_leaves_nothing(sample_run, tmp_path, args, message):
    shutil.copy(sample_run / "cars.geojson", tmp_path / "cars.geojson")
    (tmp_path / "bad.geojson").write_text('{"type": "FeatureCollection", "features": [{"x": 1}]}')
    shutil.copy(ROOT / "sample_data" / "sample_scene.json", tmp_path / "truth.json")  # COCO truth
    before = sorted(p.name for p in tmp_path.iterdir())
    run = _querydet("view", *args, cwd=tmp_path, check=False)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_detect_html_with_stdout_is_a_usage_error(tmp_path):
    run = _querydet("detect", SAMPLE, "-o", "-", "--html", cwd=tmp_path, check=False)
    assert run.returncode == 2 and "--html" in run.stderr
    assert list(tmp_path.iterdir()) == []
    run = _querydet("detect", SAMPLE, "-o", "x.html", "--format", "geojson", "--html",
                    cwd=tmp_path, check=False)
    assert run.returncode == 2 and "already ends in .html" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_serve_without_rio_tiler_says_how(tmp_path, sample_run):
    shim = tmp_path / "shim" / "rio_tiler"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('rio_tiler is not installed')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shim"))
    run = subprocess.run([sys.executable, "-m", "querydet_cli", "view",
                          str(sample_run / "cars.geojson"), "--raster", str(SAMPLE), "--serve"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "pip install 'querydet[view]'" in run.stderr, run.stderr


def _write_raster(path: Path, side: int) -> None:
    from querydet_cli.training.synthetic import write_big_raster

    write_big_raster(path, side)


def _serve(tmp_path: Path, raster: Path, detections: Path):
    proc = subprocess.Popen([sys.executable, "-m", "querydet_cli", "view", str(detections),
                             "--raster", str(raster), "--serve", "--port", "0"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    assert m, line + proc.stderr.read()
    return proc, f"http://127.0.0.1:{m[1]}"


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


def _check_server(tmp_path: Path, side: int) -> dict:
    raster = tmp_path / "big.tif"
    _write_raster(raster, side)
    _many_boxes(tmp_path / "big.ndjson", 1000, side)
    proc, url = _serve(tmp_path, raster, tmp_path / "big.ndjson")
    try:
        page = urllib.request.urlopen(url + "/", timeout=30).read().decode("utf-8")
        data = json.loads(re.search(r'id="querydet-data">(.*?)</script>', page, re.S)[1])
        top = data["sources"][0]["maxzoom"]
        timings = {}
        for z, x, y in [(top, 3, 5), (top, 10, 2), (top - 2, 1, 1), (0, 0, 0), (top - 1, 0, 0)]:
            t0 = time.perf_counter()
            body = urllib.request.urlopen(f"{url}/tiles/0/{z}/{x}/{y}.png", timeout=30).read()
            timings[(z, x, y)] = time.perf_counter() - t0
            assert body[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image
        import io

        tile = np.asarray(Image.open(io.BytesIO(body)))
        assert tile.shape == (256, 256, 4) and tile[..., :3].std() > 1
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/tiles/0/{top}/9999/0.png", timeout=30)
        return {"timings": timings, "rss_mb": _rss_mb(proc.pid), "maxzoom": top}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_serve_answers_tiles_of_a_large_geotiff(tmp_path):
    found = _check_server(tmp_path, 4096)
    assert found["maxzoom"] == 4
    assert max(found["timings"].values()) < 5  # generous: a shared CI machine; README has the figure


@pytest.mark.slow
def test_serve_a_16384_geotiff_with_bounded_memory(tmp_path):
    found = _check_server(tmp_path, 16384)
    # the raster is 768 MB of pixels; the server holds one tile window and a 2048 px overview
    assert found["rss_mb"] < 600, found
    print(found)
