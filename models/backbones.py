"""Backbones from torchvision's architectures, returning C2..C5 (strides 4, 8, 16, 32).

Start weights (`model.backbone_weights`): none (random), a local torchvision state_dict file,
or torchvision's published ImageNet weights by name (`imagenet` = the architecture's DEFAULT,
or a member name such as `IMAGENET1K_V2`) through torchvision's weights API and its cache
(`torch.hub.get_dir()/checkpoints`). A trained checkpoint holds every weight, so loading one
never reads these again.
BatchNorm is frozen by default (paper 4.1: "we freeze all the batch normalization layers").
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from . import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
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


# torchvision's weight enums per architecture
WEIGHT_ENUMS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                "resnet50": "ResNet50_Weights", "mobilenet_v2": "MobileNet_V2_Weights",
                "shufflenet_v2": "ShuffleNet_V2_X1_0_Weights"}


def is_published_weights(spec: str | None) -> bool:
    """True for `imagenet` or a torchvision weight name (upper case, e.g. IMAGENET1K_V2)."""
    return spec is not None and (spec.lower() == "imagenet"
                                 or (spec.isupper() and "/" not in spec and "." not in spec))


def published_weights(name: str, spec: str):
    """The torchvision weights enum member `spec` names for architecture `name`."""
    enum = getattr(tvm, WEIGHT_ENUMS[name])
    if spec.lower() == "imagenet":
        return enum.DEFAULT
    try:
        return enum[spec]
    except KeyError:
        raise BackboneWeightsError(f"model.backbone_weights: {spec!r} is not a weight of {name} "
                                   f"(allowed: imagenet, {', '.join(enum.__members__)}, or a "
                                   "file path)") from None


def weights_cache_file(weights) -> Path:
    """Where torchvision's loader keeps (and looks for) a published weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _load_published(net: nn.Module, name: str, spec: str) -> None:
    weights = published_weights(name, spec)
    target = weights_cache_file(weights)
    try:
        state = weights.get_state_dict(progress=False)  # reads the cache, downloads if absent
    except Exception as err:  # no network, a proxy, a corrupt file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not target.is_file():
            raise BackboneWeightsError(
                f"{name} weights {weights} are not in the torch cache and could not be "
                f"downloaded ({reason}): put {target.name} (from {weights.url}) in "
                f"{target.parent}") from None
        raise BackboneWeightsError(f"cannot read {target}: {reason}") from None
    missing, _ = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing:
        raise BackboneWeightsError(f"{target} does not fit {name}: missing {missing[:3]}...")


def _load_weights(net: nn.Module, path: str | None, name: str = "") -> None:
    if path is None:
        return
    if is_published_weights(path) and name:
        _load_published(net, name, path)
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
        _load_weights(net, weights, name)
        stages = [
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1),
            net.layer2, net.layer3, net.layer4,
        ]
        wide = name == "resnet50"
        channels = [256, 512, 1024, 2048] if wide else [64, 128, 256, 512]
    elif name == "mobilenet_v2":
        net = tvm.mobilenet_v2(weights=None)
        _load_weights(net, weights, name)
        f = net.features
        # strides: f[0:4] -> 4, f[4:7] -> 8, f[7:14] -> 16, f[14:18] -> 32 (the 1280-wide f[18] is skipped)
        stages = [f[0:4], f[4:7], f[7:14], f[14:18]]
        channels = [24, 32, 96, 320]
    elif name == "shufflenet_v2":
        net = tvm.shufflenet_v2_x1_0(weights=None)
        _load_weights(net, weights, name)
        stages = [nn.Sequential(net.conv1, net.maxpool), net.stage2, net.stage3, net.stage4]
        channels = [24, 116, 232, 464]
    else:
        raise ValueError(f"unknown backbone {name!r}")
    backbone = Backbone(stages, channels)
    if norm == "frozen_bn":
        freeze_batchnorm(backbone)
    return backbone
