import torch

from querydet_models.layers.matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher


def test_thresholds_and_low_quality():
    gt = torch.tensor([[0.0, 0, 10, 10], [100.0, 100, 110, 110]])
    anchors = torch.tensor([
        [0.0, 0, 10, 12],      # IoU 100/120 = 0.83 with gt0 -> foreground
        [0.0, 0, 10, 22],      # IoU 100/220 = 0.45 -> ignored
        [0.0, 0, 10, 100],     # IoU 0.1 -> background
        [100.0, 100, 110, 140],  # IoU 100/400 = 0.25 with gt1, but gt1's best -> foreground
        [500.0, 500, 510, 510],  # nothing -> background
    ])
    idx, labels = Matcher(0.4, 0.5)(gt, anchors)
    assert labels.tolist() == [FOREGROUND, IGNORE, BACKGROUND, FOREGROUND, BACKGROUND]
    assert idx[0] == 0 and idx[3] == 1


def test_no_low_quality_when_disabled():
    gt = torch.tensor([[100.0, 100, 110, 110]])
    anchors = torch.tensor([[100.0, 100, 110, 140]])
    _, labels = Matcher(0.4, 0.5, allow_low_quality_matches=False)(gt, anchors)
    assert labels.tolist() == [BACKGROUND]


def test_empty_ground_truth_all_background():
    idx, labels = Matcher()(torch.zeros(0, 4), torch.rand(7, 4) + torch.tensor([0, 0, 2, 2]))
    assert (labels == BACKGROUND).all() and idx.shape == (7,)


def random_boxes(n, gen, extent, min_side, spread):
    xy = torch.rand(n, 2, generator=gen) * extent
    return torch.cat([xy, xy + min_side + torch.rand(n, 2, generator=gen) * spread], 1)


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    gt = random_boxes(200, gen, 200, 5, 40)
    anchors = random_boxes(1000, gen, 200, 5, 40)
    a = Matcher(chunk=7)(gt, anchors)
    b = Matcher(chunk=10_000)(gt, anchors)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_pairwise_iou_equals_torchvision():
    from torchvision.ops import box_iou

    from querydet_models.layers.matcher import pairwise_iou

    gen = torch.Generator().manual_seed(1)
    a = random_boxes(30, gen, 50, 1, 20)
    b = random_boxes(70, gen, 50, 1, 20)
    assert torch.allclose(pairwise_iou(a, b), box_iou(a, b), atol=1e-6)
