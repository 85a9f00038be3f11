"""Inputs of `querydet detect`: files, folders, globs, stdin; and the output-over-input check.

Kept free of torch so the CLI can check its arguments before loading anything.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Iterable

from ..core.errors import QueryDetError

IMAGE_SUFFIXES = {".tif", ".tiff", ".jpg", ".jpeg", ".png", ".jp2", ".vrt", ".img", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v"}  # read frame by frame (video.py)


def is_video(path: str | Path) -> bool:
    """A video by its suffix (MP4, MOV, MKV)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def expand_inputs(args: list[str], stdin: Iterable[str] | None = None) -> list[str]:
    """Files, directories (their images, sorted), globs, and '-' (paths read from stdin)."""
    out: list[str] = []
    for arg in args:
        if arg == "-":
            lines = stdin if stdin is not None else sys.stdin
            out.extend(line.strip() for line in lines if line.strip())
        elif arg.startswith("/vsi") or "://" in arg:  # GDAL paths and URLs: rasterio's to open
            out.append(arg)
        elif any(ch in arg for ch in "*?[") and not Path(arg).exists():
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise QueryDetError(f"no files match {arg!r}")
            out.extend(matches)
        elif Path(arg).is_dir():
            found = sorted(str(p) for p in Path(arg).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not found:
                raise QueryDetError(f"directory {arg} holds no images or videos "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
            out.extend(found)
        else:
            out.append(arg)
    if not out:
        raise QueryDetError("no input images given")
    return out


def refuse_output_over_inputs(output: str, inputs: list[str]) -> None:
    """An output that is one of the inputs (same file, through a symlink or a hard link too)
    would overwrite it: refused before anything runs."""
    if output == "-" or not os.path.exists(output):
        return
    for path in inputs:
        try:
            same = os.path.samefile(output, path)
        except OSError:
            continue
        if same:
            raise QueryDetError(f"output {output} is the input {path}: it would be overwritten; "
                                "choose another output")
