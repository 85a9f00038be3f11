"""Pixel boxes on the map: a box's corners through the raster's affine transform (rotated,
sheared and south-up rasters come out right), to lon/lat, and the ring conventions of RFC 7946
and WKT that the formats write."""

from __future__ import annotations

import functools

import numpy as np


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
    """The ring's points from `crs` to EPSG:4326 (lon, lat)."""
    xs, ys = _lonlat_transformer(crs).transform([p[0] for p in ring], [p[1] for p in ring])
    return [[float(x), float(y)] for x, y in zip(xs, ys)]


def wkt_polygon(ring: list[list[float]] | None) -> str:
    """A ring as a WKT POLYGON (10 significant digits); "" for no ring."""
    if not ring:
        return ""
    return "POLYGON ((" + ", ".join(f"{x:.10g} {y:.10g}" for x, y in ring) + "))"


def rfc7946_ring(ring: list[list[float]], digits: int) -> list[list[float]]:
    """The ring rounded to `digits` decimals and counter-clockwise (RFC 7946's right-hand rule)."""
    ring = [[round(x, digits), round(y, digits)] for x, y in ring]
    return ring if signed_area(ring) >= 0 else ring[::-1]


def signed_area(ring: list[list[float]]) -> float:
    """Shoelace area of a closed ring: positive when counter-clockwise (x right, y up)."""
    return 0.5 * sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(ring, ring[1:]))


def is_geographic(crs: str | None) -> bool:
    """Whether `crs` counts in degrees (an unparseable one counts as projected)."""
    if not crs:
        return False
    from rasterio.crs import CRS

    try:
        return bool(CRS.from_user_input(crs).is_geographic)
    except Exception:  # an unparseable CRS string: treat as projected
        return False


def crs_urn(crs: str) -> str:
    """The OGC URN of an EPSG code (GeoJSON's named CRS); other CRS strings as they are."""
    if crs.upper().startswith("EPSG:"):
        return f"urn:ogc:def:crs:EPSG::{crs.split(':', 1)[1]}"
    return crs


def map_boxes_to_pixels(boxes: np.ndarray, transform) -> np.ndarray:
    """Map-coordinate boxes (G, 4) to pixel boxes: the pixel bounds of each box's four corners
    through the inverse affine (right for north-up, south-up and rotated rasters alike)."""
    inv = ~transform
    xs = boxes[:, [0, 2, 2, 0]]  # (G, 4) corner x
    ys = boxes[:, [1, 1, 3, 3]]  # (G, 4) corner y
    cols = inv.a * xs + inv.b * ys + inv.c
    rows = inv.d * xs + inv.e * ys + inv.f
    return np.stack([cols.min(1), rows.min(1), cols.max(1), rows.max(1)], 1).astype(np.float32)
