import math

import torch

from querydet_models.layers.anchors import AnchorGenerator


def test_cell_anchors_hand_computed():
    gen = AnchorGenerator((2, 3, 4, 5, 6, 7))
    cells = gen.cell_anchors(2)
    assert cells.shape == (9, 4)
    # first size (16 px), ratios 0.5, 1, 2 (h / w), area kept at 16**2
    w = 16 / math.sqrt(0.5)
    h = 16 * math.sqrt(0.5)
    assert torch.allclose(cells[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    assert torch.allclose(cells[1], torch.tensor([-8.0, -8.0, 8.0, 8.0]))
    # third octave size on P2 is 16 * 2**(2/3)
    s = 16 * 2 ** (2 / 3)
    assert torch.allclose(cells[7], torch.tensor([-s / 2, -s / 2, s / 2, s / 2]))


def test_base_sizes_16_to_512():
    gen = AnchorGenerator((2, 3, 4, 5, 6, 7))
    assert [gen.base_size(lvl) for lvl in range(2, 8)] == [16, 32, 64, 128, 256, 512]


def test_anchors_centred_on_position_centres():
    gen = AnchorGenerator((3,))
    a = gen.anchors_at(3, torch.tensor([2]), torch.tensor([5]))  # stride 8
    centre = (a[0, :, :2] + a[0, :, 2:]) / 2
    assert torch.allclose(centre, torch.tensor([[44.0, 20.0]]).expand(9, 2))


def test_grid_anchors_row_major():
    gen = AnchorGenerator((4,))
    grid = gen.grid_anchors(4, 2, 3)
    assert grid.shape == (2 * 3 * 9, 4)
    # position index 4 (y=1, x=1), ratio 1 of size 64: centred at (24, 24)
    assert torch.allclose(grid[4 * 9 + 1], torch.tensor([-8.0, -8.0, 56.0, 56.0]))
