"""Post-processing: the per-level candidate budget grows with the level map, the detection
budget with the image."""

import dataclasses

import torch

from querydet_models.detectors.postprocess import BUDGET_PIXELS, BUDGET_POSITIONS, detection_budget, level_budget
from querydet_models.query.query_infer import LevelOutput
from tests.conftest import tiny_model


def test_level_budget_is_topk_up_to_the_reference_map_and_proportional_beyond():
    assert level_budget(1000, (1, 64, 64)) == 1000
    assert level_budget(1000, (1, 128, 128)) == 1000
    assert level_budget(1000, (1, 256, 256)) == 4000  # P2 of a 1024 px tile
    assert level_budget(1000, (1, 232, 232)) == -(-1000 * 232 * 232 // BUDGET_POSITIONS)


def _level(model, height, width, hot):
    """A P2 output where each position in `hot` has every anchor of class 0 at logit 3 (score
    0.95), each decoding to the same 20 px box around the position: many strong candidates per
    object, as a real head gives, that NMS reduces to one."""
    A, K = model.anchors.num_anchors, model.num_classes
    n = height * width
    cls = torch.full((n, A * K), -10.0)
    cls.view(n, A, K)[hot, :, 0] = 3.0
    box = torch.zeros(n, A, 4)
    ys, xs = hot // width, hot % width
    anchors = model.anchors.anchors_at(2, ys, xs)  # (h, A, 4)
    cx, cy = (anchors[:, :, 0] + anchors[:, :, 2]) / 2, (anchors[:, :, 1] + anchors[:, :, 3]) / 2
    target = torch.stack([cx - 10, cy - 10, cx + 10, cy + 10], -1)
    box[hot] = model.box_coder.encode(anchors.reshape(-1, 4), target.reshape(-1, 4)).view(-1, A, 4)
    return LevelOutput(2, (1, height, width), torch.arange(n), cls, box.view(n, A * 4), None,
                       0.0, 0.0)


def test_many_objects_on_a_big_map_are_not_cut_by_the_candidate_cap():
    """40 far-apart objects on a 256 x 256 P2 map, each with one candidate per anchor: with a
    fixed cap of 100 candidates at most 12 objects would survive; the map-sized budget (400)
    keeps all 40."""
    model = tiny_model()
    model.inference = dataclasses.replace(model.inference, topk_per_level=100,
                                          max_detections=1000, score_threshold=0.3)
    hot = torch.tensor([y * 256 + x for y in range(8, 256, 32) for x in range(8, 256, 52)])[:40]
    assert len(hot) == 40
    det = model.detections([_level(model, 256, 256, hot)], [(1024, 1024)])[0]
    assert len(det["scores"]) == 40
    # on a map no larger than the reference, the budget is topk_per_level as before
    small = torch.tensor([y * 128 + x for y in range(8, 128, 20) for x in range(8, 128, 24)])
    det = model.detections([_level(model, 128, 128, small)], [(512, 512)])[0]
    assert len(det["scores"]) <= -(-100 // model.anchors.num_anchors) < len(small)


def test_detection_budget_is_max_detections_up_to_a_1024_tile_and_proportional_beyond():
    assert detection_budget(300, (1024, 1024)) == 300
    assert detection_budget(300, (928, 1024)) == 300
    assert detection_budget(300, (2048, 2048)) == 1200
    assert detection_budget(300, (1760, 1760)) == -(-300 * 1760 * 1760 // BUDGET_PIXELS)


def test_a_big_tile_keeps_more_objects_than_max_detections():
    """60 far-apart objects on a 2048 px image whose model keeps at most 20 detections: the
    image-sized budget (80) keeps all 60; the same map on a 1024 px image keeps 20."""
    model = tiny_model()
    model.inference = dataclasses.replace(model.inference, topk_per_level=100_000,
                                          max_detections=20, score_threshold=0.3)
    hot = torch.tensor([y * 256 + x for y in range(8, 256, 24) for x in range(8, 256, 40)])[:60]
    assert len(hot) == 60
    level = _level(model, 256, 256, hot)
    assert len(model.detections([level], [(2048, 2048)])[0]["scores"]) == 60
    assert len(model.detections([level], [(1024, 1024)])[0]["scores"]) == 20


def test_the_batched_device_postprocess_gives_the_same_detections(model, images):
    """The GPU's whole-batch postprocess (detections_from_levels_batched), run on CPU tensors:
    the same boxes, scores, labels and levels in the same order as image by image, for sparse
    and dense levels, candidate caps that bind, and detection budgets that bind."""
    from querydet_models.detectors.postprocess import (detections_from_levels,
                                                       detections_from_levels_batched)

    torch.manual_seed(0)
    batch, sizes = model.preprocess(images)
    feats = model.extract_features(batch)
    for mode, threshold, topk, max_dets in (("csq", 0.05, 1000, 100), ("dense", 0.3, 50, 20),
                                            ("csq", 0.99, 1000, 100)):
        outs = model.predict_levels(feats, mode=mode, sigma=0.5, sparse_max_fraction=1.0)
        args = (outs, sizes, model.anchors, model.box_coder, model.num_classes, threshold, topk,
                0.5, max_dets)
        one, batched = detections_from_levels(*args), detections_from_levels_batched(*args)
        assert len(one) == len(batched) == len(images)
        for a, b in zip(one, batched):
            for key in ("boxes", "scores", "labels", "levels"):
                assert torch.equal(a[key], b[key]), (mode, key)
        found = sum(len(d["scores"]) for d in one)
        assert found > 0 or threshold == 0.99
