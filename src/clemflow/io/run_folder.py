"""One folder per run: the protocol as run, the journal, and the data, written once.

Opening a folder that already holds a run of the same protocol resumes it; a
folder holding anything else is refused, so nothing acquired is ever
overwritten. The layout is documented in docs/run-folder.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..protocol import Protocol
from ..schedule.clock import Clock, RealClock, isoformat
from .journal import Journal

__all__ = ["RunFolder", "RunFolderError"]

RUN_FILE = "run.json"
PROTOCOL_FILE = "protocol.yaml"
RESOLVED_FILE = "protocol.resolved.json"
JOURNAL_FILE = "journal.jsonl"


class RunFolderError(Exception):
    """The folder cannot take this run; the message says what to do instead."""


def _write_once(path: Path, text: str) -> None:
    """Write a new file durably; never replaces an existing one."""
    with path.open("x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _interrupted_creation(path: Path, protocol_text: str, resolved: str) -> bool:
    """True if the folder holds nothing but (parts of) the protocol copies a creation writes first."""
    names = {p.name for p in path.iterdir()}
    if not names or not names <= {PROTOCOL_FILE, RESOLVED_FILE}:
        return False
    expected = {PROTOCOL_FILE: protocol_text, RESOLVED_FILE: resolved + "\n"}
    return all(expected[n].startswith((path / n).read_text(encoding="utf-8")) for n in names)


@dataclass
class RunFolder:
    path: Path
    run_id: str
    journal: Journal
    resumed: bool

    @classmethod
    def open(cls, path: str | Path, protocol: Protocol, protocol_text: str, clock: Clock | None = None) -> "RunFolder":
        """Create a run folder, or reopen one holding a run of the same protocol."""
        path = Path(path)
        clock = clock or RealClock()
        resolved = protocol.model_dump_json(indent=2)
        digest = hashlib.sha256(resolved.encode()).hexdigest()
        run_file = path / RUN_FILE
        if run_file.exists():
            record = json.loads(run_file.read_text(encoding="utf-8"))
            if record.get("protocol_sha256") != digest:
                raise RunFolderError(
                    f"{path} holds a run of a different protocol (experiment {record.get('experiment')!r}); "
                    "its data are kept as they are. Choose a new --out folder, or run the original protocol to resume."
                )
            journal = Journal(path / JOURNAL_FILE, clock)
            journal.append("run", "resumed", torn_lines=journal.torn_lines)
            return cls(path, record["run_id"], journal, resumed=True)
        if path.exists() and _interrupted_creation(path, protocol_text, resolved):
            # A crash between the first file and run.json: only our own protocol copies are there.
            for name in (PROTOCOL_FILE, RESOLVED_FILE):
                (path / name).unlink(missing_ok=True)
        if path.exists() and any(path.iterdir()):
            raise RunFolderError(
                f"{path} is not empty and holds no clemflow run; nothing in it was touched. Choose a new or empty --out folder."
            )
        path.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        _write_once(path / PROTOCOL_FILE, protocol_text)
        _write_once(path / RESOLVED_FILE, resolved + "\n")
        record = {
            "run_id": run_id,
            "experiment": protocol.experiment.name,
            "created": isoformat(clock.now()),
            "clemflow_version": __version__,
            "host": platform.node(),
            "protocol_sha256": digest,
        }
        # run.json goes last: its presence marks a complete, resumable folder.
        _write_once(run_file, json.dumps(record, indent=2) + "\n")
        journal = Journal(path / JOURNAL_FILE, clock)
        journal.append("run", "created", run_id=run_id, experiment=protocol.experiment.name)
        return cls(path, run_id, journal, resumed=False)
