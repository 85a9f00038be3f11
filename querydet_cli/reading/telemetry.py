"""A drone's telemetry sidecar (DJI-style .SRT subtitles) placing each video frame on the ground.

Each subtitle covers a span of the video and carries the aircraft's `latitude`, `longitude`,
`rel_alt` (metres above the take-off point) and, on gimballed cameras, `gb_yaw` / `gb_pitch`
(degrees). With the camera's horizontal field of view, a frame whose gimbal points straight
down (pitch -90 +- 10 degrees) is placed as a plane over flat ground at `rel_alt` below the
camera, turned by the yaw (clockwise from north): each frame gets an affine georeference in
EPSG:4326, so its detections come out as lon/lat polygons and its ground resolution is known.

Assumed: nadir view, flat ground at the take-off height, no lens distortion. Refused, one line
each: a frame with no telemetry, with no heading, or not looking down.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import QueryDetError

_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")
_FIELDS = {"latitude": r"latitude\s*[:=]\s*(-?[\d.]+)", "longitude": r"longitude\s*[:=]\s*(-?[\d.]+)",
           "rel_alt": r"rel_alt\s*[:=]\s*(-?[\d.]+)", "yaw": r"gb_yaw\s*[:=]\s*(-?[\d.]+)",
           "pitch": r"gb_pitch\s*[:=]\s*(-?[\d.]+)"}
NADIR_TOLERANCE = 10.0  # degrees from straight down that still count as nadir


@dataclass(frozen=True)
class Fix:
    """Where the camera was over one span of the video."""

    start: float  # seconds
    end: float
    latitude: float
    longitude: float
    rel_alt: float  # metres above the ground (the take-off point)
    yaw: float | None  # degrees clockwise from north of the image's up
    pitch: float | None  # degrees; -90 looks straight down


def read_srt(path: str | Path) -> list[Fix]:
    """The fixes of a DJI-style SRT file, in time order; a file without any is one line."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise QueryDetError(f"--telemetry {path}: cannot read it ({err.strerror})") from None
    fixes = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        span = _TIME.search(block)
        if span is None:
            continue
        g = [int(v) for v in span.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 10 ** len(span.group(4))
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 10 ** len(span.group(8))
        found = {k: re.search(p, block) for k, p in _FIELDS.items()}
        if not (found["latitude"] and found["longitude"] and found["rel_alt"]):
            continue
        value = {k: float(m[1]) if m else None for k, m in found.items()}
        fixes.append(Fix(start, end, value["latitude"], value["longitude"], value["rel_alt"],
                         value["yaw"], value["pitch"]))
    if not fixes:
        raise QueryDetError(f"--telemetry {path}: no latitude, longitude and rel_alt found "
                            "(a DJI-style .SRT sidecar was expected)")
    return sorted(fixes, key=lambda f: f.start)


def fix_at(fixes: list[Fix], time_s: float) -> Fix | None:
    """The fix whose span holds `time_s` (the last one before it, at a span's end)."""
    best = None
    for f in fixes:
        if f.start <= time_s + 1e-6:
            best = f
        else:
            break
    return best if best is not None and time_s < best.end + 1e-6 else None


def metres_per_degree(latitude: float) -> tuple[float, float]:
    """Metres per degree of latitude and of longitude at `latitude` (WGS84, series to 1 cm)."""
    phi = math.radians(latitude)
    return (111132.92 - 559.82 * math.cos(2 * phi) + 1.175 * math.cos(4 * phi),
            111412.84 * math.cos(phi) - 93.5 * math.cos(3 * phi))


def frame_transform(fix: Fix, width: int, height: int, hfov: float, where: str
                    ) -> tuple[float, float, float, float, float, float]:
    """The affine (a, b, c, d, e, f) from a frame's pixels to lon/lat (EPSG:4326): lon = a*col +
    b*row + c, lat = d*col + e*row + f; one line when the frame cannot be placed."""
    if fix.yaw is None:
        raise QueryDetError(f"{where}: the telemetry has no heading (gb_yaw): the frame cannot "
                            "be placed on the ground")
    if fix.pitch is not None and abs(fix.pitch + 90) > NADIR_TOLERANCE:
        raise QueryDetError(f"{where}: the camera looks {fix.pitch:g} degrees, not straight down "
                            "(-90): an oblique frame cannot be placed on flat ground")
    if not fix.rel_alt > 0:
        raise QueryDetError(f"{where}: rel_alt {fix.rel_alt:g} m: the camera is not above the "
                            "ground it would be placed on")
    metres = 2 * fix.rel_alt * math.tan(math.radians(hfov) / 2) / width  # per pixel
    per_lat, per_lon = metres_per_degree(fix.latitude)
    psi = math.radians(fix.yaw)
    # a pixel right of the centre moves east by cos(yaw), north by -sin(yaw); one down moves
    # east by -sin(yaw) and north by -cos(yaw) (image up is the heading)
    a, b = metres * math.cos(psi) / per_lon, -metres * math.sin(psi) / per_lon
    d, e = -metres * math.sin(psi) / per_lat, -metres * math.cos(psi) / per_lat
    c = fix.longitude - a * width / 2 - b * height / 2
    f = fix.latitude - d * width / 2 - e * height / 2
    return a, b, c, d, e, f
