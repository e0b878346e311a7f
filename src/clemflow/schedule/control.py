"""Pause, resume and abort a running schedule from another thread.

The runner looks at a :class:`RunControl` at its checkpoints, which lie between
steps (and while it waits for the next one): a pause holds it at the next
checkpoint until resumed; an abort lets the step in progress finish, then ends
the run. An acquisition that takes long may also look at :attr:`RunControl.aborted`
to cut itself short at a safe point (shutter closed, stage still, file closed).

Any thread may call :meth:`pause`, :meth:`resume` and :meth:`abort`: a terminal
reader (see :mod:`clemflow.schedule.terminal`), a signal handler, a test.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["RunControl", "install_sigint_abort"]


class RunControl:
    """Thread-safe pause / resume / abort flags with a wait that wakes on change."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._abort_reason: str | None = None

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    @property
    def aborted(self) -> bool:
        with self._cond:
            return self._abort_reason is not None

    @property
    def abort_reason(self) -> str | None:
        with self._cond:
            return self._abort_reason

    def pause(self) -> None:
        """Hold the run at its next checkpoint (between steps)."""
        with self._cond:
            self._paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        """Let a paused run go on."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def abort(self, reason: str = "operator") -> None:
        """End the run after the step in progress; also releases a pause."""
        with self._cond:
            if self._abort_reason is None:
                self._abort_reason = reason
            self._cond.notify_all()

    def wait_while_paused(self, timeout: float | None = None) -> bool:
        """Block (real time) while paused and not aborted; True when free to go on.

        ``timeout`` is in wall-clock seconds: waiting for an operator is not
        protocol time, so it does not go through the run's clock.
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self._abort_reason is not None, timeout)
            return not self._paused and self._abort_reason is None

    def on_change(self) -> threading.Condition:
        """The condition notified on every change (for a waiter that wants to wake early)."""
        return self._cond


def install_sigint_abort(control: RunControl) -> Callable[[], None]:
    """First Ctrl-C asks for an abort after the current step; a second one interrupts at once.

    Must be called from the main thread. Returns a function that restores the
    previous handler.
    """
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if control.aborted:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        control.abort("interrupted (Ctrl-C)")

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)
