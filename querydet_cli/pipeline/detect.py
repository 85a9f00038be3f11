"""`querydet detect`: stream rasters through tiling, batched CSQ inference and cross-tile merging.

The producer (producer.py: pixels in, per-tile detections out) runs here or on Ray actors; this
module is the consumer. The merger releases detections once no later tile can overlap them. Final detections are appended to a journal (NDJSON, flushed per
tile row) next to the output. At the end the journal becomes the requested format in a
temporary file, which is then renamed into place. An interrupted run leaves no output, only the
journal, and `--resume` picks up from the last finished tile row.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from querydet_models import FPNDetector

from ..core.config import Config
from ..core.errors import QueryDetError
from .identity import run_key
from .journal import Journal
from ..core.locking import OutputLock
from .merge import Detections, TileMerger
from .frames import FrameRun
from .overview import Overview
from .options import DetectOptions
from .producer import InputPlanner, Producer, TileDetections, TileProducer
from .profile import Profile
from ..reading.arrays import open_input
from ..reading.raster import RasterSource
from ..reading.video import Frame
from .tiling import Tile, row_starts
from .validity import NO_DATA, TileValidity
from ..outputs.formats import Format, by_name, map_free_choices
from ..outputs.geometry import pixel_box_ring, to_lonlat
from ..outputs.records import Detection
from ..outputs.writers import OutputWriter

log = logging.getLogger("querydet")


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
    runtime: str = "torch"  # what ran the network: torch, onnxruntime or openvino
    objects: dict[str, int] | None = None  # with --track: distinct objects followed, per class
    crs: str | None = None  # the first georeferenced input's CRS (None: none was)


class DetectInterrupted(QueryDetError):
    """Ctrl-C during `detect`: says where it stopped and whether a journal is kept."""

    exit_code = 130

    def __init__(self, message: str, resumable: bool) -> None:
        super().__init__(message)
        self.resumable = resumable


class TileConsumer:
    """The consumer of a run over rasters: merges each tile's detections across tiles, emits
    final ones and checkpoints per finished tile row. Its tiles come from any `Producer`."""

    def __init__(self, cfg: Config, options: DetectOptions, profile: Profile) -> None:
        self.opts = options
        self.profile = profile
        self.names = cfg.names()
        self.category_ids = cfg.category_ids()
        self.rows = (0, 0)  # tile rows done, of all (for an interrupt message)

    def begin(self, rows_done: int) -> None:
        """A new input, `rows_done` of its tile rows finished by an earlier run (--resume): what
        an interrupt before its first tile says."""
        self.rows = (rows_done, 0)

    def run(self, src: RasterSource, image_id: int, emit: Callable[[list[Detection]], None],
            checkpoint: Callable[[dict[str, Any]], None], state: dict[str, Any],
            results: Iterable[tuple[Tile, "TileDetections | None", Any]],
            tiles: list[Tile], progress: Callable[[int], None] | None = None,
            vis: "Overview | None" = None) -> int:
        """Merge each tile's detections across tiles, emit final ones and checkpoint per
        finished tile row; returns the number emitted. `results` (tile, detections, heatmap)
        come from the run's producer; `tiles` is the input's plan (`src` attached)."""
        self.profile.scales.append(src.scale)
        merger = TileMerger(self.opts.merge_metric, self.opts.merge_threshold)
        validity = TileValidity()  # the masks of tiles that pending detections can reach
        if state.get("pending"):
            merger.restore(state["pending"])
        validity.restore(state.get("masks", {}), tiles)
        rows = _RowRelease(tiles, int(state.get("rows_done", 0)))
        self.rows = rows.done
        # src.info() read once: _emit runs for every released tile row
        out = _Outlet(src, src.info(), image_id, emit, checkpoint, vis, validity)
        emitted = 0
        for tile, found, heat in results:
            if progress:
                progress(1)
            validity.add(tile, NO_DATA if found is None else found.valid)
            if found is not None:
                with self.profile.stage("merge"):
                    final = merger.add(tile.index, found.boxes, found.scores, found.labels,
                                       found.cut, found.exclusive)
                with self.profile.stage("write"):
                    emitted += self._emit(final, out)
                if vis is not None:
                    vis.add_heat(tile, heat)
            rows.finished(tile)
            emitted += self._release(rows, merger, out)
        emitted += self._release(rows, merger, out)
        return emitted

    def _release(self, rows: "_RowRelease", merger: TileMerger, out: "_Outlet") -> int:
        """Emit what every finished tile row makes final, and checkpoint after each row."""
        emitted = 0
        for row, below in rows.releasable():
            with self.profile.stage("merge"):
                final = merger.release(below)
                pending = merger.snapshot()
                top = merger.top()  # no tile above this can hold a fused box's centre
                if below is not None:
                    out.validity.forget_above(below if top is None else min(top, below))
            with self.profile.stage("write"):
                emitted += self._emit(final, out)
                out.checkpoint({"rows_done": row + 1, "pending": pending,
                                "masks": out.validity.snapshot()})
            self.rows = rows.done
        return emitted

    def _emit(self, dets: Detections, out: "_Outlet") -> int:
        if dets.fused is not None and dets.fused.any():
            # a box fused from fragments: each fragment's centre was checked in its tile, but the
            # whole object's centre was not; drop it if it is nodata
            keep = np.ones(len(dets), bool)
            for i in np.nonzero(dets.fused)[0]:
                x1, y1, x2, y2 = dets.boxes[i]
                keep[i] = out.validity.valid_at(int((x1 + x2) / 2), int((y1 + y2) / 2))
            dets = Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])
        if not len(dets):
            return 0
        info = out.info
        records = []
        # boxes found on the model's grid, mapped back to the source's pixels and CRS
        for box, score, label in zip(info.to_source(dets.boxes), dets.scores, dets.labels):
            ring = None
            if info.georeferenced:
                ring = pixel_box_ring(box, info.transform)
                if self.opts.rfc7946:
                    ring = to_lonlat(ring, info.crs)
            records.append(Detection(
                out.src.name, out.image_id, int(label), self.names[int(label)],
                self.category_ids[int(label)], round(float(score), 5),
                tuple(round(float(v), 2) for v in box), ring,
                ("EPSG:4326" if self.opts.rfc7946 else info.crs) if ring is not None else None))
        out.emit(records)
        if out.vis is not None:
            out.vis.add_boxes(dets)
        return len(records)


@dataclass
class _Outlet:
    """Where one input's final detections go, and what they are checked against: the source
    (name and grid only: its pixels are the producer's), the emitter, the checkpoint, the
    overview and the tiles' valid masks."""

    src: RasterSource
    info: Any  # src.info()
    image_id: int
    emit: Callable[[list[Detection]], None]
    checkpoint: Callable[[dict[str, Any]], None]
    vis: "Overview | None"
    validity: TileValidity


class _RowRelease:
    """Which tile rows of one input are finished, and which can be released in order: a row
    is released once all its tiles are in and every row above it is released."""

    def __init__(self, tiles: list[Tile], rows_done: int) -> None:
        self.starts = row_starts(tiles)
        self.per_row = {r: sum(1 for t in tiles if t.row == r) for r in self.starts}
        self.count = {r: 0 for r in self.starts}
        self.next_row = rows_done

    @property
    def done(self) -> tuple[int, int]:
        """Tile rows released, of all (for an interrupt message)."""
        return self.next_row, len(self.starts)

    def finished(self, tile: Tile) -> None:
        self.count[tile.row] += 1

    def releasable(self) -> Iterable[tuple[int, int | None]]:
        """(row, the first pixel row of the row below it or None) for each row that can go now,
        in order."""
        last = max(self.starts)
        while self.next_row <= last and self.count[self.next_row] == self.per_row[self.next_row]:
            row = self.next_row
            self.next_row = row + 1
            yield row, (self.starts[row + 1] if row < last else None)


def run_detect(model: FPNDetector, cfg: Config, inputs: list[Any],
               output: str | Callable[[list[Detection]], None], fmt: str | type[Format] | None,
               options: DetectOptions, device: torch.device,
               progress_factory: Callable[[str, int], Any] | None = None,
               lock: OutputLock | None = None, producer: Producer | None = None
               ) -> DetectSummary:
    """Detect on every input into one output; a bad input is reported and skipped.

    `producer`: where the tiles are computed; None runs `model` here (`TileProducer`). A
    `ray_producer.RayProducer` runs it on Ray actors while this process merges and writes,
    exactly as without Ray. `fmt`: a format of outputs/formats.py, or its name.

    `output`: a file, "-" (stdout), or a function that takes each batch of final detections
    (the Python API: no journal, no file; an input's error is raised, not skipped, and inputs
    may be open rasterio datasets)."""
    sink = output if callable(output) else None
    fmt = by_name(fmt) if isinstance(fmt, str) else fmt
    options = options.resolved(device)  # the door of the pipeline: a no-op once resolved
    producer = producer or TileProducer(model, cfg, options.producing(), device,
                                        heatmaps=options.save_vis is not None)
    planner = InputPlanner(cfg.data.gsd, model.size_divisibility, options)
    consumer = TileConsumer(cfg, options, producer.profile)
    try:
        journal = None if sink or output == "-" else \
            Journal(output, run_key(inputs, options, cfg, model), options.resume, lock)
    except BaseException:
        producer.close()  # actors started by the caller are not left running
        raise
    precision = producer.precision or \
        model.resolved_precision(options.precision or cfg.inference.precision)
    run = _Run(consumer, producer, planner, cfg, inputs, output, fmt, journal, progress_factory,
               precision, model.runtime)
    try:
        producer.start(inputs, {i: journal.input_state(i) if journal else {}
                                for i in range(1, len(inputs) + 1)}, planner)
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
        if sink is not None:
            raise
        raise run.interrupted() from None
    finally:
        run.close()
    return run.summary


class _Run:
    """One `run_detect` call: its inputs one after the other, then the output; the state they
    share (summary, journal, the stdout writer, the CRS of the output) in one place."""

    def __init__(self, consumer: TileConsumer, producer: Producer, planner: InputPlanner,
                 cfg: Config, inputs: list[str], output: str, fmt: type[Format],
                 journal: Journal | None,
                 progress_factory: Callable[[str, int], Any] | None, precision: str,
                 runtime: str) -> None:
        self.detector, self.cfg, self.output, self.fmt = consumer, cfg, output, fmt
        self.producer, self.planner = producer, planner
        self.options = consumer.opts
        self.journal = journal
        self.progress_factory = progress_factory
        self.summary = DetectSummary(inputs=len(inputs), failed=[], precision=precision,
                                     runtime=runtime)
        self.crs_seen: str | None = None
        self.current = ""
        self.started = time.perf_counter()
        # the video fields the records carry, as columns of the formats that have columns
        self.fields = (("frame_index", "time_s") + (("track_id",) if self.options.track else ())
                       if any(isinstance(i, Frame) for i in inputs) else ())
        # stdout is written as detections come; it opens once the first input's CRS is known
        self.stdout = OutputWriter(output, fmt, None, self.options.rfc7946, self.fields) \
            if output == "-" else None
        self.stdout_open = False
        self.sink = output if callable(output) else None
        state = journal.state if journal is not None else {}
        self.frames = FrameRun(inputs, cfg.names(), self.options.track,
                               self.options.score_threshold, progress_factory,
                               state.get("tracker"), self.options.save_video)

    def open_stdout(self, crs: str | None) -> None:
        if self.stdout is not None and not self.stdout_open:
            self.stdout.crs = "EPSG:4326" if self.options.rfc7946 else crs
            self.stdout.__enter__()
            self.stdout_open = True

    def emit(self, records: list[Detection]) -> None:
        if self.journal is not None:
            self.journal.append(records)
        elif self.sink is not None:
            self.sink(records)
        else:
            self.stdout.write(records)

    def check_crs(self, path: str, info) -> None:
        """Refuse what one output cannot hold: map formats of a plain image, two CRSs."""
        fmt = self.fmt
        if fmt is None:  # records handed to a function: any raster will do
            return
        if fmt.needs_crs and not info.georeferenced:
            raise QueryDetError(f"{path} is not georeferenced, so it has no map coordinates for "
                                f"{fmt.name}: use {map_free_choices()}")
        if fmt.needs_crs and not self.options.rfc7946:
            self.crs_seen = self.crs_seen or info.crs
            if info.crs != self.crs_seen:
                raise QueryDetError(f"{path} is in {info.crs}, earlier inputs in "
                                    f"{self.crs_seen}; one {fmt.name} file holds one CRS: use "
                                    "--rfc7946 (EPSG:4326) or separate runs")

    def detect_input(self, image_id: int, path: str) -> None:
        """One input into the journal (or stdout); a bad input is reported and skipped."""
        journal, detector, options = self.journal, self.detector, self.options
        state = journal.input_state(image_id) if journal else {}
        frame = path if isinstance(path, Frame) else None
        if state.get("complete"):
            self.summary.done += 1
            if frame is not None:
                self.frames.advance(frame)
            return
        self.current = path
        detector.begin(int(state.get("rows_done", 0)))
        try:
            setup = time.perf_counter()
            wanted = self.frames.wanted.get(frame.video.path) if frame is not None else None
            with open_input(path, options.bands, wanted) as src:
                self.planner.attach(src)
                info = src.info()
                self.check_crs(path, info)
                self.open_stdout(info.crs)
                vis = Overview(src) if options.save_vis else None
                tiles = self.planner.plan(info)  # the one tile plan of this input, handed on
                done_rows = int(state.get("rows_done", 0))
                remaining = sum(1 for t in tiles if t.row >= done_rows)
                bar = self.progress_factory(Path(path).name, remaining) \
                    if self.progress_factory and frame is None else None

                def checkpoint(st: dict[str, Any]) -> None:
                    if journal is not None and frame is None:  # a frame is checkpointed whole
                        journal.checkpoint(image_id, st | {"crs": info.crs})

                record_id = options.image_ids[image_id - 1] if options.image_ids else image_id
                detector.profile.add("setup", time.perf_counter() - setup)
                todo = [t for t in tiles if t.row >= done_rows]
                n = detector.run(src, record_id, self.emit if frame is None else
                                 self.frames.collector(frame), checkpoint, state,
                                 self.producer.results(image_id, src, todo), tiles,
                                 progress=(lambda k: bar.update(k)) if bar else None, vis=vis)
                if bar:
                    bar.close()
                if frame is not None:  # the frame's records, tracked, written whole
                    held = self.frames.finish(frame)
                    self.emit(held)
                    n = len(held)
                if journal is not None:
                    if self.frames.tracker is not None:
                        journal.state["tracker"] = self.frames.tracker_state()
                    journal.checkpoint(image_id, {"complete": True, "crs": info.crs})
                if vis is not None:
                    vis.save(Path(options.save_vis) / f"{Path(path).stem}_detections.png",
                             self.cfg.names())
                self.summary.done += 1
                self.summary.new_detections += n
                self.summary.megapixels += info.source_width * info.source_height / 1e6
                if info.georeferenced and self.summary.crs is None:
                    self.summary.crs = info.crs
        except QueryDetError as err:
            if self.sink is not None:  # the Python API: the caller's one image failed
                raise
            if frame is not None:
                self.frames.drop()
                self.frames.advance(frame)
            self.summary.failed.append((str(path), str(err)))
            print(f"querydet: error: {err}", file=sys.stderr)
            self.producer.skip(image_id)

    def finish(self) -> None:
        """The output from the journal, through a temporary file; the journal then removed."""
        summary, journal = self.summary, self.journal
        summary.seconds = time.perf_counter() - self.started
        summary.detections = summary.new_detections
        summary.objects = self.frames.objects()
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
                    OutputWriter(self.output, self.fmt, crs, self.options.rfc7946,
                                 self.fields) as writer:
                writer.write(journal.read())
            summary.detections = writer.count
            summary.output_written = True
            if not summary.failed:
                journal.remove()
        if summary.done:
            self.frames.commit()  # the rendered video (--save-vis), now complete
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
        self.producer.close()
        self.frames.close()
        if self.journal is not None:
            self.journal.close()
        if self.stdout is not None:
            self.open_stdout(None)
            self.stdout.__exit__(*sys.exc_info())
