"""`querydet bench-detect`: memory and throughput of `querydet detect`, measured in one run.

Memory: synthetic GeoTIFFs of each size are written block by block, then `querydet detect` runs
on each in a child process whose peak RSS (os.wait4) is reported. Throughput: megapixels per
second of CSQ and of dense inference on the same raster, in this process, one after the other.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import QueryDetError
from ..training.synthetic import write_big_raster

SAHI_SLICE, SAHI_OVERLAP = 1024, 128  # SAHI's slices as its users run them, whatever querydet's


def peak_rss_of(cmd: list[str]) -> tuple[float, float, int]:
    """Run a command; return its peak RSS in MiB, wall seconds and exit code."""
    t0 = time.perf_counter()
    # stderr goes to a file, not a pipe: a pipe nobody reads until the end could fill and block
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            err.seek(0)
            last = (err.read().strip().splitlines() or ["(no message)"])[-1]
            raise QueryDetError(f"detect failed during the benchmark: {last}")
    return usage.ru_maxrss / 1024.0, seconds, code  # ru_maxrss is in KiB on Linux


def run_memory_bench(sizes: list[int], weights: str, workdir: Path, detect_args: list[str]
                     ) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        raster = workdir / f"synthetic_{size}.tif"
        if not raster.is_file():
            print(f"bench-detect: writing {raster} ...", file=sys.stderr, flush=True)
            write_big_raster(raster, size)
        out = workdir / f"detections_{size}.ndjson"
        print(f"bench-detect: detect on {size}x{size} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "querydet_cli", "detect", str(raster), "-o", str(out),
               "--weights", weights, "--quiet", *detect_args]
        rss, seconds, _ = peak_rss_of(cmd)
        with open(out) as fh:
            count = sum(1 for _ in fh)
        rows.append({"size": size, "megapixels": size * size / 1e6, "peak_rss_mib": rss,
                     "seconds": seconds, "detections": count})
    return rows


def run_throughput_bench(raster: str, weights: str, device: str, tile_size: int, overlap: int,
                         batch_size: int, repeats: int = 2,
                         precisions: tuple[str, ...] = ("fp32", "auto")) -> dict[str, Any]:
    """Mpx/s of `detect` (dense and CSQ) per precision on one raster, interleaved, best of
    `repeats` after a warm-up. Rows are `dense`, `csq` for the first precision and
    `dense_<p>`, `csq_<p>` for the others."""
    import torch

    from querydet_models.layers.precision import resolve_precision

    from ..api import DetectRequest, run
    from ..pipeline.options import DetectOptions
    from ..runtimes.loading import load_model

    model, cfg = load_model(weights, device)
    resolved: list[str] = []
    for p in precisions:
        r = resolve_precision(p, torch.device(device))
        if r not in resolved:
            resolved.append(r)
    runs = [(mode if i == 0 else f"{mode}_{p}", mode, p)
            for i, p in enumerate(resolved) for mode in ("dense", "csq")]
    best: dict[str, float] = {}
    found: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats + 1):  # the first round warms up
            for name, mode, precision in runs:
                opts = DetectOptions(tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                                     mode=mode, precision=precision)
                s = run(DetectRequest([raster], str(Path(tmp) / f"{name}{r}.ndjson"),
                                      options=opts, weights=weights, device=device),
                        loaded=(model, cfg))
                found[name] = s.detections
                if r > 0:
                    best[name] = max(best.get(name, 0.0), s.megapixels / s.seconds)
    rows: dict[str, Any] = {name: {"megapixels_per_s": best[name], "detections": found[name],
                                   "precision": precision} for name, _, precision in runs}
    rows["csq_speedup"] = rows["csq"]["megapixels_per_s"] / rows["dense"]["megapixels_per_s"]
    for p in resolved[1:]:
        rows[f"csq_{p}_vs_csq_{resolved[0]}"] = (rows[f"csq_{p}"]["megapixels_per_s"]
                                                 / rows["csq"]["megapixels_per_s"])
    rows["precisions"] = resolved
    return rows


def raster_ap(truth: Path, dets: list[dict[str, Any]], category_ids: list[int]) -> dict[str, float]:
    """AP and AP50 of one raster's detections against its truth file (pycocotools, maxDets 100000
    for these big single images; the figures are read by metrics.coco_ap)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from ..training.metrics import coco_ap as ap_at

    if not dets:
        return {"AP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(truth))
        results = [{"image_id": 1, "category_id": category_ids[d["class_id"]],
                    "bbox": [d["bbox"][0], d["bbox"][1], d["bbox"][2] - d["bbox"][0],
                             d["bbox"][3] - d["bbox"][1]], "score": d["score"]} for d in dets]
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.maxDets = [1, 100, 100000]
        ev.evaluate()
        ev.accumulate()
    return {"AP": ap_at(ev, 100000), "AP50": ap_at(ev, 100000, iou=0.5)}


def duplicate_count(truth: Path, dets: list[dict[str, Any]], category_ids: list[int],
                    windows: list[tuple[int, int, int, int]] | None = None, iou: float = 0.5
                    ) -> dict[str, int]:
    """Detections beyond the first that match one true object (same category, IoU >= `iou`,
    each detection given to the object it overlaps most): what a merge leaves twice.

    With the pipeline's own tile `windows` (x1, y1, x2, y2), also the objects on a seam (cut by
    some window: partly inside it) and their duplicates, the ones a cross-tile merge answers for.
    """
    from ..core.boxes import overlap_matrix

    annotations = json.loads(Path(truth).read_text())["annotations"]
    wins = np.array(windows or [], np.float64).reshape(-1, 4)
    report = {"duplicates": 0, "seam_objects": 0, "seam_duplicates": 0}
    for category in {a["category_id"] for a in annotations}:
        gt = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                        a["bbox"][1] + a["bbox"][3]] for a in annotations
                       if a["category_id"] == category], np.float64).reshape(-1, 4)
        inside = overlap_matrix(gt, wins, np.ones((len(gt), len(wins)), bool))  # IoS
        on_seam = ((inside > 0) & (inside < 1)).any(axis=1)
        report["seam_objects"] += int(on_seam.sum())
        found = np.array([d["bbox"] for d in dets if category_ids[d["class_id"]] == category],
                         np.float64).reshape(-1, 4)
        if not len(gt) or not len(found):
            continue
        overlaps = overlap_matrix(found, gt, np.zeros((len(found), len(gt)), bool))
        matched = overlaps.max(axis=1) >= iou
        extra = np.maximum(np.bincount(overlaps.argmax(axis=1)[matched], minlength=len(gt)) - 1, 0)
        report["duplicates"] += int(extra.sum())
        report["seam_duplicates"] += int(extra[on_seam].sum())
    return report


def run_peer_bench(raster: str, weights: str, device: str, tile_size: int, overlap: int,
                   batch_size: int, rounds: int = 3, truth: Path | None = None,
                   score_threshold: float = 0.3,
                   sahi_plan: tuple[int, int] = (SAHI_SLICE, SAHI_OVERLAP)) -> dict[str, Any]:
    """`detect` (default precision and fp32) against SAHI with the same weights (fp32, dense,
    its greedy IoS merge, by default 1024 px slices with 128 overlap as its users run them), rounds
    interleaved, median wall seconds, reading included."""
    import rasterio
    import torch

    from ..api import DetectRequest, run
    from ..pipeline.options import DetectOptions
    from ..runtimes.loading import load_model
    from .sahi_peer import sahi_detect
    from ..pipeline.tiling import make_tiles

    model, cfg = load_model(weights, device)
    dev = torch.device(device)
    names = cfg.names()
    with rasterio.open(raster) as src:
        width, height = src.width, src.height
    rows: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, precision in (("querydet", None), ("querydet_fp32", "fp32")):
                out = Path(tmp) / f"{name}{r}.ndjson"
                opts = DetectOptions(tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                                     score_threshold=score_threshold, precision=precision)
                t0 = time.perf_counter()
                s = run(DetectRequest([raster], str(out), options=opts, weights=weights,
                                      device=device), loaded=(model, cfg))
                times.setdefault(name, []).append(time.perf_counter() - t0)
                if r == 0:
                    feats = [json.loads(line) for line in open(out)]
                    dets = [{"bbox": f["properties"]["bbox_px"], "score": f["properties"]["score"],
                             "class_id": f["properties"]["class_id"]} for f in feats]
                    rows[name] = {"precision": s.precision, "detections": len(dets),
                                  "profile": s.profile}
                    if truth is not None:
                        rows[name] |= raster_ap(truth, dets, cfg.category_ids())
                        tiles = make_tiles(width, height, tile_size, overlap,
                                           align=model.size_divisibility)
                        rows[name] |= duplicate_count(
                            truth, dets, cfg.category_ids(),
                            [(t.x, t.y, t.x + t.width, t.y + t.height) for t in tiles])
            model.set_precision("fp32")
            t0 = time.perf_counter()
            dets, _ = sahi_detect(raster, model, names, dev, tile_size=sahi_plan[0],
                                  overlap=sahi_plan[1],
                                  confidence=score_threshold, postprocess="GREEDYNMM",
                                  metric="IOS", threshold=0.5)
            times.setdefault("sahi_fp32", []).append(time.perf_counter() - t0)
            if r == 0:
                rows["sahi_fp32"] = {"precision": "fp32", "detections": len(dets)}
                if truth is not None:
                    rows["sahi_fp32"] |= raster_ap(truth, dets, cfg.category_ids())
                    from sahi.slicing import get_slice_bboxes

                    side, over = sahi_plan
                    slices = get_slice_bboxes(height, width, side, side, False, over / side,
                                              over / side)
                    rows["sahi_fp32"] |= duplicate_count(truth, dets, cfg.category_ids(), slices)
    for name, ts in times.items():
        rows[name]["wall_s"] = statistics.median(ts)
        rows[name]["wall_s_all"] = [round(t, 2) for t in ts]
    sahi = rows["sahi_fp32"]["wall_s"]
    return {"raster": raster, "rows": rows,
            "speedup_fp32_vs_sahi": sahi / rows["querydet_fp32"]["wall_s"],
            "speedup_default_vs_sahi": sahi / rows["querydet"]["wall_s"]}


def run_ray_scaling(count: int, size: int, weights: str, workdir: Path, tile_size: int,
                    overlap: int, batch_size: int, workers: tuple[int, ...] = (1, 2),
                    rounds: int = 2) -> dict[str, Any]:
    """`detect --ray` on `count` synthetic rasters with 1 and 2 single-thread actors, rounds
    interleaved, in one local Ray instance: megapixels per second and the ratio."""
    from ..api import DetectRequest, run
    from ..pipeline.options import DetectOptions
    from ..pipeline.ray_producer import RaySettings, import_ray
    from ..runtimes.loading import load_model

    ray = import_ray()
    rasters = []
    for i in range(count):
        path = workdir / f"ray_{size}_{i}.tif"
        if not path.is_file():
            write_big_raster(path, size, seed=i)
        rasters.append(str(path))
    model, cfg = load_model(weights, "cpu")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    rates: dict[int, list[float]] = {w: [] for w in workers}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                for w in workers:
                    opts = DetectOptions(tile_size=tile_size, overlap=overlap,
                                         batch_size=batch_size)
                    t0 = time.perf_counter()
                    s = run(DetectRequest(rasters, str(Path(tmp) / f"w{w}r{r}.ndjson"),
                                          options=opts, weights=weights, device="cpu",
                                          ray=RaySettings(workers=w, threads_per_worker=1)),
                            loaded=(model, cfg))
                    rates[w].append(s.megapixels / (time.perf_counter() - t0))
    finally:
        if started:
            ray.shutdown()
    best = {w: statistics.median(v) for w, v in rates.items()}
    return {"rasters": count, "size": size, "megapixels": count * size * size / 1e6,
            "megapixels_per_s": {str(w): v for w, v in best.items()},
            "all_rounds": {str(w): [round(x, 3) for x in v] for w, v in rates.items()},
            "ratio": best[max(workers)] / best[min(workers)]}


def format_report(report: dict[str, Any]) -> str:
    lines = []
    if "throughput" in report:
        t = report["throughput"]
        lines.append(f"throughput on {report['throughput_raster']}:")
        for name, row in t.items():
            if isinstance(row, dict):
                lines.append(f"  {name:<10} {row['precision']:<5} {row['megapixels_per_s']:.3f} "
                             f"Mpx/s ({row['detections']} detections)")
        lines.append(f"  csq / dense: {t['csq_speedup']:.2f}x")
        for key, value in t.items():
            if key.endswith(f"_vs_csq_{t['precisions'][0]}"):
                lines.append(f"  {key.replace('_vs_', ' / ')}: {value:.2f}x")
    if "ray_scaling" in report:
        r = report["ray_scaling"]
        lines.append(f"detect --ray on {r['rasters']} rasters of {r['size']}^2 "
                     f"({r['megapixels']:.0f} Mpx), single-thread actors, median of rounds:")
        for w, rate in r["megapixels_per_s"].items():
            lines.append(f"  {w} worker(s): {rate:.3f} Mpx/s")
        lines.append(f"  ratio: {r['ratio']:.2f}x")
    if "peer" in report:
        p = report["peer"]
        lines.append(f"querydet vs SAHI (same weights) on {p['raster']}, median of rounds:")
        for name, row in p["rows"].items():
            ap = (f", AP {row['AP']:.3f} AP50 {row['AP50']:.3f}, duplicates {row['duplicates']}"
                  f" ({row['seam_duplicates']} of {row['seam_objects']} objects on seams)"
                  if "AP" in row else "")
            lines.append(f"  {name:<14} {row['precision']:<5} {row['wall_s']:8.2f} s "
                         f"({row['detections']} detections{ap})")
        lines.append(f"  detect fp32 / SAHI fp32: {p['speedup_fp32_vs_sahi']:.2f}x faster")
        lines.append(f"  detect default / SAHI fp32: {p['speedup_default_vs_sahi']:.2f}x faster")
    if "memory" in report:
        lines.append("peak RSS of `querydet detect`:")
        for r in report["memory"]:
            lines.append(f"  {r['size']}x{r['size']} ({r['megapixels']:.0f} Mpx): "
                         f"{r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s, {r['detections']} detections")
        if len(report["memory"]) >= 2:
            lines.append(f"  largest / smallest peak RSS: {report['rss_ratio']:.3f}x")
    return "\n".join(lines)


def run(sizes: list[int], weights: str, workdir: Path, raster: str | None, device: str,
        tile_size: int, overlap: int, batch_size: int,
        precisions: tuple[str, ...] = ("fp32", "auto"), peer: str | None = None,
        truth: Path | None = None, rounds: int = 3, ray_rasters: int = 0,
        ray_size: int = 2048) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    if ray_rasters:
        report["ray_scaling"] = run_ray_scaling(ray_rasters, ray_size, weights, workdir,
                                                tile_size, overlap, batch_size, rounds=rounds)
        return report
    if peer == "sahi" and raster:
        report["peer"] = run_peer_bench(raster, weights, device, tile_size, overlap, batch_size,
                                        rounds=rounds, truth=truth)
        return report
    if raster:
        report["throughput_raster"] = raster
        report["throughput"] = run_throughput_bench(raster, weights, device, tile_size, overlap,
                                                    batch_size, precisions=precisions)
    if sizes:
        args = ["--tile-size", str(tile_size), "--overlap", str(overlap), "--device", device]
        if batch_size is not None:
            args += ["--batch-size", str(batch_size)]
        rows = run_memory_bench(sizes, weights, workdir, args)
        report["memory"] = rows
        rss = [r["peak_rss_mib"] for r in rows]
        report["rss_ratio"] = float(np.max(rss) / np.min(rss))
    return report


__all__ = ["run", "format_report"]
