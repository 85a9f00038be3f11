"""querydet's models: pixels and tensors in, boxes out. What callers use, by name:

- `build_querydet(model_config, inference_config)`: a RetinaNet, FCOS or Faster R-CNN host with
  the query head (`QueryDet`, `QueryFCOS`, `QueryFasterRCNN`, all `FPNDetector`s).
- `ModelConfig`, `InferenceConfig`: the frozen configs those are built from.
- `LevelOutput`: what `FPNDetector.predict_levels` returns per FPN level.
- `run_stages(model, images, ..., stage=timer)`: one inference pass stage by stage, a timing
  hook around each (`InferencePass`: detections, levels, batch shape); what `forward_inference`
  runs, for a PyTorch model or its exported graphs.
- `save_checkpoint`, `load_checkpoint`, `CheckpointError`, `copy_matching_weights`.
- `ModelError`, `ModelInputError`: what bad inputs raise.
- `spconv_available()`, `query_target_map(...)`.

Names load on first use (PEP 562), so importing `querydet_models.config` alone (as the CLI's
`--help` does) does not import torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "FPNDetector": "detectors.detector", "ModelInputError": "detectors.detector",
    "QueryDet": "detectors.querydet", "build_querydet": "detectors.querydet",
    "QueryFCOS": "detectors.fcos", "QueryFasterRCNN": "detectors.faster_rcnn",
    "ModelConfig": "config", "InferenceConfig": "config", "ConfigError": "config",
    "LevelOutput": "query.query_infer",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint", "copy_matching_weights": "checkpoint",
    "ModelError": "errors",
    "spconv_available": "layers.sparse",
    "query_target_map": "query.query_targets",
    "run_stages": "detectors.stages", "InferencePass": "detectors.stages",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'querydet_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
