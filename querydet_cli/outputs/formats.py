"""The output formats, one class each: its name, suffixes, whether it needs map coordinates, how
it writes a stream of `Detection`s and how `querydet view` reads a file of it back.

`FORMATS` is the one list: `detect --format`'s choices, its help text, the suffix map and the
viewer's reader all derive from it. Adding a format is one class here, added to the list.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, ClassVar, TextIO

from ..core.errors import QueryDetError
from .geometry import crs_urn, is_geographic, rfc7946_ring, to_lonlat, wkt_polygon
from .records import VIDEO_FIELDS, Detection


class Format:
    """One output format. A writer instance streams one file: `begin`, `write` for each record
    (the `index`-th), `end`; it writes text to `fh`, or to the file at `path` itself when
    `text` is False. `read` gives a file's records back."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]  # the first one is the format's own
    label: ClassVar[str]  # how help texts name it: ".json (COCO)"
    needs_crs: ClassVar[bool] = False  # map coordinates: refused for a plain image
    text: ClassVar[bool] = True  # written as text through a file handle (so also to stdout)

    def __init__(self, fh: TextIO | None, crs: str | None, rfc7946: bool, path: str | None,
                 fields: tuple[str, ...] = ()) -> None:
        """`fields`: the video fields (records.VIDEO_FIELDS) that a run's records carry, for
        formats with a fixed set of columns."""
        self.fh, self.crs, self.rfc7946, self.path = fh, crs, rfc7946, path
        self.fields = fields

    def begin(self) -> None:
        pass

    def write(self, d: Detection, index: int) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass

    @classmethod
    def read(cls, path: Path) -> list[Detection]:
        raise NotImplementedError

    def _needs_map(self, d: Detection) -> None:
        if d.geometry is None:
            raise QueryDetError(f"{d.source} is not georeferenced: {self.name} needs map "
                                f"coordinates; use {map_free_choices(by_name=True)}")


class GeoJSON(Format):
    """A FeatureCollection in the source CRS (named in the file) or EPSG:4326 (--rfc7946)."""

    name, suffixes, label, needs_crs = "geojson", (".geojson",), ".geojson", True
    digits: int | None = None  # coordinate decimals, set on the first feature

    def begin(self) -> None:
        head: dict[str, Any] = {"type": "FeatureCollection"}
        if not self.rfc7946 and self.crs:
            head["crs"] = {"type": "name", "properties": {"name": crs_urn(self.crs)}}
        self.fh.write(json.dumps(head)[:-1] + ', "features": [\n')

    def write(self, d: Detection, index: int) -> None:
        self._needs_map(d)
        feature = {"type": "Feature",
                   "geometry": {"type": "Polygon", "coordinates": [self._ring(d.geometry)]},
                   "properties": {"source": d.source, "image_id": d.image_id,
                                  "class_id": d.class_id, "class_name": d.class_name,
                                  "score": d.score, "category_id": d.category_id,
                                  "bbox_px": list(d.bbox)} | d.video_fields()}
        self.fh.write(("" if index == 0 else ",\n") + json.dumps(feature))

    def _ring(self, ring: list[list[float]]) -> list[list[float]]:
        """Counter-clockwise exterior ring (RFC 7946's right-hand rule), coordinates rounded to
        7 decimals for degrees (about 1 cm) and 3 for projected units (1 mm in metres)."""
        if self.digits is None:
            self.digits = 7 if self.rfc7946 or is_geographic(self.crs) else 3
        return rfc7946_ring(ring, self.digits)

    def end(self) -> None:
        self.fh.write("\n]}\n")

    @classmethod
    def read(cls, path: Path) -> list[Detection]:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_json(cls, doc: Any) -> list[Detection]:
        """The records of a parsed FeatureCollection."""
        if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
            raise ValueError("expected a GeoJSON FeatureCollection, COCO results list, CSV, "
                             "NDJSON or GeoPackage")
        crs = doc.get("crs", {}).get("properties", {}).get("name")
        return [feature_detection(f, crs) for f in doc["features"]]


class Coco(Format):
    """COCO results: pixel boxes (x, y, w, h) with image and category ids."""

    name, suffixes, label = "coco", (".json",), ".json (COCO)"

    def begin(self) -> None:
        self.fh.write("[\n")

    def write(self, d: Detection, index: int) -> None:
        x1, y1, x2, y2 = d.bbox
        item = {"image_id": d.image_id, "category_id": d.category_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d.score,
                "category_name": d.class_name, "file_name": d.source} | d.video_fields()
        self.fh.write(("" if index == 0 else ",\n") + json.dumps(item))

    def end(self) -> None:
        self.fh.write("\n]\n")

    @classmethod
    def read(cls, path: Path) -> list[Detection]:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_json(cls, doc: Any) -> list[Detection]:
        """The records of a parsed COCO results list."""
        if not isinstance(doc, list):
            raise ValueError("expected a COCO results list")
        out = []
        for d in doc:
            x, y, w, h = (float(v) for v in d["bbox"])
            video = {k: d[k] for k in VIDEO_FIELDS if k in d}
            out.append(Detection(str(d.get("file_name", d["image_id"])), d["image_id"], None,
                                 str(d.get("category_name", d["category_id"])),
                                 d["category_id"], float(d["score"]), (x, y, x + w, y + h),
                                 **video))
        return out


class Csv(Format):
    """One row per detection: the pixel box, a WKT polygon and the CRS it is in."""

    name, suffixes, label = "csv", (".csv",), ".csv"
    FIELDS = ["source", "image_id", "class_id", "category_id", "class_name", "score", "x1", "y1",
              "x2", "y2", "wkt", "crs"]

    def begin(self) -> None:
        csv.writer(self.fh).writerow(self.FIELDS + list(self.fields))

    def write(self, d: Detection, index: int) -> None:
        video = ["" if getattr(d, f) is None else getattr(d, f) for f in self.fields]
        csv.writer(self.fh).writerow([d.source, d.image_id, d.class_id, d.category_id,
                                      d.class_name, d.score, *d.bbox, wkt_polygon(d.geometry),
                                      d.crs or "", *video])

    @classmethod
    def read(cls, path: Path) -> list[Detection]:
        rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
        return [Detection(r["source"], int(r["image_id"]), int(r["class_id"]), r["class_name"],
                          int(r["category_id"]), float(r["score"]),
                          (float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"])),
                          None, r["crs"] or None, **_video_columns(r)) for r in rows]


class Ndjson(Format):
    """A GeoJSON text sequence (RFC 8142), one lon/lat Feature per line."""

    name, suffixes, label = "ndjson", (".ndjson", ".jsonl"), ".ndjson"

    def write(self, d: Detection, index: int) -> None:
        self.fh.write(json.dumps(ndjson_feature(d)) + "\n")

    @classmethod
    def read(cls, path: Path) -> list[Detection]:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [feature_detection(json.loads(line)) for line in lines if line.strip()]


class GeoPackage(Format):
    """A `detections` layer, appended in chunks of 5000 through geopandas."""

    name, suffixes, label, needs_crs, text = "gpkg", (".gpkg",), ".gpkg", True, False
    COLUMNS = ("source", "image_id", "class_id", "category_id", "class_name", "score")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rows: list[Detection] = []
        self.written = False

    def write(self, d: Detection, index: int) -> None:
        self._needs_map(d)
        self.rows.append(d)
        if len(self.rows) >= 5000:
            self._flush()

    def _flush(self) -> None:
        import geopandas as gpd
        from shapely.geometry import Polygon

        rows, self.rows = self.rows, []
        if not rows and self.written:
            return
        columns = {c: [getattr(d, c) for d in rows] for c in self.COLUMNS + self.fields}
        columns |= {c: [d.bbox[k] for d in rows] for k, c in enumerate(("x1", "y1", "x2", "y2"))}
        frame = gpd.GeoDataFrame(columns, geometry=[Polygon(d.geometry) for d in rows],
                                 crs=self.crs)
        frame.to_file(self.path, driver="GPKG", layer="detections",
                      mode="a" if self.written else "w")
        self.written = True

    def end(self) -> None:
        self._flush()

    @classmethod
    def read(cls, path: Path) -> list[Detection]:
        import pyogrio

        try:
            frame = pyogrio.read_dataframe(path, read_geometry=False)
        except Exception as err:  # pyogrio raises its own DataSourceError family
            raise QueryDetError(f"{path}: not a readable GeoPackage "
                                f"({str(err).splitlines()[0]})") from None
        return [Detection(str(r.source), int(r.image_id), int(r.class_id), str(r.class_name),
                          int(r.category_id), float(r.score),
                          (float(r.x1), float(r.y1), float(r.x2), float(r.y2)))
                for r in frame.itertuples()]


class Mot(Format):
    """MOT Challenge lines, as tracking benchmarks read them: frame (from 1), track id (-1 when
    not tracked), x, y, w, h, score, -1, -1, -1. Frames of a video count from its first frame;
    an image's frame is its image id. The class is not part of the format."""

    name, suffixes, label = "mot", (".txt",), ".txt (MOT)"

    def write(self, d: Detection, index: int) -> None:
        frame = d.frame_index + 1 if d.frame_index is not None else d.image_id
        x1, y1, x2, y2 = d.bbox
        track = -1 if d.track_id is None else d.track_id
        self.fh.write(f"{frame},{track},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},"
                      f"{d.score:.5f},-1,-1,-1\n")

    @classmethod
    def read(cls, path: Path) -> list[Detection]:
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            frame, track, x, y, w, h, score = line.split(",")[:7]
            x, y, w, h = float(x), float(y), float(w), float(h)
            out.append(Detection(path.name, int(frame), None, "object", 0, float(score),
                                 (x, y, x + w, y + h), frame_index=int(frame) - 1,
                                 track_id=None if int(track) < 0 else int(track)))
        return out


# the one list: order is how help texts name them
FORMATS: tuple[type[Format], ...] = (GeoJSON, GeoPackage, Coco, Csv, Ndjson, Mot)


def names() -> list[str]:
    """Every format's name (`--format` choices)."""
    return [f.name for f in FORMATS]


def by_name(name: str) -> type[Format]:
    """The format called `name`, or one line listing the names."""
    for f in FORMATS:
        if f.name == name:
            return f
    raise QueryDetError(f"--format: {name!r} is not one of {', '.join(names())}")


def by_suffix(path: str | Path) -> type[Format] | None:
    """The format a file name's suffix says, or None."""
    suffix = Path(path).suffix.lower()
    return next((f for f in FORMATS if suffix in f.suffixes), None)


def suffix_help(formats: tuple[type[Format], ...] = FORMATS) -> str:
    """How help texts list suffixes: ".geojson .gpkg .json (COCO) .csv .ndjson"."""
    return " ".join(f.label for f in formats)


def map_free_choices(by_name: bool = False) -> str:
    """The formats that need no georeference, said as a user's choice: "-o with .json (COCO),
    .csv or .ndjson", or by name: "--format coco, csv or ndjson"."""
    free = [f.name if by_name else f.label for f in FORMATS if not f.needs_crs]
    return f"{'--format' if by_name else '-o with'} {', '.join(free[:-1])} or {free[-1]}"


def format_for(output: str, fmt: str | None) -> type[Format]:
    """The output format: --format if given, else from the file suffix (stdout: NDJSON)."""
    if fmt:
        return by_name(fmt)
    if output == "-":
        return Ndjson
    found = by_suffix(output)
    if found is None:
        every = ", ".join(s for f in FORMATS for s in f.suffixes)
        raise QueryDetError(f"cannot tell the output format from {output!r}: use a suffix "
                            f"({every}) or --format")
    return found


def read_detections(path: Path) -> list[Detection]:
    """The records of any querydet output, by its suffix (unknown suffixes: tried as JSON, the
    GeoJSON or COCO that `detect --format` may have written under another name)."""
    if not path.exists():
        raise QueryDetError(f"{path}: file not found")
    if path.is_dir():
        raise QueryDetError(f"{path}: is a directory, not a detections file")
    fmt = by_suffix(path)
    try:
        if fmt in (None, Coco):  # .json holds COCO results, or GeoJSON written by --format
            doc = json.loads(path.read_text(encoding="utf-8"))  # parsed once, by its shape
            return (Coco if isinstance(doc, list) else GeoJSON).from_json(doc)
        return fmt.read(path)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError,
            ValueError, AttributeError) as err:
        raise QueryDetError(f"{path}: not a querydet detections file ({type(err).__name__}: "
                            f"{str(err)[:160]})") from None


def ndjson_feature(d: Detection) -> dict[str, Any]:
    """One line of NDJSON output: a GeoJSON Feature (RFC 8142 text sequence, RFC 7946 geometry:
    lon/lat, counter-clockwise), so GDAL's GeoJSONSeq driver and geopandas read it. The pixel box
    and the source CRS are properties; a non-georeferenced source has a null geometry."""
    geometry = None
    if d.geometry is not None:
        ring = d.geometry
        if d.crs and d.crs.upper() not in ("EPSG:4326", "OGC:CRS84"):
            ring = to_lonlat(ring, d.crs)
        geometry = {"type": "Polygon", "coordinates": [rfc7946_ring(ring, 7)]}
    props = {"source": d.source, "image_id": d.image_id, "class_id": d.class_id,
             "category_id": d.category_id, "class_name": d.class_name, "score": d.score,
             "crs": d.crs}
    props |= {"bbox_px": list(d.bbox)} | d.video_fields()
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _video_columns(row: dict[str, str]) -> dict[str, Any]:
    """The video fields of a CSV row, those present and filled."""
    kinds = {"frame_index": int, "time_s": float, "track_id": int}
    return {k: kinds[k](row[k]) for k in VIDEO_FIELDS if row.get(k)}


def feature_detection(f: dict[str, Any], crs: str | None = None) -> Detection:
    """A record from a GeoJSON Feature that querydet wrote (GeoJSON or NDJSON)."""
    p = f["properties"]
    ring = (f.get("geometry") or {}).get("coordinates", [None])[0]
    return Detection(str(p["source"]), p["image_id"], p["class_id"], str(p["class_name"]),
                     p["category_id"], float(p["score"]),
                     tuple(float(v) for v in p["bbox_px"]), ring, p.get("crs", crs),
                     **{k: p[k] for k in VIDEO_FIELDS if p.get(k) is not None})
