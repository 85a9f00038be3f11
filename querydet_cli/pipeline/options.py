"""The options of a `detect` run, split by who reads them: the producer's (`ProduceOptions`:
tiles, batches, the model's mode and precision, reading) and the outputs' (`DetectOptions` adds
them: lon/lat, resume, overview pictures, COCO ids), with what is left to the device."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


def default_batch_size(device: torch.device) -> int:
    """Tiles per batch when none is given: 1 on the CPU, where batching costs time (measured:
    a 4096^2 raster in 1024 px tiles, fp32, 2 cores: 20 s at batch 1, 24 s at 2, 26 s at 4),
    4 on CUDA (an H200: 14, 17, 19 and 21 Mpx/s dense fp32 at batch 1, 2, 4 and 8; 8 is left
    to large cards, see the README)."""
    return 4 if device.type == "cuda" else 1


def default_tile_size(device: torch.device) -> int:
    """Tile side when none is given: 2304 on the CPU, 1024 on CUDA.

    On the CPU the heads run near the cores' peak, so only fewer pixels help: the 128 px overlaps
    of 1024 px tiles compute an 8192^2 raster's pixels 1.26 times (81 tiles), 2304 px tiles
    1.10 times (16 tiles of 2144). Measured whole process, busy 8192^2 raster, 2 cores, 2
    rounds: 20.2 s against 22.5 s in bf16, 37.7 against 42.8 s in fp32; AP 0.694 against
    0.695, 0 duplicates either way; peak memory 2.3 against 1.1 GB. CUDA keeps 1024 px tiles in
    batches of 4, the plan measured there (README, GPU section)."""
    return 1024 if device.type == "cuda" else 2304


def reader_count(options: "ProduceOptions", device: torch.device) -> int:
    """Threads decoding windows: as asked, else one on the CPU (its cores compute the model, and
    one reader keeps ahead of it there) and, on CUDA, a quarter of the cores (at least 2, at most
    8): a GPU consumes tiles faster than one thread decodes a compressed GeoTIFF, and GDAL
    decodes without holding Python's lock."""
    import os

    if options.readers is not None:
        return options.readers
    if device.type != "cuda":
        return 1
    return max(2, min(8, (os.cpu_count() or 4) // 4))


def worker_count(options: ProduceOptions, device: torch.device, model: Any) -> int:
    """Tiles computed at once (each worker then gets an equal share of torch's threads).

    On the CPU two tiles are computed at once by default, each on half of torch's threads: the
    heads' 64-channel convolutions and the small levels do not keep two threads busy inside one
    op, two tiles side by side do (measured: busy 1024 px tiles, 2 cores, 1.17x in bf16 and
    1.25x in fp32 over one tile on two threads; bit-identical outputs). One worker with
    `--profile` (stage times that add up to the wall time), for an exported model (its runtime
    has threads of its own) whatever `options.workers` says; by default also on CUDA and where
    torch has one thread."""
    if options.profile or model.own_threads:
        return 1
    if options.workers:
        return options.workers
    return 1 if device.type != "cpu" or torch.get_num_threads() < 2 else 2


@dataclass(frozen=True)
class ProduceOptions:
    """What the producer reads: how tiles are planned, read, batched and computed. None means
    "by device" until `resolved` fills it in."""

    tile_size: int | None = None  # None: by device (`resolved`)
    overlap: int = 128
    batch_size: int | None = None  # None: by device (`resolved`)
    mode: str | None = None
    sigma: float | None = None
    context: str | None = None
    backend: str | None = None
    start_level: int | None = None
    score_threshold: float | None = None
    bands: tuple[int, ...] | None = None
    merge_metric: str = "ios"  # IoS: SAHI's greedy-merge measure, nested duplicates too
    merge_threshold: float = 0.5
    prefetch: int = 2
    precision: str | None = None  # None: the checkpoint's inference.precision (auto)
    profile: bool = False  # synchronise CUDA at stage edges, for exact per-stage times
    # ground resolution: "auto" (the model's GSD), "native" (source pixels) or metres per pixel
    gsd: str | float = "auto"
    input_gsd: float | None = None  # metres per pixel of inputs without a georeference
    tta: bool = False  # each tile seen in its eight dihedral views, the answers voted into one
    # tiles computed at once, each batch on one worker thread (None: by device, see
    # worker_count) and torch threads per worker (None: the cores shared out); neither
    # changes a single output value, so neither is part of a journal's run key
    workers: int | None = None
    threads: int | None = None
    # threads decoding windows, each on its own handle (None: by device, `reader_count`);
    # tiles still arrive in plan order, so it changes no output value either
    readers: int | None = None

    def resolved(self, device: torch.device) -> "ProduceOptions":
        """These options with what was left to the device (tile size, batch size) filled in:
        applied once, where a run is set up (api.run, Detector.detect, run_detect's door)."""
        left = {"tile_size": default_tile_size(device) if self.tile_size is None else None,
                "batch_size": default_batch_size(device) if self.batch_size is None else None}
        left = {k: v for k, v in left.items() if v is not None}
        return replace(self, **left) if left else self

    def check_resolved(self) -> None:
        if self.tile_size is None or self.batch_size is None:
            raise ValueError("options with the tile or batch size left to the device: call "
                             ".resolved(device) first")


@dataclass(frozen=True)
class DetectOptions(ProduceOptions):
    """A run's options: the producer's (`ProduceOptions`) and the outputs'. A journal's key
    holds them all (identity.run_key)."""

    rfc7946: bool = False  # map outputs in EPSG:4326 lon/lat
    track: bool = False  # follow objects across video frames (frames.py, tracking.py)
    resume: bool = False  # continue the journal of an interrupted run
    save_vis: str | None = None  # folder of overview pictures (the producer then makes heatmaps)
    save_video: str | None = None  # a video's frames with their detections drawn (render.py)
    # COCO image id per input (from --coco-gt); None: the input's position, from 1
    image_ids: tuple[int, ...] | None = None

    def producing(self) -> ProduceOptions:
        """The producer's part of these options (tracking keeps doubtful detections too: they
        may continue a track)."""
        from .frames import track_floor

        mine = {f.name: getattr(self, f.name) for f in fields(ProduceOptions)}
        if self.track:
            mine["score_threshold"] = track_floor(self.score_threshold)
        return ProduceOptions(**mine)
