"""`detect` keeps freed memory for the next tile: a large block freed and allocated again
touches the same pages, not fresh ones (allocator.py)."""

import subprocess
import sys
import textwrap

import pytest

from querydet_cli.core.allocator import _glibc

# malloc, touch and free a 64 MB block five times; print the minor page faults it cost (C's
# malloc directly: numpy asks for huge pages on large arrays, torch's tensors do not)
SCRIPT = textwrap.dedent("""
    import ctypes, resource, sys
    from querydet_cli.core.allocator import _glibc, keep_freed_memory
    libc = _glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        block = libc.malloc(64 << 20)
        ctypes.memset(block, 1, 64 << 20)
        libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
PAGES = (64 << 20) // 4096  # one block's 4 kB pages


def _faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")
def test_a_freed_block_is_reused_without_new_page_faults():
    assert _faults("system") >= 4 * PAGES  # glibc maps each 64 MB block afresh
    assert _faults("keep") < 2 * PAGES  # the first block's pages, then the same ones again


def test_detect_keeps_freed_memory_only_as_its_own_process(monkeypatch, tmp_path):
    """The `querydet` command's detect asks for it before loading the model; the same app
    called inside another process (a test runner, a notebook) leaves that process's malloc as
    it was."""
    from typer.testing import CliRunner

    from querydet_cli import app as app_module

    from querydet_cli.core import allocator
    from querydet_cli.core.resources import sample_scene

    asked = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: asked.append(1) or True)
    for own, expected in ((True, [1]), (False, [])):
        asked.clear()
        monkeypatch.setattr(allocator, "_OWN_PROCESS", own)
        result = CliRunner().invoke(app_module.app, ["detect", str(sample_scene()), "-o",
                                                     str(tmp_path / "d.geojson"), "--quiet"])
        assert result.exit_code == 0, result.output
        assert asked == expected
