"""Inference precision and the inference form of a model: bf16/fp16 autocast, folded BN.

`resolve_precision("auto", device)` picks bfloat16 on CPUs with native bf16 (AVX-512 BF16 or
AMX) and on CUDA devices that support it, float16 on other CUDA devices, float32 otherwise.
`fold_batchnorm` turns every conv followed by a batch norm (FrozenBatchNorm2d, or a
BatchNorm2d with running statistics, as in eval mode) into one conv with a bias (the BN's affine
map folded into the weights), so inference runs one op where two ran.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn
from . import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
from torchvision.ops.misc import FrozenBatchNorm2d

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> the fastest precision the device computes natively; others pass through."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@contextlib.contextmanager
def compute_context(device: torch.device, precision: str) -> Iterator[None]:
    """inference_mode, and autocast to bf16/fp16 unless the precision is fp32."""
    with torch.inference_mode():
        if precision == "fp32":
            yield
        else:
            with torch.autocast(device.type, dtype=DTYPES[precision]):
                yield


def _foldable(module: nn.Module) -> bool:
    """A batch norm that is a fixed affine map: frozen, or a BatchNorm2d with running statistics
    (its eval-mode form; folding it ends training with those statistics)."""
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return (isinstance(module, nn.BatchNorm2d) and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None)


def fold_conv_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d | nn.BatchNorm2d) -> None:
    """Fold `bn` (applied after `conv`) into conv's weight and bias, in place."""
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    shift = bias - bn.running_mean * scale  # (C_out,)
    with torch.no_grad():
        conv.weight.mul_(scale.view(-1, 1, 1, 1))  # (C_out, C_in/g, kh, kw)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every batch norm (frozen, or BatchNorm2d with running statistics) that directly
    follows a Conv2d; returns how many. For inference only: the folded module cannot train.

    Two patterns cover torchvision's backbones: consecutive children of a Sequential
    (MobileNetV2, ShuffleNetV2, ResNet downsample) and `convN` / `bnN` attribute pairs
    (ResNet stem and blocks, whose forward calls bnN right after convN).
    """
    folded = 0
    seen: set[int] = set()  # a BN reachable from two parents is folded once

    def fold(conv: nn.Conv2d, bn: nn.Module) -> None:
        nonlocal folded
        if id(bn) not in seen:
            fold_conv_bn(conv, bn)
            seen.add(id(bn))
            folded += 1

    for parent in list(module.modules()):
        names = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            keys = list(names)
            for a, b in zip(keys, keys[1:]):
                if isinstance(names[a], nn.Conv2d) and _foldable(names[b]):
                    fold(names[a], names[b])
                    setattr(parent, b, nn.Identity())
        else:
            for name, child in names.items():
                if name.startswith("conv") and isinstance(child, nn.Conv2d):
                    bn_name = "bn" + name[4:]
                    if bn_name in names and _foldable(names[bn_name]):
                        fold(child, names[bn_name])
                        setattr(parent, bn_name, nn.Identity())
    return folded
