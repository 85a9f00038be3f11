"""`querydet eval`: a checkpoint on a validation split, dense and CSQ, over a sweep of sigma."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ..core.progress import progress

from querydet_models import FPNDetector

from ..core.config import Config
from .datasets import DetectionDataset, Sample
from .metrics import ImageDetections, ImageTruth, coco_metrics, visdrone_metrics


def truths_of(samples: list[Sample]) -> list[ImageTruth]:
    return [ImageTruth(s.boxes, s.labels, s.ignore, s.width, s.height) for s in samples]


@torch.no_grad()
def predict(model: FPNDetector, samples: list[Sample], short_side: int, max_size: int,
            device: torch.device, quiet: bool = False, keep_query: bool = False,
            resize: str = "short_side", target_gsd: float | None = None, **mode: Any
            ) -> tuple[list[ImageDetections], float, list[np.ndarray | None]]:
    """Detections per sample in original pixel coordinates, and seconds spent in the model.

    `resize` is the training config's: images resized to `short_side`, or at their own pixel
    scale ("native"; georeferenced images at the model's GSD `target_gsd` when given). With
    `keep_query`, also each image's query heatmap on the start level.
    """
    ds = DetectionDataset(samples, (short_side,), max_size, train=False, resize=resize,
                          target_gsd=target_gsd)
    out, heatmaps = [], []
    seconds = 0.0
    if len(ds):  # one untimed pass, so images/s does not include first-call set-up
        model.forward_inference([ds[0][0].to(device)], **mode)
    bar = progress(len(ds), "eval", unit="image", disable=quiet, leave=False)
    for i in range(len(ds)):
        bar.update(1)
        image, target = ds[i]
        image = image.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with model.compute():  # inference_mode + autocast to model.precision
            batch, sizes = model.preprocess([image])
            features = model.extract_features(batch)
            levels = model.predict_levels(features, **mode)
            dets = model.detections(levels, sizes, features)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        scale = float(target["scale"])
        out.append(ImageDetections((dets["boxes"] / scale).cpu().numpy(),
                                   dets["scores"].cpu().numpy(),
                                   dets["labels"].cpu().numpy()))
        heat = None
        if keep_query:
            heat = query_heatmap(levels)
        heatmaps.append(heat)
    bar.close()
    return out, seconds, heatmaps


def query_heatmap(levels) -> np.ndarray | None:
    """Sigmoid query scores of the first image on the coarsest level that ran the query densely."""
    for lv in sorted(levels, key=lambda o: o.level):
        if lv.query is not None and lv.is_dense:
            _, h, w = lv.shape
            return torch.sigmoid(lv.query[: h * w].float()).view(h, w).cpu().numpy()
    return None


def evaluate(model: FPNDetector, cfg: Config, samples: list[Sample], *, protocol: str,
             sigmas: list[float], device: torch.device, max_dets: int | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Dense and CSQ at each sigma: metrics and images/second per row."""
    t = cfg.train
    names = list(cfg.names())
    truths = truths_of(samples)
    rows = []
    runs: list[tuple[str, dict[str, Any]]] = [("dense", {"mode": "dense"})]
    if model.has_query:
        runs += [(f"csq sigma={s:g}", {"mode": "csq", "sigma": s}) for s in sigmas]
    for name, mode in runs:
        dets, seconds, _ = predict(model, samples, t.test_short_side, t.max_size, device, quiet,
                                   resize=t.resize, target_gsd=cfg.data.gsd, **mode)
        if protocol == "visdrone":
            metrics = visdrone_metrics(truths, dets, len(names))
        else:
            metrics = coco_metrics(truths, dets, names, max_dets or 100)
        rows.append({"run": name, "mode": mode["mode"], "sigma": mode.get("sigma"),
                     "images_per_s": len(samples) / max(seconds, 1e-9), **metrics})
    return {"protocol": protocol, "images": len(samples), "precision": model.precision,
            "rows": rows}


def format_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    keys = [k for k in rows[0] if k not in ("run", "mode", "sigma")]
    lines = [f"{report['protocol']} protocol, {report['images']} images",
             f"{'run':<18}" + "".join(f"{k:>13}" for k in keys)]
    for r in rows:
        lines.append(f"{r['run']:<18}" + "".join(
            f"{r[k]:>13.4f}" if r[k] is not None else f"{'-':>13}" for k in keys))
    return "\n".join(lines)


def plot_tradeoff(report: dict[str, Any], path: Path) -> None:
    """AP against images/second over sigma, like the paper's Figure 4 (dense as a triangle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    metric = "AP"
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    csq = [r for r in rows if r["mode"] == "csq"]
    dense = [r for r in rows if r["mode"] == "dense"]
    csq = [r for r in csq if r[metric] is not None]
    dense = [r for r in dense if r[metric] is not None]
    if csq:
        ax.plot([r["images_per_s"] for r in csq], [r[metric] for r in csq], "o-", label="CSQ")
        for r in csq:
            ax.annotate(f"{r['sigma']:g}", (r["images_per_s"], r[metric]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if dense:
        ax.plot([r["images_per_s"] for r in dense], [r[metric] for r in dense], "^",
                markersize=9, label="no CSQ")
    values = [r[metric] for r in csq + dense]
    if values:  # no offset notation, and a visible range even when CSQ loses nothing
        ax.ticklabel_format(axis="y", useOffset=False)
        lo, hi = min(values), max(values)
        pad = max(0.01, (hi - lo) * 0.2)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("images / second")
    ax.set_ylabel(metric)
    ax.set_title(f"speed / accuracy over sigma ({report['protocol']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def save_visualisations(model: FPNDetector, cfg: Config, samples: list[Sample], out_dir: Path,
                        device: torch.device, sigma: float, count: int = 4) -> list[Path]:
    """A few images with their detections and the query heatmap beside them (Figure 5)."""
    from PIL import Image

    from .datasets import read_image
    from ..outputs.drawing import draw_detections, heatmap_image

    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = samples[:count]
    dets, _, heats = predict(model, chosen, cfg.train.test_short_side, cfg.train.max_size, device,
                             quiet=True, keep_query=True, resize=cfg.train.resize,
                             target_gsd=cfg.data.gsd, mode="csq",
                             sigma=sigma)
    paths = []
    for s, d, heat in zip(chosen, dets, heats):
        pixels = read_image(s.image)
        left = draw_detections(pixels, d, list(cfg.names()))
        right = heatmap_image(heat, pixels.shape[1], pixels.shape[0])
        canvas = Image.new("RGB", (left.width * 2, left.height))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width, 0))
        path = out_dir / f"{s.image.stem}_vis.png"
        canvas.save(path)
        paths.append(path)
    return paths


def save_review(model: FPNDetector, cfg: Config, samples: list[Sample], out_dir: Path,
                device: torch.device, sigma: float, min_score: float = 0.3, count: int = 50
                ) -> Path:
    """`eval --save-vis`: a `querydet view` page of the first `count` images, each detection
    scoring at least `min_score` marked a true or false positive (IoU 0.5 with the ground truth
    of its class) and each unmatched truth box a miss."""
    from ..viewer.page import build_page, raster_view, render, review_boxes, status_groups, write_page

    chosen = samples[:count]
    dets, _, _ = predict(model, chosen, cfg.train.test_short_side, cfg.train.max_size, device,
                         quiet=True, resize=cfg.train.resize, target_gsd=cfg.data.gsd,
                         mode="csq", sigma=sigma)
    names = list(cfg.names())
    boxes = [b for s, d in zip(chosen, dets)
             for b in review_boxes(str(s.image), names, d, s.boxes, s.labels, min_score)]
    views = [raster_view(str(s.image), 1024) for s in chosen]
    counts = {g: sum(b.group == g for b in boxes) for g, _ in status_groups()}
    note = (f"{len(chosen)} of {len(samples)} evaluation images; detections scoring at least "
            f"{min_score} at sigma {sigma}, matched at IoU 0.5: " +
            ", ".join(f"{n} {g}" for g, n in counts.items()))
    page = build_page(boxes, views, "querydet eval: true positives, false positives, misses",
                      0.0, status_groups(), note)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_page(render(page), out_dir / "review.html")
    return out_dir / "review.html"
