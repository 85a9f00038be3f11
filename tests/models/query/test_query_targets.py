import math

import torch

from querydet_models.query.query_targets import query_target_map


def brute_force(boxes, level, height, width, s_l):
    """Eq. 2-3 evaluated position by position with Python loops."""
    stride = 2 ** level
    small = []
    for x1, y1, x2, y2 in boxes.tolist():
        if math.sqrt((x2 - x1) * (y2 - y1)) < s_l:
            small.append(((x1 + x2) / 2, (y1 + y2) / 2))
    out = torch.zeros(height, width)
    for y in range(height):
        for x in range(width):
            px, py = (x + 0.5) * stride, (y + 0.5) * stride
            d = min((math.hypot(px - cx, py - cy) for cx, cy in small), default=math.inf)
            out[y, x] = 1.0 if d < s_l else 0.0
    return out


def test_matches_brute_force_on_several_levels():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=gen) * 250
    wh = 2 + torch.rand(30, 2, generator=gen) * 90  # some small, some large on each level
    boxes = torch.cat([xy, xy + wh], 1)
    for level, s_l, h, w in [(3, 32.0, 33, 35), (4, 64.0, 17, 18), (2, 16.0, 40, 30)]:
        got = query_target_map(boxes, level, h, w, s_l, chunk=7)
        assert torch.equal(got, brute_force(boxes, level, h, w, s_l)), level


def test_large_objects_and_no_objects_give_empty_map():
    big = torch.tensor([[0.0, 0, 100, 100]])  # scale 100 >= 64 on P4
    assert query_target_map(big, 4, 8, 8, 64.0).sum() == 0
    assert query_target_map(torch.zeros(0, 4), 3, 8, 8, 32.0).sum() == 0


def test_disc_radius_is_four_positions():
    box = torch.tensor([[60.0, 60, 68, 68]])  # centre (64, 64), small on P3
    t = query_target_map(box, 3, 16, 16, 32.0)
    # position (7, 7) has centre (60, 60): distance 5.66 < 32 -> 1; (3, 7) centre (60, 28): 36.2 -> 0
    assert t[7, 7] == 1 and t[3, 7] == 0
    assert t.sum() == brute_force(box, 3, 16, 16, 32.0).sum()
