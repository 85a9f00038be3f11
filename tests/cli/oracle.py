"""A stand-in detector for pipeline tests: it sees exactly the painted objects of a tile.

Each object is a solid rectangle whose first-band value (1..255) is its id; the oracle reports
one box per id visible in the tile, cut by the tile edge like a real detector's view would be.
It implements the public methods the producer (TileProducer) calls on a model.
"""

import numpy as np
import rasterio
import torch

from querydet_models.config import InferenceConfig


class OracleModel:
    """A detector (models' `InferenceDetector` protocol) that finds exactly the painted
    rectangles; no weights, no padding. It computes one tile at a time (`own_threads`: the
    producer starts no worker threads for it), so its call counter counts batches in order."""

    size_divisibility = 1
    runtime = "torch"
    own_threads = True
    num_classes = 255

    def __init__(self, fail_after: int | None = None):
        self.inference = InferenceConfig()
        self.calls = 0
        self.fail_after = fail_after

    def resolved_precision(self, precision):
        return "fp32"

    def set_precision(self, precision="auto"):
        return "fp32"

    def weights_digest(self) -> str:
        return "oracle"

    def compute(self, precision=None):
        return torch.inference_mode()

    def preprocess(self, images):
        return list(images), [tuple(im.shape[1:]) for im in images]

    def extract_features(self, batch):
        return batch

    def predict_levels(self, feats, **kw):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        self._batch = feats
        return []

    def inference_for(self, score_threshold=None):
        return self.inference

    def detections(self, levels, sizes, features=None, score_threshold=None):
        out = []
        for im in self._batch:
            ids = torch.round(im[0] * 255).to(torch.int64)
            boxes, labels = [], []
            for v in torch.unique(ids).tolist():
                if v == 0:
                    continue
                ys, xs = torch.nonzero(ids == v, as_tuple=True)
                boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
                labels.append(v % 3)
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.full((len(boxes),), 0.9),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
        return out


def paint(width, height, objects, dtype="uint8", scale=1):
    """(3, H, W) image with object i (1-based) painted as value i * scale in band 1."""
    data = np.zeros((3, height, width), dtype)
    for i, (x1, y1, x2, y2) in enumerate(objects, start=1):
        data[0, y1:y2, x1:x2] = i * scale
        data[1, y1:y2, x1:x2] = 200 * scale // 255 if scale > 1 else 200
    return data


def write_tif(path, data, transform=None, crs="EPSG:32633", tiled=True, **extra):
    count, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count,
               "dtype": data.dtype, "crs": crs if transform is not None else None,
               "transform": transform if transform is not None else rasterio.Affine.identity()}
    if tiled:
        profile.update(tiled=True, blockxsize=128, blockysize=128)
    profile.update(extra)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def parse_ndjson(text):
    """Detections of NDJSON output (GeoJSON Features) as flat dicts with a pixel `bbox`."""
    import json

    rows = []
    for line in text.splitlines():
        if line.strip():
            f = json.loads(line)
            rows.append({**f["properties"], "bbox": f["properties"]["bbox_px"],
                         "feature_geometry": f["geometry"]})
    return rows


def read_ndjson(path):
    from pathlib import Path

    return parse_ndjson(Path(path).read_text())
