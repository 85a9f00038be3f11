"""`detect flight.mp4 --save-vis out.mp4`: the video again, with every detection drawn (its
class, its track id with `--track`), encoded as H.264 by PyAV.

The file is written beside the target under a temporary name and renamed into place when the
run is complete, so an interrupted run leaves no half video that looks finished.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .drawing import PALETTE
from .records import Detection


class VideoRender:
    """Frames with their detections drawn, into one H.264 video at `fps` frames a second."""

    def __init__(self, target: str | Path, fps: float, names: list[str]) -> None:
        self.target = Path(target)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.names = names
        self.frames = 0
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".partial"
                                        + self.target.suffix, dir=self.target.parent)
        os.close(fd)
        self.container = None
        self.stream = None

    def add(self, pixels: np.ndarray, records: list[Detection]) -> None:
        """One frame (H, W, 3) uint8 and its final detections."""
        import av

        height, width = pixels.shape[:2]
        if self.container is None:
            self.container = av.open(self.tmp, "w", format=_muxer(self.target))
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            # H.264 in 4:2:0 wants even sides: an odd last row or column is dropped
            self.stream.width, self.stream.height = width - width % 2, height - height % 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "20", "preset": "veryfast"}
        image = Image.fromarray(pixels[:self.stream.height, :self.stream.width])
        draw = ImageDraw.Draw(image)
        for d in records:
            colour = PALETTE[(d.class_id or 0) % len(PALETTE)]
            x1, y1, x2, y2 = d.bbox
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
            label = d.class_name if d.track_id is None else f"{d.class_name} {d.track_id}"
            draw.text((x1, max(0, y1 - 11)), label, fill=colour)
        frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self, keep: bool) -> None:
        """Finish the file and rename it into place (`keep`), or remove it."""
        if self.container is not None:
            try:
                if keep:
                    for packet in self.stream.encode():
                        self.container.mux(packet)
            finally:
                self.container.close()
                self.container = None
        if keep and self.frames:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # as any file the user writes, not mkstemp's 600
            os.replace(self.tmp, self.target)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _muxer(target: Path) -> str:
    return {".mov": "mov", ".mkv": "matroska"}.get(target.suffix.lower(), "mp4")
