"""One writer per output: an OS-level lock that the kernel releases when its process dies.

`flock` on a small file: a second run that wants the same output (or `--resume` while the first
still runs) is refused at once, naming the other process. A `kill -9` leaves the file, but no
lock on it, so the next run takes it. The lock file may be removed by its holder (a finished
journal is deleted); a waiter that locked a file already unlinked notices and tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import QueryDetError


class OutputLock:
    """An exclusive lock on `path` (created if absent); `what` names the output in messages."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise QueryDetError(f"{self.what} is being written by another querydet run "
                                    f"(pid {holder}); wait for it to end, or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # the holder removed the file between our open and our lock: retry
        raise QueryDetError(f"{self.what}: could not take the lock {self.path}")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, remove: bool = False) -> None:
        """Unlock; with `remove`, delete the lock file first (still holding the lock)."""
        if self._fd is None:
            return
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def journal_dir(output: str | Path) -> Path:
    """The hidden folder beside an output that holds its journal and its lock; refused when a
    link or a file stands there (querydet would write, and clear, wherever it points)."""
    target = Path(output)
    folder = target.with_name(f".{target.name}.querydet-partial")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise QueryDetError(f"{folder} is in the way of {output}'s journal (a link or a file, "
                            "not querydet's folder): remove it and run again")
    return folder


@contextlib.contextmanager
def claim_output(output: str | Path) -> Iterator[OutputLock]:
    """Hold the lock of `output` for a whole run, taken before anything slow (loading torch).

    If the run fails before its journal holds anything, the folder made here is removed again,
    so an error leaves nothing behind.
    """
    folder = journal_dir(output)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QueryDetError(f"cannot create the journal folder {folder}: "
                            f"{err.strerror or err}") from None
    lock = OutputLock(folder / "lock", str(output))
    try:
        lock.acquire()
    except QueryDetError:
        if created:
            _remove_if_only_lock(folder)
        raise
    try:
        yield lock
    except BaseException:
        if lock.held and _only_lock(folder):
            lock.release(remove=True)
            _remove_if_only_lock(folder)
        raise
    finally:
        lock.release()


def _only_lock(folder: Path) -> bool:
    try:
        return {p.name for p in folder.iterdir()} <= {"lock"}
    except FileNotFoundError:
        return False


def _remove_if_only_lock(folder: Path) -> None:
    if _only_lock(folder):
        try:
            (folder / "lock").unlink(missing_ok=True)
            folder.rmdir()
        except OSError:
            pass
