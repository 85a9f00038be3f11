"""The Python API: load a detector once, then detect on paths, open datasets or numpy arrays.

    from querydet_cli import Detector

    detector = Detector.load()                       # the bundled sample model; or a .pt path
    gdf = detector.detect("scene.tif", sigma=0.15)   # a geopandas GeoDataFrame

It is the pipeline of `querydet detect` (the same producer and consumer: tiling, batched CSQ,
cross-tile merge, nodata handling), without the journal and the file writers. A numpy array
goes through an in-memory GeoTIFF, so it is read exactly like a file.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .pipeline.detect import DetectOptions, TileConsumer
from .pipeline.producer import TileProducer, with_device_defaults
from .core.errors import QueryDetError
from .outputs.records import Detection
from .pipeline.gsd import check_input_gsd, parse_gsd_option
from .pipeline.raster import RasterSource
from .pipeline.tiling import check_plan

if TYPE_CHECKING:
    import geopandas
    import rasterio

COLUMNS = ["class_id", "class_name", "score", "x1", "y1", "x2", "y2"]


class Detector:
    """A loaded model and the options `detect` uses unless a call overrides them.

    Args:
        weights: checkpoint path, or a folder written by `querydet export`; None is the
            bundled sample model.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N" (exports: the CPU).
        runtime: "auto", "torch", "onnxruntime" or "openvino" (see `detect --runtime`).
        **options: defaults for every `detect` call (any field of `DetectOptions`, e.g.
            tile_size, overlap, batch_size, sigma, mode, score_threshold, bands).
    """

    def __init__(self, weights: str | Path | None = None, device: str = "auto",
                 runtime: str = "auto", **options: Any) -> None:
        from .runtimes.loading import load_model, resolve_device
        from .core.resources import sample_model
        from .runtimes.runtime import is_export

        self.weights = Path(weights) if weights is not None else sample_model()
        self.device = resolve_device("cpu" if is_export(self.weights) else device)
        self.model, self.config = load_model(self.weights, self.device, runtime,
                                             options.get("precision"))
        self.options = _options(DetectOptions(score_threshold=0.3), options)

    @classmethod
    def load(cls, weights: str | Path | None = None, device: str = "auto",
             runtime: str = "auto", **options: Any) -> "Detector":
        """Load a checkpoint or an export (default: the bundled sample model) once for many
        `detect` calls."""
        return cls(weights, device, runtime, **options)

    @classmethod
    def from_model(cls, model: Any, config: Any, device: str = "cpu", **options: Any
                   ) -> "Detector":
        """Wrap a model already in memory (e.g. just trained) with its `Config`."""
        from .runtimes.loading import resolve_device

        self = cls.__new__(cls)
        self.device = resolve_device(device)
        self.weights = None
        self.model, self.config = model, config
        self.options = _options(DetectOptions(score_threshold=0.3), options)
        return self

    @property
    def class_names(self) -> list[str]:
        return self.config.names()

    def detect(self, image: "str | Path | rasterio.io.DatasetReader | np.ndarray", *,
               transform: Any = None, crs: Any = None, **options: Any
               ) -> "geopandas.GeoDataFrame":
        """Detect objects in one image of any size: tiled, merged across tiles as in the CLI.

        Args:
            image: a raster path, an open rasterio dataset, or a numpy array (H, W), (H, W, C)
                or (C, H, W) with C in 1, 3, 4 (the fourth band is alpha: 0 = nodata). uint8
                is divided by 255; other types get the CLI's percentile stretch.
            transform: for arrays, an affine pixel -> map transform (rasterio `Affine`).
            crs: for arrays, their CRS (anything rasterio accepts, e.g. "EPSG:32617").
            **options: per-call overrides of `DetectOptions` fields (sigma, mode, tile_size, ...).

        Returns:
            One row per detection: class_id, class_name, score, the pixel box x1 y1 x2 y2 and a
            polygon geometry; the GeoDataFrame's CRS is the raster's when it is georeferenced,
            else None and the geometry is in pixel coordinates (x right, y down).
        """
        import geopandas as gpd
        from shapely.geometry import Polygon, box

        opts = with_device_defaults(_options(self.options, options), self.device)
        if opts.resume or opts.save_vis or opts.rfc7946:
            raise QueryDetError("resume, save_vis and rfc7946 are options of the CLI's file "
                                "outputs; the API returns a GeoDataFrame (use .to_crs)")
        check_plan(opts.tile_size, opts.overlap, "tile_size", "overlap")
        records: list[Detection] = []
        with _open(image, transform, crs, opts.bands) as src:
            info = src.info()
            producer = TileProducer(self.model, self.config, opts, self.device)
            producer.planner.attach(src)
            tiles = producer.planner.plan(src.info())
            TileConsumer(self.config, opts, producer.profile).run(
                src, 1, records.extend, lambda state: None, {},
                producer.results(1, src, tiles), tiles)
        rows = {c: [] for c in COLUMNS}
        geoms = []
        for d in records:
            for c in ("class_id", "class_name", "score"):
                rows[c].append(getattr(d, c))
            for c, v in zip(("x1", "y1", "x2", "y2"), d.bbox):
                rows[c].append(v)
            geoms.append(Polygon(d.geometry) if d.geometry else box(*d.bbox))
        frame = gpd.GeoDataFrame(rows, geometry=geoms,
                                 crs=info.crs if info.georeferenced else None)
        return frame.astype({"class_id": "int64", "score": "float64"})


def _options(base: DetectOptions, changes: dict[str, Any]) -> DetectOptions:
    known = set(DetectOptions.__dataclass_fields__)
    bad = sorted(set(changes) - known)
    if bad:
        raise QueryDetError(f"unknown option {bad[0]!r} (allowed: {', '.join(sorted(known))})")
    if "bands" in changes and changes["bands"] is not None:
        changes = changes | {"bands": tuple(changes["bands"])}
    if "gsd" in changes:
        changes = changes | {"gsd": parse_gsd_option(changes["gsd"])}
    if "input_gsd" in changes:
        changes = changes | {"input_gsd": check_input_gsd(changes["input_gsd"], "input_gsd")}
    return replace(base, **changes)


@contextlib.contextmanager
def _open(image: Any, transform: Any, crs: Any, bands: tuple[int, ...] | None
          ) -> Iterator[RasterSource]:
    """A RasterSource for a path, an open dataset (left open), or an array (in-memory GeoTIFF)."""
    if isinstance(image, np.ndarray):
        with _array_dataset(image, transform, crs) as ds:
            src = RasterSource(ds, bands)
            try:
                yield src
            finally:
                src.close()
        return
    if (transform is not None or crs is not None):
        raise QueryDetError("transform and crs are for numpy arrays; a raster has its own")
    if not isinstance(image, (str, Path)):
        import rasterio

        if not isinstance(image, rasterio.io.DatasetReaderBase):
            raise QueryDetError(f"cannot detect on a {type(image).__name__}: give a path, an "
                                "open rasterio dataset or a numpy array")
    with RasterSource(image, bands) as src:
        yield src


@contextlib.contextmanager
def _array_dataset(array: np.ndarray, transform: Any, crs: Any) -> Iterator[Any]:
    import warnings

    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    data = channels_first(array)
    if data.dtype == np.bool_ or data.dtype.kind not in "uif":
        raise QueryDetError(f"array of dtype {data.dtype} is not an image (use uint8, integers "
                            "or floats)")
    if data.dtype == np.float16 or data.dtype.kind == "i" and data.dtype.itemsize == 1:
        data = data.astype(np.float32)
    count, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count,
               "dtype": data.dtype.name}
    if transform is not None:
        profile["transform"] = transform
    if crs is not None:
        profile["crs"] = crs
    with MemoryFile() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with mem.open(**profile) as dst:
            dst.write(data)
            if count == 4:
                dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                                   ColorInterp.alpha]
        with mem.open() as ds:
            yield ds


def channels_first(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 -> (C, H, W); HWC wins when ambiguous."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise QueryDetError(f"array of shape {array.shape}: expected (H, W), (H, W, C) or "
                            "(C, H, W)")
    if array.shape[2] in (1, 3, 4):
        return np.ascontiguousarray(array.transpose(2, 0, 1))
    if array.shape[0] in (1, 3, 4):
        return array
    raise QueryDetError(f"array of shape {array.shape}: expected 1, 3 or 4 channels, first or "
                        "last")
