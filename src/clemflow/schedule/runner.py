"""The runner: walks a protocol's absolute timeline with a clock, for several dishes at once.

It knows no instrument. It is given

- ``acquire(entry, attempt) -> AcquisitionResult``: images one dish at one
  timepoint (the confocal controller, or a fake in tests), writing the files of
  attempt ``attempt`` and never those of another attempt;
- ``prompt(message, deadline) -> bool``: asks the operator to do something now
  (add the stains) and returns whether it was confirmed by ``deadline`` (clock
  time); :func:`auto_confirm` for demos and tests, a rich countdown in
  :mod:`clemflow.schedule.terminal` for a person;
- a clock, its only source of time, and a :class:`~clemflow.schedule.control.RunControl`.

Time zero (t0) is the treatment: ``protocol.treatment.added_at``, else the
``t0`` given, else the moment the operator confirms adding the particles at the
start of the run. It is journalled, so a resumed run keeps it.

Rules (documented in docs/run-folder.md, "Journal events of the runner"):

- **Clash.** There is one microscope: acquisitions run one at a time, in
  planned-time order; acquisitions due at the same planned time run in the
  protocol's order of samples (``samples:``), each later one starting when the
  one before it ends. A start held back by the instrument being busy is
  journalled as ``acquire delayed`` (reason ``clash``) with the delay in
  planned seconds. A clash delay never counts as lateness.
- **Late.** An acquisition whose start is later than its planned time (or the
  end of the clash holding it) by more than ``confocal.late_tolerance`` follows
  ``confocal.late_policy``: ``run_late`` runs it now and journals ``acquire
  late`` with the delay; ``skip`` journals ``acquire skipped``.
- **Retry.** An attempt reported ``failed`` or ``incomplete`` is retried at once
  with the next attempt number, up to ``max_attempts`` reported failures; the
  last one is journalled with ``final: true``.
- **Prompts.** By default a stain prompt is issued in the runner's thread, between
  acquisitions: one due while the instrument is busy comes when it is free
  (its ``delay_s`` says how late), and it must be answered before the next
  acquisition falls due. With ``operator_thread=True`` (real or scaled clocks;
  what a terminal run wants) prompts run in a thread of their own, on time
  while the instrument works, each answerable until the acquisition it serves.
- **Resume.** Built on a run folder with a journal, the runner never repeats a
  ``done`` (or ``skipped``, or given-up) acquisition; an attempt ``started`` and
  never ended was cut off by a crash: it is journalled ``incomplete`` (reason
  ``cut off``) and listed in :attr:`Runner.cut_off` for the controller to close
  its file; the acquisition is then run again as a new attempt, late policy
  permitting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..io.journal import JournalEvent
from ..io.run_folder import RunFolder
from ..protocol import Protocol
from ..protocol.units import format_quantity
from .clock import Clock, RealClock, isoformat
from .control import RunControl
from .resume import Attempt, CutOff, ScheduleState, clock_scale, read_schedule_state
from .timeline import TimelineEntry, timeline

__all__ = [
    "AcquireFn",
    "AcquisitionResult",
    "CLASH_RULE",
    "PromptFn",
    "Runner",
    "ScheduleSummary",
    "auto_confirm",
    "run_protocol_schedule",
]

CLASH_RULE = (
    "one acquisition at a time; acquisitions due at the same planned time run in the protocol's order of samples, "
    "each later one starting when the one before it ends (journalled as 'acquire delayed', reason 'clash')"
)


@dataclass(frozen=True)
class AcquisitionResult:
    """What one attempt at one acquisition produced.

    status: 'done' (every frame written), 'incomplete' (the files are valid but
    frames are missing, recorded as gaps), 'failed' (nothing usable).
    files: paths written by this attempt (relative to the run folder preferred).
    details: anything worth journalling (frames, gaps, positions, errors).
    fatal: stop the run after recording this attempt (a full disk, a lost instrument).
    """

    status: Literal["done", "incomplete", "failed"]
    files: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    fatal: bool = False


AcquireFn = Callable[[TimelineEntry, int], AcquisitionResult]
PromptFn = Callable[[str, float], bool]


def auto_confirm(message: str, deadline: float) -> bool:
    """The operator prompt of demos and tests: every request is confirmed at once."""
    return True


@dataclass
class ScheduleSummary:
    """How a call of :meth:`Runner.run` ended."""

    state: Literal["finished", "aborted", "stopped"]
    t0: float
    statuses: dict[tuple[str, int], str]  # (sample, timepoint index) -> done|skipped|failed|incomplete|pending
    cut_off: list[CutOff]
    delays_s: dict[tuple[str, int], float]  # start delay of each acquisition started in this session (planned s)
    clash_delays_s: dict[tuple[str, int], float]
    late: list[tuple[str, int]]
    reason: str | None = None

    def _with(self, status: str) -> list[tuple[str, int]]:
        return sorted(k for k, v in self.statuses.items() if v == status)

    @property
    def done(self) -> list[tuple[str, int]]:
        return self._with("done")

    @property
    def skipped(self) -> list[tuple[str, int]]:
        return self._with("skipped")

    @property
    def pending(self) -> list[tuple[str, int]]:
        return self._with("pending")

    @property
    def failed(self) -> list[tuple[str, int]]:
        return sorted(k for k, v in self.statuses.items() if v in ("failed", "incomplete"))


@dataclass(frozen=True)
class _Step:
    entry: TimelineEntry
    timepoint: int
    sample_order: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.entry.sample, self.timepoint)

    @property
    def lead_s(self) -> float:
        return self.entry.timepoint_s - self.entry.at_s


class _Aborted(Exception):
    pass


class Runner:
    """Runs the timeline of ``protocol`` into ``run_folder``'s journal; see the module doc for the rules."""

    def __init__(
        self,
        protocol: Protocol,
        run_folder: RunFolder,
        acquire: AcquireFn,
        clock: Clock | None = None,
        prompt: PromptFn = auto_confirm,
        control: RunControl | None = None,
        *,
        t0: float | None = None,
        max_attempts: int = 3,
        on_cut_off: Callable[[CutOff], dict[str, Any] | None] | None = None,
        listener: Callable[[JournalEvent], None] | None = None,
        poll_s: float | None = None,
        operator_thread: bool = False,
    ) -> None:
        if protocol.confocal is None:
            raise ValueError("this protocol has no confocal section: there is no time course to run")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.protocol = protocol
        self.folder = run_folder
        self.journal = run_folder.journal
        self.acquire = acquire
        self.clock = clock or run_folder.journal.clock or RealClock()
        self.prompt = prompt
        self.control = control or RunControl()
        self.max_attempts = max_attempts
        self.listener = listener
        self.policy = protocol.confocal.late_policy
        self.tolerance = float(protocol.confocal.late_tolerance)
        self._t0_given = t0
        self.operator_thread = operator_thread
        if operator_thread and hasattr(self.clock, "advance"):
            raise ValueError("operator_thread needs a real or scaled clock: two threads cannot share a virtual clock")
        self._journal_lock = threading.Lock()
        self._poll_s = poll_s
        order = {s.id: i for i, s in enumerate(protocol.samples)}
        tp_index = {t: i for i, t in enumerate(protocol.timepoints)}
        kind_order = {"stain": 0, "acquire": 1}
        steps = [_Step(e, tp_index[e.timepoint_s], order[e.sample]) for e in timeline(protocol)]
        self.steps = sorted(steps, key=lambda s: (s.entry.at_s, kind_order[s.entry.kind], s.sample_order))
        self.state: ScheduleState = read_schedule_state(self.journal.events())
        if self.state.t0 is not None and self.state.last_t is not None:
            behind = self.state.last_t - self.clock.now()
            if behind > self.tolerance:
                raise ValueError(
                    f"the clock is {behind:.0f} s behind the run's journal: planned time would run backwards. "
                    "Resume a scaled run with clemflow.schedule.resume.resume_clock(run_folder, scale)."
                )
        for step in self.steps:
            if step.entry.kind == "acquire":
                self.state.acquisition(*step.key)
        self.cut_off: list[CutOff] = list(self.state.cut_off)
        for cut in self.cut_off:
            self._close_cut_off(cut, on_cut_off)
        # The instrument's busy period: acquisitions run back to back (no sleep between them) since
        # `_busy_since`; the last one was `_last_acquisition` = (key, clock time it ended).
        self._last_acquisition: tuple[tuple[str, int], float] | None = None
        self._busy_since: float | None = None
        self._idle = True
        self._delays: dict[tuple[str, int], float] = {}
        self._clash: dict[tuple[str, int], float] = {}
        self._late: list[tuple[str, int]] = []

    # -- journal ---------------------------------------------------------------------------

    def _log(self, step: str, outcome: str, **data: Any) -> JournalEvent:
        with self._journal_lock:  # the operator thread journals too
            event = self.journal.append(step, outcome, **data)
            if self.listener is not None:
                self.listener(event)
        return event

    def _ids(self, step: _Step) -> dict[str, Any]:
        return {"sample": step.entry.sample, "timepoint": step.timepoint, "timepoint_s": step.entry.timepoint_s}

    def _times(self, planned: float, now: float) -> dict[str, Any]:
        """Planned and actual time since t0, and the delay, in planned (protocol) seconds."""
        t0 = self.t0
        return {"planned_s": round(planned - t0, 3), "actual_s": round(now - t0, 3), "delay_s": round(now - planned, 3)}

    def _close_cut_off(self, cut: CutOff, on_cut_off: Callable[[CutOff], dict[str, Any] | None] | None) -> None:
        extra = on_cut_off(cut) if on_cut_off is not None else None
        self._log(
            "acquire", "incomplete", sample=cut.sample, timepoint=cut.timepoint, timepoint_s=cut.timepoint_s,
            attempt=cut.attempt, reason="cut off", final=False, started=isoformat(cut.started_t), **(extra or {}),
        )
        attempt = self.state.acquisition(cut.sample, cut.timepoint).attempts[cut.attempt]
        attempt.outcome, attempt.cut_off = "incomplete", True

    # -- time -----------------------------------------------------------------------------

    @property
    def t0(self) -> float:
        assert self.state.t0 is not None, "t0 is set when the run starts"
        return self.state.t0

    def _chunk(self) -> float | None:
        """Longest single sleep (planned s) so that pause/abort are seen within ~50 ms of wall time."""
        if self._poll_s is not None:
            return self._poll_s
        if hasattr(self.clock, "advance"):  # virtual time: sleeping is instant, one sleep will do
            return None
        scale = clock_scale(self.clock) or 1.0
        return 0.05 * scale

    def _checkpoint(self) -> None:
        """Between steps: hold while paused, stop if aborted."""
        if self.control.aborted:
            raise _Aborted
        if self.control.paused:
            since = self.clock.now()
            self._log("control", "paused")
            while not self.control.wait_while_paused(timeout=0.5):
                if self.control.aborted:
                    break
            if self.control.aborted:
                raise _Aborted
            self._log("control", "continued", paused_s=round(self.clock.now() - since, 3))

    def _wait_until(self, target: float) -> None:
        chunk = self._chunk()
        while True:
            self._checkpoint()
            remaining = target - self.clock.now()
            if remaining <= 0:
                return
            self._idle = True
            self.clock.sleep(remaining if chunk is None else min(remaining, chunk))

    # -- start ----------------------------------------------------------------------------

    def _start(self) -> None:
        scale = clock_scale(self.clock)
        session = {"wall": RealClock().now(), "scale": scale}
        if self.state.t0 is not None:
            done = sum(1 for a in self.state.acquisitions.values() if a.terminal)
            self._log("schedule", "resumed", t0=self.state.t0, t0_source=self.state.t0_source,
                      ended=done, remaining=len(self.state.acquisitions) - done,
                      cut_off=[[c.sample, c.timepoint, c.attempt] for c in self.cut_off], **session)
            return
        treatment = self.protocol.treatment
        if treatment is not None and treatment.added_at is not None:
            t0, source = treatment.added_at.timestamp(), "protocol"
        elif self._t0_given is not None:
            t0, source = float(self._t0_given), "given"
        else:
            names = ", ".join(s.id for s in self.protocol.samples)
            what = f"{treatment.particle} ({treatment.concentration})" if treatment else "the treatment"
            message = f"add {what} to dishes {names} now; the time course starts when you confirm"
            self._log("treatment", "prompted", message=message)
            if not self.prompt(message, self.clock.now() + 3600.0):
                self._log("treatment", "unconfirmed")
                raise _Aborted("treatment not confirmed")
            t0, source = self.clock.now(), "confirmed"
            self._log("treatment", "confirmed", t0=t0)
        self.state.t0, self.state.t0_source = t0, source
        self._log("schedule", "started", t0=t0, t0_iso=isoformat(t0), t0_source=source,
                  acquisitions=len(self.state.acquisitions),
                  stains=sum(1 for s in self.steps if s.entry.kind == "stain"),
                  late_policy=self.policy, late_tolerance_s=self.tolerance, clash_rule=CLASH_RULE, **session)

    # -- steps ----------------------------------------------------------------------------

    def _stain(self, step: _Step) -> None:
        skey = (step.entry.sample, step.timepoint, step.lead_s)
        if self.state.stains.get(skey) in ("confirmed", "unconfirmed", "skipped"):
            return
        acq = self.state.acquisitions[step.key]
        ids = {**self._ids(step), "lead_s": step.lead_s}
        now = self.clock.now()
        acquire_at = self.t0 + step.entry.timepoint_s
        if acq.terminal:
            self._log("stain", "skipped", **ids, reason=f"acquisition already {acq.status}")
            self.state.stains[skey] = "skipped"
            return
        if self.policy == "skip" and now - acquire_at > self.tolerance:
            self._log("stain", "skipped", **ids, reason="the timepoint's window has passed (late_policy skip)",
                      **self._times(self.t0 + step.entry.at_s, now))
            self.state.stains[skey] = "skipped"
            return
        tp = format_quantity(step.entry.timepoint_s, "duration")
        message = f"{step.entry.what} to dish {step.entry.sample} now (for the {tp} timepoint)"
        deadline = self._prompt_deadline(step, now)
        self._log("stain", "prompted", **ids, message=message, deadline_s=round(deadline - self.t0, 3),
                  **self._times(self.t0 + step.entry.at_s, now))
        self.state.stains[skey] = "prompted"
        error = None
        try:
            ok = bool(self.prompt(message, deadline))
        except Exception as exc:  # a broken prompt must not take the acquisitions down with it
            ok, error = False, f"{type(exc).__name__}: {exc}"
        outcome = "confirmed" if ok else "unconfirmed"
        self._log("stain", outcome, **ids, **({"error": error} if error else {}),
                  **self._times(self.t0 + step.entry.at_s, self.clock.now()))
        self.state.stains[skey] = outcome

    def _prompt_deadline(self, step: _Step, now: float) -> float:
        """The prompt must be answered by the acquisition it serves (and, when prompts hold up the
        instrument's thread, before any other acquisition falls due)."""
        deadline = self.t0 + step.entry.timepoint_s
        for other in [] if self.operator_thread else self.steps:
            if other.entry.kind == "acquire" and not self.state.acquisitions[other.key].terminal:
                due = self.t0 + other.entry.at_s
                if now < due < deadline:
                    deadline = due
        if deadline <= now:  # already overdue (a resumed or delayed run): give the operator the tolerance
            deadline = now + self.tolerance
        return deadline

    def _acquisition(self, step: _Step) -> bool:
        """Acquire one dish at one timepoint (with retries); True when the run must stop (fatal)."""
        acq = self.state.acquisitions[step.key]
        if acq.terminal:
            return False
        ids = self._ids(step)
        planned = self.t0 + step.entry.at_s
        now = self.clock.now()
        free_at, held_by = planned, None
        if (
            not self._idle
            and self._last_acquisition is not None
            and self._busy_since is not None
            and self._busy_since <= planned < self._last_acquisition[1]
        ):
            # the instrument was busy at the planned time and has not been idle since: a clash
            held_by, free_at = self._last_acquisition
        if self._idle:
            self._busy_since, self._idle = now, False
        lateness = now - free_at
        if lateness > self.tolerance:
            if self.policy == "skip":
                self._log("acquire", "skipped", **ids, reason="late", policy="skip", late_s=round(lateness, 3),
                          tolerance_s=self.tolerance, **self._times(planned, now))
                acq.skipped = True
                return False
            self._log("acquire", "late", **ids, policy="run_late", late_s=round(lateness, 3),
                      tolerance_s=self.tolerance, **self._times(planned, now))
            self._late.append(step.key)
        if held_by is not None:
            self._log("acquire", "delayed", **ids, reason="clash", after={"sample": held_by[0], "timepoint": held_by[1]},
                      clash_s=round(free_at - planned, 3), **self._times(planned, now))
            self._clash[step.key] = round(free_at - planned, 3)
        self._delays[step.key] = now - planned
        answers = [v for (smp, tp, _), v in self.state.stains.items() if (smp, tp) == step.key]
        stained = None if not answers else all(v == "confirmed" for v in answers)
        while True:
            attempt = acq.next_attempt
            started = self.clock.now()
            self._log("acquire", "started", **ids, attempt=attempt, what=step.entry.what,
                      **({} if stained is None else {"stain_confirmed": stained}), **self._times(planned, started))
            acq.attempts[attempt] = Attempt(attempt, started)
            try:
                result = self.acquire(step.entry, attempt)
            except Exception as exc:
                self._log("acquire", "failed", **ids, attempt=attempt, final=False, error=f"{type(exc).__name__}: {exc}",
                          duration_s=round(self.clock.now() - started, 3))
                acq.attempts[attempt].outcome = "failed"
                self._log("schedule", "stopped", reason=f"acquisition raised {type(exc).__name__}: {exc}")
                raise
            ended = self.clock.now()
            record = acq.attempts[attempt]
            record.outcome = result.status
            failures = acq.failures
            # final: this acquisition is over for good (done, or out of attempts); a fatal fault or an
            # abort stops retrying now but leaves it open, so a resumed run tries again.
            final = result.status == "done" or failures >= self.max_attempts
            record.final = final
            self._log("acquire", result.status, **ids, attempt=attempt, files=list(result.files),
                      duration_s=round(ended - started, 3), final=final,
                      **({"fatal": True} if result.fatal else {}), **_details(result.details))
            self._last_acquisition = (step.key, ended)
            if final or result.fatal or self.control.aborted:
                return result.fatal

    # -- run ------------------------------------------------------------------------------

    def run(self) -> ScheduleSummary:
        """Run every step not yet ended; returns when all are done, on abort, or on a fatal result."""
        state, reason = "finished", None
        try:
            self._checkpoint()
            self._start()
            operator = self._start_operator() if self.operator_thread else None
            for step in self.steps:
                if step.entry.kind == "acquire" and self.state.acquisitions[step.key].terminal:
                    continue
                if step.entry.kind == "stain" and operator is not None:
                    continue
                self._wait_until(self.t0 + step.entry.at_s)
                if step.entry.kind == "stain":
                    self._stain(step)
                elif self._acquisition(step):
                    state, reason = "stopped", "an acquisition reported a fatal fault"
                    break
                self._checkpoint()
        except _Aborted as exc:
            state, reason = "aborted", str(exc) or self.control.abort_reason or "operator"
        finally:
            self._stop_operator()
        summary = self.summary(state, reason)
        data = {"done": len(summary.done), "skipped": len(summary.skipped), "failed": len(summary.failed),
                "pending": len(summary.pending)}
        if state == "finished":
            self._log("schedule", "finished", **data)
        elif state == "aborted":
            self._log("schedule", "aborted", reason=reason, **data)
        else:
            self._log("schedule", "stopped", reason=reason, **data)
        return summary

    # -- the operator's thread --------------------------------------------------------------

    def _start_operator(self) -> threading.Thread:
        """Stain prompts in a thread of their own, so they come on time while the instrument is busy.

        Only for clocks tied to wall time (real or scaled): two threads sleeping on a virtual
        clock would each move it.
        """
        self._operator_done = threading.Event()
        thread = threading.Thread(target=self._operate, name="clemflow-operator", daemon=True)
        self._operator = thread
        thread.start()
        return thread

    def _operate(self) -> None:
        chunk = self._chunk()
        for step in self.steps:
            if step.entry.kind != "stain":
                continue
            target = self.t0 + step.entry.at_s
            while not self._operator_done.is_set() and not self.control.aborted:
                if self.control.paused:
                    self.control.wait_while_paused(timeout=0.2)
                    continue
                remaining = target - self.clock.now()
                if remaining <= 0:
                    break
                self.clock.sleep(remaining if chunk is None else min(remaining, chunk))
            if self._operator_done.is_set() or self.control.aborted:
                return
            self._stain(step)

    def _stop_operator(self) -> None:
        thread = getattr(self, "_operator", None)
        if thread is None:
            return
        if self.control.aborted or any(not a.terminal for a in self.state.acquisitions.values()):
            self._operator_done.set()  # stopping early: pending prompts are not issued
        thread.join(timeout=5.0)
        self._operator = None

    def summary(self, state: Literal["finished", "aborted", "stopped"] = "finished", reason: str | None = None) -> ScheduleSummary:
        return ScheduleSummary(
            state=state,
            t0=self.state.t0 if self.state.t0 is not None else float("nan"),
            statuses={k: a.status for k, a in self.state.acquisitions.items()},
            cut_off=list(self.cut_off),
            delays_s={k: round(v, 3) for k, v in self._delays.items()},
            clash_delays_s=dict(self._clash),
            late=list(self._late),
            reason=reason,
        )


_RESERVED = {"seq", "time", "t", "step", "outcome", "sample", "timepoint", "timepoint_s", "attempt", "files",
             "duration_s", "final", "fatal"}


def _details(details: dict[str, Any]) -> dict[str, Any]:
    """An acquisition's details, renamed where they would shadow the runner's own keys."""
    return {(f"detail_{k}" if k in _RESERVED else k): v for k, v in details.items()}


def run_protocol_schedule(
    protocol: Protocol,
    run_folder: RunFolder,
    acquire: AcquireFn,
    clock: Clock | None = None,
    prompt: PromptFn = auto_confirm,
    control: RunControl | None = None,
    **options: Any,
) -> ScheduleSummary:
    """The one entry point: build a :class:`Runner` on ``run_folder`` (resuming it) and run it.

    ``options`` go to :class:`Runner` (``t0``, ``max_attempts``, ``on_cut_off``, ``listener``, ``poll_s``,
    ``operator_thread``).
    """
    return Runner(protocol, run_folder, acquire, clock, prompt, control, **options).run()
