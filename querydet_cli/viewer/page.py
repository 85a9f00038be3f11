"""`querydet view`: an offline web page of detections over their imagery.

Boxes are shown in each raster's own pixels (Leaflet's CRS.Simple), the space every output format
records them in (`bbox_px`, x1..y2, COCO bbox), so no reprojection can move them. Small rasters
are embedded as one picture; a large one is embedded as an overview, or served at full resolution
as map tiles by `view --serve` (view_server.py). Leaflet's JavaScript and CSS come from the
XStatic-Leaflet package (a dependency), read from its files and written into the page: the page
needs no network.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

from ..core.errors import QueryDetError

PALETTE = ["#ffd400", "#00e5ff", "#ff4fd8", "#7cff4f", "#ff8c1a", "#b28cff", "#ff4f4f",
           "#4fa3ff", "#f5f5f5", "#c8ff00"]
STATUS_COLOURS = {"true positive": "#2ee65a", "false positive": "#ff3b3b", "miss": "#ffa31a"}


@dataclass
class Box:
    source: str
    class_name: str
    score: float  # -1: ground truth (a miss), shown at every score
    bbox: tuple[float, float, float, float]  # pixels x1, y1, x2, y2
    group: str = ""  # what the colour says: the class, or a status (true/false positive, miss)
    status: str = ""  # a corrected file's label status (outputs/corrections.py), when editing


@dataclass
class SourceView:
    name: str
    width: int
    height: int
    maxzoom: int  # halvings until the raster fits one 256 px tile (rio-tiler's local pyramid)
    image: str | None = None  # data: URI of the embedded picture
    tiles: str | None = None  # tile URL template when served
    path: str | None = None  # the raster behind it
    note: str = ""


@dataclass
class Page:
    title: str
    boxes: list[Box]
    sources: list[SourceView]
    groups: list[tuple[str, str]] = field(default_factory=list)  # (name, colour)
    min_score: float = 0.0
    note: str = ""
    index: dict[str, int] = field(default_factory=dict)  # detection source -> sources position
    classes: list[str] | None = None  # the class list (editing: every class a box may take)
    edit: dict | None = None  # the editor's settings (viewer/editing.py); None: view only


def read_detections(path: Path) -> list[Box]:
    """Boxes of any querydet output (outputs/formats.py reads each format)."""
    from ..outputs.formats import read_detections as read_records

    return [Box(d.source, d.class_name, d.score, tuple(float(v) for v in d.bbox))
            for d in read_records(path)]


def check_boxes(boxes: list[Box], path: Path) -> None:
    """Scores in [0, 1] and finite boxes, or one line naming the first bad one."""
    for k, b in enumerate(boxes):
        if not all(math.isfinite(v) for v in (*b.bbox, b.score)) or not -1 <= b.score <= 1:
            raise QueryDetError(f"{path}: detection {k + 1} has a non-finite box or a score "
                                f"outside 0..1 ({b.bbox}, {b.score})")


def maxzoom_for(width: int, height: int, tile: int = 256) -> int:
    """Halvings until the raster fits one tile: the depth of rio-tiler's local tile pyramid."""
    z, side = 0, max(width, height)
    while side > tile:
        side /= 2
        z += 1
    return z


def raster_view(path: str, embed_max: int, bands: tuple[int, ...] | None = None) -> SourceView:
    """A raster embedded as a PNG of at most `embed_max` pixels a side (its overview when
    larger)."""
    from PIL import Image

    from ..reading.raster import RasterSource

    with RasterSource(path, bands) as src:
        rgb, scale = src.overview(embed_max)
        valid = src.overview_valid(rgb.shape[:2])
        width, height = src.width, src.height
    rgba = np.dstack([rgb, np.where(valid, 255, 0).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", optimize=False)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    note = "" if scale <= 1 else (f"{Path(path).name} is {width}x{height}: embedded at 1/"
                                  f"{scale:.3g} of its resolution (querydet view --serve shows "
                                  "every pixel)")
    return SourceView(Path(path).name, width, height, maxzoom_for(width, height), image=uri,
                      path=str(path), note=note)


def match_sources(boxes: list[Box], rasters: list[str]) -> dict[str, int]:
    """Each detection source's raster index: by path, else by file name; a single source and a
    single raster belong together whatever their names."""
    names = list(dict.fromkeys(b.source for b in boxes))
    by_path = {str(Path(r).resolve()): k for k, r in enumerate(rasters)}
    by_name = {Path(r).name: k for k, r in enumerate(rasters)}
    found: dict[str, int] = {}
    for n in names:
        k = by_path.get(str(Path(n).resolve()), by_name.get(Path(n).name))
        if k is not None:
            found[n] = k
    if len(names) == 1 and len(rasters) == 1:
        found = {names[0]: 0}
    return found


def build_page(boxes: list[Box], rasters: list[SourceView], title: str, min_score: float = 0.0,
               groups: list[tuple[str, str]] | None = None, note: str = "") -> Page:
    """The page's sources: the given rasters first (in order), then a plain background for each
    detection source without one, sized to its boxes."""
    sources = list(rasters)
    index = match_sources(boxes, [s.path or s.name for s in rasters])
    for name in dict.fromkeys(b.source for b in boxes):
        if name not in index:
            mine = [b.bbox for b in boxes if b.source == name]
            w = int(max(x2 for _, _, x2, _ in mine)) + 16
            h = int(max(y2 for _, _, _, y2 in mine)) + 16
            index[name] = len(sources)
            sources.append(SourceView(Path(name).name, w, h, maxzoom_for(w, h),
                                      note=f"{Path(name).name}: no raster given (--raster)"))
    if not sources:
        sources.append(SourceView("(no detections)", 256, 256, 0))
    for b in boxes:
        b.group = b.group or b.class_name
    if groups is None:
        names = sorted(dict.fromkeys(b.group for b in boxes))
        groups = [(n, PALETTE[k % len(PALETTE)]) for k, n in enumerate(names)]
    return Page(title, boxes, sources, groups, min_score, note, index)


def render(page: Page) -> str:
    """The self-contained HTML of a page (Leaflet and the viewer inlined)."""
    leaflet = _leaflet_dir()
    static = resources.files("querydet_cli.viewer") / "static"
    group_of = {n: k for k, (n, _) in enumerate(page.groups)}
    class_names = page.classes or sorted(dict.fromkeys(b.class_name for b in page.boxes))
    class_of = {n: k for k, n in enumerate(class_names)}
    kept = [b for b in page.boxes if b.group in group_of]
    index = page.index
    data = {"groups": [{"name": n, "color": c} for n, c in page.groups],
            "classNames": class_names, "minScore": page.min_score,
            "sources": [{"name": s.name, "width": s.width, "height": s.height,
                         "maxzoom": s.maxzoom, "image": s.image, "tiles": s.tiles}
                        for s in page.sources],
            "boxes": {"x1": [round(b.bbox[0], 1) for b in kept],
                      "y1": [round(b.bbox[1], 1) for b in kept],
                      "x2": [round(b.bbox[2], 1) for b in kept],
                      "y2": [round(b.bbox[3], 1) for b in kept],
                      "score": [round(b.score, 4) for b in kept],
                      "group": [group_of[b.group] for b in kept],
                      "cls": [class_of[b.class_name] for b in kept],
                      "source": [index[b.source] for b in kept]}}
    editing = {"edit_panel": "", "editor_script": ""}
    if page.edit is not None:
        data["edit"] = page.edit
        data["boxes"]["status"] = [b.status for b in kept]
        served = bool(page.edit.get("token"))
        panel = Template((static / "editor.html").read_text(encoding="utf-8")).substitute(
            save_label="Save" if served else "Download",
            save_note=_escape(f"Save writes {page.edit['target']}." if served else
                              f"Download saves {page.edit['download']} where your browser puts "
                              "downloads (querydet view --edit --serve saves the file itself)."))
        editing = {"edit_panel": panel, "editor_script": "<script>" + (
            static / "editor.js").read_text(encoding="utf-8") + "</script>\n"}
    notes = [page.note] + [s.note for s in page.sources if s.note]
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return Template((static / "viewer.html").read_text(encoding="utf-8")).substitute(
        title=_escape(page.title), total=f"{len(kept):,}", data=text,
        note="<br>".join(_escape(n) for n in notes if n),
        leaflet_css=(leaflet / "leaflet.css").read_text(encoding="utf-8"),
        leaflet_js=(leaflet / "leaflet.js").read_text(encoding="utf-8"),
        viewer_js=(static / "viewer.js").read_text(encoding="utf-8"), **editing)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _leaflet_dir() -> Path:
    try:
        import xstatic.pkg.leaflet as leaflet
    except ImportError:
        raise QueryDetError("querydet view needs Leaflet from the XStatic-Leaflet package (a "
                            "dependency of querydet): pip install xstatic-leaflet") from None
    return Path(leaflet.BASE_DIR)


def review_boxes(source: str, names: list[str], dets, truth_boxes: np.ndarray,
                 truth_labels: np.ndarray, min_score: float, iou: float = 0.5) -> list[Box]:
    """One image's detections (score >= min_score) matched to its ground truth at `iou`, best
    score first, class by class: true positives, false positives and misses (unmatched truth)."""
    from ..core.boxes import box_iou

    keep = dets.scores >= min_score
    boxes, scores, labels = dets.boxes[keep], dets.scores[keep], dets.labels[keep]
    taken = np.zeros(len(truth_boxes), bool)
    out = []
    overlaps = box_iou(boxes, truth_boxes)
    for i in np.argsort(-scores, kind="stable"):
        ok = (truth_labels == labels[i]) & ~taken
        j = int(np.argmax(np.where(ok, overlaps[i], -1))) if ok.any() else -1
        hit = j >= 0 and overlaps[i, j] >= iou
        if hit:
            taken[j] = True
        out.append(Box(source, names[int(labels[i])], float(scores[i]),
                       tuple(float(v) for v in boxes[i]),
                       "true positive" if hit else "false positive"))
    out += [Box(source, names[int(truth_labels[j])], -1.0, tuple(float(v) for v in truth_boxes[j]),
                "miss") for j in np.flatnonzero(~taken)]
    return out


def status_groups() -> list[tuple[str, str]]:
    return list(STATUS_COLOURS.items())


def write_page(html: str, out: Path) -> None:
    """The page written whole or not at all (a temporary file renamed over the old one)."""
    tmp = out.with_name(f".{out.name}.querydet-tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise QueryDetError(f"{out}: cannot write the page ({err.strerror})") from None
