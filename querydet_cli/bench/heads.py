"""`querydet bench`: the paper's speed claims, measured side by side in one run.

Same weights, same input, one process: dense-HR (QueryDet with every level dense), CSQ with exact
context (each sparse backend), CSQ with the paper's submanifold context, CQ, CCQ, and the
family's baseline with the same backbone weights: RetinaNet P3-P7 (Table 3), FCOS P3-P7
(Table 8) or Faster R-CNN with the usual one-conv RPN and no query branch (Table 9). Timings are medians over repeats after a
warm-up and are reported as ratios, since these machines are shared and noisy.

Untrained heads fire no queries (the prior bias gives scores of 0.01 < sigma), so without a
checkpoint the bench simulates a trained query head: small objects are dropped at random centres
until the requested fraction of start-level positions is positive under Eq. 3, and every query
level then fires exactly on its Eq. 3 discs (what a perfect query head would output).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from querydet_models.config import InferenceConfig, ModelConfig
from querydet_models import FPNDetector, LevelOutput, query_target_map, spconv_available
from querydet_models.layers.precision import math_of, resolve_precision
from querydet_models.detectors.querydet import build_querydet

from ..core.errors import QueryDetError


@dataclass(frozen=True)
class BenchOptions:
    detector: str = "retinanet"
    backbone: str = "resnet50"
    image_size: int = 1024
    batch: int = 1
    num_classes: int = 10
    query_density: float | None = 0.03
    sigma: float = 0.15
    start_level: int = 4
    paper_context: str = "5x5"
    backends: tuple[str, ...] = ("torch", "spconv", "blocks", "triton")
    repeats: int = 3
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None
    precisions: tuple[str, ...] = ("fp32",)  # auto, fp32, tf32, bf16, fp16; one set of rows each


DETECTORS = ("retinanet", "fcos", "faster_rcnn")


def family_configs(detector: str, backbone: str, num_classes: int, fpn_channels: int
                   ) -> tuple[ModelConfig, ModelConfig, str]:
    """Paper-style QueryDet config of a detector family, its baseline's config and row name."""
    if detector == "retinanet":
        q = ModelConfig(backbone=backbone, num_classes=num_classes, fpn_channels=fpn_channels)
        base = ModelConfig(backbone=backbone, num_classes=num_classes, levels=(3, 4, 5, 6, 7),
                           level_weights=(1.0,) * 5, query_levels=(), fpn_channels=fpn_channels)
        return q, base, "retinanet_p3_p7"
    if detector == "fcos":
        q = ModelConfig(detector="fcos", backbone=backbone, num_classes=num_classes,
                        fpn_channels=fpn_channels, box_loss="giou")
        base = ModelConfig(detector="fcos", backbone=backbone, num_classes=num_classes,
                           levels=(3, 4, 5, 6, 7), level_weights=(1.0,) * 5, query_levels=(),
                           fpn_channels=fpn_channels, box_loss="giou")
        return q, base, "fcos_p3_p7"
    if detector == "faster_rcnn":
        common = dict(detector="faster_rcnn", backbone=backbone, num_classes=num_classes,
                      levels=(2, 3, 4, 5, 6), level_weights=(1.0,) * 5, fpn_channels=fpn_channels,
                      anchor_octave_scales=1, iou_thresholds=(0.3, 0.7))
        q = ModelConfig(**common, head_convs=3, query_levels=(3, 4), query_gamma=1.2)  # paper 4.4
        base = ModelConfig(**common, head_convs=1, query_levels=())  # the usual FPN RPN
        return q, base, "faster_rcnn_rpn1"
    raise QueryDetError(f"unknown detector {detector!r} (allowed: {', '.join(DETECTORS)})")


def simulated_queries(model: FPNDetector, shapes: dict[int, tuple[int, int, int]], density: float,
                      start_level: int, seed: int) -> tuple[dict[int, torch.Tensor], float, int]:
    """Forced query sets {level: positions} from random small objects (see module docstring).

    Returns the sets, the start-level density reached and the number of objects per image.
    """
    gen = torch.Generator().manual_seed(seed)
    N, H, W = shapes[start_level]
    stride = 2 ** start_level
    s_start = model.query_scale(start_level)
    per_image: list[list[list[float]]] = [[] for _ in range(N)]
    target = density * H * W
    for i in range(N):
        covered = torch.zeros(H, W)
        while covered.sum() < target:
            cx = float(torch.rand(1, generator=gen)) * W * stride
            cy = float(torch.rand(1, generator=gen)) * H * stride
            per_image[i].append([cx - 4, cy - 4, cx + 4, cy + 4])  # an 8 px object: small everywhere
            box = torch.tensor([per_image[i][-1]])
            covered = torch.maximum(covered, query_target_map(box, start_level, H, W, s_start))
    forced = {}
    for lvl, (n_img, h, w) in shapes.items():
        if lvl > start_level or lvl == min(shapes):
            continue
        maps = torch.stack([query_target_map(torch.tensor(b).reshape(-1, 4), lvl, h, w,
                                             model.query_scale(lvl)) for b in per_image])
        forced[lvl] = torch.nonzero(maps.reshape(-1)).squeeze(1)
    reached = forced[start_level].numel() / (N * H * W)
    return forced, reached, max(len(b) for b in per_image)


def _median_runs(fn, repeats: int, device: torch.device) -> tuple[float, list[Any]]:
    """Median wall time of `fn` over `repeats` runs after one warm-up, and every run's result."""
    fn()  # warm-up (allocator, thread pools, spconv tables)
    times, results = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        results.append(fn())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), results


def _level_report(runs: list[list[LevelOutput]]) -> dict[str, dict[str, float]]:
    """Per level: median head and FPN times over the runs, MACs and the fraction computed."""
    report = {}
    for i, o in enumerate(runs[0]):
        report[f"P{o.level}"] = {
            "head_time_s": statistics.median(r[i].seconds for r in runs),
            "fpn_time_s": statistics.median(r[i].fpn_seconds for r in runs),
            "gmacs": o.macs / 1e9,
            "gflops": 2 * o.macs / 1e9,
            "dense_gmacs": o.dense_macs / 1e9,
            "fraction_computed": o.macs / o.dense_macs if o.dense_macs else 0.0,
            "keys": int(o.positions.numel()),
        }
    return report


def _max_rel_err(sparse: list[LevelOutput], dense: list[LevelOutput]) -> dict[str, float]:
    """Per level: max |sparse - dense| / max |dense| over the keys, worst of cls, box, query."""
    errs = {}
    for s, d in zip(sparse, dense):
        if s.is_dense or s.positions.numel() == 0:
            continue
        worst = 0.0
        pairs = [(s.cls, d.cls[s.positions]), (s.box, d.box[s.positions])]
        if s.query is not None and d.query is not None:
            pairs.append((s.query, d.query[s.positions]))
        for a, b in pairs:
            scale = float(b.abs().max())
            worst = max(worst, float((a - b).abs().max()) / max(scale, 1e-12))
        errs[f"P{s.level}"] = worst
    return errs


def _load_image(path: Path, size: int) -> torch.Tensor:
    """An RGB image file as (3, H, W) floats in [0, 1], resized so its long side is `size`."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise QueryDetError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            return data.view(im.height, im.width, 3).permute(2, 0, 1).float() / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise QueryDetError(f"cannot read image {path}: {err}") from None


def run_bench(opts: BenchOptions, model: FPNDetector | None = None, image: Path | None = None,
              progress=None, extra_rows=None) -> dict[str, Any]:
    """Measure every mode on one input; returns the report (also what `--json` prints).

    `extra_rows(model, images, opts, forced, device, progress)` adds rows measured on the same
    model and input (`bench --runtimes`: bench_runtime.graph_rows)."""
    _check_options(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    from querydet_models.layers.triton_conv import triton_runs_on

    backends = [b for b in opts.backends if (b != "spconv" or spconv_available())
                and (b != "triton" or triton_runs_on(device))]
    skipped = [b for b in opts.backends if b not in backends]
    torch.manual_seed(opts.seed)
    trained = model is not None
    model, baseline, baseline_name = _bench_models(opts, model, device)
    precisions = []
    for p in opts.precisions:
        resolved = resolve_precision(p, device)
        if resolved not in precisions:
            precisions.append(resolved)
    images = _bench_images(opts, image, device)
    with torch.no_grad():
        batch, sizes = model.preprocess(images)
        feats = model.extract_features(batch)
        shapes = {lvl: feats.shape(lvl) for lvl in feats.levels}
        forced, reached, n_obj = None, None, None
        if opts.query_density is not None and not trained:
            forced, reached, n_obj = simulated_queries(model, shapes, opts.query_density,
                                                       opts.start_level, opts.seed)
    report_modes: dict[str, Any] = {}
    for precision in precisions:
        suffix = "" if len(precisions) == 1 else f"_{precision}"
        runs = _runs(opts, model, baseline, baseline_name, backends)
        for name, entry in _measure(opts, model, baseline, precision, runs, images, sizes,
                                    forced, device, progress, suffix):
            report_modes[name + suffix] = entry
    model.set_precision("fp32")
    _add_ratios(report_modes, precisions, baseline_name, model, opts.start_level)
    if extra_rows is not None:
        first = "" if len(precisions) == 1 else f"_{precisions[0]}"
        dense, base = report_modes["dense_hr" + first], report_modes[baseline_name + first]
        for name, entry in extra_rows(model, images, opts, forced, device, progress).items():
            report_modes[name] = entry | {"speedup_vs_dense": dense["time_s"] / entry["time_s"],
                                          "speedup_vs_baseline": base["time_s"] / entry["time_s"]}
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "detector": opts.detector,
        "baseline": baseline_name,
        "threads": torch.get_num_threads(),
        "backbone": opts.backbone if not trained else "checkpoint",
        "image_size": [int(s) for s in sizes[0]],
        "batch": len(images),
        "start_level": opts.start_level,
        "sigma": opts.sigma,
        "query_density_requested": opts.query_density if forced is not None else None,
        "query_density_start_level": reached,
        "simulated_objects_per_image": n_obj,
        "backends_skipped": skipped,
        "precisions": precisions,
        "folded_batchnorms": model.folded_batchnorms,
        "modes": report_modes,
    }


def _check_options(opts: BenchOptions) -> None:
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise QueryDetError("--device cuda given but no CUDA device is available")
    if opts.query_density is not None and not 0 < opts.query_density <= 1:
        raise QueryDetError(f"--query-density must be in (0, 1], got {opts.query_density}")
    if opts.image_size < 64 or opts.image_size > 8192:
        raise QueryDetError(f"--image-size must be in 64..8192, got {opts.image_size}")


def _bench_models(opts: BenchOptions, model: FPNDetector | None, device: torch.device):
    """The QueryDet model (random heads unless given) and the family's baseline with the same
    backbone weights, both in inference form (frozen BN folded)."""
    trained = model is not None
    if model is None:
        querydet_cfg, _, _ = family_configs(opts.detector, opts.backbone, opts.num_classes, 256)
        model = build_querydet(querydet_cfg,
                               InferenceConfig(sigma=opts.sigma, start_level=opts.start_level))
        model.randomize_heads(opts.seed)
    model = model.to(device).eval()
    if not model.has_query:
        raise QueryDetError("bench needs a QueryDet model (with a query head), not a baseline")
    _, baseline_cfg, baseline_name = family_configs(opts.detector, opts.backbone,
                                                    model.num_classes, model.fpn_channels)
    baseline = build_querydet(baseline_cfg, InferenceConfig(mode="dense")).to(device).eval()
    if not trained:
        baseline.backbone.load_state_dict(model.backbone.state_dict())  # same backbone weights
        baseline.randomize_heads(opts.seed)
    model.prepare_inference("fp32")
    baseline.prepare_inference("fp32")
    return model, baseline, baseline_name


def _bench_images(opts: BenchOptions, image: Path | None, device: torch.device
                  ) -> list[torch.Tensor]:
    if image is not None:
        images = [_load_image(image, opts.image_size)] * opts.batch
    else:
        gen = torch.Generator().manual_seed(opts.seed)
        images = [torch.rand(3, opts.image_size, opts.image_size, generator=gen)
                  for _ in range(opts.batch)]
    return [im.to(device) for im in images]


def _runs(opts: BenchOptions, model, baseline, baseline_name: str, backends: list[str]
          ) -> list[tuple[str, FPNDetector, dict[str, Any]]]:
    """(row name, model, inference options) of every mode measured."""
    runs: list[tuple[str, FPNDetector, dict[str, Any]]] = [("dense_hr", model, {"mode": "dense"})]
    for backend in backends:
        runs.append((f"csq_exact_{backend}", model,
                     {"mode": "csq", "context": "exact", "backend": backend}))
    runs.append((f"csq_{opts.paper_context}_torch", model,
                 {"mode": "csq", "context": opts.paper_context, "backend": "torch"}))
    runs.append(("cq", model, {"mode": "cq"}))
    runs.append(("ccq", model, {"mode": "ccq"}))
    runs.append((baseline_name, baseline, {"mode": "dense"}))
    return runs


def _measure(opts: BenchOptions, model, baseline, precision: str, runs, images, sizes, forced,
             device: torch.device, progress, suffix: str):
    """(row name, entry) of each run in one precision: median time, detections, per-level
    report and, for the query modes, the largest error against dense heads."""
    model.set_precision(precision)
    baseline.set_precision(precision)
    # reference for the accuracy check, in the same precision: dense heads including the
    # query head everywhere
    with model.compute():
        b, _ = model.preprocess(images)
        reference = model.predict_levels(model.extract_features(b), mode="ccq", sigma=0.0,
                                         start_level=opts.start_level)
    for name, m, kw in runs:
        if progress:
            progress(name + suffix)
        if m is model and kw["mode"] != "dense":
            # the sparse path itself is measured: no dense fallback for dense key sets
            kw = dict(kw, sigma=opts.sigma, start_level=opts.start_level,
                      forced_queries=forced, sparse_max_fraction=1.0)
        seconds, results = _median_runs(_end_to_end(m, images, device, **kw), opts.repeats,
                                        device)
        outs, dets, _ = results[-1]
        entry: dict[str, Any] = {
            "precision": precision,
            "math": math_of(precision),
            "time_s": seconds,
            "backbone_time_s": statistics.median(r[2] for r in results),
            "detections": [int(d["boxes"].shape[0]) for d in dets],
            "levels": _level_report([r[0] for r in results]),
        }
        if hasattr(m, "proposals"):  # two-stage: RoIs passed to the second stage
            entry["proposals"] = [int(p.shape[0]) for p in m.proposals(outs, sizes)]
        if kw["mode"] in ("csq", "cq", "ccq"):
            errs = _max_rel_err(outs, reference)
            entry["max_rel_err_per_level"] = errs
            entry["max_rel_err"] = max(errs.values(), default=0.0)
        yield name, entry


def _end_to_end(m: FPNDetector, images, device: torch.device, **kw):
    """One timed call of the whole model: levels, detections and the backbone's seconds."""
    def fn():
        with m.compute():  # inference_mode + autocast to the row's precision
            b, s = m.preprocess(images)
            t0 = time.perf_counter()
            f = m.extract_features(b)  # the backbone; FPN levels are computed on demand
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_backbone = time.perf_counter() - t0
            outs = m.predict_levels(f, **kw)
            dets = m.detections(outs, s, f)
        return outs, dets, t_backbone
    return fn


def _add_ratios(report_modes: dict[str, Any], precisions: list[str], baseline_name: str,
                model, start_level: int) -> None:
    """Speed-ups against dense-HR, the baseline and the first precision; exact CSQ's
    high-resolution heads against the FLOP-proportional ideal."""
    def row(name: str, precision: str) -> dict[str, Any] | None:
        return report_modes.get(name + ("" if len(precisions) == 1 else f"_{precision}"))

    for name, entry in report_modes.items():
        base_name = name if len(precisions) == 1 else name[:-len(entry["precision"]) - 1]
        entry["speedup_vs_dense"] = row("dense_hr", entry["precision"])["time_s"] / entry["time_s"]
        entry["speedup_vs_baseline"] = row(baseline_name, entry["precision"])["time_s"] / entry["time_s"]
        if len(precisions) > 1:  # the same mode in the first precision (fp32 when asked for)
            entry["speedup_vs_" + precisions[0]] = row(base_name, precisions[0])["time_s"] / entry["time_s"]
    # the MACs exact CSQ spent on each queried level at dense-HR's own speed (seconds per MAC of
    # that level's dense heads)
    hr = [f"P{lvl}" for lvl in model.levels if lvl < start_level]
    for name, entry in report_modes.items():
        if not name.startswith("csq_exact"):
            continue
        dense_lv = row("dense_hr", entry["precision"])["levels"]
        actual = sum(entry["levels"][p]["head_time_s"] for p in hr)
        ideal = sum(dense_lv[p]["head_time_s"] / dense_lv[p]["gmacs"] * entry["levels"][p]["gmacs"]
                    for p in hr)
        entry["hr_head_time_s"] = actual
        entry["hr_ideal_time_s"] = ideal
        entry["hr_time_vs_ideal"] = actual / ideal if ideal > 0 else float("inf")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def format_report(report: dict[str, Any]) -> str:
    """Human-readable tables of a bench report."""
    lines = [
        f"device: {report['device']}  threads: {report['threads']}  torch {report['torch']}",
        f"input: batch {report['batch']} x {report['image_size'][0]}x{report['image_size'][1]}, "
        f"backbone {report['backbone']}, CSQ from P{report['start_level']}",
    ]
    if report["query_density_start_level"] is not None:
        lines.append(f"simulated queries: {report['query_density_start_level']:.3%} of start-level "
                     f"positions ({report['simulated_objects_per_image']} small objects per image)")
    lines.append("")
    lines.append(f"detector: {report['detector']}  baseline: {report['baseline']}")
    two_stage = any("proposals" in e for e in report["modes"].values())
    first = report["precisions"][0]
    multi = len(report["precisions"]) > 1
    lines.append(f"{'mode':<26}{'time s':>9}{'vs dense':>10}{'vs base':>10}"
                 + (f"{'vs ' + first:>10}" if multi else "")
                 + f"{'max rel err':>13}{'HR vs ideal':>13}" + (f"{'RoIs':>8}" if two_stage else ""))
    for name, e in report["modes"].items():
        err = f"{e['max_rel_err']:.1e}" if "max_rel_err" in e else "-"
        ideal = f"{e['hr_time_vs_ideal']:.2f}x" if "hr_time_vs_ideal" in e else "-"
        rois = f"{sum(e['proposals']):>8}" if "proposals" in e else ""
        vs_first = (f"{e['speedup_vs_' + first]:>9.2f}x" if "speedup_vs_" + first in e
                    else f"{'-':>10}") if multi else ""
        lines.append(f"{name:<26}{e['time_s']:>9.3f}{e['speedup_vs_dense']:>9.2f}x"
                     f"{e['speedup_vs_baseline']:>9.2f}x{vs_first}{err:>13}{ideal:>13}{rois}")
    lines.append("")
    lines.append("per level: head time s / fraction of dense MACs computed")
    all_levels = sorted({p for e in report["modes"].values() for p in e["levels"]},
                        key=lambda p: int(p[1:]))
    lines.append(f"{'mode':<26}" + "".join(f"{p:>16}" for p in all_levels))
    for name, e in report["modes"].items():
        cells = []
        for p in all_levels:
            lv = e["levels"].get(p)
            cells.append(f"{lv['head_time_s']:.3f}/{lv['fraction_computed']:.3f}".rjust(16)
                         if lv else "-".rjust(16))
        lines.append(f"{name:<26}" + "".join(cells))
    if report["backends_skipped"]:
        lines.append(f"\nskipped backends (not installed): {', '.join(report['backends_skipped'])}")
    return "\n".join(lines)


__all__ = ["BenchOptions", "run_bench", "format_report"]
