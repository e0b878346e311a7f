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
each autofocus, then fixed until the next: a rolling reference would
follow a slow defocus and never fire) and flags a value below
``(1 - drop_fraction)`` of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = ["FocusWatch", "sharpness"]


def _line_pair(a: NDArray[np.generic], bx: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Even and odd scan lines, each binned by `bx` along the line (a sum: the scale does not matter)."""
    h, w = (a.shape[0] // 2) * 2, (a.shape[1] // bx) * bx
    b = a[:h, 0:w:bx].astype(np.float32)
    for k in range(1, bx):
        b += a[:h, k:w:bx]
    return np.ascontiguousarray(b[0::2]), np.ascontiguousarray(b[1::2])


def _smooth(x: NDArray[np.float32], passes: int) -> NDArray[np.float32]:
    """Binomial [1, 2, 1] / 4 passes along both axes (sigma² = passes / 2), edges held: cheap and exact."""
    for _ in range(passes):
        for axis in (0, 1):
            y = np.moveaxis(x, axis, 0)
            out = np.empty_like(y)
            out[1:-1] = 0.25 * (y[:-2] + y[2:]) + 0.5 * y[1:-1]
            out[0] = 0.75 * y[0] + 0.25 * y[1]
            out[-1] = 0.75 * y[-1] + 0.25 * y[-2]
            x = np.moveaxis(out, 0, axis)
    return np.ascontiguousarray(x)


def _background(x: NDArray[np.float32], sigma: float) -> NDArray[np.float32]:
    """Gaussian of `sigma`; a wide one on an f x f block-averaged copy (f = sigma / 4), each block repeated
    back: the background hardly changes within a block, and this costs little at any sigma."""
    f = int(sigma // 4)
    if f <= 1 or x.shape[0] < 8 * f or x.shape[1] < 8 * f:
        return ndimage.gaussian_filter(x, sigma, mode="reflect")
    h, w = -(-x.shape[0] // f) * f, -(-x.shape[1] // f) * f
    padded = np.pad(x, ((0, h - x.shape[0]), (0, w - x.shape[1])), mode="reflect")
    small = ndimage.gaussian_filter(padded.reshape(h // f, f, w // f, f).mean(axis=(1, 3)), sigma / f, mode="reflect")
    return np.repeat(np.repeat(small, f, axis=0), f, axis=1)[: x.shape[0], : x.shape[1]]


def sharpness(
    image: ArrayLike,
    *,
    bin_px: int | None = None,
    smooth_px: float = 1.0,
    background_px: float = 32.0,
) -> float:
    """Focus measure of a face image (dimensionless: 1/px² of the line-pair grid); larger is sharper.

    `bin_px`: binning along the scan line, default ``max(1, width // 1024)``
    (lines are 2 apart in the grid anyway). `smooth_px`: sigma of the light
    smoothing in grid pixels, done as binomial passes (rounded to sigma² =
    passes / 2); `background_px`: sigma of the removed background. Returns 0
    when no signal is left above the noise (a blank or hopelessly blurred
    frame). Compare values only between frames of the same size, pixel size
    and binning. Assumes independent noise from line to line (true of a
    scanned frame; not of an image blurred afterwards).
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    bx = max(1, a.shape[1] // 1024) if bin_px is None else max(1, int(bin_px))
    even, odd = _line_pair(a, bx)
    if min(even.shape) < 8:
        raise ValueError(f"image of {a.shape[1]} x {a.shape[0]} px is too small for a focus measure")
    passes = max(0, round(2 * smooth_px * smooth_px))
    se, so = _smooth(even, passes), _smooth(odd, passes)

    def cross(p: NDArray[np.float32], q: NDArray[np.float32]) -> float:
        # line 2k with 2k+1, and 2k+1 with 2k+2: twice the pairs, each of independent noise
        return 0.5 * (float(np.mean(p * q, dtype=np.float64)) + float(np.mean(q[:-1] * p[1:], dtype=np.float64)))

    def gx(x: NDArray[np.float32]) -> NDArray[np.float32]:
        return 0.5 * (x[1:-1, 2:] - x[1:-1, :-2])

    def gy(x: NDArray[np.float32]) -> NDArray[np.float32]:
        return 0.5 * (x[2:, 1:-1] - x[:-2, 1:-1])

    energy = cross(gx(se), gx(so)) + cross(gy(se), gy(so))
    be, bo = se - _background(se, background_px), so - _background(so, background_px)
    var = cross(be, bo)
    noisy = math.sqrt(float(np.mean(be * be, dtype=np.float64)) * float(np.mean(bo * bo, dtype=np.float64)))
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
