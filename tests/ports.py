"""Loopback ports for bridge servers started by the tests (a module, not a test file: no tests here)."""

from __future__ import annotations

import socket


def free_port_pair() -> int:
    """A port P with P and P + 1 free on loopback (commands, events)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of consecutive ports")
