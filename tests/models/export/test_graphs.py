"""The exported graphs' modules compute the model: sparse rows equal the dense heads at the keys,
and the cascade over graphs (GraphDetector) equals PyTorch's CSQ, with the graphs run by PyTorch
itself (the runtimes are compared in tests/cli/test_export.py)."""

import pytest
import torch

from querydet_models.export.graph_infer import GraphDetector, level_shape
from querydet_models.export.graphs import (CoarseGraph, DenseGraph, FineDenseGraph, FineSparseGraph,
                                    export_graphs, export_refusal, sparse_tables)
from querydet_models.layers.sparse import TowerPlan

from tests.conftest import tiny_model, with_random_heads
from tests.models.detectors.test_faster_rcnn import frcnn_model


def torch_runner(graphs, calls):
    """Runs the graph modules in PyTorch on numpy inputs, as a runtime would."""
    def run(name, inputs):
        calls.append(name)
        module, names = graphs[name]
        with torch.inference_mode():
            outs = module(*(torch.from_numpy(inputs[n]) for n in names))
        return [o.numpy() for o in outs]
    return run


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_sparse_graph_rows_equal_the_dense_heads_at_the_keys(detector):
    model = with_random_heads(tiny_model(detector=detector))
    batch = torch.rand(2, 3, 128, 160)
    with torch.inference_mode():
        coarse = CoarseGraph(model, 4)
        inner = dict(zip(coarse.output_names(), coarse(batch)))
        for lvl in (3, 2):
            q = lvl == 3
            dense = FineDenseGraph(model, lvl, q)(inner[f"inner_P{lvl}"])  # (N, C_out, H, W) each
            sparse = FineSparseGraph(model, lvl, q)
            n, _, h, w = inner[f"inner_P{lvl}"].shape
            keys = torch.unique(torch.randint(0, n * h * w, (60,)))
            inputs = sparse_tables(TowerPlan.exact(keys, (n, h, w), sparse.depth))
            inputs["inner"] = inner[f"inner_P{lvl}"]
            rows = sparse(*(inputs[name] for name in sparse.input_names()))
            assert len(rows) == len(dense) == (3 if q else 2)
            for r, d in zip(rows, dense):
                at_keys = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])[keys]  # (Q, C_out)
                assert torch.allclose(r, at_keys, rtol=1e-4, atol=1e-5)


def test_level_shapes_follow_the_backbone():
    model = tiny_model()
    batch = torch.rand(1, 3, 96, 160)
    with torch.inference_mode():
        maps = DenseGraph(model)(batch)
    cls_maps = maps[::2]
    for lvl, m in zip(model.levels, cls_maps):
        assert level_shape(batch.shape, lvl) == (1, m.shape[2], m.shape[3])


@pytest.mark.parametrize("mode,sigma,fraction", [("csq", 0.15, 1.0), ("csq", 0.15, 0.3),
                                                 ("csq", 0.0, 0.3), ("dense", 0.15, 0.3)])
def test_graph_detector_equals_pytorch(model, images, mode, sigma, fraction):
    calls = []
    graphs = export_graphs(model, 4)
    graph_model = GraphDetector(model, torch_runner(graphs, calls),
                                {n: m.output_names() for n, (m, _) in graphs.items()}, 4, "fp32",
                                runtime="torch")
    kwargs = dict(mode=mode, sigma=sigma, sparse_max_fraction=fraction)
    want = model.forward_inference(images, **kwargs)
    got = graph_model.forward_inference(images, **kwargs)
    for w, g in zip(want, got):
        assert w["boxes"].shape == g["boxes"].shape
        assert torch.allclose(w["boxes"], g["boxes"], atol=1e-3)
        assert torch.allclose(w["scores"], g["scores"], atol=1e-5)
        assert torch.equal(w["labels"], g["labels"])
    if mode == "dense":
        assert calls == ["dense"]
    elif fraction < 1.0:  # random heads query much of the map: the fine levels go dense
        assert "fine_dense_P2" in calls and not any(c.startswith("fine_sparse") for c in calls)
    else:  # never dense: the sparse graphs
        assert calls[0] == "coarse" and "fine_sparse_P3_query" in calls and "fine_sparse_P2" in calls


def test_graph_detector_refuses_what_is_not_exported(model, images):
    graphs = export_graphs(model, 4)
    graph_model = GraphDetector(model, torch_runner(graphs, []),
                                {n: m.output_names() for n, (m, _) in graphs.items()}, 4, "fp32",
                                runtime="torch")
    for kwargs, words in [({"mode": "cq"}, "not exported"), ({"context": "5x5"}, "exact"),
                          ({"start_level": 5}, "export again")]:
        with pytest.raises(ValueError, match=words):
            graph_model.forward_inference(images, **kwargs)


def test_two_stage_models_are_refused():
    frcnn = frcnn_model()
    assert "two-stage" in export_refusal(frcnn)
    assert export_refusal(tiny_model()) is None
