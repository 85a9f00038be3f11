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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .core.errors import QueryDetError
from .outputs.records import Detection
from .pipeline.detect import DetectSummary, run_detect
from .reading.gsd import check_input_gsd, parse_gsd_option
from .pipeline.options import DetectOptions
from .reading.arrays import array_dataset
from .pipeline.tiling import check_plan

if TYPE_CHECKING:
    import geopandas
    import rasterio

COLUMNS = ["class_id", "class_name", "score", "x1", "y1", "x2", "y2"]


@dataclass(frozen=True)
class DetectRequest:
    """One `detect` run over files, as the CLI, the benchmarks and scripts ask for it.

    Args:
        inputs: raster or image paths (expanded: no folders or globs).
        output: the output file, or "-" for stdout.
        format: an output format (outputs/formats.py) or its name; None: from the output's
            suffix.
        options: the run's options; tile and batch size left to the device are filled once,
            here, for the device the model loads on.
        weights: checkpoint or export folder; None is the bundled sample model.
        device: "auto", "cpu", "cuda" or "cuda:N" (an export runs on the CPU).
        runtime: "auto", "torch", "onnxruntime" or "openvino".
        ray: run the model on Ray actors with these settings (ray_producer.RaySettings).
        coco_gt: a COCO ground truth whose image ids the COCO output takes, by file name.
        progress: a progress bar per input on stderr.
    """

    inputs: list[str]
    output: str
    format: Any = None
    options: DetectOptions = DetectOptions()
    weights: str | Path | None = None
    device: str = "auto"
    runtime: str = "auto"
    ray: Any = None
    coco_gt: str | Path | None = None
    progress: bool = False


def run(request: DetectRequest, *, lock: Any = None, loaded: tuple[Any, Any] | None = None
        ) -> DetectSummary:
    """Run a request: load the model (or take `loaded`, a (model, config) already in memory),
    fill in the device's defaults once, and run the pipeline into the output. `lock`: the
    output's lock, when the caller took it (the CLI takes it before torch loads)."""
    from .core.progress import progress_bar
    from .core.resources import sample_model
    from .outputs.formats import format_for
    from .pipeline.identity import coco_image_ids
    from .runtimes.loading import load_model, resolve_device
    from .runtimes.runtime import is_export

    if request.output == "-" and request.options.resume:
        raise QueryDetError("--resume needs an output file, not stdout")
    fmt = request.format if isinstance(request.format, type) else \
        format_for(request.output, request.format)
    weights = Path(request.weights) if request.weights is not None else sample_model()
    options = request.options
    if request.coco_gt is not None:
        options = replace(options, image_ids=coco_image_ids(request.coco_gt, request.inputs))
    device = resolve_device("cpu" if is_export(weights) else request.device)
    if options.backend is not None:  # asked for: refused before the model loads if it cannot run
        from querydet_models.layers.sparse import resolve_backend

        try:
            resolve_backend(options.backend, device)
        except (RuntimeError, ValueError) as err:
            raise QueryDetError(f"--backend {options.backend}: {err}") from None
    model, cfg = loaded or load_model(weights, device, request.runtime, options.precision)
    options = options.resolved(device)  # so Ray's actors plan tiles as this side does
    producer = None  # the model runs here; with `ray`, on Ray actors
    if request.ray is not None:
        from .pipeline.ray_producer import RayProducer

        producer = RayProducer(request.ray, weights, options, str(device), load_model)
    return run_detect(model, cfg, request.inputs, request.output, fmt, options, device,
                      progress_factory=progress_bar if request.progress else None, lock=lock,
                      producer=producer)



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

        opts = _options(self.options, options).resolved(self.device)
        if opts.resume or opts.save_vis or opts.rfc7946:
            raise QueryDetError("resume, save_vis and rfc7946 are options of the CLI's file "
                                "outputs; the API returns a GeoDataFrame (use .to_crs)")
        check_plan(opts.tile_size, opts.overlap, "tile_size", "overlap")
        records: list[Detection] = []
        with _source(image, transform, crs) as source:
            summary = run_detect(self.model, self.config, [source], records.extend, None, opts,
                                 self.device)
        rows = {c: [] for c in COLUMNS}
        geoms = []
        for d in records:
            for c in ("class_id", "class_name", "score"):
                rows[c].append(getattr(d, c))
            for c, v in zip(("x1", "y1", "x2", "y2"), d.bbox):
                rows[c].append(v)
            geoms.append(Polygon(d.geometry) if d.geometry else box(*d.bbox))
        frame = gpd.GeoDataFrame(rows, geometry=geoms, crs=summary.crs)
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
def _source(image: Any, transform: Any, crs: Any) -> Iterator[Any]:
    """What the pipeline reads: a path, an open dataset (left open), or an array as an
    in-memory GeoTIFF."""
    if isinstance(image, np.ndarray):
        with array_dataset(image, transform, crs) as ds:
            yield ds
        return
    if (transform is not None or crs is not None):
        raise QueryDetError("transform and crs are for numpy arrays; a raster has its own")
    if not isinstance(image, (str, Path)):
        import rasterio

        if not isinstance(image, rasterio.io.DatasetReaderBase):
            raise QueryDetError(f"cannot detect on a {type(image).__name__}: give a path, an "
                                "open rasterio dataset or a numpy array")
    yield image
