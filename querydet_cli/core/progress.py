"""Progress on stderr that suits where stderr goes.

On a terminal: a tqdm bar. Into a file or a pipe (a batch job's log): one plain line every
`every` steps or `seconds` seconds, whichever comes first, and one at the end; never carriage
returns, so a log of a long run stays a log of lines.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The tqdm calls querydet uses (`update`, `set_postfix`, `close`), written as lines."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 every: int = 0, seconds: float = 30.0, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.every = every or max(1, (total or 100) // 20)  # about twenty lines a run
        self.seconds = seconds
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self._started = time.monotonic()
        self._first = initial
        self._last_line = self._started
        self._last_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n - self._last_n >= self.every or now - self._last_line >= self.seconds:
            self._line(now)

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = False,
                    **more: Any) -> None:
        self.postfix = dict(values or {}) | more

    def _line(self, now: float) -> None:
        elapsed = now - self._started
        rate = (self.n - self._first) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts.append(f"{self.n / self.total:.0%}")
        parts.append(f"{rate:.2f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        print("querydet: " + ", ".join(parts), file=self.stream, flush=True)
        self._last_line, self._last_n = now, self.n

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if not self._closed and self.n != self._last_n:
            self._line(time.monotonic())
        self._closed = True


class _Silent:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
             disable: bool = False, every: int = 0, leave: bool = True):
    """A bar on a terminal, lines into a log, nothing when `disable`."""
    if disable:
        return _Silent()
    if _is_terminal(sys.stderr):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                    dynamic_ncols=True, leave=leave)
    return LineProgress(total, desc, unit, initial, every)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_bar(name: str, total: int, unit: str = "tile"):
    """Tiles of one raster (or frames of one video) on stderr: a bar on a terminal, plain lines
    into a log file."""
    return progress(total, name, unit=unit, leave=False)
