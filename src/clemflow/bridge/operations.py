"""Long operations: their public state, the Job a backend reports through, timeouts, kept frames.

An operation's state is what the ``operation`` command and event return
(docs/bridge-protocol.md, section 5). Progress events are throttled to ten a
second so a chatty backend cannot flood the event channel.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .backend import FrameRequest, MillRequest

__all__ = [
    "FrameStore",
    "Operation",
    "OperationJob",
    "Timeouts",
    "expected_frame_s",
    "expected_mill_s",
]

PROGRESS_INTERVAL_S = 0.1
RESIN_SPUTTER_YIELD_UM3_PER_NC = 0.27  # as clemflow.fibsem.estimate; an upper bound of removed volume per charge


def expected_frame_s(request: FrameRequest) -> float:
    """Scan time: pixels x dwell x line averaging (the instrument's overheads come on top)."""
    return request.width_px * request.height_px * request.dwell_s * request.line_averaging


def expected_mill_s(request: MillRequest) -> float:
    """Pattern volume / (sputter yield x current): an upper bound, since a face already milled removes less."""
    volume_um3 = sum(p.width_m * p.height_m * p.depth_m for p in request.patterns) * 1e18
    return volume_um3 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * request.current_a * 1e9)


@dataclass(frozen=True)
class Timeouts:
    """Section 5's timeouts: replies per class (for clients), and how long each operation may run."""

    query_s: float = 5.0
    set_s: float = 15.0
    long_start_s: float = 10.0
    autofunction_s: float = 300.0
    move_stage_s: float = 180.0
    frame_mill_factor: float = 2.0
    frame_mill_extra_s: float = 60.0

    def operation(self, command: str, expected_s: float) -> float:
        """2 x expected + 60 s for frames and mills, 300 s for autofunctions, 180 s for stage moves."""
        if command in ("grab_frame", "mill"):
            return self.frame_mill_factor * expected_s + self.frame_mill_extra_s
        if command == "move_stage":
            return self.move_stage_s
        return self.autofunction_s

    def as_json(self) -> dict[str, float]:
        """The ``timeouts_s`` of ``hello``."""
        return {"query": self.query_s, "set": self.set_s, "long_start": self.long_start_s,
                "autofunction": self.autofunction_s, "move_stage": self.move_stage_s,
                "frame_mill_factor": self.frame_mill_factor, "frame_mill_extra_s": self.frame_mill_extra_s}


def new_operation_id() -> str:
    return f"op-{uuid.uuid4().hex}"


@dataclass
class Operation:
    """A long operation as clients see it; mutated only under the server's lock."""

    command: str
    key: str
    expected_s: float
    timeout_s: float
    operation: str = field(default_factory=new_operation_id)
    state: str = "running"  # running, done, failed, cancelled, interrupted
    progress: float = 0.0
    message: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    error: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"operation": self.operation, "command": self.command, "key": self.key, "state": self.state,
                "progress": self.progress, "message": self.message, "started": self.started, "ended": self.ended,
                "expected_s": self.expected_s, "timeout_s": self.timeout_s, "error": self.error}


class OperationJob:
    """The ``Job`` handed to a backend: progress goes to events (throttled), cancel is a flag it polls."""

    def __init__(self, op: Operation, publish: Callable[[Operation], None], lock: threading.Lock) -> None:
        self.op = op
        self._publish = publish
        self._lock = lock
        self._cancel = threading.Event()
        self.cancel_reason: str | None = None  # "cancel" or "timeout"
        self._last_event = 0.0

    def progress(self, fraction: float, message: str = "") -> None:
        try:
            fraction = min(1.0, max(0.0, float(fraction)))
        except (TypeError, ValueError):
            return
        if fraction != fraction:  # NaN from a confused driver: keep the last good value
            return
        now = time.monotonic()
        with self._lock:
            if self.op.state != "running":
                return
            self.op.progress = fraction
            self.op.message = str(message)[:500]
            due = now - self._last_event >= PROGRESS_INTERVAL_S
            if due:
                self._last_event = now
        if due:
            self._publish(self.op)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self, reason: str = "cancel") -> None:
        if not self._cancel.is_set():
            self.cancel_reason = reason
            self._cancel.set()


class FrameStore:
    """The pixels of the last few frames, by operation id; older ones are let go (``result_gone``)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._frames: OrderedDict[str, tuple[Any, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, operation: str, image: Any, metadata: dict[str, Any]) -> None:
        with self._lock:
            self._frames[operation] = (image, metadata)
            while len(self._frames) > self.keep:
                self._frames.popitem(last=False)

    def get(self, operation: str) -> tuple[Any, dict[str, Any]] | None:
        with self._lock:
            return self._frames.get(operation)
