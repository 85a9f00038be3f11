"""CSQ's busy-tile decision: when the queries cover too much, the finer levels run dense."""

import torch

from tests.conftest import tiny_model, with_random_heads
from tests.models.test_querydet import features


def _levels(model, images, **kw):
    feats, _ = features(model, images)
    return model.predict_levels(feats, **kw)


def test_busy_tile_goes_dense_before_any_sparse_work(monkeypatch):
    model = with_random_heads(tiny_model())
    images = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(5))
    import querydet_models.query_infer as qi

    def no_plans(*args, **kwargs):
        raise AssertionError("a sparse plan was built for a busy tile")

    monkeypatch.setattr(qi.TowerPlan, "exact", no_plans)
    # sigma 0: every start-level position is queried
    busy = _levels(model, images, mode="csq", sigma=0.0, sparse_max_fraction=0.3)
    dense = _levels(model, images, mode="dense")
    fine = [o for o in busy if o.level < 4]
    assert fine and all(o.decided_dense and o.is_dense for o in fine)
    for b, d in zip(busy, dense):
        assert torch.allclose(b.cls, d.cls, atol=1e-5) and torch.allclose(b.box, d.box, atol=1e-5)


def test_quiet_tile_stays_sparse():
    model = with_random_heads(tiny_model())
    images = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(5))
    quiet = _levels(model, images, mode="csq", sigma=0.6, sparse_max_fraction=0.3)
    fine = [o for o in quiet if o.level < 4]
    assert not any(o.decided_dense for o in fine)
    assert any(not o.is_dense for o in fine)


def test_decision_is_off_when_the_sparse_path_is_forced():
    model = with_random_heads(tiny_model())
    images = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(5))
    forced = _levels(model, images, mode="csq", sigma=0.0, sparse_max_fraction=1.0)
    assert not any(o.decided_dense for o in forced)
