"""Pixels held in memory as rasters: a numpy array (the Python API's, or a video frame) becomes
an in-memory GeoTIFF, so it is read exactly as a file is; `open_input` opens any input of a
run (a path, an open dataset, or a video `Frame`)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from ..core.errors import QueryDetError
from .raster import RasterSource


@contextlib.contextmanager
def open_input(item: Any, bands: tuple[int, ...] | None = None,
               wanted: list[int] | None = None) -> Iterator[RasterSource]:
    """A RasterSource over one input of a run: a path or an open dataset as they are, a video
    frame decoded into memory (named after its video). `wanted`: the frame indices the run
    asks of that video, in order."""
    from .video import Frame

    if isinstance(item, Frame):
        pixels = item.video.read(item, wanted or [item.index])
        placed = item.transform is not None  # on the ground by telemetry: lon/lat
        transform = None
        if placed:
            from rasterio.transform import Affine

            transform = Affine(*item.transform)
        with array_dataset(pixels, transform, "EPSG:4326" if placed else None) as ds:
            src = RasterSource(ds, bands, name=item.video.path)
            try:
                yield src
            finally:
                src.close()
        return
    with RasterSource(item, bands) as src:
        yield src


@contextlib.contextmanager
def array_dataset(array: np.ndarray, transform: Any, crs: Any) -> Iterator[Any]:
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
