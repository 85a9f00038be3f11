"""Detection metrics: the COCO protocol through pycocotools, and the VisDrone-DET protocol.

VisDrone (the official toolkit's rules): detections and ground truth whose area lies at least
half inside ignored regions are dropped; each image keeps its 500 highest-scoring detections;
AP is COCO's 101-point interpolated precision over IoU 0.50:0.95, computed per class and then
averaged over the classes, each class weighing the same. (The popular Python port weights
classes by the number of images they appear in; we do not.) AR@k keeps each image's k best
detections over all classes.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

from ..core.boxes import box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class ImageTruth:
    boxes: np.ndarray  # (G, 4) xyxy
    labels: np.ndarray  # (G,)
    ignore: np.ndarray  # (I, 4) xyxy ignored regions
    width: int
    height: int


@dataclass
class ImageDetections:
    boxes: np.ndarray  # (M, 4) xyxy
    scores: np.ndarray  # (M,)
    labels: np.ndarray  # (M,)


def ignored_fraction(boxes: np.ndarray, regions: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fraction of each box's area covered by the union of `regions`, at pixel resolution."""
    if len(boxes) == 0 or len(regions) == 0:
        return np.zeros(len(boxes))
    mask = np.zeros((height + 1, width + 1), np.int32)
    for x1, y1, x2, y2 in np.round(regions).astype(int):
        mask[max(y1, 0) + 1:max(min(y2, height), 0) + 1, max(x1, 0) + 1:max(min(x2, width), 0) + 1] = 1
    integral = mask.cumsum(0).cumsum(1)  # integral[y, x] = ignored pixels above-left of (y, x)
    b = np.round(boxes).astype(int)
    x1 = np.clip(b[:, 0], 0, width)
    y1 = np.clip(b[:, 1], 0, height)
    x2 = np.clip(b[:, 2], 0, width)
    y2 = np.clip(b[:, 3], 0, height)
    covered = integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]
    area = np.maximum((x2 - x1) * (y2 - y1), 1)
    return covered / area


def _average_precision(scores: np.ndarray, tps: np.ndarray, num_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections (any order) with tp flags."""
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(tps[order])
    fp = np.cumsum(~tps[order])
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    values = np.array([precision[i] if i < len(precision) else 0.0 for i in idx])
    return float(values.mean())


def _match(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray, threshold: float
           ) -> np.ndarray:
    """Greedy matching by descending score: True where a detection matches an unmatched gt."""
    order = np.argsort(-det_scores, kind="mergesort")
    iou = box_iou(det_boxes[order], gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    tp = np.zeros(len(det_boxes), bool)
    for k, row in enumerate(iou):
        row = np.where(taken, -1.0, row)
        if len(row) and row.max() >= threshold:
            j = int(row.argmax())
            taken[j] = True
            tp[order[k]] = True
    return tp


def match_and_score(truths: list[ImageTruth], dets: list[ImageDetections], num_classes: int,
                    max_dets: int, per_class_limit: bool = False) -> dict[str, np.ndarray]:
    """AP per (IoU threshold, class) and recall per (threshold, class); NaN where no ground truth.

    `per_class_limit`: keep the `max_dets` best detections per image and class (COCO's rule)
    instead of per image over all classes (VisDrone's rule).
    """
    ap = np.full((len(IOU_THRESHOLDS), num_classes), np.nan)
    rec = np.full((len(IOU_THRESHOLDS), num_classes), np.nan)
    for c in range(num_classes):
        num_gt = sum(int((t.labels == c).sum()) for t in truths)
        if num_gt == 0:
            continue
        for ti, thr in enumerate(IOU_THRESHOLDS):
            all_scores, all_tp = [], []
            for t, d in zip(truths, dets):
                keep = _top(d, max_dets, c if per_class_limit else None)
                sel = keep[d.labels[keep] == c]
                tp = _match(d.boxes[sel], d.scores[sel], t.boxes[t.labels == c], thr)
                all_scores.append(d.scores[sel])
                all_tp.append(tp)
            scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
            tps = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
            ap[ti, c] = _average_precision(scores, tps, num_gt) if len(scores) else 0.0
            rec[ti, c] = tps.sum() / num_gt
    return {"ap": ap, "recall": rec}


def _top(d: ImageDetections, k: int, label: int | None) -> np.ndarray:
    idx = np.arange(len(d.scores)) if label is None else np.nonzero(d.labels == label)[0]
    order = idx[np.argsort(-d.scores[idx], kind="mergesort")]
    return order[:k]


def drop_ignored(truths: list[ImageTruth], dets: list[ImageDetections], fraction: float = 0.5
                 ) -> tuple[list[ImageTruth], list[ImageDetections]]:
    """Remove ground truth and detections at least `fraction` inside ignored regions."""
    out_t, out_d = [], []
    for t, d in zip(truths, dets):
        keep_g = ignored_fraction(t.boxes, t.ignore, t.width, t.height) < fraction
        keep_d = ignored_fraction(d.boxes, t.ignore, t.width, t.height) < fraction
        out_t.append(ImageTruth(t.boxes[keep_g], t.labels[keep_g], t.ignore, t.width, t.height))
        out_d.append(ImageDetections(d.boxes[keep_d], d.scores[keep_d], d.labels[keep_d]))
    return out_t, out_d


def visdrone_metrics(truths: list[ImageTruth], dets: list[ImageDetections], num_classes: int
                     ) -> dict[str, float]:
    """AP, AP50, AP75 (500 detections per image) and AR@1/10/100/500, classes weighted equally."""
    truths, dets = drop_ignored(truths, dets)
    main = match_and_score(truths, dets, num_classes, 500)
    ap = main["ap"]
    out = {"AP": float(np.nanmean(ap)), "AP50": float(np.nanmean(ap[0])),
           "AP75": float(np.nanmean(ap[5]))}
    for k in (1, 10, 100, 500):
        recall = main["recall"] if k == 500 else match_and_score(truths, dets, num_classes, k)["recall"]
        out[f"AR{k}"] = float(np.nanmean(recall))
    return {k: (v if np.isfinite(v) else 0.0) for k, v in out.items()}


def coco_metrics(truths: list[ImageTruth], dets: list[ImageDetections], class_names: list[str],
                 max_dets: int = 100) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl from pycocotools; ignored regions become crowd boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (t, d) in enumerate(zip(truths, dets), start=1):
        images.append({"id": i, "width": t.width, "height": t.height})
        for box, label in zip(t.boxes, t.labels):
            anns.append(_coco_ann(len(anns) + 1, i, int(label) + 1, box, crowd=0))
        for box in t.ignore:  # class-agnostic ignored region: a crowd box of every class
            for c in range(len(class_names)):
                anns.append(_coco_ann(len(anns) + 1, i, c + 1, box, crowd=1))
        for box, score, label in zip(d.boxes, d.scores, d.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": i, "category_id": int(label) + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c + 1, "name": n} for c, n in enumerate(class_names)]}
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return {k: 0.0 for k in keys}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    # every figure at the requested maxDets (pycocotools' summarize() computes AP at 100 whatever
    # maxDets holds, and reports -1 when 100 is not among them)
    figures = [coco_ap(ev, max_dets), coco_ap(ev, max_dets, iou=0.5), coco_ap(ev, max_dets, iou=0.75),
               coco_ap(ev, max_dets, area="small"), coco_ap(ev, max_dets, area="medium"),
               coco_ap(ev, max_dets, area="large")]
    # -1 where an area range holds no ground truth: that is "no value", not 0
    return {k: (float(v) if v >= 0 else None) for k, v in zip(keys, figures)}


def coco_ap(ev, max_dets: int, iou: float | None = None, area: str = "all") -> float:
    """Mean precision of an accumulated COCOeval at one maxDets, IoU threshold (None: 0.5:0.95)
    and area range; -1 when nothing was evaluated there."""
    precision = ev.eval["precision"]  # (T iou, R recall, K class, A area, M maxDets)
    m = list(ev.params.maxDets).index(max_dets)
    a = list(ev.params.areaRngLbl).index(area)
    if iou is not None:
        t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
        precision = precision[t:t + 1]
    values = precision[:, :, :, a, m]
    values = values[values > -1]
    return float(values.mean()) if values.size else -1.0


def _coco_ann(ann_id: int, image_id: int, category: int, box, crowd: int) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"id": ann_id, "image_id": image_id, "category_id": category,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd}
