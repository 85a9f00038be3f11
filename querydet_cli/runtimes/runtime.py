"""Running an exported model (`querydet export`) with onnxruntime or OpenVINO.

An export is a folder: `manifest.json` (classes, config, GSD, start level, each graph's file,
inputs, outputs and SHA-256, the checkpoint it came from) and the graphs, as ONNX files or as
OpenVINO IR (.xml + .bin). `load_export` checks the folder against its manifest and returns a
`GraphDetector` (querydet_models.export.graph_infer) that `detect`, the Python API and the benches run
like any model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..core.config import Config, config_from_dict
from ..core.errors import QueryDetError

log = logging.getLogger("querydet")

MANIFEST = "manifest.json"
EXPORT_VERSION = 1
EXPORT_FORMATS = {"onnx": "ONNX", "openvino": "OpenVINO IR"}  # an export's graphs, by format


class Backend:
    """One runtime: the package it imports, the extra that installs it, the precisions and
    export formats it runs, and how it makes a runner of a graph folder."""

    name: ClassVar[str]
    package: ClassVar[str | None] = None  # the module it needs (None: part of querydet)
    extra: ClassVar[str | None] = None  # pip install 'querydet[extra]'
    precisions: ClassVar[tuple[str, ...]] = ()  # what it computes an export in
    reads: ClassVar[tuple[str, ...]] = ()  # export formats (EXPORT_FORMATS) it runs
    auto_rank: ClassVar[int] = 0  # `auto` takes the lowest installed rank that reads an export

    @classmethod
    def installed(cls) -> bool:
        return cls.package is None or importlib.util.find_spec(cls.package) is not None

    @classmethod
    def runner(cls, files: dict[str, Path], inputs: dict[str, list[str]], precision: str,
               threads: int | None) -> Any:
        raise NotImplementedError


class Torch(Backend):
    """PyTorch itself: runs checkpoints (.pt), never an export."""

    name = "torch"


class OnnxRuntime(Backend):
    """onnxruntime's CPU provider: ONNX graphs in fp32, or int8 from `export --calibrate`."""

    name, package, extra = "onnxruntime", "onnxruntime", "onnx"
    precisions, reads, auto_rank = ("fp32", "int8"), ("onnx",), 2

    @classmethod
    def runner(cls, files, inputs, precision, threads):
        return OnnxRuntimeRunner(files, inputs, threads)


class OpenVino(Backend):
    """OpenVINO on the CPU: ONNX or its own IR, in fp32, bf16 or int8; `auto`'s first choice
    (measured faster than onnxruntime on this CPU: README, export section)."""

    name, package, extra = "openvino", "openvino", "openvino"
    precisions, reads, auto_rank = ("fp32", "bf16", "int8"), ("onnx", "openvino"), 1

    @classmethod
    def runner(cls, files, inputs, precision, threads):
        return OpenVinoRunner(files, inputs, precision, threads)


# the one list of runtimes: `--runtime` choices, installs, precisions and `auto` derive from it
BACKENDS: tuple[type[Backend], ...] = (Torch, OnnxRuntime, OpenVino)
RUNTIMES = ("auto", *(b.name for b in BACKENDS))


def backend(name: str) -> type[Backend]:
    """The runtime called `name`, or one line listing them."""
    for b in BACKENDS:
        if b.name == name:
            return b
    raise QueryDetError(f"--runtime: {name!r} is not one of {', '.join(RUNTIMES)}")


def is_export(path: str | Path) -> bool:
    """True when `path` is a folder written by `querydet export`."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def runtime_installed(runtime: str) -> bool:
    return backend(runtime).installed()


def require_runtime(runtime: str) -> None:
    """One line naming what to install when a runtime's package is missing."""
    if runtime == "auto":
        return
    found = backend(runtime)
    if not found.installed():
        raise QueryDetError(f"--runtime {runtime}: {found.package} is not installed "
                            f"(pip install 'querydet[{found.extra}]')")


def choose_runtime(runtime: str | None, weights: str | Path, manifest: dict | None = None) -> str:
    """The runtime a run uses. `auto`: torch for a checkpoint; for an export, the installed
    backend of lowest `auto_rank` that reads its format."""
    runtime = runtime or "auto"
    require_runtime(runtime)
    if not is_export(weights):
        if runtime not in ("auto", Torch.name):
            raise QueryDetError(f"--runtime {runtime} runs an exported model: export {weights} "
                                f"first (querydet export {weights} -o DIR) and pass the folder "
                                "as --weights")
        return Torch.name
    if runtime == Torch.name:
        readers = ", ".join(b.name for b in BACKENDS if b.reads)
        raise QueryDetError(f"--runtime torch needs a checkpoint (.pt); {weights} is an export "
                            f"(use --runtime {readers} or auto)")
    fmt = (manifest or read_manifest(weights))["format"]
    readers = sorted((b for b in BACKENDS if fmt in b.reads), key=lambda b: b.auto_rank)
    if runtime == "auto":
        found = [b for b in readers if b.installed()]
        if not found:
            raise QueryDetError(f"{weights} is an exported model and no runtime for it is "
                                f"installed: pip install 'querydet[{readers[-1].extra}]'")
        return found[0].name
    if backend(runtime) not in readers:
        raise QueryDetError(f"{weights} holds {EXPORT_FORMATS[fmt]}, which {runtime} cannot "
                            f"read: use --runtime {' or '.join(b.name for b in readers)}, or "
                            "export with --format onnx")
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
    allowed = backend(runtime).precisions
    if precision == "auto":
        from querydet_models.layers.precision import cpu_has_native_bf16

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
    from querydet_models.export.graph_infer import GraphDetector
    from querydet_models.detectors.querydet import build_querydet

    folder = Path(folder)
    manifest = read_manifest(folder)
    runtime = choose_runtime(runtime, folder, manifest)
    precision = resolve_export_precision(runtime, precision, manifest)
    check_export(folder, manifest, precision)
    cfg: Config = config_from_dict(manifest["config"])
    shell = build_querydet(replace(cfg.model, backbone_weights=None), cfg.inference).eval()
    graphs = manifest["int8"] if precision == "int8" else manifest["graphs"]
    outputs = {name: entry["outputs"] for name, entry in graphs.items()}
    files = {name: folder / entry["files"][0]["file"] for name, entry in graphs.items()}
    inputs = {name: entry["inputs"] for name, entry in graphs.items()}
    runner = backend(runtime).runner(files, inputs, precision, threads)
    model = GraphDetector(shell, runner, outputs, manifest["start_level"], precision,
                          runtime=runtime, export_digest=manifest["digest"])
    log.info("runtime: %s (%s), export %s", runtime, precision, folder)
    return model, cfg
