import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from querydet_models.detectors.faster_rcnn import ROI_LEVELS, roi_support
from querydet_models.layers.sparse import spconv_available
from tests.conftest import randomize, tiny_model
from tests.models.detectors.test_querydet import features, sparse_and_dense

BACKENDS = ["torch"] + (["spconv"] if spconv_available() else [])


def frcnn_model(**overrides):
    settings = dict(detector="faster_rcnn", levels=(2, 3, 4, 5, 6), level_weights=(1.0,) * 5,
                    anchor_octave_scales=1, iou_thresholds=(0.3, 0.7), head_convs=3,
                    roi_head_channels=32, query_gamma=1.2)
    return tiny_model(**{**settings, **overrides})


@pytest.fixture(scope="module")
def frcnn():
    m = frcnn_model()
    randomize(m.rpn)
    with torch.no_grad():  # 1x1 branches scaled so scores spread over (0, 1)
        for conv in (m.rpn.objectness, m.rpn.deltas, m.rpn.query):
            conv.weight.mul_(0.3)
    return m


def test_rpn_has_three_trunk_convs_and_three_branches(frcnn):
    branches = frcnn.head_branches(True)
    assert set(branches) == {"cls", "box", "query"}
    trunk = {id(b.tower) for b in branches.values()}
    assert len(trunk) == 1 and branches["cls"].tower.depth == 3  # paper 4.4: 3 conv layers
    assert frcnn.levels == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("mode,backend", [("csq", b) for b in BACKENDS] + [("cq", "torch"),
                                                                          ("ccq", "torch")])
def test_sparse_rpn_equals_dense_at_keys(frcnn, images, mode, backend):
    outs, _ = sparse_and_dense(frcnn, images, mode, backend, sigma=0.25)
    assert outs[0].cls.shape[1] == 3 and outs[0].box.shape[1] == 12  # A objectness, A*4 deltas
    assert outs[1].query is not None


def test_sparse_maps_pool_like_dense_maps(frcnn, images):
    feats, sizes = features(frcnn, images)
    gen = torch.Generator().manual_seed(5)
    rois = []
    for _ in range(2):
        xy = torch.rand(40, 2, generator=gen) * 150
        wh = torch.rand(40, 2, generator=gen) ** 2 * 200 + 0.5  # tiny to large: every RoI level
        rois.append(torch.cat([xy, xy + wh], dim=1))
    pool = MultiScaleRoIAlign([str(lvl) for lvl in ROI_LEVELS], 7, 2)
    mapper_levels = []
    sparse = {}
    for lvl in ROI_LEVELS:
        pos = roi_support(rois, frcnn.roi_mapper, lvl, feats.shape(lvl))
        mapper_levels.append(pos.numel())
        from querydet_models.layers.fpn import Pyramid
        fresh = Pyramid(frcnn.fpn, frcnn.backbone(frcnn.preprocess(images)[0]))
        sparse[str(lvl)] = fresh.sparse_map(lvl, pos)
    dense = {str(lvl): feats.dense(lvl) for lvl in ROI_LEVELS}
    assert 0 < mapper_levels[0] < feats.shape(2)[0] * feats.shape(2)[1] * feats.shape(2)[2]
    a = pool(dense, rois, sizes)
    b = pool(sparse, rois, sizes)
    assert torch.allclose(a, b, atol=1e-5)
    assert (sparse["2"] == 0).any()  # genuinely partial


def test_csq_sigma_zero_gives_dense_detections(frcnn, images):
    dense = frcnn.forward_inference(images, mode="dense")
    csq = frcnn.forward_inference(images, mode="csq", sigma=0.0, sparse_max_fraction=1.0)
    for d, c in zip(dense, csq):
        assert d["boxes"].shape[0] > 0
        assert torch.equal(d["labels"], c["labels"])
        assert torch.allclose(d["boxes"], c["boxes"], atol=1e-2)
        assert torch.allclose(d["scores"], c["scores"], atol=1e-4)


def test_csq_reduces_proposals(frcnn, images):
    feats, sizes = features(frcnn, images)
    dense = frcnn.proposals(frcnn.predict_levels(feats, mode="dense"), sizes)
    csq = frcnn.proposals(frcnn.predict_levels(feats, mode="csq", sigma=0.25,
                                               sparse_max_fraction=1.0), sizes)
    assert sum(p.shape[0] for p in csq) < sum(p.shape[0] for p in dense)


def test_empty_image_losses():
    m = frcnn_model().train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = m(torch.rand(2, 3, 64, 64), [empty, empty])
    assert losses["loss_rpn_box"] == 0 and losses["loss_query"] == 0 and losses["loss_box"] == 0
    assert losses["loss_objectness"] > 0 and losses["loss_cls"] > 0


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    m = frcnn_model().train()
    target = {"boxes": torch.tensor([[10.0, 12, 30, 40], [60, 20, 70, 28]]),
              "labels": torch.tensor([1, 2])}
    images = torch.rand(1, 3, 96, 96)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(8):
        torch.manual_seed(1)  # same RPN / RoI sampling every step
        loss = sum(m(images, [target]).values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


def test_baseline_rpn_has_one_conv_and_no_query():
    base = frcnn_model(head_convs=1, query_levels=())
    assert not base.has_query and base.rpn.query is None
    assert base.head_branches(True)["cls"].tower.depth == 1
    dets = base.eval().forward_inference(torch.rand(1, 3, 64, 96), mode="csq")
    assert set(dets[0]) == {"boxes", "scores", "labels", "levels"}
