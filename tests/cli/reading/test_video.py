"""Video inputs (video.py): frames chosen by stride, rate and time (variable frame rates timed
by their packets), decoded in order and equal to the frames that were encoded; a file that is
not a playable video, or a choice of no frame, is one line before anything runs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from querydet_cli.core.errors import QueryDetError
from querydet_cli.reading.video import FrameSelection, Video
from querydet_cli.training.flight import write_flight

pytest.importorskip("av")


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flight")
    video = write_flight(folder / "f.mp4", frames=24, size=(320, 256), fps=30,
                         truth=folder / "f.json", png_dir=folder / "png")
    return video, folder / "png"


def test_frames_are_chosen_by_stride_rate_and_time(flight):
    video = Video(flight[0])
    assert (video.width, video.height, len(video.times)) == (320, 256, 24)
    assert video.duration == pytest.approx(0.8, abs=1e-3)
    assert [f.index for f in video.frames(FrameSelection())] == list(range(24))
    assert [f.index for f in video.frames(FrameSelection(stride=5))] == [0, 5, 10, 15, 20]
    chosen = video.frames(FrameSelection(fps=10, start=0.2, end=0.7))
    assert [f.index for f in chosen] == [6, 9, 12, 15, 18]
    assert [f.time_s for f in chosen] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6], abs=1e-5)
    assert str(chosen[0]) == f"{flight[0]}#frame=6"
    with pytest.raises(QueryDetError, match=r"no frame chosen \(the video has 24 frames over "
                                            r"0.80 s; --start 5"):
        video.frames(FrameSelection(start=5))
    with pytest.raises(QueryDetError, match="--frame-stride and --fps both choose frames"):
        video.frames(FrameSelection(stride=2, fps=5))


def test_decoded_frames_are_the_encoded_ones(flight):
    video = Video(flight[0])
    chosen = video.frames(FrameSelection(stride=7))
    wanted = [f.index for f in chosen]
    def png(index):
        return np.asarray(Image.open(flight[1] / f"frame_{index:05d}.png"), float)

    def apart(pixels, index):
        return np.abs(pixels.astype(float) - png(index)).mean()

    for frame in chosen:
        pixels = video.read(frame, wanted)
        assert pixels.shape == (256, 320, 3) and pixels.dtype == np.uint8
        # H.264 at crf 18 smooths the scenes' noise: close to its own frame, not exact, and
        # much closer to it than to the next one (the camera moves 4 px a frame)
        assert apart(pixels, frame.index) < 6
        assert apart(pixels, frame.index) < 0.7 * apart(pixels, min(frame.index + 1, 23) if
                                                        frame.index < 23 else 22)
    # a frame asked for again: decoding starts over, the same pixels come back
    assert apart(video.read(chosen[0], wanted), 0) < 6
    video.close()


def test_a_variable_frame_rate_is_timed_by_its_packets(tmp_path):
    times = [0, 0.03, 0.05, 0.1, 0.2, 0.21, 0.3, 0.5, 0.55, 0.6]
    video = Video(write_flight(tmp_path / "v.mkv", frames=10, size=(160, 128), times=times))
    assert video.times.tolist() == pytest.approx(times, abs=1e-3)
    # one frame at or after each 0.2 s step: 0, 0.2, 0.5 (for 0.4), 0.6
    assert [f.index for f in video.frames(FrameSelection(fps=5))] == [0, 4, 7, 9]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "querydet_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bad_videos_are_one_line_and_leave_nothing(tmp_path, flight):
    data = Path(flight[0]).read_bytes()
    (tmp_path / "text.mp4").write_text("not a video at all\n")
    (tmp_path / "empty.mov").write_bytes(b"")
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "ok.mp4").write_bytes(data)
    cases = [(["text.mp4"], "text.mp4: not a readable video"),
             (["empty.mov"], "empty.mov: file is empty (0 bytes)"),
             (["cut.mp4"], "cut.mp4: "),
             (["ok.mp4", "--start", "30"], "ok.mp4: no frame chosen"),
             (["ok.mp4", "--frame-stride", "2", "--fps", "3"], "--frame-stride and --fps"),
             (["ok.mp4", "--end", "0"], "--end (0.0) must come after --start"),
             (["ok.mp4", "-o", "d.geojson"], "video frames have no map coordinates for geojson"),
             (["ok.mp4", "--save-vis", "."], "--save-vis names the video to render"),
             (["ok.mp4", "ok.mp4", "--save-vis", "v.mp4"], "for one input video"),
             (["ok.mp4", "--save-vis", "v.mp4", "--resume"], "cannot continue an interrupted"),
             (["ok.mp4", "--save-vis", "ok.mp4"], "output ok.mp4 is the input ok.mp4"),
             (["ok.mp4", "--ray", "auto"], "--ray does not go with video inputs"),
             (["ok.png", "--track"], "--track is for video inputs")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        if "-o" not in args:
            args = [*args, "-o", "d.ndjson"]
        proc = _cli("detect", *args, "--quiet", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
