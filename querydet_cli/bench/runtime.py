"""`bench-detect --runtimes`: torch, onnxruntime and OpenVINO side by side on one raster.

Rows: torch fp32 and bf16 (the checkpoint), onnxruntime fp32 and int8, OpenVINO fp32, bf16 and
int8 (the export), each only where its runtime is installed. Each row is timed twice per round,
rounds interleaved: in-process (the model already loaded, `run_detect` alone) and whole-process
(`querydet detect` in a fresh process, as `time` shows it: imports and model load included).
AP, AP50 and seam duplicates of each row's first output against the raster's ground truth.

Without `--export`, the checkpoint is exported into the work folder, its int8 graphs calibrated
on a synthetic raster of another seed than the scenes measured (no pixel of the measured raster
is seen by the calibration).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
        ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))
CALIBRATION_SEED = 7  # the measured scenes use seed 0


def prepare_export(weights: str, workdir: Path) -> Path:
    """The checkpoint's export with int8 graphs, calibrated on a raster of another seed."""
    from ..training.synthetic import write_big_raster
    from ..runtimes.export import export_model
    from ..runtimes.runtime import file_digest, is_export, read_manifest

    folder = workdir / "export"
    if is_export(folder):
        manifest = read_manifest(folder)
        if manifest["int8"] and manifest["weights"]["sha256"] == file_digest(weights):
            return folder
    calib = workdir / f"calibration_seed{CALIBRATION_SEED}.tif"
    if not calib.is_file():
        write_big_raster(calib, 2048, seed=CALIBRATION_SEED)
    export_model(weights, folder, "onnx", calibrate=str(calib), calibrate_count=8)
    return folder


def available_rows(export: Path) -> list[tuple[str, str]]:
    from querydet_models.layers.precision import cpu_has_native_bf16

    from ..runtimes.runtime import read_manifest, runtime_installed

    has_int8 = bool(read_manifest(export)["int8"])
    return [(r, p) for r, p in ROWS if runtime_installed(r)
            and (p != "int8" or has_int8) and (p != "bf16" or cpu_has_native_bf16())]


def _in_process(model, cfg, raster: str, out: Path, options) -> float:
    from ..api import DetectRequest, run

    t0 = time.perf_counter()
    run(DetectRequest([raster], str(out), options=options, device="cpu"), loaded=(model, cfg))
    return time.perf_counter() - t0


def _whole(raster: str, weights: str, runtime: str, precision: str, out: Path,
           detect_args: list[str]) -> float:
    cmd = [sys.executable, "-m", "querydet_cli", "detect", raster, "-o", str(out), "--quiet",
           "--weights", weights, "--runtime", runtime, "--precision", precision, *detect_args]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{runtime} {precision}: {run.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def _warm_up(models: dict, tile_size: int, overlap: int) -> None:
    """One run of each model on the bundled sample first: lazily made sessions and compiled
    graphs are not in the in-process figure (they are in the whole-process one)."""
    from ..pipeline.detect import DetectOptions
    from ..core.resources import sample_scene

    with tempfile.TemporaryDirectory() as tmp:
        for (runtime, precision), (model, cfg) in models.items():
            opts = DetectOptions(tile_size=tile_size, overlap=overlap, precision=precision)
            _in_process(model, cfg, str(sample_scene()), Path(tmp) / "warm.ndjson", opts)


def run_runtime_bench(raster: str, weights: str, export: Path | None, truth: Path | None,
                      rounds: int, workdir: Path, tile_size: int = 1024, overlap: int = 128
                      ) -> dict[str, Any]:
    """Median in-process and whole-process seconds, AP and duplicates per runtime row."""
    from .whole import _score
    from ..pipeline.detect import DetectOptions
    from ..runtimes.loading import load_model

    export = export or prepare_export(weights, workdir)
    rows = available_rows(export)
    models = {}
    for runtime, precision in rows:
        source = weights if runtime == "torch" else str(export)
        models[(runtime, precision)] = load_model(source, "cpu", runtime, precision)
    args = ["--tile-size", str(tile_size), "--overlap", str(overlap)]
    _warm_up(models, tile_size, overlap)
    found: dict[str, dict[str, Any]] = {}
    times: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for runtime, precision in rows:
                name = f"{runtime}_{precision}"
                model, cfg = models[(runtime, precision)]
                opts = DetectOptions(tile_size=tile_size, overlap=overlap, precision=precision)
                out = Path(tmp) / f"{name}_{r}.ndjson"
                t_in = _in_process(model, cfg, raster, out, opts)
                source = weights if runtime == "torch" else str(export)
                t_whole = _whole(raster, source, runtime, precision,
                                 Path(tmp) / f"{name}_{r}_whole.ndjson", args)
                entry = times.setdefault(name, {"in_process_s": [], "whole_process_s": []})
                entry["in_process_s"].append(t_in)
                entry["whole_process_s"].append(t_whole)
                if r == 0:
                    found[name] = {"runtime": runtime, "precision": precision} | \
                        _score("querydet", out, truth, cfg, raster)
    for name, entry in times.items():
        for key, values in entry.items():
            found[name][key] = statistics.median(values)
    return {"raster": raster, "export": str(export), "rounds": rounds, "rows": found}


def format_runtime(report: dict[str, Any]) -> str:
    rows = report["rows"]
    base = rows.get("torch_fp32", {}).get("whole_process_s")
    lines = [f"runtimes on {report['raster']} ({report['rounds']} rounds, median; export "
             f"{report['export']})",
             f"{'row':<18}{'in-proc s':>10}{'whole s':>9}{'vs torch fp32':>14}{'AP':>7}"
             f"{'AP50':>7}{'dups':>6}{'dets':>7}"]
    for name, row in rows.items():
        ratio = f"{base / row['whole_process_s']:.2f}x" if base else "-"
        lines.append(f"{name:<18}{row['in_process_s']:>10.2f}{row['whole_process_s']:>9.2f}"
                     f"{ratio:>14}{row.get('AP', float('nan')):>7.3f}"
                     f"{row.get('AP50', float('nan')):>7.3f}{row.get('duplicates', -1):>6}"
                     f"{row['detections']:>7}")
    return "\n".join(lines)


def graph_rows(model, images: list, opts, forced, device, progress=None
               ) -> dict[str, dict[str, Any]]:
    """`querydet bench --runtimes`: the bench's own model exported in memory and timed on
    onnxruntime (fp32) and OpenVINO (fp32, bf16) in dense-HR and exact CSQ, with the same
    simulated queries as the torch rows; the error is against PyTorch's fp32 dense heads."""
    import copy

    import torch

    from querydet_models.export.graph_infer import GraphDetector

    from .heads import _end_to_end, _level_report, _max_rel_err, _median_runs
    from querydet_models.export.graphs import export_graphs

    from ..runtimes.export import sample_inputs, write_graphs
    from ..runtimes.runtime import OnnxRuntimeRunner, OpenVinoRunner, runtime_installed

    m = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    m.channels_last = False
    m.set_precision("fp32")
    graphs = export_graphs(m, opts.start_level)
    with m.compute():
        batch, _ = m.preprocess(images)
        reference = m.predict_levels(m.extract_features(batch), mode="ccq", sigma=0.0,
                                     start_level=opts.start_level)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        entries = write_graphs(graphs, sample_inputs(m, graphs, batch.contiguous(),
                                                     opts.start_level), Path(tmp))
        files = {n: Path(tmp) / f"{n}.onnx" for n in entries}
        inputs = {n: e["inputs"] for n, e in entries.items()}
        outputs = {n: e["outputs"] for n, e in entries.items()}
        for runtime, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"),
                                   ("openvino", "bf16")):
            if not runtime_installed(runtime):
                continue
            runner = OnnxRuntimeRunner(files, inputs) if runtime == "onnxruntime" else \
                OpenVinoRunner(files, inputs, precision)
            detector = GraphDetector(m, runner, outputs, opts.start_level, precision,
                                     runtime=runtime)
            for mode in ("dense", "csq"):
                name = f"{'dense_hr' if mode == 'dense' else 'csq_exact'}_{runtime}_{precision}"
                if progress:
                    progress(name)
                kw = {"mode": mode} if mode == "dense" else dict(
                    mode="csq", sigma=opts.sigma, forced_queries=forced, sparse_max_fraction=1.0)
                _end_to_end(detector, images, device, **kw)()  # sessions made, graphs compiled
                seconds, results = _median_runs(_end_to_end(detector, images, device, **kw),
                                                opts.repeats, device)
                outs, dets, _ = results[-1]
                rows[name] = {"runtime": runtime, "precision": precision, "time_s": seconds,
                              "detections": [int(d["boxes"].shape[0]) for d in dets],
                              "levels": _level_report([r[0] for r in results])}
                if mode == "csq":  # at the keys, against PyTorch's fp32 dense heads
                    rows[name]["max_rel_err"] = max(_max_rel_err(outs, reference).values(),
                                                    default=0.0)
    return rows
