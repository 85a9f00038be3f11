import math

import pytest
import torch

from querydet_models.detectors.fcos import (centerness_target, fcos_targets, level_points, regression_ranges)
from querydet_models.layers.sparse import spconv_available
from tests.conftest import tiny_model, with_random_heads
from tests.models.detectors.test_querydet import sparse_and_dense

BACKENDS = ["torch"] + (["spconv"] if spconv_available() else [])


@pytest.fixture(scope="module")
def fcos():
    return with_random_heads(tiny_model(detector="fcos", head_convs=2))


def test_regression_ranges_follow_fcos_and_give_query_scale():
    assert regression_ranges((3, 4, 5, 6, 7), 4.0) == {
        3: (0.0, 64.0), 4: (64.0, 128.0), 5: (128.0, 256.0), 6: (256.0, 512.0), 7: (512.0, math.inf)}
    r = regression_ranges((2, 3, 4, 5, 6, 7), 4.0)
    assert r[2] == (0.0, 32.0) and r[3] == (32.0, 64.0) and r[4] == (64.0, 128.0)
    m = tiny_model(detector="fcos")
    # paper 3.2: s_l is the minimum regression range on P_l for anchor-free detectors
    assert m.query_scale(3) == r[3][0] and m.query_scale(4) == r[4][0]


def test_centerness_target_by_hand():
    ltrb = torch.tensor([[10.0, 10, 10, 10], [5, 10, 15, 10], [1, 2, 9, 8]])
    expected = torch.tensor([1.0, math.sqrt(5 / 15), math.sqrt(1 / 9 * 2 / 8)])
    assert torch.allclose(centerness_target(ltrb), expected)


def test_targets_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    levels, scale, radius = (2, 3, 4, 5, 6, 7), 4.0, 1.5
    ranges = regression_ranges(levels, scale)
    pts, strides, rng = [], [], []
    for lvl in levels:
        p = level_points(lvl, -(-160 // 2 ** lvl), -(-160 // 2 ** lvl))
        pts.append(p)
        strides.append(torch.full((p.shape[0],), 2.0 ** lvl))
        rng.append(torch.tensor(ranges[lvl]).expand(p.shape[0], 2))
    pts, strides, rng = torch.cat(pts), torch.cat(strides), torch.cat(rng)
    xy = torch.rand(12, 2, generator=gen) * 120
    wh = torch.rand(12, 2, generator=gen) * 60 + 4
    boxes = torch.cat([xy, xy + wh], dim=1)
    labels = torch.randint(0, 3, (12,), generator=gen)
    cls, ltrb = fcos_targets(pts, strides, rng, {"boxes": boxes, "labels": labels}, 3, radius)
    for p in range(pts.shape[0]):
        x, y = pts[p].tolist()
        best, best_area = None, math.inf
        for g, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            d = [x - x1, y - y1, x2 - x, y2 - y]
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            r = radius * float(strides[p])
            ok = (min(d) > 0 and abs(x - cx) < r and abs(y - cy) < r
                  and rng[p, 0] <= max(d) <= rng[p, 1])
            area = (x2 - x1) * (y2 - y1)
            if ok and area < best_area:
                best, best_area = g, area
        if best is None:
            assert cls[p] == 3
        else:
            assert cls[p] == labels[best]
            x1, y1, x2, y2 = boxes[best].tolist()
            assert torch.allclose(ltrb[p], torch.tensor([x - x1, y - y1, x2 - x, y2 - y]))
    assert (cls < 3).sum() >= 12  # every object got at least one point


def test_empty_image_gives_zero_box_ctr_query_losses():
    m = tiny_model(detector="fcos", head_convs=1).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = m(torch.rand(2, 3, 64, 64), [empty, empty])
    assert losses["loss_box"] == 0 and losses["loss_ctr"] == 0 and losses["loss_query"] == 0
    assert losses["loss_cls"] > 0


def test_ignore_regions_are_not_background():
    pts = level_points(3, 8, 8)
    n = pts.shape[0]
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "ignore": torch.tensor([[0.0, 0.0, 20.0, 20.0]])}
    cls, _ = fcos_targets(pts, torch.full((n,), 8.0), torch.tensor([0.0, 1e9]).expand(n, 2),
                          target, 3, 1.5)
    inside = (pts[:, 0] <= 20) & (pts[:, 1] <= 20)
    assert (cls[inside] == -1).all() and (cls[~inside] == 3).all()


@pytest.mark.parametrize("mode,backend", [("csq", b) for b in BACKENDS] + [("cq", "torch"),
                                                                          ("ccq", "torch")])
def test_sparse_fcos_heads_equal_dense_at_keys(fcos, images, mode, backend):
    outs, _ = sparse_and_dense(fcos, images, mode, backend, sigma=0.5)
    assert outs[0].box.shape[1] == 5 and outs[0].cls.shape[1] == 3  # ltrb + centre-ness, K


def test_fcos_sigma_zero_csq_gives_dense_detections(fcos, images):
    dense = fcos.forward_inference(images, mode="dense")
    csq = fcos.forward_inference(images, mode="csq", sigma=0.0, sparse_max_fraction=1.0)
    for d, c in zip(dense, csq):
        assert d["boxes"].shape[0] > 0
        assert torch.equal(d["labels"], c["labels"])
        assert torch.allclose(d["boxes"], c["boxes"], atol=1e-3)
        assert torch.allclose(d["scores"], c["scores"], atol=1e-5)


def test_fcos_baseline_runs_dense_only():
    base = tiny_model(detector="fcos", levels=(3, 4, 5, 6, 7), level_weights=(1.0,) * 5,
                      query_levels=())
    assert not base.has_query and base.query_head is None
    dets = base.forward_inference(torch.rand(1, 3, 64, 96), mode="csq")
    assert dets[0]["boxes"].shape[1] == 4
