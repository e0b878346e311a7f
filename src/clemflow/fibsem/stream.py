"""The slice stream: what alignment and QC (issue 8) read while the run goes on.

Each saved slice becomes one line of ``slices.jsonl`` in the run folder
(index, file, nominal depth, pixel size, times, tracking) and one call of every
in-process listener. A line is written only after the slice's TIFF is on disk
and its ``slice saved`` event is in the journal, so a reader never sees a
slice that does not exist. The journal is the truth: after a crash between the
journal and this file, ``SliceStream.catch_up`` writes the missing lines, so
every saved slice appears exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["SliceStream", "read_stream"]

STREAM_FILE = "slices.jsonl"

log = logging.getLogger("clemflow.fibsem.stream")

Listener = Callable[[dict[str, Any]], None]


def read_stream(path: Path) -> list[dict[str, Any]]:
    """The stream's records in order (a torn last line is skipped); ``path`` is the run folder or the file."""
    path = Path(path)
    if path.is_dir():
        path = path / STREAM_FILE
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                continue
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return out


class SliceStream:
    """Appends slice records to ``slices.jsonl`` and hands them to listeners (each on the engine's thread)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / STREAM_FILE
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._published = {int(r["index"]) for r in read_stream(self.path) if "index" in r}
        self._end_torn_line()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(record)`` for each slice published from now on; returns an unsubscribe function."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    @property
    def published(self) -> set[int]:
        return set(self._published)

    def publish(self, record: dict[str, Any]) -> None:
        """Append one slice's record (once per index) and tell the listeners; a failing listener is logged, not fatal."""
        index = int(record["index"])
        if index not in self._published:
            line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self._published.add(index)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(record)
            except Exception:  # a consumer's bug must not stop the milling
                log.exception("slice stream listener %r failed on slice %d", listener, index)

    def catch_up(self, saved: Iterable[dict[str, Any]]) -> int:
        """Write the records of saved slices that the stream lacks (a crash after the journal); returns how many."""
        added = 0
        for record in sorted(saved, key=lambda r: int(r["index"])):
            if int(record["index"]) not in self._published:
                self.publish(record)
                added += 1
        return added

    def _end_torn_line(self) -> None:
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
