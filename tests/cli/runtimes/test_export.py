"""`querydet export` and `detect --runtime`: graphs that equal PyTorch, the same detections on
every runtime, int8 from the user's chips, and every bad export refused in one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from querydet_cli.app import app
from querydet_cli.bench.detect import raster_ap
from querydet_cli.training.synthetic import write_big_raster
from querydet_cli.core.errors import QueryDetError
from querydet_cli.core.resources import sample_model, sample_scene

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _refused(args, words):
    """The command ends in a QueryDetError: `main` prints it as one line and exits 2 (the
    subprocess tests in test_usage_errors.py check that path end to end)."""
    result = runner.invoke(app, [str(a) for a in args])
    err = result.exception
    assert isinstance(err, QueryDetError) and err.exit_code == 2, (result.output, err)
    assert "\n" not in str(err) and words in str(err), str(err)
    return str(err)


def _boxes(path):
    feats = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    order = sorted(range(len(feats)), key=lambda i: (-feats[i]["properties"]["score"],
                                                     feats[i]["properties"]["bbox_px"]))
    return np.array([feats[i]["properties"]["bbox_px"] for i in order]).reshape(-1, 4), \
        [feats[i]["properties"]["class_id"] for i in order]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The sample model exported to ONNX, int8 graphs calibrated on two chips of a raster of
    another seed than any measured here."""
    tmp = tmp_path_factory.mktemp("export")
    chips = tmp / "chips"
    chips.mkdir()
    from PIL import Image

    import rasterio

    raster = write_big_raster(tmp / "calib.tif", 512, seed=5, block=256)
    with rasterio.open(raster) as src:
        pixels = src.read([1, 2, 3])
    for i in range(2):
        Image.fromarray(pixels[:, :256, 256 * i:256 * (i + 1)].transpose(1, 2, 0)).save(chips / f"c{i}.png")
    out = tmp / "onnx"
    result = _ok(["export", "-o", out, "--calibrate", chips])
    assert "largest relative difference" in result.output and "agreement_AP50" in result.output
    return out


def test_graphs_equal_pytorch_within_1e4(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    check = manifest["check"]["max_relative_difference"]
    assert {"dense", "coarse", "fine_sparse_P3_query", "fine_sparse_P2"} <= set(check)
    assert max(check.values()) <= 1e-4
    assert manifest["classes"] == ["car", "truck", "person", "tree", "building"]
    assert manifest["gsd"] == 0.3 and manifest["start_level"] == 4
    assert "int8" in manifest["precisions"] and manifest["int8"]["coarse"]["files"][0]["file"] == "coarse.int8.onnx"


def _detect(tmp_path, raster, name, *args):
    out = tmp_path / f"{name}.ndjson"
    _ok(["detect", raster, "-o", out, "--quiet", *args])
    return _boxes(out)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtimes_find_what_torch_finds_on_the_sample(tmp_path, exported, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    want, want_labels = _detect(tmp_path, sample_scene(), "torch", "--precision", "fp32")
    got, got_labels = _detect(tmp_path, sample_scene(), runtime, "--weights", exported,
                              "--runtime", runtime, "--precision", "fp32")
    assert len(want) == len(got) > 10
    assert np.abs(want - got).max() <= 0.5 and want_labels == got_labels


def test_runtime_ap_on_a_synthetic_raster_with_truth(tmp_path, exported):
    truth = tmp_path / "truth.json"
    raster = write_big_raster(tmp_path / "busy.tif", 1536, seed=3, truth=truth)
    from querydet_cli.core.config import load_config

    ids = load_config("querydet_mobilenet_synthetic").category_ids()
    aps = {}
    for name, args in [("torch", ["--precision", "fp32"]),
                       ("onnxruntime", ["--weights", exported, "--runtime", "onnxruntime"]),
                       ("int8", ["--weights", exported, "--runtime", "onnxruntime",
                                 "--precision", "int8"])]:
        boxes, labels = _detect(tmp_path, raster, name, "--score-threshold", "0.05", *args)
        dets = [{"bbox": b.tolist(), "score": 1.0 - i * 1e-6, "class_id": c}
                for i, (b, c) in enumerate(zip(boxes, labels))]
        aps[name] = raster_ap(truth, dets, ids)["AP"]
    assert aps["torch"] > 0.3
    assert abs(aps["onnxruntime"] - aps["torch"]) <= 0.005
    assert abs(aps["int8"] - aps["torch"]) <= 0.05  # quantised: close, not equal


def test_auto_picks_an_installed_runtime_and_names_it(tmp_path, exported):
    import importlib.util

    result = _ok(["detect", sample_scene(), "-o", tmp_path / "a.geojson", "--quiet", "--json",
                  "--weights", exported])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    want = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    assert summary["runtime"] == want and summary["detections"] > 10
    result = _ok(["detect", sample_scene(), "-o", tmp_path / "b.geojson", "--quiet", "--json"])
    assert json.loads(result.stdout.strip().splitlines()[-1])["runtime"] == "torch"


def test_a_missing_runtime_is_one_line(tmp_path, exported, monkeypatch):
    import querydet_cli.runtimes.runtime as rt

    monkeypatch.setattr(rt.OnnxRuntime, "installed", classmethod(lambda cls: False))
    _refused(["detect", sample_scene(), "-o", tmp_path / "a.geojson", "--weights", exported,
              "--runtime", "onnxruntime"], "pip install 'querydet[onnx]'")
    assert not (tmp_path / "a.geojson").exists()


@pytest.mark.parametrize("args,words", [
    (["--runtime", "onnxruntime"], "export"),  # a checkpoint is not an export
    (["--precision", "int8"], "exported model"),
])
def test_checkpoint_with_an_export_only_option_is_refused(tmp_path, args, words):
    _refused(["detect", sample_scene(), "-o", tmp_path / "a.geojson", *args], words)
    assert not any(tmp_path.iterdir())


def test_export_options_the_graphs_cannot_do_are_refused(tmp_path, exported):
    base = ["detect", sample_scene(), "-o", tmp_path / "a.geojson", "--weights", exported]
    _refused(base + ["--runtime", "torch"], "needs a checkpoint")
    _refused(base + ["--mode", "cq"], "not exported")
    _refused(base + ["--context", "5x5"], "exact")
    _refused(base + ["--ray", "auto"], "torch runtime")
    assert not (tmp_path / "a.geojson").exists()


def test_int8_needs_a_calibrated_export(tmp_path):
    plain = tmp_path / "plain"
    _ok(["export", "-o", plain])
    _refused(["detect", sample_scene(), "-o", tmp_path / "a.geojson", "--weights", plain,
              "--runtime", "onnxruntime", "--precision", "int8"], "--calibrate")


def test_stale_and_mismatched_exports_are_refused(tmp_path, exported):
    weights = tmp_path / "model.pt"
    shutil.copy(sample_model(), weights)
    mine = tmp_path / "mine"
    _ok(["export", str(weights), "-o", mine])
    # another export's graph copied in: the manifest's digest catches it
    broken = tmp_path / "broken"
    shutil.copytree(mine, broken)
    shutil.copy(exported / "coarse.int8.onnx", broken / "coarse.onnx")
    _refused(["detect", sample_scene(), "-o", tmp_path / "b.geojson", "--weights", broken],
              "does not match the manifest")
    # the checkpoint retrained in place after the export: the export is stale
    payload = torch.load(weights, weights_only=False)
    key = next(k for k in payload["model"] if k.endswith("weight"))
    payload["model"][key] = payload["model"][key] + 1.0
    torch.save(payload, weights)
    _refused(["detect", sample_scene(), "-o", tmp_path / "c.geojson", "--weights", mine],
              "is stale")
    (mine / "manifest.json").write_text("{not json")
    _refused(["detect", sample_scene(), "-o", tmp_path / "d.geojson", "--weights", mine],
              "damaged")


def test_export_bad_targets_and_inputs_leave_nothing(tmp_path):
    afile = tmp_path / "a.txt"
    afile.write_text("keep")
    _refused(["export", "-o", afile], "is a file")
    assert afile.read_text() == "keep"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    _refused(["export", "-o", busy], "not empty")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    _refused(["export", "-o", tmp_path / "new", "--calibrate", tmp_path / "nowhere"], "not found")
    _refused(["export", tmp_path / "missing.pt", "-o", tmp_path / "new"], "missing.pt")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "busy"]


def test_a_failed_export_keeps_the_old_one(tmp_path):
    out = tmp_path / "exp"
    _ok(["export", "-o", out])
    before = (out / "manifest.json").read_text()
    empty = tmp_path / "nochips"
    empty.mkdir()
    _refused(["export", "-o", out, "--calibrate", empty], "holds no images")
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "nochips"]  # no temp folder


def test_two_stage_checkpoint_is_refused(tmp_path):
    from querydet_models.checkpoint import save_checkpoint
    from querydet_models.detectors.querydet import build_querydet
    from querydet_cli.core.config import load_config

    cfg = load_config("querydet_faster_rcnn_mobilenet_synthetic")
    weights = tmp_path / "frcnn.pt"
    save_checkpoint(weights, build_querydet(cfg.model, cfg.inference), cfg.to_dict(), cfg.names())
    _refused(["export", weights, "-o", tmp_path / "exp"], "two-stage")
    assert not (tmp_path / "exp").exists()


def test_openvino_ir_export_runs_on_openvino_only(tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "ir"
    _ok(["export", "-o", out, "--format", "openvino"])
    assert (out / "coarse.xml").is_file() and not list(out.glob("*.onnx"))
    want, _ = _detect(tmp_path, sample_scene(), "torch", "--precision", "fp32")
    got, _ = _detect(tmp_path, sample_scene(), "ov", "--weights", out, "--runtime", "openvino",
                     "--precision", "fp32")
    assert len(want) == len(got) and np.abs(want - got).max() <= 0.5
    _refused(["detect", sample_scene(), "-o", tmp_path / "x.geojson", "--weights", out,
              "--runtime", "onnxruntime"], "OpenVINO IR")


def test_bench_times_the_runtimes_beside_torch():
    from querydet_cli.bench.heads import BenchOptions, run_bench
    from querydet_cli.bench.runtime import graph_rows

    opts = BenchOptions(backbone="resnet18", image_size=128, repeats=1, backends=("torch",),
                        query_density=0.05)
    modes = run_bench(opts, extra_rows=graph_rows)["modes"]
    assert {"dense_hr", "csq_exact_torch", "dense_hr_onnxruntime_fp32",
            "csq_exact_onnxruntime_fp32"} <= set(modes)
    for name, row in modes.items():
        if name.startswith("csq_exact") and row["precision"] == "fp32":
            assert row["max_rel_err"] < 1e-4, name
    assert modes["csq_exact_onnxruntime_fp32"]["detections"] == modes["csq_exact_torch"]["detections"]


def test_python_api_runs_an_export(exported):
    from querydet_cli.api import Detector

    torch_found = Detector.load(device="cpu", precision="fp32").detect(sample_scene())
    found = Detector.load(exported, runtime="onnxruntime").detect(sample_scene())
    assert len(found) == len(torch_found) > 10
    cols = ["x1", "y1", "x2", "y2"]
    a, b = (f.sort_values(cols)[cols].to_numpy() for f in (found, torch_found))
    assert np.abs(a - b).max() <= 0.5
