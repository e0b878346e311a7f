"""What every FIB-SEM driver shares: report shapes, retry safety, and waiting on the instrument.

Vendor APIs start long actions (a mill, a frame, a stage move) and then report
their progress through a state they expose. Each driver polls that state the
same way: report progress, stop the instrument when the operation is cancelled,
and give up after a timeout. Keeping the loop here means the three drivers
cannot disagree about what "cancelled" or "timed out" means on the wire.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import numpy as np

from clemflow.bridge.backend import InstrumentFault, Job

__all__ = [
    "Context",
    "beam_report",
    "LongOperations",
    "fault",
    "long_operation",
    "match_current",
    "optics_metadata",
    "retry_safe_for",
    "stage_report",
    "to_bit_depth",
    "wait_for",
]

Context = Literal["query", "set", "image", "mill", "move", "autofunction"]
"""What the driver was doing when something failed: decides whether a retry is safe."""

_DESTRUCTIVE: frozenset[str] = frozenset({"mill", "move"})
_F = TypeVar("_F", bound=Callable[..., Any])


class LongOperations:
    """Counts the long operations under way, so a query never re-aims the instrument beneath one.

    Vendor APIs report a detector only for the active view or mode; reading the
    other beam's means switching, which must not happen mid-frame or mid-mill.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @property
    def running(self) -> bool:
        with self._lock:
            return self._count > 0

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._count -= 1


def long_operation(method: _F) -> _F:
    """Run a backend method inside its ``self._long`` (a :class:`LongOperations`)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._long:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def retry_safe_for(name: str, context: Context) -> bool:
    """The wire table's retry safety for an error met while doing ``context``.

    A mill or a stage move may have partly happened whatever went wrong, so
    every failure there is unsafe to repeat blindly; imaging, reading and
    settings are harmless to repeat (docs/bridge-protocol.md, section 3).
    """
    if name == "stage_error":
        return False
    if name in ("frame_timeout", "autofunction_diverged", "interlock"):
        return True
    return context not in _DESTRUCTIVE


def fault(name: str, message: str, context: Context, *, vendor_code: int | None = None, **details: Any) -> InstrumentFault:
    """An ``InstrumentFault`` with the retry safety the wire table gives ``name`` in ``context``."""
    if vendor_code is not None:
        details["vendor_code"] = vendor_code
    return InstrumentFault(name, message, retry_safe=retry_safe_for(name, context), details=details)


def beam_report(
    *,
    on: bool,
    blanked: bool,
    voltage_v: float,
    current_a: float,
    working_distance_m: float,
    horizontal_field_width_m: float,
    stigmation: tuple[float, float],
    beam_shift_m: tuple[float, float],
    scan_rotation_deg: float,
    detector: str,
    detectors: list[str] | tuple[str, ...],
) -> dict[str, Any]:
    """A ``BEAM`` object of the wire protocol, from values the instrument reported."""
    return {
        "on": bool(on),
        "blanked": bool(blanked),
        "voltage_v": float(voltage_v),
        "current_a": float(current_a),
        "working_distance_m": float(working_distance_m),
        "horizontal_field_width_m": float(horizontal_field_width_m),
        "stigmation": [float(stigmation[0]), float(stigmation[1])],
        "beam_shift_m": [float(beam_shift_m[0]), float(beam_shift_m[1])],
        "scan_rotation_deg": float(scan_rotation_deg),
        "detector": str(detector),
        "detectors": [str(d) for d in detectors],
    }


def stage_report(x_m: float, y_m: float, z_m: float, r_deg: float, t_deg: float) -> dict[str, float]:
    """The wire protocol's stage position object."""
    return {"x_m": float(x_m), "y_m": float(y_m), "z_m": float(z_m), "r_deg": float(r_deg), "t_deg": float(t_deg)}


def wait_for(
    done: Callable[[], bool],
    job: Job,
    *,
    what: str,
    context: Context,
    timeout_s: float,
    stop: Callable[[], None] | None = None,
    progress: Callable[[float], float | None] | None = None,
    poll_s: float = 0.02,
    sleep: Callable[[float], None] = time.sleep,
    timeout_name: str = "timeout",
    stop_wait_s: float = 10.0,
) -> float:
    """Poll ``done()`` until it is true; return the seconds it took.

    ``progress(elapsed_s)`` gives the fraction done (or ``None`` to skip a
    report). A cancelled job or an exceeded ``timeout_s`` calls ``stop()`` and
    waits (up to ``stop_wait_s``) for the instrument to come to rest before
    raising, so the error is only reported once nothing is moving any more.
    Errors raised by ``done()`` (a vendor error, a lost link) pass through.
    """
    start = time.monotonic()
    while True:
        if done():
            return time.monotonic() - start
        elapsed = time.monotonic() - start
        if job.cancelled:
            _halt(done, stop, sleep, poll_s, stop_wait_s)
            raise fault("cancelled", f"{what} cancelled after {elapsed:.1f} s", context)
        if elapsed > timeout_s:
            _halt(done, stop, sleep, poll_s, stop_wait_s)
            raise fault(timeout_name, f"{what} did not finish within {timeout_s:.1f} s", context, timeout_s=timeout_s)
        if progress is not None:
            fraction = progress(elapsed)
            if fraction is not None:
                job.progress(min(max(float(fraction), 0.0), 1.0), what)
        sleep(poll_s)


def _halt(done: Callable[[], bool], stop: Callable[[], None] | None, sleep: Callable[[float], None], poll_s: float, wait_s: float) -> None:
    """Ask the instrument to stop and give it a moment to settle; never raises."""
    if stop is None:
        return
    try:
        stop()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not done():
            sleep(poll_s)
    except InstrumentFault:
        pass  # the original reason (cancel, timeout) is what the caller must hear


def to_bit_depth(data: np.ndarray, bit_depth: int) -> np.ndarray:
    """The requested sample size; 8 <-> 16 bit by scaling the full range, as vendor software exports do."""
    data = np.asarray(data)
    if data.ndim == 3:  # an RGB export of a grey image: one channel carries it
        data = data[..., 0]
    if bit_depth == 16:
        return data if data.dtype == np.uint16 else data.astype(np.uint16) * np.uint16(257)
    return data if data.dtype == np.uint8 else (data.astype(np.uint16) >> 8).astype(np.uint8)


CURRENT_MATCH = 0.01  # a requested current must be within 1 % of one the column offers


def match_current(offered: list[float], current_a: float, field: str, what: str) -> float:
    """The column's own value for a requested current (probe / aperture); refuse one it does not offer.

    ``offered`` empty: the column takes any current in its range, and the request is passed on as it is.
    """
    if not offered:
        return current_a
    best = min(offered, key=lambda v: abs(v - current_a))
    if abs(best - current_a) > CURRENT_MATCH * current_a:
        raise InstrumentFault(
            "out_of_range",
            f"{what} {current_a:.3g} A is not one the column offers (nearest {best:.3g} A)",
            retry_safe=False,
            details={"field": field, "available_a": sorted(offered)},
        )
    return best


def optics_metadata(beam: dict[str, Any]) -> dict[str, Any]:
    """The beam settings a frame's metadata records, from a ``beam_report`` read back after the grab."""
    keys = ("voltage_v", "current_a", "working_distance_m", "stigmation", "beam_shift_m", "scan_rotation_deg")
    return {key: beam[key] for key in keys}
