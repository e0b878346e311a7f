"""The live view of a slice-and-view run: where it is, how fast, how steady, and what went wrong.

:class:`SliceDashboard` draws a compact rich panel (progress, rate, end,
time split of the last slice, drift with a sparkline of recent fiducial
offsets, focus, alerts) in a ``rich.live.Live`` at most 4 times a second
on a terminal. On anything else (a log file, a pipe, a test's recording
console) it prints one plain line every ``log_every`` slices, on every
change of state and for each alert, so logs are not flooded.

The engine owns the numbers; the dashboard only shows them (display times
come from the given clock, never from the run's logic).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..schedule.clock import Clock, RealClock

__all__ = ["AlertLevel", "RunState", "SliceDashboard", "SliceStatus", "sparkline"]

RunState = Literal["starting", "running", "paused", "fault", "done", "aborted"]
AlertLevel = Literal["info", "warning", "error"]

_BLOCKS = "▁▂▃▄▅▆▇█"
_STATE_STYLE = {"starting": "cyan", "running": "green", "paused": "yellow", "fault": "bold red",
                "done": "bold green", "aborted": "red"}
_LEVEL_STYLE = {"info": "cyan", "warning": "yellow", "error": "bold red"}


@dataclass(frozen=True)
class SliceStatus:
    """One snapshot of the run, as the engine knows it after a slice (SI-ish display units in the names).

    ``end_estimate_s`` / ``updated_s`` are clock times (Unix seconds);
    ``drift_px`` is the last fiducial offset found (before its correction),
    ``beam_shift_um`` the total electron beam shift applied so far (x, y);
    ``mill_s`` / ``image_s`` / ``overhead_s`` split the last slice's time.
    """

    slice_index: int
    total_slices: int | None = None
    depth_nm: float = 0.0
    rate_per_h: float | None = None
    end_estimate_s: float | None = None
    mill_s: float | None = None
    image_s: float | None = None
    overhead_s: float | None = None
    drift_px: tuple[float, float] | None = None
    similarity: float | None = None
    beam_shift_um: tuple[float, float] | None = None
    focus: float | None = None
    wd_mm: float | None = None
    last_autofocus_slice: int | None = None
    state: RunState = "running"
    alerts: tuple[str, ...] = ()
    updated_s: float | None = None


@dataclass(frozen=True)
class _Alert:
    at_s: float
    level: AlertLevel
    message: str


def sparkline(values: list[float], *, floor: float = 1.0) -> str:
    """Unicode block sparkline of non-negative values, scaled to max(values, floor)."""
    if not values:
        return ""
    top = max(max(values), floor)
    n = len(_BLOCKS) - 1
    return "".join(_BLOCKS[min(n, max(0, int(round(v / top * n))))] for v in values)


def _clock(ts: float | None, now: float | None) -> str:
    if ts is None:
        return "—"
    text = datetime.fromtimestamp(ts).strftime("%a %H:%M")
    if now is not None and ts >= now:
        left = int(ts - now)
        text += f" (in {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d})"
    return text


def _num(v: object, fmt: str, unit: str = "") -> str:
    """A number for display; anything else as its text (a display must never stop the run)."""
    if v is None:
        return "—"
    try:
        return f"{v:{fmt}}{unit}"
    except (TypeError, ValueError):
        return f"{v}{unit}"


def _pair(v: object, fmt: str, unit: str) -> str:
    try:
        x, y = v  # type: ignore[misc]
        return f"({x:{fmt}}, {y:{fmt}}){unit}"
    except (TypeError, ValueError):
        return "—" if v is None else f"{v}{unit}"


@dataclass
class _View:
    status: SliceStatus | None = None
    drift: deque[float] = field(default_factory=lambda: deque(maxlen=40))
    alerts: deque[_Alert] = field(default_factory=lambda: deque(maxlen=5))
    analysis: dict[str, Any] | None = None  # the live alignment/QC summary (LiveAnalysis.summary)
    steps: deque[float] = field(default_factory=lambda: deque(maxlen=40))  # aligned step per slice, px


def _analysis_line(a: dict[str, Any]) -> str:
    return (f"slice {_num(a.get('slice'), 'd')} shift ({_num(a.get('dx'), '+.2f')}, {_num(a.get('dy'), '+.2f')}) px   "
            f"PSR {_num(a.get('confidence'), '.0f')}   fine done {_num(a.get('aligned'), 'd')}/{_num(a.get('processed'), 'd')}")


_CORRELATION_WORDS = {"waiting": "not decided yet", "confirmed": "on the chosen cell",
                      "not_this_cell": "NOT the chosen cell?"}


def _correlation_line(c: dict[str, Any]) -> Text:
    state = str(c.get("state"))
    style = {"confirmed": "green", "not_this_cell": "bold red"}.get(state, "dim")
    tre = c.get("tre_um")
    return Text(f"{_CORRELATION_WORDS.get(state, state)}   {_num(c.get('agreeing'), 'd')} of "
                f"{_num(c.get('em_droplets'), 'd')} EM droplets agree   TRE "
                f"{_num(tre * 1000 if tre is not None else None, '.0f', ' nm')}   at {_num(c.get('depth_um'), '.1f', ' µm')}",
                style=style)


def _qc_line(a: dict[str, Any]) -> str:
    kinds = ", ".join(a.get("alerts") or []) or "ok"
    return (f"NCC {_num(a.get('ncc'), '.2f')}   sharpness {_num(a.get('sharpness'), '.3g')}   SNR {_num(a.get('snr'), '.1f')}"
            f"   stripes {_num(a.get('stripes'), '.3f')}   brightness {_num(a.get('brightness'), '.1f')}   {kinds}")


class SliceDashboard:
    """Live dashboard of a slice-and-view run; a context manager around ``rich.live.Live``.

    ``live``: draw a live panel (default: when `console` is an interactive
    terminal); otherwise plain lines, one every `log_every` slices.
    `history`: slices shown in the drift sparkline.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        live: bool | None = None,
        refresh_per_second: float = 4.0,
        log_every: int = 10,
        history: int = 40,
        max_alerts: int = 5,
        clock: Clock | None = None,
    ) -> None:
        self.console = console or Console(highlight=False)
        self.live = (self.console.is_terminal and not self.console.is_dumb_terminal) if live is None else live
        self.refresh_per_second = min(4.0, max(0.1, refresh_per_second))
        self.log_every = max(1, int(log_every))
        self.clock = clock or RealClock()
        self._view = _View(drift=deque(maxlen=max(1, history)), alerts=deque(maxlen=max(1, max_alerts)))
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._last_logged: tuple[int, str] | None = None

    # -- context ----------------------------------------------------------------------------

    def __enter__(self) -> "SliceDashboard":
        if self.live and self._live is None:
            self._live = Live(console=self.console, get_renderable=self.render,
                              refresh_per_second=self.refresh_per_second, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display, leaving its last frame on screen (plain mode: log the last status)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif self._view.status is not None:
            self._log_line(self._view.status, force=True)

    # -- input ------------------------------------------------------------------------------

    def update(self, status: SliceStatus) -> None:
        """Show `status`; its drift joins the sparkline once per slice index."""
        with self._lock:
            prev = self._view.status
            if status.drift_px is not None and (prev is None or prev.slice_index != status.slice_index
                                                or prev.drift_px is None):
                try:
                    dx, dy = status.drift_px
                    self._view.drift.append(float((dx * dx + dy * dy) ** 0.5))
                except (TypeError, ValueError):
                    pass  # not a pair of numbers: shown as given, left out of the sparkline
            self._view.status = status
        if self._live is None:
            self._log_line(status)
        else:
            self._live.refresh()

    def alert(self, message: str, level: AlertLevel = "warning") -> None:
        """Raise an alert: kept in the panel's last few, printed at once in plain mode."""
        item = _Alert(self.clock.now(), level, message)
        with self._lock:
            self._view.alerts.append(item)
        if self._live is None:
            self.console.print(self._alert_text(item), soft_wrap=True)
        else:
            self._live.refresh()

    def analysis(self, summary: dict[str, Any]) -> None:
        """The live alignment and QC of the last slice (called from the analysis thread)."""
        with self._lock:
            self._view.analysis = dict(summary)
            if summary.get("step") is not None:
                self._view.steps.append(float(summary["step"]))
        if self._live is not None:
            self._live.refresh()

    @property
    def drift_history(self) -> list[float]:
        """|offset| (px) of the recent slices, oldest first, as in the sparkline."""
        with self._lock:
            return list(self._view.drift)

    # -- output -----------------------------------------------------------------------------

    def _alert_text(self, a: _Alert) -> Text:
        t = Text()
        t.append(datetime.fromtimestamp(a.at_s).strftime("%H:%M:%S "), style="dim")
        t.append(f"{a.level}: ", style=_LEVEL_STYLE.get(a.level, ""))
        t.append(a.message)
        return t

    def summary_line(self, s: SliceStatus) -> str:
        """One plain line for logs (never raises: a display must not stop the run)."""
        try:
            return self._summary(s)
        except Exception as exc:  # noqa: BLE001 - shown instead of the line
            return f"slice {getattr(s, 'slice_index', '?')} (status not shown: {exc!r})"

    def _summary(self, s: SliceStatus) -> str:
        total = f"/{s.total_slices}" if s.total_slices else ""
        parts = [f"slice {s.slice_index}{total}", f"{s.state}", f"depth {_num(s.depth_nm, '.0f')} nm",
                 f"rate {_num(s.rate_per_h, '.1f')} slices/h"]
        if s.end_estimate_s is not None:
            parts.append(f"end {_clock(s.end_estimate_s, None)}")
        if s.drift_px is not None:
            parts.append(f"drift {_pair(s.drift_px, '+.2f', ' px')} sim {_num(s.similarity, '.2f')}")
        if s.focus is not None or s.wd_mm is not None:
            parts.append(f"focus {_num(s.focus, '.3g')} WD {_num(s.wd_mm, '.4f', ' mm')}")
        return " | ".join(parts)

    def _log_line(self, s: SliceStatus, force: bool = False) -> None:
        key = (s.slice_index, s.state)
        last = self._last_logged
        due = (force or last is None or s.state != last[1] or s.slice_index % self.log_every == 0
               or s.slice_index - last[0] >= self.log_every)
        if not due or key == last:
            return
        self._last_logged = key
        self.console.print(escape(self.summary_line(s)), soft_wrap=True, highlight=False)

    def render(self) -> RenderableType:
        """The panel for the current status (what Live draws); never raises."""
        try:
            return self._panel()
        except Exception as exc:  # noqa: BLE001 - shown instead of the panel
            return Panel(Text(f"status not shown: {exc!r}", style="red"), title="slice-and-view")

    def _panel(self) -> RenderableType:
        with self._lock:
            s = self._view.status
            drift = list(self._view.drift)
            alerts = list(self._view.alerts)
            analysis = dict(self._view.analysis or {})
            steps = list(self._view.steps)
        now = self.clock.now()
        if s is None:
            return Panel(Text("waiting for the first slice…", style="dim"), title="slice-and-view")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        pct = f" ({100 * s.slice_index / s.total_slices:.1f} %)" if s.total_slices else ""
        total = f" / {s.total_slices}" if s.total_slices else ""
        grid.add_row("slice", f"{s.slice_index}{total}{pct}   depth {_num(s.depth_nm, ',.0f')} nm")
        grid.add_row("rate", f"{_num(s.rate_per_h, '.1f')} slices/h   end {_clock(s.end_estimate_s, now)}")
        grid.add_row("last slice", f"mill {_num(s.mill_s, '.1f', ' s')} · image {_num(s.image_s, '.1f', ' s')} · "
                                   f"overhead {_num(s.overhead_s, '.2f', ' s')}")
        d = _pair(s.drift_px, "+.2f", " px")
        shift = _pair(s.beam_shift_um, "+.3f", " µm")
        grid.add_row("drift", f"{d}   similarity {_num(s.similarity, '.2f')}   beam shift {shift}")
        if drift:
            grid.add_row("", Text(sparkline(drift), style="cyan") + Text(f"  max {max(drift):.2f} px", style="dim"))
        grid.add_row("focus", f"{_num(s.focus, '.3g')}   WD {_num(s.wd_mm, '.4f', ' mm')}   "
                              f"last autofocus slice {_num(s.last_autofocus_slice, 'd')}")
        if analysis:
            grid.add_row("aligned", _analysis_line(analysis))
            if steps:
                grid.add_row("", Text(sparkline(steps), style="green") + Text(f"  step per slice, max {max(steps):.2f} px",
                                                                            style="dim"))
            grid.add_row("QC", _qc_line(analysis))
            if analysis.get("correlation"):
                grid.add_row("correlation", _correlation_line(analysis["correlation"]))
        parts: list[RenderableType] = [grid]
        lines = [self._alert_text(a) for a in alerts] + [Text(m, style="yellow") for m in s.alerts]
        if lines:
            parts.append(Text("alerts", style="bold"))
            parts.extend(lines[-5:])
        state = Text(s.state.upper(), style=_STATE_STYLE.get(s.state, ""))
        return Panel(Group(*parts), title=Text("slice-and-view · ") + state, title_align="left", expand=False)
