"""The network as graphs that a runtime without this package's code can run (ONNX, OpenVINO).

Letters: N batch, C channels, H/W map size, Q positions, R ring positions, D tower depth.

Four kinds of graph, each an `nn.Module` over the live model's parameters, so an export writes
exactly what PyTorch runs and a test can compare the two:

* `DenseGraph`: the preprocessed batch -> every level's head maps.
* `CoarseGraph`: the batch -> the head maps of the levels from CSQ's start level up, the query
  map on the start level, and the inner FPN maps (lateral + top-down, before the 3x3 output conv)
  of the finer levels: the dense part of Cascade Sparse Query.
* `FineDenseGraph(level)`: a fine level's inner map -> its head maps (the queries covered so much
  of the level that dense is cheaper, as `query_infer` decides for PyTorch).
* `FineSparseGraph(level)`: the inner map, the positions to gather (the ring) and one neighbour
  table per 3x3 conv -> the heads' outputs at the keys, as rows. Counts are dynamic; the tables
  are built by the caller from the queries, as `sparse.TowerPlan` does for PyTorch. Each 3x3 conv
  is a gather and one matrix product over the gathered neighbourhoods, which ONNX can express
  (spconv, the paper's sparse convolution, has no ONNX operator).

Anchors, box decoding and NMS are not in the graphs: they run on the heads' rows in PyTorch, the
same code for every runtime. One-stage families only (RetinaNet, FCOS): Faster R-CNN's second
stage reads RoIs out of the feature maps and is not exported.
"""

from __future__ import annotations

import torch
from torch import nn

from ..detectors.detector import FPNDetector
from ..layers.fpn import Pyramid
from ..layers.heads import Branch, ConvTower, branch_maps
from ..layers.sparse import TowerPlan, conv_weight_as_gemm, dilate_keys, neighbour_rows

BRANCH_ORDER = ("cls", "box", "query")


def export_refusal(model: FPNDetector) -> str | None:
    """Why `model` cannot be exported, or None when it can."""
    branches = model.head_branches(True)
    if any(b.predictor is not None for b in branches.values()):
        return (f"{type(model).__name__} is a two-stage detector (its second stage reads RoIs "
                "from the feature maps): only RetinaNet and FCOS models export")
    return None


def fine_levels(model: FPNDetector, start_level: int) -> list[int]:
    """The levels below CSQ's start level, coarse to fine (the order the cascade runs them)."""
    return [lvl for lvl in sorted(model.levels, reverse=True) if lvl < start_level]


def _named(branches: dict[str, Branch], suffix: str) -> list[str]:
    return [f"{name}_{suffix}" for name in BRANCH_ORDER if name in branches]


class DenseGraph(nn.Module):
    """batch (N, 3, H, W) -> for each level, cls and box maps (N, C_out, H_l, W_l)."""

    def __init__(self, model: FPNDetector) -> None:
        super().__init__()
        self.model = model

    def output_names(self) -> list[str]:
        branches = self.model.head_branches(False)
        return [n for lvl in self.model.levels for n in _named(branches, f"P{lvl}")]

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pyramid = Pyramid(self.model.fpn, self.model.backbone(batch))
        branches = self.model.head_branches(False)
        outs = []
        for lvl in self.model.levels:
            maps = branch_maps(branches, pyramid.dense(lvl))
            outs += [maps[name] for name in BRANCH_ORDER if name in maps]
        return tuple(outs)


class CoarseGraph(nn.Module):
    """batch -> head maps of the levels >= `start_level` (the query map on the start level) and
    the inner maps (N, C, H_l, W_l) of the finer levels."""

    def __init__(self, model: FPNDetector, start_level: int) -> None:
        super().__init__()
        self.model = model
        self.start_level = start_level

    def _coarse(self) -> list[tuple[int, dict[str, Branch]]]:
        return [(lvl, self.model.head_branches(lvl == self.start_level))
                for lvl in self.model.levels if lvl >= self.start_level]

    def output_names(self) -> list[str]:
        names = [n for lvl, branches in self._coarse() for n in _named(branches, f"P{lvl}")]
        return names + [f"inner_P{lvl}" for lvl in fine_levels(self.model, self.start_level)]

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pyramid = Pyramid(self.model.fpn, self.model.backbone(batch))
        outs = []
        for lvl, branches in self._coarse():
            maps = branch_maps(branches, pyramid.dense(lvl))
            outs += [maps[name] for name in BRANCH_ORDER if name in maps]
        outs += [pyramid.inner(lvl) for lvl in fine_levels(self.model, self.start_level)]
        return tuple(outs)


class FineDenseGraph(nn.Module):
    """inner map of `level` (N, C, H, W) -> its head maps, the query map when `with_query`."""

    def __init__(self, model: FPNDetector, level: int, with_query: bool) -> None:
        super().__init__()
        self.model = model
        self.level = level
        self.with_query = with_query

    def output_names(self) -> list[str]:
        return _named(self.model.head_branches(self.with_query), f"P{self.level}")

    def forward(self, inner: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fpn = self.model.fpn
        x = fpn.output[self.level - fpn.first_level](inner)  # (N, C, H, W): P_level
        maps = branch_maps(self.model.head_branches(self.with_query), x)
        return tuple(maps[name] for name in BRANCH_ORDER if name in maps)


def conv_rows(x: torch.Tensor, neighbours: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """One 3x3 conv over rows: x (Q_in, C_in), neighbours (Q_out, 9) rows of x, Q_in meaning
    'off the map or not computed' (the zero row) -> (Q_out, C_out)."""
    c_in = conv.in_channels
    padded = torch.cat([x, x.new_zeros(1, c_in)])  # (Q_in + 1, C_in)
    gathered = padded.index_select(0, neighbours.reshape(-1)).reshape(-1, 9 * c_in)  # (Q_out, 9C)
    return torch.addmm(conv.bias, gathered, conv_weight_as_gemm(conv))  # (Q_out, C_out)


def tower_rows(tower: ConvTower, x: torch.Tensor, tables: tuple[torch.Tensor, ...]
               ) -> torch.Tensor:
    """A tower over rows, conv j reading through tables[j] (the last gives the keys' rows)."""
    last = len(tower.convs) - 1
    for j, conv in enumerate(tower.convs):
        x = conv_rows(x, tables[j], conv)
        if j < last or tower.relu_last:
            x = torch.relu(x)
    return x


class FineSparseGraph(nn.Module):
    """(inner (N, C, H, W), ring (R,), fpn table (Q_0, 9), tower tables (Q_j, 9) x D) -> the
    heads' rows at the keys, (Q_D, C_out) per branch.

    `ring`: linear positions into the level's (N, H, W) grid where the inner map is read. The
    FPN's 3x3 output conv turns them into P_level at the tower's input set through the fpn table;
    tower conv j reads its input set through table j. Every table row holds 9 row numbers in
    (ky, kx) order, the input's row count for a neighbour off the map or outside the set."""

    def __init__(self, model: FPNDetector, level: int, with_query: bool) -> None:
        super().__init__()
        self.model = model
        self.level = level
        self.with_query = with_query

    @property
    def depth(self) -> int:
        return next(iter(self.model.head_branches(True).values())).tower.depth

    def input_names(self) -> list[str]:
        return ["inner", "ring", "fpn_table"] + [f"table_{j + 1}" for j in range(self.depth)]

    def output_names(self) -> list[str]:
        return _named(self.model.head_branches(self.with_query), f"P{self.level}")

    def forward(self, inner: torch.Tensor, ring: torch.Tensor, fpn_table: torch.Tensor,
                *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fpn = self.model.fpn
        channels = fpn.output[0].in_channels
        flat = inner.permute(0, 2, 3, 1).reshape(-1, channels)  # (NHW, C), linear positions
        x = conv_rows(flat.index_select(0, ring), fpn_table,
                      fpn.output[self.level - fpn.first_level])  # (Q_0, C): P_level rows
        branches = self.model.head_branches(self.with_query)
        done: dict[int, torch.Tensor] = {}
        outs = []
        for name in BRANCH_ORDER:
            if name in branches:
                tower = branches[name].tower
                if id(tower) not in done:
                    done[id(tower)] = tower_rows(tower, x, tables)
                outs.append(done[id(tower)])
        return tuple(outs)


def graph_name(kind: str, level: int | None = None, with_query: bool = False) -> str:
    """A graph's name in an export: dense, coarse, fine_dense_P3_query, fine_sparse_P2, ..."""
    if level is None:
        return kind
    return f"fine_{kind}_P{level}" + ("_query" if with_query else "")


def sparse_tables(plan: TowerPlan) -> dict[str, torch.Tensor]:
    """A `FineSparseGraph`'s position inputs for an exact plan: the ring of the inner map the
    FPN conv reads, its neighbour table onto the tower's input set, and each conv's table."""
    ring = dilate_keys(plan.sets[0], plan.shape, 1)
    tables = {"ring": ring, "fpn_table": neighbour_rows(plan.sets[0], ring, plan.shape)}
    for j in range(1, plan.depth + 1):
        tables[f"table_{j}"] = plan.neighbours(j)
    return tables


def export_graphs(model: FPNDetector, start_level: int) -> dict[str, tuple[nn.Module, list[str]]]:
    """Every graph of an export, {name: (module, input names)}: dense, coarse and, per level
    below `start_level`, its dense graph(s) and its sparse graph."""
    graphs: dict[str, tuple[nn.Module, list[str]]] = {
        "dense": (DenseGraph(model), ["batch"]),
        "coarse": (CoarseGraph(model, start_level), ["batch"])}
    for lvl in fine_levels(model, start_level):
        query = lvl > model.levels[0] and model.has_query
        graphs[graph_name("dense", lvl, query)] = (FineDenseGraph(model, lvl, query), ["inner"])
        if query:  # the cascade's 'too busy' path runs a fine level dense without its query
            graphs[graph_name("dense", lvl, False)] = (FineDenseGraph(model, lvl, False), ["inner"])
        sparse = FineSparseGraph(model, lvl, query)
        graphs[graph_name("sparse", lvl, query)] = (sparse, sparse.input_names())
    return graphs


__all__ = ["DenseGraph", "CoarseGraph", "FineDenseGraph", "FineSparseGraph", "export_refusal",
           "fine_levels", "conv_rows", "BRANCH_ORDER", "sparse_tables", "export_graphs", "graph_name"]
