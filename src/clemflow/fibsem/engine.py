"""The slice-and-view engine: a whole run through the bridge, resumable after any crash (docs/slice-and-view.md).

    engine = SliceAndViewEngine(bridge, protocol.fibsem, folder, plan, target, console=console)
    outcome = engine.run()   # done, paused (on a fault), aborted, refused or unavailable

The engine talks only to a ``BridgeClient``. Everything it learns goes into
the run folder's journal before it acts on it, so a new process on the same
folder continues where the last one stopped (``resume.read_memory``): setup
steps are not repeated, and the slice that was in progress is settled through
the server's record of its idempotency key, or by looking at the face
(``cycle``). A slice is milled only after the previous one is on disk and
journalled.

On a fault (any bridge error that is not a transient ``busy``, a lost
bridge, frames failing their checks three times, the fiducial lost, a slice
that cannot be written) the engine stops milling, blanks both beams,
journals ``fault``, alerts, and then either waits for the operator's ``r``
(interactive) or ends with the state ``paused`` so that the same command
resumes it. Every start and every resume reads the instrument's state first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from ..bridge.client import BridgeClient
from ..bridge.client_types import BridgeError, BridgeTimeout, BridgeUnavailable
from ..io.run_folder import RunFolder
from ..protocol.fibsem import FIBSEM
from ..schedule.control import RunControl
from .alerts import Alerts
from .context import RunContext
from .cycle import SliceCycle
from .plan import SlicePlan
from .preflight import PreflightProblem, preflight
from .renew import renew_fiducial, renewal_due
from .resume import RunMemory, read_memory
from .safety import FaultInfo, PauseRun, instrument_problems, make_safe, what_to_check
from .setup import restore_imaging, run_setup
from .slices import SliceWriter
from .stream import SliceStream
from .target import ChosenTarget
from .tracking import Tracking
from .view import load_template

__all__ = ["EngineOutcome", "SliceAndViewEngine"]

BUSY_WAIT_S = 7200.0


@dataclass(frozen=True)
class EngineOutcome:
    """How a session ended: ``done``, ``paused`` (fault), ``aborted`` (operator), ``refused`` (preflight), ``unavailable``."""

    state: str
    message: str
    slices_saved: int
    fault: FaultInfo | None = None
    problems: tuple[PreflightProblem, ...] = ()


class StatusSink:
    """What the engine tells a live view; ``SliceDashboard`` fits (``update(SliceStatus)``, ``alert(message, level)``)."""

    def update(self, status: Any) -> None: ...

    def alert(self, message: str, level: str = "warning") -> None: ...


class SliceAndViewEngine:
    def __init__(self, bridge: BridgeClient, fibsem: FIBSEM, folder: RunFolder, plan: SlicePlan, target: ChosenTarget, *,
                 console: Console | None = None, control: RunControl | None = None, interactive: bool = False,
                 dashboard: StatusSink | None = None, notify_command: str | None = None, notify_webhook: str | None = None,
                 on_slice: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.bridge, self.fibsem, self.folder, self.plan, self.target = bridge, fibsem, folder, plan, target
        self.console = console or Console(highlight=False)
        self.control = control or RunControl()
        self.interactive = interactive
        self.dashboard = dashboard
        self.alerts = Alerts(self.console, folder.journal, command=notify_command, webhook=notify_webhook, run_id=folder.run_id)
        if dashboard is not None:
            self.alerts.listeners.append(lambda message, level: dashboard.alert(message, level))
        self.on_slice = on_slice
        self.stream = SliceStream(folder.path)
        if on_slice is not None:
            self.stream.subscribe(on_slice)
        self._slice: int | None = None
        self._phase = "start"
        self._durations: deque[float] = deque(maxlen=20)
        self.cycle: SliceCycle | None = None

    # ------------------------------------------------------------------ the run

    def run(self) -> EngineOutcome:
        journal = self.folder.journal
        memory = read_memory(journal)
        if memory.finished is not None and memory.last_saved >= self.plan.slices:
            return EngineOutcome("done", f"the run is complete ({memory.last_saved} slices); nothing to do", memory.last_saved)
        try:
            info = self.bridge.hello()
        except (BridgeUnavailable, BridgeTimeout) as exc:
            journal.append("fibsem", "unavailable", message=str(exc))
            return EngineOutcome("unavailable", f"the bridge does not answer: {exc}", memory.last_saved)
        problems = preflight(self.fibsem, self.plan, (self.target.x_m, self.target.y_m), info.limits)
        if problems:
            journal.append("fibsem", "refused", problems=[str(p) for p in problems])
            return EngineOutcome("refused", "the instrument cannot do this run as written; nothing was moved or milled",
                                 memory.last_saved, problems=tuple(problems))
        if memory.finished is not None:  # a run stopped by --slices, asked for more
            journal.append("fibsem", "extended", slices=self.plan.slices, after=memory.last_saved)
            memory.finished = None
        session = memory.sessions + 1
        journal.append("fibsem", "started", session=session, plan=self.plan.as_json(), target=self.target.as_json(),
                       server_id=info.server_id, backend=info.backend, model=info.model, serial=info.serial,
                       resumed_after=memory.last_saved)
        memory.sessions = session
        ctx = RunContext(self.bridge, self.fibsem, self.plan, self.target, self.folder.path, self.folder.run_id, journal,
                         memory, session, self.alerts, limits=info.limits)
        writer = SliceWriter(self.folder.path)
        writer.remove_stale()
        added = self.stream.catch_up(memory.saved_records())
        if added:
            journal.append("stream", "caught up", slices=added)
        while True:
            try:
                return self._session(ctx, writer)
            except PauseRun as pause:
                fault = pause.fault
            except BridgeError as error:
                fault = FaultInfo.from_exception(error, slice=self._slice, phase=self._phase)
            except (BridgeUnavailable, BridgeTimeout) as error:
                fault = FaultInfo.from_exception(error, slice=self._slice, phase=self._phase)
            except OSError as error:
                fault = FaultInfo.from_exception(error, slice=self._slice, phase=self._phase)
            if fault.slice is None and self._slice is not None:
                fault = FaultInfo(fault.name, fault.message, fault.code, fault.retry_safe, self._slice, fault.phase or self._phase,
                                  fault.key)
            self._on_fault(ctx, fault)
            if not self.interactive:
                self.alerts.flush()
                return EngineOutcome("paused", fault.headline(), memory.last_saved, fault=fault)
            self.control.pause()
            self.console.print("[yellow]Paused on the fault.[/yellow] Fix it, then type [bold]r[/bold] to resume "
                               "(the instrument is checked first) or [bold]a[/bold] to stop here.")
            if not self.control.wait_while_paused():
                journal.append("fibsem", "aborted", slice=self._slice, reason=self.control.abort_reason)
                return EngineOutcome("aborted", f"stopped by the operator after the fault ({self.control.abort_reason})",
                                     memory.last_saved, fault=fault)
            journal.append("fibsem", "resume requested", slice=self._slice)

    def _session(self, ctx: RunContext, writer: SliceWriter) -> EngineOutcome:
        """Check the instrument, finish setup, then slices until a stop criterion."""
        memory = ctx.memory
        self._phase = "instrument check"
        self._check_instrument(ctx)
        tracking = Tracking.from_json(memory.tracking) if memory.tracking else None
        self._phase = "restore imaging"
        restore_imaging(ctx, tracking, memory.last_saved)
        self._phase = "setup"
        tracking = run_setup(ctx)
        template_data = memory.template or {}
        template = load_template(self.folder.path / str(template_data["path"]), template_data)
        restore_imaging(ctx, tracking, memory.last_saved)
        cycle = SliceCycle(ctx, tracking, template, writer, self.stream)
        self.cycle = cycle
        return self._slices(ctx, cycle)

    def _slices(self, ctx: RunContext, cycle: SliceCycle) -> EngineOutcome:
        memory, plan = ctx.memory, self.plan
        started = self._run_started(ctx)
        index = memory.last_saved + 1
        reason = plan.limited_by
        self._status(ctx, cycle, "running")
        while index <= plan.slices:
            stop = self._checkpoint(ctx)
            if stop is not None:
                return stop
            if plan.max_duration_s is not None and time.time() - started >= plan.max_duration_s:
                reason = "duration"
                break
            self._slice = index
            t0 = time.monotonic()
            if not memory.slice(index).milled and renewal_due(cycle, index - 1):
                self._phase = "fiducial renewal"
                renew_fiducial(cycle, index - 1)
            if not memory.slice(index).milled:
                self._phase = "mill"
                cycle.mill(index)
            self._phase = "image"
            cycle.image(index)
            self._durations.append(time.monotonic() - t0)
            self._status(ctx, cycle, "running")
            index += 1
        self._slice = None
        ctx.journal.append("fibsem", "done", slices=memory.last_saved, reason=reason, depth_m=plan.depth_after(memory.last_saved))
        memory.finished = {"slices": memory.last_saved}
        self._status(ctx, cycle, "done")
        return EngineOutcome("done", f"{memory.last_saved} slices, {plan.depth_after(memory.last_saved) * 1e6:.3f} µm "
                             f"(stopped by {reason})", memory.last_saved)

    # ------------------------------------------------------------------ checks, faults, pauses

    def _check_instrument(self, ctx: RunContext) -> None:
        """The instrument must be ready (vacuum, beams on, no interlock) and idle before anything is sent."""
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            state = ctx.call(lambda: ctx.bridge.state())
            if not state.get("busy"):
                break
            if time.monotonic() > deadline:
                raise PauseRun(FaultInfo("busy", f"the instrument stayed busy with {state.get('busy')}", phase="instrument check"))
            time.sleep(0.2)
        problems = instrument_problems(state)
        fault = ctx.memory.paused_on_fault
        if problems:
            raise PauseRun(FaultInfo("instrument_not_ready", "the instrument is not ready: " + "; ".join(problems),
                                     slice=ctx.memory.last_saved + 1 if ctx.memory.last_saved else None,
                                     phase="instrument check", retry_safe=True))
        if fault is not None:
            ctx.journal.append("fibsem", "resumed after fault", fault=fault.get("name"), slice=fault.get("slice"),
                               vacuum=state.get("vacuum"), interlocks=state.get("interlocks"))
            fault["resolved"] = True
            ctx.memory.resumes += 1
            self.alerts.send(f"resuming after {fault.get('name')}: instrument ready", "info")

    def _on_fault(self, ctx: RunContext, fault: FaultInfo) -> None:
        self._phase = "fault"
        running = None
        safe = make_safe(ctx.bridge, ctx.fresh("fault", "safe"), running)
        data = fault.as_json()
        ctx.journal.append("fault", "paused", **data, made_safe=safe)
        ctx.memory.faults.append(dict(data))
        blanked = ", ".join(safe["blanked"]) or "none"
        note = f"beams blanked: {blanked}" + (f"; NOT done: {'; '.join(safe['failed'])}" if safe["failed"] else "")
        self.alerts.send(f"{fault.headline()}: {fault.message}. {what_to_check(fault)}. {note}", "error",
                         fault=fault.name, slice=fault.slice)
        if self.cycle is not None:
            self._status(ctx, self.cycle, "fault")

    def _checkpoint(self, ctx: RunContext) -> EngineOutcome | None:
        """Between slices: an operator's pause holds here (beams blanked), an abort ends the session."""
        control = self.control
        if control.paused and not control.aborted:
            ctx.journal.append("fibsem", "paused", slice=ctx.memory.last_saved, by="operator")
            make_safe(ctx.bridge, ctx.fresh("pause", "safe"))
            if self.cycle is not None:
                self._status(ctx, self.cycle, "paused")
            control.wait_while_paused()
            if not control.aborted:
                self._check_instrument(ctx)
                restore_imaging(ctx, self.cycle.tracking if self.cycle else None, ctx.memory.last_saved)
                ctx.journal.append("fibsem", "resumed", slice=ctx.memory.last_saved, by="operator")
        if control.aborted:
            make_safe(ctx.bridge, ctx.fresh("abort", "safe"))
            ctx.journal.append("fibsem", "aborted", slice=ctx.memory.last_saved, reason=control.abort_reason)
            if self.cycle is not None:
                self._status(ctx, self.cycle, "aborted")
            return EngineOutcome("aborted", f"stopped after slice {ctx.memory.last_saved} ({control.abort_reason})",
                                 ctx.memory.last_saved)
        return None

    def _run_started(self, ctx: RunContext) -> float:
        for event in ctx.journal.events():
            if event.step == "fibsem" and event.outcome == "started":
                return event.time
        return time.time()

    # ------------------------------------------------------------------ live view

    def _status(self, ctx: RunContext, cycle: SliceCycle, state: str) -> None:
        if self.dashboard is None:
            return
        from .dashboard import SliceStatus

        memory, tracking = ctx.memory, cycle.tracking
        rate = None
        end = None
        if self._durations:
            mean = sum(self._durations) / len(self._durations)
            rate = 3600.0 / mean if mean > 0 else None
            end = time.time() + mean * max(0, self.plan.slices - memory.last_saved)
        last = cycle.last
        shift = tracking.beam_shift(memory.last_saved)
        self.dashboard.update(SliceStatus(
            slice_index=memory.last_saved, total_slices=self.plan.slices, depth_nm=self.plan.depth_after(memory.last_saved) * 1e9,
            rate_per_h=rate, end_estimate_s=end, mill_s=last.mill_s or None, image_s=last.image_s or None,
            overhead_s=last.overhead_s if last.total_s else None, drift_px=tracking.last_offset_px,
            similarity=tracking.last_similarity, beam_shift_um=(shift[0] * 1e6, shift[1] * 1e6),
            focus=(memory.slice(memory.last_saved).saved or {}).get("focus") if memory.last_saved else None,
            wd_mm=tracking.working_distance(memory.last_saved) * 1e3, last_autofocus_slice=tracking.last_autofocus,
            state=state,  # type: ignore[arg-type]
            updated_s=time.time()))


def memory_of(folder: Path) -> RunMemory:
    """The journal of a run folder, replayed (for tests and tools)."""
    from ..io.journal import Journal

    return read_memory(Journal(Path(folder) / "journal.jsonl"))
