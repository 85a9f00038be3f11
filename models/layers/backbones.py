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
from .. import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
from torchvision import models as tvm
from torchvision.ops.misc import FrozenBatchNorm2d

from ..backbone_specs import BACKBONE_SPECS
from ..errors import ModelError


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


def is_published_weights(spec: str | None) -> bool:
    """True for `imagenet` or a torchvision weight name (upper case, e.g. IMAGENET1K_V2)."""
    return spec is not None and (spec.lower() == "imagenet"
                                 or (spec.isupper() and "/" not in spec and "." not in spec))


def published_weights(name: str, spec: str):
    """The torchvision weights enum member `spec` names for architecture `name`."""
    enum = getattr(tvm, BACKBONE_SPECS[name].weights_enum)
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
    """Build a torchvision architecture (`backbone_specs.BACKBONE_SPECS`) split into the stages
    that give C2..C5; each stage's channels are read off the network by one small forward."""
    if name not in BACKBONE_SPECS:
        raise ValueError(f"unknown backbone {name!r}")
    spec = BACKBONE_SPECS[name]
    net = getattr(tvm, spec.architecture)(weights=None)
    _load_weights(net, weights, name)
    stages = [_stage(net, parts) for parts in spec.stages]
    backbone = Backbone(stages, stage_channels(stages))
    if norm == "frozen_bn":
        freeze_batchnorm(backbone)
    return backbone


def _stage(net: nn.Module, parts: tuple) -> nn.Module:
    """One stage from its parts: a module itself, or a Sequential of several."""
    modules = [getattr(net, p) if isinstance(p, str) else getattr(net, p[0])[p[1]:p[2]]
               for p in parts]
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


@torch.no_grad()
def stage_channels(stages: list[nn.Module], side: int = 64) -> list[int]:
    """The channels each stage puts out, from a forward pass of a small image (in eval mode,
    so no statistic changes)."""
    modes = [s.training for s in stages]
    x = torch.zeros(1, 3, side, side)
    channels = []
    try:
        for stage in stages:
            x = stage.eval()(x)
            channels.append(int(x.shape[1]))
    finally:
        for stage, mode in zip(stages, modes):
            stage.train(mode)
    return channels
