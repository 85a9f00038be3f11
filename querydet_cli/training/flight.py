"""A synthetic drone flight: a camera window gliding over a synthetic scene, encoded as an H.264
video with PyAV, with the truth of every frame (boxes, classes and each object's identity).

The scene is a mosaic of `synthetic.make_scene` scenes (their seeds from `seed`), so a seed
nobody trained on gives imagery no model has seen. The objects stand still on the ground and
the camera moves, so in the frames they move: what a tracker must follow. The same frames can
be written as lossless PNGs, to tell what the video's compression costs.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from .synthetic import CLASSES, make_scene

BLOCK = 512  # side of each scene of the mosaic


def flight_scene(width: int, height: int, seed: int) -> tuple[np.ndarray, list[tuple]]:
    """A mosaic covering width x height: (H, W, 3) uint8 and its objects (label, box), each
    object's identity its position in the list."""
    cols, rows = -(-width // BLOCK), -(-height // BLOCK)
    canvas = np.zeros((rows * BLOCK, cols * BLOCK, 3), np.uint8)
    objects = []
    for r in range(rows):
        for c in range(cols):
            pixels, found = make_scene(BLOCK, seed * 100003 + r * cols + c)
            canvas[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = pixels
            for obj in found:
                x1, y1, x2, y2 = obj.box
                objects.append((obj.label, (x1 + c * BLOCK, y1 + r * BLOCK, x2 + c * BLOCK,
                                            y2 + r * BLOCK)))
    return canvas, objects


def camera_path(frames: int, size: tuple[int, int], step: tuple[float, float],
                span: tuple[int, int] = (4096, 2048)) -> list[tuple[int, int]]:
    """The window's top-left corner in each frame: a glide of `step` pixels a frame, turning
    back at the edges of a `span` of ground (so a long flight passes over the same scene)."""
    def bounce(v: float, room: int) -> int:
        if room <= 0:
            return 0
        v = v % (2 * room)
        return int(round(v if v <= room else 2 * room - v))

    return [(bounce(step[0] * i, span[0] - size[0]), bounce(step[1] * i, span[1] - size[1]))
            for i in range(frames)]


def write_flight(path: Path, frames: int = 150, size: tuple[int, int] = (1280, 720),
                 fps: int = 30, seed: int = 7919, step: tuple[float, float] = (4.0, 1.5),
                 truth: Path | None = None, png_dir: Path | None = None, crf: int = 18,
                 times: list[float] | None = None) -> Path:
    """Write the flight as H.264 in `path` (MP4, MOV or MKV by its suffix); with `truth`, a COCO
    JSON with one image per frame (frame_index, time_s) and each annotation's track_id; with
    `png_dir`, the same frames as lossless PNGs. `times`: each frame's time in seconds (a
    variable frame rate), instead of frame / fps."""
    import av
    from PIL import Image

    width, height = size
    corners = camera_path(frames, size, step)
    span_w = width + max(x for x, _ in corners)
    span_h = height + max(y for _, y in corners)
    canvas, objects = flight_scene(span_w, span_h, seed)
    boxes = np.array([b for _, b in objects], float).reshape(-1, 4)
    labels = [label for label, _ in objects]
    images, annotations = [], []
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": str(crf), "preset": "veryfast"}
    if times is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
    for i, (x0, y0) in enumerate(corners):
        pixels = np.ascontiguousarray(canvas[y0:y0 + height, x0:x0 + width])
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        t = times[i] if times is not None else i / fps
        if times is not None:
            frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
        name = f"frame_{i:05d}.png"
        if png_dir is not None:
            Image.fromarray(pixels).save(png_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height,
                       "frame_index": i, "time_s": round(t, 6)})
        annotations += _frame_truth(boxes, labels, x0, y0, width, height, i + 1,
                                    len(annotations))
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    if truth is not None:
        truth.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": k + 1, "name": n}
                                                    for k, n in enumerate(CLASSES)]}))
    return path


def _frame_truth(boxes: np.ndarray, labels: list[int], x0: int, y0: int, width: int,
                 height: int, image_id: int, first_id: int) -> list[dict]:
    """The objects in one frame: boxes clipped to it, kept when at least half is in view."""
    out = []
    if not len(boxes):
        return out
    clipped = np.stack([np.clip(boxes[:, 0] - x0, 0, width), np.clip(boxes[:, 1] - y0, 0, height),
                        np.clip(boxes[:, 2] - x0, 0, width), np.clip(boxes[:, 3] - y0, 0, height)],
                       1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    seen = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    for k in np.flatnonzero((seen >= 0.5 * area) & (clipped[:, 2] - clipped[:, 0] >= 2)
                            & (clipped[:, 3] - clipped[:, 1] >= 2)):
        x1, y1, x2, y2 = (round(float(v), 2) for v in clipped[k])
        out.append({"id": first_id + len(out) + 1, "image_id": image_id,
                    "category_id": labels[k] + 1, "bbox": [x1, y1, round(x2 - x1, 2),
                                                           round(y2 - y1, 2)],
                    "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
                    "track_id": int(k) + 1})
    return out


def write_srt(path: Path, corners: list[tuple[int, int]], size: tuple[int, int], fps: float,
              hfov: float = 84.0, gsd: float = 0.3, origin: tuple[float, float] = (29.69, -82.0),
              yaw: float | None = 0.0, pitch: float | None = -90.0) -> Path:
    """A DJI-style .SRT telemetry sidecar for a flight along `corners` (the camera window's
    top-left corner per frame, pixels of the ground at `gsd` metres, north up): each frame's
    camera position over the window's centre, at the height where a lens of `hfov` degrees sees
    `gsd` metres a pixel. `yaw` or `pitch` None leaves that field out."""
    width, height = size
    from ..reading.telemetry import metres_per_degree

    alt = gsd * width / (2 * math.tan(math.radians(hfov) / 2))
    per_lat, per_lon = metres_per_degree(origin[0])
    blocks = []
    for i, (x0, y0) in enumerate(corners):
        east, north = (x0 + width / 2) * gsd, -(y0 + height / 2) * gsd
        lat, lon = origin[0] + north / per_lat, origin[1] + east / per_lon
        gimbal = "".join(f" {k}: {v:.1f}" for k, v in (("gb_yaw", yaw), ("gb_pitch", pitch))
                         if v is not None)
        blocks.append(f"{i + 1}\n{_stamp(i / fps)} --> {_stamp((i + 1) / fps)}\n"
                      f"<font size=\"28\">FrameCnt: {i + 1}, DiffTime: {1000 / fps:.0f}ms\n"
                      f"[iso: 100] [shutter: 1/1000.0] [fnum: 2.8] [latitude: {lat:.8f}] "
                      f"[longitude: {lon:.8f}] [rel_alt: {alt:.3f} abs_alt: {alt + 30:.3f}]"
                      + (f" [{gimbal.strip()}]" if gimbal else "") + "</font>\n")
    path.write_text("\n".join(blocks))
    return path


def _stamp(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
