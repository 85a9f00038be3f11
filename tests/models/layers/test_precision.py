"""Inference precision: folded BN, precision choice, and sparse == dense per precision."""

import copy

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from querydet_models.layers.backbones import build_backbone
from querydet_models.layers.precision import (cpu_has_native_bf16, fold_batchnorm,
                                       resolve_precision)
from tests.conftest import randomize, tiny_model, with_random_heads
from tests.models.detectors.test_querydet import BACKENDS, features, rel_err

# sparse vs dense at the keys, relative to the largest dense output: float32 keeps the 1e-4 bound;
# bfloat16 has an 8-bit mantissa (relative step 2^-8 = 3.9e-3) and each of the tower's five
# layers rounds once, so sums taken in a different order may differ by a few steps: 3e-2.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


@torch.no_grad()
def _stats(module, seed):
    """Non-trivial BN statistics, so folding has something to fold."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2"])
def test_folding_bn_keeps_outputs(name, norm):
    """Frozen BN (the R50 configs) and trainable BN in eval mode (the bundled MobileNetV2 model)
    both fold away with the same outputs."""
    torch.manual_seed(0)
    net = build_backbone(name, norm=norm).eval()
    _stats(net, 1)
    randomize(net, seed=2)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        before = net(x)
        folded_net = copy.deepcopy(net)
        count = fold_batchnorm(folded_net)
        after = folded_net(x)
    assert count > 0
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))
                   for m in folded_net.modules())
    for k in before:
        scale = before[k].abs().max()
        assert float((before[k] - after[k]).abs().max() / scale) < 1e-4, k  # float32 rounding


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("int8", cpu)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_equals_dense_at_keys_in_each_precision(precision, backend):
    model = with_random_heads(tiny_model())
    model.prepare_inference(precision)
    assert model.precision == precision
    images = torch.rand(2, 3, 160, 192, generator=torch.Generator().manual_seed(3))
    with model.compute():
        feats, _ = features(model, images)
        reference = model.predict_levels(feats, mode="ccq", sigma=0.0)
        outs = model.predict_levels(feats, mode="csq", sigma=0.5, context="exact",
                                    backend=backend, sparse_max_fraction=1.0)
    assert all(o.cls.dtype == torch.float32 for o in outs)  # post-processing gets float32
    keys = [o.positions.numel() for o in outs]
    full = [r.positions.numel() for r in reference]
    assert 0 < keys[0] < full[0]
    assert rel_err(outs, reference) < TOLERANCE[precision]


def test_bf16_detections_close_to_fp32():
    model = with_random_heads(tiny_model())
    model.prepare_inference("fp32")
    images = torch.rand(1, 3, 160, 192, generator=torch.Generator().manual_seed(4))
    fp32 = model.forward_inference(images, mode="dense")[0]
    model.set_precision("bf16")
    bf16 = model.forward_inference(images, mode="dense")[0]
    assert bf16["boxes"].dtype == torch.float32 and fp32["boxes"].shape[0] > 0
    # the highest-scoring detection is found in both, at nearly the same place
    top = fp32["boxes"][0]
    ious = torch.tensor([float(_iou(top, b)) for b in bf16["boxes"][:5]])
    assert ious.max() > 0.9


def _iou(a, b):
    x1, y1 = torch.max(a[0], b[0]), torch.max(a[1], b[1])
    x2, y2 = torch.min(a[2], b[2]), torch.min(a[3], b[3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_one_math_mode_for_convolutions_and_matmuls_and_the_old_one_back():
    """fp32 rows compute IEEE products in cuDNN and in the sparse GEMMs alike, tf32 rows TF32 in
    both; PyTorch's own defaults (cuDNN TF32, matmul not) come back afterwards. No GPU needed:
    the switches are process settings."""
    import torch

    from querydet_models.layers.precision import compute_context, math_of, resolve_precision

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cuda = torch.device("cuda")
    with compute_context(cuda, "tf32"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == \
            (True, True)
        assert not torch.is_autocast_enabled("cuda")
    with compute_context(torch.device("cpu"), "fp32"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == \
            (False, False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert resolve_precision("tf32", torch.device("cpu")) == "fp32"
    assert resolve_precision("tf32", cuda) == "tf32"
    assert math_of("tf32") == "fp32 numbers, TF32 products"
