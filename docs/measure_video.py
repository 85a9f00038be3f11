"""Drone video in, tracks out: what `querydet detect FLIGHT.mp4` costs and finds, measured.

    python docs/measure_video.py [WORKDIR]      # about 15 minutes on 2 CPU cores

A synthetic 1280x720 H.264 flight of 150 frames over scenes of generator seed 7919 (the sample
model trained on seed 0's), its truth per frame with object identities, and the same frames as
lossless PNGs. Whole process, as `time` shows it, interleaved over two rounds:

- `querydet detect flight.mp4` against `querydet detect` on the PNG frames: AP50 over all
  frames (pycocotools) and frames per second;
- `querydet detect flight.mp4 --track -o tracks.txt`: MOTA and IDF1 (motmetrics) of the tracks;
- SAHI's own video prediction (`sahi.predict.predict(source=flight.mp4)`) with the same weights
  at the same precision (bf16), slices of 1024 px;
- peak memory (`/usr/bin/time`'s maximum resident set) of `detect --track --fps 1` over a
  30-second and a 5-minute flight.

Writes docs/results/video-flight.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
Q = [sys.executable, "-m", "querydet_cli", "detect"]
GSD = ["--input-gsd", "0.3"]


def timed(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak resident memory (KiB) of one command, as /usr/bin/time sees it."""
    t0 = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "%M", *map(str, cmd)], cwd=cwd,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{run.stderr[-2000:]}")
    return seconds, int(run.stderr.strip().splitlines()[-1])


def ap50(truth: Path, results: Path) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(truth))
    dets = json.loads(results.read_text())
    if not dets:
        return 0.0
    ev = COCOeval(gt, gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox",
                                                     "score")} for d in dets]), "bbox")
    ev.params.maxDets = [1, 10, 1000]
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, all areas, 1000 detections
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def mot_scores(truth: Path, tracks: Path) -> dict[str, float]:
    """MOTA and IDF1 of MOT lines against the truth's track ids (IoU 0.5)."""
    np.asfarray = lambda a, dtype=float: np.asarray(a, dtype=dtype)  # motmetrics on NumPy 2
    import motmetrics as mm

    gt = json.loads(truth.read_text())
    frames: dict[int, list] = {}
    for a in gt["annotations"]:
        frames.setdefault(a["image_id"], []).append((a["track_id"], a["bbox"]))
    found: dict[int, list] = {}
    for line in tracks.read_text().splitlines():
        f, k, x, y, w, h = line.split(",")[:6]
        found.setdefault(int(f), []).append((int(k), [float(x), float(y), float(w), float(h)]))
    acc = mm.MOTAccumulator(auto_id=True)
    for image in gt["images"]:
        t = frames.get(image["id"], [])
        d = found.get(image["frame_index"] + 1, [])
        dist = mm.distances.iou_matrix([b for _, b in t], [b for _, b in d], max_iou=0.5)
        acc.update([k for k, _ in t], [k for k, _ in d], dist)
    summary = mm.metrics.create().compute(acc, metrics=["mota", "idf1", "num_switches",
                                                         "num_unique_objects"], name="flight")
    return {k: float(summary[k].iloc[0]) for k in summary.columns}


def main() -> None:
    from querydet_cli.core.resources import sample_model
    from querydet_cli.training.flight import write_flight

    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    flight, truth, pngs = work / "flight.mp4", work / "flight.json", work / "png"
    if not flight.is_file():
        write_flight(flight, frames=150, size=(1280, 720), seed=7919, truth=truth, png_dir=pngs)
    weights = str(sample_model())
    runs = {
        "video": Q + [flight, "-o", "video.json", "--quiet", *GSD],
        "png": Q + [pngs, "-o", "png.json", "--quiet", "--coco-gt", truth, *GSD],
        "video_track": Q + [flight, "-o", "tracks.txt", "--track", "--quiet", *GSD],
        "sahi_video_bf16": [sys.executable, "-m", "querydet_cli.bench.sahi_peer", flight,
                            weights, "sahi.json", "--precision", "bf16"],
    }
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(2):
        for name, cmd in runs.items():
            seconds[name].append(timed(cmd, work)[0])
            print(name, round(seconds[name][-1], 2), "s", file=sys.stderr)
    frames = 150
    rows = {name: {"wall_s": round(statistics.median(s), 2), "wall_s_all": [round(x, 2) for x in s],
                   "frames_per_s": round(frames / statistics.median(s), 2)}
            for name, s in seconds.items()}
    rows["video"]["ap50"] = round(ap50(truth, work / "video.json"), 4)
    rows["png"]["ap50"] = round(ap50(truth, work / "png.json"), 4)
    rows["video_track"] |= {k: round(v, 4) for k, v in mot_scores(truth, work / "tracks.txt")
                            .items()}
    memory = {}
    for name, length in (("30s", 30), ("300s", 300)):
        video = work / f"flight_{name}.mp4"
        if not video.is_file():
            write_flight(video, frames=30 * length, size=(1280, 720), seed=7919)
        wall, peak = timed(Q + [video, "-o", f"mem_{name}.txt", "--track", "--fps", "1",
                                "--quiet", *GSD], work)
        memory[name] = {"frames_detected": length, "wall_s": round(wall, 1),
                        "peak_rss_mib": round(peak / 1024, 1)}
        print(name, memory[name], file=sys.stderr)
    import torch

    report = {
        "what": "querydet detect on a synthetic 1280x720 H.264 flight (150 frames, seed 7919) "
                "against the same frames as PNGs and SAHI's video prediction, whole process",
        "command": "python docs/measure_video.py",
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "av": __import__("av").__version__, "sahi": __import__("sahi").__version__},
        "rows": rows,
        "ap50_video_minus_png": round(rows["video"]["ap50"] - rows["png"]["ap50"], 4),
        "speed_vs_sahi_video": round(rows["sahi_video_bf16"]["wall_s"] / rows["video"]["wall_s"],
                                     2),
        "speed_vs_png_frames": round(rows["png"]["wall_s"] / rows["video"]["wall_s"], 2),
        "memory": memory,
        "memory_ratio_300s_vs_30s": round(memory["300s"]["peak_rss_mib"]
                                          / memory["30s"]["peak_rss_mib"], 3),
    }
    out = ROOT / "docs" / "results" / "video-flight.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
