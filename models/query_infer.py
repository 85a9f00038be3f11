"""Head outputs per FPN level under each inference mode: dense, CSQ, CQ and CCQ.

Letters: N batch, C channels, A anchors per position, K classes, Q positions, D tower depth.

Every level's result is a `LevelOutput` in row form: sorted linear positions into the level's
(N, H, W) grid and the head outputs at exactly those positions. A dense level lists every position;
a sparse level lists its keys. Post-processing never needs to know which.

Modes (paper 4.4, Table 5):
* dense - every level dense ("no CSQ").
* csq   - Cascade Sparse Query: levels >= start run densely; the query head's positions with score
          > sigma on P_l map to their 2x2 children on P_{l-1} (Eq. 1) and the heads run only there,
          down to the finest level. Context "exact" or the paper's submanifold c x c (Table 6).
* cq    - Crop Query: the same cascade, each query's children computed on a dense crop wide enough
          for the tower's receptive field (2 + 2D square; the paper's 11 x 11 for one position).
* ccq   - Complete Convolution Query: every level dense, detections on fine levels kept only at the
          cascade's keys.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .fpn import Pyramid
from .heads import ConvTower, QueryHead, RetinaHead
from .sparse import (TowerPlan, WeightCache, children_of, ravel, resolve_backend,
                     run_tower_sparse, unravel)

MODES = ("dense", "csq", "cq", "ccq")


@dataclass
class LevelOutput:
    """Head outputs of one FPN level at `positions` (Q,), sorted linear indices into `shape`."""

    level: int
    shape: tuple[int, int, int]  # (N, H, W)
    positions: torch.Tensor  # (Q,) int64
    cls: torch.Tensor  # (Q, A*K) logits
    box: torch.Tensor  # (Q, A*4) deltas
    query: torch.Tensor | None  # (Q,) logits where the query head ran on this level, else None
    macs: float  # multiply-accumulates spent in the heads on this level
    dense_macs: float  # what the same heads cost densely on this level
    seconds: float = 0.0  # head time
    fpn_seconds: float = 0.0  # time spent computing this level's FPN map (dense or at rows)

    @property
    def is_dense(self) -> bool:
        return self.positions.numel() == self.shape[0] * self.shape[1] * self.shape[2]


@dataclass(frozen=True)
class QueryOptions:
    """How to run the heads: mode, query threshold, start level, context and sparse backend."""

    mode: str = "csq"
    sigma: float = 0.15
    start_level: int = 4
    context: str = "exact"
    backend: str = "auto"
    # exact context only: a level whose sparse plan would compute more than this fraction of the
    # dense MACs runs densely instead (same outputs at the keys, and never slower than dense)
    sparse_max_fraction: float = 0.3


def tower_macs(tower: ConvTower, positions: int) -> float:
    """Multiply-accumulates of a dense tower over `positions` positions."""
    return float(positions) * sum(9 * c.in_channels * c.out_channels for c in tower.convs)


def plan_macs(tower: ConvTower, plan: TowerPlan) -> float:
    """Multiply-accumulates of a tower run sparsely with `plan`."""
    return float(sum(9 * c.in_channels * c.out_channels * plan.sets[j + 1].numel()
                     for j, c in enumerate(tower.convs)))


def rows_of_map(x: torch.Tensor) -> torch.Tensor:
    """A dense (N, C, H, W) map as rows (NHW, C) in linear-position order."""
    N, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(N * H * W, C)  # (NHW, C)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class QueryInference:
    """Runs the shared heads over FPN levels for one `QueryOptions`.

    Args:
        head: the classification + box head.
        query_head: the query head, or None for a model without one (dense mode only).
        forced_queries: optional {level: sorted positions} that replace the sigma test on that
            level (used by `querydet bench` to simulate a trained query head's firing pattern).
    """

    def __init__(self, head: RetinaHead, query_head: QueryHead | None, options: QueryOptions,
                 forced_queries: dict[int, torch.Tensor] | None = None) -> None:
        if options.mode not in MODES:
            raise ValueError(f"unknown inference mode {options.mode!r} (allowed: {', '.join(MODES)})")
        if options.mode != "dense" and query_head is None:
            raise ValueError(f"mode {options.mode!r} needs a model with a query head; "
                             "this model has none (use mode 'dense')")
        self.head = head
        self.query_head = query_head
        self.options = options
        self.forced = forced_queries or {}
        self.weights = WeightCache()  # sparse-layout weights, converted once per call

    def __call__(self, features: Pyramid) -> list[LevelOutput]:
        levels = list(features.levels)
        opts = self.options
        if opts.mode == "dense":
            return [self._dense_level(lvl, features, with_query=False) for lvl in levels]
        start = opts.start_level
        if start not in levels or start == levels[0]:
            raise ValueError(f"start level P{start} must be one of the model's levels above the "
                             f"finest (allowed: {', '.join(f'P{l}' for l in levels[1:])})")
        if opts.mode == "ccq":
            return self._complete_convolution_query(features, levels)
        outputs = {lvl: self._dense_level(lvl, features, with_query=lvl == start)
                   for lvl in sorted(levels, reverse=True) if lvl >= start}
        queried = self._queried(outputs[start])
        for lvl in range(start - 1, levels[0] - 1, -1):
            coarse = outputs[lvl + 1]
            with_query = lvl > levels[0]
            if opts.mode == "cq":
                outputs[lvl] = self._crop_level(lvl, features, queried, coarse.shape, with_query)
            else:
                keys = children_of(queried, coarse.shape, features.shape(lvl))
                outputs[lvl] = self._sparse_level(lvl, features, keys, with_query)
            queried = self._queried(outputs[lvl]) if with_query else queried[:0]
        return [outputs[lvl] for lvl in levels]

    # -- query decisions ------------------------------------------------------------------------
    def _queried(self, out: LevelOutput) -> torch.Tensor:
        """Positions of `out` whose query score passes sigma (or the forced set)."""
        if out.query is None or out.positions.numel() == 0:
            return out.positions[:0]
        if out.level in self.forced:
            forced = self.forced[out.level].to(out.positions.device)
            return out.positions[torch.isin(out.positions, forced)]
        return out.positions[out.query > _logit(self.options.sigma)]

    # -- one level, three ways ------------------------------------------------------------------
    def _dense_level(self, level: int, features: Pyramid, with_query: bool) -> LevelOutput:
        t_fpn = time.perf_counter()
        x = features.dense(level)
        _sync(x.device)
        t0 = time.perf_counter()
        shape = features.shape(level)
        cls = rows_of_map(self.head.cls(x))  # (NHW, A*K)
        box = rows_of_map(self.head.box(x))  # (NHW, A*4)
        query = rows_of_map(self.query_head(x))[:, 0] if with_query else None  # (NHW,)
        positions = torch.arange(cls.shape[0], device=x.device)
        macs = self._macs(with_query, lambda tower: tower_macs(tower, cls.shape[0]))
        _sync(x.device)
        return LevelOutput(level, shape, positions, cls, box, query, macs, macs,
                           time.perf_counter() - t0, t0 - t_fpn)

    def _sparse_level(self, level: int, features: Pyramid, keys: torch.Tensor, with_query: bool
                      ) -> LevelOutput:
        t0 = time.perf_counter()
        shape = features.shape(level)
        depth = self.head.cls.depth
        if self.options.context == "exact":
            plan = TowerPlan.exact(keys, shape, depth)
        else:
            size = int(self.options.context.split("x")[0])
            plan = TowerPlan.submanifold(keys, shape, depth, size)
        n_pos = shape[0] * shape[1] * shape[2]
        dense = self._macs(with_query, lambda tower: tower_macs(tower, n_pos))
        if (self.options.context == "exact"
                and plan_macs(self.head.cls, plan) > self.options.sparse_max_fraction
                * tower_macs(self.head.cls, n_pos)):
            return self._dense_fallback(level, features, plan.keys, with_query, dense)
        rows = features.rows(level, plan.sets[0])  # (Q_0, C): the FPN only where needed
        _sync(rows.device)
        t_fpn = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend = resolve_backend(self.options.backend, rows.device)
        w = self.weights
        cls = run_tower_sparse(self.head.cls, rows, plan, backend, w)  # (Q, A*K)
        box = run_tower_sparse(self.head.box, rows, plan, backend, w)  # (Q, A*4)
        query = (run_tower_sparse(self.query_head, rows, plan, backend, w)[:, 0]
                 if with_query else None)
        macs = self._macs(with_query, lambda tower: plan_macs(tower, plan))
        _sync(rows.device)
        return LevelOutput(level, shape, plan.keys, cls, box, query, macs, dense,
                           time.perf_counter() - t0, t_fpn)

    def _dense_fallback(self, level: int, features: Pyramid, keys: torch.Tensor,
                        with_query: bool, dense_macs: float) -> LevelOutput:
        """Keys so dense that the whole map is cheaper: dense towers, rows read at the keys."""
        full = self._dense_level(level, features, with_query)
        return LevelOutput(level, full.shape, keys, full.cls[keys], full.box[keys],
                           None if full.query is None else full.query[keys], dense_macs,
                           dense_macs, full.seconds, full.fpn_seconds)

    def _crop_level(self, level: int, features: Pyramid, parents: torch.Tensor,
                    coarse_shape: tuple[int, int, int], with_query: bool) -> LevelOutput:
        """Crop Query: each parent's 2x2 children computed on a (2 + 2D)^2 dense crop."""
        t0 = time.perf_counter()
        shape = features.shape(level)
        N, H, W = shape
        depth = self.head.cls.depth
        size = 2 + 2 * depth
        towers = [self.head.cls, self.head.box] + ([self.query_head] if with_query else [])
        outs: list[list[torch.Tensor]] = [[] for _ in towers]
        kid_pos = []
        n, py, px = unravel(parents, coarse_shape)
        device = parents.device
        span = torch.arange(size, device=device)
        two = torch.arange(2, device=device)
        for start in range(0, parents.numel(), 256):
            sl = slice(start, start + 256)
            ys = (2 * py[sl] - depth)[:, None, None] + span[None, :, None]  # (P, S, 1)
            xs = (2 * px[sl] - depth)[:, None, None] + span[None, None, :]  # (P, 1, S)
            inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)  # (P, S, S)
            lin = ravel(n[sl][:, None, None], ys.clamp(0, H - 1), xs.clamp(0, W - 1), shape)
            uniq, inverse = torch.unique(lin, return_inverse=True)
            rows = features.rows(level, uniq)  # (U, C): the FPN at the crops' positions only
            crops = rows[inverse].permute(0, 3, 1, 2) * inside[:, None]  # (P, C, S, S)
            mask = inside[:, None].to(crops.dtype)  # (P, 1, S, S)
            for t, tower in enumerate(towers):
                y = crops
                for j, conv in enumerate(tower.convs):
                    y = F.conv2d(y, conv.weight, conv.bias, padding=1)
                    if j < depth - 1:
                        y = F.relu(y) * mask  # off-map positions stay zero, as in the dense map
                centre = y[:, :, depth:depth + 2, depth:depth + 2]  # (P, C_out, 2, 2)
                outs[t].append(centre.permute(0, 2, 3, 1).reshape(-1, centre.shape[1]))  # (4P, C_out)
            ky = (2 * py[sl])[:, None, None] + two[None, :, None]  # (P, 2, 1)
            kx = (2 * px[sl])[:, None, None] + two[None, None, :]  # (P, 1, 2)
            ok = (ky < H) & (kx < W)  # (P, 2, 2)
            kid = ravel(n[sl][:, None, None], ky, kx, shape)  # (P, 2, 2)
            kid_pos.append(torch.where(ok, kid, torch.full_like(kid, -1)).reshape(-1))  # (4P,)
        channels = [t.convs[-1].out_channels for t in towers]
        if kid_pos:
            pos = torch.cat(kid_pos)
            keep = pos >= 0
            order = torch.argsort(pos[keep])
            rows_out = [torch.cat(o)[keep][order] for o in outs]
            pos = pos[keep][order]
        else:
            pos = parents.new_zeros(0)
            rows_out = [torch.zeros(0, c, device=device) for c in channels]
        cropped = float(parents.numel() * size * size)
        macs = self._macs(with_query, lambda tower: tower_macs(tower, cropped))
        dense = self._macs(with_query, lambda tower: tower_macs(tower, N * H * W))
        _sync(device)
        return LevelOutput(level, shape, pos, rows_out[0], rows_out[1],
                           rows_out[2][:, 0] if with_query else None, macs, dense,
                           time.perf_counter() - t0)

    def _complete_convolution_query(self, features: Pyramid, levels: list[int]
                                    ) -> list[LevelOutput]:
        """CCQ: all levels dense; below the start level only the keys' rows are kept."""
        start = self.options.start_level
        outputs = {}
        for lvl in sorted(levels, reverse=True):
            with_query = levels[0] < lvl <= start
            outputs[lvl] = self._dense_level(lvl, features, with_query)
        queried = self._queried(outputs[start])
        for lvl in range(start - 1, levels[0] - 1, -1):
            full = outputs[lvl]
            keys = children_of(queried, outputs[lvl + 1].shape, full.shape)
            outputs[lvl] = LevelOutput(lvl, full.shape, keys, full.cls[keys], full.box[keys],
                                       None if full.query is None else full.query[keys],
                                       full.macs, full.dense_macs, full.seconds,
                                       full.fpn_seconds)
            queried = self._queried(outputs[lvl]) if full.query is not None else keys[:0]
        return [outputs[lvl] for lvl in levels]

    def _macs(self, with_query: bool, cost) -> float:
        total = cost(self.head.cls) + cost(self.head.box)
        if with_query:
            total += cost(self.query_head)
        return total


def _logit(p: float) -> float:
    """Inverse sigmoid, so scores are compared in logit space: sigmoid underflows to exactly 0
    below about -88, yet sigma = 0 must still query every position (and sigma = 1 none)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


__all__ = ["LevelOutput", "QueryOptions", "QueryInference", "MODES"]
