"""Phase correlation: the one shift estimator used by the coarse and fine stages.

Why phase correlation: a FIB-SEM slice differs from its neighbour by new
content, noise and a translation of up to tens of pixels. The whitened
cross-power spectrum turns that translation into one sharp peak whatever the
contrast, its cost is a few FFTs, and the height of the peak over the rest of
the surface (peak-to-sidelobe ratio) says how much to trust it. A Gaussian
weight on the spectrum (the "light Gaussian" pre-filter) keeps noise out and
makes the peak a Gaussian, so a three-point Gaussian fit per axis gives the
sub-pixel position without up-sampling.

Spectra are computed once per image (``Spectrum``) and reused: each new slice
is compared with its neighbour and with a long-range reference from spectra
already at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

__all__ = ["PhaseShift", "Spectrum", "bin_image", "box_window", "correlate", "inverse", "plain_spectrum", "shifted", "shifted_window", "spectrum"]

PEAK_EXCLUSION = 5  # half-width, in binned pixels, of the peak area left out of the sidelobe statistics


@dataclass(frozen=True)
class Spectrum:
    """FFT of one mean-free, apodised image (binned pixels)."""

    fft: NDArray[np.complex64]  # rfft2 of the windowed image
    shape: tuple[int, int]


@dataclass(frozen=True)
class PhaseShift:
    """Displacement of the moving image's content relative to the reference (binned px, +x right, +y down)."""

    dx: float
    dy: float
    psr: float  # peak-to-sidelobe ratio: ~3-5 for noise, tens for a clear match


def bin_image(image: NDArray[np.generic], factor: int) -> NDArray[np.float32]:
    """Block mean over ``factor`` x ``factor`` pixels (edges that do not fill a block are dropped)."""
    a = np.asarray(image)
    if factor <= 1:
        return a.astype(np.float32, copy=False)
    h, w = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
    a = a[:h, :w]
    acc = np.zeros((h // factor, w), dtype=np.float32)
    for r in range(factor):  # row sums first: cheaper than one reshape-mean over a float copy
        acc += a[r::factor]
    out = acc.reshape(h // factor, w // factor, factor).sum(axis=2)
    out *= 1.0 / (factor * factor)
    return out


def _tukey(n: int, lo: int = 0, hi: int | None = None) -> NDArray[np.float32]:
    """1-D Tukey window over [lo, hi) of n samples (zero outside), cosine edges over 1/8 of its length."""
    hi = n if hi is None else hi
    m = max(hi - lo, 0)
    w = np.zeros(n, np.float32)
    if m == 0:
        return w
    taper = max(2, m // 8)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(min(taper, m)) + 0.5) / taper)
    w[lo:hi] = 1.0
    w[lo:lo + len(ramp)] = ramp
    w[hi - len(ramp):hi] = np.minimum(w[hi - len(ramp):hi], ramp[::-1])
    return w


@lru_cache(maxsize=16)
def _window(shape: tuple[int, int]) -> NDArray[np.float32]:
    """Tukey window (flat centre, cosine edges over 1/8 of each side): keeps the wrap-around edge out of the peak."""
    return np.outer(_tukey(shape[0]), _tukey(shape[1]))


def shifted_window(shape: tuple[int, int], dx: float, dy: float) -> NDArray[np.float32]:
    """The default window moved by (dx, dy) px: apodise an image whose content moved, so both weigh the same content.

    A window that stays put while the content moves biases phase correlation toward zero shift (by several per
    cent of the shift); moving it with the content removes that bias.
    """
    h, w = shape
    wy = np.interp(np.arange(h) - dy, np.arange(h), _tukey(h), left=0.0, right=0.0)
    wx = np.interp(np.arange(w) - dx, np.arange(w), _tukey(w), left=0.0, right=0.0)
    return np.outer(wy, wx).astype(np.float32)


def box_window(shape: tuple[int, int], box: tuple[int, int, int, int]) -> NDArray[np.float32]:
    """Tukey window over the box (y0, y1, x0, x1) only: where two images both hold real data."""
    y0, y1, x0, x1 = box
    return np.outer(_tukey(shape[0], y0, y1), _tukey(shape[1], x0, x1))


@lru_cache(maxsize=16)
def _frequencies(shape: tuple[int, int]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    fy = sfft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    return fy, fx


@lru_cache(maxsize=16)
def _gaussian_weight(shape: tuple[int, int], sigma: float) -> NDArray[np.float32]:
    """Spectral weight of a Gaussian of ``sigma`` px applied to both images (hence squared)."""
    fy, fx = _frequencies(shape)
    return np.exp(-4.0 * np.pi**2 * sigma**2 * (fy**2 + fx**2)).astype(np.float32)


def spectrum(image: NDArray[np.floating], window: NDArray[np.float32] | None = None) -> Spectrum:
    """The reusable spectrum of a (binned) image, apodised by ``window`` (default: Tukey over the whole image)."""
    a = np.asarray(image, dtype=np.float32)
    w = _window(a.shape) if window is None else window
    a = (a - a.mean()) * w
    return Spectrum(sfft.rfft2(a).astype(np.complex64, copy=False), (int(a.shape[0]), int(a.shape[1])))


def plain_spectrum(image: NDArray[np.floating]) -> Spectrum:
    """Spectrum of the mean-free image without apodisation: for sums of shifted images (see coarse)."""
    a = np.asarray(image, dtype=np.float32)
    return Spectrum(sfft.rfft2(a - a.mean()).astype(np.complex64, copy=False), (int(a.shape[0]), int(a.shape[1])))


def inverse(fft: NDArray[np.complex64], shape: tuple[int, int]) -> NDArray[np.float32]:
    """Back to the image from an rfft2 spectrum."""
    return sfft.irfft2(fft, s=shape).astype(np.float32, copy=False)


def shifted(spec: Spectrum, dx: float, dy: float) -> NDArray[np.complex64]:
    """The spectrum of the image with its content moved by (dx, dy): a phase ramp, exact and cheap."""
    fy, fx = _frequencies(spec.shape)
    return spec.fft * np.exp(-2j * np.pi * (fx * dx + fy * dy)).astype(np.complex64)


def correlate(reference: Spectrum | NDArray[np.complex64], moving: Spectrum, sigma: float = 1.0,
              max_shift: float | None = None) -> PhaseShift:
    """How far the moving image's content sits from the reference's (binned px), with the peak's PSR.

    ``reference`` may be a bare spectrum array (e.g. a mean of shifted spectra).
    ``max_shift`` limits the search to a radius around zero.
    """
    ref = reference.fft if isinstance(reference, Spectrum) else reference
    cross = moving.fft * np.conj(ref)
    cross /= np.maximum(np.abs(cross), 1e-12)
    if sigma > 0:
        cross *= _gaussian_weight(moving.shape, float(sigma))
    surface = sfft.irfft2(cross, s=moving.shape)
    h, w = moving.shape
    if max_shift is not None:
        yy = np.minimum(np.arange(h), h - np.arange(h))[:, None]
        xx = np.minimum(np.arange(w), w - np.arange(w))[None, :]
        search = np.where(yy**2 + xx**2 <= max_shift**2, surface, -np.inf)
    else:
        search = surface
    iy, ix = np.unravel_index(int(np.argmax(search)), surface.shape)
    dy = iy + _gaussian_offset(surface[(iy - 1) % h, ix], surface[iy, ix], surface[(iy + 1) % h, ix])
    dx = ix + _gaussian_offset(surface[iy, (ix - 1) % w], surface[iy, ix], surface[iy, (ix + 1) % w])
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return PhaseShift(float(dx), float(dy), _psr(surface, iy, ix))


def _gaussian_offset(left: float, centre: float, right: float) -> float:
    """Sub-pixel offset of a peak from three samples: exact for a Gaussian peak, parabolic where logs fail."""
    if left > 0 and centre > 0 and right > 0:
        ll, lc, lr = np.log(left), np.log(centre), np.log(right)
        den = ll - 2 * lc + lr
        if den < 0:
            return float(np.clip(0.5 * (ll - lr) / den, -0.5, 0.5))
    den = left - 2 * centre + right
    return float(np.clip(0.5 * (left - right) / den, -0.5, 0.5)) if den < 0 else 0.0


def _psr(surface: NDArray[np.floating], iy: int, ix: int) -> float:
    """(peak - mean of the sidelobes) / their SD, the peak's neighbourhood excluded."""
    h, w = surface.shape
    e = PEAK_EXCLUSION
    rolled = np.roll(surface, (e - iy, e - ix), axis=(0, 1))
    mask = np.ones(surface.shape, dtype=bool)
    mask[: 2 * e + 1, : 2 * e + 1] = False
    side = rolled[mask]
    sd = float(side.std())
    return float((surface[iy, ix] - side.mean()) / sd) if sd > 0 else 0.0
