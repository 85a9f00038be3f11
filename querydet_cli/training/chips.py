"""`querydet tile`: cut large images or GeoTIFFs and their annotations into training chips.

Windows are read one at a time with rasterio, so a raster is never whole in memory. Chips of a
georeferenced source are GeoTIFFs carrying the window's own transform and the source CRS; chips
of plain images are PNGs. Boxes are clipped to their chip. A box whose visible part is below
`min_visible` of its area is not an object of that chip, but it stays as an ignore region so
the cut-off part is neither learned as background nor counted against a detector.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import Sample
from ..core.errors import QueryDetError
from ..pipeline.tiling import check_plan, make_tiles


@dataclass(frozen=True)
class Window:
    x: int
    y: int
    width: int
    height: int


def quadrant_windows(width: int, height: int) -> list[Window]:
    """The paper's VisDrone split: four equal, non-overlapping quadrants (paper 4.1)."""
    w0, h0 = width // 2, height // 2
    return [Window(0, 0, w0, h0), Window(w0, 0, width - w0, h0),
            Window(0, h0, w0, height - h0), Window(w0, h0, width - w0, height - h0)]


def sliding_windows(width: int, height: int, size: int, overlap: int) -> list[Window]:
    """Windows of `size` (smaller only where the image is) every `size - overlap` pixels, the
    last of each axis flush with the edge: detect's tiler (tiling.py) in fixed windows."""
    check_plan(size, overlap, "--size")
    return [Window(t.x, t.y, t.width, t.height)
            for t in make_tiles(width, height, size, overlap, even=False)]


def default_overlap(size: int) -> int:
    """`querydet tile`'s overlap when none is given: a fifth of the chip, in pixels (102 at
    512)."""
    return size - int(round(size * 0.8))


def clip_boxes(boxes: np.ndarray, window: Window, min_visible: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (G, 4) in chip coordinates: (kept boxes, their indices, partial boxes to ignore)."""
    if len(boxes) == 0:
        empty = np.zeros((0, 4), np.float32)
        return empty, np.zeros(0, np.int64), empty
    shifted = boxes - np.array([window.x, window.y, window.x, window.y], np.float32)
    clipped = shifted.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, window.width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, window.height)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    frac = visible / np.maximum(area, 1e-9)
    keep = (frac >= min_visible) & (visible > 0)
    partial = (frac < min_visible) & (visible > 0)
    return clipped[keep], np.nonzero(keep)[0], clipped[partial]


def cut_chips(samples: list[Sample], class_names: list[str], out_dir: str | Path, *,
              size: int = 512, overlap: int | None = None, quadrants: bool = False,
              min_visible: float = 0.5, keep_empty: bool = False,
              class_ids: list[int] | None = None,
              bounds: tuple[float, float, float, float] | None = None,
              gsd: float | None = None, val_fraction: float = 0.0,
              val_bounds: tuple[float, float, float, float] | None = None) -> Path:
    """Write chips and `annotations.json` (COCO) under out_dir; returns the JSON path.

    `class_ids` are the category ids written for the classes (default 1..K); `bounds`
    (xmin, ymin, xmax, ymax in each raster's CRS) limits the chips to that part of each raster;
    `gsd` (metres per pixel) resamples georeferenced sources to that ground resolution first
    (average when shrinking, bilinear when enlarging), chips and boxes alike.
    `val_fraction` or `val_bounds` set a validation block apart in each raster (see
    `split_windows`): its chips go to `val.json`, the rest to `annotations.json`, and no pixel
    of a validation chip is in a training chip.
    Chip names carry the source's image id, so two sources of one file name never collide.
    A sample with reviewed areas (`Sample.reviewed`) gets chips only inside them, cut over each
    area's extent (smaller where the area is), the empty ones included: they teach "nothing
    here"; outside them nothing is known, so no chip is cut there.
    """
    class_ids = list(class_ids) if class_ids else list(range(1, len(class_names) + 1))
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if not 0 < min_visible <= 1:
        raise QueryDetError(f"--min-visible must be in (0, 1], got {min_visible}")
    overlap = default_overlap(size) if overlap is None else overlap
    if not quadrants:
        check_plan(size, overlap, "--size")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    split = {"train": ([], []), "val": ([], [])}  # images, annotations
    for sample in samples:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                src = rasterio.open(sample.image)
        except RasterioIOError as err:
            print(f"querydet: warning: {sample.image}: cannot read ({err}); skipped", file=sys.stderr)
            continue
        with src:
            grid = _ChipGrid(src, sample.image, bounds, gsd)
            if grid.region is None:
                continue
            windows = split_windows(grid, size, overlap, quadrants, val_fraction,
                                    grid.val_rect(val_bounds), sample.reviewed)
            sample_boxes, sample_ignore = grid.to_grid(sample.boxes), grid.to_grid(sample.ignore)
            for k, (win, part) in enumerate(windows):
                images, annotations = split[part]
                boxes, idx, partial = clip_boxes(sample_boxes, win, min_visible)
                ignore, _, _ = clip_boxes(sample_ignore, win, 1e-9)
                if len(boxes) == 0 and not keep_empty and sample.reviewed is None:
                    continue
                data, transform = grid.read(win)
                name = _write_chip(out, f"{sample.image.stem}_{sample.image_id}_{k:04d}", data,
                                   src.crs if grid.georef else None, transform)
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": name, "width": win.width,
                               "height": win.height, "source": str(sample.image),
                               "window": grid.source_window(win)})
                for box, label in zip(boxes, sample.labels[idx]):
                    annotations.append(coco_annotation(len(annotations) + 1, image_id,
                                            class_ids[int(label)], box, 0))
                for box in np.concatenate([partial, ignore]):
                    if box[2] - box[0] > 0 and box[3] - box[1] > 0:
                        annotations.append(coco_annotation(len(annotations) + 1, image_id, class_ids[0],
                                                box, 1))
    categories = [{"id": i, "name": n} for i, n in zip(class_ids, class_names)]
    if val_fraction or val_bounds:
        write_json(out / "val.json", {"images": split["val"][0],
                                       "annotations": split["val"][1], "categories": categories})
    path = out / "annotations.json"
    write_json(path, {"images": split["train"][0], "annotations": split["train"][1],
                       "categories": categories})
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def split_windows(grid: "_ChipGrid", size: int, overlap: int, quadrants: bool,
                  val_fraction: float, val_rect: tuple[int, int, int, int] | None,
                  reviewed=None) -> list[tuple[Window, str]]:
    """Chip windows of a grid, each marked "train" or "val".

    The validation block is `val_rect` (x1, y1, x2, y2 in grid pixels, from --val-bounds), or
    with `val_fraction` a strip of that share of the grid along its longer side (the east or
    the south end). Validation chips are cut inside the block, training chips outside it, so
    no pixel is in both; a training window that would reach into the block is dropped.
    With `reviewed` (areas in source pixels) the windows are cut over each area's extent and
    kept where the areas cover them.
    """
    def cut(width: int, height: int, x0: int = 0, y0: int = 0) -> list[Window]:
        if reviewed is not None:
            return reviewed_windows(grid, reviewed, size, overlap, (x0, y0, x0 + width,
                                                                     y0 + height))
        wins = (quadrant_windows(width, height) if quadrants
                else sliding_windows(width, height, size, overlap))
        return [Window(w.x + x0, w.y + y0, w.width, w.height) for w in wins]

    width, height = grid.width, grid.height
    if val_rect is None and val_fraction > 0:
        if width >= height:
            x = max(1, min(width - 1, round(width * (1 - val_fraction))))
            return ([(w, "train") for w in cut(x, height)]
                    + [(w, "val") for w in cut(width - x, height, x, 0)])
        y = max(1, min(height - 1, round(height * (1 - val_fraction))))
        return ([(w, "train") for w in cut(width, y)]
                + [(w, "val") for w in cut(width, height - y, 0, y)])
    if val_rect is None:
        return [(w, "train") for w in cut(width, height)]
    x1, y1, x2, y2 = val_rect
    train = [w for w in cut(width, height)
             if w.x >= x2 or w.x + w.width <= x1 or w.y >= y2 or w.y + w.height <= y1]
    return [(w, "train") for w in train] + [(w, "val") for w in cut(x2 - x1, y2 - y1, x1, y1)]


class _ChipGrid:
    """The pixel grid chips are cut from: a raster's region (--bounds), at its own pixels or
    resampled to a ground resolution (--gsd), `scale` source pixels per grid pixel."""

    def __init__(self, src, path: Path, bounds, gsd: float | None) -> None:
        self.src = src
        self.georef = src.crs is not None and not src.transform.is_identity
        self.region = Window(0, 0, src.width, src.height)
        if bounds is not None:
            self.region = _region(src, bounds, path)
        self.scale = (1.0, 1.0)
        if self.region is None:
            return
        self.width, self.height = self.region.width, self.region.height
        if gsd is not None:
            from ..reading.gsd import model_grid, raster_gsd, resolve

            if not self.georef:
                raise QueryDetError(f"--gsd needs georeferenced rasters (their pixel size); "
                                    f"{path} is not")
            found = resolve(gsd, None, raster_gsd(src.crs, src.transform, src.width,
                                                  src.height, str(path)), str(path))
            if found.resampled:
                self.width, self.height, sx, sy = model_grid(self.width, self.height, found.scale)
                self.scale = (sx, sy)

    def val_rect(self, bounds) -> tuple[int, int, int, int] | None:
        """Map `bounds` (xmin, ymin, xmax, ymax) as a window of this grid; None without."""
        if bounds is None:
            return None
        if not self.georef:
            raise QueryDetError("--val-bounds needs georeferenced rasters (use --val-fraction)")
        from rasterio.windows import from_bounds

        win = from_bounds(*bounds, transform=self.src.transform)
        box = self.to_grid(np.array([[win.col_off, win.row_off, win.col_off + win.width,
                                      win.row_off + win.height]], np.float32))[0]
        x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x2, y2 = min(self.width, int(np.ceil(box[2]))), min(self.height, int(np.ceil(box[3])))
        if x2 - x1 < 1 or y2 - y1 < 1:
            return None
        return x1, y1, x2, y2

    def to_grid(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) source-pixel boxes -> grid pixels."""
        r = self.region
        sx, sy = self.scale
        return ((boxes - np.array([r.x, r.y, r.x, r.y], np.float32))
                / np.array([sx, sy, sx, sy], np.float32)).astype(np.float32)

    def _rio_window(self, win: Window):
        from rasterio.windows import Window as RioWindow

        sx, sy = self.scale
        r = self.region
        return RioWindow(r.x + win.x * sx, r.y + win.y * sy, win.width * sx, win.height * sy)

    def source_window(self, win: Window) -> list[float]:
        """A chip's window in source pixels (x, y, width, height); fractional when resampled."""
        w = self._rio_window(win)
        values = [w.col_off, w.row_off, w.width, w.height]
        return [int(v) if self.scale == (1.0, 1.0) else round(float(v), 4) for v in values]

    def read(self, win: Window) -> tuple[np.ndarray, object]:
        """The bands (B, h, w) of one chip window and the chip's own transform."""
        from rasterio.enums import Resampling

        bands = list(range(1, min(self.src.count, 3) + 1))
        rio_win = self._rio_window(win)
        if self.scale == (1.0, 1.0):
            data = self.src.read(bands, window=rio_win)  # (B, h, w): this window only
        else:
            method = Resampling.average if self.scale[0] * self.scale[1] >= 1 \
                else Resampling.bilinear
            data = self.src.read(bands, window=rio_win, resampling=method,
                                 out_shape=(len(bands), win.height, win.width))
        transform = self.src.window_transform(rio_win)
        if self.scale != (1.0, 1.0):
            transform = transform @ transform.scale(*self.scale)
        return data, transform


def _write_chip(out: Path, stem: str, data: np.ndarray, crs, transform) -> str:
    """One chip under out/images, written through a temporary file; returns its file name.

    GeoTIFF chips keep the window's georeference; 16-bit and float images (which PNG cannot
    hold in colour) become plain TIFFs; the rest PNG."""
    import rasterio

    if crs is not None or data.dtype != np.uint8:
        name = f"{stem}.tif"
        profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1],
                   "count": data.shape[0], "dtype": data.dtype, "compress": "deflate"}
        if crs is not None:
            profile |= {"crs": crs, "transform": transform}
        tmp = out / "images" / f".{name}.tmp"
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
    else:
        from PIL import Image

        name = f"{stem}.png"
        pixels = data.transpose(1, 2, 0)
        if pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        tmp = out / "images" / f".{name}.tmp.png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp)
    tmp.replace(out / "images" / name)
    return name


def _region(src, bounds: tuple[float, float, float, float], path: Path) -> Window | None:
    """The pixel window of map `bounds` within the raster, or None (with a warning) if empty."""
    from rasterio.windows import from_bounds

    if src.crs is None or src.transform.is_identity:
        raise QueryDetError(f"--bounds needs georeferenced rasters; {path} is not")
    win = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
    x1, y1 = max(0, int(win.col_off)), max(0, int(win.row_off))
    x2 = min(src.width, int(win.col_off + win.width))
    y2 = min(src.height, int(win.row_off + win.height))
    if x2 - x1 < 1 or y2 - y1 < 1:
        print(f"querydet: warning: {path}: --bounds do not overlap it; skipped", file=sys.stderr)
        return None
    return Window(x1, y1, x2 - x1, y2 - y1)


def coco_annotation(ann_id: int, image_id: int, category: int, box: np.ndarray, crowd: int) -> dict:
    x1, y1, x2, y2 = (round(float(v), 2) for v in box)
    return {"id": ann_id, "image_id": image_id, "category_id": category,
            "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
            "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": crowd}


def reviewed_windows(grid: "_ChipGrid", reviewed, size: int, overlap: int,
                     part: tuple[int, int, int, int]) -> list[Window]:
    """Chip windows over each reviewed area's extent within `part` (x1, y1, x2, y2 in grid
    pixels), kept where the areas (a geometry in source pixels) cover them; one window is kept
    once where areas overlap."""
    from shapely.geometry import box

    areas = list(getattr(reviewed, "geoms", [reviewed]))
    found: dict[Window, None] = {}
    for area in areas:
        extent = grid.to_grid(np.array([area.bounds], np.float32))[0]
        x1, y1 = max(part[0], int(np.floor(extent[0]))), max(part[1], int(np.floor(extent[1])))
        x2, y2 = min(part[2], int(np.ceil(extent[2]))), min(part[3], int(np.ceil(extent[3])))
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue
        for w in sliding_windows(x2 - x1, y2 - y1, size, min(overlap, size - 1)):
            win = Window(w.x + x1, w.y + y1, w.width, w.height)
            sx, sy, sw, sh = grid.source_window(win)
            # a hair inside, so a window on an area's edge (or rounded to it) still counts
            if reviewed.buffer(1e-3).covers(box(sx, sy, sx + sw, sy + sh)):
                found[win] = None
    return list(found)
