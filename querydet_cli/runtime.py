"""Running an exported model (`querydet export`) with onnxruntime or OpenVINO.

An export is a folder: `manifest.json` (classes, config, GSD, start level, each graph's file,
inputs, outputs and SHA-256, the checkpoint it came from) and the graphs, as ONNX files or as
OpenVINO IR (.xml + .bin). `load_export` checks the folder against its manifest and returns a
`GraphDetector` (querydet_models.graph_infer) that `detect`, the Python API and the benches run
like any model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import Config, config_from_dict
from .errors import QueryDetError

log = logging.getLogger("querydet")

MANIFEST = "manifest.json"
EXPORT_VERSION = 1
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
EXPORT_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}


def is_export(path: str | Path) -> bool:
    """True when `path` is a folder written by `querydet export`."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def runtime_installed(runtime: str) -> bool:
    return runtime == "torch" or importlib.util.find_spec(PACKAGE[runtime]) is not None


def require_runtime(runtime: str) -> None:
    """One line naming what to install when a runtime's package is missing."""
    if runtime not in RUNTIMES:
        raise QueryDetError(f"--runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime not in ("auto", "torch") and not runtime_installed(runtime):
        raise QueryDetError(f"--runtime {runtime}: {PACKAGE[runtime]} is not installed "
                            f"(pip install 'querydet[{'onnx' if runtime == 'onnxruntime' else runtime}]')")


def choose_runtime(runtime: str | None, weights: str | Path, manifest: dict | None = None) -> str:
    """The runtime a run uses. `auto`: torch for a checkpoint; for an export, OpenVINO when it
    is installed (measured faster on this CPU: README, export section), else onnxruntime."""
    runtime = runtime or "auto"
    require_runtime(runtime)
    if not is_export(weights):
        if runtime not in ("auto", "torch"):
            raise QueryDetError(f"--runtime {runtime} runs an exported model: export {weights} "
                                f"first (querydet export {weights} -o DIR) and pass the folder "
                                "as --weights")
        return "torch"
    if runtime == "torch":
        raise QueryDetError(f"--runtime torch needs a checkpoint (.pt); {weights} is an export "
                            "(use --runtime onnxruntime, openvino or auto)")
    fmt = (manifest or read_manifest(weights))["format"]
    if runtime == "auto":
        choices = ["openvino"] if fmt == "openvino" else ["openvino", "onnxruntime"]
        found = [r for r in choices if runtime_installed(r)]
        if not found:
            raise QueryDetError(f"{weights} is an exported model and no runtime for it is "
                                f"installed: pip install 'querydet[{choices[-1].replace('onnxruntime', 'onnx')}]'")
        return found[0]
    if fmt == "openvino" and runtime == "onnxruntime":
        raise QueryDetError(f"{weights} holds OpenVINO IR, which onnxruntime cannot read: use "
                            "--runtime openvino, or export with --format onnx")
    return runtime


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise QueryDetError(f"{folder} is not an export: no {MANIFEST}") from None
    except (OSError, ValueError) as err:
        raise QueryDetError(f"{path} is damaged: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "querydet-export":
        raise QueryDetError(f"{path} is not a querydet export manifest")
    if manifest.get("version") != EXPORT_VERSION:
        raise QueryDetError(f"{folder} was exported in format {manifest.get('version')}; this "
                            f"querydet reads format {EXPORT_VERSION}: export again")
    return manifest


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_export(folder: str | Path, manifest: dict, precision: str) -> None:
    """Every graph the run needs is the one the manifest names, and the checkpoint it was
    exported from (when still where it was) has not changed since: else one line."""
    graphs = manifest["int8"] if precision == "int8" else manifest["graphs"]
    for name, entry in graphs.items():
        for part in entry["files"]:
            path = Path(folder) / part["file"]
            if not path.is_file():
                raise QueryDetError(f"{folder}: {part['file']} is missing (graph {name}): "
                                    "export again")
            if file_digest(path) != part["sha256"]:
                raise QueryDetError(f"{folder}: {part['file']} does not match the manifest "
                                    f"(changed or copied from another export): export again")
    source = manifest.get("weights") or {}
    path = source.get("path")
    if path and Path(path).is_file() and file_digest(path) != source.get("sha256"):
        raise QueryDetError(f"{folder} is stale: {path} has changed since it was exported: "
                            f"querydet export {path} -o {folder}")


def _runner(folder: Path, manifest: dict, runtime: str, precision: str, threads: int | None):
    graphs = manifest["int8"] if precision == "int8" else manifest["graphs"]
    files = {name: folder / entry["files"][0]["file"] for name, entry in graphs.items()}
    inputs = {name: entry["inputs"] for name, entry in graphs.items()}
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(files, inputs, threads)
    return OpenVinoRunner(files, inputs, precision, threads)


class OnnxRuntimeRunner:
    """Graphs run by onnxruntime's CPU provider, each session made on first use."""

    def __init__(self, files: dict[str, Path], inputs: dict[str, list[str]],
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.files, self.inputs = files, inputs
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3  # warnings about unused initialisers are noise
        if threads:
            self.options.intra_op_num_threads = threads
        self.sessions: dict[str, object] = {}

    def __call__(self, name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime as ort

        if name not in self.sessions:
            self.sessions[name] = ort.InferenceSession(str(self.files[name]), self.options,
                                                       providers=["CPUExecutionProvider"])
        return self.sessions[name].run(None, {k: inputs[k] for k in self.inputs[name]})


class OpenVinoRunner:
    """Graphs compiled by OpenVINO for the CPU, in f32 or bf16 (INFERENCE_PRECISION_HINT);
    int8 graphs carry their own quantisation."""

    def __init__(self, files: dict[str, Path], inputs: dict[str, list[str]], precision: str,
                 threads: int | None = None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.files, self.inputs = files, inputs
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.compiled: dict[str, object] = {}

    def __call__(self, name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name not in self.compiled:
            self.compiled[name] = self.core.compile_model(str(self.files[name]), "CPU",
                                                          self.config)
        model = self.compiled[name]
        result = model([inputs[k] for k in self.inputs[name]])
        return [result[out] for out in model.outputs]


def resolve_export_precision(runtime: str, precision: str | None, manifest: dict) -> str:
    """auto -> bf16 on OpenVINO where the CPU computes it natively, else fp32; int8 needs an
    export made with --calibrate."""
    precision = precision or "auto"
    allowed = EXPORT_PRECISIONS[runtime]
    if precision == "auto":
        from querydet_models.precision import cpu_has_native_bf16

        return "bf16" if "bf16" in allowed and cpu_has_native_bf16() else "fp32"
    if precision not in allowed:
        raise QueryDetError(f"--precision {precision} is not one {runtime} runs here "
                            f"(allowed: auto, {', '.join(allowed)})")
    if precision == "int8" and not manifest.get("int8"):
        raise QueryDetError("--precision int8 needs an export calibrated on your chips: "
                            "querydet export WEIGHTS --calibrate CHIPS -o DIR")
    return precision


def load_export(folder: str | Path, runtime: str | None = None, precision: str | None = None,
                threads: int | None = None):
    """An export folder as (GraphDetector, Config), after checking it against its manifest."""
    from querydet_models.graph_infer import GraphDetector
    from querydet_models.querydet import build_querydet

    folder = Path(folder)
    manifest = read_manifest(folder)
    runtime = choose_runtime(runtime, folder, manifest)
    precision = resolve_export_precision(runtime, precision, manifest)
    check_export(folder, manifest, precision)
    cfg: Config = config_from_dict(manifest["config"])
    shell = build_querydet(replace(cfg.model, backbone_weights=None), cfg.inference).eval()
    graphs = manifest["int8"] if precision == "int8" else manifest["graphs"]
    outputs = {name: entry["outputs"] for name, entry in graphs.items()}
    model = GraphDetector(shell, _runner(folder, manifest, runtime, precision, threads), outputs,
                          manifest["start_level"], precision)
    model.runtime = runtime
    model.export_digest = manifest["digest"]
    log.info("runtime: %s (%s), export %s", runtime, precision, folder)
    return model, cfg
