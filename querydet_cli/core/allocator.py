"""Keeping freed memory in the process for the next tile (glibc's malloc).

Every tile allocates the same large activations again. glibc serves each block above its mmap
threshold (at most 32 MB) with a fresh `mmap` and returns it with `munmap` on free, and gives a
freed heap top back to the system above its trim threshold, so the next tile touches new pages:
a page fault and a zeroed 4 kB page each. Measured on the busy 4096^2 raster, `querydet detect`
at its defaults (bf16, 1024 px tiles), 2 cores: 0.5-1.0 million minor faults and 1.2-2.0 s of
system time in a 7.8-8.2 s run. With blocks taken from the heap and the heap kept, 0.18 million
faults and 0.5-0.8 s. The same settings exist as environment variables (`MALLOC_ARENA_MAX`,
`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`), read when a process starts;
`mallopt` sets them from inside it.

The process then keeps its peak heap until it ends: right for a command that runs tiles until
it exits, wrong for a library inside someone else's process, so only `querydet detect` run as
its own process asks for it (app.main), never an import or the app called from another program.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("querydet")

# mallopt parameters (glibc's malloc.h); values are C ints
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = (
    # one arena: a worker thread's arena holds at most 64 MB per heap and maps anything larger
    # afresh; the main one grows as far as needed (busy 8192^2 raster, 2048 px tiles: 0.4
    # million faults against 1.3 million with an arena per thread)
    (M_ARENA_MAX, 1),
    (M_MMAP_MAX, 0),  # no block from mmap: large ones come from the heap too
    (M_TRIM_THRESHOLD, 2**31 - 1),  # the heap's free top goes back only beyond 2 GB
    (M_TOP_PAD, 256 << 20),  # and grows in 256 MB steps (address space: pages when touched)
)


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (musl and others have no such tuning), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from the heap and keep freed memory for reuse.
    True when every setting was taken; False where the C library is not glibc (nothing done)."""
    libc = _glibc()
    if libc is None:
        return False
    taken = all([libc.mallopt(param, value) == 1 for param, value in SETTINGS])
    log.debug("malloc: large blocks from the heap, freed memory kept (%s)",
              "taken" if taken else "refused")
    return taken


# True when this process is the `querydet` command (app.main), not a library or a test runner
# calling the app: only then does detect change how the process allocates
_OWN_PROCESS = False


def claim_process() -> None:
    """Say that this process is the `querydet` command itself (called by app.main)."""
    global _OWN_PROCESS
    _OWN_PROCESS = True


def owns_process() -> bool:
    """Whether this process is the `querydet` command, so its malloc may be tuned."""
    return _OWN_PROCESS
