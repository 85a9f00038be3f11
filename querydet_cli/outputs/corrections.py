"""A corrected labels file: what a person's review of a model's detections leaves (`view
--edit`), and what `tile --labels` / `tile --annotations` learn from.

It holds labels and reviewed areas. Inside a reviewed area the labels are the whole truth (what
was not kept is not there); outside, nothing is known. Three forms, by the file's suffix:

- `.gpkg`: a `labels` layer (polygons in the raster's CRS; fields `label`, `score`, `status`)
  and a `reviewed_areas` layer (polygons), as QGIS shows them;
- `.geojson`: one collection whose features have a `role`: `label` or `reviewed_area`;
- `.json` (an image without a georeference): COCO, the image's `reviewed_areas` as
  `[x, y, width, height]` rectangles, each annotation with its `score` and `status`.

A label's status: `accepted` (a detection left as it was, inside a reviewed area), `edited`
(moved, resized or given another class), `added` (drawn by the person; score 1), `detected` (a
detection outside every reviewed area, kept so that a reopened file shows it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import QueryDetError
from .geometry import pixel_box_ring

LABELS_LAYER = "labels"  # the labels layer of a file that also holds reviewed areas
REVIEWED_LAYER = "reviewed_areas"  # where a file's labels are the whole truth
ROLE_FIELD = "role"  # in a one-layer file (GeoJSON): "reviewed_area" marks an area, else a label
AREA_ROLE, LABEL_ROLE = "reviewed_area", "label"
STATUSES = ("accepted", "edited", "added", "detected")
SUFFIXES = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "COCO"}


@dataclass(frozen=True)
class Label:
    bbox: tuple[float, float, float, float]  # pixels x1, y1, x2, y2
    class_name: str
    score: float
    status: str


@dataclass
class Corrections:
    labels: list[Label] = field(default_factory=list)
    areas: list[tuple[float, float, float, float]] = field(default_factory=list)  # pixel boxes


@dataclass(frozen=True)
class Image:
    """The raster the corrections are drawn on: its name and size, and its georeference (None
    for a plain image: the file is then COCO)."""

    name: str
    width: int
    height: int
    crs: Any = None
    transform: Any = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None


def check_target(path: Path, image: Image) -> None:
    """A corrected file's name must say a form this image can have."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise QueryDetError(f"--save {path}: give a .gpkg or .geojson file (or .json, COCO, for "
                            "an image without a georeference)")
    if image.georeferenced == (kind == "COCO"):
        raise QueryDetError(f"--save {path}: {image.name} is "
                            + ("georeferenced: save as .gpkg or .geojson" if image.georeferenced
                               else "not georeferenced: save as .json (COCO)"))


def write_corrections(path: Path, corrections: Corrections, image: Image) -> None:
    """Write the file whole or not at all: a temporary file beside it, renamed over it."""
    check_target(path, image)
    tmp = temporary(path)
    tmp.unlink(missing_ok=True)
    try:
        kind = SUFFIXES[path.suffix.lower()]
        if kind == "COCO":
            tmp.write_text(json.dumps(_coco(corrections, image)))
        else:
            _write_vector(tmp, kind, corrections, image)
        os.replace(tmp, path)
    except OSError as err:
        raise QueryDetError(f"{path}: cannot save ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def temporary(path: Path) -> Path:
    """Where a save is written before it is renamed into place (the same folder, so the rename
    is atomic; the same suffix, so GDAL knows the driver)."""
    return path.with_name(f".{path.stem}.querydet-tmp{path.suffix}")


def _frame(corrections: Corrections, image: Image):
    import geopandas as gpd
    from shapely.geometry import Polygon

    t = image.transform
    affine = (t.a, t.b, t.c, t.d, t.e, t.f)
    labels = gpd.GeoDataFrame(
        {"label": [x.class_name for x in corrections.labels],
         "score": [float(x.score) for x in corrections.labels],
         "status": [x.status for x in corrections.labels]},
        geometry=[Polygon(pixel_box_ring(x.bbox, affine)) for x in corrections.labels],
        crs=image.crs)
    areas = gpd.GeoDataFrame({"note": ["reviewed"] * len(corrections.areas)},
                             geometry=[Polygon(pixel_box_ring(a, affine))
                                       for a in corrections.areas], crs=image.crs)
    return labels, areas


def _write_vector(tmp: Path, kind: str, corrections: Corrections, image: Image) -> None:
    import pandas as pd

    labels, areas = _frame(corrections, image)
    if kind == "GPKG":
        labels.to_file(tmp, driver="GPKG", layer=LABELS_LAYER, geometry_type="Polygon")
        areas.to_file(tmp, driver="GPKG", layer=REVIEWED_LAYER, mode="a",
                      geometry_type="Polygon")
        return
    both = pd.concat([labels.assign(role=LABEL_ROLE),
                      areas.drop(columns="note").assign(role=AREA_ROLE)], ignore_index=True)
    both.to_file(tmp, driver="GeoJSON", geometry_type="Polygon")


def _coco(corrections: Corrections, image: Image) -> dict[str, Any]:
    names = sorted({x.class_name for x in corrections.labels})
    ids = {n: k + 1 for k, n in enumerate(names)}
    return {"images": [{"id": 1, "file_name": image.name, "width": image.width,
                        "height": image.height,
                        "reviewed_areas": [[x1, y1, x2 - x1, y2 - y1]
                                           for x1, y1, x2, y2 in corrections.areas]}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": ids[x.class_name],
                             "bbox": [x.bbox[0], x.bbox[1], x.bbox[2] - x.bbox[0],
                                      x.bbox[3] - x.bbox[1]],
                             "area": (x.bbox[2] - x.bbox[0]) * (x.bbox[3] - x.bbox[1]),
                             "iscrowd": 0, "score": x.score, "status": x.status}
                            for k, x in enumerate(corrections.labels)],
            "categories": [{"id": ids[n], "name": n} for n in names]}


def is_corrected(path: Path) -> bool:
    """Whether a file is a corrected labels file (it holds reviewed areas, or labels with a
    status), not a detections output."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        return False
    if kind == "COCO":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and any(
            isinstance(im, dict) and "reviewed_areas" in im for im in data.get("images", []))
    import pyogrio

    try:
        layers = {name for name, _ in pyogrio.list_layers(path)}
        if REVIEWED_LAYER in layers:
            return True
        return ROLE_FIELD in pyogrio.read_info(path)["fields"]
    except Exception:  # unreadable: the detections reader says why
        return False


def corrected_frames(path, read: Callable[[Any, str | None], Any], layer: str | None = None):
    """(labels, reviewed areas) of a map file as GeoDataFrames, areas None for a plain labels
    layer: a `reviewed_areas` layer beside `labels` (GeoPackage), or features whose `role` is
    `reviewed_area` (GeoJSON). `read(path, layer)` reads one layer (each caller says its own
    errors); `layer` picks one, and then no `reviewed_areas` layer is looked for."""
    import pyogrio

    try:
        layers = {name for name, _ in pyogrio.list_layers(path)}
    except Exception:  # unreadable: `read` says why
        layers = set()
    if layer is None and REVIEWED_LAYER in layers:
        return (read(path, LABELS_LAYER if LABELS_LAYER in layers else None),
                read(path, REVIEWED_LAYER))
    labels = read(path, layer)
    if ROLE_FIELD in labels.columns and (labels[ROLE_FIELD] == AREA_ROLE).any():
        is_area = (labels[ROLE_FIELD] == AREA_ROLE).to_numpy()
        return labels[~is_area], labels[is_area]
    return labels, None


def _read_frame(path: Path, layer: str | None):
    import geopandas as gpd

    try:
        return gpd.read_file(path, layer=layer)
    except Exception as err:  # pyogrio / GDAL: corrupt file, missing layer
        raise QueryDetError(f"{path}: cannot read the corrections ({str(err).splitlines()[0]})"
                            ) from None


def read_corrections(path: Path, image: Image) -> Corrections:
    """A corrected file (any form) in the image's pixels, to continue where it stopped."""
    if SUFFIXES.get(path.suffix.lower()) == "COCO":
        return _read_coco(path)
    labels, areas = corrected_frames(path, _read_frame)
    if areas is None:
        areas = labels.iloc[:0]
    if not image.georeferenced:
        raise QueryDetError(f"{path} is a map file but {image.name} has no georeference")
    boxes = _pixels(labels, image)
    names = labels["label"].astype(str).tolist() if "label" in labels else ["object"] * len(boxes)
    scores = labels["score"].tolist() if "score" in labels else [1.0] * len(boxes)
    statuses = labels["status"].tolist() if "status" in labels else ["edited"] * len(boxes)
    out = Corrections()
    for box, name, score, status in zip(boxes.tolist(), names, scores, statuses):
        score = 1.0 if score is None or not math.isfinite(float(score)) else float(score)
        out.labels.append(Label(tuple(box), name, score,
                                status if status in STATUSES else "edited"))
    out.areas = [tuple(b) for b in _pixels(areas, image).tolist()]
    return out


def _pixels(frame, image: Image) -> np.ndarray:
    """Each feature's bounds as a pixel box of the image."""
    from .geometry import map_boxes_to_pixels

    frame = frame[frame.geometry.notna()]
    if frame.crs is not None and image.crs is not None and frame.crs != image.crs:
        frame = frame.to_crs(image.crs)
    b = frame.geometry.bounds
    corners = np.stack([b["minx"], b["miny"], b["maxx"], b["maxy"]], 1) if len(b) else \
        np.zeros((0, 4))
    return map_boxes_to_pixels(corners, image.transform).round(3)


def _read_coco(path: Path) -> Corrections:
    try:
        data = json.loads(path.read_text())
        names = {c["id"]: str(c["name"]) for c in data["categories"]}
        image = data["images"][0]
        out = Corrections()
        for a in data["annotations"]:
            x, y, w, h = (float(v) for v in a["bbox"])
            status = a.get("status") if a.get("status") in STATUSES else "edited"
            out.labels.append(Label((x, y, x + w, y + h), names[a["category_id"]],
                                    float(a.get("score", 1.0)), status))
        out.areas = [(float(x), float(y), float(x) + float(w), float(y) + float(h))
                     for x, y, w, h in image.get("reviewed_areas", [])]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise QueryDetError(f"{path}: not a corrected COCO file ({err})") from None
    return out
