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
    "QUERY_TIMEOUT_S",
    "SET_TIMEOUT_S",
    "LONG_START_TIMEOUT_S",
    "expected_frame_s",
    "expected_mill_s",
    "operation_timeout_s",
    "timeouts_json",
]

QUERY_TIMEOUT_S = 5.0
SET_TIMEOUT_S = 15.0
LONG_START_TIMEOUT_S = 10.0
AUTOFUNCTION_TIMEOUT_S = 300.0
STAGE_TIMEOUT_S = 180.0
FRAME_MILL_FACTOR = 2.0
FRAME_MILL_EXTRA_S = 60.0
PROGRESS_INTERVAL_S = 0.1
RESIN_SPUTTER_YIELD_UM3_PER_NC = 0.27  # as clemflow.fibsem.estimate; an upper bound of removed volume per charge


def expected_frame_s(request: FrameRequest) -> float:
    """Scan time: pixels x dwell x line averaging (the instrument's overheads come on top)."""
    return request.width_px * request.height_px * request.dwell_s * request.line_averaging


def expected_mill_s(request: MillRequest) -> float:
    """Pattern volume / (sputter yield x current): an upper bound, since a face already milled removes less."""
    volume_um3 = sum(p.width_m * p.height_m * p.depth_m for p in request.patterns) * 1e18
    return volume_um3 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * request.current_a * 1e9)


def operation_timeout_s(command: str, expected_s: float) -> float:
    """Section 5: 2 x expected + 60 s for frames and mills, 300 s for autofunctions, 180 s for stage moves."""
    if command in ("grab_frame", "mill"):
        return FRAME_MILL_FACTOR * expected_s + FRAME_MILL_EXTRA_S
    if command == "move_stage":
        return STAGE_TIMEOUT_S
    return AUTOFUNCTION_TIMEOUT_S


def timeouts_json() -> dict[str, float]:
    """The ``timeouts_s`` of ``hello``."""
    return {"query": QUERY_TIMEOUT_S, "set": SET_TIMEOUT_S, "long_start": LONG_START_TIMEOUT_S,
            "autofunction": AUTOFUNCTION_TIMEOUT_S, "move_stage": STAGE_TIMEOUT_S,
            "frame_mill_factor": FRAME_MILL_FACTOR, "frame_mill_extra_s": FRAME_MILL_EXTRA_S}


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
