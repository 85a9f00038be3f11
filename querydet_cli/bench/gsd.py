"""`querydet bench-gsd`: one scene at three ground resolutions, read at the model's GSD or not.

A synthetic scene with ground truth (a generator seed the bundled model never saw) is written at
its native 0.3 m, resampled to 0.15 m (bilinear, as a lower flight gives) and to 0.6 m (average,
as a coarser orthophoto gives), the truth scaled with it. Each raster is run through the
pipeline twice, reading at the model's GSD (`--gsd auto`) and at the raster's own pixels
(`--gsd native`), timed in this process one after the other (model loaded once), and scored with
pycocotools. A last check: detections of the native raster and of its 2x-finer copy, matched one
to one, lie at the same places within how many pixels of the coarser grid.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .detect import raster_ap
from ..training.synthetic import write_big_raster
from ..training.synthetic import PIXEL_SIZE


def write_resampled(source: Path, truth: Path, factor: float, out: Path, out_truth: Path) -> Path:
    """`source` at `factor` times its pixel size (0.5: twice the pixels a side), with its truth.

    Shrinking averages, enlarging interpolates bilinearly, as real imagery at another flight
    height or an orthophoto's overview would look."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(source) as src:
        width, height = round(src.width / factor), round(src.height / factor)
        method = Resampling.average if factor > 1 else Resampling.bilinear
        data = src.read(out_shape=(src.count, height, width), resampling=method)
        profile = src.profile | {"width": width, "height": height,
                                 "transform": src.transform @ src.transform.scale(
                                     src.width / width, src.height / height)}
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    coco = json.loads(truth.read_text())
    sx, sy = width / coco["images"][0]["width"], height / coco["images"][0]["height"]
    coco["images"][0] |= {"file_name": out.name, "width": width, "height": height}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
        ann["area"] = w * sx * h * sy
    out_truth.write_text(json.dumps(coco))
    return out


def _records(frame) -> list[dict[str, Any]]:
    return [{"class_id": int(r.class_id), "score": float(r.score),
             "bbox": [float(r.x1), float(r.y1), float(r.x2), float(r.y2)]}
            for r in frame.itertuples()]


def placement(coarse: list[dict[str, Any]], fine: list[dict[str, Any]], factor: float
              ) -> dict[str, float]:
    """Distances, in pixels of the coarser grid, between the centres of one object's detections
    on two grids (`fine` boxes divided by `factor`); pairs are mutual best matches, same class,
    IoU >= 0.5."""
    from ..core.boxes import overlap_matrix

    if not coarse or not fine:
        return {"pairs": 0, "median_px": -1.0, "p95_px": -1.0, "max_px": -1.0}
    a = np.array([d["bbox"] for d in coarse])
    b = np.array([d["bbox"] for d in fine]) / factor
    la = np.array([d["class_id"] for d in coarse])
    lb = np.array([d["class_id"] for d in fine])
    iou = overlap_matrix(a, b, np.zeros((len(a), len(b)), bool)) * (la[:, None] == lb[None, :])
    best_b, best_a = iou.argmax(1), iou.argmax(0)
    pairs = [(i, j) for i, j in enumerate(best_b) if best_a[j] == i and iou[i, j] >= 0.5]
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    dist = np.array([np.hypot(*(ca[i] - cb[j])) for i, j in pairs])
    return {"pairs": len(pairs), "of_coarse": len(coarse),
            "median_px": round(float(np.median(dist)), 3) if len(dist) else -1.0,
            "p95_px": round(float(np.percentile(dist, 95)), 3) if len(dist) else -1.0,
            "max_px": round(float(dist.max()), 3) if len(dist) else -1.0}


def run(weights: str | None, workdir: Path, size: int = 2048, seed: int = 11, rounds: int = 1,
        device: str = "cpu") -> dict[str, Any]:
    """The table of the module docstring; `rounds` repeats each timing (median reported)."""
    from ..api import Detector

    workdir.mkdir(parents=True, exist_ok=True)
    native, truth = workdir / "scene_0.3m.tif", workdir / "scene_0.3m.json"
    write_big_raster(native, size, seed=seed, truth=truth)
    rasters = {0.3: (native, truth)}
    for factor in (0.5, 2.0):
        gsd = round(PIXEL_SIZE * factor, 4)
        out, out_truth = workdir / f"scene_{gsd}m.tif", workdir / f"scene_{gsd}m.json"
        rasters[gsd] = (write_resampled(native, truth, factor, out, out_truth), out_truth)
    detector = Detector.load(weights, device=device)
    ids = detector.config.category_ids()
    detector.detect(native)  # warm-up: first-call costs are nobody's
    rows, found = [], {}
    for gsd, (path, gt) in rasters.items():
        for mode in ("auto", "native"):
            if gsd == 0.3 and mode == "native":
                continue  # the same run as auto: no resampling at the model's own GSD
            seconds = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                frame = detector.detect(path, gsd=mode)
                seconds.append(time.perf_counter() - t0)
            dets = _records(frame)
            found[(gsd, mode)] = dets
            rows.append({"gsd_m": gsd, "read_at": "model GSD" if mode == "auto" else "own pixels",
                         "pixels": _side(path), "detections": len(dets),
                         "seconds": round(statistics.median(seconds), 3),
                         **{k: round(v, 4) for k, v in raster_ap(gt, dets, ids).items()}})
    base = next(r for r in rows if r["gsd_m"] == 0.3)
    for r in rows:
        r["AP_of_native"] = round(r["AP"] / base["AP"], 3) if base["AP"] > 0 else None
        r["time_of_native"] = round(r["seconds"] / base["seconds"], 3)
    return {"size": size, "seed": seed, "rounds": rows, "model_gsd": detector.config.data.gsd,
            "placement_0.15m_vs_0.3m": placement(found[(0.3, "auto")], found[(0.15, "auto")], 2.0)}


def _side(path: Path) -> str:
    import rasterio

    with rasterio.open(path) as src:
        return f"{src.width}x{src.height}"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"querydet bench-gsd: a {report['size']}^2 scene (seed {report['seed']}) at three "
             f"GSDs; model trained at {report['model_gsd']} m; in-process seconds, model loaded",
             "| raster | pixels | read at | detections | AP | AP50 | AP of native | seconds | "
             "time of native |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['gsd_m']} m | {r['pixels']} | {r['read_at']} | {r['detections']} | "
                     f"{r['AP']:.3f} | {r['AP50']:.3f} | {r['AP_of_native']} | {r['seconds']:.2f} | "
                     f"{r['time_of_native']:.2f}x |")
    p = report["placement_0.15m_vs_0.3m"]
    lines.append(f"placement, 0.15 m vs 0.3 m detections ({p['pairs']} matched pairs): centres "
                 f"apart by median {p['median_px']} px, 95th percentile {p['p95_px']} px, max "
                 f"{p['max_px']} px of the 0.3 m grid")
    return "\n".join(lines)
