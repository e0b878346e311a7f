"""The idempotency record: which keyed requests ran, and how they ended, kept on disk.

This is what stops a mill from running twice. ``started`` is written and
fsynced *before* the backend is called, the end after; the file is append-only
JSON lines, reloaded at start. A key that started but has no end was cut off
by a crash: it becomes ``interrupted`` and is never run again by the server.
A torn last line (the crash hit mid-write) is skipped: if it was a ``started``
line, its fsync never returned, so the backend was never called.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire

__all__ = ["Record", "RecordEntry", "RECORD_FILE"]

log = logging.getLogger(__name__)

RECORD_FILE = "record.jsonl"


@dataclass
class RecordEntry:
    """One key: what was asked, and (once ended) the outcome a replay returns."""

    key: str
    command: str
    args: str  # canonical JSON of the arguments as received
    state: str  # started, done, failed, interrupted
    started: float
    operation: str | None = None  # long operations: the operation id
    ended: float | None = None
    reply: dict[str, Any] | None = None  # set commands: the reply body (without id)
    final: dict[str, Any] | None = None  # long operations: the final OPERATION
    result: Any = None  # long operations: the result (a frame's metadata, never its pixels)
    extra: dict[str, Any] = field(default_factory=dict)

    def same_request(self, command: str, canonical_args: str) -> bool:
        return self.command == command and self.args == canonical_args


class Record:
    """Append-only ``record.jsonl`` in ``directory``; one instance per server process."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / RECORD_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, RecordEntry] = {}
        self._by_operation: dict[str, str] = {}
        self.torn_lines = 0
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._end_torn_tail()
        self.interrupted_at_load = [e.key for e in self._entries.values() if e.state == "started"]
        for key in self.interrupted_at_load:
            line = {"kind": "interrupted", "key": key, "t": time.time()}
            self._write(line)
            self._apply(line)
            log.warning("record: %r started before the last stop and has no end: interrupted, not re-run", key)

    # -- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> RecordEntry | None:
        with self._lock:
            return self._entries.get(key)

    def by_operation(self, operation: str) -> RecordEntry | None:
        with self._lock:
            key = self._by_operation.get(operation)
            return self._entries.get(key) if key is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    # -- writing ------------------------------------------------------------------------------

    def begin(self, key: str, command: str, canonical_args: str, operation: str | None = None) -> RecordEntry:
        """Write ``started`` and fsync; only after this returns may the backend be called."""
        line = {"kind": "started", "key": key, "command": command, "args": canonical_args, "operation": operation, "t": time.time()}
        with self._lock:
            if key in self._entries:
                raise KeyError(f"key {key!r} is already in the record")
            self._write(line)
            return self._apply(line)

    def finish(self, key: str, state: str, *, reply: dict[str, Any] | None = None,
               final: dict[str, Any] | None = None, result: Any = None) -> None:
        """Write the end of a keyed request (``done`` or ``failed``) with what a replay returns."""
        line = {"kind": "end", "key": key, "state": state, "reply": reply, "final": final, "result": result, "t": time.time()}
        with self._lock:
            self._write(line)
            self._apply(line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- internals ----------------------------------------------------------------------------

    def _write(self, line: dict[str, Any]) -> None:
        data = wire.dumps(line) + b"\n"
        if self._fd < 0:
            raise RuntimeError("the record is closed")
        written = os.write(self._fd, data)
        if written != len(data):  # a full disk: never pretend it was recorded
            raise OSError(f"record: wrote {written} of {len(data)} bytes to {self.path}")
        os.fsync(self._fd)

    def _apply(self, line: dict[str, Any]) -> RecordEntry:
        kind, key = line["kind"], line["key"]
        if kind == "started":
            entry = RecordEntry(key=key, command=line["command"], args=line["args"], state="started",
                                started=line["t"], operation=line.get("operation"))
            self._entries[key] = entry
            if entry.operation:
                self._by_operation[entry.operation] = key
            return entry
        entry = self._entries[key]
        entry.ended = line["t"]
        if kind == "interrupted":
            entry.state = "interrupted"
        else:
            entry.state = line["state"]
            entry.reply, entry.final, entry.result = line.get("reply"), line.get("final"), line.get("result")
        return entry

    def _load(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("no end of line")
                    line = wire.loads(raw)
                    if line["kind"] != "started" and line["key"] not in self._entries:
                        raise ValueError(f"{line['kind']} of a key that never started")
                    self._apply(line)
                except Exception as exc:  # a torn or foreign line must not stop the server from starting
                    self.torn_lines += 1
                    log.warning("record %s line %d skipped (%s)", self.path, number, exc)

    def _end_torn_tail(self) -> None:
        """Give a torn last line its newline so the next entry starts on a line of its own."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with self.path.open("rb") as handle:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                os.write(self._fd, b"\n")
                os.fsync(self._fd)
