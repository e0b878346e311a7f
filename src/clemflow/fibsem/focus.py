"""A focus measure for face images, and a watch that says when autofocus is due.

:func:`sharpness` is a normalised Tenengrad: the mean squared gradient of a
lightly smoothed, binned image divided by the variance of the same image
with its slow background removed. Both scale with contrast squared and
neither sees an offset, so the ratio ignores brightness/contrast changes; it
is the mean squared spatial frequency of the band, which a blur can only
lower, so it falls monotonically with defocus. Binning and the light
smoothing keep shot noise from dominating it.

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


def _binned(img: NDArray[np.float32], b: int) -> NDArray[np.float32]:
    if b <= 1:
        return img
    h, w = (img.shape[0] // b) * b, (img.shape[1] // b) * b
    return img[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3), dtype=np.float32)


def sharpness(
    image: ArrayLike,
    *,
    bin_px: int | None = None,
    smooth_px: float = 1.0,
    background_px: float = 16.0,
) -> float:
    """Focus measure of a face image (dimensionless, in 1/px² of the binned image); larger is sharper.

    `bin_px` defaults to 2 for frames wider than 1024 px, else 1. A flat
    image (no variance) scores 0. Compare values only between frames of the
    same pixel size and binning.
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    b = (2 if a.shape[1] > 1024 else 1) if bin_px is None else int(bin_px)
    img = _binned(a.astype(np.float32, copy=False), b)
    if min(img.shape) < 8:
        raise ValueError(f"image of {img.shape[1]} x {img.shape[0]} px (binned) is too small for a focus measure")
    fine = ndimage.gaussian_filter(img, smooth_px, mode="reflect") if smooth_px > 0 else img
    gy, gx = np.gradient(fine)
    energy = float(np.mean(gx.astype(np.float64) ** 2 + gy.astype(np.float64) ** 2))
    band = fine - ndimage.gaussian_filter(img, background_px, mode="reflect") if background_px > 0 else fine
    var = float(np.var(band, dtype=np.float64))
    if var <= 0 or not math.isfinite(var):
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
