import torch

from tests.conftest import tiny_model


def _targets(n_empty=2):
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
            for _ in range(n_empty)]


def test_empty_ground_truth_gives_zero_box_and_query_loss():
    model = tiny_model().train()
    losses = model(torch.rand(2, 3, 96, 128), _targets())
    assert losses["loss_box"].item() == 0.0
    assert losses["loss_query"].item() == 0.0
    assert losses["loss_cls"].item() > 0.0


def test_losses_with_objects_are_finite_and_backpropagate():
    model = tiny_model().train()
    targets = [{"boxes": torch.tensor([[10.0, 12, 22, 30], [50, 40, 90, 80]]),
                "labels": torch.tensor([0, 2])}] + _targets(1)
    losses = model(torch.rand(2, 3, 96, 128), targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.query_head.convs[-1].weight.grad.abs().sum() > 0


def test_level_weights_rebalance_linearly():
    targets = [{"boxes": torch.tensor([[10.0, 12, 22, 30]]), "labels": torch.tensor([1])}]
    img = torch.rand(1, 3, 64, 64)
    a = tiny_model(level_weights=(1.0,) * 6).train()(img, targets)
    b = tiny_model(level_weights=(2.0,) * 6).train()(img, targets)
    for key in a:
        assert torch.allclose(2 * a[key], b[key], rtol=1e-5), key


def test_giou_box_loss_option():
    model = tiny_model(box_loss="giou").train()
    targets = [{"boxes": torch.tensor([[10.0, 12, 22, 30]]), "labels": torch.tensor([1])}]
    losses = model(torch.rand(1, 3, 64, 64), targets)
    assert losses["loss_box"] > 0
