"""The terminal side of a run: operator prompts with a rich countdown, and p / r / a commands.

One reader thread owns the input stream (stdin by default) and reads lines:

====================  =====================================================
``p`` / ``pause``     pause at the next checkpoint between steps
``r`` / ``resume``    go on after a pause
``a`` / ``abort``     stop after the step in progress (the run can be resumed later)
Enter / ``y``         confirm the operator prompt on screen
``n`` / ``no``        decline it (journalled as ``stain unconfirmed``)
====================  =====================================================

:meth:`TerminalSession.prompt` has the runner's ``prompt(message, deadline)``
signature: it shows the request with the time left until ``deadline`` (run
clock) and returns True once confirmed, False if declined, aborted or out of
time. The stream and console are parameters, so tests drive it with a pipe.
"""

from __future__ import annotations

import sys
import threading
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from .clock import Clock, isoformat
from .control import RunControl

__all__ = ["TerminalSession", "format_countdown"]

_PAUSE, _RESUME, _ABORT = {"p", "pause"}, {"r", "resume", "c", "continue"}, {"a", "abort", "q", "quit"}
_YES, _NO = {"", "y", "yes", "ok", "done"}, {"n", "no"}

HELP = "p = pause, r = resume, a = abort after this step"


def format_countdown(seconds: float) -> str:
    """Time left as h:mm:ss (planned time), '0:00:00' when over."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TerminalSession:
    """Reads operator commands from a stream in a thread; shows prompts with a countdown."""

    def __init__(
        self,
        control: RunControl,
        clock: Clock,
        console: Console | None = None,
        stream: IO[str] | None = None,
        refresh_s: float = 0.2,
    ) -> None:
        self.control = control
        self.clock = clock
        self.console = console or Console(highlight=False)
        self.stream = stream if stream is not None else sys.stdin
        self.refresh_s = refresh_s  # wall-clock seconds between redraws (display only, not timing)
        self._lock = threading.Lock()
        self._answer: bool | None = None
        self._waiting = False
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reader ---------------------------------------------------------------------------

    def start(self) -> "TerminalSession":
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="clemflow-terminal", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> "TerminalSession":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._changed.set()

    def _read(self) -> None:
        for line in self.stream:
            self.handle(line)

    def handle(self, line: str) -> None:
        """Act on one line typed by the operator."""
        word = line.strip().lower()
        with self._lock:
            waiting = self._waiting
        if word in _PAUSE:
            self.control.pause()
            self.console.print("[yellow]⏸ paused[/yellow] at the next step; r = resume, a = abort")
        elif word in _RESUME:
            self.control.resume()
            self.console.print("[green]▶ resumed[/green]")
        elif word in _ABORT:
            self.control.abort("operator")
            self.console.print("[red]■ abort requested[/red]: the run stops after the step in progress")
        elif waiting and word in _YES | _NO:
            with self._lock:
                self._answer = word in _YES
        elif word:
            self.console.print(f"[dim]unknown command {word!r}; {HELP}[/dim]")
        self._changed.set()

    # -- prompt ---------------------------------------------------------------------------

    def prompt(self, message: str, deadline: float) -> bool:
        """Ask the operator to do `message` now; True once confirmed before `deadline` (run clock)."""
        with self._lock:
            self._answer, self._waiting = None, True
        try:
            with Live(self._panel(message, deadline), console=self.console, auto_refresh=False, transient=False) as live:
                while True:
                    with self._lock:
                        answer = self._answer
                    if answer is not None or self.control.aborted:
                        live.update(self._panel(message, deadline, answer), refresh=True)
                        return bool(answer)
                    if self.clock.now() >= deadline:
                        live.update(self._panel(message, deadline, False, timed_out=True), refresh=True)
                        return False
                    live.update(self._panel(message, deadline), refresh=True)
                    self._changed.wait(self.refresh_s)
                    self._changed.clear()
        finally:
            with self._lock:
                self._waiting = False

    def _panel(self, message: str, deadline: float, answer: bool | None = None, timed_out: bool = False) -> Panel:
        left = deadline - self.clock.now()
        text = Text(message[:1].upper() + message[1:], style="bold")
        if answer is True:
            text.append("\n✓ confirmed", style="green")
        elif timed_out:
            text.append("\n✗ not confirmed in time; journalled as unconfirmed", style="red")
        elif answer is False:
            text.append("\n✗ not confirmed", style="red")
        else:
            text.append(f"\n{format_countdown(left)} left (by {isoformat(deadline)[11:19]} UTC)", style="cyan")
            text.append(f"\nEnter = done, n = not done; {HELP}", style="dim")
        return Panel(text, title="operator", border_style="yellow" if answer is None else "dim")
