"""Queries fire only on cells that hold data: a nodata collar is not an object to look for."""

import torch

from querydet_models.query.query_infer import valid_cells


def _levels(model, images, **mode):
    with torch.inference_mode():
        batch, _ = model.preprocess(list(images))
        features = model.extract_features(batch)
        return model.predict_levels(features, **mode), features


def test_no_query_fires_where_a_cell_has_no_valid_pixel(model, images):
    valid = torch.zeros(2, 160, 192, dtype=torch.bool)
    valid[0, :, :70] = True  # image 0: data in the west; image 1: a diagonal collar
    ys, xs = torch.meshgrid(torch.arange(160), torch.arange(192), indexing="ij")
    valid[1] = xs + ys < 150
    levels, features = _levels(model, images, mode="csq", sigma=0.0, sparse_max_fraction=1.0,
                               valid=valid)
    cells = valid_cells(valid, features)
    start = model.inference.start_level
    by_level = {lv.level: lv for lv in levels}
    finer = by_level[start - 1]
    n, h, w = finer.shape
    img = finer.positions // (h * w)
    y, x = (finer.positions % (h * w)) // w, finer.positions % w
    _, ch, cw = by_level[start].shape
    parents = img * ch * cw + (y // 2) * cw + (x // 2)
    assert finer.positions.numel() > 0
    assert bool(cells[start][parents].all())  # every key's parent cell holds data
    # without the mask, sigma 0 queries every cell, collar included
    plain, _ = _levels(model, images, mode="csq", sigma=0.0, sparse_max_fraction=1.0)
    assert {lv.level: lv for lv in plain}[start - 1].positions.numel() > finer.positions.numel()


def test_a_full_mask_changes_nothing(model, images):
    mode = dict(mode="csq", sigma=0.15)
    plain, _ = _levels(model, images, **mode)
    masked, _ = _levels(model, images, **mode, valid=torch.ones(2, 160, 192, dtype=torch.bool))
    for a, b in zip(plain, masked):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.cls, b.cls)


def test_valid_cells_cover_any_valid_pixel():
    from types import SimpleNamespace

    valid = torch.zeros(1, 16, 16, dtype=torch.bool)
    valid[0, 9, 3] = True  # one pixel
    shapes = {2: (1, 4, 4), 3: (1, 2, 2)}
    pyramid = SimpleNamespace(levels=[2, 3], shape=lambda lvl: shapes[lvl])
    cells = valid_cells(valid, pyramid)
    assert cells[2].view(4, 4).nonzero().tolist() == [[2, 0]]
    assert cells[3].view(2, 2).nonzero().tolist() == [[1, 0]]
