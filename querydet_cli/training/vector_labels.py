"""Training labels from GIS layers: boxes, polygons or points in any CRS, over GeoTIFFs.

A layer (GeoPackage, Shapefile, GeoJSON, FlatGeobuf: anything pyogrio reads) is reprojected to
each raster's CRS. A polygon (or box) gives its bounds; a point gives a square box of
`point_size` map units (metres in a projected CRS) centred on it. A label that covers several
rasters goes to each, as the part inside it; the chip cutter then decides, as for any box cut by
a window, whether that part is an object or an ignore region. Labels inside no raster are
counted and reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import Problem, Sample, _sample
from ..core.errors import QueryDetError
from ..outputs.corrections import corrected_frames
from ..outputs.geometry import map_boxes_to_pixels

# a label part inside a raster smaller than this fraction of the label is an ignore region there
MIN_INSIDE = 0.5


@dataclass
class VectorLabels:
    samples: list[Sample]
    class_names: list[str]
    problems: list[Problem]
    total: int  # labels read from the layer (after the class filter)
    outside: int  # labels inside no raster
    reviewed: int = 0  # reviewed areas in the file (0: a plain labels layer)




def corrected_layers(path: str | Path, layer: str | None = None):
    """(labels, reviewed areas) of a labels file as GeoDataFrames; the areas are None for a
    plain labels layer. A corrected file keeps its areas in a `reviewed_areas` layer beside a
    `labels` layer (GeoPackage), or as features whose `role` is `reviewed_area` (GeoJSON).
    Inside the areas the labels are the truth and everything else is background; outside them
    nothing is known."""
    labels, areas = corrected_frames(path, read_layer, layer)
    if areas is None:
        return labels, None
    areas = areas[areas.geometry.notna() & ~areas.geometry.is_empty]
    if not len(areas) or not areas.geom_type.isin(["Polygon", "MultiPolygon"]).all():
        raise QueryDetError(f"--labels: {path}: the reviewed areas must be polygons (the areas "
                            "a person reviewed)")
    return labels, areas


def read_layer(path: str | Path, layer: str | None = None):
    """The layer as a GeoDataFrame (geopandas through pyogrio), with a clear error if unusable."""
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise QueryDetError(f"--labels: file not found: {path}")
    try:
        gdf = gpd.read_file(path, layer=layer)
    except Exception as err:  # pyogrio / GDAL errors: corrupt file, unknown layer, not vector
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QueryDetError(f"--labels: cannot read {path}: {first}") from None
    if gdf.crs is None:
        raise QueryDetError(f"--labels: {path} has no CRS; set one in your GIS first")
    return gdf


def load_vector_labels(rasters: list[str], labels: str | Path, *, layer: str | None = None,
                       label_field: str | None = None, classes: list[str] | None = None,
                       point_size: float | None = None) -> VectorLabels:
    """One Sample per raster with the layer's labels in its pixel coordinates.

    Args:
        rasters: GeoTIFF paths (georeferenced).
        labels: the vector file; `layer` picks a layer of a multi-layer file.
        label_field: the attribute holding class names; None: `label` or `class` when present,
            else every feature is of one class, `object`.
        classes: class names in the order the model will use; features of other classes are
            skipped (reported). None: the sorted distinct values.
        point_size: box side for point features, in the raster CRS's units.
    """
    gdf, areas = corrected_layers(labels, layer)
    problems: list[Problem] = []
    field = label_field
    if field is None:
        field = next((c for c in ("label", "class", "class_name") if c in gdf.columns), None)
    elif field not in gdf.columns:
        raise QueryDetError(f"--label-field: {field!r} is not a field of {labels} (fields: "
                            f"{', '.join(c for c in gdf.columns if c != 'geometry')})")
    values = (gdf[field].astype(str).to_numpy() if field is not None
              else np.full(len(gdf), "object", dtype=object))
    names = list(classes) if classes else sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    keep = np.array([v in index for v in values], bool)
    for k in np.nonzero(~keep)[0]:
        problems.append(Problem(f"{labels}:feature {k}", f"class {values[k]!r} is not in "
                                f"--classes; skipped"))
    valid_geom = gdf.geometry.notna().to_numpy() & ~gdf.geometry.is_empty.to_numpy()
    for k in np.nonzero(keep & ~valid_geom)[0]:
        problems.append(Problem(f"{labels}:feature {k}", "no geometry; skipped"))
    keep &= valid_geom
    gdf = gdf[keep]
    labels_of = np.array([index[v] for v in values[keep]], np.int64)
    is_point = gdf.geom_type.isin(["Point", "MultiPoint"]).to_numpy()
    if is_point.any() and not point_size:
        raise QueryDetError(f"{labels} holds points: give --point-size (the box side, in the "
                            "raster CRS's units, e.g. metres)")
    if point_size is not None and not 0 < point_size < 1e6:
        raise QueryDetError(f"--point-size must be a positive size, got {point_size}")

    samples = []
    inside_any = np.zeros(len(gdf), bool)
    for image_id, raster in enumerate(rasters, start=1):
        sample, on = _labels_on_raster(Path(raster), image_id, gdf, labels_of, is_point,
                                       point_size, areas)
        samples.append(sample)
        inside_any |= on
    outside = int((~inside_any).sum())
    return VectorLabels(samples, names, problems, int(len(gdf)), outside,
                        0 if areas is None else len(areas))


def _labels_on_raster(raster: Path, image_id: int, gdf, labels_of: np.ndarray,
                      is_point: np.ndarray, point_size: float | None, areas=None
                      ) -> tuple[Sample, np.ndarray]:
    """The layer's features in one raster's pixels: its Sample (boxes at least MIN_INSIDE on
    the raster; the others touching it become ignore regions, the reviewed areas its
    `reviewed` geometry) and which features touch it."""
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with rasterio.open(raster) as src:
            if src.crs is None or src.transform.is_identity:
                raise QueryDetError(f"{raster} is not georeferenced, so GIS labels cannot be "
                                    "placed on it")
            crs, transform, width, height = src.crs, src.transform, src.width, src.height
    except RasterioIOError as err:
        raise QueryDetError(f"{raster}: not a readable raster ({str(err).splitlines()[0]})"
                            ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = gdf.to_crs(crs)
    minx, miny, maxx, maxy = (local.geometry.bounds[c].to_numpy()
                              for c in ("minx", "miny", "maxx", "maxy"))
    if point_size:
        half = point_size / 2
        cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
        minx = np.where(is_point, cx - half, minx)
        maxx = np.where(is_point, cx + half, maxx)
        miny = np.where(is_point, cy - half, miny)
        maxy = np.where(is_point, cy + half, maxy)
    boxes = map_boxes_to_pixels(np.stack([minx, miny, maxx, maxy], 1), transform)  # (G, 4)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = ((clipped[:, 2] - clipped[:, 0]).clip(0)
               * (clipped[:, 3] - clipped[:, 1]).clip(0))
    frac = visible / np.maximum(area, 1e-12)
    on = visible > 0
    obj = on & (frac >= MIN_INSIDE)
    ign = on & (frac < MIN_INSIDE)
    sample = _sample(raster, clipped[obj], labels_of[obj], clipped[ign], image_id, width, height)
    if areas is not None:
        sample.reviewed = areas_to_pixels(areas.to_crs(crs), transform)
    return sample, on


def areas_to_pixels(areas, transform):
    """Polygons in the raster's CRS (a GeoDataFrame) as one shapely geometry in its pixels."""
    from shapely.affinity import affine_transform
    from shapely.ops import unary_union

    inv = ~transform
    return unary_union([affine_transform(g, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f])
                        for g in areas.geometry])
