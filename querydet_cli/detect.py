"""`querydet detect`: stream rasters through tiling, batched CSQ inference and cross-tile merging.

A reader thread prefetches windows so disk and compute overlap. Tiles are batched through the
model, and per-tile detections go to global pixel coordinates. The merger releases them once no
later tile can overlap them. Final detections are appended to a journal (NDJSON, flushed per
tile row) next to the output. At the end the journal becomes the requested format in a
temporary file, which is then renamed into place. An interrupted run leaves no output, only the
journal, and `--resume` picks up from the last finished tile row.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from querydet_models.detector import FPNDetector as QueryDet

from .augment import TTA_VIEWS, dihedral, undo_dihedral, vote
from .config import Config
from .errors import QueryDetError
from .gsd import Resolution
from .identity import run_key
from .journal import Journal
from .locking import OutputLock
from .merge import Detections, TileMerger, suppress_nested
from .overview import Overview, heat_in_tile, query_heatmaps
from .profile import Profile
from .raster import RasterSource
from .tiling import Tile, make_tiles, row_starts
from .writers import GEO_FORMATS, OutputWriter, pixel_box_ring, read_records, to_lonlat

log = logging.getLogger("querydet")
EDGE_TOLERANCE = 2.0  # px: a box this close to an inner tile edge is cut by it


@dataclass(frozen=True)
class DetectOptions:
    tile_size: int = 1024
    overlap: int = 128
    batch_size: int | None = None  # None: by device (see default_batch_size)
    mode: str | None = None
    sigma: float | None = None
    context: str | None = None
    backend: str | None = None
    start_level: int | None = None
    score_threshold: float | None = None
    bands: tuple[int, ...] | None = None
    merge_metric: str = "ios"  # IoS: SAHI's greedy-merge measure, nested duplicates too
    merge_threshold: float = 0.5
    rfc7946: bool = False
    resume: bool = False
    prefetch: int = 2
    save_vis: str | None = None
    precision: str | None = None  # None: the checkpoint's inference.precision (auto)
    # COCO image id per input (from --coco-gt); None: the input's position, from 1
    image_ids: tuple[int, ...] | None = None
    profile: bool = False  # synchronise CUDA at stage edges, for exact per-stage times
    # ground resolution: "auto" (the model's GSD), "native" (source pixels) or metres per pixel
    gsd: str | float = "auto"
    input_gsd: float | None = None  # metres per pixel of inputs without a georeference
    tta: bool = False  # each tile seen in its eight dihedral views, the answers voted into one


@dataclass
class DetectSummary:
    """What a run wrote: `detections` counts the whole output, journal included."""

    inputs: int = 0
    done: int = 0
    failed: list[tuple[str, str]] | None = None
    detections: int = 0
    resumed_detections: int = 0  # of `detections`, those from the interrupted run's journal
    new_detections: int = 0  # of `detections`, those found by this run
    megapixels: float = 0.0
    seconds: float = 0.0
    output_written: bool = False
    profile: dict[str, Any] | None = None  # seconds per stage (see profile.py)
    precision: str | None = None


class DetectInterrupted(QueryDetError):
    """Ctrl-C during `detect`: says where it stopped and whether a journal is kept."""

    exit_code = 130

    def __init__(self, message: str, resumable: bool) -> None:
        super().__init__(message)
        self.resumable = resumable


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


def _reader(src: RasterSource, tiles: list[Tile], out: queue.Queue, stop: threading.Event,
            profile: Profile) -> None:
    try:
        for t in tiles:
            if stop.is_set():
                return
            started = time.perf_counter()
            pixels, valid = src.read(t.x, t.y, t.width, t.height)
            profile.reader_seconds += time.perf_counter() - started
            out.put((t, pixels if valid.any() else None, valid))
        out.put(None)
    except Exception as err:  # handed to the consumer, which raises it in the main thread
        out.put(err)


def default_batch_size(device: torch.device) -> int:
    """Tiles per batch when none is given: 1 on the CPU, where batching costs time (measured:
    a 4096^2 raster in 1024 px tiles, fp32, 2 cores: 20 s at batch 1, 24 s at 2, 26 s at 4),
    4 on CUDA (not measured here: no GPU was lent)."""
    return 4 if device.type == "cuda" else 1


class RasterDetector:
    """Runs one model over the tiles of rasters; options fixed for a run."""

    def __init__(self, model: QueryDet, cfg: Config, options: DetectOptions,
                 device: torch.device) -> None:
        self.model = model
        self.cfg = cfg
        if options.batch_size is None:
            options = replace(options, batch_size=default_batch_size(device))
        self.opts = options
        self.device = device
        self.names = cfg.names()
        self.category_ids = cfg.category_ids()
        self.mode = {k: v for k, v in (("mode", options.mode), ("sigma", options.sigma),
                                       ("context", options.context), ("backend", options.backend),
                                       ("start_level", options.start_level)) if v is not None}
        if options.score_threshold is not None:
            model.inference = replace(model.inference, score_threshold=options.score_threshold)
        self.precision = model.set_precision(options.precision or cfg.inference.precision)
        log.info("precision: %s", self.precision)
        self.profile = Profile()
        if options.profile and device.type == "cuda":
            self.profile.sync = lambda: torch.cuda.synchronize(device)
        self.model_gsd = cfg.data.gsd
        self._said: set[str] = set()  # GSD notices already given in this run

    def attach(self, src: RasterSource) -> Resolution:
        """Set `src` to be read at the run's ground resolution (`--gsd`): the model's GSD unless
        told otherwise; native pixels when either side's GSD is unknown (said once per run)."""
        from .gsd import resolve

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

    def infer(self, batch: list[tuple[Tile, np.ndarray, np.ndarray]]
              ) -> list[tuple[dict[str, torch.Tensor], np.ndarray | None]]:
        prof = self.profile
        align = getattr(self.model, "size_divisibility", 1)
        # only the part of a tile that holds data goes through the network: a nodata collar
        # (orthomosaic footprints) costs nothing beyond the rectangle around the data
        crops = [data_window(valid, align) for _, _, valid in batch]
        with self.model.compute():  # inference_mode + autocast to the run's precision
            with prof.stage("preprocess"):
                images = [torch.from_numpy(p[:, y0:y1, x0:x1]).to(self.device)
                          for (_, p, _), (x0, y0, x1, y1) in zip(batch, crops)]
            dets, levels, tensor = self._forward(images)
            prof.tiles += len(batch)
            prof.tile_pixels += sum(t.width * t.height for t, _, _ in batch)
            if self.opts.tta:  # the seven other dihedral views, each mapped back and voted
                views = [dets]
                for k, flip in TTA_VIEWS[1:]:
                    turned = [dihedral(im, im.new_zeros(0, 4), k, flip)[0] for im in images]
                    found, _, _ = self._forward(turned, count=False)
                    for det, im in zip(found, images):
                        det["boxes"] = undo_dihedral(det["boxes"], k, flip, *im.shape[-2:])
                    views.append(found)
                with prof.stage("postprocess"):
                    floor = self.model.inference.score_threshold  # on the voted score
                    dets = [vote([v[i] for v in views], self.opts.merge_threshold, floor)
                            for i in range(len(images))]
            with prof.stage("postprocess"):
                for det, (x0, y0, _, _) in zip(dets, crops):
                    if x0 or y0:  # back to tile pixels
                        det["boxes"] = det["boxes"] + det["boxes"].new_tensor([x0, y0, x0, y0])
        # the query heatmap is only drawn with --save-vis: no per-tile work nobody asked for
        heats = query_heatmaps(levels, len(batch)) if self.opts.save_vis else [None] * len(batch)
        heats = [None if h is None else heat_in_tile(h, tensor.shape[-2:], c, t.height, t.width)
                 for h, c, (t, _, _) in zip(heats, crops, batch)]
        return list(zip(dets, heats))

    def _forward(self, images: list[torch.Tensor], count: bool = True):
        """The model's stages on a list of (3, h, w) images, timed per stage: detections per
        image (tile pixels of the crop), the levels, and the padded batch. `count`: add
        the pixels and CSQ's decisions to the profile (not for the extra views of --tta)."""
        prof = self.profile
        with prof.stage("preprocess"):
            tensor, sizes = self.model.preprocess(images)
            if count:
                prof.pixels += sum(h * w for h, w in sizes)
        with prof.stage("backbone"):
            features = self.model.extract_features(tensor)
        with prof.stage("coarse_heads"):
            levels = self.model.predict_levels(features, **self.mode)
        # split the heads' time by level kind, FPN time apart (measured inside the levels)
        for lv in levels:
            prof.move("coarse_heads", "fpn", lv.fpn_seconds)
            if not lv.is_dense or lv.decided_dense:
                prof.move("coarse_heads", "sparse_heads", lv.seconds)
        if count and any(lv.decided_dense for lv in levels):
            prof.tiles_dense_by_decision += len(images)
        with prof.stage("postprocess"):
            dets = self.model.detections(levels, sizes, features)
        return dets, levels, tensor

    def produce(self, src: RasterSource, tiles: list[Tile], info=None
                ) -> Iterator[tuple[Tile, tuple[np.ndarray, ...] | None, np.ndarray | None]]:
        """The producer (pixels in, boxes out): (tile, its detections, query heatmap) in tile
        order. A reader thread prefetches windows; tiles are batched through the model.
        Detections are `_tile_detections` arrays in global pixels; None for an all-nodata tile.
        """
        info = info or src.info()
        q: queue.Queue = queue.Queue(maxsize=max(1, self.opts.prefetch * self.opts.batch_size))
        stop = threading.Event()
        reader = threading.Thread(target=_reader, args=(src, tiles, q, stop, self.profile),
                                  daemon=True)
        reader.start()
        batch: list[tuple[Tile, np.ndarray, np.ndarray]] = []
        # a batch never spans two tile rows, nor two groups of batch_size tiles of a row: the
        # batches (and so the sums) are the same whichever row a run starts from (--resume, a
        # Ray band), so every way of running gives bit-identical detections
        row_first: dict[int, int] = {}
        for t in tiles:
            row_first.setdefault(t.row, t.index)

        def group(t: Tile) -> tuple[int, int]:
            return t.row, (t.index - row_first[t.row]) // self.opts.batch_size

        def flush() -> Iterator[tuple[Tile, tuple[np.ndarray, ...], np.ndarray | None]]:
            if not batch:
                return
            for (tile, _, valid), (det, heat) in zip(batch, self.infer(batch)):
                with self.profile.stage("merge"):
                    found = self._tile_detections(tile, det, valid, info)
                yield tile, found, heat
            batch.clear()

        try:
            while True:
                with self.profile.stage("read"):
                    item = q.get()
                if isinstance(item, Exception):
                    raise QueryDetError(f"{src.path}: read failed: {read_failure(src, item)}"
                                        ) from None
                if item is None:
                    break
                tile, pixels, valid = item
                if pixels is None:  # all nodata: nothing to look at
                    yield from flush()
                    yield tile, None, None
                else:
                    if batch and group(batch[-1][0]) != group(tile):
                        yield from flush()
                    batch.append((tile, pixels, valid))
                    if len(batch) >= self.opts.batch_size:
                        yield from flush()
            yield from flush()
        finally:
            stop.set()
            while reader.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(timeout=0.1)

    def run(self, src: RasterSource, image_id: int, emit: Callable[[list[dict]], None],
            checkpoint: Callable[[dict[str, Any]], None], state: dict[str, Any],
            progress: Callable[[int], None] | None = None, vis: "Overview | None" = None,
            results: Iterable[tuple[Tile, tuple[np.ndarray, ...] | None, Any]] | None = None
            ) -> int:
        """The consumer: merge each tile's detections across tiles, emit final ones and
        checkpoint per finished tile row; returns the number emitted. `results` (tile,
        detections, heatmap) come from `produce` here, or from elsewhere (Ray workers)."""
        self.attach(src)
        self.profile.scales.append(src.scale)
        info = self._info = src.info()  # read once: _emit runs for every released tile row
        # a second handle, for this thread only: the reader thread owns `src` while it runs
        self._probe = src.reopen()
        tiles = self.plan(info)
        starts = row_starts(tiles)
        last_row = max(starts)
        rows_done = int(state.get("rows_done", 0))
        merger = TileMerger(self.opts.merge_metric, self.opts.merge_threshold)
        if state.get("pending"):
            merger.restore(state["pending"])
        todo = [t for t in tiles if t.row >= rows_done]
        per_row = {r: sum(1 for t in tiles if t.row == r) for r in starts}
        finished = {r: 0 for r in starts}
        emitted = 0
        next_row = rows_done
        self.rows = (rows_done, len(starts))  # tile rows done, of all (for an interrupt message)

        def release_rows() -> None:
            nonlocal next_row, emitted
            while next_row <= last_row and finished[next_row] == per_row[next_row]:
                below = starts[next_row + 1] if next_row < last_row else None
                with self.profile.stage("merge"):
                    final = merger.release(below)
                    pending = merger.snapshot()
                with self.profile.stage("write"):
                    emitted += self._emit(final, src, image_id, emit, vis)
                    checkpoint({"rows_done": next_row + 1, "pending": pending})
                next_row += 1
                self.rows = (next_row, len(starts))

        try:
            for tile, found, heat in (results if results is not None
                                      else self.produce(src, todo, info)):
                if progress:
                    progress(1)
                if found is not None:
                    with self.profile.stage("merge"):
                        final = merger.add(tile.index, *found)
                    with self.profile.stage("write"):
                        emitted += self._emit(final, src, image_id, emit, vis)
                    if vis is not None:
                        vis.add_heat(tile, heat)
                finished[tile.row] += 1
                release_rows()
            release_rows()
        finally:
            self._probe.close()
        return emitted

    def plan(self, info) -> list[Tile]:
        """The tiles of a raster, in the order they are produced and merged."""
        return make_tiles(info.width, info.height, self.opts.tile_size, self.opts.overlap,
                          align=getattr(self.model, "size_divisibility", 1))

    def _tile_detections(self, tile: Tile, det: dict[str, torch.Tensor], valid: np.ndarray,
                         info) -> tuple[np.ndarray, ...]:
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
        return boxes, scores, labels, cut, exclusive

    def _emit(self, dets: Detections, src: RasterSource, image_id: int,
              emit: Callable[[list[dict]], None], vis: "Overview | None") -> int:
        if dets.fused is not None and dets.fused.any():
            # a box fused from fragments: each fragment's centre was checked in its tile, but the
            # whole object's centre was not; drop it if it is nodata
            keep = np.ones(len(dets), bool)
            for i in np.nonzero(dets.fused)[0]:
                x1, y1, x2, y2 = dets.boxes[i]
                _, valid = self._probe.read(int((x1 + x2) / 2), int((y1 + y2) / 2), 1, 1)
                keep[i] = bool(valid[0, 0])
            dets = Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])
        if not len(dets):
            return 0
        info = self._info
        records = []
        # boxes found on the model's grid, mapped back to the source's pixels and CRS
        for box, score, label in zip(info.to_source(dets.boxes), dets.scores, dets.labels):
            ring = None
            if info.georeferenced:
                ring = pixel_box_ring(box, info.transform)
                if self.opts.rfc7946:
                    ring = to_lonlat(ring, info.crs)
            records.append({"source": src.name, "image_id": image_id,
                            "class_id": int(label), "class_name": self.names[int(label)],
                            "category_id": self.category_ids[int(label)],
                            "crs": ("EPSG:4326" if self.opts.rfc7946 else info.crs)
                            if ring is not None else None,
                            "score": round(float(score), 5),
                            "bbox": [round(float(v), 2) for v in box], "geometry": ring})
        emit(records)
        if vis is not None:
            vis.add_boxes(dets)
        return len(records)


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


def run_detect(model: QueryDet, cfg: Config, inputs: list[str], output: str, fmt: str,
               options: DetectOptions, device: torch.device,
               progress_factory: Callable[[str, int], Any] | None = None,
               lock: OutputLock | None = None, ray: Any = None,
               weights: str | Path | None = None) -> DetectSummary:
    """Detect on every input into one output; a bad input is reported and skipped.

    With `ray` (`distributed.RaySettings`) and the checkpoint path `weights`, the producer runs
    on Ray actors and this process merges and writes, exactly as without Ray."""
    if output == "-" and options.resume:
        raise QueryDetError("--resume needs an output file, not stdout")
    detector = RasterDetector(model, cfg, options, device)
    journal = None if output == "-" else Journal(output, run_key(inputs, options, cfg, model),
                                                 options.resume, lock)
    run = _Run(detector, cfg, inputs, output, fmt, journal, progress_factory)
    try:
        if ray is not None:
            run.producer = _ray_producer(detector, inputs, journal, ray, weights, device)
        for image_id, path in enumerate(inputs, start=1):
            run.detect_input(image_id, path)
        run.finish()
    except OSError as err:  # no space left, a file-size limit, a vanished disk: one line
        what = err.filename or (journal.dir if journal is not None else output)
        kept = (f"; the journal {journal.dir} is kept: make room and run again with --resume"
                if journal is not None and journal.dir.exists() else "")
        raise QueryDetError(f"cannot write {what}: {err.strerror or err}{kept}",
                            exit_code=1) from None
    except KeyboardInterrupt:
        raise run.interrupted() from None
    finally:
        run.close()
    return run.summary


def _ray_producer(detector: RasterDetector, inputs: list[str], journal: Journal | None,
                  settings: Any, weights: str | Path | None, device: torch.device):
    """The producer on Ray actors (distributed.py), started on every input's unfinished rows."""
    from .distributed import RayProducer

    if weights is None:
        raise QueryDetError("--ray needs the checkpoint file the workers load")
    options = detector.opts
    producer = RayProducer(settings, weights, options, str(device))

    def tile_rows(path: str) -> int | None:
        try:  # only the size is needed: no percentile stretch
            with RasterSource(path, options.bands, stretch_known=True) as src:
                detector.attach(src)
                return max(t.row for t in detector.plan(src.info())) + 1
        except QueryDetError:
            return None

    states = {i: journal.input_state(i) if journal else {} for i in range(1, len(inputs) + 1)}
    producer.start(producer.plan(inputs, states, tile_rows))
    return producer


class _Run:
    """One `run_detect` call: its inputs one after the other, then the output; the state they
    share (summary, journal, the stdout writer, the CRS of the output) in one place."""

    def __init__(self, detector: RasterDetector, cfg: Config, inputs: list[str], output: str,
                 fmt: str, journal: Journal | None,
                 progress_factory: Callable[[str, int], Any] | None) -> None:
        self.detector, self.cfg, self.output, self.fmt = detector, cfg, output, fmt
        self.options = detector.opts
        self.journal = journal
        self.progress_factory = progress_factory
        self.summary = DetectSummary(inputs=len(inputs), failed=[],
                                     precision=detector.precision)
        self.producer = None
        self.crs_seen: str | None = None
        self.current = ""
        self.started = time.perf_counter()
        # stdout is written as detections come; it opens once the first input's CRS is known
        self.stdout = OutputWriter(output, fmt, None, self.options.rfc7946) \
            if output == "-" else None
        self.stdout_open = False

    def open_stdout(self, crs: str | None) -> None:
        if self.stdout is not None and not self.stdout_open:
            self.stdout.crs = "EPSG:4326" if self.options.rfc7946 else crs
            self.stdout.__enter__()
            self.stdout_open = True

    def emit(self, records: list[dict]) -> None:
        if self.journal is not None:
            self.journal.append(records)
        else:
            self.stdout.write(records)

    def check_crs(self, path: str, info) -> None:
        """Refuse what one output cannot hold: map formats of a plain image, two CRSs."""
        fmt = self.fmt
        if fmt in GEO_FORMATS and not info.georeferenced:
            raise QueryDetError(f"{path} is not georeferenced, so it has no map coordinates for "
                                f"{fmt}: use -o with .json (COCO), .csv or .ndjson")
        if fmt in GEO_FORMATS and not self.options.rfc7946:
            self.crs_seen = self.crs_seen or info.crs
            if info.crs != self.crs_seen:
                raise QueryDetError(f"{path} is in {info.crs}, earlier inputs in "
                                    f"{self.crs_seen}; one {fmt} file holds one CRS: use "
                                    "--rfc7946 (EPSG:4326) or separate runs")

    def detect_input(self, image_id: int, path: str) -> None:
        """One input into the journal (or stdout); a bad input is reported and skipped."""
        journal, detector, options = self.journal, self.detector, self.options
        state = journal.input_state(image_id) if journal else {}
        if state.get("complete"):
            self.summary.done += 1
            return
        self.current = path
        detector.rows = (int(state.get("rows_done", 0)), 0)
        try:
            setup = time.perf_counter()
            with RasterSource(path, options.bands) as src:
                detector.attach(src)
                info = src.info()
                self.check_crs(path, info)
                self.open_stdout(info.crs)
                vis = Overview(src) if options.save_vis else None
                done_rows = int(state.get("rows_done", 0))
                remaining = sum(1 for t in detector.plan(info) if t.row >= done_rows)
                bar = self.progress_factory(Path(path).name, remaining) \
                    if self.progress_factory else None

                def checkpoint(st: dict[str, Any]) -> None:
                    if journal is not None:
                        journal.checkpoint(image_id, st | {"crs": info.crs})

                record_id = options.image_ids[image_id - 1] if options.image_ids else image_id
                detector.profile.add("setup", time.perf_counter() - setup)
                results = None
                if self.producer is not None:
                    results = self.producer.results_for(
                        image_id, {t.index: t for t in detector.plan(info)})
                n = detector.run(src, record_id, self.emit, checkpoint, state,
                                 progress=(lambda k: bar.update(k)) if bar else None,
                                 vis=vis, results=results)
                if bar:
                    bar.close()
                if journal is not None:
                    journal.checkpoint(image_id, {"complete": True, "crs": info.crs})
                if vis is not None:
                    vis.save(Path(options.save_vis) / f"{Path(path).stem}_detections.png",
                             self.cfg.names())
                self.summary.done += 1
                self.summary.new_detections += n
                self.summary.megapixels += info.source_width * info.source_height / 1e6
        except QueryDetError as err:
            self.summary.failed.append((path, str(err)))
            print(f"querydet: error: {err}", file=sys.stderr)
            if self.producer is not None:
                self.producer.skip(image_id)

    def finish(self) -> None:
        """The output from the journal, through a temporary file; the journal then removed."""
        summary, journal = self.summary, self.journal
        summary.seconds = time.perf_counter() - self.started
        summary.detections = summary.new_detections
        if journal is not None:
            journal.close_records()
            summary.resumed_detections = journal.resumed_records
            if summary.done == 0:  # nothing succeeded: an old output stays as it was
                if not self.options.resume:  # a resumed journal keeps its finished rows
                    journal.remove()
                return
            crs = next((s.get("crs") for s in journal.state["inputs"].values() if s.get("crs")),
                       None)
            with self.detector.profile.stage("write"), \
                    OutputWriter(self.output, self.fmt, crs, self.options.rfc7946) as writer:
                writer.write(read_records(journal.records))
            summary.detections = writer.count
            summary.output_written = True
            if not summary.failed:
                journal.remove()
        summary.profile = self.detector.profile.close(time.perf_counter() - self.started)

    def interrupted(self) -> DetectInterrupted:
        """Ctrl-C: where it stopped, and whether the journal is kept for --resume."""
        done, total = self.detector.rows
        current, summary = self.current, self.summary
        where = (f"in {current} after {done}/{total} tile rows" if total else f"in {current}") \
            if current else "before the first input"
        if self.journal is not None:
            return DetectInterrupted(f"interrupted {where} ({summary.done}/{summary.inputs} "
                                     f"inputs complete); the journal {self.journal.dir} is kept",
                                     resumable=True)
        return DetectInterrupted(f"interrupted {where}; stdout output is incomplete",
                                 resumable=False)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        if self.journal is not None:
            self.journal.close()
        if self.stdout is not None:
            self.open_stdout(None)
            self.stdout.__exit__(*sys.exc_info())
