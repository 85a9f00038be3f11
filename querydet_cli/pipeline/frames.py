"""The frames of videos in a run: each frame's detections held until the frame is done, stamped
with its number and time, followed across frames (`--track`), one progress bar per video in
frames, and the decoders closed at the end. A frame is the unit of a video's journal: it is
written and checkpointed whole, so `--resume` continues at the first unfinished frame."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..outputs.records import Detection
from ..outputs.render import VideoRender
from ..reading.video import Frame
from .tracking import Tracker

TRACK_LOW = 0.1  # with --track, detections down to this score may continue a track


def track_floor(score_threshold: float | None) -> float | None:
    """The score the model keeps when tracking: low enough for ByteTrack's second matching."""
    return TRACK_LOW if score_threshold is None else min(TRACK_LOW, score_threshold)


class FrameRun:
    """What a run over inputs that include video frames keeps between frames."""

    def __init__(self, inputs: list[Any], names: list[str], track: bool, high: float | None,
                 progress_factory: Callable[[str, int], Any] | None,
                 tracker_state: dict[str, Any] | None = None,
                 save_video: str | None = None) -> None:
        frames = [i for i in inputs if isinstance(i, Frame)]
        self.render = VideoRender(save_video, _rate(frames), names) \
            if save_video and frames else None
        self.wanted: dict[str, list[int]] = {}
        for f in frames:
            self.wanted.setdefault(f.video.path, []).append(f.index)
        self.last = {path: idx[-1] for path, idx in self.wanted.items()}
        self.videos = {f.video.path: f.video for f in frames}
        self.names = names
        self.tracker = Tracker(high=0.3 if high is None else high, low=TRACK_LOW) \
            if track else None
        if self.tracker is not None and tracker_state:
            self.tracker.restore(tracker_state)
        self.progress_factory = progress_factory
        self.bars: dict[str, Any] = {}
        self.held: list[Detection] = []

    def collector(self, frame: Frame) -> Callable[[list[Detection]], None]:
        """Where the consumer's final detections of `frame` go: held, with the frame's number
        and time, until the frame is done."""
        def collect(records: list[Detection]) -> None:
            self.held.extend(replace(d, frame_index=frame.index, time_s=frame.time_s)
                             for d in records)
        return collect

    def finish(self, frame: Frame) -> list[Detection]:
        """The frame's records to write: all of them, or with `--track` those of reported
        tracks, each with its track id."""
        held, self.held = self.held, []
        if self.tracker is not None:
            ids = self.tracker.update(np.array([d.bbox for d in held]).reshape(-1, 4),
                                      np.array([d.score for d in held]),
                                      np.array([d.class_id for d in held]))
            held = [replace(d, track_id=int(k)) for d, k in zip(held, ids) if k > 0]
        if self.render is not None:
            self.render.add(frame.video.last_pixels, held)
        self.advance(frame)
        return held

    def advance(self, frame: Frame) -> None:
        """One more frame of its video done (or skipped): the video's bar moves on."""
        path = frame.video.path
        if self.progress_factory is not None:
            if path not in self.bars:
                self.bars[path] = self.progress_factory(
                    f"{Path(path).name} ({frame.video.duration:.1f} s)", len(self.wanted[path]),
                    "frame")
            self.bars[path].update(1)
        if frame.index == self.last[path]:
            self.close_video(path)

    def drop(self) -> None:
        """The frame failed: what it held is not written."""
        self.held = []

    def close_video(self, path: str) -> None:
        bar = self.bars.pop(path, None)
        if bar is not None:
            bar.close()
        self.videos[path].close()

    def commit(self) -> None:
        """The run is complete: the rendered video goes into place."""
        if self.render is not None:
            self.render.close(keep=True)
            self.render = None

    def close(self) -> None:
        for path in list(self.videos):
            self.close_video(path)
        if self.render is not None:  # not committed: an interrupted or failed run
            self.render.close(keep=False)
            self.render = None

    def objects(self) -> dict[str, int] | None:
        """Distinct objects followed, per class name (with --track), else None."""
        if self.tracker is None:
            return None
        return {self.names[k]: n for k, n in sorted(self.tracker.counted.items())}

    def tracker_state(self) -> dict[str, Any] | None:
        return None if self.tracker is None else self.tracker.snapshot()


def _rate(frames: list[Frame]) -> float:
    """Frames a second of the chosen frames (what a rendered video plays at)."""
    if len(frames) < 2 or frames[-1].time_s <= frames[0].time_s:
        return 30.0
    return (len(frames) - 1) / (frames[-1].time_s - frames[0].time_s)
