"""Where every pattern of a slice-and-view run goes, and how far each slice moves the face.

All positions are in the bridge's ion image frame (docs/bridge-protocol.md,
``mill``): metres, centred on the stage position (the target) with the ion
beam shift at zero, **+y along the milling axis** (away from the trench, into
the block). The target sits at (0, 0); the first face is
``FIRST_FACE_AHEAD_M`` in front of it, so the run starts before the cell and
slices through it.

Slice ``i`` (1-based) is one rectangle whose far edge is at
``first_face + i * t``: an absolute position, so sending the same slice again
(a re-send, a retry after a partial mill) can only finish slice ``i``, never
take slice ``i + 1`` with it.

At the stage tilt ``a`` (54 degrees on a Crossbeam), milling ``t`` moves the
face ``sin(a) t`` (0.81 t) further along the SEM axis (the working distance
grows) and ``cos(a) t`` (0.59 t) up the SEM image; ``SlicePlan.rise_per_slice_m``
and ``wd_per_slice_m`` are these two numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..bridge.backend import MillPattern
from ..protocol.fibsem import FIBSEM

__all__ = [
    "FIDUCIAL_AHEAD_M",
    "FIDUCIAL_ARM_M",
    "FIDUCIAL_DEPTH_M",
    "FIDUCIAL_WIDTH_M",
    "FIRST_FACE_AHEAD_M",
    "SlicePlan",
    "planned_slices",
]

FIRST_FACE_AHEAD_M = 6e-6
"""The first face lies this far in front of the target centre: half a large cell, so the run starts before it."""

FIDUCIAL_ARM_M = 1.5e-6
FIDUCIAL_WIDTH_M = 0.3e-6
FIDUCIAL_DEPTH_M = 0.7e-6
FIDUCIAL_AHEAD_M = 3e-6
"""The fiducial's centre lies this far ahead of the first face on the block surface (in view above the face edge)."""


def planned_slices(fibsem: FIBSEM, override: int | None = None) -> tuple[int, str]:
    """Slices to mill and the criterion that set the number (``--slices`` wins; duration is checked while running)."""
    if override is not None:
        return int(override), "--slices"
    counts: dict[str, int] = {}
    if fibsem.stop.depth is not None:
        counts["depth"] = max(1, math.ceil(fibsem.stop.depth / fibsem.slice_thickness - 1e-9))
    if fibsem.stop.slices is not None:
        counts["slices"] = fibsem.stop.slices
    if not counts:  # duration only: the clock stops the run
        return 10**9, "duration"
    which = min(counts, key=lambda k: counts[k])
    return counts[which], which


@dataclass(frozen=True)
class SlicePlan:
    """The geometry of one run: trench, fiducial, slices; nothing here talks to an instrument."""

    thickness_m: float
    slices: int
    limited_by: str
    tilt_deg: float
    width_m: float  # slice (and trench) width across the face
    depth_m: float  # how deep the face reaches into the block: the trench depth
    first_face_y_m: float = -FIRST_FACE_AHEAD_M
    trench_height_m: float = 25e-6
    fiducial_xy_m: tuple[float, float] = (0.0, -FIRST_FACE_AHEAD_M + FIDUCIAL_AHEAD_M)
    max_duration_s: float | None = None

    @classmethod
    def from_protocol(cls, fibsem: FIBSEM, slices: int | None = None) -> SlicePlan:
        count, limited_by = planned_slices(fibsem, slices)
        first = -FIRST_FACE_AHEAD_M
        return cls(thickness_m=float(fibsem.slice_thickness), slices=count, limited_by=limited_by,
                   tilt_deg=float(fibsem.stage_tilt_deg), width_m=float(fibsem.trench.width), depth_m=float(fibsem.trench.depth),
                   first_face_y_m=first, trench_height_m=float(fibsem.trench.height),
                   fiducial_xy_m=(0.0, first + FIDUCIAL_AHEAD_M),
                   max_duration_s=float(fibsem.stop.duration) if fibsem.stop.duration is not None else None)

    # ------------------------------------------------------------------ face motion

    @property
    def rise_per_slice_m(self) -> float:
        """How far the face content moves up the SEM image per slice (cos(tilt) x t)."""
        return math.cos(math.radians(self.tilt_deg)) * self.thickness_m

    @property
    def wd_per_slice_m(self) -> float:
        """How far the face recedes along the SEM axis per slice (sin(tilt) x t): the working distance grows by this."""
        return math.sin(math.radians(self.tilt_deg)) * self.thickness_m

    def face_y_m(self, milled: int) -> float:
        """The face's position after ``milled`` slices."""
        return self.first_face_y_m + milled * self.thickness_m

    def depth_after(self, milled: int) -> float:
        """Nominal depth milled after ``milled`` slices (m)."""
        return milled * self.thickness_m

    # ------------------------------------------------------------------ patterns

    def trench(self) -> list[MillPattern]:
        """The trench in front of the target: its far edge is the first face, so it removes nothing beyond it."""
        h = self.trench_height_m
        return [MillPattern("rectangle", (0.0, self.first_face_y_m - h / 2), self.width_m, h, self.depth_m,
                            scan_direction="bottom_to_top")]

    def fiducial(self) -> list[MillPattern]:
        """A '+' of two shallow rectangles on the surface ahead of the first face."""
        x, y = self.fiducial_xy_m
        return [
            MillPattern("rectangle", (x, y), FIDUCIAL_ARM_M, FIDUCIAL_WIDTH_M, FIDUCIAL_DEPTH_M),
            MillPattern("rectangle", (x, y), FIDUCIAL_WIDTH_M, FIDUCIAL_ARM_M, FIDUCIAL_DEPTH_M),
        ]

    def slice_patterns(self, index: int) -> list[MillPattern]:
        """Slice ``index`` (1-based): far edge at first face + index x t, whatever was milled before."""
        if index < 1:
            raise ValueError(f"slices are numbered from 1, not {index}")
        t = self.thickness_m
        far = self.first_face_y_m + index * t
        return [MillPattern("rectangle", (0.0, far - t / 2), self.width_m, t, self.depth_m, scan_direction="bottom_to_top")]

    def fiducial_reached_after(self) -> int:
        """Slices after which the face reaches the fiducial's near edge (it is milled away then)."""
        near = self.fiducial_xy_m[1] - FIDUCIAL_ARM_M / 2
        return max(0, int((near - self.first_face_y_m) / self.thickness_m))

    def as_json(self) -> dict[str, Any]:
        return {"thickness_m": self.thickness_m, "slices": self.slices, "limited_by": self.limited_by,
                "tilt_deg": self.tilt_deg, "width_m": self.width_m, "depth_m": self.depth_m,
                "first_face_y_m": self.first_face_y_m, "fiducial_xy_m": list(self.fiducial_xy_m),
                "rise_per_slice_m": self.rise_per_slice_m, "wd_per_slice_m": self.wd_per_slice_m}
