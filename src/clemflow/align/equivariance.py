"""Judge an aligner on real data whose own registration is imperfect: equivariance.

A published stack is already aligned, but not perfectly, so "recover the
injected shifts" would grade the aligner against the original's residuals. The
fair question is whether the aligner answers the same on the moved stack as on
the unmoved one: the transforms found on the moved stack plus the injected
shifts must equal those found on the unmoved stack, up to one global offset.
Slow drift (longer than ~8 slices) cannot be told from oblique structure in
real tissue by any image-based method, so it is reported apart from the fast
part the accuracy goal is about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = ["DriftStacks", "EquivarianceError", "equivariance_error", "inject_drift", "random_drift"]

TREND_SIGMA_SLICES = 8.0


@dataclass(frozen=True)
class DriftStacks:
    moved: NDArray[np.uint8]  # (n, W, W): window i shows the original's content displaced by shifts[i]
    unmoved: NDArray[np.uint8]  # (n, W, W): the same-size window, not displaced
    shifts: NDArray[np.float64]  # (n, 2) injected content displacement (x right, y down), px
    jumps: tuple[int, ...]  # slices where a jump happened


@dataclass(frozen=True)
class EquivarianceError:
    fast_rms: float
    fast_max: float
    slow_rms: float  # RMS of the trend that was removed
    slow_range: float  # its peak-to-peak, px
    error: NDArray[np.float64]  # (n, 2) full error after the global offset

    def __str__(self) -> str:
        return (f"fast RMS {self.fast_rms:.3f} px, max {self.fast_max:.3f} px; "
                f"slow RMS {self.slow_rms:.2f} px, range {self.slow_range:.2f} px")


def random_drift(n: int, seed: int, walk_sigma: float = 1.5, jitter_sigma: float = 1.0, jumps: int = 3,
                 jump_px: tuple[float, float] = (20.0, 40.0)) -> tuple[NDArray[np.float64], tuple[int, ...]]:
    """Content displacement per slice: random walk + jitter + jumps, centred so its extremes are balanced.

    Each jump goes in a random direction, flipped if needed so it heads back toward the start (as an
    operator re-centring the field would), which keeps the field of view usable.
    """
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0.0, walk_sigma, (n, 2)), axis=0)
    where = tuple(sorted(rng.choice(np.arange(n // 10, n - n // 10), size=jumps, replace=False).tolist()))
    for i in where:
        angle = rng.uniform(0, 2 * np.pi)
        jump = rng.uniform(*jump_px) * np.array([np.cos(angle), np.sin(angle)])
        if np.dot(jump, walk[i - 1]) > 0:
            jump = -jump
        walk[i:] += jump
    shifts = walk + rng.normal(0.0, jitter_sigma, (n, 2))
    shifts -= (shifts.max(axis=0) + shifts.min(axis=0)) / 2
    return shifts, where


def inject_drift(stack: NDArray[np.generic], shifts: NDArray[np.float64], margin: int = 6,
                 jumps: tuple[int, ...] = ()) -> DriftStacks:
    """Windows of ``stack`` whose content is displaced by ``shifts`` (exact Fourier shift), and the plain windows."""
    n, h, w = stack.shape
    reach = int(np.ceil(np.abs(shifts).max())) + margin
    size = min(h, w) - 2 * reach
    if size < 64:
        raise ValueError(f"shifts up to {reach} px leave a window of {size} px in {h}x{w} slices: use smaller shifts")
    y0, x0 = (h - size) // 2, (w - size) // 2
    moved = np.empty((n, size, size), np.uint8)
    for i in range(n):
        spec = ndimage.fourier_shift(np.fft.fft2(stack[i].astype(np.float64)), (shifts[i, 1], shifts[i, 0]))
        moved[i] = np.clip(np.rint(np.fft.ifft2(spec).real[y0:y0 + size, x0:x0 + size]), 0, 255)
    unmoved = np.ascontiguousarray(stack[:, y0:y0 + size, x0:x0 + size]).astype(np.uint8)
    return DriftStacks(moved, unmoved, np.asarray(shifts, float), tuple(jumps))


def equivariance_error(applied_moved: NDArray[np.floating], applied_unmoved: NDArray[np.floating],
                       shifts: NDArray[np.floating], trend_sigma: float = TREND_SIGMA_SLICES) -> EquivarianceError:
    """Error of (moved transforms + injected shifts) against the unmoved transforms, split into slow and fast parts.

    ``applied_*``: (n, 2) translations applied to each slice (dx, dy), as in transforms.csv.
    """
    e = np.asarray(applied_moved, float) + np.asarray(shifts, float) - np.asarray(applied_unmoved, float)
    e -= e.mean(axis=0)
    slow = ndimage.gaussian_filter1d(e, trend_sigma, axis=0, mode="nearest")
    fast = e - slow
    fast_norm = np.hypot(fast[:, 0], fast[:, 1])
    return EquivarianceError(
        fast_rms=float(np.sqrt(np.mean(fast_norm**2))),
        fast_max=float(fast_norm.max()),
        slow_rms=float(np.sqrt(np.mean(np.sum(slow**2, axis=1)))),
        slow_range=float(np.max(slow.max(axis=0) - slow.min(axis=0))),
        error=e,
    )
