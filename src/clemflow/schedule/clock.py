"""The only source of time in clemflow.

Logic never calls time.time(): it asks a Clock. On hardware that is wall-clock
time; in demos a scaled clock runs a 48 h protocol in minutes; in tests a
virtual clock jumps instantly, so the same scheduler code is exercised.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "RealClock", "ScaledClock", "VirtualClock"]


@runtime_checkable
class Clock(Protocol):
    """Seconds since the epoch in *planned* time, and sleeping in planned time."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


def isoformat(epoch_s: float) -> str:
    """UTC ISO 8601 with milliseconds, as written in journals and metadata."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="milliseconds")


class RealClock:
    """Wall-clock time."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ScaledClock:
    """Planned time runs `scale` times faster than wall-clock time, from `start` (planned epoch)."""

    def __init__(self, scale: float, start: float | None = None) -> None:
        if scale <= 0:
            raise ValueError("time scale must be positive")
        self.scale = scale
        self._wall0 = time.monotonic()
        self._planned0 = time.time() if start is None else start

    def now(self) -> float:
        return self._planned0 + (time.monotonic() - self._wall0) * self.scale

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds / self.scale)


class VirtualClock:
    """Time that moves only when someone sleeps or advances it; thread-safe."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._now += seconds
