"""Preflight: every value the run will send, checked against the limits the instrument reported in ``hello``.

The bridge server checks each request too, but only when it arrives: a slice
thickness the column cannot mill would be refused after the stage had moved
and the trench was cut. Here the whole run is checked before anything moves,
and every problem is reported at once, with the protocol field to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..bridge.backend import MillPattern
from ..protocol.fibsem import FIBSEM
from .plan import SlicePlan

__all__ = ["FIDUCIAL_CURRENT_A", "PreflightProblem", "fiducial_current", "preflight"]

FIDUCIAL_CURRENT_A = 100e-12


@dataclass(frozen=True)
class PreflightProblem:
    field: str  # protocol field (or "target") to change
    value: Any
    allowed: Any
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message} (value {self.value!r}, instrument allows {self.allowed!r})"


def _within(value: float, bounds: Sequence[float] | None) -> bool:
    if not bounds or len(bounds) != 2:
        return True  # the instrument did not say: the server will check
    return float(bounds[0]) * (1 - 1e-9) <= value <= float(bounds[1]) * (1 + 1e-9)


def preflight(fibsem: FIBSEM, plan: SlicePlan, target_xy_m: tuple[float, float], limits: dict[str, Any]) -> list[PreflightProblem]:
    """Everything in the run that the instrument's limits refuse; empty when the run may start."""
    problems: list[PreflightProblem] = []

    def check(field: str, value: float, bounds: Sequence[float] | None, what: str) -> None:
        if not _within(value, bounds):
            problems.append(PreflightProblem(field, value, list(bounds or []), f"{what} is outside the instrument's range"))

    electron, ion = limits.get("electron") or {}, limits.get("ion") or {}
    sem, fib = fibsem.sem, fibsem.fib
    check("fibsem.sem.voltage", sem.voltage, electron.get("voltage_v"), "SEM voltage")
    check("fibsem.sem.current", sem.current, electron.get("current_a"), "SEM current")
    wd_end = sem.working_distance + plan.wd_per_slice_m * min(plan.slices, 10**6)
    check("fibsem.sem.working_distance", sem.working_distance, electron.get("working_distance_m"), "working distance")
    if _within(sem.working_distance, electron.get("working_distance_m")):
        check("fibsem.sem.working_distance", wd_end, electron.get("working_distance_m"),
              "working distance at the last slice (it grows by sin(tilt) x thickness per slice)")
    hfw = sem.frame[0] * sem.pixel_size
    check("fibsem.sem.pixel_size", hfw, electron.get("horizontal_field_width_m"), "field width (frame width x pixel size)")
    detectors = electron.get("detectors")
    if detectors and sem.detector not in detectors:
        problems.append(PreflightProblem("fibsem.sem.detector", sem.detector, list(detectors), "detector not on this SEM"))
    check("fibsem.sem.frame", sem.frame[0], limits.get("frame_width_px"), "frame width")
    check("fibsem.sem.frame", sem.frame[1], limits.get("frame_height_px"), "frame height")
    check("fibsem.sem.dwell", sem.dwell, limits.get("dwell_s"), "dwell time")
    check("fibsem.sem.line_averaging", sem.line_averaging, limits.get("line_averaging"), "line averaging")
    shift = electron.get("beam_shift_m")
    rise_total = plan.rise_per_slice_m * min(plan.slices, 10**6)
    if shift and not _within(rise_total, shift):
        problems.append(PreflightProblem(
            "fibsem.stop", rise_total, list(shift),
            f"following the face over {plan.slices} slices needs {rise_total * 1e6:.2f} µm of electron beam shift; "
            "stop earlier (depth, slices) or split the run"))

    check("fibsem.fib.voltage", fib.voltage, ion.get("voltage_v"), "FIB voltage")
    check("fibsem.fib.current", fib.current, ion.get("current_a"), "FIB milling current")
    check("fibsem.trench.current", fibsem.trench.current, ion.get("current_a"), "trench current")
    for field, current in (("fibsem.fib.current", fib.current), ("fibsem.trench.current", fibsem.trench.current)):
        offered = ion.get("currents_a") or []
        if offered and _within(current, ion.get("current_a")) and not _offered(current, offered):
            problems.append(PreflightProblem(field, current, list(offered), "the FIB column does not offer this current "
                                             "(choose one of its probes)"))
    offered = electron.get("currents_a") or []
    if offered and not _offered(sem.current, offered):
        problems.append(PreflightProblem("fibsem.sem.current", sem.current, list(offered), "the SEM does not offer this current"))
    check("fibsem.slice_thickness", plan.thickness_m, limits.get("pattern_size_m"), "slice thickness (pattern height)")
    check("fibsem.trench.depth", plan.depth_m, limits.get("mill_depth_m"), "mill depth")

    patterns: list[tuple[str, MillPattern]] = [("fibsem.trench", p) for p in plan.trench()]
    patterns += [("fibsem.slice_thickness", p) for p in plan.fiducial()]
    patterns += [("fibsem.trench.width", plan.slice_patterns(max(1, min(plan.slices, 10**6)))[0])]
    reach = max((ion.get("horizontal_field_width_m") or [0, 0])[1] / 2, 0.0)
    for field, p in patterns:
        for size, name in ((p.width_m, "width"), (p.height_m, "height")):
            check(field, size, limits.get("pattern_size_m"), f"pattern {name}")
        extent = max(abs(p.center_m[0]) + p.width_m / 2, abs(p.center_m[1]) + p.height_m / 2)
        if reach and extent > reach:
            problems.append(PreflightProblem(field, extent, [0.0, reach], "pattern reaches beyond the widest ion field"))
    max_patterns = limits.get("max_patterns")
    if isinstance(max_patterns, int) and len(plan.fiducial()) > max_patterns:
        problems.append(PreflightProblem("fibsem", len(plan.fiducial()), max_patterns, "too many patterns in one mill"))

    stage = limits.get("stage") or {}
    check("target", target_xy_m[0], stage.get("x_m"), "target x (stage)")
    check("target", target_xy_m[1], stage.get("y_m"), "target y (stage)")
    return _unique(problems)


def _offered(current: float, offered: Sequence[float]) -> bool:
    return any(abs(current - float(c)) <= 1e-3 * max(abs(float(c)), 1e-15) for c in offered)


def fiducial_current(fibsem: FIBSEM, limits: dict[str, Any]) -> float:
    """The current to mill the fiducial with: 100 pA (sharp edges, seconds) when the column offers it, else the slices'."""
    ion = limits.get("ion") or {}
    offered = ion.get("currents_a") or []
    if FIDUCIAL_CURRENT_A <= fibsem.fib.current and _within(FIDUCIAL_CURRENT_A, ion.get("current_a")) and (
            not offered or _offered(FIDUCIAL_CURRENT_A, offered)):
        return FIDUCIAL_CURRENT_A
    return float(fibsem.fib.current)


def _unique(problems: list[PreflightProblem]) -> list[PreflightProblem]:
    seen, out = set(), []
    for p in problems:
        key = (p.field, p.message, repr(p.value))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
