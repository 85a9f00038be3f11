"""Videos through the pipeline (frames.py): each frame's records carry its number and time in
every format, COCO has one image per frame, MOT lines follow the tracks, and an interrupted run
continues at the first unfinished frame as one uninterrupted run would."""

import csv
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from querydet_cli.core.resources import sample_model
from querydet_cli.pipeline.detect import DetectInterrupted, DetectOptions, run_detect
from querydet_cli.reading.video import FrameSelection, Video
from querydet_cli.runtimes.loading import load_model
from querydet_cli.training.flight import write_flight

pytest.importorskip("av")


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flight")
    return write_flight(folder / "f.mp4", frames=12, size=(320, 256), fps=30, step=(6.0, 2.0))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "querydet_cli", "detect", *map(str, args),
                           "--input-gsd", "0.3", "--quiet"], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_the_chosen_frames_are_detected(tmp_path, flight):
    proc = _cli(flight, "-o", "d.ndjson", "--frame-stride", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    props = [json.loads(x)["properties"] for x in (tmp_path / "d.ndjson").read_text().split("\n")
             if x]
    assert {p["frame_index"] for p in props} == {0, 3, 6, 9}
    assert {(p["image_id"], p["frame_index"]) for p in props} == {(1, 0), (2, 3), (3, 6), (4, 9)}
    assert all("track_id" not in p for p in props)


def test_every_format_carries_the_frame(tmp_path, flight):
    for out in ("d.ndjson", "d.csv", "d.json", "d.txt"):
        proc = _cli(flight, "-o", out, "--track", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "distinct objects followed:" in proc.stderr
    lines = [json.loads(x) for x in (tmp_path / "d.ndjson").read_text().splitlines()]
    props = [x["properties"] for x in lines]
    assert {p["frame_index"] for p in props} == set(range(12)) and len(props) > 24
    assert all(p["time_s"] == pytest.approx(p["frame_index"] / 30, abs=1e-5) for p in props)
    assert all(p["track_id"] >= 1 for p in props) and all(p["source"].endswith("f.mp4")
                                                         for p in props)
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert list(rows[0])[-3:] == ["frame_index", "time_s", "track_id"]
    assert [(r["frame_index"], r["track_id"]) for r in rows] == \
        [(str(p["frame_index"]), str(p["track_id"])) for p in props]
    coco = json.loads((tmp_path / "d.json").read_text())
    # one image per frame: the chosen frames numbered from 1
    assert {(d["image_id"], d["frame_index"]) for d in coco} == {(i + 1, i) for i in range(12)}
    # the objects stand still on the ground: a track moves with the camera, frame after frame
    tracks = {}
    for p in props:
        tracks.setdefault(p["track_id"], []).append(p["frame_index"])
    assert max(len(v) for v in tracks.values()) >= 8
    mot = [line.split(",") for line in (tmp_path / "d.txt").read_text().splitlines()]
    assert [(int(m[0]), int(m[1])) for m in mot] == \
        [(p["frame_index"] + 1, p["track_id"]) for p in props]
    assert all(m[7:] == ["-1", "-1", "-1"] for m in mot)
    summary = json.loads(_cli(flight, "-o", "e.ndjson", "--track", "--json",
                              cwd=tmp_path).stdout)
    assert summary["inputs"] == 12 and sum(summary["objects"].values()) >= 1


def test_save_vis_renders_the_video_with_its_tracks(tmp_path, flight):
    proc = _cli(flight, "-o", "d.ndjson", "--track", "--frame-stride", "2", "--save-vis", "v.mp4",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rendered = Video(tmp_path / "v.mp4")
    assert (rendered.width, rendered.height, len(rendered.times)) == (320, 256, 6)
    assert rendered.duration == pytest.approx(0.4, abs=0.02)  # 6 frames at 15 a second
    original = Video(flight)
    frame = original.frames(FrameSelection(stride=2))[0]
    before = original.read(frame, [0]).astype(float)
    after = rendered.read(rendered.frames(FrameSelection())[0], [0]).astype(float)
    # the same frame, with each box's outline drawn on it: along the outlines the pixels
    # changed far more than H.264's re-encoding changed the rest
    first = [json.loads(x)["properties"] for x in (tmp_path / "d.ndjson").read_text().split("\n")
             if x and json.loads(x)["properties"]["frame_index"] == 0]
    assert first
    edge = np.zeros(before.shape[:2], bool)
    for p in first:
        x1, y1, x2, y2 = (int(round(v)) for v in p["bbox_px"])
        edge[max(y1, 0):y2 + 1, max(x1, 0)] = True
    change = np.abs(after - before).mean(axis=2)
    assert change[edge].mean() > 3 * change[~edge].mean()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.ndjson", "v.mp4"]


def test_an_interrupted_video_continues_at_its_first_unfinished_frame(tmp_path, flight):
    model, cfg = load_model(sample_model(), "cpu")
    frames = Video(flight).frames(FrameSelection(stride=2))
    opts = DetectOptions(tile_size=256, overlap=32, batch_size=1, input_gsd=0.3, track=True,
                         score_threshold=0.3)
    full = tmp_path / "full.ndjson"
    run_detect(model, cfg, frames, str(full), "ndjson", opts, model.pixel_mean.device)
    real, calls, lock = model.predict_levels, [0], threading.Lock()

    def stopping(*args, **kwargs):
        with lock:
            calls[0] += 1
            if calls[0] == 7:  # inside the third frame (a 320 x 256 frame is 2 tiles)
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed.ndjson"
    model.predict_levels = stopping
    with pytest.raises(DetectInterrupted):
        run_detect(model, cfg, Video(flight).frames(FrameSelection(stride=2)), str(out),
                   "ndjson", opts, model.pixel_mean.device)
    model.predict_levels = real
    summary = run_detect(model, cfg, Video(flight).frames(FrameSelection(stride=2)), str(out),
                         "ndjson", DetectOptions(**{**opts.__dict__, "resume": True}),
                         model.pixel_mean.device)
    assert summary.resumed_detections > 0 and summary.new_detections > 0
    assert out.read_bytes() == full.read_bytes()  # track ids continue across the interrupt


def test_an_interrupted_render_keeps_the_old_video(tmp_path, flight):
    """--save-vis: the rendered video is renamed into place only when the run completes; an
    interrupt leaves the old one as it was and no partial file."""
    model, cfg = load_model(sample_model(), "cpu")
    old = tmp_path / "v.mp4"
    old.write_bytes(b"the old rendering")
    real, calls = model.predict_levels, [0]

    def stopping(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    model.predict_levels = stopping
    opts = DetectOptions(tile_size=256, overlap=32, batch_size=1, input_gsd=0.3,
                         save_video=str(old))
    with pytest.raises(DetectInterrupted):
        run_detect(model, cfg, Video(flight).frames(FrameSelection()), str(tmp_path / "d.csv"),
                   "csv", opts, model.pixel_mean.device)
    model.predict_levels = real
    assert old.read_bytes() == b"the old rendering"
    # the journal is kept for --resume; of the rendering nothing half-made is left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.csv.querydet-partial", "v.mp4"]
