"""Detection outputs: GeoJSON, GeoPackage, COCO results, CSV, NDJSON; atomic when written to files.

A record is one detection: source file, image_id, class id and name, score, pixel box (xyxy,
pixel-edge coordinates: pixel (0, 0) spans [0, 1) x [0, 1)) and, for georeferenced sources, its
polygon in the source CRS (or EPSG:4326 lon/lat with --rfc7946), through the full affine
transform, so rotated, sheared and south-up rasters come out right.

File outputs go to a temporary file beside the target and are renamed into place only when
complete, so a failed or interrupted run never leaves a truncated file that looks finished.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, TextIO

from .errors import QueryDetError

FORMATS = ("geojson", "gpkg", "coco", "csv", "ndjson")
GEO_FORMATS = ("geojson", "gpkg")
_SUFFIXES = {".geojson": "geojson", ".gpkg": "gpkg", ".json": "coco", ".csv": "csv",
             ".ndjson": "ndjson", ".jsonl": "ndjson"}
CSV_FIELDS = ["source", "image_id", "class_id", "category_id", "class_name", "score", "x1", "y1",
              "x2", "y2", "wkt", "crs"]


def format_for(output: str, fmt: str | None) -> str:
    """The output format: --format if given, else from the file suffix (stdout: ndjson)."""
    if fmt:
        if fmt not in FORMATS:
            raise QueryDetError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    if output == "-":
        return "ndjson"
    suffix = Path(output).suffix.lower()
    if suffix not in _SUFFIXES:
        raise QueryDetError(f"cannot tell the output format from {output!r}: use a suffix "
                            f"({', '.join(_SUFFIXES)}) or --format")
    return _SUFFIXES[suffix]


def pixel_box_ring(box, transform) -> list[list[float]]:
    """Closed ring of a pixel box's four corners mapped through an affine (a, b, c, d, e, f)."""
    a, b, c, d, e, f = transform[:6]
    x1, y1, x2, y2 = (float(v) for v in box)
    corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
    return [[a * col + b * row + c, d * col + e * row + f] for col, row in corners]


@functools.lru_cache(maxsize=64)
def _lonlat_transformer(crs: str):
    """One pyproj Transformer per source CRS, reused for every detection of a raster."""
    from pyproj import Transformer

    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def to_lonlat(ring: list[list[float]], crs: str) -> list[list[float]]:
    xs, ys = _lonlat_transformer(crs).transform([p[0] for p in ring], [p[1] for p in ring])
    return [[float(x), float(y)] for x, y in zip(xs, ys)]


def _wkt(ring: list[list[float]] | None) -> str:
    if not ring:
        return ""
    return "POLYGON ((" + ", ".join(f"{x:.10g} {y:.10g}" for x, y in ring) + "))"


class OutputWriter:
    """Streams records into one output: a temporary file renamed into place when complete (or
    stdout). Use as a context manager; an exception aborts it. What a format writes is its own
    small class below (`FORMAT_WRITERS`); this class only owns the file."""

    def __init__(self, output: str, fmt: str, crs: str | None, rfc7946: bool = False) -> None:
        self.output = output
        self.fmt = fmt
        self.crs = "EPSG:4326" if rfc7946 else crs  # may be set until __enter__ (stdout)
        self.rfc7946 = rfc7946
        self.count = 0
        self._tmp: str | None = None
        self._fh: TextIO | None = None
        self._format: _Format | None = None

    def __enter__(self) -> "OutputWriter":
        if self.output == "-":
            if self.fmt == "gpkg":
                raise QueryDetError("GeoPackage cannot be written to stdout: give a file name")
            self._fh = sys.stdout
        else:
            target = Path(self.output)
            if target.is_dir():
                raise QueryDetError(f"output {target} is a directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial"
                                             + target.suffix, dir=target.parent)
            os.close(fd)
            if self.fmt != "gpkg":
                os.unlink(self._tmp)
                self._fh = open(self._tmp, "w", newline="")
        self._format = FORMAT_WRITERS[self.fmt](self._fh, self.crs, self.rfc7946, self._tmp)
        self._format.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        self._format.end()
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        if self._tmp is not None:
            os.replace(self._tmp, self.output)
            self._tmp = None

    def abort(self) -> None:
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.close()
        if self._tmp is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._tmp = None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self._format.write(r, self.count)
            self.count += 1
        if self._fh is not None and self._fh is sys.stdout:
            self._fh.flush()


class _Format:
    """One output format: what goes before, for each record (the `index`-th), and after."""

    def __init__(self, fh: TextIO | None, crs: str | None, rfc7946: bool, path: str | None
                 ) -> None:
        self.fh, self.crs, self.rfc7946, self.path = fh, crs, rfc7946, path

    def begin(self) -> None:
        pass

    def write(self, r: dict[str, Any], index: int) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


def _needs_map(r: dict[str, Any], what: str) -> None:
    if r["geometry"] is None:
        raise QueryDetError(f"{r['source']} is not georeferenced: {what} needs map coordinates; "
                            "use --format coco, csv or ndjson")


class _GeoJSON(_Format):
    """A FeatureCollection in the source CRS (named in the file) or EPSG:4326 (--rfc7946)."""

    digits: int | None = None  # coordinate decimals, set on the first feature

    def begin(self) -> None:
        head: dict[str, Any] = {"type": "FeatureCollection"}
        if not self.rfc7946 and self.crs:
            head["crs"] = {"type": "name", "properties": {"name": _crs_urn(self.crs)}}
        self.fh.write(json.dumps(head)[:-1] + ', "features": [\n')

    def write(self, r: dict[str, Any], index: int) -> None:
        _needs_map(r, "GeoJSON")
        feature = {"type": "Feature",
                   "geometry": {"type": "Polygon", "coordinates": [self._ring(r["geometry"])]},
                   "properties": {k: r[k] for k in ("source", "image_id", "class_id",
                                                    "class_name", "score")}
                   | {"category_id": r.get("category_id", r["class_id"] + 1)}
                   | {"bbox_px": r["bbox"]}}
        self.fh.write(("" if index == 0 else ",\n") + json.dumps(feature))

    def _ring(self, ring: list[list[float]]) -> list[list[float]]:
        """Counter-clockwise exterior ring (RFC 7946's right-hand rule), coordinates rounded to
        7 decimals for degrees (about 1 cm) and 3 for projected units (1 mm in metres)."""
        if self.digits is None:
            self.digits = 7 if self.rfc7946 or _is_geographic(self.crs) else 3
        return rfc7946_ring(ring, self.digits)

    def end(self) -> None:
        self.fh.write("\n]}\n")


class _Coco(_Format):
    """COCO results: pixel boxes (x, y, w, h) with image and category ids."""

    def begin(self) -> None:
        self.fh.write("[\n")

    def write(self, r: dict[str, Any], index: int) -> None:
        x1, y1, x2, y2 = r["bbox"]
        item = {"image_id": r["image_id"], "category_id": r.get("category_id", r["class_id"] + 1),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": r["score"],
                "category_name": r["class_name"], "file_name": r["source"]}
        self.fh.write(("" if index == 0 else ",\n") + json.dumps(item))

    def end(self) -> None:
        self.fh.write("\n]\n")


class _Csv(_Format):
    """One row per detection: a WKT polygon and the CRS it is in."""

    def begin(self) -> None:
        csv.writer(self.fh).writerow(CSV_FIELDS)

    def write(self, r: dict[str, Any], index: int) -> None:
        csv.writer(self.fh).writerow([r["source"], r["image_id"], r["class_id"],
                                      r.get("category_id", r["class_id"] + 1), r["class_name"],
                                      r["score"], *r["bbox"], _wkt(r["geometry"]),
                                      r.get("crs") or ""])


class _Ndjson(_Format):
    """A GeoJSON text sequence (RFC 8142), one lon/lat Feature per line."""

    def write(self, r: dict[str, Any], index: int) -> None:
        self.fh.write(json.dumps(ndjson_feature(r)) + "\n")


class _GeoPackage(_Format):
    """A `detections` layer, appended in chunks of 5000 through geopandas."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rows: list[dict[str, Any]] = []
        self.written = False

    def write(self, r: dict[str, Any], index: int) -> None:
        _needs_map(r, "GeoPackage")
        self.rows.append(r)
        if len(self.rows) >= 5000:
            self._flush()

    def _flush(self) -> None:
        import geopandas as gpd
        from shapely.geometry import Polygon

        rows, self.rows = self.rows, []
        if not rows and self.written:
            return
        frame = gpd.GeoDataFrame(
            {"source": [r["source"] for r in rows], "image_id": [r["image_id"] for r in rows],
             "class_id": [r["class_id"] for r in rows],
             "category_id": [r.get("category_id", r["class_id"] + 1) for r in rows],
             "class_name": [r["class_name"] for r in rows], "score": [r["score"] for r in rows],
             "x1": [r["bbox"][0] for r in rows], "y1": [r["bbox"][1] for r in rows],
             "x2": [r["bbox"][2] for r in rows], "y2": [r["bbox"][3] for r in rows]},
            geometry=[Polygon(r["geometry"]) for r in rows], crs=self.crs)
        frame.to_file(self.path, driver="GPKG", layer="detections",
                      mode="a" if self.written else "w")
        self.written = True

    def end(self) -> None:
        self._flush()


FORMAT_WRITERS: dict[str, type[_Format]] = {"geojson": _GeoJSON, "coco": _Coco, "csv": _Csv,
                                            "ndjson": _Ndjson, "gpkg": _GeoPackage}


def ndjson_feature(r: dict[str, Any]) -> dict[str, Any]:
    """One line of NDJSON output: a GeoJSON Feature (RFC 8142 text sequence, RFC 7946 geometry:
    lon/lat, counter-clockwise), so GDAL's GeoJSONSeq driver and geopandas read it. The pixel box
    and the source CRS are properties; a non-georeferenced source has a null geometry."""
    geometry = None
    if r["geometry"] is not None:
        ring = r["geometry"]
        crs = r.get("crs")
        if crs and crs.upper() not in ("EPSG:4326", "OGC:CRS84"):
            ring = to_lonlat(ring, crs)
        geometry = {"type": "Polygon", "coordinates": [rfc7946_ring(ring, 7)]}
    props = {k: r.get(k) for k in ("source", "image_id", "class_id", "category_id",
                                   "class_name", "score", "crs")}
    return {"type": "Feature", "geometry": geometry, "properties": props | {"bbox_px": r["bbox"]}}


def rfc7946_ring(ring: list[list[float]], digits: int) -> list[list[float]]:
    """The ring rounded to `digits` decimals and counter-clockwise (RFC 7946's right-hand rule)."""
    ring = [[round(x, digits), round(y, digits)] for x, y in ring]
    return ring if signed_area(ring) >= 0 else ring[::-1]


def signed_area(ring: list[list[float]]) -> float:
    """Shoelace area of a closed ring: positive when counter-clockwise (x right, y up)."""
    return 0.5 * sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(ring, ring[1:]))


def _is_geographic(crs: str | None) -> bool:
    if not crs:
        return False
    from rasterio.crs import CRS

    try:
        return bool(CRS.from_user_input(crs).is_geographic)
    except Exception:  # an unparseable CRS string: treat as projected
        return False


def _crs_urn(crs: str) -> str:
    if crs.upper().startswith("EPSG:"):
        return f"urn:ogc:def:crs:EPSG::{crs.split(':', 1)[1]}"
    return crs


def read_records(path: Path) -> Iterable[dict[str, Any]]:
    """Records back from an NDJSON journal, one at a time."""
    with open(path) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


__all__ = ["OutputWriter", "format_for", "pixel_box_ring", "to_lonlat", "read_records",
           "FORMATS", "GEO_FORMATS"]
