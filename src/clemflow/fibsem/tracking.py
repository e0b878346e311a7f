"""Keeping the face in view: electron beam shift and working distance per slice.

Conventions (the bridge's, and the simulator's): the electron image has rows
going down and columns going right; electron beam shift **+x moves the field
of view right** and **+y moves it up the sample** (towards the block surface),
so image content moves the opposite way: a shift (dx, dy) moves content by
(-dx, +dy) / pixel size in (column, row).

Milling slice ``i`` moves the face content up the image by ``rise`` (cos(tilt)
x t) and away along the SEM axis by ``wd_step`` (sin(tilt) x t). The frame of
slice ``i`` is therefore taken with

    beam shift = base_shift + (0, i x rise) + drift + velocity x (i - corrected_at)
    working distance = base_wd + i x wd_step + focus

where ``drift`` is what fiducial tracking had corrected by slice
``corrected_at``, ``velocity`` its estimate of the drift per slice (an
alpha-beta filter: a steady drift is followed without lagging a slice behind)
and ``focus`` what autofocus has added to the prediction. With Y tracking the face stays
put in the image while sample-fixed marks on the surface (the fiducial) move
*down* by ``rise`` per slice: the fiducial is expected at
``template centre + (0, (i - template slice) x rise / pixel)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["VELOCITY_GAIN", "Tracking", "shift_for_offset"]

VELOCITY_GAIN = 0.4
"""Share of each correction (per slice) added to the drift-rate estimate."""
JUMP_PX = 5.0
"""An offset this large and this unlike the previous one is a jump (stage, charging): corrected, not learnt as a rate."""


def shift_for_offset(offset_px: tuple[float, float], pixel_size_m: float) -> tuple[float, float]:
    """The beam-shift change that moves content seen ``offset_px`` (column, row) away from where it belongs back to it."""
    ox, oy = offset_px
    return (ox * pixel_size_m, -oy * pixel_size_m)


@dataclass(frozen=True)
class Tracking:
    """The engine's tracking state; journalled whole, so a resume needs no re-measurement."""

    rise_m: float  # face rise per slice (up the image)
    wd_step_m: float  # working distance added per slice
    pixel_size_m: float
    base_shift_m: tuple[float, float] = (0.0, 0.0)
    base_wd_m: float = 5e-3
    drift_m: tuple[float, float] = (0.0, 0.0)
    velocity_m: tuple[float, float] = (0.0, 0.0)  # drift per slice, estimated
    corrected_at: int = 0
    focus_m: float = 0.0
    stigmation: tuple[float, float] | None = None
    last_offset_px: tuple[float, float] | None = None
    last_similarity: float | None = None
    last_autofocus: int | None = None
    last_autostigmation: int | None = None
    corrections: int = 0

    def beam_shift(self, index: int) -> tuple[float, float]:
        """Electron beam shift for the frame of slice ``index`` (0 = before any slice)."""
        ahead = max(0, index - self.corrected_at)
        return (self.base_shift_m[0] + self.drift_m[0] + self.velocity_m[0] * ahead,
                self.base_shift_m[1] + index * self.rise_m + self.drift_m[1] + self.velocity_m[1] * ahead)

    def working_distance(self, index: int) -> float:
        return self.base_wd_m + index * self.wd_step_m + self.focus_m

    def fiducial_expected_px(self, template_center_px: tuple[float, float], template_index: int, index: int) -> tuple[float, float]:
        """Where the fiducial should appear in the frame of slice ``index`` once drift is corrected."""
        return (template_center_px[0], template_center_px[1] + (index - template_index) * self.rise_m / self.pixel_size_m)

    def corrected(self, offset_px: tuple[float, float], similarity: float, index: int) -> Tracking:
        """The fiducial in the frame of slice ``index`` was ``offset_px`` from where it belongs: shift it back,
        and learn the drift per slice (so a steady drift is met, not followed a slice late)."""
        dx, dy = shift_for_offset(offset_px, self.pixel_size_m)
        steps = max(1, index - self.corrected_at)
        ahead = max(0, index - self.corrected_at)
        drift = (self.drift_m[0] + self.velocity_m[0] * ahead + dx, self.drift_m[1] + self.velocity_m[1] * ahead + dy)
        last = self.last_offset_px or (0.0, 0.0)
        jump = math.hypot(*offset_px) > JUMP_PX and math.hypot(offset_px[0] - last[0], offset_px[1] - last[1]) > JUMP_PX
        gain = 0.0 if jump else VELOCITY_GAIN  # a sudden jump is corrected, but is no drift rate
        velocity = (self.velocity_m[0] + gain * dx / steps, self.velocity_m[1] + gain * dy / steps)
        return replace(self, drift_m=drift, velocity_m=velocity, corrected_at=index, last_offset_px=tuple(offset_px),
                       last_similarity=float(similarity), corrections=self.corrections + 1)

    def observed(self, offset_px: tuple[float, float], similarity: float) -> Tracking:
        return replace(self, last_offset_px=tuple(offset_px), last_similarity=float(similarity))

    def focused(self, index: int, working_distance_m: float) -> Tracking:
        """Autofocus at slice ``index`` found ``working_distance_m``: keep the difference to the prediction."""
        predicted = self.base_wd_m + index * self.wd_step_m
        return replace(self, focus_m=working_distance_m - predicted, last_autofocus=index)

    def stigmated(self, index: int, stigmation: tuple[float, float]) -> Tracking:
        return replace(self, stigmation=(float(stigmation[0]), float(stigmation[1])), last_autostigmation=index)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tracking:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for k in ("base_shift_m", "drift_m", "velocity_m", "stigmation", "last_offset_px"):
            if isinstance(known.get(k), list):
                known[k] = tuple(known[k])
        return cls(**known)
