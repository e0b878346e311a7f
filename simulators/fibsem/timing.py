"""How long the simulated instrument takes, and how it waits.

Every duration is instrument time (what a real Crossbeam would take); it is
slept as ``duration / time_scale`` in steps of at most 50 ms so that an abort
is noticed. ``time_scale`` of 0, negative or ``inf`` means no delay at all.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = [
    "AUTOFUNCTION_S",
    "RESIN_SPUTTER_YIELD_UM3_PER_NC",
    "STAGE_MM_PER_S",
    "Waiter",
    "frame_time_s",
    "mill_time_s",
    "stage_time_s",
]

# Same value as clemflow.fibsem.estimate.RESIN_SPUTTER_YIELD_UM3_PER_NC (a test keeps them equal):
# µm³ removed per nC of 30 kV Ga+; scaled linearly with the ion voltage below 30 kV.
RESIN_SPUTTER_YIELD_UM3_PER_NC = 0.27
STAGE_MM_PER_S = 1.0
STAGE_DEG_PER_S = 10.0
STAGE_SETTLE_S = 1.0
AUTOFUNCTION_S = {"autofocus": 15.0, "autostigmation": 12.0, "auto_contrast": 10.0}


def frame_time_s(width: int, height: int, dwell_s: float, line_averaging: int) -> float:
    return float(width) * float(height) * float(dwell_s) * int(line_averaging)


def mill_time_s(volume_um3: float, current_a: float, voltage_v: float = 30_000.0) -> float:
    """Volume / (sputter yield x charge rate)."""
    yield_ = RESIN_SPUTTER_YIELD_UM3_PER_NC * min(max(voltage_v, 1.0) / 30_000.0, 1.0)
    return float(volume_um3) / (yield_ * current_a * 1e9)


def stage_time_s(distance_m: float, angle_deg: float) -> float:
    """Linear distance at 1 mm/s, rotation/tilt at 10 deg/s (the slower wins), plus 1 s settling."""
    return max(distance_m * 1e3 / STAGE_MM_PER_S, abs(angle_deg) / STAGE_DEG_PER_S) + STAGE_SETTLE_S


class Waiter:
    """Sleeps instrument time, scaled, in small steps; stops early when told to."""

    STEP_S = 0.05

    def __init__(self, time_scale: float) -> None:
        self.time_scale = float(time_scale)

    @property
    def instant(self) -> bool:
        return self.time_scale <= 0 or math.isinf(self.time_scale) or math.isnan(self.time_scale)

    def wall_s(self, duration_s: float) -> float:
        return 0.0 if self.instant else max(duration_s, 0.0) / self.time_scale

    def wait(
        self,
        duration_s: float,
        stop: threading.Event,
        progress: Callable[[float], None] | None = None,
        *,
        until: float = 1.0,
    ) -> float:
        """Wait ``until`` x ``duration_s`` of instrument time (``until`` in 0..1), or less if ``stop`` is set;
        ``progress`` gets the fraction of the whole duration done. Returns that fraction at the end."""
        target = max(0.0, min(until, 1.0))
        wall = self.wall_s(duration_s) * target
        if wall <= 0.0:
            if stop.is_set():
                return 0.0
            if progress is not None:
                progress(target)
            return target
        t0 = time.monotonic()
        last = -1.0
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= wall:
                break
            if stop.wait(min(self.STEP_S, wall - elapsed)):
                return min((time.monotonic() - t0) / wall, 1.0) * target
            frac = min((time.monotonic() - t0) / wall, 1.0) * target
            if progress is not None and frac - last >= 0.01:
                progress(frac)
                last = frac
        if progress is not None:
            progress(target)
        return target
