"""CSQ's busy-tile decision: when the queries cover too much, the finer levels run dense."""

import torch

from tests.conftest import tiny_model, with_random_heads
from tests.models.detectors.test_querydet import features


def _levels(model, images, **kw):
    feats, _ = features(model, images)
    return model.predict_levels(feats, **kw)


def test_busy_tile_goes_dense_before_any_sparse_work(monkeypatch):
    model = with_random_heads(tiny_model())
    images = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(5))
    import querydet_models.query.query_infer as qi

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


def _narrowing(monkeypatch, start_rows: int):
    """Queries that fire on the first `start_rows` rows of P4 and on one key of P3."""
    import querydet_models.query.query_infer as qi

    real = qi.QueryInference._queried

    def queried(self, out, among=None):
        found = real(self, out, among)
        if out.level == 4:
            _, _, w = out.shape
            return out.positions[out.positions < start_rows * w]
        if out.level == 3:
            return found[:1]
        return found

    monkeypatch.setattr(qi.QueryInference, "_queried", queried)


def test_a_busy_level_whose_queries_narrow_lets_the_next_level_run_sparse(monkeypatch):
    model = with_random_heads(tiny_model())
    images = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(5))
    _narrowing(monkeypatch, start_rows=3)  # P4 is 10 x 12: three rows grown by 3 cover 0.6
    out = {o.level: o for o in _levels(model, images, mode="csq", sigma=0.0,
                                       sparse_max_fraction=0.3)}
    assert out[3].decided_dense and out[3].is_dense and out[3].query is not None
    assert not out[2].decided_dense and not out[2].is_dense
    assert out[2].positions.numel() == 4  # the one P3 query's 2 x 2 children
    dense = {o.level: o for o in _levels(model, images, mode="dense")}
    keys = out[2].positions
    assert torch.allclose(out[2].cls, dense[2].cls[keys], atol=1e-5)
    assert torch.allclose(out[2].box, dense[2].box[keys], atol=1e-5)


def test_a_tile_busy_beyond_doubt_runs_every_finer_level_dense_without_queries(monkeypatch):
    import querydet_models.query.query_infer as qi

    model = with_random_heads(tiny_model())
    images = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(5))
    asked = []
    real = qi.QueryInference._queried
    monkeypatch.setattr(qi.QueryInference, "_queried",
                        lambda self, out, among=None: asked.append(out.level) or real(self, out, among))
    out = {o.level: o for o in _levels(model, images, mode="csq", sigma=0.0,
                                       sparse_max_fraction=0.3)}
    assert all(out[l].decided_dense and out[l].query is None for l in (2, 3))
    assert asked == [4]  # no query head below the start level: they were not needed
