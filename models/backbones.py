"""Backbones from torchvision's architectures, returning C2..C5 (strides 4, 8, 16, 32).

Weights are random or come from a local torchvision state_dict file: nothing is downloaded.
BatchNorm is frozen by default (paper 4.1: "we freeze all the batch normalization layers").
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import ModelError


class BackboneWeightsError(ModelError):
    """The local backbone weights file is missing, unreadable or does not fit the architecture."""


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a FrozenBatchNorm2d holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class Backbone(nn.Module):
    """Runs four stages in sequence and returns their outputs as c2..c5."""

    def __init__(self, stages: list[nn.Module], channels: list[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(channels)  # channels of c2, c3, c4, c5

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[f"c{i + 2}"] = x
        return out


def _load_weights(net: nn.Module, path: str | None) -> None:
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt pickle, wrong format
        raise BackboneWeightsError(f"cannot read backbone weights {path}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.startswith("classifier.")]
    if missing:
        raise BackboneWeightsError(
            f"backbone weights {path} do not fit this architecture: missing {missing[:3]}...")
    del unexpected  # classifier heads of ImageNet checkpoints are expected and unused


def build_backbone(name: str, weights: str | None = None, norm: str = "frozen_bn") -> Backbone:
    """Build a torchvision architecture split into the stages that give C2..C5."""
    if name in ("resnet18", "resnet34", "resnet50"):
        net = getattr(tvm, name)(weights=None)
        _load_weights(net, weights)
        stages = [
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1),
            net.layer2, net.layer3, net.layer4,
        ]
        wide = name == "resnet50"
        channels = [256, 512, 1024, 2048] if wide else [64, 128, 256, 512]
    elif name == "mobilenet_v2":
        net = tvm.mobilenet_v2(weights=None)
        _load_weights(net, weights)
        f = net.features
        # strides: f[0:4] -> 4, f[4:7] -> 8, f[7:14] -> 16, f[14:18] -> 32 (the 1280-wide f[18] is skipped)
        stages = [f[0:4], f[4:7], f[7:14], f[14:18]]
        channels = [24, 32, 96, 320]
    elif name == "shufflenet_v2":
        net = tvm.shufflenet_v2_x1_0(weights=None)
        _load_weights(net, weights)
        stages = [nn.Sequential(net.conv1, net.maxpool), net.stage2, net.stage3, net.stage4]
        channels = [24, 116, 232, 464]
    else:
        raise ValueError(f"unknown backbone {name!r}")
    backbone = Backbone(stages, channels)
    if norm == "frozen_bn":
        freeze_batchnorm(backbone)
    return backbone
