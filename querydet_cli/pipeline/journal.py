"""The journal of a `detect` run: final detections and progress beside the output.

Final detections are appended (NDJSON, flushed per tile row) to `.NAME.querydet-partial/`
next to the output, with a state file saying how far each input got, so an interrupted run
leaves no output that looks finished and `--resume` continues from the last finished row.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

from ..core.errors import QueryDetError
from ..core.locking import OutputLock, journal_dir
from ..outputs.records import Detection

# part of a run's key (identity.run_key): a journal of another format is not continued.
# 2: each checkpoint carries the valid masks of the tiles pending detections can reach
JOURNAL_VERSION = 2


class Journal:
    """Final detections and progress of a run, beside the output, for atomic writes and --resume.

    The folder holds a lock (`locking.OutputLock`): one run writes an output at a time.
    """

    def __init__(self, output: str, key: str, resume: bool,
                 lock: OutputLock | None = None) -> None:
        self.dir = journal_dir(output)
        self.records = self.dir / "detections.ndjson"
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = {"key": key, "inputs": {}}
        self._fh = None
        created = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise QueryDetError(f"cannot create the journal folder {self.dir}: "
                                f"{err.strerror or err}") from None
        if lock is not None and lock.held:  # claimed by the caller (claim_output)
            self.lock = lock
        else:
            self.lock = OutputLock(self.dir / "lock", output)
            try:
                self.lock.acquire()
            except QueryDetError:
                if created:
                    shutil.rmtree(self.dir, ignore_errors=True)
                raise
        if resume and self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            if state.get("key") != key:
                self.lock.release()
                raise QueryDetError("--resume: the interrupted run used other inputs (or they "
                                    "changed since), options or weights, or another querydet; "
                                    "run again without --resume")
            self.state = state
            self._truncate_records(state.get("records_bytes", 0))
        else:
            self._clear()
            self.records.touch()
        self.resumed_records = self.state.get("records_count", 0)
        self._count = self.resumed_records
        self._fh = open(self.records, "a")

    def _clear(self) -> None:
        """Empty the folder of an earlier run, keeping our lock file."""
        for p in self.dir.iterdir():
            if p.name == "lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _truncate_records(self, size: int) -> None:
        with open(self.records, "r+") as fh:  # drop records written after the last saved state
            fh.truncate(size)

    def input_state(self, index: int) -> dict[str, Any]:
        return self.state["inputs"].get(str(index), {})

    def append(self, records: list[Detection]) -> None:
        for d in records:
            self._fh.write(json.dumps(d.to_json()) + "\n")
        self._count += len(records)

    def read(self) -> Iterator[Detection]:
        """The journal's records, one at a time (after `close_records`)."""
        with open(self.records) as fh:
            for line in fh:
                if line.strip():
                    yield Detection.from_json(json.loads(line))

    def checkpoint(self, index: int, state: dict[str, Any]) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.state["inputs"][str(index)] = state
        self.state["records_bytes"] = self.records.stat().st_size
        self.state["records_count"] = self._count
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_path)

    def close_records(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:  # the disk is full: records after the last checkpoint are
                pass  # dropped anyway (--resume truncates to the checkpoint)

    def close(self) -> None:
        """Close the records and release the lock; the folder stays for --resume."""
        self.close_records()
        self.lock.release()

    def remove(self) -> None:
        """Delete the journal (the run is complete), then release the lock."""
        self.close_records()
        self._clear()
        self.lock.release(remove=True)
        try:
            self.dir.rmdir()
        except OSError:  # another run created its lock here meanwhile: its folder now
            pass
