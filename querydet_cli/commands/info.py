"""`querydet configs` and `querydet info`: what the bundled configs and a model are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .shared import app


@app.command()
def configs() -> None:
    """List the bundled configs: name, family, backbone, dataset, head levels, CSQ."""
    from ..core.config import load_config
    from ..core.resources import config_names

    for name in config_names():
        cfg = load_config(name)
        m = cfg.model
        levels = f"P{min(m.levels)}-P{max(m.levels)}"
        csq = f"CSQ from P{cfg.inference.start_level}" if m.query_levels else "no query head"
        print(f"{name:40s} {m.detector:12s} {m.backbone:14s} {cfg.data.dataset:10s} {levels:7s} {csq}")


@app.command()
def info(
    weights: Annotated[Optional[Path], typer.Argument(help="Checkpoint (default: the bundled sample model)")] = None,
    *,
    json_out: Annotated[bool, typer.Option("--json", help="Everything as JSON, the full config included")] = False,
) -> None:
    """What a model is: its classes, the ground resolution (GSD) it was trained at, its config and training data."""
    from ..runtimes.loading import format_model_info, model_info
    from ..core.resources import sample_model

    found = model_info(weights or sample_model())
    print(json.dumps(found) if json_out else format_model_info(found))
