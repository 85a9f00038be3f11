"""`querydet view --edit`: a model's detections (or a corrected file, to go on with it) made
editable on the map, and the save that writes the corrected file (outputs/corrections.py).

Served (`--serve`), the page posts its corrections to /save and the server writes the one file
named on the command line, atomically. The post must come from the server's own page: it carries
a token written into that page (another site cannot read the page, so cannot learn it), the Host
header must be the server's own address (a DNS name rebound to 127.0.0.1 is refused) and the
Origin header the page's. Offline, the page builds the same file in the browser and downloads it.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import QueryDetError
from ..outputs.corrections import (STATUSES, Corrections, Image, Label, check_target,
                                   is_corrected, read_corrections, temporary, write_corrections)
from ..outputs.geometry import crs_urn
from .page import PALETTE, Box


@dataclass
class EditSession:
    """What one editing page works on: the raster, the file its saves go to, the classes."""

    image: Image
    target: Path
    classes: list[str]
    boxes: list[Box]
    areas: list[tuple[float, float, float, float]]
    token: str | None  # None: the offline page (saves are downloads)

    def page_settings(self) -> dict[str, Any]:
        """The editor's part of the page's data (editor.js reads it as DATA.edit)."""
        t = self.image.transform
        # the offline page builds GeoJSON on the map (a GeoPackage is beyond a browser), COCO off
        download = (self.target.with_suffix(".geojson") if self.image.georeferenced
                    else self.target).name
        return {"source": 0, "token": self.token, "target": str(self.target),
                "download": download, "image": self.image.name, "width": self.image.width,
                "height": self.image.height,
                "transform": [t.a, t.b, t.c, t.d, t.e, t.f] if self.image.georeferenced else None,
                "crs": crs_urn(self.image.crs.to_string()) if self.image.georeferenced else None,
                "areas": [list(a) for a in self.areas]}

    def groups(self) -> list[tuple[str, str]]:
        return [(n, PALETTE[k % len(PALETTE)]) for k, n in enumerate(self.classes)]


def raster_image(path: str) -> Image:
    """The raster's name, size and georeference (None for a plain image)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                georef = src.crs is not None and not src.transform.is_identity
                return Image(Path(path).name, src.width, src.height,
                             src.crs if georef else None, src.transform if georef else None)
    except RasterioIOError as err:
        raise QueryDetError(f"--raster {path}: not a readable raster "
                            f"({str(err).splitlines()[0]})") from None


def default_target(detections: Path, image: Image) -> Path:
    """Where saves go unless --save says: a corrected file itself (to go on with it), else
    beside the detections, `.corrected.gpkg` (`.corrected.json`, COCO, without georeference)."""
    if is_corrected(detections):
        return detections
    stem = detections.name.split(".")[0] or detections.stem
    return detections.with_name(stem + (".corrected.gpkg" if image.georeferenced
                                        else ".corrected.json"))


def open_session(detections: Path, raster: str, target: Path | None, classes: list[str],
                 served: bool) -> EditSession:
    """The boxes to edit (a detections output, or a corrected file's labels and areas) over one
    raster, and the file saves go to."""
    from .page import check_boxes, read_detections

    image = raster_image(raster)
    target = target or default_target(detections, image)
    check_target(target, image)
    if target.is_dir() or not target.parent.is_dir():
        raise QueryDetError(f"--save {target}: give a file in an existing folder")
    if target.resolve() == Path(raster).resolve():
        raise QueryDetError(f"--save {target} is the raster; give another name")
    areas: list[tuple[float, float, float, float]] = []
    if is_corrected(detections):
        found = read_corrections(detections, image)
        boxes = [Box(image.name, x.class_name, x.score, x.bbox, status=x.status)
                 for x in found.labels]
        areas = found.areas
    else:
        boxes = read_detections(detections)
        check_boxes(boxes, detections)
        sources = sorted({b.source for b in boxes})
        if len(sources) > 1:
            raise QueryDetError(f"--edit corrects one raster at a time; {detections} holds the "
                                f"detections of {len(sources)} ({', '.join(sources[:3])}...)")
        boxes = [Box(image.name, b.class_name, b.score, b.bbox) for b in boxes]
    names = list(dict.fromkeys([*classes, *sorted({b.class_name for b in boxes})]))
    if not names:
        raise QueryDetError("--edit: no detections and no --classes: name the classes to draw "
                            "(--classes tree,car)")
    if served:
        temporary(target).unlink(missing_ok=True)  # a save killed halfway left it
    return EditSession(image, target, names, boxes, areas,
                       secrets.token_urlsafe(24) if served else None)


class SaveEndpoint:
    """POST /save of the served editing page: checks who posts, then writes the file."""

    def __init__(self, session: EditSession) -> None:
        self.session = session

    def handle(self, headers: Any, body: bytes, port: int) -> tuple[int, dict[str, Any]]:
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        host = headers.get("Host", "")
        if host not in hosts:
            return 403, {"error": f"Host {host!r} is not this server"}
        if headers.get("Origin") != f"http://{host}":
            return 403, {"error": "saves are accepted only from this server's own page"}
        if not secrets.compare_digest(headers.get("X-QueryDet-Token", ""),
                                      self.session.token or "\0"):
            return 403, {"error": "the page's token is missing or wrong (reload the page)"}
        if not headers.get("Content-Type", "").startswith("application/json"):
            return 415, {"error": "a save is JSON"}
        try:
            corrections, path = parse_payload(body)
        except QueryDetError as err:
            return 400, {"error": str(err)}
        if path is not None and Path(path).resolve() != self.session.target.resolve():
            return 403, {"error": f"saves go to {self.session.target} only"}
        try:
            write_corrections(self.session.target, corrections, self.session.image)
        except QueryDetError as err:
            return 500, {"error": str(err)}
        return 200, {"path": str(self.session.target), "labels": len(corrections.labels),
                     "areas": len(corrections.areas)}


def parse_payload(body: bytes) -> tuple[Corrections, str | None]:
    """The page's corrections, every number finite and every box the right way round; and the
    path the page asked for, if it named one."""
    try:
        data = json.loads(body)
        boxes, areas = data["boxes"], data["areas"]
        if not isinstance(boxes, list) or not isinstance(areas, list):
            raise TypeError("boxes and areas are lists")
        out = Corrections()
        for k, b in enumerate(boxes):
            box = _box([b["x1"], b["y1"], b["x2"], b["y2"]], f"box {k + 1}")
            score = float(b["score"])
            if not (isinstance(b["cls"], str) and b["cls"] and math.isfinite(score)
                    and 0 <= score <= 1 and b["status"] in STATUSES):
                raise ValueError(f"box {k + 1}: class, score (0..1) or status is not valid")
            out.labels.append(Label(box, b["cls"], score, b["status"]))
        out.areas = [_box(a, f"area {k + 1}") for k, a in enumerate(areas)]
        path = data.get("path")
    except (ValueError, KeyError, TypeError) as err:
        raise QueryDetError(f"not a valid save: {err}") from None
    return out, path if isinstance(path, str) else None


def _box(values: list, what: str) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise ValueError(f"{what} is not a box of positive size")
    return x1, y1, x2, y2
