"""Alerts of a slice-and-view run: the terminal, the journal, the dashboard and the protocol's notify hook.

A run pauses on a fault, often at night: the alert must reach someone. Every
alert is printed and journalled; if the protocol's ``qc.notify`` names a
command it is run with the alert text on standard input, and a webhook gets it
as JSON. Both run on a background thread with a timeout, so a hung mail
command or an unreachable URL never holds the instrument.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..io.journal import Journal

__all__ = ["Alerts"]

log = logging.getLogger("clemflow.fibsem.alerts")

NOTIFY_TIMEOUT_S = 10.0
STYLE = {"info": "cyan", "warning": "yellow", "error": "red"}


class Alerts:
    """Sends one alert everywhere it should go."""

    def __init__(self, console: Console, journal: Journal, *, command: str | None = None, webhook: str | None = None,
                 run_id: str = "") -> None:
        self.console, self.journal = console, journal
        self.command, self.webhook, self.run_id = command, webhook, run_id
        self.listeners: list[Callable[[str, str], None]] = []
        self._threads: list[threading.Thread] = []

    def send(self, message: str, level: str = "warning", **data: Any) -> None:
        """Print, journal (``alert``/level), tell listeners (the dashboard) and notify (errors and warnings)."""
        self.console.print(f"[{STYLE.get(level, 'white')}]{'✗' if level == 'error' else '!'}[/] {escape(message)}", soft_wrap=True)
        self.journal.append("alert", level, message=message, **data)
        for listener in list(self.listeners):
            try:
                listener(message, level)
            except Exception:
                log.exception("alert listener failed")
        if level in ("warning", "error") and (self.command or self.webhook):
            body = {"run_id": self.run_id, "level": level, "message": message, **data}
            thread = threading.Thread(target=self._notify, args=(body,), name="clemflow-notify", daemon=True)
            thread.start()
            self._threads.append(thread)

    def flush(self, timeout_s: float = NOTIFY_TIMEOUT_S) -> None:
        """Wait (a bounded time) for notifications in flight, e.g. before the process exits on a pause."""
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = [t for t in self._threads if t.is_alive()]

    def _notify(self, body: dict[str, Any]) -> None:
        text = f"clemflow run {body['run_id']}: {body['level']}: {body['message']}\n"
        if self.command:
            try:
                subprocess.run(self.command, shell=True, input=text, text=True, timeout=NOTIFY_TIMEOUT_S,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("notify command %r failed: %s", self.command, exc)
        if self.webhook:
            request = urllib.request.Request(self.webhook, data=json.dumps(body, default=str).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT_S):
                    pass
            except OSError as exc:
                log.warning("notify webhook %s failed: %s", self.webhook, exc)
