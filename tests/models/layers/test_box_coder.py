import math

import torch

from querydet_models.layers.box_coder import BoxCoder


def test_encode_hand_computed():
    coder = BoxCoder()
    d = coder.encode(torch.tensor([[0.0, 0, 10, 20]]), torch.tensor([[2.0, 4, 22, 24]]))
    # anchor centre (5, 10) 10x20, box centre (12, 14) 20x20
    assert torch.allclose(d, torch.tensor([[0.7, 0.2, math.log(2.0), 0.0]]))


def test_round_trip_with_weights():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen) * 100
    anchors = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=gen) * 50], 1)
    xy2 = torch.rand(50, 2, generator=gen) * 100
    boxes = torch.cat([xy2, xy2 + 1 + torch.rand(50, 2, generator=gen) * 50], 1)
    assert torch.allclose(coder.decode(coder.encode(anchors, boxes), anchors), boxes, atol=1e-4)


def test_decode_clamps_huge_scales():
    coder = BoxCoder()
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0, 10, 10]]))
    assert torch.isfinite(out).all()
