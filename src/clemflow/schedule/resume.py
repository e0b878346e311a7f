"""What an existing run folder's journal says about the schedule, and a clock that carries on.

The runner calls :func:`read_schedule_state` when it is built on a run folder:
it learns the treatment time t0 of the run, which acquisitions ended (and how),
which were cut off by a crash (``acquire started`` with no end), and which stain
prompts were answered. Nothing here writes; the runner journals what it decides.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.journal import Journal, JournalEvent
from .clock import Clock, RealClock, ScaledClock

__all__ = [
    "AcquisitionState",
    "Attempt",
    "CutOff",
    "ScheduleState",
    "clock_scale",
    "read_schedule_state",
    "resume_clock",
]

ENDS = ("done", "incomplete", "failed")


@dataclass
class Attempt:
    """One attempt at one acquisition, as the journal tells it."""

    number: int
    started_t: float | None = None
    outcome: str | None = None  # None: started, never ended (cut off by a crash)
    final: bool = False
    cut_off: bool = False  # closed as incomplete on a resume
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class AcquisitionState:
    """Everything journalled about one (dish, timepoint) acquisition."""

    sample: str
    timepoint: int
    attempts: dict[int, Attempt] = field(default_factory=dict)
    skipped: bool = False

    @property
    def done(self) -> bool:
        return any(a.outcome == "done" for a in self.attempts.values())

    @property
    def gave_up(self) -> bool:
        return any(a.final and a.outcome in ("failed", "incomplete") for a in self.attempts.values())

    @property
    def terminal(self) -> bool:
        """Done, skipped or given up: never acquired again."""
        return self.done or self.skipped or self.gave_up

    @property
    def failures(self) -> int:
        """Attempts the acquisition itself reported as failed or incomplete (crashes do not count)."""
        return sum(1 for a in self.attempts.values() if a.outcome in ("failed", "incomplete") and not a.cut_off)

    @property
    def next_attempt(self) -> int:
        return max(self.attempts, default=0) + 1

    @property
    def status(self) -> str:
        if self.done:
            return "done"
        if self.skipped:
            return "skipped"
        if self.gave_up:
            ends = [a.outcome for a in self.attempts.values() if a.final]
            return ends[-1] or "failed"
        return "pending"


@dataclass(frozen=True)
class CutOff:
    """An attempt that was started and never ended: the process died during it."""

    sample: str
    timepoint: int
    timepoint_s: float
    attempt: int
    started_t: float  # clock time (planned epoch) of its 'acquire started'
    started: dict[str, Any]  # the data of its 'acquire started' event


@dataclass
class ScheduleState:
    t0: float | None = None
    t0_source: str | None = None
    acquisitions: dict[tuple[str, int], AcquisitionState] = field(default_factory=dict)
    stains: dict[tuple[str, int, float], str] = field(default_factory=dict)  # last outcome per prompt
    cut_off: list[CutOff] = field(default_factory=list)
    anchor: tuple[float, float, float | None] | None = None  # (clock t, wall epoch, scale) of the last session start
    last_t: float | None = None
    sessions: int = 0

    def acquisition(self, sample: str, timepoint: int) -> AcquisitionState:
        key = (sample, timepoint)
        if key not in self.acquisitions:
            self.acquisitions[key] = AcquisitionState(sample, timepoint)
        return self.acquisitions[key]


def read_schedule_state(events: Iterable[JournalEvent]) -> ScheduleState:
    """Fold the runner's journal events into the state a resumed run starts from."""
    state = ScheduleState()
    for event in events:
        state.last_t = event.time if state.last_t is None else max(state.last_t, event.time)
        data = event.data
        if event.step == "schedule" and event.outcome in ("started", "resumed"):
            state.sessions += 1
            if state.t0 is None and "t0" in data:
                state.t0, state.t0_source = float(data["t0"]), data.get("t0_source")
            if "wall" in data:
                state.anchor = (event.time, float(data["wall"]), data.get("scale"))
        elif event.step == "acquire" and "sample" in data and "timepoint" in data:
            acq = state.acquisition(data["sample"], int(data["timepoint"]))
            number = data.get("attempt")
            if event.outcome == "skipped":
                acq.skipped = True
            elif event.outcome == "started" and number is not None:
                acq.attempts[int(number)] = Attempt(int(number), event.time, data=dict(data))
            elif event.outcome in ENDS and number is not None:
                attempt = acq.attempts.setdefault(int(number), Attempt(int(number)))
                attempt.outcome = event.outcome
                attempt.final = bool(data.get("final", event.outcome == "done"))
                attempt.cut_off = data.get("reason") == "cut off"
        elif event.step == "stain" and "sample" in data and "timepoint" in data:
            key = (data["sample"], int(data["timepoint"]), float(data.get("lead_s", 0.0)))
            state.stains[key] = event.outcome
    for (sample, tp), acq in state.acquisitions.items():
        for attempt in acq.attempts.values():
            if attempt.outcome is None and attempt.started_t is not None:
                state.cut_off.append(
                    CutOff(sample, tp, float(attempt.data.get("timepoint_s", 0.0)), attempt.number,
                           attempt.started_t, attempt.data)
                )
    state.cut_off.sort(key=lambda c: c.started_t)
    return state


def clock_scale(clock: Clock) -> float | None:
    """Planned seconds per wall second of a clock, or None for a clock not tied to wall time."""
    if isinstance(clock, ScaledClock):
        return clock.scale
    if isinstance(clock, RealClock):
        return 1.0
    return None


def resume_clock(run_folder: str | Path, scale: float = 1.0, *, count_downtime: bool = True) -> Clock:
    """The clock to (re)start a run with, so that protocol time carries on across a restart.

    A fresh folder (no session journalled yet) gets real time (scale 1) or a
    :class:`ScaledClock` starting now. On a resume, planned time carries on from
    the last session's start: with ``count_downtime`` (the default, as cells keep
    incubating while the computer is down) the time the process was dead counts
    at the previous session's scale; without it the clock continues from the
    last journalled event. Planned time never runs backwards.
    """
    path = Path(run_folder)
    journal_path = path / "journal.jsonl" if path.is_dir() else path
    state = read_schedule_state(Journal(journal_path).events()) if journal_path.exists() else ScheduleState()
    if state.anchor is None:
        return RealClock() if scale == 1.0 else ScaledClock(scale)
    anchor_t, anchor_wall, anchor_scale = state.anchor
    planned_now = state.last_t if state.last_t is not None else anchor_t
    if count_downtime and anchor_scale is not None:
        planned_now = max(planned_now, anchor_t + float(anchor_scale) * (time.time() - anchor_wall))
    if scale == 1.0 and abs(planned_now - time.time()) < 1.0:
        return RealClock()
    return ScaledClock(scale, start=planned_now)
