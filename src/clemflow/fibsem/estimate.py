"""What a slice-and-view run will cost: slices, time and data, from the protocol alone.

Frame time is exact (pixels x dwell x line averaging). Milling time is an
estimate from the volume removed per slice and a sputter yield; the instrument's
own overheads (stage settling, autofunctions) are not included and are stated
as such where the estimate is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..protocol.fibsem import FIBSEM

__all__ = ["RESIN_SPUTTER_YIELD_UM3_PER_NC", "SliceAndViewEstimate", "estimate_slice_and_view"]

RESIN_SPUTTER_YIELD_UM3_PER_NC = 0.27
"""Volume removed per charge by 30 kV Ga+; silicon's value, a conservative stand-in for epoxy resin."""


@dataclass(frozen=True)
class SliceAndViewEstimate:
    slices: int
    depth_m: float
    frame_time_s: float
    mill_time_s: float
    slice_time_s: float
    duration_s: float
    bytes_per_slice: int
    total_bytes: int
    limited_by: str


def estimate_slice_and_view(fibsem: FIBSEM) -> SliceAndViewEstimate:
    """Slices until the first stop criterion, with the time and data they take."""
    sem = fibsem.sem
    width, height = sem.frame
    frame_time = sem.frame_time_s
    slice_volume_um3 = (fibsem.trench.width * 1e6) * (fibsem.slice_thickness * 1e6) * (fibsem.trench.depth * 1e6)
    mill_time = slice_volume_um3 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * fibsem.fib.current * 1e9)
    slice_time = frame_time + mill_time

    limits: dict[str, int] = {}
    stop = fibsem.stop
    if stop.depth is not None:
        limits["depth"] = math.ceil(stop.depth / fibsem.slice_thickness - 1e-9)
    if stop.slices is not None:
        limits["slices"] = stop.slices
    if stop.duration is not None:
        limits["duration"] = max(1, math.floor(stop.duration / slice_time))
    limited_by = min(limits, key=lambda k: limits[k])
    slices = limits[limited_by]
    bytes_per_slice = width * height * (sem.bit_depth // 8)
    return SliceAndViewEstimate(
        slices=slices,
        depth_m=slices * fibsem.slice_thickness,
        frame_time_s=frame_time,
        mill_time_s=mill_time,
        slice_time_s=slice_time,
        duration_s=slices * slice_time,
        bytes_per_slice=bytes_per_slice,
        total_bytes=slices * bytes_per_slice,
        limited_by=limited_by,
    )
