"""A model for a command: the device, the checkpoint loaded into its inference form, and what a
checkpoint says about itself (`querydet info`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from querydet_models.checkpoint import CheckpointError, load_checkpoint
from querydet_models import FPNDetector
from querydet_models.detectors.querydet import build_querydet

from ..core.config import Config, config_from_dict
from ..core.errors import QueryDetError

log = logging.getLogger("querydet")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda` without a GPU is a user error."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise QueryDetError(f"--device: {name!r} is not one of auto, cpu, cuda (or cuda:N)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QueryDetError(f"--device {name}: no CUDA device is available here "
                                "(use --device cpu, or auto)")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise QueryDetError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                "device(s) here")
    log.info("device: %s", name)
    return torch.device(name)


def load_model(weights: str | Path, device: str | torch.device = "cpu",
               runtime: str | None = None, precision: str | None = None
               ) -> tuple[FPNDetector, Config]:
    """Rebuild a model from a checkpoint alone (its embedded config) and load its weights; an
    export folder (`querydet export`) loads as a `GraphDetector` run by `runtime` (auto: the
    fastest installed, see runtime.py) in `precision`."""
    from .runtime import choose_runtime, is_export

    if is_export(weights) or runtime not in (None, "auto", "torch"):
        choose_runtime(runtime, weights)  # a checkpoint with --runtime onnxruntime: one line
        from .runtime import load_export  # exported models run on the CPU

        return load_export(weights, runtime, precision)
    try:
        payload = load_checkpoint(weights)
    except CheckpointError as err:
        raise QueryDetError(str(err)) from None
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("model"), dict):
        raise QueryDetError(f"checkpoint {weights} has no config or no weights: not written by "
                            "querydet train (or damaged)")
    cfg = config_from_dict(payload["config"])
    # every weight is in the checkpoint: the backbone's start weights are not read again
    model = build_querydet(replace(cfg.model, backbone_weights=None), cfg.inference)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise QueryDetError(f"checkpoint {weights} does not match its own config: "
                            f"{str(err).splitlines()[0]}") from None
    model = model.to(resolve_device(device))
    model.prepare_inference(cfg.inference.precision)  # frozen BN folded; eval mode
    return model, cfg


def model_info(weights: str | Path) -> dict:
    """What a checkpoint says about itself: classes, training GSD, model, training data."""
    try:
        payload = load_checkpoint(weights)
    except CheckpointError as err:
        raise QueryDetError(str(err)) from None
    if not isinstance(payload.get("config"), dict):
        raise QueryDetError(f"checkpoint {weights} has no config: not written by querydet train "
                            "(or damaged)")
    cfg = config_from_dict(payload["config"])
    m, d = cfg.model, cfg.data
    extra = payload.get("extra") or {}
    return {"weights": str(weights), "classes": cfg.names(), "category_ids": cfg.category_ids(),
            "gsd_m": d.gsd, "detector": m.detector, "backbone": m.backbone,
            "levels": list(m.levels), "query_levels": list(m.query_levels),
            "inference": {"mode": cfg.inference.mode, "start_level": cfg.inference.start_level,
                          "precision": cfg.inference.precision},
            "data": {"dataset": d.dataset, "train_root": d.train_root,
                     "train_annotations": d.train_annotations},
            "iteration": extra.get("iteration"),
            "parameters": sum(v.numel() for v in payload.get("model", {}).values()
                              if hasattr(v, "numel")),
            "config": cfg.to_dict()}


def format_model_info(info: dict) -> str:
    """`querydet info` as lines for a person."""
    gsd = f"{info['gsd_m']:g} m per pixel" if info["gsd_m"] else \
        "not recorded (inputs are read at their own pixels)"
    data = info["data"]
    where = data["train_annotations"] or data["train_root"] or "generated scenes" \
        if data["dataset"] == "synthetic" else data["train_annotations"] or data["train_root"]
    lines = [f"weights     {info['weights']}",
             f"classes     {', '.join(info['classes'])}",
             f"GSD         {gsd}",
             f"model       {info['detector']} on {info['backbone']}, levels "
             f"P{min(info['levels'])}-P{max(info['levels'])}, "
             + (f"query head on P{', P'.join(map(str, info['query_levels']))}"
                if info["query_levels"] else "no query head"),
             f"inference   mode {info['inference']['mode']}, CSQ from "
             f"P{info['inference']['start_level']}, precision {info['inference']['precision']}",
             f"trained on  {data['dataset']}" + (f": {where}" if where else ""),
             f"parameters  {info['parameters']:,}"]
    return "\n".join(lines)
