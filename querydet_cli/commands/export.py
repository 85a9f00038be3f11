"""`querydet export`: a checkpoint as ONNX or OpenVINO graphs (export.py, quantize.py)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .shared import app


class ExportFormat(str, Enum):
    onnx = "onnx"
    openvino = "openvino"


@app.command()
def export(
    weights: Annotated[Optional[Path], typer.Argument(help="Checkpoint (default: the bundled sample model)")] = None,
    *,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write (new, empty, or an earlier export, which is replaced once the new one is complete)")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="onnx (onnxruntime, OpenVINO, other ONNX tools) or openvino (IR: .xml + .bin)")] = ExportFormat.onnx,
    start_level: Annotated[Optional[int], typer.Option(min=2, max=7, help="CSQ start level of the exported graphs (default: the checkpoint's)")] = None,
    calibrate: Annotated[Optional[Path], typer.Option(help="Chips to calibrate int8 graphs on: a folder of images (a querydet tile output too) or a raster")] = None,
    calibrate_count: Annotated[int, typer.Option(min=1, max=4096, help="Chips (or 1024 px windows) read for calibration")] = 32,
) -> None:
    """Export a model for onnxruntime or OpenVINO: dense and CSQ graphs, a manifest, a check
    against PyTorch; int8 graphs with --calibrate. Run it with detect --weights FOLDER."""
    from ..runtimes.export import export_model, format_report
    from ..core.resources import sample_model

    report = export_model(weights or sample_model(), output, fmt.value, start_level,
                          str(calibrate) if calibrate else None, calibrate_count)
    print(format_report(report))
