"""`querydet detect --ray`: the producer on Ray actors, the consumer on the driver.

The driver plans work units: a whole raster, or a band of tile rows of a large one. Actors
(`DetectWorker`) each hold the model once and run the local producer (`TileProducer`) on a unit:
pixels in, per-tile detections out. Results come back in plan order, and the driver feeds them to
the same consumer as a single-process run (`TileConsumer`: cross-tile merge, journal, output), so an
object on a band seam is merged exactly as on any tile seam and the output equals the
single-process output. A dead actor is restarted by Ray and its unit retried (`max_restarts`,
`max_task_retries`); a unit that fails on bad input fails that input only.

Ray is optional: `pip install 'querydet[ray]'`.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import QueryDetError
from .profile import Profile

WORKER_NAME = "querydet-worker-{}-{}"  # run id, actor number


@dataclass(frozen=True)
class RaySettings:
    address: str = "auto"  # auto: a running cluster if one is found, else a local instance
    workers: int = 2
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    rows_per_unit: int = 0  # tile rows per work unit; 0: whole rasters unless one is large


def import_ray():
    try:
        import ray
    except ImportError:
        raise QueryDetError("--ray needs Ray: pip install 'querydet[ray]'") from None
    return ray


def connect(settings: RaySettings) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (and must stop it)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = None if settings.address == "auto" else settings.address
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except Exception as err:  # unreachable address, version mismatch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QueryDetError(f"--ray {settings.address}: cannot connect: {first}") from None
    return True


class DetectWorker:
    """One model per actor, loaded on its first unit; `detect` runs the producer on a unit.

    The checkpoint arrives as a task argument (an object-store reference the driver holds), not
    as a constructor argument, so an actor that Ray restarts reloads it from the same object."""

    def __init__(self, options: dict[str, Any], device: str, threads: int,
                 load: Callable[[str, str], tuple[Any, Any]]) -> None:
        import torch

        torch.set_num_threads(threads)
        self.options, self.device, self.load = options, device, load
        self.detector = None

    def _load(self, checkpoint: bytes) -> None:
        import tempfile

        import torch

        from .options import ProduceOptions
        from .producer import TileProducer

        with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
            tmp.write(checkpoint)
            tmp.flush()
            model, cfg = self.load(tmp.name, self.device)
        self.detector = TileProducer(model, cfg, ProduceOptions(**self.options),
                                     torch.device(self.device))

    def detect(self, checkpoint: bytes, path: str, bands, first_row: int, last_row: int
               ) -> list[tuple[int, Any]] | QueryDetError:
        from ..reading.raster import RasterSource

        if self.detector is None:
            self._load(checkpoint)
        try:
            with RasterSource(path, tuple(bands) if bands else None) as src:
                self.detector.planner.attach(src)
                info = src.info()
                tiles = [t for t in self.detector.planner.plan(info)
                         if first_row <= t.row < last_row]
                return [(t.index, found) for t, found, _ in
                        self.detector.produce(src, tiles, info)]
        except QueryDetError as err:  # bad input: reported by the driver for this input only
            return err

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Unit:
    input_index: int  # 1-based, as run_detect numbers inputs
    path: str
    first_row: int
    last_row: int


class RayProducer:
    """A `producer.Producer` on Ray actors: plans units for all inputs, keeps the actors busy,
    hands back results in plan order. `weights`: the checkpoint file the actors load with
    `load(path, device) -> (model, config)` (runtimes.loading.load_model: a module function,
    so Ray sends its name, not its code)."""

    def __init__(self, settings: RaySettings, weights: str | Path | None, options, device: str,
                 load: Callable[[str, str], tuple[Any, Any]]) -> None:
        if weights is None or not Path(weights).is_file():
            raise QueryDetError("--ray needs the checkpoint file the workers load")
        ray = import_ray()
        from ray.util import ActorPool

        self.ray = ray
        self.settings = settings
        self.profile = Profile()  # the driver's stages (merge, write); the actors time none
        self.precision = None  # resolved by each actor's model: the driver's model says it
        self.started = connect(settings)
        self.weights_ref = ray.put(Path(weights).read_bytes())  # held for retries
        opts = asdict(options.producing())
        # an actor computes one tile at a time on its own threads
        opts |= {"workers": 1, "threads": settings.threads_per_worker}
        worker = ray.remote(DetectWorker)
        run_id = uuid.uuid4().hex[:8]
        # a dead actor is restarted and its unit retried (the driver never sees the failure)
        self.actors = [worker.options(
            name=WORKER_NAME.format(run_id, i), num_cpus=settings.threads_per_worker,
            num_gpus=settings.gpus_per_worker, max_restarts=3, max_task_retries=3).remote(
            opts, device if settings.gpus_per_worker > 0 or device == "cpu" else "cpu",
            settings.threads_per_worker, load) for i in range(settings.workers)]
        self.pool = ActorPool(self.actors)
        self.options = options

    def plan(self, inputs: list[str], states: dict[int, dict[str, Any]], rows_of) -> list[Unit]:
        """Units for every unfinished input: whole rasters, or bands of rows of large ones."""
        units = []
        for index, path in enumerate(inputs, start=1):
            state = states.get(index, {})
            if state.get("complete"):
                continue
            rows = rows_of(path)
            if rows is None:  # unreadable: the driver reports it when it gets there
                units.append(Unit(index, path, 0, 0))
                continue
            first = int(state.get("rows_done", 0))
            per = self.settings.rows_per_unit or max(1, -(-(rows - first) // (2 * len(self.actors)))) \
                if rows - first > 2 * len(self.actors) else rows - first
            for start in range(first, rows, max(1, per)):
                units.append(Unit(index, path, start, min(rows, start + per)))
        return units

    def start(self, inputs: list[str], states: dict[int, dict[str, Any]], planner) -> None:
        """Units for every unfinished input (sized by `planner`'s tile rows), sent to the
        actors at once; results are collected in plan order as the consumer asks."""
        self.run_units(self.plan(inputs, states, planner.rows))

    def run_units(self, units: list[Unit]) -> None:
        self.units = units
        bands = self.options.bands
        ref = self.weights_ref
        self._results: Iterator[Any] = self.pool.map(
            lambda actor, u: actor.detect.remote(ref, u.path, bands, u.first_row, u.last_row),
            units)
        self._next = 0

    def results(self, index: int, src, tiles: list[Any]) -> Iterator[tuple[Any, Any, None]]:
        """(tile, detections, None) of input `index`, in tile order, as the consumer wants."""
        tiles_by_index = {t.index: t for t in tiles}
        while self._next < len(self.units) and self.units[self._next].input_index == index:
            result = next(self._results)
            self._next += 1
            if isinstance(result, QueryDetError):
                raise result
            for tile_index, found in result:
                yield tiles_by_index[tile_index], found, None

    def skip(self, index: int) -> None:
        """Drop the remaining results of input `index` (it failed on the driver)."""
        while self._next < len(self.units) and self.units[self._next].input_index == index:
            next(self._results)
            self._next += 1

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()

