"""Video inputs (MP4, MOV, MKV): frames chosen by stride, rate and time, decoded in order.

A video is probed once without decoding (its packets' timestamps give every frame's time, so
variable-frame-rate files are timed as they play); the chosen frames become inputs of the
run like images, each a `Frame`. Frames are decoded by one thread per video, ahead of the
model by at most `AHEAD` frames: memory does not grow with the video's length. PyAV (FFmpeg in
its wheels) reads them: `pip install 'querydet[video]'`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import QueryDetError

AHEAD = 4  # decoded frames waiting for the model, at most


def import_av():
    try:
        import av
    except ImportError:
        raise QueryDetError("video inputs need PyAV: pip install 'querydet[video]'") from None
    return av


@dataclass(frozen=True)
class FrameSelection:
    """Which frames of a video to detect on: every `stride`-th, or `fps` frames a second, between
    `start` and `end` seconds (end None: to the end)."""

    stride: int = 1
    fps: float | None = None
    start: float = 0.0
    end: float | None = None

    def check(self) -> None:
        if self.stride < 1:
            raise QueryDetError(f"--frame-stride: {self.stride} is not a whole number >= 1")
        if self.stride > 1 and self.fps is not None:
            raise QueryDetError("--frame-stride and --fps both choose frames: give one")
        if self.fps is not None and not (self.fps > 0 and np.isfinite(self.fps)):
            raise QueryDetError(f"--fps: {self.fps} is not a positive number")
        if not (self.start >= 0 and np.isfinite(self.start)):
            raise QueryDetError(f"--start: {self.start} is not a time in seconds from 0")
        if self.end is not None and not (self.end > self.start and np.isfinite(self.end)):
            raise QueryDetError(f"--end ({self.end}) must come after --start ({self.start})")


@dataclass(frozen=True, eq=False)
class Frame:
    """One chosen frame: its video, its number in the video (from 0), its time in seconds, and
    where telemetry placed it: the affine from its pixels to lon/lat (telemetry.py), or None."""

    video: "Video"
    index: int
    time_s: float
    transform: tuple[float, ...] | None = None

    def __str__(self) -> str:
        return f"{self.video.path}#frame={self.index}"


def place_frames(items: list, telemetry: str, hfov: float | None) -> list:
    """Each video frame among `items` with its place on the ground from a telemetry sidecar
    (`telemetry`: a .SRT file, or "auto" for each video's own NAME.SRT); one line for a frame
    that cannot be placed."""
    from dataclasses import replace

    from .telemetry import fix_at, frame_transform, read_srt

    if hfov is None:
        raise QueryDetError("--telemetry needs --hfov: the camera's horizontal field of view "
                            "in degrees")
    videos = list(dict.fromkeys(i.video.path for i in items if isinstance(i, Frame)))
    if telemetry != "auto" and len(videos) > 1:
        raise QueryDetError("--telemetry FILE belongs to one video: give one, or --telemetry "
                            "auto for each video's own NAME.SRT")
    fixes = {}
    for path in videos:
        sidecar = telemetry if telemetry != "auto" else next(
            (str(p) for p in (Path(path).with_suffix(".SRT"), Path(path).with_suffix(".srt"))
             if p.is_file()), None)
        if sidecar is None:
            raise QueryDetError(f"--telemetry auto: {path} has no {Path(path).stem}.SRT beside it")
        fixes[path] = read_srt(sidecar)
    out = []
    for item in items:
        if isinstance(item, Frame):
            fix = fix_at(fixes[item.video.path], item.time_s)
            where = f"{item.video.path} frame {item.index} ({item.time_s:g} s)"
            if fix is None:
                raise QueryDetError(f"{where}: the telemetry has no fix at that time")
            item = replace(item, transform=frame_transform(fix, item.video.width,
                                                           item.video.height, hfov, where))
        out.append(item)
    return out


class Video:
    """A video file, probed: size, frame times; its chosen frames decoded in order on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.times, self.start_pts, (self.width, self.height) = _probe(self.path)
        self._decoder: _Decoder | None = None
        self.last_pixels: np.ndarray | None = None  # the frame read last (for drawing on)

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last one (at the mean frame rate)."""
        if len(self.times) < 2:
            return float(self.times[0]) if len(self.times) else 0.0
        step = (self.times[-1] - self.times[0]) / (len(self.times) - 1)
        return float(self.times[-1] + step)

    def frames(self, selection: FrameSelection) -> list[Frame]:
        """The chosen frames, in order; none chosen is one line."""
        selection.check()
        times = self.times
        chosen = [i for i in range(len(times)) if times[i] >= selection.start - 1e-6
                  and (selection.end is None or times[i] < selection.end)]
        if selection.fps is not None:  # the first frame at or after each step of 1 / fps
            picked, due = [], None
            for i in chosen:
                if due is None or times[i] >= due - 1e-6:
                    picked.append(i)
                    due = (times[i] if due is None else due) + 1.0 / selection.fps
                    while due <= times[i] + 1e-6:
                        due += 1.0 / selection.fps
            chosen = picked
        else:
            chosen = chosen[::selection.stride]
        if not chosen:
            raise QueryDetError(f"{self.path}: no frame chosen (the video has {len(times)} "
                                f"frames over {self.duration:.2f} s; --start {selection.start:g}"
                                + (f", --end {selection.end:g}" if selection.end is not None
                                   else "") + ")")
        return [Frame(self, i, round(float(times[i]), 6)) for i in chosen]

    def read(self, frame: Frame, wanted: list[int]) -> np.ndarray:
        """The (H, W, 3) uint8 pixels of `frame`; `wanted`: every frame index the run will ask
        for, in order (frames not asked for are decoded and dropped)."""
        if self._decoder is None or self._decoder.behind(frame.index):
            self.close()
            self._decoder = _Decoder(self.path, set(wanted), self.times, self.start_pts)
        self.last_pixels = self._decoder.get(frame.index)
        return self.last_pixels

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.stop()
            self._decoder = None


def _open(path: str):
    av = import_av()
    p = Path(path)
    if not p.exists():
        raise QueryDetError(f"{path}: file not found")
    if p.is_dir():
        raise QueryDetError(f"{path}: is a directory, not a video")
    if p.stat().st_size == 0:
        raise QueryDetError(f"{path}: file is empty (0 bytes)")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise QueryDetError(f"{path}: not a readable video ({_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise QueryDetError(f"{path}: holds no video stream")
    return container


def _reason(err: Exception) -> str:
    """FFmpeg's own words for a failure ("Invalid data found when processing input"), without
    its error number and file name."""
    text = getattr(err, "strerror", None) or str(err).strip()
    text = text.splitlines()[0] if text else type(err).__name__
    return text[:160]


def _probe(path: str) -> tuple[np.ndarray, int, tuple[int, int]]:
    """One look at a video without decoding it: every frame's time in seconds, sorted, from the
    packets; the timestamp they count from; the frame size."""
    av = import_av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
        base = stream.time_base
        pts = []
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    pts.append(packet.pts)
        except av.FFmpegError as err:
            raise QueryDetError(f"{path}: the video is damaged ({_reason(err)})") from None
        start = stream.start_time if stream.start_time is not None else (min(pts) if pts else 0)
    finally:
        container.close()
    if not pts:
        raise QueryDetError(f"{path}: the video has no frames")
    if not all(size):
        raise QueryDetError(f"{path}: the video's frame size is unknown")
    return np.array(sorted(round(float((p - start) * base), 6) for p in pts)), start, size


class _Decoder:
    """One thread decoding a video in order, handing the wanted frames on through a bounded
    queue (so decoding overlaps the model, and at most AHEAD frames wait)."""

    def __init__(self, path: str, wanted: set[int], times: np.ndarray, start_pts: int) -> None:
        self.path, self.wanted, self.times, self.start_pts = path, wanted, times, start_pts
        self.queue: queue.Queue = queue.Queue(maxsize=AHEAD)
        self.halt = threading.Event()
        self.last = -1  # the last frame handed out
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def behind(self, index: int) -> bool:
        """True when `index` was already passed (a new decoder must start over)."""
        return index <= self.last

    def _run(self) -> None:
        av = import_av()
        index_of = {round(float(t), 6): i for i, t in enumerate(self.times)}
        try:
            container = _open(self.path)
            try:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # FFmpeg's own threads across the cores
                start = self.start_pts
                n = -1
                for frame in container.decode(stream):
                    if self.halt.is_set():
                        return
                    n += 1
                    if frame.pts is not None:
                        t = round(float((frame.pts - start) * stream.time_base), 6)
                        n = index_of.get(t, n)
                    if n in self.wanted:
                        self._put((n, frame.to_ndarray(format="rgb24")))
            finally:
                container.close()
        except (av.FFmpegError, QueryDetError, OSError) as err:
            self._put(QueryDetError(f"{self.path}: decoding failed ({_reason(err)})"))
            return
        self._put(None)

    def _put(self, item) -> None:
        while not self.halt.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, index: int) -> np.ndarray:
        while True:
            item = self.queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                raise QueryDetError(f"{self.path}: frame {index} is missing from the stream "
                                    "(the video is truncated)")
            n, pixels = item
            if n == index:
                self.last = index
                return pixels
            if n > index:
                raise QueryDetError(f"{self.path}: frame {index} could not be decoded")

    def stop(self) -> None:
        self.halt.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.1)
