"""A sparse 3x3 convolution as one Triton kernel: implicit GEMM over a neighbour table.

Letters: Q output rows, Q_in input rows, C_in / C_out channels.

`sparse_conv_torch` (sparse.py) gathers the nine neighbours of every output row into a (Q, 9 C_in)
matrix, multiplies it by the (9 C_in, C_out) weight and adds the bias: three launches and a
gathered copy per conv, and a ReLU after. Here one program computes a (BLOCK_Q, BLOCK_N) tile of
the output: for each of the nine taps it loads the neighbours' rows straight from the input
through the neighbour table (the zero row, Q_in, reads as zeros), multiplies them into an fp32
accumulator, then adds the bias, applies the ReLU and writes only the live rows. Products in
fp32 follow the run's math mode (`math_mode`: IEEE or TF32), in bf16/fp16 the tensor cores'.

Runs on CUDA; on the CPU only in Triton's interpreter (TRITON_INTERPRET=1), which is how the
tests check it against the gather-GEMM without a GPU. The interpreter multiplies bf16 and fp16
tiles as their bit patterns, so under it those tiles are widened to fp32 before the product (the
loads, masks, bias, ReLU and the store in the narrow type are still the kernel's own).
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK_Q, BLOCK_N, BLOCK_K = 32, 32, 32


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (torch's CUDA build brings it)
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Where the kernel can run: a CUDA device, or any device under Triton's interpreter."""
    return triton_available() and (device.type == "cuda"
                                   or os.environ.get("TRITON_INTERPRET") == "1")


@functools.lru_cache(maxsize=1)
def _kernel():
    """The jitted kernel, built on first use (after TRITON_INTERPRET is read)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sparse_conv3x3(x_ptr, nbr_ptr, w_ptr, b_ptr, out_ptr, Q, Q_IN, C_IN, C_OUT,
                       RELU: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rq = tl.program_id(0) * BQ + tl.arange(0, BQ)  # output rows of this program
        rn = tl.program_id(1) * BN + tl.arange(0, BN)  # output channels
        rk = tl.arange(0, BK)
        acc = tl.zeros((BQ, BN), dtype=tl.float32)
        for tap in range(9):
            rows = tl.load(nbr_ptr + rq * 9 + tap, mask=rq < Q, other=Q_IN)  # (BQ,)
            live = rows < Q_IN  # the zero row and the padding read as zeros
            for k0 in range(0, C_IN, BK):
                kk = k0 + rk
                a = tl.load(x_ptr + rows[:, None] * C_IN + kk[None, :],
                            mask=live[:, None] & (kk[None, :] < C_IN), other=0.0)  # (BQ, BK)
                w = tl.load(w_ptr + (tap * C_IN + kk)[:, None] * C_OUT + rn[None, :],
                            mask=(kk[:, None] < C_IN) & (rn[None, :] < C_OUT),
                            other=0.0)  # (BK, BN)
                if UPCAST:  # the interpreter multiplies bf16/fp16 as their bit patterns
                    a, w = a.to(tl.float32), w.to(tl.float32)
                if IEEE or UPCAST:
                    acc += tl.dot(a, w, input_precision="ieee")
                else:
                    acc += tl.dot(a, w)
        acc += tl.load(b_ptr + rn, mask=rn < C_OUT, other=0.0)[None, :].to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + rq[:, None] * C_OUT + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rq[:, None] < Q) & (rn[None, :] < C_OUT))

    return sparse_conv3x3


def sparse_conv_triton(x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """One 3x3 conv (and its ReLU) over rows: x (Q_in, C_in), neighbours (Q, 9) rows into x
    (Q_in: the zero row), weight (9 C_in, C_out) as `conv_weight_as_gemm` lays it out, bias
    (C_out,) -> (Q, C_out) in x's dtype."""
    import triton

    q, c_in, c_out = neighbours.shape[0], x.shape[1], weight.shape[1]
    out = x.new_empty(q, c_out)
    if q == 0:
        return out
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    upcast = x.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(q, BLOCK_Q), triton.cdiv(c_out, BLOCK_N))
    _kernel()[grid](x.contiguous(), neighbours.to(torch.int32).contiguous(),
                    weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous(), out,
                    q, x.shape[0], c_in, c_out, RELU=relu, IEEE=ieee, UPCAST=upcast, BQ=BLOCK_Q,
                    BN=BLOCK_N, BK=BLOCK_K)
    return out
