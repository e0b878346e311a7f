"""A focus measure for face images, and a watch that says when autofocus is due.

:func:`sharpness` is a normalised gradient energy that shot noise cannot
fake. Scan lines carry independent noise, so the frame is split into its
even and odd lines (two images of nearly the same signal, independent
noise) and every energy is taken as the cross product of the two: the
noise averages out of it instead of adding to it. The measure is the
cross gradient energy (light smoothing) over the cross variance of a
band-pass (slow background removed): both scale with contrast squared and
neither sees an offset, so brightness/contrast changes do not move it; it
is the mean squared spatial frequency of the signal, which defocus (a blur
of the signal, before the noise) can only lower. A plain Tenengrad instead
rises again at large defocus, when noise is all that is left.

:class:`FocusWatch` keeps a reference (median of the first values after
each autofocus) and flags a value below ``(1 - drop_fraction)`` of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = ["FocusWatch", "sharpness"]


def _line_pair(a: NDArray[np.float64], bx: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Even and odd scan lines, each binned by `bx` along the line."""
    h, w = (a.shape[0] // 2) * 2, (a.shape[1] // bx) * bx
    if bx > 1:
        a = a[:h, :w].reshape(h, w // bx, bx).mean(axis=2)
    else:
        a = a[:h]
    return a[0::2], a[1::2]


def sharpness(
    image: ArrayLike,
    *,
    bin_px: int | None = None,
    smooth_px: float = 1.0,
    background_px: float = 32.0,
) -> float:
    """Focus measure of a face image (dimensionless: 1/px² of the line-pair grid); larger is sharper.

    `bin_px`: binning along the scan line, default ``max(1, width // 1024)``
    (lines are 2 apart in the grid anyway). `smooth_px` / `background_px`:
    sigma of the light smoothing and of the removed background, in grid
    pixels. Returns 0 when no signal is left above the noise (a blank or
    hopelessly blurred frame). Compare values only between frames of the
    same size, pixel size and binning. Assumes independent noise from line
    to line (true of a scanned frame; not of an image blurred afterwards).
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    bx = max(1, a.shape[1] // 1024) if bin_px is None else max(1, int(bin_px))
    even, odd = _line_pair(a.astype(np.float64), bx)
    if min(even.shape) < 8:
        raise ValueError(f"image of {a.shape[1]} x {a.shape[0]} px is too small for a focus measure")

    def grad(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        return (ndimage.gaussian_filter(x, smooth_px, order=(0, 1), mode="reflect"),
                ndimage.gaussian_filter(x, smooth_px, order=(1, 0), mode="reflect"))

    def band(x: NDArray[np.float64]) -> NDArray[np.float64]:
        return ndimage.gaussian_filter(x, smooth_px, mode="reflect") - ndimage.gaussian_filter(
            x, background_px, mode="reflect")

    def cross(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
        # line 2k with 2k+1, and 2k+1 with 2k+2: twice the pairs, each of independent noise
        return 0.5 * (float(np.mean(a * b)) + float(np.mean(b[:-1] * a[1:])))

    (ex, ey), (ox, oy) = grad(even), grad(odd)
    energy = cross(ex, ox) + cross(ey, oy)
    be, bo = band(even), band(odd)
    var = cross(be, bo)
    noisy = math.sqrt(float(np.mean(be * be)) * float(np.mean(bo * bo)))
    # signal variance indistinguishable from zero: nothing to measure
    if not (var > 0.02 * noisy and energy > 0 and math.isfinite(energy)):
        return 0.0
    return energy / var


@dataclass
class FocusWatch:
    """Says when the focus measure dropped enough since the last autofocus to do it again.

    After :meth:`autofocused` (and at the start) the first `window` values
    that are not themselves drops form the reference, their median; values
    below ``(1 - drop_fraction) x reference`` are drops. ``consecutive``
    drops in a row are needed to ask for autofocus (1: at once), so one
    noisy frame can be told apart from a trend when wanted.
    """

    drop_fraction: float = 0.15
    window: int = 5
    consecutive: int = 1
    values: list[float] = field(default_factory=list)
    low_run: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.drop_fraction < 1:
            raise ValueError("drop_fraction must be between 0 and 1")
        if self.window < 1 or self.consecutive < 1:
            raise ValueError("window and consecutive must be at least 1")

    @property
    def reference(self) -> float | None:
        """Median of the reference values so far (None before the first value)."""
        return float(np.median(self.values)) if self.values else None

    @property
    def threshold(self) -> float | None:
        """Below this a value is a drop."""
        ref = self.reference
        return None if ref is None else (1 - self.drop_fraction) * ref

    def autofocused(self) -> None:
        """Autofocus just ran: start a new reference from the next values."""
        self.values = []
        self.low_run = 0

    def needs_autofocus(self, value: float) -> bool:
        """Record `value` (a :func:`sharpness`); True when it is the `consecutive`-th drop in a row."""
        threshold = self.threshold
        if threshold is not None and value < threshold:
            self.low_run += 1
            return self.low_run >= self.consecutive
        self.low_run = 0
        if len(self.values) < self.window and math.isfinite(value):
            self.values.append(float(value))
        return False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, for the journal (a resumed run keeps its reference)."""
        return {"drop_fraction": self.drop_fraction, "window": self.window, "consecutive": self.consecutive,
                "values": list(self.values), "low_run": self.low_run}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FocusWatch":
        return cls(float(d["drop_fraction"]), int(d["window"]), int(d.get("consecutive", 1)),
                   [float(v) for v in d.get("values", [])], int(d.get("low_run", 0)))
