"""Reading rasters window by window: GeoTIFFs of any size, plain images, bands, scaling, masks.

A raster is never read whole. Pixel values are scaled to [0, 1] the way the model was trained
(8-bit images divided by 255). Other data types get a per-band percentile stretch, computed once
from a decimated read, which uses the overviews when the file has them. Nodata values, alpha
bands and internal masks all become one validity mask per window.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import QueryDetError

# Longest side of the decimated read used for the percentile stretch and overviews.
_SAMPLE_SIDE = 1024


def _open(name: str):
    """rasterio.open without the warning plain (non-georeferenced) images raise."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(name)


def is_gdal_path(path: str) -> bool:
    """A GDAL virtual path or URL (/vsizip/..., /vsicurl/..., s3://..., https://...): passed to
    rasterio as it is, never through pathlib (which would turn s3:// into s3:/)."""
    return path.startswith("/vsi") or bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


@dataclass(frozen=True)
class RasterInfo:
    path: Path
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None  # WKT or authority string; None when not georeferenced
    transform: tuple[float, ...]  # affine a, b, c, d, e, f (source pixel -> CRS)
    georeferenced: bool
    # width and height above are of the grid the model sees: the source's pixels, or model
    # pixels at another GSD (`RasterSource.resample`), each `scale` source pixels (x, y)
    scale: tuple[float, float] = (1.0, 1.0)
    source_width: int = 0
    source_height: int = 0

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        """(M, 4) xyxy boxes in the model's grid -> source pixels."""
        if self.scale == (1.0, 1.0):
            return boxes
        sx, sy = self.scale
        return boxes * np.array([sx, sy, sx, sy], boxes.dtype)


class RasterSource:
    """One open raster: `read(x, y, w, h)` gives (3, h, w) float32 in [0, 1] and a valid mask.

    After `resample(scale)`, windows, sizes and `read` are in model pixels of `scale` source
    pixels each: windowed reads with an output shape (average when shrinking, bilinear when
    enlarging, nearest for colour-table indices; GDAL takes overviews when they match), the
    valid mask resampled alike and kept where at least half of a model pixel is valid.
    """

    scale: tuple[float, float] = (1.0, 1.0)

    def __init__(self, path: "str | Path | rasterio.io.DatasetReader",
                 bands: tuple[int, ...] | None = None,
                 stretch: tuple[np.ndarray, np.ndarray] | None = None,
                 stretch_known: bool = False, name: str | None = None) -> None:
        import rasterio
        from rasterio.errors import RasterioIOError

        if isinstance(path, rasterio.io.DatasetReaderBase):  # an open dataset the caller owns
            self.src = path
            self.name = name or path.name  # `name`: what records call it (a video frame's video)
            self.path = Path(self.name)
            self._owns = False
        else:
            self.name = str(path)
            self.path = Path(path)  # for messages; `name` is what gets opened
            self._owns = True
            if not is_gdal_path(self.name):  # /vsizip/, s3://...: only GDAL can check those
                if not self.path.exists():
                    raise QueryDetError(f"{self.path}: file not found")
                if self.path.is_dir():
                    raise QueryDetError(f"{self.path}: is a directory, not an image")
                if self.path.stat().st_size == 0:
                    raise QueryDetError(f"{self.path}: file is empty (0 bytes)")
            try:
                self.src = _open(self.name)
            except RasterioIOError as err:
                msg = str(err).split("\n")[0]
                raise QueryDetError(f"{self.name}: not a readable raster or image ({msg})") from None
        src = self.src
        self.width, self.height = src.width, src.height
        if src.width < 1 or src.height < 1 or src.count < 1:
            raise QueryDetError(f"{self.path}: raster has no pixels")
        if src.width * src.height > 10 ** 12:
            raise QueryDetError(f"{self.path}: {src.width}x{src.height} pixels is beyond what "
                                "querydet accepts (10^12)")
        self.bands = self._pick_bands(bands)
        self.palette = self._palette()
        self.alpha = self._alpha_band()
        self.georeferenced = src.crs is not None and not src.transform.is_identity
        # a caller that already knows the stretch (None for 8-bit data) passes stretch_known
        self.stretch = stretch if stretch_known or stretch is not None else self._stretch()

    def _pick_bands(self, bands: tuple[int, ...] | None) -> tuple[int, ...]:
        count = self.src.count
        if bands:
            bad = [b for b in bands if not 1 <= b <= count]
            if bad:
                raise QueryDetError(f"{self.path}: --bands {bad[0]} does not exist (the raster "
                                    f"has bands 1..{count})")
            if len(bands) not in (1, 3):
                raise QueryDetError("--bands takes one band (grey) or three (R,G,B)")
            chosen = tuple(bands)
        else:
            colour = [i + 1 for i, ci in enumerate(self.src.colorinterp)
                      if ci.name in ("red", "green", "blue")]
            chosen = tuple(colour[:3]) if len(colour) >= 3 else tuple(range(1, min(count, 3) + 1))
        if len(chosen) == 2:
            chosen = chosen[:1]
        return chosen

    def _palette(self) -> np.ndarray | None:
        """(N, 4) uint8 RGBA lookup table when the chosen band holds colour-table indices."""
        if len(self.bands) != 1:
            return None
        band = self.bands[0]
        if self.src.colorinterp[band - 1].name != "palette":
            return None
        try:
            cmap = self.src.colormap(band)
        except ValueError:
            raise QueryDetError(f"{self.path}: band {band} is palette-coded but its colour table "
                                "cannot be read") from None
        size = max(cmap) + 1
        if size > 65536:
            raise QueryDetError(f"{self.path}: a colour table of {size} entries is not supported")
        lut = np.zeros((size, 4), np.uint8)
        for index, rgba in cmap.items():
            lut[index] = rgba
        return lut

    def _alpha_band(self) -> int | None:
        for i, ci in enumerate(self.src.colorinterp):
            if ci.name == "alpha":
                return i + 1
        return None

    def _stretch(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-band 2nd and 98th percentiles of valid pixels for non-8-bit data; None for uint8."""
        if self.src.dtypes[self.bands[0] - 1] == "uint8" or self.palette is not None:
            return None
        scale = max(self.src.width, self.src.height) / _SAMPLE_SIDE
        shape = (max(1, int(self.src.height / max(scale, 1))), max(1, int(self.src.width / max(scale, 1))))
        data = self.src.read(list(self.bands), out_shape=(len(self.bands), *shape),
                             masked=True).astype(np.float64)
        lo, hi = [], []
        for band in data:
            values = band.compressed()
            values = values[np.isfinite(values)]
            if values.size == 0:
                lo.append(0.0)
                hi.append(1.0)
                continue
            a, b = np.percentile(values, (2, 98))
            lo.append(float(a))
            hi.append(float(b) if b > a else float(a) + 1.0)
        return np.array(lo), np.array(hi)

    def info(self) -> RasterInfo:
        src = self.src
        crs = src.crs.to_string() if src.crs is not None else None
        return RasterInfo(self.path, self.width, self.height, src.count, src.dtypes[0], crs,
                          tuple(src.transform)[:6], self.georeferenced, self.scale,
                          src.width, src.height)

    def gsd(self) -> tuple[float, float] | None:
        """Metres per source pixel (x, y) from the georeference; None when not georeferenced."""
        from .gsd import raster_gsd

        if not self.georeferenced:
            return None
        return raster_gsd(self.src.crs, self.src.transform, self.src.width, self.src.height,
                          str(self.path))

    def resample(self, scale: tuple[float, float]) -> None:
        """Read from now on in model pixels of `scale` source pixels (x, y) each."""
        from .gsd import model_grid

        if tuple(scale) == (1.0, 1.0):
            self.scale = (1.0, 1.0)
            self.width, self.height = self.src.width, self.src.height
            return
        self.width, self.height, sx, sy = model_grid(self.src.width, self.src.height, scale)
        self.scale = (sx, sy)

    def _read_window(self, indexes, x: int, y: int, width: int, height: int, masks: bool = False,
                     nearest: bool = False) -> np.ndarray:
        """Bands (or their masks) of one model-pixel window, resampled from the source."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        read = self.src.read_masks if masks else self.src.read
        sx, sy = self.scale
        col, row = x * sx, y * sy  # fractional windows: GDAL resamples from the exact area
        win = Window(col, row, min(width * sx, self.src.width - col),
                     min(height * sy, self.src.height - row))
        shrink = sx * sy >= 1
        method = Resampling.nearest if nearest else \
            Resampling.average if shrink else Resampling.bilinear
        shape = (len(indexes), height, width) if isinstance(indexes, list) else (height, width)
        return read(indexes, window=win, out_shape=shape, resampling=method)

    def read(self, x: int, y: int, width: int, height: int, keep_uint8: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (3, h, w) float32 in [0, 1] and a valid mask (h, w) bool for one window of
        the grid (source pixels, or model pixels after `resample`). `keep_uint8`: an 8-bit
        raster's pixels stay uint8 (0..255, nodata 0), a quarter of the bytes to move; whoever
        computes divides by 255 (`as_model_input`), on the device, to the same float32."""
        from rasterio.windows import Window

        if self.scale == (1.0, 1.0):
            win = Window(x, y, width, height)
            data = self.src.read(list(self.bands), window=win, masked=True)  # nodata -> masked
            valid = ~np.ma.getmaskarray(data).any(axis=0)
            if self.alpha is not None:
                valid &= self.src.read(self.alpha, window=win) > 0
            else:
                valid &= self.src.read_masks(self.bands[0], window=win) > 0
        else:
            data, valid = self._read_resampled(x, y, width, height)
        if self.palette is not None:  # colour-table indices -> RGB; never infer on indices
            index = np.clip(np.ma.getdata(data)[0].astype(np.int64), 0, len(self.palette) - 1)
            rgba = self.palette[index]  # (h, w, 4)
            valid &= rgba[..., 3] > 0
            data = rgba[..., :3].transpose(2, 0, 1)  # (3, h, w)
        data = np.ma.getdata(data)
        if keep_uint8 and self.stretch is None and data.dtype == np.uint8:
            pixels = np.repeat(data, 3, axis=0) if data.shape[0] == 1 else data.copy()
            if not valid.all():
                np.copyto(pixels, np.uint8(0), where=~valid)
            return pixels, valid
        if self.stretch is None:  # 8-bit: cast and scale in one pass; integers are all finite
            pixels = np.divide(data, np.float32(255.0), dtype=np.float32)
        else:
            pixels = data.astype(np.float32)
        if not np.issubdtype(data.dtype, np.integer):
            finite = np.isfinite(pixels).all(axis=0)
            valid &= finite
            pixels[:, ~finite] = 0
        if self.stretch is not None:
            lo, hi = self.stretch
            pixels = (pixels - lo[:, None, None].astype(np.float32)) / \
                (hi - lo)[:, None, None].astype(np.float32)
            np.clip(pixels, 0.0, 1.0, out=pixels)
        if pixels.shape[0] == 1:
            pixels = np.repeat(pixels, 3, axis=0)
        if not valid.all():
            np.copyto(pixels, np.float32(0.0), where=~valid)  # one pass, no index arrays
        return pixels, valid

    def _read_resampled(self, x: int, y: int, width: int, height: int
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Bands and valid mask of one model-pixel window: a model pixel is valid where at least
        half of the source pixels it covers are (GDAL leaves nodata out of the averages)."""
        palette = self.palette is not None
        data = self._read_window(list(self.bands), x, y, width, height, nearest=palette)
        masks = self._read_window(list(self.bands), x, y, width, height, masks=True)
        valid = (masks >= 128).all(axis=0)
        if self.alpha is not None:
            valid &= self._read_window(self.alpha, x, y, width, height) > 0
        return data, valid

    def overview(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB uint8 overview (H', W', 3) of the whole raster and its downscale factor (grid
        pixels per overview pixel)."""
        scale = max(1.0, max(self.width, self.height) / max_side)
        shape = (max(1, int(self.height / scale)), max(1, int(self.width / scale)))
        data = self.src.read(list(self.bands), out_shape=(len(self.bands), *shape))
        return self.display(data.astype(np.float32)), scale

    def overview_valid(self, shape: tuple[int, int]) -> np.ndarray:
        """Where an overview of `shape` (h, w) has data: the alpha band or the mask, read at that
        size."""
        if self.alpha is not None:
            return self.src.read(self.alpha, out_shape=shape) > 0
        return self.src.read_masks(self.bands[0], out_shape=shape) > 0

    def display(self, data: np.ndarray) -> np.ndarray:
        """Band values (B, h, w) -> RGB uint8 (h, w, 3) for people to look at: colour-table
        indices through the palette, non-8-bit data through the stretch detect uses."""
        if self.palette is not None:
            index = np.clip(data[0].astype(np.int64), 0, len(self.palette) - 1)
            rgb = self.palette[index][..., :3].transpose(2, 0, 1).astype(np.float32)
        elif self.stretch is None:
            rgb = data
        else:
            lo, hi = self.stretch
            rgb = (data - lo[:, None, None]) / (hi - lo)[:, None, None] * 255
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
        return np.nan_to_num(np.clip(rgb, 0, 255)).astype(np.uint8).transpose(1, 2, 0)

    def reopen(self) -> "RasterSource":
        """A second handle on the same raster (for another thread), sharing the stretch."""
        twin = RasterSource.__new__(RasterSource)
        twin.__dict__.update(self.__dict__)
        twin.src = _open(self.name)
        twin._owns = True
        return twin

    def close(self) -> None:
        if self._owns:
            self.src.close()

    def __enter__(self) -> "RasterSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
