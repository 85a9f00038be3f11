import pytest
import torch
from torch.nn import functional as F

from querydet_models.layers.heads import ConvTower
from querydet_models.layers.sparse import (TowerPlan, children_of, conv_weight_as_gemm, conv_weight_as_spconv,
                           dilate_keys, gather_positions, neighbour_rows, ravel, run_tower_sparse,
                           spconv_available, unravel)
from tests.conftest import randomize

BACKENDS = ["torch"] + (["spconv"] if spconv_available() else [])


def brute_dilate(pos, shape, r):
    N, H, W = shape
    out = set()
    for p in pos.tolist():
        n, y, x = p // (H * W), (p // W) % H, p % W
        for yy in range(y - r, y + r + 1):
            for xx in range(x - r, x + r + 1):
                if 0 <= yy < H and 0 <= xx < W:
                    out.add((n * H + yy) * W + xx)
    return sorted(out)


def test_dilate_keys_matches_brute_force():
    shape = (2, 9, 11)
    keys = torch.tensor([0, 5, 60, 98, 99 + 50, 2 * 99 - 1])
    for r in (0, 1, 3):
        assert dilate_keys(keys, shape, r).tolist() == brute_dilate(keys, shape, r)


def test_children_of_eq1_and_clipping():
    coarse, fine = (1, 3, 3), (1, 5, 6)  # the fine map is one row short of 2x
    kids = children_of(torch.tensor([ravel(torch.tensor(0), torch.tensor(2), torch.tensor(1), coarse)]),
                       coarse, fine)
    n, y, x = unravel(kids, fine)
    assert list(zip(y.tolist(), x.tolist())) == [(4, 2), (4, 3)]  # row 5 does not exist


def test_neighbour_rows_zero_row_for_missing():
    shape = (1, 3, 3)
    table = torch.tensor([0, 1, 4])
    nbr = neighbour_rows(torch.tensor([0]), table, shape)
    # offsets (-1,-1) .. (1,1) around (0,0): off-map -> 3, (0,0)->0, (0,1)->1, (1,0) absent -> 3, (1,1)->2
    assert nbr.tolist() == [[3, 3, 3, 3, 0, 1, 3, 3, 2]]


def test_weight_layouts():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    g = conv_weight_as_gemm(conv)
    s = conv_weight_as_spconv(conv)
    assert g.shape == (36, 6) and s.shape == (6, 3, 3, 4)
    # row (ky, kx, c_in) of the GEMM matrix is weight[:, c_in, ky, kx]
    assert torch.equal(g[(1 * 3 + 2) * 4 + 3], conv.weight[:, 3, 1, 2])
    assert torch.equal(s[:, 1, 2, 3], conv.weight[:, 3, 1, 2])


def dense_tower(tower, x):
    for conv in tower.convs[:-1]:
        x = F.relu(conv(x))
    return tower.convs[-1](x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_plan_equals_dense_tower_at_keys(backend):
    torch.manual_seed(0)
    tower = ConvTower(16, 4, 7)
    randomize(tower)
    x = torch.randn(2, 16, 13, 17)
    dense = dense_tower(tower, x)  # (N, 7, H, W)
    shape = (2, 13, 17)
    # keys at corners, borders and the interior of both images
    keys = torch.unique(torch.tensor([0, 16, 12 * 17, 13 * 17 - 1, 6 * 17 + 8,
                                      13 * 17 + 3, 2 * 13 * 17 - 1, 13 * 17 + 7 * 17 + 2]))
    plan = TowerPlan.exact(keys, shape, tower.depth)
    out = run_tower_sparse(tower, gather_positions(x, plan.sets[0]), plan, backend)
    n, y, xx = unravel(keys, shape)
    ref = dense[n, :, y, xx]
    assert out.shape == ref.shape
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("context", [1, 5])
def test_submanifold_backends_agree_and_differ_from_dense(context):
    torch.manual_seed(1)
    tower = ConvTower(8, 4, 5)
    randomize(tower)
    x = torch.randn(1, 8, 20, 20)
    keys = torch.tensor([5 * 20 + 5, 5 * 20 + 6, 14 * 20 + 12])
    plan = TowerPlan.submanifold(keys, (1, 20, 20), tower.depth, context)
    out = run_tower_sparse(tower, gather_positions(x, plan.sets[0]), plan, "torch")
    ref = dense_tower(tower, x)[0, :, keys // 20, keys % 20].T
    assert (out - ref).abs().max() > 1e-3  # inactive neighbours count as zero: not the dense result
    if spconv_available():
        plan2 = TowerPlan.submanifold(keys, (1, 20, 20), tower.depth, context)
        other = run_tower_sparse(tower, gather_positions(x, plan2.sets[0]), plan2, "spconv")
        assert torch.allclose(out, other, rtol=1e-4, atol=1e-4)


def test_empty_keys_give_empty_rows():
    tower = ConvTower(8, 2, 3)
    plan = TowerPlan.exact(torch.zeros(0, dtype=torch.int64), (1, 6, 6), tower.depth)
    out = run_tower_sparse(tower, torch.zeros(0, 8), plan, "torch")
    assert out.shape == (0, 3)


def test_exact_plan_layer_sets_shrink_by_one_ring():
    keys = torch.tensor([4 * 10 + 4])
    plan = TowerPlan.exact(keys, (1, 10, 10), 5)
    # layer j of 5 is computed on the keys dilated by 5 - j, clipped to the 10x10 map
    assert [s.numel() for s in plan.sets] == [100, 81, 49, 25, 9, 1]


def test_sparse_fpn_rows_equal_dense_fpn():
    from collections import OrderedDict

    from querydet_models.layers.fpn import FPN, Pyramid

    torch.manual_seed(0)
    fpn = FPN([8, 12, 16, 20], 16, 2)
    randomize(fpn)
    feats = OrderedDict(c2=torch.randn(2, 8, 32, 40), c3=torch.randn(2, 12, 16, 20),
                        c4=torch.randn(2, 16, 8, 10), c5=torch.randn(2, 20, 4, 5))
    dense = fpn(feats)
    lazy = Pyramid(fpn, feats)
    lazy.dense(4)  # as in CSQ: coarse levels dense, fine levels at rows only
    for level in (2, 3):
        shape = lazy.shape(level)
        assert shape == (2, *dense[level].shape[2:])
        pos = torch.unique(torch.randint(0, shape[0] * shape[1] * shape[2], (60,)))
        pos = torch.cat([pos, torch.tensor([0, shape[0] * shape[1] * shape[2] - 1])]).unique()
        rows = lazy.rows(level, pos)
        ref = gather_positions(dense[level], pos)
        assert torch.allclose(rows, ref, rtol=1e-4, atol=1e-5)
        assert not lazy.is_dense(level)  # no dense map of a queried level was built
