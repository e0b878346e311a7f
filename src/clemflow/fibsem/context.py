"""What every part of one engine session shares: the bridge, the protocol, the plan, the journal, and keys.

Idempotency keys (docs/slice-and-view.md):

- destructive or one-off steps have fixed keys, the same in every session, so
  a re-send after a crash is answered from the server's record:
  ``{run}/setup/move``, ``{run}/setup/trench``, ``{run}/setup/fiducial``,
  ``{run}/slice-000001/mill`` (a second attempt after a look:
  ``.../mill-retry1``, ...);
- repeatable actions (frames, settings, autofunctions) get a key unique to
  the session and the attempt, e.g. ``{run}/slice-000001/frame-3-2`` (session
  3, second request of that session), so a retried frame is a new frame and a
  setting is never refused as a key conflict because tracking moved on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..bridge.backend import FrameRequest
from ..bridge.client import BridgeClient
from ..bridge.client_types import BridgeError
from ..io.journal import Journal
from ..protocol.fibsem import FIBSEM
from .alerts import Alerts
from .plan import SlicePlan
from .resume import RunMemory
from .target import ChosenTarget

__all__ = ["RunContext", "slice_key"]

T = TypeVar("T")

TRANSIENT = frozenset({"busy", "not_done"})
TRANSIENT_WAIT_S = 120.0


def slice_key(run_id: str, index: int, action: str) -> str:
    return f"{run_id}/slice-{index:06d}/{action}"


@dataclass
class RunContext:
    bridge: BridgeClient
    fibsem: FIBSEM
    plan: SlicePlan
    target: ChosenTarget
    run_dir: Path
    run_id: str
    journal: Journal
    memory: RunMemory
    session: int
    alerts: Alerts
    limits: dict[str, Any] = field(default_factory=dict)  # hello's limits
    _count: int = field(default=0, repr=False)

    def key(self, *parts: str) -> str:
        return "/".join((self.run_id, *parts))

    def fresh(self, *parts: str) -> str:
        """A key for a repeatable action, unique to this session and request."""
        self._count += 1
        *head, last = parts
        return self.key(*head, f"{last}-{self.session}-{self._count}")

    # ------------------------------------------------------------------ imaging settings

    @property
    def pixel_size_m(self) -> float:
        return float(self.fibsem.sem.pixel_size)

    @property
    def frame_size(self) -> tuple[int, int]:
        w, h = self.fibsem.sem.frame
        return int(w), int(h)

    @property
    def hfw_m(self) -> float:
        return self.frame_size[0] * self.pixel_size_m

    def frame_request(self, zoom_out: float = 1.0) -> FrameRequest:
        """The protocol's electron frame; ``zoom_out`` > 1 widens the field with the same pixel count."""
        sem = self.fibsem.sem
        w, h = self.frame_size
        return FrameRequest("electron", w, h, float(sem.dwell), int(sem.line_averaging), sem.detector,
                            self.hfw_m * zoom_out, int(sem.bit_depth))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ requests

    def call(self, fn: Callable[[], T], *, wait_s: float = TRANSIENT_WAIT_S) -> T:
        """``fn()``, repeated while the instrument answers busy/not_done (nothing happened: safe to ask again)."""
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            try:
                return fn()
            except BridgeError as error:
                if error.name not in TRANSIENT or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def record_verdict(self, key: str) -> tuple[str, dict[str, Any]]:
        """What became of a keyed request sent earlier: ``resend``, ``retry`` or ``look`` (with the record).

        ``resend``: the server never got it, is running it or finished it:
        sending the same key again executes it once, attaches to it, or
        replays its answer. ``retry``: it failed before doing anything
        (retry-safe error): a new key may do it. ``look``: it was cut off or
        failed part-way; its effect must be measured before deciding.
        """
        entry = self.call(lambda: self.bridge.record(key))
        info: dict[str, Any] = {"record": entry.state, "operation": entry.operation}
        if entry.state in ("unknown", "started", "done"):
            return "resend", info
        error = _record_error(entry.reply)
        info["error"] = error
        if entry.state == "failed" and error is not None and error.get("retry_safe"):
            return "retry", info
        return "look", info


def _record_error(reply: dict[str, Any] | None) -> dict[str, Any] | None:
    if not reply:
        return None
    if reply.get("error"):
        return dict(reply["error"])
    result = reply.get("result")
    if isinstance(result, dict) and isinstance(result.get("error"), dict):
        return dict(result["error"])
    return None
