"""The same checkpoint through SAHI, for `querydet bench-detect --peer sahi`.

SAHI (`pip install 'querydet[bench]'`) slices an image and runs a `DetectionModel` on each
slice. `QueryDetSahiModel` is that wrapper for a querydet checkpoint: each slice goes through the
model's own `forward_inference` (its dense or CSQ mode, in its precision), so the two pipelines
differ only in what surrounds the network: reading, slicing, batching, merging, nodata.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..core.errors import QueryDetError
from ..reading.inputs import is_video


def _sahi_base():
    try:
        from sahi.models.base import DetectionModel
    except ImportError:
        raise QueryDetError("--peer sahi needs SAHI: pip install 'querydet[bench]'") from None
    return DetectionModel


def make_sahi_model(model: Any, class_names: list[str], device: torch.device,
                    confidence: float, mode: str = "dense"):
    """A SAHI DetectionModel running `model` (a loaded querydet detector) on each slice."""
    base = _sahi_base()

    class QueryDetSahiModel(base):  # type: ignore[misc, valid-type]
        def load_model(self) -> None:  # the model is handed in ready
            self.set_model(model)

        def set_model(self, m: Any, **kwargs: Any) -> None:
            self.model = m
            self.category_mapping = {str(i): n for i, n in enumerate(class_names)}

        def perform_inference(self, image: np.ndarray) -> None:
            pixels = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)
            pixels = pixels.to(device=device, dtype=torch.float32) / 255.0  # (3, H, W)
            self._original_predictions = self.model.forward_inference([pixels], mode=mode)

        def _create_object_prediction_list_from_original_predictions(
                self, shift_amount_list=[[0, 0]], full_shape_list=None) -> None:
            from sahi.prediction import ObjectPrediction

            shift = shift_amount_list[0] if shift_amount_list else [0, 0]
            if shift and not isinstance(shift[0], (list, tuple)):
                shift = list(shift)
            else:
                shift = list(shift[0]) if shift else [0, 0]
            full = None
            if full_shape_list:
                full = full_shape_list[0]
                full = list(full[0]) if isinstance(full[0], (list, tuple)) else list(full)
            det = self._original_predictions[0]
            preds = []
            for box, score, label in zip(det["boxes"].float().cpu().numpy(),
                                         det["scores"].float().cpu().numpy(),
                                         det["labels"].cpu().numpy()):
                if score < self.confidence_threshold:
                    continue
                preds.append(ObjectPrediction(
                    bbox=[float(v) for v in box], category_id=int(label),
                    category_name=class_names[int(label)], score=float(score),
                    shift_amount=shift, full_shape=full))
            self._object_prediction_list_per_image = [preds]

    return QueryDetSahiModel(model=model, device=str(device), confidence_threshold=confidence,
                             load_at_init=True)


def sahi_detect(raster: str, model: Any, class_names: list[str], device: torch.device, *,
                tile_size: int, overlap: int, confidence: float, postprocess: str,
                metric: str, threshold: float, mode: str = "dense"
                ) -> tuple[list[dict[str, Any]], float]:
    """Detections of SAHI on the whole raster (read whole, as SAHI does) and the seconds taken,
    reading included."""
    import rasterio
    from sahi.predict import get_sliced_prediction

    t0 = time.perf_counter()
    with rasterio.open(raster) as src:
        image = src.read([1, 2, 3]).transpose(1, 2, 0)  # (H, W, 3) uint8
    sahi_model = make_sahi_model(model, class_names, device, confidence, mode)
    result = get_sliced_prediction(
        image, sahi_model, slice_height=tile_size, slice_width=tile_size,
        overlap_height_ratio=overlap / tile_size, overlap_width_ratio=overlap / tile_size,
        perform_standard_pred=False, postprocess_type=postprocess,
        postprocess_match_metric=metric, postprocess_match_threshold=threshold, verbose=0,
        force_postprocess_type=True)
    seconds = time.perf_counter() - t0
    dets = [{"bbox": [float(v) for v in p.bbox.to_xyxy()], "score": float(p.score.value),
             "class_id": int(p.category.id)} for p in result.object_prediction_list]
    return dets, seconds


def main(argv: list[str] | None = None) -> None:
    """SAHI as its users run it, as a script: `python -m querydet_cli.bench.sahi_peer RASTER WEIGHTS OUT
    [--precision fp32|bf16] [--slice 1024] [--overlap 128] [--confidence 0.3] [--device cpu|cuda]`;
    the model loaded by querydet's own loader (BN folded, channels_last), dense, SAHI's
    GREEDYNMM / IoS 0.5; COCO-style results (xyxy bbox, score, class_id) written as JSON. For
    whole-process timing (`bench-detect --peer sahi --whole-process`)."""
    import argparse
    import json

    from ..runtimes.loading import load_model

    p = argparse.ArgumentParser(prog="python -m querydet_cli.bench.sahi_peer")
    p.add_argument("raster")
    p.add_argument("weights")
    p.add_argument("out")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--slice", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--confidence", type=float, default=0.3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args(argv)
    model, cfg = load_model(a.weights, a.device)
    model.set_precision(a.precision)
    if is_video(a.raster):
        dets = sahi_video(a.raster, model, list(cfg.names()), torch.device(a.device),
                          a.slice, a.overlap, a.confidence)
    else:
        dets, _ = sahi_detect(a.raster, model, list(cfg.names()), torch.device(a.device),
                              tile_size=a.slice, overlap=a.overlap, confidence=a.confidence,
                              postprocess="GREEDYNMM", metric="IOS", threshold=0.5)
    with open(a.out, "w") as fh:
        json.dump(dets, fh)


def sahi_video(video: str, model: Any, class_names: list[str], device: torch.device,
               tile_size: int, overlap: int, confidence: float) -> list[dict[str, Any]]:
    """SAHI's own video prediction (`sahi.predict.predict(source=VIDEO)`: OpenCV reads the
    frames, each is sliced and predicted) with querydet's weights, as its users run it without
    drawing. It keeps no predictions of a video unless asked to pickle each frame's: this is
    for timing the whole process, so it returns none."""
    import tempfile

    from sahi.predict import predict

    sahi_model = make_sahi_model(model, class_names, device, confidence, "dense")
    with tempfile.TemporaryDirectory() as tmp:
        predict(detection_model=sahi_model, source=video, slice_height=tile_size,
                slice_width=tile_size, overlap_height_ratio=overlap / tile_size,
                overlap_width_ratio=overlap / tile_size, novisual=True,
                postprocess_type="GREEDYNMM", postprocess_match_metric="IOS",
                postprocess_match_threshold=0.5, force_postprocess_type=True,
                project=tmp, name="video", verbose=0, no_standard_prediction=True)
    return []


if __name__ == "__main__":
    main()
