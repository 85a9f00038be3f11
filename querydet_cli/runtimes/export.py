"""`querydet export`: a checkpoint as ONNX or OpenVINO graphs, dense and CSQ, with a manifest.

Letters: N batch, C channels, Q positions.

The graphs are `querydet_models.export.graphs`' modules traced by torch.onnx (opset 17); OpenVINO IR is
converted from those ONNX files. Every export is checked once against PyTorch on the bundled
sample scene (the largest difference relative to the output's magnitude is printed and kept in
the manifest). With `calibrate`, the graphs are also quantised to int8 (onnxruntime's static
quantisation, QDQ, per-channel weights) from the user's own chips, and int8 detections are
compared with fp32 ones on those chips. The folder is written beside the target and renamed
into place at the end: an old export stays until a new one is complete.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from querydet_models.export.graphs import FineSparseGraph, export_graphs, export_refusal, sparse_tables
from querydet_models.layers.sparse import TowerPlan

from ..core.errors import QueryDetError
from .runtime import EXPORT_VERSION, MANIFEST, file_digest, is_export

log = logging.getLogger("querydet")
OPSET = 17
CHECK_TOLERANCE = 1e-4  # relative: largest |exported - torch| over the largest |torch|


@dataclass
class ExportReport:
    folder: str
    fmt: str
    graphs: list[str]
    check: dict[str, float]  # graph -> largest relative difference to PyTorch fp32
    int8: dict[str, float] = field(default_factory=dict)  # calibration report


def sample_inputs(model, graphs: dict, batch: torch.Tensor, start_level: int
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Inputs of every graph for one preprocessed batch; sparse graphs at every 5th position."""
    with torch.inference_mode():
        coarse = dict(zip(graphs["coarse"][0].output_names(), graphs["coarse"][0](batch)))
    found = {"dense": {"batch": batch}, "coarse": {"batch": batch}}
    for name, (module, _) in graphs.items():
        if name.startswith("fine_"):
            inner = coarse[f"inner_P{module.level}"]
            if isinstance(module, FineSparseGraph):
                n, _, h, w = inner.shape
                plan = TowerPlan.exact(torch.arange(0, n * h * w, 5), (n, h, w), module.depth)
                found[name] = sparse_tables(plan) | {"inner": inner}
            else:
                found[name] = {"inner": inner}
    return found


def _dynamic_axes(module, inputs: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name in inputs:
        axes[name] = {0: "n", 2: "h", 3: "w"} if name in ("batch", "inner") else {0: f"q_{name}"}
    for name in module.output_names():
        axes[name] = {0: "keys"} if isinstance(module, FineSparseGraph) else \
            {0: "n", 2: f"h_{name}", 3: f"w_{name}"}
    return axes


def write_onnx(module, inputs: dict[str, torch.Tensor], names: list[str], path: Path) -> None:
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, tuple(inputs[n].clone() for n in names), str(path),
                          input_names=names, output_names=module.output_names(),
                          dynamic_axes=_dynamic_axes(module, names), opset_version=OPSET,
                          dynamo=False)


def write_graphs(graphs: dict, inputs: dict, work: Path) -> dict[str, dict[str, list[str]]]:
    """Every graph as `work/<name>.onnx`; returns each one's input and output names."""
    entries = {}
    for name, (module, names) in graphs.items():
        write_onnx(module, inputs[name], names, work / f"{name}.onnx")
        entries[name] = {"inputs": names, "outputs": module.output_names()}
    return entries


def relative_difference(found: list[np.ndarray], expected: tuple[torch.Tensor, ...]) -> float:
    """Largest |found - expected| over the largest |expected|, across a graph's outputs."""
    worst = 0.0
    for a, b in zip(found, expected):
        b = b.detach().float().numpy()
        scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-6)
        diff = float(np.abs(np.asarray(a, np.float32) - b).max()) if b.size else 0.0
        worst = max(worst, diff / scale)
    return worst


def check_graphs(graphs: dict, inputs: dict, runner) -> dict[str, float]:
    """Each graph run once by `runner` against the same module in PyTorch fp32."""
    report = {}
    for name, (module, names) in graphs.items():
        with torch.inference_mode():
            expected = module(*(inputs[name][n] for n in names))
        found = runner(name, {n: inputs[name][n].numpy() for n in names})
        report[name] = relative_difference(found, expected)
    return report


def require_export_packages(fmt: str) -> None:
    missing = [p for p in ("onnx", "onnxruntime") + (("openvino",) if fmt == "openvino" else ())
               if importlib.util.find_spec(p) is None]
    if missing:
        extra = "openvino" if fmt == "openvino" else "onnx"
        raise QueryDetError(f"export needs {', '.join(missing)}: pip install 'querydet[{extra}]'")


def check_target(out: Path) -> None:
    """The export folder may be new, empty or an earlier export; nothing else is replaced."""
    if out.exists() and not out.is_dir():
        raise QueryDetError(f"-o {out}: is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise QueryDetError(f"-o {out}: folder is not empty and not an export; give a new folder")


def sample_batch(model) -> torch.Tensor:
    """The bundled sample scene's top-left 512 x 512 pixels, preprocessed for the model."""
    from ..reading.raster import RasterSource
    from ..core.resources import sample_scene

    with RasterSource(sample_scene()) as src:
        pixels, _ = src.read(0, 0, min(512, src.width), min(512, src.height))
    batch, _ = model.preprocess([torch.from_numpy(pixels)])
    return batch.contiguous()


def export_model(weights: str | Path, out: str | Path, fmt: str = "onnx",
                 start_level: int | None = None, calibrate: str | None = None,
                 calibrate_count: int = 32) -> ExportReport:
    """Write the export of `weights` to folder `out` (see the module docstring)."""
    from .loading import load_model
    from .runtime import OnnxRuntimeRunner, OpenVinoRunner

    if fmt not in ("onnx", "openvino"):
        raise QueryDetError(f"--format: {fmt!r} is not one of onnx, openvino")
    out = Path(out)
    check_target(out)
    if calibrate is not None and not Path(calibrate).exists():
        raise QueryDetError(f"--calibrate: {calibrate} not found")
    require_export_packages(fmt)
    model, cfg = load_model(weights, "cpu")
    refusal = export_refusal(model)
    if refusal:
        raise QueryDetError(f"cannot export {weights}: {refusal}")
    model.to(memory_format=torch.contiguous_format)
    model.channels_last = False
    model.set_precision("fp32")
    start = cfg.inference.start_level if start_level is None else start_level
    if start not in model.levels[1:]:
        raise QueryDetError(f"--start-level {start}: not one of the model's levels above the "
                            f"finest ({', '.join(map(str, model.levels[1:]))})")
    graphs = export_graphs(model, start)
    inputs = sample_inputs(model, graphs, sample_batch(model), start)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        entries = write_graphs(graphs, inputs, work)
        onnx_files = {name: work / f"{name}.onnx" for name in graphs}
        check = check_graphs(graphs, inputs, OnnxRuntimeRunner(onnx_files, {
            n: e["inputs"] for n, e in entries.items()}))
        int8 = {}
        if calibrate:
            from .quantize import quantize_export

            int8 = quantize_export(model, graphs, onnx_files, work, calibrate, calibrate_count,
                                   cfg.names())
        if fmt == "openvino":
            files = _to_openvino(work, list(graphs) + [f"{n}.int8" for n in int8.get("graphs", [])])
            ov_check = check_graphs(graphs, inputs, OpenVinoRunner(
                {n: work / f"{n}.xml" for n in graphs}, {n: e["inputs"] for n, e in entries.items()},
                "fp32"))
            check = {n: max(check[n], ov_check[n]) for n in check}
        worst = max(check, key=check.get)
        if check[worst] > CHECK_TOLERANCE:  # a graph that does not compute the model: keep none
            raise QueryDetError(f"export check failed: graph {worst} differs from PyTorch by "
                                f"{check[worst]:.2e} (relative) on the sample, above "
                                f"{CHECK_TOLERANCE:g}; nothing written")
        _write_manifest(work, entries, weights, model, cfg, start, fmt, check, int8)
        work.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportReport(str(out), fmt, list(graphs), check, int8.get("report", {}))


def _to_openvino(work: Path, names: list[str]) -> None:
    """Each ONNX graph converted to OpenVINO IR (.xml + .bin); the ONNX files removed."""
    import openvino as ov

    for name in names:
        ov.save_model(ov.convert_model(str(work / f"{name}.onnx")), str(work / f"{name}.xml"),
                      compress_to_fp16=False)
        (work / f"{name}.onnx").unlink()


def _files(work: Path, stem: str) -> list[dict[str, str]]:
    parts = [f"{stem}.onnx"] if (work / f"{stem}.onnx").exists() else [f"{stem}.xml", f"{stem}.bin"]
    return [{"file": p, "sha256": file_digest(work / p)} for p in parts]


def _write_manifest(work: Path, entries: dict, weights, model, cfg, start: int, fmt: str,
                    check: dict[str, float], int8: dict) -> None:
    from importlib.metadata import version

    from ..pipeline.identity import weights_digest

    graphs = {name: e | {"files": _files(work, name)} for name, e in entries.items()}
    quantised = {}
    for name, e in entries.items():  # graphs left in fp32 by the quantisation keep their file
        stem = f"{name}.int8" if name in int8.get("graphs", []) else name
        quantised[name] = e | {"files": _files(work, stem)}
    manifest = {
        "kind": "querydet-export", "version": EXPORT_VERSION, "format": fmt,
        "classes": cfg.names(), "gsd": cfg.data.gsd, "start_level": start,
        "levels": list(model.levels), "opset": OPSET,
        "precisions": ["fp32"],  # bf16 is OpenVINO's choice at load time, from the fp32 graphs
        "input": {"name": "batch", "layout": "NCHW", "normalised": "(pixels in [0, 1] - mean) / std",
                  "mean": list(cfg.model.pixel_mean), "std": list(cfg.model.pixel_std),
                  "size_divisibility": cfg.model.size_divisibility},
        "graphs": graphs, "int8": quantised if int8 else {},
        "int8_report": int8.get("report", {}),
        "check": {"max_relative_difference": check, "against": "PyTorch fp32, bundled sample"},
        "weights": {"path": str(Path(weights).resolve()), "sha256": file_digest(weights)},
        "digest": weights_digest(model), "config": cfg.to_dict(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "querydet": version("querydet"), "torch": torch.__version__,
    }
    if int8:
        manifest["precisions"].append("int8")
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1))


def format_report(report: ExportReport) -> str:
    worst = max(report.check.values())
    lines = [f"exported {len(report.graphs)} graphs ({report.fmt}) to {report.folder}",
             f"check against PyTorch fp32 on the bundled sample: largest relative difference "
             f"{worst:.2e} ({'ok' if worst <= CHECK_TOLERANCE else 'ABOVE ' + str(CHECK_TOLERANCE)})"]
    lines += [f"  {name:28s} {value:.2e}" for name, value in report.check.items()]
    for key, value in report.int8.items():
        lines.append(f"int8: {key}: {value}")
    return "\n".join(lines)
