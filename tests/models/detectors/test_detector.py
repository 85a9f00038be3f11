"""The detector protocol (protocol.py): what `detect` reads of a model is declared, not probed;
`FPNDetector` implements it, and its weights digest follows its weights."""

import torch

from querydet_models.detectors.protocol import InferenceDetector
from tests.conftest import tiny_model


def test_fpn_detector_declares_the_protocol():
    model = tiny_model()
    assert isinstance(model, InferenceDetector)
    assert (model.runtime, model.own_threads, model.size_divisibility) == ("torch", False, 32)


def test_the_weights_digest_follows_the_weights():
    a, b = tiny_model(), tiny_model()
    b.load_state_dict(a.state_dict())
    assert a.weights_digest() == b.weights_digest()
    assert len(a.weights_digest()) == 64
    with torch.no_grad():
        next(iter(b.head.parameters())).view(-1)[0] += 1e-3
    assert a.weights_digest() != b.weights_digest()


def test_the_pipeline_reads_the_protocol_not_attributes_probed():
    """No caller asks a model whether it has an attribute: the house's rule, checked in code."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    probes = []
    for path in (root / "querydet_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr",
                                                                                "hasattr") \
                    and isinstance(node.args[0], ast.Name) \
                    and node.args[0].id in ("model", "producer", "detector"):
                probes.append(f"{path.name}:{node.lineno}")
    assert not probes, probes
