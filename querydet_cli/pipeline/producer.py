"""The producer of `detect`: pixels in, per-tile detections out.

A reader thread prefetches windows (at the model's GSD) so disk and compute overlap. Tiles are
batched through the model (a tile with nodata only where it has data), optionally in eight
dihedral views (`--tta`), and each tile's detections leave in global pixels with the flags the
consumer's merge needs (cut by an inner tile edge, in the tile's exclusive area) and the tile's
valid mask (validity.py), so the consumer never reads pixels. The same class runs locally and
on Ray actors (ray_producer.py).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, NamedTuple, Protocol

import numpy as np
import torch

from querydet_models import FPNDetector, run_stages

from ..core.config import Config
from ..core.errors import QueryDetError
from .batching import TileBatcher
from ..reading.gsd import Resolution
from .merge import suppress_nested
from .options import ProduceOptions, reader_count, worker_count
from .overview import heat_in_tile, query_heatmaps
from .profile import Profile
from ..reading.raster import RasterSource
from .tiling import Tile, make_tiles
from .tta import TTA_VIEWS, dihedral, undo_dihedral, vote
from .validity import pack_valid

log = logging.getLogger("querydet")
EDGE_TOLERANCE = 2.0  # px: a box this close to an inner tile edge is cut by it


class TileDetections(NamedTuple):
    """One tile's detections as the producer hands them on, in global pixels (n,) / (n, 4)."""

    boxes: np.ndarray  # (n, 4) xyxy float64
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) int64
    cut: np.ndarray  # (n,) bool: touches an inner tile edge (a fragment)
    exclusive: np.ndarray  # (n,) bool: in the tile's exclusive zone, final at once
    # the tile's valid pixels (validity.pack_valid): None when all are valid
    valid: bytes | None = None


def read_failure(src: RasterSource, err: Exception) -> str:
    """Why a window read failed, naming a missing source file of a VRT (GDAL only says
    'Read failed. See previous exception for details.')."""
    try:
        missing = [f for f in src.src.files[1:] if not f.startswith("/vsi") and not os.path.exists(f)]
    except Exception:  # a driver without a file list
        missing = []
    if missing:
        return f"source file missing: {missing[0]}"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def as_model_input(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tile's pixels (3, h, w) on the model's device as float32 in [0, 1]. To a GPU they
    travel as read (uint8 for an 8-bit raster: a quarter of float32's bytes) from pinned memory
    without blocking, and are scaled there; on the CPU the same division, the same numbers."""
    tensor = torch.from_numpy(pixels)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    if tensor.dtype == torch.uint8:
        tensor = tensor.to(torch.float32).div_(255.0)
    return tensor


def _read_one(src: RasterSource, t: Tile, profile: Profile):
    started = time.perf_counter()
    pixels, valid = src.read(t.x, t.y, t.width, t.height, keep_uint8=True)
    profile.reader_seconds += time.perf_counter() - started
    return t, pixels if valid.any() else None, valid


def _reader(src: RasterSource, tiles: list[Tile], out: queue.Queue, stop: threading.Event,
            profile: Profile, readers: int = 1) -> None:
    """Read `tiles` into `out` in plan order, then None (or the exception that stopped it).
    With several `readers`, each thread decodes on its own handle of the raster and at most
    two windows per thread are in flight ahead of the queue."""
    handles: list[RasterSource] = []
    try:
        if readers <= 1:
            for t in tiles:
                if stop.is_set():
                    return
                out.put(_read_one(src, t, profile))
            out.put(None)
            return
        handles = [src.reopen() for _ in range(readers)]
        free: queue.Queue = queue.Queue()
        for h in handles:
            free.put(h)

        def read(t: Tile):
            handle = free.get()
            try:
                return _read_one(handle, t, profile)
            finally:
                free.put(handle)

        with ThreadPoolExecutor(readers, thread_name_prefix="querydet-read") as pool:
            ahead: collections.deque = collections.deque()
            for t in tiles:
                if stop.is_set():
                    break
                ahead.append(pool.submit(read, t))
                if len(ahead) >= 2 * readers:
                    out.put(ahead.popleft().result())
            while ahead and not stop.is_set():
                out.put(ahead.popleft().result())
            for f in ahead:
                f.cancel()
        if not stop.is_set():
            out.put(None)
    except Exception as err:  # handed to the consumer, which raises it in the main thread
        out.put(err)
    finally:
        for h in handles:
            h.close()


class InputPlanner:
    """How a run reads each input: the ground resolution (`attach`) and the one tile plan
    (`plan`). The consumer plans every input once and hands the plan on; a Ray worker plans
    its own band with an equal planner, so both sides agree tile for tile."""

    def __init__(self, model_gsd: float | None, align: int, options: ProduceOptions) -> None:
        self.model_gsd = model_gsd
        self.align = align
        self.opts = options
        self._said: set[str] = set()  # GSD notices already given in this run

    def attach(self, src: RasterSource) -> Resolution:
        """Set `src` to be read at the run's ground resolution (`--gsd`): the model's GSD unless
        told otherwise; native pixels when either side's GSD is unknown (said once per run)."""
        from ..reading.gsd import resolve

        source_gsd = src.gsd() if self.opts.input_gsd is None else \
            (self.opts.input_gsd, self.opts.input_gsd)
        res = resolve(self.opts.gsd, self.model_gsd, source_gsd, str(src.path))
        src.resample(res.scale)
        if res.reason == "the input's GSD is unknown" and res.reason not in self._said:
            self._said.add(res.reason)
            log.warning("%s has no georeference and no --input-gsd: read at its own pixels, not "
                        "at the model's %.3g m (give --input-gsd METRES, or --gsd native to "
                        "silence this)", src.path, self.model_gsd if self.opts.gsd == "auto"
                        else float(self.opts.gsd))
        elif res.reason == "the model records no GSD" and source_gsd is not None \
                and res.reason not in self._said:
            self._said.add(res.reason)
            log.info("the model records no training GSD: inputs are read at their own pixels")
        if res.resampled:
            log.info("%s: %.4g m pixels read at %.4g m (%.3g x %.3g source pixels per model "
                     "pixel)", src.path, source_gsd[0], res.target_gsd, *src.scale)
        return res

    def plan(self, info) -> list[Tile]:
        """The tiles of a raster, in the order they are produced and merged."""
        return make_tiles(info.width, info.height, self.opts.tile_size, self.opts.overlap,
                          align=self.align)

    def rows(self, path: str) -> int | None:
        """Tile rows of the raster at `path` (None when it cannot be opened): what a producer
        that splits rasters into bands of rows needs to know before the run."""
        try:  # only the size is needed: no percentile stretch
            with RasterSource(path, self.opts.bands, stretch_known=True) as src:
                self.attach(src)
                return max(t.row for t in self.plan(src.info())) + 1
        except QueryDetError:
            return None


class Producer(Protocol):
    """What the consumer (detect.py) asks of a producer: per-tile detections of each input, in
    tile order. `TileProducer` runs here; `ray_producer.RayProducer` on Ray actors. The caller
    (CLI, Python API) chooses one; the pipeline never names Ray."""

    profile: Profile  # where the consumer's stages are timed too
    precision: str | None  # what the tiles are computed in; None: the model's, resolved

    def start(self, inputs: list[str], states: dict[int, dict[str, Any]],
              planner: InputPlanner) -> None:
        """Before the first input: `states` are the journal's, per 1-based input index."""

    def results(self, image_id: int, src: RasterSource, tiles: list[Tile]
                ) -> Iterable[tuple[Tile, "TileDetections | None", np.ndarray | None]]:
        """(tile, detections, query heatmap) of `tiles` of input `image_id`, in tile order."""

    def skip(self, image_id: int) -> None:
        """Input `image_id` failed on the consumer's side: drop what was made for it."""

    def close(self) -> None:
        """The run is over (or interrupted)."""


class TileProducer:
    """The local producer (pixels in, boxes out): one model over the tiles of rasters, options
    fixed for a run. Tiles are read by a thread, batched through the model and turned into
    detections in global pixels; nothing here merges or writes."""

    def __init__(self, model: FPNDetector, cfg: Config, options: ProduceOptions,
                 device: torch.device, heatmaps: bool = False) -> None:
        """`options` resolved for `device` (`ProduceOptions.resolved`); `heatmaps`: also each
        tile's query heatmap (for the consumer's overview pictures)."""
        options.check_resolved()
        self.model = model
        self.cfg = cfg
        self.heatmaps = heatmaps
        self.workers = worker_count(options, device, model)
        self.readers = reader_count(options, device)
        self.threads = options.threads or max(1, torch.get_num_threads() // self.workers)
        self.opts = options
        self.device = device
        self.mode = {k: v for k, v in (("mode", options.mode), ("sigma", options.sigma),
                                       ("context", options.context), ("backend", options.backend),
                                       ("start_level", options.start_level)) if v is not None}
        # the run's precision, passed to the model per call: the model's own setting stays
        self.precision = model.resolved_precision(options.precision or cfg.inference.precision)
        log.info("precision: %s", self.precision)
        self.profile = Profile()
        if options.profile and device.type == "cuda":
            self.profile.sync = lambda: torch.cuda.synchronize(device)
        self.planner = InputPlanner(cfg.data.gsd, model.size_divisibility, options)

    # -- the Producer protocol ----------------------------------------------------------------
    def start(self, inputs: list[str], states: dict[int, dict[str, Any]],
              planner: InputPlanner) -> None:
        pass  # nothing runs ahead: each input is produced when the consumer asks for it

    def results(self, image_id: int, src: RasterSource, tiles: list[Tile]):
        return self.produce(src, tiles)

    def skip(self, image_id: int) -> None:
        pass

    def close(self) -> None:
        pass

    def infer(self, batch: list[tuple[Tile, np.ndarray, np.ndarray]]
              ) -> list[tuple[dict[str, torch.Tensor], np.ndarray | None]]:
        prof = self.profile
        align = self.model.size_divisibility
        # only the part of a tile that holds data goes through the network: a nodata collar
        # (orthomosaic footprints) costs nothing beyond the rectangle around the data
        crops = [data_window(valid, align) for _, _, valid in batch]
        with self.model.compute(self.precision):  # inference_mode + autocast, this run's
            with prof.stage("preprocess"):
                images = [as_model_input(p[:, y0:y1, x0:x1], self.device)
                          for (_, p, _), (x0, y0, x1, y1) in zip(batch, crops)]
            masks = [torch.from_numpy(np.ascontiguousarray(v[y0:y1, x0:x1]))
                     for (_, _, v), (x0, y0, x1, y1) in zip(batch, crops)]
            dets, levels, batch_shape = self._forward(images, masks=masks)
            prof.count(tiles=len(batch),
                       tile_pixels=sum(t.width * t.height for t, _, _ in batch))
            if self.opts.tta:  # the seven other dihedral views, each mapped back and voted
                views = [dets]
                for k, flip in TTA_VIEWS[1:]:
                    turned = [dihedral(im, im.new_zeros(0, 4), k, flip)[0] for im in images]
                    turned_masks = [dihedral(m[None].float(), im.new_zeros(0, 4), k, flip)[0][0] > 0.5
                                    for m, im in zip(masks, images)]
                    found, _, _ = self._forward(turned, count=False, masks=turned_masks)
                    for det, im in zip(found, images):
                        det["boxes"] = undo_dihedral(det["boxes"], k, flip, *im.shape[-2:])
                    views.append(found)
                with prof.stage("postprocess"):
                    floor = self.model.inference_for(self.opts.score_threshold).score_threshold
                    dets = [vote([v[i] for v in views], self.opts.merge_threshold, floor)
                            for i in range(len(images))]
            with prof.stage("postprocess"):
                for det, (x0, y0, _, _) in zip(dets, crops):
                    if x0 or y0:  # back to tile pixels
                        det["boxes"] = det["boxes"] + det["boxes"].new_tensor([x0, y0, x0, y0])
        # the query heatmap is only drawn with --save-vis: no per-tile work nobody asked for
        heats = query_heatmaps(levels, len(batch)) if self.heatmaps else [None] * len(batch)
        heats = [None if h is None else heat_in_tile(h, batch_shape, c, t.height, t.width)
                 for h, c, (t, _, _) in zip(heats, crops, batch)]
        return list(zip(dets, heats))

    def _forward(self, images: list[torch.Tensor], count: bool = True,
                 masks: list[torch.Tensor] | None = None):
        """The model's stages (models/stages.py) on a list of (3, h, w) images, each timed as a
        stage of the profile: detections per image (tile pixels of the crop), the levels, and
        the padded batch's (H, W). `masks`: each image's valid pixels. `count`: add the pixels
        and CSQ's decisions to the profile (not for the extra views of --tta)."""
        prof = self.profile
        done = run_stages(self.model, images, masks=masks,
                          score_threshold=self.opts.score_threshold, stage=prof.stage,
                          **self.mode)
        if count:
            prof.count(pixels=sum(h * w for h, w in done.sizes))
        # split the heads' time by level kind, FPN time apart (measured inside the levels)
        for lv in done.levels:
            prof.move("coarse_heads", "fpn", lv.fpn_seconds)
            if not lv.is_dense or lv.decided_dense:
                prof.move("coarse_heads", "sparse_heads", lv.seconds)
        if count and any(lv.decided_dense for lv in done.levels):
            prof.count(tiles_dense_by_decision=len(images))
        return done.detections, done.levels, done.batch_shape

    def produce(self, src: RasterSource, tiles: list[Tile], info=None
                ) -> Iterator[tuple[Tile, "TileDetections | None", np.ndarray | None]]:
        """The producer (pixels in, boxes out): (tile, its detections, query heatmap) in tile
        order. A reader thread prefetches windows; batches of tiles go through the model on
        `self.workers` threads at once, and come back in tile order. Detections are
        `_tile_detections` arrays in global pixels; None for an all-nodata tile."""
        info = info or src.info()
        q: queue.Queue = queue.Queue(
            maxsize=max(1, self.opts.prefetch * self.opts.batch_size * self.workers))
        stop = threading.Event()
        reader = threading.Thread(target=_reader, args=(src, tiles, q, stop, self.profile,
                                                        self.readers), daemon=True)
        reader.start()
        threads_before = torch.get_num_threads()
        pool = None
        if self.workers > 1:
            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="querydet-tile",
                                      initializer=torch.set_num_threads,
                                      initargs=(self.threads,))
        elif self.threads != threads_before:
            torch.set_num_threads(self.threads)
        try:
            yield from self._batches(src, tiles, q, info, pool)
        finally:
            stop.set()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if torch.get_num_threads() != threads_before:
                torch.set_num_threads(threads_before)
            while reader.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(timeout=0.1)

    def _batches(self, src: RasterSource, tiles: list[Tile], q: queue.Queue, info,
                 pool: ThreadPoolExecutor | None
                 ) -> Iterator[tuple[Tile, "TileDetections | None", np.ndarray | None]]:
        """The read tiles in batches through the model (on `pool` when given, at most one batch
        per worker in flight), their detections yielded in tile order."""
        batcher = TileBatcher(tiles, self.opts.batch_size,
                              lambda items: pool.submit(self.infer, items) if pool is not None
                              else self.infer(items))
        while True:
            with self.profile.stage("read"):
                item = q.get()
            if isinstance(item, Exception):
                raise QueryDetError(f"{src.path}: read failed: {read_failure(src, item)}"
                                    ) from None
            if item is None:
                break
            batcher.add(*item)
            yield from self._finished(batcher.done(self.workers - 1), info)
        batcher.flush()
        yield from self._finished(batcher.done(0), info)

    def _finished(self, batches, info
                  ) -> Iterator[tuple[Tile, "TileDetections | None", np.ndarray | None]]:
        """Each finished batch's tiles with their detections (None: an all-nodata tile)."""
        for items, results in batches:
            if results is None:
                yield items[0][0], None, None
                continue
            for (tile, _, valid), (det, heat) in zip(items, results):
                with self.profile.stage("merge"):
                    found = self._tile_detections(tile, det, valid, info)
                yield tile, found, heat

    def _tile_detections(self, tile: Tile, det: dict[str, torch.Tensor], valid: np.ndarray,
                         info) -> TileDetections:
        boxes = det["boxes"].float().cpu().numpy().astype(np.float64)
        scores = det["scores"].float().cpu().numpy().astype(np.float64)
        labels = det["labels"].cpu().numpy().astype(np.int64)
        if len(boxes):  # drop detections centred on nodata
            cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2).astype(int), 0, tile.width - 1)
            cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2).astype(int), 0, tile.height - 1)
            keep = valid[cy, cx]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.opts.merge_metric == "ios" and len(boxes):
            keep = suppress_nested(boxes, scores, labels, self.opts.merge_threshold)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        left, top, right, bottom = tile.inner_edges(info.width, info.height)
        cut = ((left & (boxes[:, 0] <= EDGE_TOLERANCE))
               | (top & (boxes[:, 1] <= EDGE_TOLERANCE))
               | (right & (boxes[:, 2] >= tile.width - EDGE_TOLERANCE))
               | (bottom & (boxes[:, 3] >= tile.height - EDGE_TOLERANCE)))
        boxes = boxes + np.array([tile.x, tile.y, tile.x, tile.y], np.float64)
        ex1, ey1, ex2, ey2 = tile.exclusive
        exclusive = ((boxes[:, 0] >= ex1) & (boxes[:, 1] >= ey1) & (boxes[:, 2] <= ex2)
                     & (boxes[:, 3] <= ey2) & ~cut)
        return TileDetections(boxes, scores, labels, cut, exclusive, pack_valid(valid))


def data_window(valid: np.ndarray, align: int = 1) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the smallest window of a tile holding all its valid pixels, its start
    rounded down and its size up to multiples of `align` (within the tile); the whole tile
    when it has no valid pixel."""
    height, width = valid.shape
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if not len(rows):
        return 0, 0, width, height

    def span(first: int, last: int, length: int) -> tuple[int, int]:
        start = first // align * align
        return start, min(length, start + -(-(last + 1 - start) // align) * align)

    (y0, y1), (x0, x1) = span(rows[0], rows[-1], height), span(cols[0], cols[-1], width)
    return x0, y0, x1, y1
