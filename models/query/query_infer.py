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
from typing import Callable

import torch
from torch.nn import functional as F

from ..layers.fpn import Pyramid
from ..layers.heads import Branch, ConvTower, branch_maps
from ..layers.sparse import (TowerPlan, WeightCache, children_of, ravel, resolve_backend,
                     run_tower_sparse, unravel)

MODES = ("dense", "csq", "cq", "ccq")
BLOCK = 8  # side of a gathered block (the blocks backend), in positions of its level
CROP_BATCH = 256  # crops computed at once


@dataclass
class LevelOutput:
    """Head outputs of one FPN level at `positions` (Q,), sorted linear indices into `shape`."""

    level: int
    shape: tuple[int, int, int]  # (N, H, W)
    positions: torch.Tensor  # (Q,) int64
    cls: torch.Tensor  # (Q, A*K) logits (RPN: (Q, A) objectness)
    box: torch.Tensor  # (Q, A*4) deltas (FCOS: (Q, 5) l, t, r, b, centre-ness)
    query: torch.Tensor | None  # (Q,) logits where the query head ran on this level, else None
    macs: float  # multiply-accumulates spent in the heads on this level
    dense_macs: float  # what the same heads cost densely on this level
    seconds: float = 0.0  # head time
    fpn_seconds: float = 0.0  # time spent computing this level's FPN map (dense or at rows)
    decided_dense: bool = False  # run densely because the queries covered too much (CSQ)

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


def rows_at_predictor(rows: torch.Tensor, branch: Branch) -> torch.Tensor:
    """A branch's 1x1 predictor applied to tower output rows (Q, C) -> (Q, C_out)."""
    if branch.predictor is None:
        return rows
    p = branch.predictor
    return torch.addmm(p.bias, rows, p.weight.flatten(1).t())  # 1x1 conv on rows, (Q, C_out)


def unique_towers(branches: dict[str, Branch]) -> list[ConvTower]:
    """The distinct towers behind the branches (the RPN's three branches share one trunk)."""
    seen: dict[int, ConvTower] = {}
    for b in branches.values():
        seen.setdefault(id(b.tower), b.tower)
    return list(seen.values())


# a coarse level whose queries (grown by the towers' reach) cover this much of the next level
# makes every finer level run densely, without asking their query heads: measured on 1024 px
# tiles of the sample model, busy scenes' P4 queries cover 0.90-0.99 and their P3 and P2 always
# went dense; the busiest survey tile's cover 0.57, and its P2 needed 0.29 of the dense work
BUSY_BEYOND_DOUBT = 0.85


class QueryInference:
    """Runs a detector's head branches over FPN levels for one `QueryOptions`.

    Args:
        branches: `branches(with_query)` gives the head's outputs as {"cls", "box"[, "query"]}
            `Branch`es; every branch's tower must have the same depth.
        forced_queries: optional {level: sorted positions} that replace the sigma test on that
            level (used by `querydet bench` to simulate a trained query head's firing pattern).
    """

    def __init__(self, branches: Callable[[bool], dict[str, Branch]], options: QueryOptions,
                 forced_queries: dict[int, torch.Tensor] | None = None) -> None:
        if options.mode not in MODES:
            raise ValueError(f"unknown inference mode {options.mode!r} (allowed: {', '.join(MODES)})")
        if options.mode != "dense" and "query" not in branches(True):
            raise ValueError(f"mode {options.mode!r} needs a model with a query head; "
                             "this model has none (use mode 'dense')")
        depths = {t.depth for t in unique_towers(branches(True))}
        if len(depths) != 1:
            raise ValueError(f"head towers must share one depth for sparse inference, got {depths}")
        self.branches = branches
        self.depth = depths.pop()
        self.options = options
        self.forced = forced_queries or {}
        self.cells: dict[int, torch.Tensor] = {}  # per call: cells with valid pixels, by level
        self.weights = WeightCache()  # sparse-layout weights, converted once per call

    def __call__(self, features: Pyramid, valid: torch.Tensor | None = None
                 ) -> list[LevelOutput]:
        levels = list(features.levels)
        opts = self.options
        self.cells = {} if valid is None else valid_cells(valid, features)
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
                queried = self._queried(outputs[lvl]) if with_query else queried[:0]
                continue
            keys = children_of(queried, coarse.shape, features.shape(lvl))
            cover = self._query_cover(queried, coarse.shape)
            if cover >= max(BUSY_BEYOND_DOUBT, opts.sparse_max_fraction):
                # a busy tile: this level and every finer one run densely, without queries
                for finer in range(lvl, levels[0] - 1, -1):
                    outputs[finer] = self._dense_level(finer, features, with_query=False)
                    outputs[finer].decided_dense = True
                break
            if cover > opts.sparse_max_fraction:
                # the queries cover so much of this level that no sparse plan can win: it runs
                # densely before any sparse work is set up (the same outputs at every key,
                # plus the rest); the cascade goes on from its queries at the keys
                outputs[lvl] = self._dense_level(lvl, features, with_query)
                outputs[lvl].decided_dense = True
            else:
                outputs[lvl] = self._sparse_level(lvl, features, keys, with_query)
            queried = self._queried(outputs[lvl], among=keys) if with_query else queried[:0]
        return [outputs[lvl] for lvl in levels]

    # -- query decisions ------------------------------------------------------------------------
    def _query_cover(self, queried: torch.Tensor, shape: tuple[int, int, int]) -> float:
        """How much of the next finer level the exact plan's first layer would cover, as a
        fraction (0 where CSQ's busy-level decision does not apply). Above
        `sparse_max_fraction` the level-by-level fallback would go dense anyway.

        Estimated on the coarser level (`queried` positions of its `shape`): the queried map
        dilated by the receptive radius of the towers in its cells (depth / 2, rounded up), one
        max-pool over a map 4x smaller than the next level; it costs well under 1% of the
        heads. Each level is judged on its own: a busy P3 often narrows to a few P2 keys."""
        opts = self.options
        if opts.mode != "csq" or opts.context != "exact" or opts.sparse_max_fraction >= 1.0 \
                or self.forced or queried.numel() == 0:
            return 0.0
        n, h, w = shape
        hit = torch.zeros(n * h * w, device=queried.device)
        hit[queried] = 1.0
        radius = -(-self.depth // 2)
        grown = F.max_pool2d(hit.view(n, 1, h, w), 2 * radius + 1, stride=1, padding=radius)
        return float(grown.mean())

    def _queried(self, out: LevelOutput, among: torch.Tensor | None = None) -> torch.Tensor:
        """Positions of `out` whose query score passes sigma (or the forced set); with `among`
        (sorted positions), only those: a level run densely still queries at its keys only."""
        if out.query is None or out.positions.numel() == 0:
            return out.positions[:0]
        if out.level in self.forced:
            forced = self.forced[out.level].to(out.positions.device)
            found = out.positions[torch.isin(out.positions, forced)]
        else:
            fired = out.query > _logit(self.options.sigma)
            if out.level in self.cells:  # no query on a cell without a valid pixel
                fired &= self.cells[out.level][out.positions]
            found = out.positions[fired]
        if among is not None and out.is_dense:
            found = found[torch.isin(found, among)]
        return found

    def _outputs(self, branches: dict[str, Branch], tower_rows: dict[int, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """cls, box and query rows from each tower's output rows {id(tower): (Q, C)}."""
        out = {name: rows_at_predictor(tower_rows[id(b.tower)], b) for name, b in branches.items()}
        query = out["query"][:, 0] if "query" in out else None
        return out["cls"], out["box"], query

    # -- one level, three ways ------------------------------------------------------------------
    def _dense_level(self, level: int, features: Pyramid, with_query: bool) -> LevelOutput:
        t_fpn = time.perf_counter()
        x = features.dense(level)
        _sync(x.device)
        t0 = time.perf_counter()
        shape = features.shape(level)
        branches = self.branches(with_query)
        rows = {name: rows_of_map(m) for name, m in branch_maps(branches, x).items()}  # (NHW, C)
        cls, box = rows["cls"], rows["box"]
        query = rows["query"][:, 0] if "query" in rows else None
        positions = torch.arange(cls.shape[0], device=x.device)
        macs = self._macs(branches, lambda tower: tower_macs(tower, cls.shape[0]), cls.shape[0])
        _sync(x.device)
        return LevelOutput(level, shape, positions, cls, box, query, macs, macs,
                           time.perf_counter() - t0, t0 - t_fpn)

    def _sparse_level(self, level: int, features: Pyramid, keys: torch.Tensor, with_query: bool
                      ) -> LevelOutput:
        t0 = time.perf_counter()
        shape = features.shape(level)
        if self.options.context == "exact":
            plan = TowerPlan.exact(keys, shape, self.depth)
        else:
            size = int(self.options.context.split("x")[0])
            plan = TowerPlan.submanifold(keys, shape, self.depth, size)
        n_pos = shape[0] * shape[1] * shape[2]
        branches = self.branches(with_query)
        dense = self._macs(branches, lambda tower: tower_macs(tower, n_pos), n_pos)
        tower = unique_towers(branches)[0]
        if (self.options.context == "exact"
                and plan_macs(tower, plan) > self.options.sparse_max_fraction
                * tower_macs(tower, n_pos)):
            return self._dense_fallback(level, features, plan.keys, with_query, dense)
        backend = resolve_backend(self.options.backend, keys.device)
        if backend == "blocks":
            return self._block_level(level, features, plan.keys, with_query, dense)
        rows = features.rows(level, plan.sets[0])  # (Q_0, C): the FPN only where needed
        _sync(rows.device)
        t_fpn = time.perf_counter() - t0
        t0 = time.perf_counter()
        tower_rows = {id(t): run_tower_sparse(t, rows, plan, backend, self.weights)
                      for t in unique_towers(branches)}  # (Q, C_out) at the keys
        cls, box, query = self._outputs(branches, tower_rows)
        macs = self._macs(branches, lambda t: plan_macs(t, plan), plan.keys.numel())
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

    def _crop_towers(self, level: int, features: Pyramid, n: torch.Tensor, oy: torch.Tensor,
                     ox: torch.Tensor, size: int, towers: list[ConvTower]
                     ) -> list[torch.Tensor]:
        """Each tower's output on P square crops of `size` whose top-left corners are (oy, ox) in
        image n, (P, C_out, size, size) per tower. The crops are read from the FPN at their
        positions only; positions off the map are zero at every layer's input, as the dense
        map's zero padding makes them, so a crop's centre (a band of the towers' depth in from
        its edge) equals the dense map there."""
        shape = features.shape(level)
        _, H, W = shape
        depth = self.depth
        span = torch.arange(size, device=n.device)
        ys = oy[:, None, None] + span[None, :, None]  # (P, S, 1)
        xs = ox[:, None, None] + span[None, None, :]  # (P, 1, S)
        inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)  # (P, S, S)
        lin = ravel(n[:, None, None], ys.clamp(0, H - 1), xs.clamp(0, W - 1), shape)  # (P, S, S)
        uniq, inverse = torch.unique(lin, return_inverse=True)
        rows = features.rows(level, uniq)  # (U, C): the FPN at the crops' positions only
        crops = rows[inverse].permute(0, 3, 1, 2) * inside[:, None]  # (P, C, S, S)
        mask = inside[:, None].to(crops.dtype)  # (P, 1, S, S)
        outs = []
        for tower in towers:
            y = crops
            for j, conv in enumerate(tower.convs):
                y = F.conv2d(y, conv.weight, conv.bias, padding=1)
                if j < depth - 1:
                    y = F.relu(y) * mask  # off-map positions stay zero, as in the dense map
                elif tower.relu_last:
                    y = F.relu(y)
            outs.append(y)  # (P, C_out, S, S)
        return outs

    def _crop_level(self, level: int, features: Pyramid, parents: torch.Tensor,
                    coarse_shape: tuple[int, int, int], with_query: bool) -> LevelOutput:
        """Crop Query: each parent's 2x2 children computed on a (2 + 2D)^2 dense crop."""
        t0 = time.perf_counter()
        shape = features.shape(level)
        N, H, W = shape
        depth = self.depth
        size = 2 + 2 * depth
        branches = self.branches(with_query)
        towers = unique_towers(branches)
        outs: list[list[torch.Tensor]] = [[] for _ in towers]
        kid_pos = []
        n, py, px = unravel(parents, coarse_shape)
        device = parents.device
        two = torch.arange(2, device=device)
        for start in range(0, parents.numel(), 256):
            sl = slice(start, start + 256)
            crops = self._crop_towers(level, features, n[sl], 2 * py[sl] - depth,
                                      2 * px[sl] - depth, size, towers)
            for t, y in enumerate(crops):
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
        cls, box, query = self._outputs(branches, {id(t): r for t, r in zip(towers, rows_out)})
        cropped = float(parents.numel() * size * size)
        macs = self._macs(branches, lambda tower: tower_macs(tower, cropped), pos.numel())
        dense = self._macs(branches, lambda tower: tower_macs(tower, N * H * W), N * H * W)
        _sync(device)
        return LevelOutput(level, shape, pos, cls, box, query, macs, dense,
                           time.perf_counter() - t0)

    def _block_level(self, level: int, features: Pyramid, keys: torch.Tensor,
                     with_query: bool, dense_macs: float) -> LevelOutput:
        """Exact CSQ through gathered blocks (SBNet): the BLOCK x BLOCK blocks of the level that
        hold a key, each with a halo of the towers' depth, run through the dense convolutions
        as one batch of crops; the keys' rows are read from the blocks' centres."""
        t0 = time.perf_counter()
        shape = features.shape(level)
        _, H, W = shape
        depth, b = self.depth, BLOCK
        branches = self.branches(with_query)
        towers = unique_towers(branches)
        n, y, x = unravel(keys, shape)
        grid = (shape[0], -(-H // b), -(-W // b))  # the level's blocks: (N, rows, columns)
        key_block = ravel(n, y // b, x // b, grid)  # (Q,) each key's block
        block = torch.unique(key_block)  # (M,) sorted
        bn, by, bx = unravel(block, grid)
        k_block = torch.searchsorted(block, key_block)  # (Q,) each key's block among them
        size = b + 2 * depth
        rows: list[torch.Tensor | None] = [None] * len(towers)
        for start in range(0, block.numel(), CROP_BATCH):
            sl = slice(start, start + CROP_BATCH)
            mine = torch.nonzero((k_block >= start) & (k_block < start + CROP_BATCH))[:, 0]
            crops = self._crop_towers(level, features, bn[sl], by[sl] * b - depth,
                                      bx[sl] * b - depth, size, towers)
            kb, ky, kx = k_block[mine] - start, y[mine] % b + depth, x[mine] % b + depth
            for t, out in enumerate(crops):
                if rows[t] is None:
                    rows[t] = out.new_zeros(keys.numel(), out.shape[1])  # (Q, C_out)
                rows[t][mine] = out[kb, :, ky, kx]  # (Q_part, C_out)
        rows = [r if r is not None else torch.zeros(0, t.convs[-1].out_channels,
                                                    device=keys.device)
                for r, t in zip(rows, towers)]
        cls, box, query = self._outputs(branches, {id(t): r for t, r in zip(towers, rows)})
        macs = self._macs(branches, lambda t: tower_macs(t, float(block.numel() * size * size)),
                          keys.numel())
        _sync(keys.device)
        return LevelOutput(level, shape, keys, cls, box, query, macs, dense_macs,
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

    @staticmethod
    def _macs(branches: dict[str, Branch], tower_cost: Callable[[ConvTower], float],
              outputs: int) -> float:
        """Towers' MACs (each shared tower once) plus the 1x1 predictors' at `outputs` positions."""
        return (sum(tower_cost(t) for t in unique_towers(branches))
                + outputs * sum(b.macs_per_position() for b in branches.values()))


def _any_pool(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, H, W) bool -> (N, ceil(H / factor), ceil(W / factor)): any True in each block."""
    if factor == 1:
        return mask
    n, h, w = mask.shape
    hh, ww = -(-h // factor), -(-w // factor)
    padded = mask.new_zeros(n, hh * factor, ww * factor)
    padded[:, :h, :w] = mask
    return padded.view(n, hh, factor, ww, factor).any(dim=4).any(dim=2)  # (N, hh, ww)


def valid_cells(valid: torch.Tensor, features: Pyramid) -> dict[int, torch.Tensor]:
    """Per level, flat (N*H*W,) bool: the cells that cover at least one valid input pixel.

    A cell of P_l covers the 2x2 cells of P_(l-1) under it, so each level is pooled from the
    one below (bool blocks, not a float max-pool of the whole image per level)."""
    cells = {}
    grid, stride = valid.bool(), 1
    for lvl in sorted(features.levels):
        grid = _any_pool(grid, 2 ** lvl // stride)  # (N, ceil(H / 2^l), ceil(W / 2^l))
        stride = 2 ** lvl
        n, lh, lw = features.shape(lvl)
        cell = grid.new_zeros(n, lh, lw)
        h, w = min(lh, grid.shape[1]), min(lw, grid.shape[2])
        cell[:, :h, :w] = grid[:, :h, :w]
        cells[lvl] = cell.view(-1)
    return cells


def _logit(p: float) -> float:
    """Inverse sigmoid, so scores are compared in logit space: sigmoid underflows to exactly 0
    below about -88, yet sigma = 0 must still query every position (and sigma = 1 none)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


__all__ = ["LevelOutput", "QueryOptions", "QueryInference", "MODES"]
