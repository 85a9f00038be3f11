import math

import pytest
import torch

from querydet_models.config import InferenceConfig, ModelConfig
from querydet_models.detectors.querydet import build_querydet


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """He-normal weights and N(0, 0.1) biases on every conv, so head outputs vary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"backbone": "resnet18", "fpn_channels": 32, "num_classes": 3,
                         **overrides})
    return build_querydet(cfg, InferenceConfig()).eval()


def with_random_heads(m):
    """A one-stage model (RetinaNet, FCOS) with random cls / box / query towers whose predictors
    are scaled so scores spread over (0, 1) instead of saturating."""
    randomize(m.head)
    randomize(m.query_head, seed=1)
    with torch.no_grad():
        for tower in (m.head.cls, m.head.box, m.query_head):
            tower.convs[-1].weight.mul_(0.05)
    return m


@pytest.fixture(scope="session")
def model():
    return with_random_heads(tiny_model())


@pytest.fixture(scope="session")
def images():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 160, 192, generator=gen)
