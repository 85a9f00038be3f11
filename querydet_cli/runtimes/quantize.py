"""int8 graphs for `querydet export --calibrate CHIPS`: post-training static quantisation.

Letters: N batch, C channels.

onnxruntime's `quantize_static` (QDQ format, int8 weights per output channel, uint8 activations,
min-max ranges) calibrated on the user's chips: the dense, coarse and fine dense graphs read
the chips' own batches and inner maps. The sparse fine-level graphs stay fp32 (their inputs are
gathered rows whose ranges the fine dense graphs already cover; they are a small part of the
work). The same QDQ files run on onnxruntime and on OpenVINO, which turns them into int8 kernels.

After quantising, int8 and fp32 detections on the calibration chips are compared: AP50 of the
int8 boxes against the fp32 boxes as truth (agreement), and against the chips' labels when the
folder is a `querydet tile` output (annotations.json). Both are measured on the chips the ranges
came from; `querydet bench-detect --runtime` measures AP on held-out rasters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from querydet_models.export.graphs import FineDenseGraph

from ..core.errors import QueryDetError

log = logging.getLogger("querydet")
CHIP_SIDE = 1024  # larger images are calibrated on windows of this side


def calibration_images(source: str, count: int) -> list[tuple[str, np.ndarray]]:
    """Up to `count` (name, (3, H, W) float image in [0, 1]) from a folder of chips (a `tile`
    output's images/ too) or windows of one raster."""
    from ..reading.inputs import expand_inputs
    from ..reading.raster import RasterSource

    root = Path(source)
    if not root.exists():
        raise QueryDetError(f"--calibrate: {source} not found")
    folder = root / "images" if (root / "images").is_dir() else root
    paths = expand_inputs([str(folder)])
    images: list[tuple[str, np.ndarray]] = []
    for path in paths:
        with RasterSource(path) as src:
            for y in range(0, src.height, CHIP_SIDE):
                for x in range(0, src.width, CHIP_SIDE):
                    pixels, valid = src.read(x, y, min(CHIP_SIDE, src.width - x),
                                             min(CHIP_SIDE, src.height - y))
                    if valid.any() and min(pixels.shape[1:]) >= 32:
                        images.append((Path(path).name, pixels))
                    if len(images) >= count:
                        return images
    if not images:
        raise QueryDetError(f"--calibrate: no image with data in {source}")
    return images


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _feeds(model, graphs: dict, images: list[tuple[str, np.ndarray]]
           ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration inputs of every quantised graph, one per chip."""
    coarse = graphs["coarse"][0]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"dense": [], "coarse": []}
    for _, pixels in images:
        batch, _ = model.preprocess([torch.from_numpy(pixels)])
        batch = batch.contiguous()
        feeds["dense"].append({"batch": batch.numpy()})
        feeds["coarse"].append({"batch": batch.numpy()})
        with torch.inference_mode():
            inner = dict(zip(coarse.output_names(), coarse(batch)))
        for name, (module, _) in graphs.items():
            if isinstance(module, FineDenseGraph):
                feeds.setdefault(name, []).append(
                    {"inner": inner[f"inner_P{module.level}"].numpy()})
    return feeds


def quantize_export(model, graphs: dict, onnx_files: dict[str, Path], work: Path, source: str,
                    count: int, names: list[str]) -> dict:
    """Write `<graph>.int8.onnx` for the quantised graphs; returns {"graphs": names, "report"}."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = calibration_images(source, count)
    feeds = _feeds(model, graphs, images)
    done = []
    for name, inputs in feeds.items():
        # shapes inferred and the graph optimised first, as onnxruntime advises for quantising
        prepared = work / f"{name}.pre.onnx"
        quant_pre_process(str(onnx_files[name]), str(prepared))
        quantize_static(str(prepared), str(work / f"{name}.int8.onnx"), _Reader(inputs),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        prepared.unlink()
        done.append(name)
    report = compare_int8(work, done, graphs, images, source, model, names)
    return {"graphs": done, "report": report | {"chips": len(images)}}


def _detector(work: Path, graphs: dict, quantised: list[str], int8: bool, model):
    from querydet_models.export.graph_infer import GraphDetector

    from .runtime import OnnxRuntimeRunner

    files = {n: work / (f"{n}.int8.onnx" if int8 and n in quantised else f"{n}.onnx")
             for n in graphs}
    runner = OnnxRuntimeRunner(files, {n: names for n, (_, names) in graphs.items()})
    outputs = {n: m.output_names() for n, (m, _) in graphs.items()}
    start = graphs["coarse"][0].start_level
    return GraphDetector(model, runner, outputs, start, "int8" if int8 else "fp32",
                         runtime="onnxruntime")


def compare_int8(work: Path, quantised: list[str], graphs: dict, images, source: str, model,
                 names: list[str]) -> dict:
    """AP50 of int8 against fp32 detections, and against the chips' labels where there are."""
    from ..training.metrics import ImageDetections, ImageTruth, coco_metrics

    found = {}
    for int8 in (False, True):
        detector = _detector(work, graphs, quantised, int8, model)
        found[int8] = []
        for _, pixels in images:
            with detector.compute():
                batch, sizes = detector.preprocess([torch.from_numpy(pixels)])
                features = detector.extract_features(batch)
                det = detector.detections(detector.predict_levels(features), sizes, features,
                                          score_threshold=0.05)[0]
            found[int8].append(ImageDetections(det["boxes"].numpy(), det["scores"].numpy(),
                                               det["labels"].numpy()))
    truths = [ImageTruth(d.boxes[d.scores >= 0.3], d.labels[d.scores >= 0.3], np.zeros((0, 4)),
                         p.shape[2], p.shape[1]) for d, (_, p) in zip(found[False], images)]
    report = {"agreement_AP50": round(coco_metrics(truths, found[True], names)["AP50"] or 0.0, 4)}
    labelled = _labels(source, images, names)
    if labelled is not None:
        for key, int8 in (("labels_AP50_fp32", False), ("labels_AP50_int8", True)):
            ap = coco_metrics(labelled, found[int8], names)["AP50"]
            report[key] = None if ap is None else round(ap, 4)
    return report


def _labels(source: str, images, names: list[str]) -> list | None:
    """The chips' boxes from a `tile` output's annotations.json, per calibration image; None
    when there are none or an image is not a whole chip."""
    from ..training.metrics import ImageTruth

    path = Path(source) / "annotations.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    ids = {Path(im["file_name"]).name: im["id"] for im in data.get("images", [])}
    cats = {c["id"]: names.index(c["name"]) for c in data.get("categories", [])
            if c.get("name") in names}  # the model's class of the same name
    truths = []
    for name, pixels in images:
        if name not in ids:
            return None
        anns = [a for a in data.get("annotations", [])
                if a["image_id"] == ids[name] and a["category_id"] in cats]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], np.float64).reshape(-1, 4)
        labels = np.array([cats[a["category_id"]] for a in anns], np.int64)
        truths.append(ImageTruth(boxes, labels, np.zeros((0, 4)), pixels.shape[2], pixels.shape[1]))
    return truths
