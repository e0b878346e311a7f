"""What alignment finds for one slice, in the one convention every output uses.

A slice's transform maps a point ``p = (x, y)`` of the input slice (pixels, x
right, y down) to ``A (p - c) + c + d`` in the aligned volume, where ``c`` is
the image centre, ``d = (dx, dy)`` the translation and ``A`` the fine stage's
linear part (identity unless the fine model is affine). So ``dx, dy`` are the
shift *applied* to the slice: positive dx moves its content right, positive dy
down. That is what ``transforms.csv`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["CoarseShift", "SliceTransform"]


@dataclass(frozen=True)
class CoarseShift:
    """The streaming coarse stage's answer for one slice, known as soon as the slice arrives."""

    index: int
    dx: float  # translation applied to the input slice, px (cumulative, blended with the long-range estimate)
    dy: float
    step_dx: float  # content displacement measured against the previous slice, px (what the slice moved by)
    step_dy: float
    confidence: float  # peak-to-sidelobe ratio of the neighbour registration
    fallback: str = ""  # "" or what was done because confidence was low ("full-resolution", "masked", "kept")
    long_range: bool = False  # whether a long-range reference entered this estimate

    @property
    def step(self) -> float:
        return float(np.hypot(self.step_dx, self.step_dy))


@dataclass(frozen=True)
class SliceTransform:
    """The final transform of one input slice (coarse translation plus the fine stage)."""

    index: int
    dx: float
    dy: float
    linear: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 1.0)  # a11 a12 a21 a22 about the image centre
    confidence: float = float("nan")
    coarse_dx: float = 0.0
    coarse_dy: float = 0.0
    fine_model: str = "none"
    extra: dict[str, float] = field(default_factory=dict)  # further fine parameters (e.g. B-spline RMS displacement)

    def matrix(self, shape: tuple[int, int]) -> NDArray[np.float64]:
        """3x3 homogeneous matrix input (x, y, 1) -> aligned (x, y, 1) for an image of ``shape`` (rows, cols)."""
        a11, a12, a21, a22 = self.linear
        cx, cy = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
        a = np.array([[a11, a12], [a21, a22]])
        c = np.array([cx, cy])
        t = c + np.array([self.dx, self.dy]) - a @ c
        m = np.eye(3)
        m[:2, :2], m[:2, 2] = a, t
        return m
