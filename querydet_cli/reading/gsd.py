"""Ground sample distance: the metres a pixel covers on the ground, for rasters and models.

A checkpoint records the GSD of its training data (`data.gsd` in its config). `detect` reads each
raster at that GSD: a raster at 0.15 m seen by a model trained at 0.3 m is read at half its pixel
count (average resampling), one at 0.6 m at twice (bilinear). The factor between the two is the
`scale`: source pixels per model pixel along x and y.

A projected CRS gives the GSD from the transform and the CRS's linear unit. A CRS in degrees is
converted at the raster's centre latitude on the WGS84 ellipsoid; near the poles, where a degree
of longitude shrinks to nothing within the raster, it is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..core.errors import QueryDetError

log = logging.getLogger("querydet")

MAX_RATIO = 16.0  # a resampling factor past this either way is refused
POLAR_LIMIT = 85.0  # degrees of latitude: a geographic raster reaching past this is refused
SAME = 1e-3  # a relative difference below this is no resampling at all

# WGS84 ellipsoid
_A = 6378137.0
_E2 = 6.69437999014e-3


def metres_per_degree(latitude: float) -> tuple[float, float]:
    """Metres per degree of longitude and of latitude at `latitude` on the WGS84 ellipsoid."""
    phi = math.radians(latitude)
    w = math.sqrt(1 - _E2 * math.sin(phi) ** 2)
    along_parallel = math.pi / 180 * _A * math.cos(phi) / w  # radius of the parallel
    along_meridian = math.pi / 180 * _A * (1 - _E2) / w ** 3  # meridional radius of curvature
    return along_parallel, along_meridian


def raster_gsd(crs, transform, width: int, height: int, name: str = "raster"
               ) -> tuple[float, float] | None:
    """Metres per pixel (along the raster's columns, along its rows); None without a CRS.

    Args:
        crs: a rasterio CRS (or None).
        transform: the raster's affine (a, b, c, d, e, f), pixel -> CRS.
        width, height: the raster's size in pixels (for its centre and latitude span).
        name: for messages.
    """
    if crs is None:
        return None
    a, b, c, d, e, f = tuple(transform)[:6]
    if (a, b, c, d, e, f) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
        return None
    col = math.hypot(a, d)  # CRS units per step along a row (one column)
    row = math.hypot(b, e)  # CRS units per step down a column (one row)
    if crs.is_geographic:
        lats = [d * x + e * y + f for x in (0, width) for y in (0, height)]
        if max(abs(v) for v in lats) > POLAR_LIMIT:
            raise QueryDetError(f"{name}: in degrees and reaching latitude "
                                f"{max(lats, key=abs):.1f}; near the poles a pixel's size in metres "
                                "is not one number: reproject it to a projected CRS (e.g. polar "
                                "stereographic) or give --input-gsd METRES")
        lat = d * width / 2 + e * height / 2 + f
        per_lon, per_lat = metres_per_degree(lat)
        # a pixel step in degrees (dlon, dlat) is a ground step of (dlon*per_lon, dlat*per_lat)
        return (math.hypot(a * per_lon, d * per_lat), math.hypot(b * per_lon, e * per_lat))
    factor = crs.linear_units_factor[1] if crs.is_projected else 1.0
    return col * factor, row * factor


@dataclass(frozen=True)
class Resolution:
    """How one raster is read for one model: `scale` source pixels per model pixel (x, y)."""

    scale: tuple[float, float] = (1.0, 1.0)
    source_gsd: tuple[float, float] | None = None  # metres per source pixel
    target_gsd: float | None = None  # metres per model pixel; None: native pixels
    reason: str = "native"

    @property
    def resampled(self) -> bool:
        return self.scale != (1.0, 1.0)


def parse_gsd_option(value: str | float | None) -> str | float:
    """`--gsd`: auto, native or a positive number of metres."""
    if value is None:
        return "auto"
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("auto", "native"):
            return text
        try:
            number = float(text)
        except ValueError:
            raise QueryDetError(f"--gsd: expected auto, native or metres per pixel (e.g. 0.3), "
                                f"got {value!r}") from None
    if not math.isfinite(number) or number <= 0 or number > 10000:
        raise QueryDetError(f"--gsd: {value!r} metres per pixel is not a ground resolution "
                            "(allowed: > 0 and at most 10000)")
    return number


def check_input_gsd(value: float | None, option: str = "--input-gsd") -> float | None:
    """`--input-gsd` (or `train --gsd`): None, or a positive, finite number of metres."""
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0 or value > 10000:
        raise QueryDetError(f"{option}: {value!r} metres per pixel is not a ground resolution "
                            "(allowed: > 0 and at most 10000)")
    return float(value)


def resolve(option: str | float, model_gsd: float | None, source_gsd: tuple[float, float] | None,
            name: str = "raster") -> Resolution:
    """The resolution a raster is read at, for `--gsd option` and a model trained at `model_gsd`.

    Args:
        option: "auto" (the model's GSD), "native" (no resampling) or metres per pixel.
        model_gsd: the checkpoint's training GSD, None when it does not record one.
        source_gsd: the raster's metres per pixel (x, y) from its georeference or
            --input-gsd; None when unknown.
        name: for messages.
    """
    if option == "native":
        return Resolution(source_gsd=source_gsd, reason="--gsd native")
    target = model_gsd if option == "auto" else float(option)
    if target is None:
        return Resolution(source_gsd=source_gsd, reason="the model records no GSD")
    if source_gsd is None:
        return Resolution(target_gsd=None, reason="the input's GSD is unknown")
    sx, sy = (target / source_gsd[0], target / source_gsd[1])
    for s in (sx, sy):
        if s > MAX_RATIO or s < 1 / MAX_RATIO:
            raise QueryDetError(
                f"{name}: {source_gsd[0]:.4g} x {source_gsd[1]:.4g} m pixels read at "
                f"{target:.4g} m is a factor of {max(s, 1 / s):.1f}, past the {MAX_RATIO:.0f}x "
                "querydet resamples; check the georeference or --input-gsd, or use --gsd native")
    if abs(sx - 1) < SAME and abs(sy - 1) < SAME:
        return Resolution(source_gsd=source_gsd, target_gsd=target, reason="already at the GSD")
    return Resolution((sx, sy), source_gsd, target, "resampled")


def model_grid(width: int, height: int, scale: tuple[float, float]) -> tuple[int, int, float, float]:
    """The model-pixel grid of a width x height raster at `scale`: (columns, rows, exact x scale,
    exact y scale), the exact scales chosen so the grid spans the raster edge to edge."""
    cols = max(1, round(width / scale[0]))
    rows = max(1, round(height / scale[1]))
    return cols, rows, width / cols, height / rows


def images_gsd(paths: list, limit: int = 64) -> float | None:
    """The median GSD (metres per pixel, mean of x and y) of the georeferenced images among
    `paths` (the first `limit` looked at); None when none is georeferenced."""
    import statistics
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    found = []
    for path in list(paths)[:limit]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    if src.crs is None or src.transform.is_identity:
                        continue
                    gx, gy = raster_gsd(src.crs, src.transform, src.width, src.height, str(path))
        except (RasterioIOError, QueryDetError):
            continue
        found.append((gx + gy) / 2)
    return statistics.median(found) if found else None


def training_gsd(dataset: str, given: float | None, images: list, synthetic_gsd: float
                 ) -> float | None:
    """The GSD a checkpoint records: the generator's for synthetic scenes, else the chips' own
    georeference (GeoTIFF chips cut by `tile`), else `given` (`train --gsd`), else None."""
    if dataset == "synthetic":
        return synthetic_gsd
    measured = images_gsd(images)
    if measured is None:
        return given
    if given is not None and abs(measured - given) > 0.02 * given:
        log.warning("train --gsd %.4g, but the training chips' georeference says %.4g m per "
                    "pixel: recording the chips' %.4g", given, measured, measured)
    return round(measured, 6)
