"""A bridge server on this machine as a child process: for the tests, the benchmarks and local simulated runs.

``clemflow bridge serve`` prints one JSON line ``{"event": "listening", ...}``
on standard output once its sockets are bound; whoever starts it waits for
that line (a vendor library may print before it). Restarting a server on the
same record needs the same address, hence a port picked up front rather than
port 0.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["free_port_pair", "serve_bridge", "wait_listening"]


def free_port_pair() -> int:
    """A port P with P and P + 1 free on loopback (commands, events)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of consecutive ports on loopback")


def wait_listening(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any] | None:
    """The server's listening event from its standard output, or None if it ended or stayed silent."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if not line:
            return None
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "listening":
                return event


def serve_bridge(args: list[str], log_path: str | Path, *, python: str = sys.executable,
                 env: dict[str, str] | None = None, timeout_s: float = 60.0) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start ``python -m clemflow bridge serve *args`` (stderr to ``log_path``) and wait until it listens.

    Raises RuntimeError with the end of the log when it does not start.
    """
    log_path = Path(log_path)
    with open(log_path, "a") as log:
        proc = subprocess.Popen([python, "-m", "clemflow", "bridge", "serve", *args], stdout=subprocess.PIPE, stderr=log,
                                env=env, text=True)
    listening = wait_listening(proc, timeout_s)
    if listening is None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        raise RuntimeError(f"bridge server did not start (exit {proc.returncode}):\n{log_path.read_text()[-3000:]}")
    return proc, listening
