import numpy as np
import pytest

from querydet_cli.training.metrics import (ImageDetections, ImageTruth, coco_metrics, match_and_score,
                                  visdrone_metrics)


def truth(boxes, labels, ignore=(), w=200, h=200):
    return ImageTruth(np.array(boxes, float).reshape(-1, 4), np.array(labels, int),
                      np.array(ignore, float).reshape(-1, 4), w, h)


def dets(boxes, scores, labels):
    return ImageDetections(np.array(boxes, float).reshape(-1, 4), np.array(scores, float),
                           np.array(labels, int))


def test_visdrone_hand_computed_ap():
    # two objects; detections: hit (0.9), false (0.8), hit (0.7)
    # precision/recall: (1, .5), (.5, .5), (.667, 1) -> interpolated: 1.0 up to recall .5,
    # .667 above it -> 101-point AP = (51 * 1 + 50 * 2/3) / 101
    t = [truth([[10, 10, 30, 30], [100, 100, 120, 130]], [0, 0])]
    d = [dets([[10, 10, 30, 30], [150, 150, 170, 170], [100, 100, 120, 130]], [0.9, 0.8, 0.7],
              [0, 0, 0])]
    m = visdrone_metrics(t, d, num_classes=1)
    expected = (51 + 50 * 2 / 3) / 101
    assert m["AP"] == pytest.approx(expected, abs=1e-9)
    assert m["AP50"] == pytest.approx(expected) and m["AP75"] == pytest.approx(expected)
    assert m["AR1"] == pytest.approx(0.5)
    assert m["AR10"] == pytest.approx(1.0) and m["AR500"] == pytest.approx(1.0)


def test_visdrone_ignored_regions_remove_false_positives():
    t = [truth([[10, 10, 30, 30]], [0], ignore=[[100, 100, 200, 200]])]
    clean = [dets([[10, 10, 30, 30]], [0.5], [0])]
    with_fp = [dets([[10, 10, 30, 30], [120, 120, 140, 140]], [0.5, 0.9], [0, 0])]
    assert visdrone_metrics(t, clean, 1)["AP"] == pytest.approx(1.0)
    assert visdrone_metrics(t, with_fp, 1)["AP"] == pytest.approx(1.0)  # inside the ignore region
    t_no_ignore = [truth([[10, 10, 30, 30]], [0])]
    assert visdrone_metrics(t_no_ignore, with_fp, 1)["AP"] < 0.6


def test_visdrone_classes_weigh_equally_not_by_image_count():
    # class 0: one image, found -> AP 1; class 1: three images, never found -> AP 0
    t = [truth([[10, 10, 30, 30]], [0])] + [truth([[10, 10, 30, 30]], [1]) for _ in range(3)]
    d = [dets([[10, 10, 30, 30]], [0.9], [0])] + [dets([], [], []) for _ in range(3)]
    assert visdrone_metrics(t, d, 2)["AP"] == pytest.approx(0.5)


def test_coco_mode_of_our_matcher_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    truths, detections = [], []
    for _ in range(6):
        xy = rng.uniform(0, 150, (8, 2))
        gt = np.concatenate([xy, xy + rng.uniform(5, 45, (8, 2))], 1)
        labels = rng.integers(0, 3, 8)
        truths.append(truth(gt, labels))
        jitter = gt + rng.normal(0, 3, gt.shape)
        fp_xy = rng.uniform(0, 150, (5, 2))
        fp = np.concatenate([fp_xy, fp_xy + 20], 1)
        boxes = np.concatenate([jitter, fp])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        detections.append(dets(boxes, rng.uniform(0, 1, 13),
                               np.concatenate([labels, rng.integers(0, 3, 5)])))
    ours = match_and_score(truths, detections, 3, max_dets=100, per_class_limit=True)
    ref = coco_metrics(truths, detections, ["a", "b", "c"], max_dets=100)
    assert np.nanmean(ours["ap"]) == pytest.approx(ref["AP"], abs=1e-6)
    assert np.nanmean(ours["ap"][0]) == pytest.approx(ref["AP50"], abs=1e-6)


def test_coco_metrics_perfect_and_empty():
    t = [truth([[10, 10, 30, 30], [50, 50, 100, 100]], [0, 1])]
    perfect = [dets([[10, 10, 30, 30], [50, 50, 100, 100]], [0.9, 0.8], [0, 1])]
    m = coco_metrics(t, perfect, ["a", "b"])
    assert m["AP"] == pytest.approx(1.0) and m["APs"] == pytest.approx(1.0)
    assert m["APl"] is None  # no large ground truth: no value rather than a fake 0
    assert coco_metrics(t, [dets([], [], [])], ["a", "b"])["AP"] == 0.0
