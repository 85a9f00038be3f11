"""The `querydet` command line: thin Typer commands over importable functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import QueryDetError

app = typer.Typer(
    name="querydet",
    help="Find small objects in very large aerial images with QueryDet's Cascade Sparse Query.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _not_built(command: str, issue: int) -> None:
    raise QueryDetError(f"`querydet {command}` is not built yet (tracked in issue {issue})")


@app.command()
def bench(
    *,
    backbone: Annotated[str, typer.Option(help="resnet18/34/50, mobilenet_v2, shufflenet_v2")] = "resnet50",
    image_size: Annotated[int, typer.Option(help="Square input side in pixels (long side for --image)")] = 1024,
    batch: Annotated[int, typer.Option(min=1, max=64, help="Images per batch")] = 1,
    query_density: Annotated[float, typer.Option(help="Fraction of start-level positions queried (simulated small objects); 0 = use the query head and --sigma")] = 0.03,
    sigma: Annotated[float, typer.Option(help="Query threshold")] = 0.15,
    start_level: Annotated[int, typer.Option(help="CSQ start level (Table 4)")] = 4,
    paper_context: Annotated[str, typer.Option(help="Submanifold context of the paper mode: 1x1..11x11")] = "5x5",
    backends: Annotated[str, typer.Option(help="Sparse backends to time for exact CSQ, comma-separated")] = "torch,spconv",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per mode (median reported)")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint to bench instead of random weights")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image file to use instead of random pixels")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
    seed: Annotated[int, typer.Option(help="Seed for weights, input and simulated objects")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout")] = False,
) -> None:
    """Time dense-HR, CSQ (exact, paper context), CQ, CCQ and RetinaNet P3-P7 on one input."""
    from models.config import CONTEXTS

    from .bench import BenchOptions, format_report, run_bench
    from .engine import load_model

    if paper_context not in CONTEXTS or paper_context == "exact":
        raise QueryDetError(f"--paper-context must be one of {', '.join(CONTEXTS[1:])}")
    if not 3 <= start_level <= 6:
        raise QueryDetError(f"--start-level must be in 3..6, got {start_level}")
    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = [b for b in names if b not in ("torch", "spconv")]
    if bad or not names:
        raise QueryDetError(f"--backends: unknown backend {bad[0] if bad else '(none)'} (allowed: torch, spconv)")
    model = None
    if weights is not None:
        model, _ = load_model(weights, device)
    opts = BenchOptions(backbone=backbone, image_size=image_size, batch=batch,
                        query_density=query_density if query_density > 0 else None, sigma=sigma,
                        start_level=start_level, paper_context=paper_context, backends=names,
                        repeats=repeats, device=device, seed=seed, threads=threads)
    from models.config import BACKBONES
    if backbone not in BACKBONES:
        raise QueryDetError(f"--backbone: {backbone!r} is not one of {', '.join(BACKBONES)}")

    def progress(name: str) -> None:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)

    report = run_bench(opts, model=model, image=image, progress=progress)
    if json_out:
        print(json.dumps(report))
    else:
        print(format_report(report))


@app.command()
def detect() -> None:
    """Detect objects in GeoTIFFs and images (not built yet)."""
    _not_built("detect", 4)


@app.command()
def train() -> None:
    """Train QueryDet / RetinaNet (not built yet)."""
    _not_built("train", 3)


@app.command(name="eval")
def evaluate() -> None:
    """Evaluate a checkpoint with the COCO / VisDrone protocols (not built yet)."""
    _not_built("eval", 3)


@app.command()
def tile() -> None:
    """Cut large images into training chips (not built yet)."""
    _not_built("tile", 3)


def main() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit code 2."""
    from models.backbones import BackboneWeightsError
    from models.checkpoint import CheckpointError
    from models.config import ConfigError
    from models.querydet import ModelInputError

    try:
        app()
    except QueryDetError as err:
        print(f"querydet: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (ModelInputError, ConfigError, CheckpointError, BackboneWeightsError) as err:
        print(f"querydet: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("querydet: interrupted", file=sys.stderr)
        sys.exit(130)
