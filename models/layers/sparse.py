"""Running a `ConvTower` at chosen positions only: the sparse heads of CSQ (paper 3.2).

Letters: N batch, C channels, Q positions, D convolutions in a tower.

A position is the linear index p = (n * H + y) * W + x into an (N, H, W) map; position sets are
sorted, unique int64 tensors. No dense feature map of the head is ever built: the input rows are
gathered from the FPN map at the positions that need them, and every layer works on rows.

Two context modes, both expressed as a `TowerPlan` (which positions each layer computes):

* exact: layer j of D is computed at the keys dilated by D - j (the receptive radius still to
  come), so at every key the outputs equal the dense tower's (zero padding at map borders is
  reproduced; nothing else is approximated).
* submanifold (the paper's, Table 6): the keys dilated by (c - 1) / 2 for a c x c context form one
  active set; every layer is computed there and inactive neighbours count as zero.

Two backends compute one 3x3 layer over rows: gather-GEMM in PyTorch (always present, CPU and
CUDA) and spconv's SubMConv2d (optional, imported lazily).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

# Row budget of one gather-GEMM chunk: chunk_rows * 9 * C_in floats (64 MiB at float32).
_GATHER_BUDGET = 16 * 1024 * 1024

_OFFSETS_3X3 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # kernel order ky, kx


def spconv_available() -> bool:
    """True when the optional `spconv` package can be imported."""
    return importlib.util.find_spec("spconv") is not None


def unravel(pos: torch.Tensor, shape: tuple[int, int, int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch index, row and column of linear positions `pos` (Q,) in an (N, H, W) grid."""
    _, height, width = shape
    return pos // (height * width), (pos // width) % height, pos % width


def ravel(n: torch.Tensor, y: torch.Tensor, x: torch.Tensor, shape: tuple[int, int, int]
          ) -> torch.Tensor:
    """Linear positions of (n, y, x) in an (N, H, W) grid."""
    _, height, width = shape
    return (n * height + y) * width + x


def _grid_mask(pos: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Positions `pos` of an (N, H, W) grid as a bool map (N, H, W)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=pos.device)
    mask.view(-1)[pos] = True
    return mask  # (N, H, W)


def _dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A bool map (N, H, W) grown by Chebyshev distance `radius`, clipped to the map: a square
    is separable, so rows then columns, one shifted OR per step and direction."""
    for dim in (2, 1):
        length = mask.shape[dim]
        grown = mask.clone()
        for step in range(1, min(radius, length - 1) + 1):
            grown.narrow(dim, step, length - step).logical_or_(mask.narrow(dim, 0, length - step))
            grown.narrow(dim, 0, length - step).logical_or_(mask.narrow(dim, step, length - step))
        mask = grown
    return mask


def dilate_keys(pos: torch.Tensor, shape: tuple[int, int, int], radius: int = 1) -> torch.Tensor:
    """Positions within Chebyshev distance `radius` of any of `pos`, clipped to the map, sorted.

    Grown on a bool map of the grid and read back in order: linear in the map's size, where
    merging nine shifted copies with `torch.unique` sorted them radius times (measured on a
    survey's CSQ levels: the sets and tables took a fifth of the sparse heads' time)."""
    if radius <= 0 or pos.numel() == 0:
        return pos
    return torch.nonzero(_dilate_mask(_grid_mask(pos, shape), radius).view(-1)).view(-1)  # sorted


def children_of(pos: torch.Tensor, coarse_shape: tuple[int, int, int],
                fine_shape: tuple[int, int, int]) -> torch.Tensor:
    """Eq. 1: the 2x2 positions on the finer level under each coarse position, sorted."""
    n, height, width = coarse_shape
    _, fine_h, fine_w = fine_shape
    mask = _grid_mask(pos, coarse_shape).view(n, height, 1, width, 1)
    kids = mask.expand(n, height, 2, width, 2).reshape(n, 2 * height, 2 * width)  # (N, 2h, 2w)
    # a finer map may be one short of 2x (its extra row or column has no parent)
    kids = F.pad(kids, (0, max(0, fine_w - 2 * width), 0, max(0, fine_h - 2 * height)))
    return torch.nonzero(kids[:, :fine_h, :fine_w].reshape(-1)).view(-1)  # sorted


def unique_positions(pos: torch.Tensor, shape: tuple[int, int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.unique(pos, return_inverse=True)` for positions of one (N, H, W) grid, by a map
    of the grid instead of a sort: the sorted distinct positions and each one's row among them."""
    uniq = torch.nonzero(_grid_mask(pos, shape).view(-1)).view(-1)  # sorted
    return uniq, rows_in(pos, uniq, shape)


def _row_map(in_pos: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Flat (N * (H + 2) * (W + 2),) map of the grid with a one-position border: the row of each
    of `in_pos` at its position, len(in_pos) (the zero row) everywhere else and on the border."""
    n, height, width = shape
    table = torch.full((n, height + 2, width + 2), in_pos.numel(), dtype=torch.int64,
                       device=in_pos.device)
    b, y, x = unravel(in_pos, shape)
    table[b, y + 1, x + 1] = torch.arange(in_pos.numel(), device=in_pos.device)
    return table.view(-1)  # (N (H+2) (W+2),)


def _in_row_map(pos: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Where positions `pos` of an (N, H, W) grid lie in `_row_map`'s bordered grid, (Q,)."""
    _, height, width = shape
    b, y, x = unravel(pos, shape)
    return (b * (height + 2) + y + 1) * (width + 2) + x + 1  # (Q,)


def neighbour_rows(out_pos: torch.Tensor, in_pos: torch.Tensor, shape: tuple[int, int, int]
                   ) -> torch.Tensor:
    """For each output position, the rows in `in_pos` of its 3x3 neighbours, (Q_out, 9).

    Neighbours off the map or not in `in_pos` get row len(in_pos), the zero row. Read from a
    map of rows with a border of zero rows: one indexing per table, no search."""
    width = shape[2]
    centre = _in_row_map(out_pos, shape)  # (Q_out,)
    offsets = torch.tensor([dy * (width + 2) + dx for dy, dx in _OFFSETS_3X3],
                           device=out_pos.device)  # (9,)
    return _row_map(in_pos, shape)[centre[:, None] + offsets[None, :]]  # (Q_out, 9)


def rows_in(query: torch.Tensor, table: torch.Tensor, shape: tuple[int, int, int]
            ) -> torch.Tensor:
    """Row of each `query` position within the sorted positions `table` of one (N, H, W) grid,
    or len(table) where absent: read from a map of rows, not searched."""
    return _row_map(table, shape)[_in_row_map(query, shape)]  # (Q,)


def gather_positions(feature: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of a dense (N, C, H, W) map at positions `pos`, (Q, C), without copying the map."""
    N, C, H, W = feature.shape
    n, y, x = unravel(pos, (N, H, W))
    return feature.flatten(2).transpose(1, 2)[n, y * W + x]  # (Q, C)


def conv_weight_as_gemm(conv: nn.Conv2d) -> torch.Tensor:
    """Dense 3x3 weight (C_out, C_in, 3, 3) as a (9 * C_in, C_out) matrix, rows in (ky, kx, c_in)."""
    c_out = conv.weight.shape[0]
    return conv.weight.permute(2, 3, 1, 0).reshape(-1, c_out)  # (9 C_in, C_out)


def conv_weight_as_spconv(conv: nn.Conv2d) -> torch.Tensor:
    """Dense 3x3 weight (C_out, C_in, 3, 3) in spconv 2.3's layout (C_out, 3, 3, C_in)."""
    return conv.weight.permute(0, 2, 3, 1).contiguous()  # (C_out, kh, kw, C_in)


class WeightCache:
    """Dense conv weights converted for a sparse backend, for the duration of one forward pass.

    Built fresh by every inference call from the live parameters (so it can never go stale) and
    shared by the levels of that call: the P3 and P2 heads use the same weights.
    """

    def __init__(self) -> None:
        self._converted: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, conv: nn.Conv2d, backend: str) -> torch.Tensor:
        key = (id(conv), backend)
        if key not in self._converted:
            convert = conv_weight_as_spconv if backend == "spconv" else conv_weight_as_gemm
            self._converted[key] = convert(conv)
        return self._converted[key]


@dataclass
class TowerPlan:
    """Which positions each layer of a depth-D tower computes on one level.

    `sets[0]` are the input rows gathered from the FPN map, `sets[j]` the outputs of conv j, and
    `sets[D]` the keys. Neighbour tables are built on first use and shared by every tower (cls,
    box, query) run with the same plan.
    """

    shape: tuple[int, int, int]
    sets: list[torch.Tensor]
    _neighbours: dict[int, torch.Tensor] = field(default_factory=dict)
    _select: dict[int, torch.Tensor] = field(default_factory=dict)
    _spconv_templates: dict[int, object] = field(default_factory=dict)

    @classmethod
    def exact(cls, keys: torch.Tensor, shape: tuple[int, int, int], depth: int) -> "TowerPlan":
        sets, mask = [keys], _grid_mask(keys, shape)
        for _ in range(depth):  # one ring more per layer below: one map, grown in place of five
            mask = _dilate_mask(mask, 1)
            sets.append(torch.nonzero(mask.view(-1)).view(-1))  # sorted
        return cls(shape, sets[::-1])

    @classmethod
    def submanifold(cls, keys: torch.Tensor, shape: tuple[int, int, int], depth: int,
                    context: int) -> "TowerPlan":
        active = dilate_keys(keys, shape, (context - 1) // 2)
        return cls(shape, [active] * depth + [keys])

    @property
    def depth(self) -> int:
        return len(self.sets) - 1

    @property
    def keys(self) -> torch.Tensor:
        return self.sets[-1]

    def neighbours(self, layer: int) -> torch.Tensor:
        """(|sets[layer]|, 9) rows into sets[layer - 1] for conv `layer` (1-based)."""
        if layer not in self._neighbours:
            self._neighbours[layer] = neighbour_rows(self.sets[layer], self.sets[layer - 1],
                                                     self.shape)
        return self._neighbours[layer]

    def select(self, layer: int) -> torch.Tensor:
        """Rows of sets[layer] within sets[layer - 1] (sets[layer] is always a subset)."""
        if layer not in self._select:
            self._select[layer] = rows_in(self.sets[layer], self.sets[layer - 1],
                                          self.shape)
        return self._select[layer]

    def positions_computed(self) -> int:
        """Output positions summed over the tower's layers (the FLOP count's spatial factor)."""
        return sum(int(s.numel()) for s in self.sets[1:])


def sparse_conv_torch(x: torch.Tensor, plan: TowerPlan, layer: int, conv: nn.Conv2d,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """One 3x3 conv by gather-GEMM: rows (|sets[layer-1]|, C_in) -> (|sets[layer]|, C_out).

    `weight` is `conv_weight_as_gemm(conv)` when the caller already converted it in this pass.
    """
    nbr = plan.neighbours(layer)
    c_in = x.shape[1]
    if weight is None:
        weight = conv_weight_as_gemm(conv)  # (9 C_in, C_out)
    x_pad = torch.cat([x, x.new_zeros(1, c_in)])  # last row is the zero row
    chunk = max(1, _GATHER_BUDGET // (9 * c_in))
    out = []
    for start in range(0, nbr.shape[0], chunk):
        rows = nbr[start:start + chunk]
        gathered = x_pad.index_select(0, rows.reshape(-1)).view(rows.shape[0], 9 * c_in)  # (q, 9C)
        out.append(torch.addmm(conv.bias, gathered, weight))  # (q, C_out)
    if not out:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(out)


@contextlib.contextmanager
def _single_threaded_on_cpu(device: torch.device) -> Iterator[None]:
    # spconv 2.3's CPU path races when torch runs it multithreaded: a few output rows come out
    # wrong at random (spconv issue #679; reproduced here on 2 cores). One thread is correct.
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sparse_conv_spconv(x: torch.Tensor, plan: TowerPlan, layer: int, conv: nn.Conv2d,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """One 3x3 conv by spconv SubMConv2d over sets[layer-1], then the rows of sets[layer]."""
    import spconv.pytorch as spconv  # optional extra: pip install "querydet[sparse]"

    in_set = plan.sets[layer - 1]
    key = id(in_set)
    template = plan._spconv_templates.get(key)
    if template is None:
        n, y, xx = unravel(in_set, plan.shape)
        indices = torch.stack([n, y, xx], dim=1).to(torch.int32)  # (Q, 3) batch, y, x
        template = spconv.SparseConvTensor(x, indices, list(plan.shape[1:]), plan.shape[0])
        plan._spconv_templates[key] = template
    tensor = template.replace_feature(x)
    subm = spconv.SubMConv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=True,
                             indice_key=f"plan{key}").to(x.device)
    if weight is None:
        weight = conv_weight_as_spconv(conv)
    subm.weight = nn.Parameter(weight, requires_grad=False)
    subm.bias = nn.Parameter(conv.bias.detach().to(weight.dtype), requires_grad=False)
    with _single_threaded_on_cpu(x.device):
        out = subm(tensor)
    # the new tensor carries the indice pairs; later layers on the same set reuse them
    plan._spconv_templates[key] = out
    feats = out.features
    if plan.sets[layer] is in_set:
        return feats
    return feats.index_select(0, plan.select(layer))


# torch: gather-GEMM per conv; spconv: the paper's library; blocks: the keys' blocks of the map
# (with a halo as wide as the towers see) through the unchanged dense convolutions (SBNet);
# triton: each conv and its ReLU one fused kernel over the neighbour table (triton_conv.py)
SPARSE_BACKENDS = ("torch", "spconv", "blocks", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> the faster backend for `device`.

    spconv on CUDA (when a CUDA build is installed); gather-GEMM in PyTorch on the CPU, because
    spconv's CPU path must run single-threaded to be correct (see `_single_threaded_on_cpu`).
    """
    if backend == "auto":
        if device.type == "cuda" and spconv_available():
            import spconv.constants

            if spconv.constants.PACKAGE_NAME != "spconv":  # spconv-cuXXX wheels
                return "spconv"
        return "torch"
    if backend == "spconv" and not spconv_available():
        raise RuntimeError("the spconv backend needs spconv: pip install 'querydet[sparse]' "
                           "(CPU) or the spconv-cu12x wheel matching your CUDA (GPU)")
    if backend == "triton":
        from .triton_conv import triton_runs_on

        if not triton_runs_on(device):
            raise RuntimeError("the triton backend runs on CUDA (or in Triton's interpreter: "
                               "TRITON_INTERPRET=1)")
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"unknown sparse backend {backend!r} (allowed: auto, "
                         f"{', '.join(SPARSE_BACKENDS)})")
    return backend


def run_tower_sparse(tower: nn.Module, rows: torch.Tensor, plan: TowerPlan, backend: str,
                     weights: "WeightCache | None" = None) -> torch.Tensor:
    """Outputs of `tower` (a ConvTower) at `plan.keys`, (Q, C_out).

    `rows` (|plan.sets[0]|, C) are the input features at `plan.sets[0]`.
    """
    conv_fn = sparse_conv_spconv if backend == "spconv" else sparse_conv_torch
    weights = weights or WeightCache()
    if backend == "triton":
        return _run_tower_triton(tower, rows, plan, weights)
    x = rows
    if backend == "spconv" and torch.is_autocast_enabled(rows.device.type):
        # spconv has no autocast rules: it runs in the autocast dtype on CUDA (fp16/bf16
        # kernels) and in float32 on the CPU, where its kernels have no bf16 path
        dtype = torch.get_autocast_dtype(rows.device.type) if rows.device.type == "cuda" \
            else torch.float32
        with torch.autocast(rows.device.type, enabled=False):
            x = rows.to(dtype)
            for layer, conv in enumerate(tower.convs, start=1):
                w = weights.get(conv, backend).to(dtype)
                x = conv_fn(x, plan, layer, conv, w)
                if layer < len(tower.convs) or tower.relu_last:
                    x = torch.relu(x)
        return x
    last = len(tower.convs)
    for layer, conv in enumerate(tower.convs, start=1):
        x = conv_fn(x, plan, layer, conv, weights.get(conv, backend))
        if layer < last or tower.relu_last:
            x = torch.relu(x)
    return x  # (Q_keys, C_out)


def _run_tower_triton(tower: nn.Module, rows: torch.Tensor, plan: TowerPlan,
                      weights: WeightCache) -> torch.Tensor:
    """The tower as one fused kernel per conv (conv, bias and ReLU), in the autocast dtype when
    autocast is on (as the gather-GEMM's addmm would run), else in the rows' own."""
    from .triton_conv import sparse_conv_triton

    device = rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
    x = rows.to(dtype)
    last = len(tower.convs)
    for layer, conv in enumerate(tower.convs, start=1):
        x = sparse_conv_triton(x, plan.neighbours(layer), weights.get(conv, "torch"), conv.bias,
                               relu=layer < last or tower.relu_last)
    return x  # (Q_keys, C_out)
