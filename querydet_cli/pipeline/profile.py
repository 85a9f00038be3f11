"""Where the time of `querydet detect` goes: seconds per pipeline stage, on the main thread.

Stages: read (waiting for the reader thread's next window: decode that did not overlap compute),
preprocess, backbone, fpn, coarse heads (the dense levels, query head included), sparse heads
(the queried levels; also the levels a busy tile ran densely), postprocess (decode, NMS), merge
(cross-tile), write (journal, then the output file), setup (opening rasters, planning tiles) and
other (the rest of the main thread: progress bar, bookkeeping). They add up to the wall time
when one worker computes the tiles (`detect --profile` runs one); with several, the compute
stages are the workers' summed seconds.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

STAGES = ("setup", "read", "preprocess", "backbone", "fpn", "coarse_heads", "sparse_heads",
          "postprocess", "merge", "write", "other")


class Profile:
    """Accumulated seconds per stage; `tiles_dense_by_decision` counts CSQ's busy-tile choice."""

    def __init__(self) -> None:
        self.seconds = {s: 0.0 for s in STAGES}
        self.entered = {s: 0 for s in STAGES}  # how often each stage was timed
        self.tiles = 0
        self.tiles_dense_by_decision = 0
        self.pixels = 0  # pixels through the network (tiles cropped to their data)
        self.tile_pixels = 0  # pixels of those tiles
        self.reader_seconds = 0.0  # the reader thread's time in reads (overlaps compute)
        self.scales: list[tuple[float, float]] = []  # source pixels per model pixel, per input
        self.sync = None  # a callable that waits for the device (CUDA), set by the caller
        self._lock = threading.Lock()  # several tile workers add to one profile

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.entered[name] += 1

    def count(self, **counts: int) -> None:
        """Add to the counters (tiles, tile_pixels, pixels, tiles_dense_by_decision)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def move(self, source: str, target: str, seconds: float) -> None:
        """Re-assign time measured inside `source` to `target` (e.g. FPN time inside the heads)."""
        with self._lock:
            seconds = min(seconds, self.seconds[source])
            self.seconds[source] -= seconds
            self.seconds[target] += seconds

    def close(self, wall: float) -> dict[str, object]:
        """The report: seconds and share per stage; `other` is what the stages did not cover."""
        named = sum(v for k, v in self.seconds.items() if k != "other")
        self.seconds["other"] = max(0.0, wall - named)
        return {"wall_s": round(wall, 4),
                "stages": {k: {"s": round(v, 4), "share": round(v / wall, 4) if wall > 0 else 0.0}
                           for k, v in self.seconds.items()},
                "tiles": self.tiles, "tiles_dense_by_decision": self.tiles_dense_by_decision,
                "computed_pixel_share": round(self.pixels / self.tile_pixels, 4)
                if self.tile_pixels else 1.0,
                "reader_s": round(self.reader_seconds, 4),
                "resampling": [[round(sx, 6), round(sy, 6)] for sx, sy in self.scales]}


def format_profile(report: dict[str, object]) -> str:
    lines = [f"querydet: profile ({report['tiles']} tiles, {report['tiles_dense_by_decision']} "
             f"run dense by CSQ's busy-tile decision, "
             f"{report.get('computed_pixel_share', 1.0):.0%} of their pixels computed: the rest "
             f"nodata), wall {report['wall_s']:.2f} s:"]
    for name, entry in report["stages"].items():
        lines.append(f"querydet:   {name:<13} {entry['s']:8.3f} s  {entry['share']:6.1%}")
    scales = report.get("resampling") or []
    if any(s != [1.0, 1.0] for s in scales):
        factors = ", ".join(f"{sx:.3g} x {sy:.3g}" for sx, sy in scales)
        lines.append(f"querydet: read at the model's GSD: {factors} source pixels per model pixel; "
                     f"the reader thread spent {report.get('reader_s', 0.0):.2f} s reading and "
                     "resampling (beside compute; `read` above is the wait for it)")
    return "\n".join(lines)
