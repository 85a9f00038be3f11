"""`querydet view --edit`: a person corrects detections on the map and saves labels to train on.

The browser test drives the served page in headless chromium with real mouse and key events
(cdp.py): it deletes a box, draws one, gives a box another class, marks a reviewed area and
saves; `tile --labels` then reads exactly those labels. The server's own tests post as another
page would: without the token, from another origin or host, to another path, and killed halfway
through a save.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rio_tiler")

from querydet_cli.outputs.corrections import Corrections, Image, Label, is_corrected, read_corrections, temporary, write_corrections  # noqa: E402,E501
from querydet_cli.training.vector_labels import load_vector_labels  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "sample_data" / "sample_scene.tif"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


def _querydet(*args, cwd):
    return subprocess.run([sys.executable, "-m", "querydet_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def detections(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit")
    run = _querydet("detect", SAMPLE, "-o", d / "cars.geojson", "--quiet", cwd=d)
    assert run.returncode == 0, run.stderr
    return d / "cars.geojson"


class Server:
    """`querydet view --edit --serve` on a free port, until stopped."""

    def __init__(self, *args, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "querydet_cli", "view", *map(str, args), "--edit", "--serve",
             "--port", "0"], cwd=cwd, stderr=subprocess.PIPE, text=True)
        line = ""
        while "serving http" not in line:
            line = self.process.stderr.readline()
            assert line, "the server ended before serving"
        self.url = re.search(r"http://127\.0\.0\.1:\d+/", line)[0]
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # drain

    def token(self) -> str:
        html = urllib.request.urlopen(self.url, timeout=30).read().decode()
        data = json.loads(re.search(r'id="querydet-data">(.*?)</script>', html, re.S)[1])
        return data["edit"]["token"]

    def post(self, body: bytes, headers: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + "save", data=body, method="POST",
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self, sig=signal.SIGINT) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=30)


def _screen(page, x: float, y: float) -> tuple[float, float]:
    """A raster pixel's point on the screen."""
    return tuple(page.evaluate(
        f"(() => {{ const V = window.querydetView; const p = V.map.latLngToContainerPoint("
        f"V.toLatLng({x}, {y})); const r = V.map.getContainer().getBoundingClientRect(); "
        f"return [r.left + p.x, r.top + p.y]; }})()"))


def _boxes(page) -> np.ndarray:
    return np.array(page.evaluate("(() => { const B = window.querydetView.B; return B.x1.map("
                                  "(v, i) => [B.x1[i], B.y1[i], B.x2[i], B.y2[i]]); })()"))


def _empty_spot(boxes: np.ndarray, area: tuple, side: float) -> tuple[float, float]:
    """The top-left of a free square of `side` inside `area`, clear of every box."""
    for y in np.arange(area[1] + 10, area[3] - side - 10, 8):
        for x in np.arange(area[0] + 10, area[2] - side - 10, 8):
            clear = ((boxes[:, 0] > x + side + 4) | (boxes[:, 2] < x - 4)
                     | (boxes[:, 1] > y + side + 4) | (boxes[:, 3] < y - 4))
            if clear.all():
                return float(x), float(y)
    raise AssertionError("no free spot in the area")


@browser
def test_a_person_corrects_the_detections_and_tile_learns_exactly_those_labels(detections,
                                                                               tmp_path):
    from tests.cli.viewer.cdp import Browser

    target = tmp_path / "corrected.gpkg"
    server = Server(detections, "--raster", SAMPLE, "--save", target, "--classes", "shrub",
                    cwd=tmp_path)
    page = Browser(CHROMIUM, tmp_path / "profile")
    try:
        page.open(server.url)
        page.wait_for("document.getElementById('map').dataset.editor === 'ready'")
        boxes = _boxes(page)
        gone, reclassed = 0, 1
        x1, y1 = boxes[[gone, reclassed], :2].min(0) - 60
        x2, y2 = boxes[[gone, reclassed], 2:].max(0) + 60
        area = (max(0.0, x1), max(0.0, y1), min(1024.0, max(x2, x1 + 260)),
                min(1024.0, max(y2, y1 + 260)))
        # delete a box: click it, press Delete
        page.click(*_screen(page, *(boxes[gone, :2] + boxes[gone, 2:]) / 2))
        assert page.evaluate("document.getElementById('map').dataset.selected") == str(gone)
        page.key("Delete")
        # another class: click a box, press 1 (the first class, --classes shrub)
        page.click(*_screen(page, *(boxes[reclassed, :2] + boxes[reclassed, 2:]) / 2))
        page.key("1")
        # draw a box (B, then drag) where there is none, then move it 12 px right (Esc, drag it)
        sx, sy = _empty_spot(boxes, area, 30)
        page.key("b")
        page.drag(*_screen(page, sx, sy), *_screen(page, sx + 30, sy + 30))
        page.key("Escape")
        page.click(*_screen(page, sx + 15, sy + 15))
        page.drag(*_screen(page, sx + 15, sy + 15), *_screen(page, sx + 27, sy + 15))
        sx += 12
        # resize another box: select it, drag its lower right corner 6 px out
        resized = 2
        page.click(*_screen(page, *(boxes[resized, :2] + boxes[resized, 2:]) / 2))
        page.drag(*_screen(page, *boxes[resized, 2:]), *_screen(page, *(boxes[resized, 2:] + 6)))
        # mark the reviewed area (A, then drag) and save (Ctrl+S)
        page.key("a")
        page.drag(*_screen(page, area[0], area[1]), *_screen(page, area[2], area[3]))
        page.key("Escape")
        assert page.evaluate("document.getElementById('map').dataset.edits") == "6"
        # undo the area and redo it: the same six edits
        page.key("z", ctrl=True)
        assert page.evaluate("document.getElementById('map').dataset.areas") == "0"
        page.key("y", ctrl=True)
        page.key("s", ctrl=True)
        saved = int(page.wait_for("document.getElementById('map').dataset.saved"))
        shown = _boxes(page)
        cls = page.evaluate("window.querydetView.B.cls")
        names = page.evaluate("window.querydetView.DATA.classNames")
        area_px = page.evaluate("(() => { const a = []; window.querydetView.map.eachLayer((l) =>"
                                " { if (l.options && l.options.dashArray === '6 4') a.push(1); });"
                                " return a.length; })()")
    finally:
        page.close()
        server.stop()
    assert saved == len(boxes) and area_px == 1  # one deleted, one drawn
    assert names[0] == "shrub" and names[cls[reclassed]] == "shrub"
    drawn = shown[-1]
    assert np.allclose(drawn, [sx, sy, sx + 30, sy + 30], atol=2)

    # the file: every box but the deleted one, the drawn one added, the re-classed one edited
    found = read_corrections(target, _image())
    assert len(found.labels) == len(boxes) and len(found.areas) == 1
    statuses = [x.status for x in found.labels]
    assert statuses.count("added") == 1 and statuses.count("edited") == 2
    added = next(x for x in found.labels if x.status == "added")
    assert np.allclose(added.bbox, drawn, atol=0.01) and added.score == 1
    edited = [x for x in found.labels if x.status == "edited"]
    assert {x.class_name for x in edited} == {"shrub", names[cls[resized]]}
    grown = next(x for x in edited if x.class_name != "shrub" or x.bbox[2] > boxes[resized, 2])
    assert np.allclose(grown.bbox, [*boxes[resized, :2], *(boxes[resized, 2:] + 6)], atol=1.5)
    assert not any(np.allclose(x.bbox, boxes[gone], atol=0.01) for x in found.labels)
    assert np.allclose(found.areas[0], area, atol=2)
    inside = [x for x in found.labels if x.status in ("accepted", "edited", "added")]
    for x in inside:
        cx, cy = (x.bbox[0] + x.bbox[2]) / 2, (x.bbox[1] + x.bbox[3]) / 2
        assert found.areas[0][0] <= cx <= found.areas[0][2]
        assert found.areas[0][1] <= cy <= found.areas[0][3]

    # tile reads exactly those labels, and cuts chips only inside the area
    labels = load_vector_labels([str(SAMPLE)], target)
    sample = labels.samples[0]
    assert labels.total == len(found.labels) and labels.reviewed == 1
    saved_boxes = np.array([x.bbox for x in found.labels]).clip(0, 1024)  # tile clips to the raster
    gap = np.abs(saved_boxes[:, None, :] - sample.boxes[None, :, :]).max(-1)  # (saved, read)
    assert len(sample.boxes) == len(saved_boxes) and (gap.min(1) < 0.02).all() \
        and (gap.min(0) < 0.02).all()
    run = _querydet("tile", SAMPLE, "--labels", target, "--size", 64, "--overlap", 0, "--out",
                    tmp_path / "chips", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    chips = json.loads((tmp_path / "chips" / "annotations.json").read_text())
    a = found.areas[0]
    assert chips["images"] and all(
        a[0] - 1e-3 <= x and x + w <= a[2] + 1e-3 and a[1] - 1e-3 <= y and y + h <= a[3] + 1e-3
        for x, y, w, h in (im["window"] for im in chips["images"]))

    # reopened, the file goes on where it stopped (and saves to itself)
    again = Server(target, "--raster", SAMPLE, cwd=tmp_path)
    page = Browser(CHROMIUM, tmp_path / "profile2")
    try:
        page.open(again.url)
        page.wait_for("document.getElementById('map').dataset.editor === 'ready'")
        state = page.evaluate("(() => { const d = document.getElementById('map').dataset; "
                              "return [d.labels, d.areas, window.querydetView.DATA.edit.target];"
                              " })()")
    finally:
        page.close()
        again.stop()
    assert state == [str(len(found.labels)), "1", str(target)]


def _image() -> Image:
    import rasterio

    with rasterio.open(SAMPLE) as src:
        return Image(SAMPLE.name, src.width, src.height, src.crs, src.transform)


def _body(n: int = 2) -> bytes:
    boxes = [{"x1": 10 + k % 900, "y1": 10 + (k // 900) % 900, "x2": 20 + k % 900,
              "y2": 20 + (k // 900) % 900, "cls": "car", "score": 0.5, "status": "accepted"}
             for k in range(n)]
    return json.dumps({"boxes": boxes, "areas": [[0, 0, 1000, 1000]]}).encode()


def test_the_server_saves_only_from_its_own_page_and_only_to_the_named_file(detections,
                                                                           tmp_path):
    target = tmp_path / "corrected.gpkg"
    server = Server(detections, "--raster", SAMPLE, "--save", target, cwd=tmp_path)
    try:
        token = server.token()
        own = {"Content-Type": "application/json", "X-QueryDet-Token": token,
               "Origin": f"http://127.0.0.1:{server.port}"}
        refused = [
            server.post(_body(), {k: v for k, v in own.items() if k != "X-QueryDet-Token"}),
            server.post(_body(), own | {"X-QueryDet-Token": "guessed"}),
            server.post(_body(), own | {"Origin": "http://evil.example"}),
            server.post(_body(), {k: v for k, v in own.items() if k != "Origin"}),
            server.post(_body(), own | {"Host": f"evil.example:{server.port}",
                                        "Origin": f"http://evil.example:{server.port}"}),
            server.post(json.dumps(json.loads(_body()) | {"path": str(tmp_path / "other.gpkg")}
                                   ).encode(), own),
            server.post(json.dumps(json.loads(_body()) | {"path": "../../etc/x.gpkg"}).encode(),
                        own)]
        assert [code for code, _ in refused] == [403] * 7, refused
        assert not target.exists() and not (tmp_path / "other.gpkg").exists()
        code, answer = server.post(b'{"boxes": [{"x1": "nan"}], "areas": []}', own)
        assert code == 400 and "not a valid save" in answer["error"] and not target.exists()
        code, answer = server.post(json.dumps(json.loads(_body()) | {"path": str(target)}
                                              ).encode(), own)
        assert (code, answer) == (200, {"path": str(target), "labels": 2, "areas": 1})
    finally:
        server.stop()
    assert is_corrected(target) and len(read_corrections(target, _image()).labels) == 2


def test_a_save_killed_halfway_leaves_the_last_complete_file(detections, tmp_path):
    target = tmp_path / "corrected.gpkg"
    write_corrections(target, Corrections([Label((1, 2, 3, 4), "car", 0.9, "accepted")],
                                          [(0, 0, 10, 10)]), _image())
    before = target.read_bytes()
    server = Server(detections, "--raster", SAMPLE, "--save", target, cwd=tmp_path)
    try:
        own = {"Content-Type": "application/json", "X-QueryDet-Token": server.token(),
               "Origin": f"http://127.0.0.1:{server.port}"}
        def post() -> None:
            try:
                server.post(_body(200_000), own)
            except OSError:  # the server is killed before it answers
                pass

        posting = threading.Thread(target=post, daemon=True)
        posting.start()
        deadline = time.monotonic() + 120
        while not temporary(target).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert temporary(target).exists()  # the save is being written
    finally:
        server.stop(signal.SIGKILL)
    assert target.read_bytes() == before  # the old file, whole
    # the next server removes what the killed save left
    again = Server(detections, "--raster", SAMPLE, "--save", target, cwd=tmp_path)
    again.stop()
    assert not temporary(target).exists() and target.read_bytes() == before


def test_edit_refuses_bad_requests_in_one_line_and_writes_nothing(detections, tmp_path):
    cases = [
        (["--edit"], "give it with --raster"),
        (["--raster", SAMPLE, "--save", tmp_path / "x.gpkg"], "options of --edit"),
        (["--edit", "--raster", SAMPLE, "--save", tmp_path / "x.shp"], "give a .gpkg or .geojson"),
        (["--edit", "--raster", SAMPLE, "--save", tmp_path / "x.json"], "is georeferenced"),
        (["--edit", "--raster", SAMPLE, "--save", tmp_path / "no" / "x.gpkg"],
         "in an existing folder"),
        (["--edit", "--raster", SAMPLE, "--save", SAMPLE.with_suffix(".gpkg").name],
         None),  # fine: written only when saved
    ]
    corrupt = tmp_path / "corrupt.geojson"
    corrupt.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')
    run = _querydet("view", corrupt, "--raster", SAMPLE, "--edit", "-o", tmp_path / "page.html",
                    cwd=tmp_path)
    assert run.returncode == 2 and "not a querydet detections file" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert corrupt.read_text().startswith('{"type"')  # the input as it was
    corrupt.unlink()
    for args, said in cases:
        run = _querydet("view", detections, *args, "-o", tmp_path / "page.html", cwd=tmp_path)
        if said is None:
            assert run.returncode == 0, run.stderr
            continue
        assert run.returncode == 2 and said in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "page.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def _png_and_detections(folder: Path) -> tuple[Path, Path]:
    """The sample as a plain PNG (no georeference) and its detections as CSV."""
    import rasterio
    from PIL import Image as Picture

    with rasterio.open(SAMPLE) as src:
        Picture.fromarray(src.read([1, 2, 3]).transpose(1, 2, 0)).save(folder / "scene.png")
    run = _querydet("detect", folder / "scene.png", "-o", folder / "scene.csv", "--quiet",
                    cwd=folder)
    assert run.returncode == 0, run.stderr
    return folder / "scene.png", folder / "scene.csv"


@browser
@pytest.mark.parametrize("georeferenced", [True, False], ids=["geotiff", "png"])
def test_the_offline_page_downloads_what_tile_reads(detections, tmp_path, georeferenced):
    """Without a server the page builds the file itself: a GeoJSON whose features carry their
    role for a GeoTIFF, COCO with reviewed_areas for a plain image."""
    from tests.cli.viewer.cdp import Browser

    raster, found = (SAMPLE, detections) if georeferenced else _png_and_detections(tmp_path)
    page_file = tmp_path / "edit.html"
    run = _querydet("view", found, "--raster", raster, "--edit", "-o", page_file,
                    cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    page = Browser(CHROMIUM, tmp_path / "profile")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    try:
        page.open(page_file.as_uri())
        page.call("Browser.setDownloadBehavior", {"behavior": "allow",
                                                  "downloadPath": str(downloads)})
        page.wait_for("document.getElementById('map').dataset.editor === 'ready'")
        page.key("a")
        page.drag(*_screen(page, 0, 0), *_screen(page, 512, 512))
        page.evaluate("document.getElementById('qd-save').click()")
        suffix = "*.geojson" if georeferenced else "*.json"
        deadline = time.monotonic() + 30
        while not list(downloads.glob(suffix)) and time.monotonic() < deadline:
            time.sleep(0.1)
        n = len(_boxes(page))
    finally:
        page.close()
    (saved,) = downloads.glob(suffix)
    if georeferenced:
        assert saved.name == "cars.corrected.geojson"
        labels = load_vector_labels([str(SAMPLE)], saved)
        assert labels.total == n and labels.reviewed == 1
        area = labels.samples[0].reviewed
    else:
        from querydet_cli.training.datasets import load_coco

        assert saved.name == "scene.corrected.json"
        samples, names, problems = load_coco(saved, tmp_path)
        assert not problems and len(samples[0].boxes) == n
        area = samples[0].reviewed
    assert np.allclose(area.bounds, (0, 0, 512, 512), atol=2)
