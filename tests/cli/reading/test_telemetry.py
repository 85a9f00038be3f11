"""Telemetry (telemetry.py): a DJI-style SRT places each nadir frame on flat ground, turned by
its heading, so a video's detections come out in lon/lat and objects standing still stay put
while the camera moves; what cannot be placed is one line."""

import json
import math
import subprocess
import sys

import pytest

from querydet_cli.core.errors import QueryDetError
from querydet_cli.reading.telemetry import Fix, fix_at, frame_transform, read_srt
from querydet_cli.training.flight import camera_path, write_flight, write_srt

pytest.importorskip("av")

SIZE, STEP, FPS = (320, 256), (4.0, 1.5), 30


def test_an_srt_reads_into_fixes_and_times(tmp_path):
    corners = camera_path(5, SIZE, STEP)
    fixes = read_srt(write_srt(tmp_path / "f.SRT", corners, SIZE, FPS))
    assert len(fixes) == 5 and fixes[1].start == pytest.approx(1 / 30, abs=1e-3)
    assert (fixes[0].yaw, fixes[0].pitch) == (0.0, -90.0)
    # the height where an 84 degree lens sees 0.3 m a pixel over 320 pixels
    assert fixes[0].rel_alt == pytest.approx(0.3 * 320 / (2 * math.tan(math.radians(42))), abs=1e-3)
    assert fix_at(fixes, 0.05) is fixes[1] and fix_at(fixes, 10) is None
    with pytest.raises(QueryDetError, match="no latitude, longitude and rel_alt"):
        read_srt(tmp_path.joinpath("x.SRT").write_text("1\nnothing here\n") and tmp_path / "x.SRT")


def test_a_frame_is_turned_by_its_heading():
    fix = Fix(0, 1, 29.69, -82.0, 100.0, 90.0, -90.0)  # flying east: image up is east
    a, b, c, d, e, f = frame_transform(fix, 200, 100, 60.0, "f")
    assert (a * 100 + b * 50 + c, d * 100 + e * 50 + f) == pytest.approx((-82.0, 29.69))
    assert abs(a) < 1e-12 and d < 0  # a pixel to the right is south
    assert b < 0 and abs(e) < 1e-12  # a pixel down is west
    metres = 2 * 100 * math.tan(math.radians(30)) / 200
    assert -d * 110852 == pytest.approx(metres, rel=0.01)
    for bad, message in ((Fix(0, 1, 29.69, -82.0, 100.0, None, -90.0), "no heading"),
                         (Fix(0, 1, 29.69, -82.0, 100.0, 0.0, -45.0), "not straight down"),
                         (Fix(0, 1, 29.69, -82.0, 0.0, 0.0, -90.0), "not above the ground")):
        with pytest.raises(QueryDetError, match=message):
            frame_transform(bad, 200, 100, 60.0, "f")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "querydet_cli", "detect", *map(str, args),
                           "--quiet"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_objects_standing_still_stay_put_on_the_map(tmp_path):
    flight = write_flight(tmp_path / "f.mp4", frames=16, size=SIZE, fps=FPS, step=STEP)
    write_srt(tmp_path / "f.SRT", camera_path(16, SIZE, STEP), SIZE, FPS)
    proc = _cli(flight, "-o", "d.geojson", "--telemetry", "auto", "--hfov", "84", "--track",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "d.geojson").read_text())
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::4326"
    tracks = {}
    for feat in doc["features"]:
        ring = feat["geometry"]["coordinates"][0][:4]
        centre = (sum(p[0] for p in ring) / 4 * 96660, sum(p[1] for p in ring) / 4 * 110860)
        tracks.setdefault(feat["properties"]["track_id"], []).append(centre)
    long = [v for v in tracks.values() if len(v) >= 10]
    assert long
    for centres in long:  # the camera moved 18 m east; the objects stayed within 3 m
        spread = max(max(c[k] for c in centres) - min(c[k] for c in centres) for k in (0, 1))
        assert spread < 3.0


def test_what_cannot_be_placed_is_one_line(tmp_path):
    flight = write_flight(tmp_path / "f.mp4", frames=4, size=SIZE, fps=FPS, step=STEP)
    write_srt(tmp_path / "noyaw.SRT", camera_path(4, SIZE, STEP), SIZE, FPS, yaw=None)
    write_srt(tmp_path / "short.SRT", camera_path(2, SIZE, STEP), SIZE, FPS)
    (tmp_path / "empty.SRT").write_text("1\n00:00:00,000 --> 00:00:01,000\nno position\n")
    cases = [(["--telemetry", "short.SRT"], "has no fix at that time"),
             (["--telemetry", "missing.SRT"], "--telemetry missing.SRT: cannot read it"),
             (["--telemetry", "empty.SRT"], "no latitude, longitude and rel_alt found"),
             (["--telemetry", "noyaw.SRT", "--hfov", "84"], "no heading (gb_yaw)"),
             (["--telemetry", "auto", "--hfov", "84"], "has no f.SRT beside it"),
             (["--telemetry", "noyaw.SRT"], "--telemetry needs --hfov")]
    for args, message in cases:
        if "--hfov" not in args and "needs" not in message:
            args = [*args, "--hfov", "84"]
        proc = _cli(flight, "-o", "d.geojson", *args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "d.geojson").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.SRT", "f.mp4", "noyaw.SRT",
                                                          "short.SRT"]  # nothing made
