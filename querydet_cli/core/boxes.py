"""How much two sets of xyxy boxes overlap, on the CLI's numpy side: IoU, or IoS (intersection
over the smaller box, which says a fragment lies inside a whole). The merge, the metrics, the
review page and the benches all read overlaps here. (The model's training matcher keeps its own
IoU in torch, on the model's device: models/matcher.py; the models package never imports the
CLI.)"""

from __future__ import annotations

import numpy as np


def overlap_matrix(a: np.ndarray, b: np.ndarray, ios: np.ndarray | bool = False) -> np.ndarray:
    """(len(a), len(b)) IoU, or IoS where `ios` (a bool, or (len(a), len(b)) bools) is True."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih  # (len(a), len(b))
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    smaller = np.minimum(area_a[:, None], area_b[None, :])
    return np.where(ios, inter / np.maximum(smaller, 1e-9), inter / np.maximum(union, 1e-9))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    return overlap_matrix(a, b, False)
