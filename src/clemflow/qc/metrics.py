"""Per-slice quality measures of a FIB-SEM face image, each aimed at one fault an operator can still fix.

Most measures work on a binned copy (about 512 px on a side, :func:`prepare`):
brightness, contrast, stripes and slice-to-slice similarity live at scales
binning keeps, and a binned row is still the mean of whole scan lines, so its
noise is independent of the next row's. That independence is what makes the
measures noise-proof: the covariance of *adjacent* rows carries the signal
and not the shot noise (the trick of :func:`clemflow.fibsem.focus.sharpness`),
so a change of dose or detector gain does not read as a change of content.
Focus is the exception: defocus shows at the finest scale, so sharpness is
taken at full resolution on a central crop.

Conventions: ``step_dx, step_dy`` are what the slice's content moved by
against the previous slice (``CoarseShift.step_dx/step_dy``, pixels of the
full-resolution slice, +x right, +y down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, NDArray

from ..align.phase import bin_image
from ..fibsem.focus import sharpness as _focus_sharpness

__all__ = [
    "Comparison",
    "Prepared",
    "auto_factor",
    "brightness",
    "compare",
    "contrast",
    "neighbour_ncc",
    "prepare",
    "sharpness",
    "similarity",
    "snr",
    "stripe_energy",
]

WORK_SIZE = 512  # binned side length the measures work at
SHARPNESS_CROP = 768  # full-resolution central crop for the focus measure (its cost grows with area)
STRIPE_BANDS = 8  # horizontal bands whose column profiles must agree for a stripe to count
CONTRAST_SIZE = 32  # contrast is taken on a copy binned to about this size: blur and curtains barely touch it
MIN_OVERLAP = 16  # binned px: less overlap than this after a shift leaves nothing to compare

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Prepared:
    """One slice made ready for the measures: binned once, reused by every comparison with its neighbours."""

    binned: F32  # factor x factor block mean, mean removed
    smooth: F32  # the same, lightly smoothed (for the NCC)
    spectrum: NDArray[np.complex64]  # rfft2 of ``binned`` (sub-pixel shifts without recomputing it)
    factor: int
    mean: float  # mean grey of the slice
    signal_var: float  # variance of the binned image that is signal (adjacent-row covariance)
    noise_var: float  # the rest: shot noise of the binned image
    sharpness: float  # focus measure at full resolution
    coarse_var: float  # signal variance at the coarse scale, row and column profiles removed (for contrast)
    stripes: float  # share of the signal in vertical stripes


def auto_factor(shape: tuple[int, ...], target: int = WORK_SIZE) -> int:
    """Binning that brings the shorter side near ``target`` (never below 1)."""
    return max(1, int(min(shape[:2]) // target))


def _dot(a: F32, b: F32) -> float:
    """Sum of a * b, strided views as they are. Not BLAS: a threaded BLAS dot can stall for milliseconds
    when the acquisition keeps the other cores busy."""
    return float(np.einsum("ij,ij->", a, b))


def _row_cross(a: F32, b: F32 | None = None) -> float:
    """Mean product of each row of ``a`` with the next row of ``b`` (and vice versa): noise-free when
    the noise is independent from row to row and between the two images."""
    n = (a.shape[0] - 1) * a.shape[1]
    if b is None:
        return _dot(a[:-1], a[1:]) / n
    return 0.5 * (_dot(a[:-1], b[1:]) + _dot(a[1:], b[:-1])) / n


def _binomial(a: F32) -> F32:
    """[1, 2, 1] / 4 along both axes (a Gaussian of sigma 0.7 px), edges held: a few array operations."""
    out = np.empty_like(a)
    out[1:-1] = 0.25 * (a[:-2] + a[2:]) + 0.5 * a[1:-1]
    out[0], out[-1] = a[0], a[-1]
    res = np.empty_like(a)
    res[:, 1:-1] = 0.25 * (out[:, :-2] + out[:, 2:]) + 0.5 * out[:, 1:-1]
    res[:, 0], res[:, -1] = out[:, 0], out[:, -1]
    return res


def _as_2d(image: ArrayLike) -> NDArray[np.generic]:
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D slice image, got shape {a.shape}")
    if min(a.shape) < 32:
        raise ValueError(f"slice of {a.shape[1]} x {a.shape[0]} px is too small for QC (at least 32 x 32)")
    return a


def prepare(image: ArrayLike, factor: int | None = None) -> Prepared:
    """Bin a slice and take the statistics every measure shares; ``factor`` None: :func:`auto_factor`."""
    a = _as_2d(image)
    f = auto_factor(a.shape) if factor is None else max(1, int(factor))
    b = np.ascontiguousarray(bin_image(a, f), dtype=np.float32)
    mean = float(b.mean(dtype=np.float64))
    b -= np.float32(mean)
    total = _dot(b, b) / b.size
    signal = min(max(_row_cross(b), 0.0), total)
    coarse = bin_image(b, max(1, min(b.shape) // CONTRAST_SIZE))
    coarse = coarse - coarse.mean(axis=0, keepdims=True)  # curtains
    coarse -= coarse.mean(axis=1, keepdims=True)  # charging streaks and ramps down the frame
    spec = sfft.rfft2(b).astype(np.complex64, copy=False)
    return Prepared(b, _binomial(b), spec, f, mean, signal, total - signal, sharpness(a), max(_row_cross(coarse), 0.0),
                    _stripe_share(b))


def brightness(prep: Prepared) -> float:
    """Mean grey level. A sudden change is charging (or a detector/beam-current change)."""
    return prep.mean


def contrast(prep: Prepared) -> float:
    """Grey-level SD of the signal at a coarse scale (about 1/32 of the field). Charging flattens or boosts it.

    Coarse, so that defocus (which lowers fine detail only) does not read as a
    contrast change; column and row means removed, so that curtains and the
    streaks of charging itself do not either (what is left is the tissue's
    contrast, which a gain change scales); adjacent-row covariance, so that
    shot noise does not count.
    """
    return math.sqrt(prep.coarse_var)


def snr(prep: Prepared) -> float:
    """Signal SD over noise SD at full resolution. Falls with beam current, dwell or detector trouble."""
    noise = prep.noise_var * prep.factor * prep.factor  # a block mean of f x f pixels has 1/f² of their noise variance
    return math.sqrt(prep.signal_var / noise) if noise > 0 else float("inf")


def sharpness(image: ArrayLike, crop: int = SHARPNESS_CROP) -> float:
    """Focus measure (:func:`clemflow.fibsem.focus.sharpness`) of the central ``crop`` px at full resolution.

    Defocus blurs the finest detail first, so binning would hide it; a central
    crop keeps the cost bounded. Column means are removed first: vertical
    stripes (curtaining) would otherwise add smooth variance and read as
    blur. Compare values only between slices of one run.
    """
    a = _as_2d(image)
    h, w = a.shape
    y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    c = a[y0:y0 + crop, x0:x0 + crop].astype(np.float32)
    c -= c.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]  # curtains are not focus: drop column means
    return _focus_sharpness(c, bin_px=1)


def _overlap(a: F32, b: F32, dx: float, dy: float) -> tuple[F32, F32] | None:
    """The parts of ``a`` (earlier) and ``b`` (later, content moved by dx, dy binned px) that show the same place."""
    ix, iy = int(round(dx)), int(round(dy))
    h, w = a.shape
    if abs(ix) > w - MIN_OVERLAP or abs(iy) > h - MIN_OVERLAP:
        return None
    # b(y + iy, x + ix) shows what a(y, x) showed
    ay = slice(max(0, -iy), min(h, h - iy))
    ax = slice(max(0, -ix), min(w, w - ix))
    by = slice(max(0, iy), min(h, h + iy))
    bx = slice(max(0, ix), min(w, w + ix))
    return a[ay, ax], b[by, bx]


def neighbour_ncc(earlier: Prepared, later: Prepared, step_dx: float, step_dy: float) -> float:
    """Normalised cross-correlation of two slices where they overlap after the measured shift.

    Low when the slices do not show the same place: a misregistration, a
    big jump, a lost or badly damaged slice. Taken on the lightly smoothed
    binned images (binomial, sigma 0.7 binned px), so it reflects structure
    more than dose; NaN when the shift leaves no overlap.
    """
    f = later.factor
    pair = _overlap(earlier.smooth, later.smooth, step_dx / f, step_dy / f)
    if pair is None:
        return float("nan")
    a, b = pair
    a = a - np.float32(a.mean(dtype=np.float64))
    b = b - np.float32(b.mean(dtype=np.float64))
    den = math.sqrt(_dot(a, a) * _dot(b, b))
    return _dot(a, b) / den if den > 0 else float("nan")


def _fraction_shift(prep: Prepared, fx: float, fy: float) -> F32:
    """The binned slice with its content moved by a sub-pixel (fx, fy): a phase ramp on its spectrum, i.e. an
    all-pass filter, so white noise stays white and rows stay independent (an interpolation would mix them)."""
    if abs(fx) < 1e-3 and abs(fy) < 1e-3:
        return prep.binned
    h, w = prep.binned.shape
    ry = np.exp(-2j * np.pi * sfft.fftfreq(h) * fy).astype(np.complex64)[:, None]
    rx = np.exp(-2j * np.pi * sfft.rfftfreq(w) * fx).astype(np.complex64)[None, :]
    return sfft.irfft2(prep.spectrum * ry * rx, s=(h, w)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Comparison:
    """Two slices compared where they show the same place (after the measured shift)."""

    similarity: float  # correlation of the signals, noise removed: 1 = the same content
    gain: float  # signal SD of the later slice over the earlier's, same place: a contrast change
    level: float  # mean grey of the later slice over the earlier's, same place: a brightness change


def compare(earlier: Prepared, later: Prepared, step_dx: float, step_dy: float) -> Comparison:
    """:func:`similarity`, and the contrast and brightness ratios of the same place in the two slices.

    The ratios are what charging shows without the tissue's part: over one
    field a big organelle entering or leaving moves the frame's mean and SD
    by tens of percent, but the same place one slice deeper looks nearly the
    same, so a gain or offset change of the detector stands out.
    """
    nan = float("nan")
    f = later.factor
    dx, dy = step_dx / f, step_dy / f
    ix, iy = round(dx), round(dy)
    moved_back = _fraction_shift(later, -(dx - ix), -(dy - iy))
    pair = _overlap(earlier.binned, moved_back, ix, iy)
    if pair is None:
        return Comparison(nan, nan, nan)
    a, b = pair
    e = 2  # keep the Fourier shift's edge ringing out
    a, b = a[e:-e, e:-e], b[e:-e, e:-e]
    ma, mb = float(a.mean(dtype=np.float64)), float(b.mean(dtype=np.float64))
    # row means out: streaks along the scan lines (charging, line noise) belong to one frame, not to the tissue;
    # column means out: curtains are not tissue either (and stay from slice to slice)
    a = a - a.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    b = b - b.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    a -= a.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    b -= b.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    sa, sb = _row_cross(a), _row_cross(b)
    level = (later.mean + mb) / (earlier.mean + ma) if earlier.mean + ma > 0 else nan
    if sa <= 0 or sb <= 0:
        return Comparison(nan, nan, level)
    return Comparison(_row_cross(a, b) / math.sqrt(sa * sb), math.sqrt(sb / sa), level)


def similarity(earlier: Prepared, later: Prepared, step_dx: float, step_dy: float) -> float:
    """Correlation of the two slices' *signals* (noise removed) after the measured shift: 1 = the same content.

    ``1 - similarity`` is how much the content changed from one slice to the
    other. It is what tells a duplicated slice (the same depth imaged twice:
    ~1 although the noise differs) and a missing one (a step of two slices:
    about four times the usual change, for structures that move steadily
    through the slices) from the usual step. Noise-free because it uses only
    covariances between different rows or different images; contrast-free
    because it is a correlation; blind to streaks along the scan lines and to
    curtains (row and column means are removed). The sub-pixel part of the
    shift is applied exactly (a residual shift would read as change).
    """
    return compare(earlier, later, step_dx, step_dy).similarity


def stripe_energy(prep: Prepared) -> float:
    """Share of the signal in vertical stripes (curtaining): structure constant down the face, varying across it.

    The image is cut into horizontal bands; each band's column-mean profile
    is high-passed along x (shading across the field removed). A curtain runs
    through every band at the same x, so profiles of *different* bands agree;
    cells, noise and a membrane that happens to run vertically through part
    of the field do not (the median over band pairs ignores one that spans a
    few bands). The agreement, over the image's own signal variance at the
    same scales, is the share: ~0 without curtains, towards 1 when stripes
    are all there is.
    """
    return prep.stripes


def _stripe_share(b: F32) -> float:
    """:func:`stripe_energy` of a mean-free binned image, all in the row-wise Fourier domain (Parseval):
    one FFT along x serves the high-pass, the band profiles and the image's own row covariance."""
    h, w = b.shape
    n = min(STRIPE_BANDS, h // 4)
    if n < 2:
        return float("nan")
    rows = (h // n) * n
    sigma = max(8.0, w / 16.0)  # removes shading across the field, keeps curtains up to ~1/10 of it wide
    k = sfft.rfftfreq(w)
    weight = (1.0 - np.exp(-2.0 * (np.pi * sigma * k) ** 2)) ** 2  # squared high-pass response
    weight[1:(w + 1) // 2] *= 2.0  # bins that stand for a conjugate pair
    spec = sfft.rfft(b[:rows], axis=1)
    total = float(np.real(np.sum(spec[:-1] * np.conj(spec[1:]) * weight))) / ((rows - 1) * w * w)
    if total <= 0:
        return float("nan")
    prof = spec.reshape(n, rows // n, -1).mean(axis=1)
    cov = np.real((prof * weight) @ np.conj(prof).T) / (w * w)
    return float(np.median(cov[np.triu_indices(n, 1)])) / total
