"""Fine alignment in the spirit of AMST: each slice against the z-median of its neighbourhood.

The median of the coarse-aligned slices within ``fine_radius`` either side is
a template that keeps the structures every slice shares and drops what is
particular to one slice (noise, a charging streak, the error of one coarse
step). Registering the slice to it removes the jitter the coarse chain leaves.

The transform is found from displacements of overlapping patches (phase
correlation, as the coarse stage) fitted by robust least squares: a
translation, or an affine map. An affine fitted to a handful of patch
displacements cannot over-fit the way a free B-spline does (a B-spline raises
neighbour correlation while moving structures by pixels), so no B-spline is
offered. ``align_fine`` is a pure function of the raw slices in the window and
their coarse shifts, so the same code runs in the live pipeline and on dask
workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..protocol.analysis import Alignment
from .phase import bin_image, box_window, correlate, spectrum
from .transforms import CoarseShift, SliceTransform
from .warp import shift_image, warp_slice

__all__ = ["AlignedSlice", "FineFit", "align_fine", "fine_binning", "register_to_template", "template"]

TARGET_SIZE = 512  # the fine stage works on slices binned to about this size
PATCH_GRID = 4  # patches per side (overlapping by half)
MIN_PATCH_PX = 32
MIN_PATCH_PSR = 8.0
AFFINE_PRIOR_PX = 0.3  # expected scale/shear displacement at the patch radius, px (drift is mostly translation)
AFFINE_PRIOR_NOISE_PX = 0.3  # expected error of one patch shift, px
MAX_LINEAR_DEVIATION = 0.02
FINE_MAX_CORRECTION_PX = 1.0  # full-resolution px, translation plus the linear part's reach at the frame edge  # |A - I| beyond this (2 % scale or shear) is not drift: fall back to a translation


@dataclass(frozen=True)
class AlignedSlice:
    transform: SliceTransform
    image: NDArray[np.generic]  # the aligned slice: same shape and dtype as the input, 0 where it has no data
    coarse: CoarseShift


@dataclass(frozen=True)
class FineFit:
    """The fine correction of a coarse-aligned slice: p -> A (p - c) + c + t (binned px, about the centre)."""

    linear: tuple[float, float, float, float]
    tx: float
    ty: float
    patches: int  # patches that entered the fit
    residual_px: float  # RMS patch residual after the fit (binned px)


def fine_binning(shape: tuple[int, ...], target: int = TARGET_SIZE) -> int:
    return max(1, int(round(max(shape[:2]) / target)))


def template(slices: list[NDArray[np.float32]]) -> NDArray[np.float32]:
    """The z-median of coarse-aligned (binned) slices."""
    return np.median(np.stack(slices), axis=0).astype(np.float32)


def register_to_template(moving: NDArray[np.float32], fixed: NDArray[np.float32], model: str = "affine",
                         sigma: float = 1.0, box: tuple[int, int, int, int] | None = None) -> FineFit:
    """Where ``moving`` must go to match ``fixed`` (both binned, same shape).

    ``box`` (y0, y1, x0, x1): where both hold real data (elsewhere the coarse shift left repeated edges).
    """
    h, w = moving.shape
    box = box or (0, h, 0, w)
    window = box_window((h, w), box)
    whole = correlate(spectrum(fixed, window), spectrum(moving, window), sigma, max_shift=min(h, w) / 8)
    if model == "translation":
        return FineFit((1.0, 0.0, 0.0, 1.0), -whole.dx, -whole.dy, 1, 0.0)
    bh, bw = box[1] - box[0], box[3] - box[2]
    size = (2 * min(bh, bw)) // (PATCH_GRID + 1)  # patches overlap by half and tile the common box
    stride_y, stride_x = (bh - size) // (PATCH_GRID - 1), (bw - size) // (PATCH_GRID - 1)
    centres, moved = [], []
    for gy in range(PATCH_GRID if size >= MIN_PATCH_PX else 0):
        for gx in range(PATCH_GRID):
            y0, x0 = box[0] + gy * stride_y, box[2] + gx * stride_x
            a, b = fixed[y0:y0 + size, x0:x0 + size], moving[y0:y0 + size, x0:x0 + size]
            if a.std() < 1e-3 or b.std() < 1e-3:
                continue  # blank patch (outside the data after a large shift)
            r = correlate(spectrum(a), spectrum(b), sigma, max_shift=size / 8)
            if r.psr >= MIN_PATCH_PSR:
                centres.append((x0 + (size - 1) / 2, y0 + (size - 1) / 2))
                moved.append((r.dx, r.dy))
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    if len(centres) < 6:
        return FineFit((1.0, 0.0, 0.0, 1.0), -whole.dx, -whole.dy, len(centres), float("nan"))
    fixed_pts = np.array(centres)
    moving_pts = fixed_pts + np.array(moved)
    a, t, residual, used = _robust_affine(moving_pts - c, fixed_pts - c)
    if np.abs(a - np.eye(2)).max() > MAX_LINEAR_DEVIATION:
        shift = np.median(fixed_pts - moving_pts, axis=0)
        return FineFit((1.0, 0.0, 0.0, 1.0), float(shift[0]), float(shift[1]), used, residual)
    return FineFit((float(a[0, 0]), float(a[0, 1]), float(a[1, 0]), float(a[1, 1])), float(t[0]), float(t[1]), used,
                   residual)


def _robust_affine(src: NDArray[np.float64], dst: NDArray[np.float64]) -> tuple[NDArray, NDArray, float, int]:
    """dst ~ A src + t by ridge least squares: A - I costs as much as its displacement at the patch radius.

    Patch shifts carry local content motion (oblique membranes) of a few tenths of a pixel, which a free
    affine turns into scale and shear; the ridge keeps A at identity unless the patches agree on more.
    Outlier patches (residual > 3 x median) are dropped once.
    """
    radius = max(float(np.abs(src).max()), 1.0)
    keep = np.ones(len(src), bool)
    for _ in range(2):
        n = int(keep.sum())
        u = src[keep] / radius
        design = np.hstack([u, np.ones((n, 1))])
        target = dst[keep] - src[keep]
        ridge = np.diag([n * (AFFINE_PRIOR_NOISE_PX / AFFINE_PRIOR_PX) ** 2] * 2 + [0.0])
        sol = np.linalg.solve(design.T @ design + ridge, design.T @ target)
        pred = src + np.hstack([src / radius, np.ones((len(src), 1))]) @ sol
        res = np.linalg.norm(pred - dst, axis=1)
        cut = max(3.0 * float(np.median(res[keep])), 0.3)
        new = res <= cut
        if new.sum() < 6 or np.array_equal(new, keep):
            break
        keep = new
    a = np.eye(2) + sol[:2].T / radius
    return a, sol[2], float(np.sqrt(np.mean(res[keep] ** 2))), int(keep.sum())


def _common_box(shape: tuple[int, int], shifts: list[CoarseShift], binning: int) -> tuple[int, int, int, int] | None:
    """The part of the frame where every slice of the window holds real data after its coarse shift (binned px)."""
    h, w = shape
    dx = [s.dx / binning for s in shifts]
    dy = [s.dy / binning for s in shifts]
    box = (int(np.ceil(max(0.0, max(dy)))) + 1, int(np.floor(min(h, h + min(dy)))) - 1,
           int(np.ceil(max(0.0, max(dx)))) + 1, int(np.floor(min(w, w + min(dx)))) - 1)
    if box[1] - box[0] < MIN_PATCH_PX or box[3] - box[2] < MIN_PATCH_PX:
        return None  # across a very large jump: the whole frame rather than a sliver
    return box


def _coarse_aligned(image: NDArray[np.generic], shift: CoarseShift, binning: int) -> NDArray[np.float32]:
    return shift_image(bin_image(image, binning), shift.dx / binning, shift.dy / binning)


def align_fine(index: int, window: Mapping[int, NDArray[np.generic]], coarse: Mapping[int, CoarseShift],
               settings: Alignment | None = None, *, cache: dict[int, NDArray[np.float32]] | None = None,
               warp: bool = True) -> AlignedSlice:
    """Fine-align slice ``index`` against the z-median of the other slices in ``window`` (raw input slices).

    ``cache`` keeps coarse-aligned binned slices between calls (the live pipeline passes one).
    """
    settings = settings or Alignment()
    image, shift = window[index], coarse[index]
    if settings.fine_model == "none" or len(window) < 3:
        transform = SliceTransform(index, shift.dx, shift.dy, confidence=shift.confidence, coarse_dx=shift.dx,
                                   coarse_dy=shift.dy, fine_model="none")
        return AlignedSlice(transform, warp_slice(image, transform) if warp else image, shift)
    b = fine_binning(image.shape)
    cache = {} if cache is None else cache
    binned: dict[int, NDArray[np.float32]] = {}
    for k in window:
        if k not in cache:
            cache[k] = _coarse_aligned(window[k], coarse[k], b)
        binned[k] = cache[k]
    others = [binned[k] for k in sorted(binned) if k != index]
    box = _common_box(binned[index].shape, [coarse[k] for k in window], b)
    fit = register_to_template(binned[index], template(others), settings.fine_model, float(settings.coarse_sigma_px), box)
    a = np.array(fit.linear).reshape(2, 2)
    edge = float(np.abs(a - np.eye(2)).max()) * max(image.shape[:2]) / 2
    if not np.isfinite(fit.tx + fit.ty) or b * np.hypot(fit.tx, fit.ty) + edge > FINE_MAX_CORRECTION_PX:
        # the coarse chain is good to a few hundredths of a pixel per slice: a large fine correction means the
        # template moved (content cut obliquely, a bad neighbour), not this slice; keep the coarse answer
        transform = SliceTransform(index, shift.dx, shift.dy, confidence=shift.confidence, coarse_dx=shift.dx,
                                   coarse_dy=shift.dy, fine_model=settings.fine_model,
                                   extra={"fine_patches": float(fit.patches), "fine_rejected": 1.0})
        return AlignedSlice(transform, warp_slice(image, transform) if warp else image, shift)
    # total: p -> A (p + d_coarse - c) + c + t  ==  A (p - c) + c + (A d_coarse + t)
    d = a @ np.array([shift.dx, shift.dy]) + b * np.array([fit.tx, fit.ty])
    transform = SliceTransform(
        index, float(d[0]), float(d[1]), fit.linear, shift.confidence, shift.dx, shift.dy, settings.fine_model,
        {"fine_patches": float(fit.patches), "fine_residual_px": fit.residual_px * b, "fine_rejected": 0.0},
    )
    return AlignedSlice(transform, warp_slice(image, transform) if warp else image, shift)
