"""What the journal of a slice-and-view run says has happened: the engine's memory across crashes.

The engine writes these events (``Journal.append(step, outcome, **data)``):

===================  =================  ==================================================
step                 outcome            data
===================  =================  ==================================================
``fibsem``           ``started``        session, plan, target, server
``setup``            ``started``        name, key (before a keyed request is sent)
``setup``            ``done``           name, key, result
``setup``            ``checked``        name, key, record state, decision
``template``         ``captured``       path, center_px, size_px, pixel_size_m, index (renewal)
``fiducial``         ``before`` ...     renewal, index, y_m, key (a new fiducial, ``renew``)
``tracking``         ``updated``        the tracking state (beam shift, WD, drift, ...)
``slice``            ``mill started``   index, key (before the mill is sent)
``slice``            ``mill done``      index, key, result
``slice``            ``mill checked``   index, key, record state, evidence, decision
``slice``            ``mill undecided`` index, evidence (the fiducial was not found: paused)
``slice``            ``frame retry``    index, attempt, problem
``slice``            ``saved``          index, path, depth_m, tracking, fiducial, focus
``fault``            ``paused``         code, name, retry_safe, message, slice, phase
``fibsem``           ``done`` ...       slices, reason
===================  =================  ==================================================

``read_memory`` folds them into a ``RunMemory``. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..io.journal import Journal

__all__ = ["RunMemory", "SliceMemory", "read_memory"]


@dataclass
class SliceMemory:
    """Everything journalled about one slice."""

    index: int
    mill_keys: list[str] = field(default_factory=list)  # every key sent for this slice's mill, in order
    mill_done: bool = False
    decision: str | None = None  # "milled" / "not milled" from a look before deciding
    saved: dict[str, Any] | None = None
    frame_retries: int = 0

    @property
    def milled(self) -> bool:
        return self.mill_done or self.decision == "milled"


@dataclass
class RunMemory:
    sessions: int = 0
    setup_started: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup_done: dict[str, dict[str, Any]] = field(default_factory=dict)
    slices: dict[int, SliceMemory] = field(default_factory=dict)
    tracking: dict[str, Any] | None = None
    template: dict[str, Any] | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)
    finished: dict[str, Any] | None = None
    resumes: int = 0  # fault pauses resumed so far
    renewals: int = 0  # fiducials milled after the first (``renew``)
    renewal_pending: dict[str, Any] | None = None  # a renewal started and not finished

    @property
    def last_saved(self) -> int:
        saved = [i for i, s in self.slices.items() if s.saved is not None]
        return max(saved, default=0)

    def slice(self, index: int) -> SliceMemory:
        if index not in self.slices:
            self.slices[index] = SliceMemory(index)
        return self.slices[index]

    def saved_records(self) -> list[dict[str, Any]]:
        return [s.saved for _, s in sorted(self.slices.items()) if s.saved is not None]

    @property
    def paused_on_fault(self) -> dict[str, Any] | None:
        return self.faults[-1] if self.faults and not self.faults[-1].get("resolved") else None


def read_memory(journal: Journal) -> RunMemory:
    """Replay the journal's slice-and-view events."""
    memory = RunMemory()
    for event in journal.events():
        data = event.data
        step, outcome = event.step, event.outcome
        if step == "fibsem":
            if outcome == "started":
                memory.sessions += 1
            elif outcome == "resumed after fault":
                memory.resumes += 1
                if memory.faults:
                    memory.faults[-1]["resolved"] = True
            elif outcome in ("done", "stopped"):
                memory.finished = dict(data, outcome=outcome)
            elif outcome == "extended":
                memory.finished = None
        elif step == "setup":
            name = str(data.get("name"))
            if outcome == "started":
                memory.setup_started[name] = dict(data)
            elif outcome == "done":
                memory.setup_done[name] = dict(data)
        elif step == "template" and outcome == "captured":
            memory.template = dict(data)
            if data.get("renewal"):
                memory.renewals = int(data["renewal"])
                memory.renewal_pending = None
        elif step == "fiducial":
            pending = memory.renewal_pending
            if outcome == "before":
                memory.renewal_pending = {"renewal": data.get("renewal"), "index": data.get("index"), "y_m": data.get("y_m"),
                                          "before": data.get("path"), "attempt": -1}
            elif pending is not None and outcome == "mill started":
                pending.update(key=data.get("key"), attempt=int(pending.get("attempt", -1)) + 1)
            elif pending is not None and outcome == "mill done":
                pending["milled"] = True
        elif step == "tracking" and outcome == "updated":
            memory.tracking = dict(data)
        elif step == "slice":
            index = int(data.get("index", 0))
            if index < 1:
                continue
            s = memory.slice(index)
            if outcome == "mill started":
                key = str(data.get("key"))
                if key not in s.mill_keys:
                    s.mill_keys.append(key)
            elif outcome == "mill done":
                s.mill_done = True
            elif outcome == "mill checked":
                s.decision = data.get("decision")
            elif outcome == "frame retry":
                s.frame_retries += 1
            elif outcome == "saved":
                s.saved = dict(data)
                if isinstance(data.get("tracking"), dict):
                    memory.tracking = dict(data["tracking"])
        elif step == "fault" and outcome == "paused":
            memory.faults.append(dict(data))
    return memory
