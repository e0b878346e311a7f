"""An append-only journal, one JSON event per line, flushed and fsynced.

The journal is the memory of a run: after a crash, the next start reads it to
know what was already acquired (and must not be repeated) and what was cut off.
Each line is written whole with one write() call and fsynced before the step
that depends on it goes on; a line cut off by a crash is ignored on reading and
reported, never silently merged with the next one.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schedule.clock import Clock, RealClock, isoformat

__all__ = ["Journal", "JournalEvent"]


@dataclass(frozen=True)
class JournalEvent:
    seq: int
    time: float
    step: str
    outcome: str
    data: dict[str, Any]


class Journal:
    """Appends events to ``journal.jsonl``; reads them back tolerating a torn last line."""

    def __init__(self, path: str | Path, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.clock = clock or RealClock()
        self.torn_lines = 0
        self._lock = threading.Lock()  # the live analysis journals its alerts from its own thread
        events = list(self.events())
        self._seq = events[-1].seq + 1 if events else 0
        self._repair_tail()

    def append(self, step: str, outcome: str, **data: Any) -> JournalEvent:
        """Record that `step` ended with `outcome` (e.g. 'started', 'done', 'failed', 'skipped')."""
        with self._lock:
            now = self.clock.now()
            event = JournalEvent(self._seq, now, step, outcome, data)
            record = {"seq": event.seq, "time": isoformat(now), "t": now, "step": step, "outcome": outcome, **data}
            line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq += 1
            return event

    def events(self) -> Iterator[JournalEvent]:
        """Every complete event, in order."""
        if not self.path.exists():
            return
        torn = 0
        with self.path.open("rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    torn += 1
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    torn += 1
                    continue
                seq, t = record.pop("seq"), record.pop("t")
                record.pop("time", None)
                step, outcome = record.pop("step"), record.pop("outcome")
                yield JournalEvent(seq, t, step, outcome, record)
        self.torn_lines = torn

    def _repair_tail(self) -> None:
        """End a torn last line with a newline so the next event starts on a line of its own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)
        if last != b"\n":
            with self.path.open("ab") as handle:
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
