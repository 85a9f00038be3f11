"""Conv + ReLU / ReLU6 as one oneDNN op in the inference form: the same values, the same state
dict, and the plain path wherever the fused op does not apply."""

import copy

import pytest
import torch
from torch import nn

from querydet_models.layers.backbones import build_backbone
from querydet_models.layers.precision import (ConvActivation, compute_context, fold_batchnorm,
                                       fuse_conv_activations)
from tests.conftest import randomize


def _inference_backbone(name):
    net = build_backbone(name, norm="bn").eval()
    randomize(net, seed=4)
    fold_batchnorm(net)
    return net.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "shufflenet_v2"])
def test_fused_backbone_gives_the_same_maps(name, precision):
    net = _inference_backbone(name)
    fused = copy.deepcopy(net)
    count = fuse_conv_activations(fused)
    # MobileNetV2: every Conv2dNormActivation but the projections; ResNet: the stem only (its
    # blocks call one shared ReLU from forward, not from a Sequential); ShuffleNetV2: the stem
    # and the 1x1 convs of each block's branches
    assert count == {"mobilenet_v2": 34, "resnet18": 1, "shufflenet_v2": 36}[name]
    assert sum(isinstance(m, ConvActivation) for m in fused.modules()) == count
    assert not any(isinstance(m, (nn.ReLU6,)) for m in fused.modules())
    x = torch.rand(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    with compute_context(torch.device("cpu"), precision):
        before, after = net(x), fused(x)
    for k in before:
        assert after[k].dtype == before[k].dtype
        if name == "shufflenet_v2" and precision == "fp32":
            # some of its small fp32 convs do not go to oneDNN in PyTorch's own conv2d: the
            # same convolution summed in another order, equal to float32 rounding
            scale = before[k].abs().max()
            assert float((before[k] - after[k]).abs().max() / scale) < 1e-5, k
        else:  # the bundled MobileNetV2, a ResNet stem, and everything in bf16: bit for bit
            assert torch.equal(before[k], after[k]), k


def test_the_state_dict_keeps_its_names_and_tensors():
    net = _inference_backbone("mobilenet_v2")
    keys = list(net.state_dict())
    fuse_conv_activations(net)
    assert list(net.state_dict()) == keys


def test_the_fused_op_runs_on_the_cpu_and_the_plain_path_where_it_cannot(monkeypatch):
    # a layer this small does not go to oneDNN in PyTorch's own conv2d, so the two paths sum in
    # another order here: close, not equal (equality is tested on the backbones above)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last)
    layer = ConvActivation(conv, nn.ReLU6())
    x = (torch.randn(1, 4, 9, 9) * 10).contiguous(memory_format=torch.channels_last)
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise

    def spy(*args):
        calls.append(args[7])
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", spy)
    want = torch.clamp(conv(x), 0, 6)
    with torch.inference_mode():
        assert torch.allclose(layer(x), want, atol=1e-5)
    assert calls == ["hardtanh"]
    got = layer(x)  # a gradient is wanted: conv, then the activation
    assert calls == ["hardtanh"] and got.requires_grad and torch.equal(got.detach(), want.detach())
    with torch.no_grad():
        relu = ConvActivation(conv, nn.ReLU())
        assert torch.allclose(relu(x), torch.relu(conv(x)), atol=1e-5)
    assert calls == ["hardtanh", "relu"]


def test_the_model_inference_form_fuses_its_backbone():
    from tests.conftest import tiny_model

    model = tiny_model()
    model.prepare_inference("fp32")
    assert model.fused_activations > 0
    assert any(isinstance(m, ConvActivation) for m in model.backbone.modules())
