"""The runtimes as one list (runtime.py): `--runtime` choices, what each installs, runs and
reads, and `auto`'s choice all derive from `BACKENDS`; a model states its runtime from the
start."""

import json

import pytest

from querydet_cli.core.errors import QueryDetError
from querydet_cli.runtimes import runtime as rt


def _export(folder, fmt="onnx"):
    folder.mkdir()
    (folder / rt.MANIFEST).write_text(json.dumps({"kind": "querydet-export",
                                                  "version": rt.EXPORT_VERSION, "format": fmt}))
    return folder


def test_choices_come_from_the_list():
    from querydet_cli.commands.shared import Runtime

    assert rt.RUNTIMES == ("auto", "torch", "onnxruntime", "openvino")
    assert [r.value for r in Runtime] == list(rt.RUNTIMES)
    assert rt.backend("openvino").precisions == ("fp32", "bf16", "int8")
    with pytest.raises(QueryDetError, match="'tensorrt' is not one of auto, torch, onnxruntime"):
        rt.backend("tensorrt")


def test_a_checkpoint_runs_on_torch_only(tmp_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    assert rt.choose_runtime("auto", ckpt) == "torch"
    with pytest.raises(QueryDetError, match="runs an exported model: export"):
        rt.choose_runtime("onnxruntime", ckpt)


def test_auto_takes_the_best_installed_reader_of_the_export(tmp_path, monkeypatch):
    onnx = _export(tmp_path / "onnx")
    ir = _export(tmp_path / "ir", "openvino")
    installed = {"openvino", "onnxruntime"}
    for b in (rt.OnnxRuntime, rt.OpenVino):
        monkeypatch.setattr(b, "installed", classmethod(lambda cls: cls.name in installed))
    assert rt.choose_runtime("auto", onnx) == "openvino"  # auto_rank 1: measured faster
    installed.discard("openvino")
    assert rt.choose_runtime("auto", onnx) == "onnxruntime"
    with pytest.raises(QueryDetError, match=r"no runtime for it is installed: pip install "
                                            r"'querydet\[openvino\]'"):
        rt.choose_runtime("auto", ir)  # only OpenVINO reads its own IR
    with pytest.raises(QueryDetError, match="holds OpenVINO IR, which onnxruntime cannot read: "
                                            "use --runtime openvino"):
        rt.choose_runtime("onnxruntime", ir)
    with pytest.raises(QueryDetError, match=r"openvino is not installed \(pip install "
                                            r"'querydet\[openvino\]'\)"):
        rt.choose_runtime("openvino", onnx)
    with pytest.raises(QueryDetError, match="--runtime torch needs a checkpoint"):
        rt.choose_runtime("torch", onnx)


def test_a_new_runtime_is_one_class_in_the_list(tmp_path, monkeypatch):
    class Fake(rt.Backend):
        name, package, extra = "fake", None, None
        precisions, reads, auto_rank = ("fp32",), ("onnx",), 0

    monkeypatch.setattr(rt, "BACKENDS", (*rt.BACKENDS, Fake))
    assert rt.choose_runtime("auto", _export(tmp_path / "e")) == "fake"
    assert rt.backend("fake") is Fake


def test_an_export_states_its_runtime_when_built(tmp_path):
    """GraphDetector takes its runtime and export digest in its constructor: nothing is
    attached after it is built, and it declares the detector protocol."""
    import inspect

    from querydet_models.detectors.protocol import InferenceDetector
    from querydet_models.export.graph_infer import GraphDetector
    from tests.conftest import tiny_model

    params = inspect.signature(GraphDetector).parameters
    assert params["runtime"].kind is inspect.Parameter.KEYWORD_ONLY
    model = GraphDetector(tiny_model(), lambda name, inputs: [], {}, 4, "fp32",
                          runtime="onnxruntime", export_digest="abc")
    assert isinstance(model, InferenceDetector)
    assert (model.runtime, model.weights_digest(), model.own_threads) == ("onnxruntime", "abc",
                                                                          True)
