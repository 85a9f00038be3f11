"""The position sets and neighbour tables of the sparse heads, read from grid maps, against the
searches and sorts they replaced (kept here as references): the same sets, the same rows, so the
sparse heads' outputs are bit-identical."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from querydet_models.query.query_infer import valid_cells
from querydet_models.layers.sparse import (TowerPlan, children_of, dilate_keys, neighbour_rows, ravel,
                                    rows_in, unravel)

OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
SHAPES = [(1, 1, 1), (1, 1, 7), (1, 6, 1), (2, 9, 11), (3, 17, 5), (1, 40, 33)]


def lookup_rows(query, table):
    """The searched row lookup: each query's row in the sorted table, or len(table) if absent."""
    if table.numel() == 0:
        return torch.full_like(query, 0)
    idx = torch.searchsorted(table, query).clamp(max=table.numel() - 1)
    return torch.where(table[idx] == query, idx, torch.full_like(idx, table.numel()))


def reference_dilate(pos, shape, radius):
    """The sort-based dilation: nine shifted copies merged by torch.unique, radius times."""
    _, height, width = shape
    for _ in range(radius):
        n, y, x = unravel(pos, shape)
        cand = []
        for dy, dx in OFFSETS:
            yy, xx = y + dy, x + dx
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            cand.append(ravel(n[inside], yy[inside], xx[inside], shape))
        pos = torch.unique(torch.cat(cand))
    return pos


def reference_children(pos, coarse, fine):
    n, y, x = unravel(pos, coarse)
    kids = []
    for i in (0, 1):
        for j in (0, 1):
            yy, xx = 2 * y + i, 2 * x + j
            inside = (yy < fine[1]) & (xx < fine[2])
            kids.append(ravel(n[inside], yy[inside], xx[inside], fine))
    return torch.unique(torch.cat(kids))


def reference_neighbours(out_pos, in_pos, shape):
    """The searched table: each neighbour's row by searchsorted over the sorted input set."""
    n, y, x = unravel(out_pos, shape)
    _, height, width = shape
    cols = []
    for dy, dx in OFFSETS:
        yy, xx = y + dy, x + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        rows = lookup_rows(ravel(n, yy.clamp(0, height - 1), xx.clamp(0, width - 1), shape), in_pos)
        cols.append(torch.where(inside, rows, torch.full_like(rows, in_pos.numel())))
    return torch.stack(cols, dim=1)


def random_set(shape, fraction, gen):
    total = shape[0] * shape[1] * shape[2]
    return torch.nonzero(torch.rand(total, generator=gen) < fraction).view(-1)


@pytest.mark.parametrize("shape", SHAPES)
def test_dilation_children_and_tables_match_the_searched_versions(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for fraction in (0.0, 0.02, 0.3, 1.0):
        keys = random_set(shape, fraction, gen)
        for radius in (0, 1, 2, 5):
            assert torch.equal(dilate_keys(keys, shape, radius), reference_dilate(keys, shape, radius))
        grown = dilate_keys(keys, shape, 1)
        assert torch.equal(neighbour_rows(keys, grown, shape), reference_neighbours(keys, grown, shape))
        other = random_set(shape, 0.5, gen)  # neighbours absent from the input set
        assert torch.equal(neighbour_rows(keys, other, shape), reference_neighbours(keys, other, shape))
        assert torch.equal(rows_in(keys, grown, shape), lookup_rows(keys, grown))
        for fine in ((shape[0], 2 * shape[1], 2 * shape[2]),
                     (shape[0], 2 * shape[1] - 1, 2 * shape[2] - 1)):
            if min(fine[1:]) > 0:
                assert torch.equal(children_of(keys, shape, fine), reference_children(keys, shape, fine))


def test_an_exact_plan_is_built_of_the_same_sets():
    shape = (2, 30, 26)
    keys = random_set(shape, 0.05, torch.Generator().manual_seed(3))
    plan = TowerPlan.exact(keys, shape, 5)
    expected = [reference_dilate(keys, shape, 5 - j) for j in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(plan.sets, expected))
    for layer in range(1, 6):
        assert torch.equal(plan.neighbours(layer),
                           reference_neighbours(plan.sets[layer], plan.sets[layer - 1], shape))
        assert torch.equal(plan.select(layer), lookup_rows(plan.sets[layer], plan.sets[layer - 1]))


def reference_cells(valid, features):
    """The float max-pool of the whole mask per level, as valid cells were computed before."""
    n, h, w = valid.shape
    mask = valid.to(torch.float32).view(n, 1, h, w)
    cells = {}
    for lvl in features.levels:
        _, lh, lw = features.shape(lvl)
        stride = 2 ** lvl
        grown = F.max_pool2d(mask, stride, stride, ceil_mode=True) if stride > 1 else mask
        grown = F.pad(grown, (0, max(0, lw - grown.shape[-1]), 0, max(0, lh - grown.shape[-2])))
        cells[lvl] = grown[:, 0, :lh, :lw].reshape(-1) > 0
    return cells


@pytest.mark.parametrize("size", [(64, 64), (100, 77), (33, 250)])
def test_valid_cells_pooled_level_by_level_match_the_whole_mask_pools(size):
    h, w = size
    gen = torch.Generator().manual_seed(h * w)
    valid = torch.rand(2, h, w, generator=gen) < 0.002  # scattered single pixels
    valid[1, : h // 3] = True  # and a block of data
    shapes = {}
    for lvl in range(2, 8):  # stride-2 stages round up, as the backbone's do
        shapes[lvl] = (2, -(-h // 2 ** lvl), -(-w // 2 ** lvl))
    shapes[2] = (2, h // 4, w // 4)  # a map one short of the ceiling
    pyramid = SimpleNamespace(levels=list(range(2, 8)), shape=lambda lvl: shapes[lvl])
    got, want = valid_cells(valid, pyramid), reference_cells(valid, pyramid)
    for lvl in pyramid.levels:
        assert torch.equal(got[lvl], want[lvl]), lvl


@pytest.mark.parametrize("shape", SHAPES)
def test_unique_positions_match_torch_unique(shape):
    from querydet_models.layers.sparse import unique_positions

    total = shape[0] * shape[1] * shape[2]
    pos = torch.randint(0, total, (3 * total,), generator=torch.Generator().manual_seed(total))
    uniq, inverse = unique_positions(pos, shape)
    want, want_inverse = torch.unique(pos, return_inverse=True)
    assert torch.equal(uniq, want) and torch.equal(inverse, want_inverse)
