"""Writing detections into one output, atomically when it is a file.

File outputs go to a temporary file beside the target and are renamed into place only when
complete, so a failed or interrupted run never leaves a truncated file that looks finished.
What a format writes is its class in formats.py; this module only owns the file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, TextIO

from ..core.errors import QueryDetError
from .formats import Format
from .records import Detection


class OutputWriter:
    """Streams records into one output: a temporary file renamed into place when complete (or
    stdout). Use as a context manager; an exception aborts it."""

    def __init__(self, output: str, fmt: type[Format], crs: str | None, rfc7946: bool = False,
                 fields: tuple[str, ...] = ()) -> None:
        """`fields`: the video fields the records carry (records.VIDEO_FIELDS), as columns."""
        self.output = output
        self.fmt = fmt
        self.fields = fields
        self.crs = "EPSG:4326" if rfc7946 else crs  # may be set until __enter__ (stdout)
        self.rfc7946 = rfc7946
        self.count = 0
        self._tmp: str | None = None
        self._fh: TextIO | None = None
        self._format: Format | None = None

    def __enter__(self) -> "OutputWriter":
        if self.output == "-":
            if not self.fmt.text:
                raise QueryDetError(f"{self.fmt.label} cannot be written to stdout: give a "
                                    "file name")
            self._fh = sys.stdout
        else:
            target = Path(self.output)
            if target.is_dir():
                raise QueryDetError(f"output {target} is a directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial"
                                             + target.suffix, dir=target.parent)
            os.close(fd)
            if self.fmt.text:
                os.unlink(self._tmp)
                self._fh = open(self._tmp, "w", newline="")
        self._format = self.fmt(self._fh, self.crs, self.rfc7946, self._tmp, self.fields)
        self._format.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        self._format.end()
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        if self._tmp is not None:
            os.replace(self._tmp, self.output)
            self._tmp = None

    def abort(self) -> None:
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.close()
        if self._tmp is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._tmp = None

    def write(self, records: Iterable[Detection]) -> None:
        for d in records:
            self._format.write(d, self.count)
            self.count += 1
        if self._fh is not None and self._fh is sys.stdout:
            self._fh.flush()
