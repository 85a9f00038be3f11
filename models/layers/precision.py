"""Inference precision and the inference form of a model: bf16/fp16 autocast, folded BN.

`resolve_precision("auto", device)` picks bfloat16 on CPUs with native bf16 (AVX-512 BF16 or
AMX) and on CUDA devices that support it, float16 on other CUDA devices, float32 otherwise.
`fold_batchnorm` turns every conv followed by a batch norm (FrozenBatchNorm2d, or a
BatchNorm2d with running statistics, as in eval mode) into one conv with a bias (the BN's affine
map folded into the weights), so inference runs one op where two ran. `fuse_conv_activations`
then makes each conv followed by a ReLU or ReLU6 one oneDNN convolution with the activation as
its post-op on the CPU, so the activation is not a separate pass over the map.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from .. import _torchvision  # noqa: F401  (first: torchvision without torch._dynamo)
from torchvision.ops.misc import FrozenBatchNorm2d

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> the fastest precision the device computes natively; tf32 (float32 numbers,
    TensorFloat-32 products) is fp32 off CUDA; others pass through."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "tf32" and device.type != "cuda":
        return "fp32"
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@contextlib.contextmanager
def math_mode(tf32: bool) -> Iterator[None]:
    """One math mode for every float32 product on CUDA: TensorFloat-32 for both cuDNN's
    convolutions and the matmuls (the sparse heads' GEMMs), or IEEE float32 for both. PyTorch's
    defaults differ (cuDNN convolutions in TF32, matmuls not), which would put the dense and the
    sparse heads in different modes; the previous settings come back on exit."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def math_of(precision: str) -> str:
    """What a precision computes in, as a row of `querydet bench` states it."""
    return {"fp32": "fp32 (IEEE products)", "tf32": "fp32 numbers, TF32 products",
            "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[precision]


@contextlib.contextmanager
def compute_context(device: torch.device, precision: str) -> Iterator[None]:
    """inference_mode in one math mode (`math_mode`), and autocast to bf16/fp16 unless the
    precision is fp32 or tf32."""
    with torch.inference_mode(), math_mode(precision == "tf32"):
        if precision in ("fp32", "tf32"):
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


# activations oneDNN applies inside a convolution: (its post-op name, the op's scalars)
_POST_OPS = {nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0])}


class ConvActivation(nn.Conv2d):
    """A Conv2d and the ReLU or ReLU6 after it, as one op: on the CPU oneDNN's convolution with
    the activation as a post-op (one pass over the output instead of two: measured on the
    MobileNetV2 backbone of a 2144 px tile, 2 cores, 0.50 -> 0.43 s in fp32, and 0.86 -> 0.76 s
    in bf16 on one core); elsewhere, and while tracing for export or when a gradient is asked
    for, the plain conv and then the activation. The same values either way where PyTorch's own
    conv2d is oneDNN's too (the activation is monotonic, so clamping before or after the
    rounding to bf16 gives the same number): the bundled MobileNetV2 and a ResNet stem bit for
    bit in fp32 and bf16; a few of ShuffleNetV2's small fp32 convs go to another kernel in
    PyTorch and agree to rounding.

    Its parameters are the conv's, under the conv's names (a state dict does not change).
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.ReLU | nn.ReLU6) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         conv.padding_mode, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self.six = isinstance(activation, nn.ReLU6)
        self.post_op = _POST_OPS[type(activation)]  # (oneDNN's name, its scalars)

    def _fused(self, x: torch.Tensor) -> bool:
        # channels_last input only, the layout of the inference form (on NCHW input PyTorch's
        # conv2d often takes another kernel, whose sums agree only to rounding)
        return (x.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and x.is_contiguous(memory_format=torch.channels_last)
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
                and not (torch.is_grad_enabled() and self.weight.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            # the op has no autocast rule: under autocast, cast as conv2d would be cast
            autocast = torch.is_autocast_enabled("cpu")
            dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
            if dtype in (torch.float32, torch.bfloat16) and \
                    (autocast or self.weight.dtype == dtype):
                bias = None if self.bias is None else self.bias.to(dtype)
                name, scalars = self.post_op
                return torch.ops.mkldnn._convolution_pointwise(
                    x.to(dtype), self.weight.to(dtype), bias, list(self.padding),
                    list(self.stride), list(self.dilation), self.groups, name, scalars, "")
        y = super().forward(x)
        return F.hardtanh(y, 0.0, 6.0) if self.six else F.relu(y)


def fuse_conv_activations(module: nn.Module) -> int:
    """Make every Conv2d that a ReLU or ReLU6 follows in a Sequential (identities from folded
    batch norms between them) a `ConvActivation`; returns how many. For inference only, after
    `fold_batchnorm` (a batch norm between them stops the fusion)."""
    fused = 0
    for parent in list(module.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for i, name in enumerate(names):
            conv = parent._modules[name]
            if type(conv) is not nn.Conv2d:
                continue
            j = i + 1
            while j < len(names) and isinstance(parent._modules[names[j]], nn.Identity):
                j += 1
            if j < len(names) and type(parent._modules[names[j]]) in _POST_OPS:
                setattr(parent, name, ConvActivation(conv, parent._modules[names[j]]))
                setattr(parent, names[j], nn.Identity())
                fused += 1
    return fused
