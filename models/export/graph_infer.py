"""Dense and CSQ inference with the network run as exported graphs (see `graphs.py`).

Letters: N batch, C channels, Q positions, D tower depth.

`GraphDetector` answers the calls `detect` makes of an `FPNDetector` (preprocess,
extract_features, predict_levels, detections) with the graphs run by a `GraphRunner`: any callable
`runner(name, inputs) -> outputs` over numpy arrays, such as an onnxruntime or OpenVINO session
(the CLI's `runtime.py`). The cascade itself (which positions the queries pick, when a level is
cheaper dense, the neighbour tables) is `query_infer`'s, shared with PyTorch inference; anchors,
decoding and NMS are the model family's own, run on the rows in PyTorch.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ..detectors.detector import FPNDetector
from .graphs import BRANCH_ORDER, graph_name, sparse_tables  # noqa: F401 (graph_name re-exported)
from ..query.query_infer import (LevelOutput, QueryInference, QueryOptions, plan_macs, rows_of_map,
                          tower_macs, unique_towers)
from ..layers.sparse import TowerPlan
from ..detectors.stages import run_stages

GraphRunner = Callable[[str, dict[str, np.ndarray]], list[np.ndarray]]


def level_shape(batch_shape: tuple[int, ...], level: int) -> tuple[int, int, int]:
    """(N, H, W) of P_level for a batch (N, 3, H, W): every stride-2 stage rounds up."""
    n, _, h, w = batch_shape
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return n, h, w


class GraphPyramid:
    """One batch's graph outputs, computed on first need: the dense graph, or the coarse graph
    and the fine levels' graphs."""

    def __init__(self, batch: torch.Tensor, runner: GraphRunner, levels: tuple[int, ...],
                 output_names: dict[str, list[str]]) -> None:
        self.batch = batch.float().contiguous().numpy()
        self.runner = runner
        self.levels = levels
        self.output_names = output_names
        self._ran: dict[str, dict[str, torch.Tensor]] = {}

    def shape(self, level: int) -> tuple[int, int, int]:
        return level_shape(self.batch.shape, level)

    def outputs(self, name: str, inputs: dict[str, np.ndarray] | None = None
                ) -> dict[str, torch.Tensor]:
        """The named graph's outputs by name; whole-batch graphs (no `inputs`) run once."""
        if inputs is None and name in self._ran:
            return self._ran[name]
        arrays = self.runner(name, {"batch": self.batch} if inputs is None else inputs)
        found = {k: torch.from_numpy(np.asarray(v, dtype=np.float32))
                 for k, v in zip(self.output_names[name], arrays)}
        if inputs is None:
            self._ran[name] = found
        return found


class GraphInference(QueryInference):
    """`QueryInference` with each level's heads run by graphs: the coarse graph's maps from the
    start level up, a fine level's dense or sparse graph below it."""

    def __init__(self, model: FPNDetector, options: QueryOptions, export_start: int,
                 forced_queries: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__(model.head_branches, options, forced_queries)
        self.export_start = export_start

    def _maps(self, level: int, features: GraphPyramid, with_query: bool
              ) -> dict[str, torch.Tensor]:
        if self.options.mode == "dense":
            found = features.outputs("dense")
        elif level >= self.export_start:
            found = features.outputs("coarse")
        else:
            inner = features.outputs("coarse")[f"inner_P{level}"].numpy()
            found = features.outputs(graph_name("dense", level, with_query), {"inner": inner})
        return {name: found[f"{name}_P{level}"] for name in BRANCH_ORDER
                if f"{name}_P{level}" in found and (name != "query" or with_query)}

    def _dense_level(self, level: int, features: GraphPyramid, with_query: bool) -> LevelOutput:
        t0 = time.perf_counter()
        rows = {name: rows_of_map(m) for name, m in self._maps(level, features, with_query).items()}
        cls, box = rows["cls"], rows["box"]  # (NHW, C_out)
        query = rows["query"][:, 0] if "query" in rows else None
        branches = self.branches(with_query)
        macs = self._macs(branches, lambda tower: tower_macs(tower, cls.shape[0]), cls.shape[0])
        return LevelOutput(level, features.shape(level), torch.arange(cls.shape[0]), cls, box,
                           query, macs, macs, time.perf_counter() - t0)

    def _sparse_level(self, level: int, features: GraphPyramid, keys: torch.Tensor,
                      with_query: bool) -> LevelOutput:
        t0 = time.perf_counter()
        shape = features.shape(level)
        plan = TowerPlan.exact(keys, shape, self.depth)
        n_pos = shape[0] * shape[1] * shape[2]
        branches = self.branches(with_query)
        dense = self._macs(branches, lambda tower: tower_macs(tower, n_pos), n_pos)
        tower = unique_towers(branches)[0]
        if plan_macs(tower, plan) > self.options.sparse_max_fraction * tower_macs(tower, n_pos):
            return self._dense_fallback(level, features, plan.keys, with_query, dense)
        names = [n for n in BRANCH_ORDER if n in branches]
        if keys.numel() == 0:
            empty = {n: torch.zeros(0, branches[n].tower.convs[-1].out_channels) for n in names}
            return LevelOutput(level, shape, keys, empty["cls"], empty["box"],
                               empty["query"][:, 0] if with_query else None, 0.0, dense)
        inputs = {name: t.numpy() for name, t in sparse_tables(plan).items()}
        inputs["inner"] = features.outputs("coarse")[f"inner_P{level}"].numpy()
        found = features.outputs(graph_name("sparse", level, with_query), inputs)
        rows = {n: found[f"{n}_P{level}"] for n in names}
        macs = self._macs(branches, lambda t: plan_macs(t, plan), plan.keys.numel())
        return LevelOutput(level, shape, plan.keys, rows["cls"], rows["box"],
                           rows["query"][:, 0] if with_query else None, macs, dense,
                           time.perf_counter() - t0)


class GraphDetector:
    """A detector whose network runs as exported graphs, with the public inference methods of
    `FPNDetector`: `detect`, the Python API and the benches use it unchanged.

    Args:
        shell: the same model family built from the export's config; it lends preprocessing,
            the head's structure (for the cascade's plans) and post-processing, never weights.
        runner: runs a graph by name on numpy inputs.
        output_names: each graph's output names, in the runner's order.
        start_level: the start level the CSQ graphs were exported for.
        precision: what the runner computes in (fp32, bf16, int8), for reports.
        runtime: what runs the graphs ("onnxruntime", "openvino", or "torch" in tests).
        export_digest: the digest of the weights recorded when they were exported.

    It implements `detectors.protocol.InferenceDetector`; its runtime keeps threads of its own.
    """

    own_threads = True

    def __init__(self, shell: FPNDetector, runner: GraphRunner,
                 output_names: dict[str, list[str]], start_level: int, precision: str, *,
                 runtime: str, export_digest: str = "") -> None:
        self.runtime = runtime
        self.export_digest = export_digest
        self.shell = shell
        self.runner = runner
        self.output_names = output_names
        self.start_level = start_level
        self.precision = precision
        self.levels = shell.levels
        self.size_divisibility = shell.size_divisibility
        self.inference = shell.inference
        self.num_classes = shell.num_classes

    @property
    def has_query(self) -> bool:
        return self.shell.has_query and "coarse" in self.output_names

    def resolved_precision(self, precision: str = "auto") -> str:
        """The runner's precision is chosen when it is loaded; `auto` keeps it."""
        if precision not in ("auto", self.precision):
            raise ValueError(f"this exported model runs in {self.precision}, not {precision} "
                             "(the precision is chosen when the export is loaded)")
        return self.precision

    set_precision = resolved_precision

    def weights_digest(self) -> str:
        """The digest recorded when the weights were exported."""
        return self.export_digest

    def compute(self, precision: str | None = None):
        return torch.inference_mode()

    def preprocess(self, images):
        return self.shell.preprocess(images)

    def inference_for(self, score_threshold: float | None = None):
        return self.shell.inference_for(score_threshold)

    def extract_features(self, batch: torch.Tensor) -> GraphPyramid:
        return GraphPyramid(batch, self.runner, self.levels, self.output_names)

    def predict_levels(self, features: GraphPyramid, *, mode: str | None = None,
                       sigma: float | None = None, start_level: int | None = None,
                       context: str | None = None, backend: str | None = None,
                       forced_queries: dict[int, torch.Tensor] | None = None,
                       sparse_max_fraction: float | None = None,
                       valid: torch.Tensor | None = None) -> list[LevelOutput]:
        """Head outputs per level, dense or CSQ (exact context, the export's start level)."""
        d = self.inference
        options = QueryOptions(
            mode=d.mode if mode is None else mode, sigma=d.sigma if sigma is None else sigma,
            start_level=self.start_level, context="exact",
            sparse_max_fraction=(d.sparse_max_fraction if sparse_max_fraction is None
                                 else sparse_max_fraction))
        check_graph_options(options.mode, start_level, context, self.start_level)
        if not self.has_query:
            options = QueryOptions(mode="dense")
        return GraphInference(self.shell, options, self.start_level, forced_queries)(features,
                                                                                   valid)

    def detections(self, outputs: list[LevelOutput], image_sizes: list[tuple[int, int]],
                   features: GraphPyramid | None = None, score_threshold: float | None = None
                   ) -> list[dict[str, torch.Tensor]]:
        return self.shell.detections(outputs, image_sizes, None, score_threshold)

    def forward_inference(self, images, **mode) -> list[dict[str, torch.Tensor]]:
        """Detections per image, as `FPNDetector.forward_inference`."""
        with self.compute():
            return run_stages(self, images, **mode).detections

    __call__ = forward_inference


def check_graph_options(mode: str, start_level: int | None, context: str | None,
                        export_start: int) -> None:
    """ValueError naming what exported graphs cannot do: modes other than dense and CSQ, the
    submanifold contexts, another start level than the export's."""
    if mode not in ("dense", "csq"):
        raise ValueError(f"mode {mode!r} is not exported: exported models run dense or csq")
    if context not in (None, "exact"):
        raise ValueError(f"context {context!r} is not exported: exported CSQ is exact")
    if start_level not in (None, export_start):
        raise ValueError(f"the CSQ graphs were exported to start at P{export_start}, not "
                         f"P{start_level}: export again with --start-level {start_level}")


__all__ = ["GraphDetector", "GraphInference", "GraphPyramid", "GraphRunner", "graph_name",
           "level_shape", "check_graph_options"]
