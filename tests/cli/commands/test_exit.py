"""`querydet` ends with os._exit after its command (app._leave): what a normal exit does must
still happen — exit handlers run, everything written to a pipe arrives, exit codes stay."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from querydet_cli.core.resources import sample_scene

# a user's process: an exit handler registered before the command, then querydet's entry point
SCRIPT = """
import atexit, sys
from pathlib import Path
marker = Path(sys.argv[1])
atexit.register(lambda: marker.write_text("ran"))
sys.argv = ["querydet", *sys.argv[2:]]
from querydet_cli.app import main
main()
print("not reached", flush=True)
"""


def _run(marker: Path, *args: str) -> subprocess.CompletedProcess:
    # block-buffered stdout, as a pipe gives it (PYTHONUNBUFFERED would hide a lost flush)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(marker), *args],
                          capture_output=True, text=True, timeout=300, cwd=marker.parent,
                          env=env)


def test_a_finished_detect_runs_exit_handlers_and_flushes_stdout(tmp_path):
    marker = tmp_path / "atexit"
    run = _run(marker, "detect", str(sample_scene()), "-o", "-", "--quiet")
    assert run.returncode == 0, run.stderr
    assert marker.read_text() == "ran"
    assert "not reached" not in run.stdout
    features = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert len(features) > 10  # every NDJSON line arrived whole through the pipe
    assert all(f["type"] == "Feature" for f in features)


@pytest.mark.parametrize("args,code,said", [
    (["detect", "missing.tif", "-o", "x.geojson"], 2, "missing.tif"),
    (["--version"], 0, "querydet 0.1.0"),
    (["configs"], 0, "retinanet"),
    (["detect", "--no-such-option"], 2, "--no-such-option"),
])
def test_exit_codes_messages_and_handlers_survive_the_fast_exit(tmp_path, args, code, said):
    marker = tmp_path / "atexit"
    run = _run(marker, *args)
    assert run.returncode == code, run.stderr
    assert said in run.stdout + run.stderr  # buffered text into a pipe is flushed first
    assert marker.read_text() == "ran"
    assert not (tmp_path / "x.geojson").exists()
