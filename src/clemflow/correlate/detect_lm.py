"""Lipid droplets in the confocal stack: 3D blobs of the BODIPY channel, centred to a fraction of a voxel.

A droplet images as its own volume blurred by the PSF: a uniform ball of
radius r has variance r²/5 per axis, so its image is close to a Gaussian of
variance ``psf² + r²/5`` along each axis. Detection follows that model, in µm
so that anisotropic voxels need no special case:

1. **Noise.** Photon-limited counts have a variance that grows with the
   signal (``var = a * I + b``: shot noise plus read noise and offset). The
   two numbers are fitted to the stack itself, from the local variance of flat
   patches, and the generalised Anscombe transform makes the noise of unit
   size everywhere; a threshold in noise units then means the same in the dim
   background and on the bright cytoplasm.
2. **Blobs.** At a few sizes spanning ``diameter_um`` (each the PSF plus the
   ball's own spread) the stack is smoothed by the blob's Gaussian and its
   curvature taken along z, y and x, each in units of its own robust noise.
   A droplet curves down along all three; the top of the stained cytoplasm
   or a cell's edge along one or two, so the score is the *least* of the
   three (a Laplacian, their sum, counts those edges as blobs). A voxel's
   score is the best over sizes; droplets are its local maxima scoring
   ``min_score`` or more.
3. **Centre and size.** A 3D Gaussian on a constant background is fitted to
   the counts around each maximum, voxels nearer another droplet left out.
   The radius comes from the fitted width where the droplet is clearly wider
   than the PSF, else from its integrated brightness scaled by the brightness
   per µm³ of the resolved droplets of the same stack.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, optimize, stats

from .blobs import Blobs, checked_sizes

__all__ = ["detect_lm_droplets", "noise_model", "stabilise"]

Progress = Callable[[int, int], None]

PSF_SIGMA_UM = (0.27, 0.08)
"""(axial, lateral) Gaussian sigma of a 63x/1.4 oil objective at 520 nm emission (Zhang et al. 2007 fit)."""
MIN_SCORE = 10.0  # least curvature over its noise; pure noise rarely reaches 8 in a few million voxels
N_SCALES = 4


def noise_model(stack: NDArray, block: int = 8) -> tuple[float, float]:
    """``(a, b)`` of the noise variance ``a * I + b`` of a stack (counts), fitted to its flat patches.

    Each plane is cut into ``block`` x ``block`` patches; a patch's noise variance is the median squared
    residual against the mean of the four lateral neighbours (robust to the few object pixels a patch may
    hold). Patches are pooled by brightness and a robust line (Theil-Sen) is fitted through the pools'
    medians, so droplets, which make a few patches look noisier than their brightness explains, do not
    tilt it.
    """
    s = np.asarray(stack, np.float32)
    if s.ndim == 2:
        s = s[None]
    r = s[:, 1:-1, 1:-1] - 0.25 * (s[:, :-2, 1:-1] + s[:, 2:, 1:-1] + s[:, 1:-1, :-2] + s[:, 1:-1, 2:])
    z, h, w = r.shape
    hb, wb = h // block, w // block
    if hb == 0 or wb == 0:
        raise ValueError(f"stack planes {s.shape[1:]} are too small for the noise model (need > {block + 2} px)")
    cut = (slice(None), slice(0, hb * block), slice(0, wb * block))
    mean = s[:, 1:-1, 1:-1][cut].reshape(z, hb, block, wb, block).mean(axis=(2, 4)).ravel()
    # median of chi-square(1) is 0.4549; the residual has 1.25 times the pixel variance
    var = np.median(np.square(r[cut]).reshape(z, hb, block, wb, block).transpose(0, 1, 3, 2, 4)
                    .reshape(z, hb, wb, -1), axis=-1).ravel() / (0.4549 * 1.25)
    edges = np.unique(np.quantile(mean, np.linspace(0, 1, 25)))
    which = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, len(edges) - 2)
    pools = [k for k in range(len(edges) - 1) if np.count_nonzero(which == k) >= 4]
    if len(pools) < 3:
        return 0.0, float(np.median(var))
    m = np.array([np.median(mean[which == k]) for k in pools])
    v = np.array([np.median(var[which == k]) for k in pools])
    slope, intercept, _, _ = stats.theilslopes(v, m)
    a = max(float(slope), 0.0)
    b = float(np.median(v - a * m))
    return a, b


def stabilise(stack: NDArray, a: float, b: float) -> NDArray[np.float32]:
    """Generalised Anscombe transform: counts with variance ``a * I + b`` to values with unit noise."""
    s = np.asarray(stack, np.float32)
    floor = max(b, 1e-6)
    if a <= 1e-9 * max(floor, 1.0):
        return s / np.float32(np.sqrt(floor))
    return (2.0 / a) * np.sqrt(np.maximum(a * s + b, 0.25 * floor)).astype(np.float32)


def _blob_sigma(radius_um: NDArray | float, psf_um: NDArray) -> NDArray:
    """(.., 3) per-axis (z, y, x) sigma in µm of the image of a ball: PSF and the ball's own spread."""
    r2 = np.square(np.asarray(radius_um, float))[..., None] / 5.0
    return np.sqrt(psf_um**2 + r2)


def _score(vst: NDArray[np.float32], voxel: NDArray, psf: NDArray, radii: NDArray) -> tuple[NDArray, NDArray]:
    """Blob score (noise units) and the radius index that gave it, best over the radii.

    At each size the image is smoothed by the blob's own Gaussian and its curvature taken along z, y and x,
    each divided by its robust noise level; the score is the *least* of the three. A droplet curves down
    along every axis; the top and bottom of the stained cytoplasm, or a cell's edge, along one or two only,
    and a Laplacian (their sum) would count those.
    """
    best = np.full(vst.shape, -np.inf, np.float32)
    which = np.zeros(vst.shape, np.int8)
    step = (max(1, vst.shape[0] // 16), 4, 4)
    axes = [a for a in range(3) if vst.shape[a] > 1]  # a single plane has no curvature along z
    for k, r in enumerate(radii):
        sigma = _blob_sigma(r, psf) / voxel
        least = None
        for axis in axes:
            order = [0, 0, 0]
            order[axis] = 2
            curv = -ndimage.gaussian_filter(vst, sigma, order=order, mode="nearest")
            sub = curv[:: step[0], :: step[1], :: step[2]]
            noise = 1.4826 * float(np.median(np.abs(sub - np.median(sub))))
            if noise < 1e-6:  # no noise at all: a flat or synthetic stack, nothing to measure against
                least = np.full(vst.shape, -np.inf, np.float32)
                break
            curv /= np.float32(noise)
            least = curv if least is None else np.minimum(least, curv, out=least)
        better = least > best
        best[better] = least[better]
        which[better] = k
    return best, which


def _peaks(score: NDArray, min_score: float) -> NDArray[np.intp]:
    """(N, 3) voxel indices of local maxima (3x3x3) scoring at least ``min_score``, best first."""
    footprint = np.ones((3, 3, 3), bool) if score.shape[0] > 1 else np.ones((1, 3, 3), bool)
    top = ndimage.maximum_filter(score, footprint=footprint, mode="nearest")
    idx = np.argwhere((score >= top) & (score >= min_score))
    order = np.argsort(-score[tuple(idx.T)], kind="stable")
    return idx[order]


def _gauss(p: NDArray, z: NDArray, y: NDArray, x: NDArray) -> tuple[NDArray, NDArray]:
    """Model values and their Jacobian (N, 7) for p = (background, amplitude, cz, cy, cx, sigma_z, sigma_xy)."""
    bg, amp, cz, cy, cx, sz, sxy = p
    dz, dy, dx = z - cz, y - cy, x - cx
    rz, rl = dz * dz / (sz * sz), (dy * dy + dx * dx) / (sxy * sxy)
    e = np.exp(-0.5 * (rz + rl))
    ae = amp * e
    jac = np.stack([np.ones_like(e), e, ae * dz / sz**2, ae * dy / sxy**2, ae * dx / sxy**2, ae * rz / sz,
                    ae * rl / sxy], axis=1)
    return bg + ae, jac


Fit = tuple[NDArray, float, float, float]


def _sensible(fit: Fit | None, sig_min: NDArray, sig_max: NDArray) -> bool:
    """A fit whose widths lie between the PSF's and a little over the largest droplet's."""
    return fit is not None and 0.7 * sig_min[1] <= fit[2] <= 1.5 * sig_max[1] and fit[1] <= 1.5 * sig_max[0]


def _fit(counts: NDArray[np.float32], weight: NDArray[np.float32], owner: NDArray, k: int, peak: NDArray,
         sig_um: NDArray, voxel: NDArray, start: NDArray | None = None) -> Fit | None:
    """Gaussian fit around one peak: (centre zyx µm, sigma axial µm, sigma lateral µm, integral) or None.

    The window spans +-2 sigmas of the scale that found the peak; the fit starts from those sigmas unless
    ``start`` is given. Weighted by the noise model; voxels that belong to another peak are left out, so a
    neighbour does not pull the centre.
    """
    half = np.maximum(np.ceil(2.0 * sig_um / voxel).astype(int), [1, 2, 2])
    lo = np.maximum(peak - half, 0)
    hi = np.minimum(peak + half + 1, counts.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    keep = (owner[box] == k) | (owner[box] < 0)
    if np.count_nonzero(keep) < 10:
        return None
    zz, yy, xx = (np.indices(keep.shape).reshape(3, -1) + lo[:, None]) * voxel[:, None]
    keep = keep.ravel()
    zz, yy, xx = zz[keep], yy[keep], xx[keep]
    v = counts[box].ravel()[keep].astype(float)
    w = weight[box].ravel()[keep].astype(float)
    bg0 = float(np.percentile(v, 10))
    s0 = sig_um if start is None else start
    p0 = np.array([bg0, max(float(counts[tuple(peak)]) - bg0, 1.0), *(peak * voxel), s0[0], s0[1]])

    def residual(p: NDArray) -> NDArray:
        return (_gauss(p, zz, yy, xx)[0] - v) * w

    def jacobian(p: NDArray) -> NDArray:
        return _gauss(p, zz, yy, xx)[1] * w[:, None]

    if len(v) <= 7:
        return None
    try:
        res = optimize.least_squares(residual, p0, jac=jacobian, method="lm", x_scale="jac", max_nfev=100)
    except (ValueError, np.linalg.LinAlgError):
        return None
    bg, amp, cz, cy, cx, sz, sxy = res.x
    sz, sxy = abs(sz), abs(sxy)
    centre = np.array([cz, cy, cx])
    if not res.success or amp <= 0 or np.any(np.abs(centre - peak * voxel) > (hi - lo) * voxel / 2):
        return None
    if sz < 0.25 * sig_um[0] or sxy < 0.25 * sig_um[1] or sz > 4 * sig_um[0] or sxy > 4 * sig_um[1]:
        return None
    integral = amp * (2 * np.pi) ** 1.5 * sz * sxy**2
    return centre, float(sz), float(sxy), float(integral)


def _radii(sxy: NDArray, integral: NDArray, psf_xy: float, fallback: NDArray) -> NDArray:
    """Radius from the lateral width where resolved, else from brightness scaled on the resolved droplets.

    Blobs without a fit (NaN width) keep ``fallback``, the radius of the scale that found them.
    """
    fitted = np.isfinite(sxy)
    excess = np.where(fitted, np.maximum(np.nan_to_num(sxy) ** 2 - psf_xy**2, 0.0), 0.0)
    r_width = np.where(fitted, np.sqrt(5.0 * excess), fallback)
    resolved = fitted & (excess >= psf_xy**2)  # the ball's own spread at least the PSF's: r >= 2.2 psf sigma
    if np.count_nonzero(resolved) < 3:
        return r_width
    per_um3 = np.median(integral[resolved] / (4 / 3 * np.pi * r_width[resolved] ** 3))
    r_bright = np.cbrt(np.maximum(np.nan_to_num(integral), 0.0) / per_um3 * 3 / (4 * np.pi))
    return np.where(resolved | ~fitted, r_width, r_bright)


def detect_lm_droplets(
    stack: NDArray,
    voxel_um: tuple[float, float, float],
    *,
    diameter_um: tuple[float, float] = (0.2, 1.2),
    min_score: float | None = None,
    psf_sigma_um: tuple[float, float] = PSF_SIGMA_UM,
    progress: Progress | None = None,
) -> Blobs:
    """Lipid droplets in a confocal stack (Z, Y, X) of the BODIPY channel; centres in µm (x, y, z).

    ``voxel_um`` is (z, y, x); ``diameter_um`` the droplet sizes to look for; ``min_score`` the detection
    threshold on the blob score, the least curvature over its noise (default 10); ``psf_sigma_um`` the
    (axial, lateral) Gaussian PSF sigma. A droplet whose fitted centre lies outside the stack is dropped
    (one cut by the first or last plane is kept when the fit puts its centre inside). ``score`` is the
    blob score. ``progress(done, total)`` is called after the filtering and every 32 fits.
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"stack must be (Z, Y, X); got shape {stack.shape}: pass one channel of a (C, Z, Y, X) stack")
    voxel = checked_sizes(voxel_um, diameter_um)
    d_lo, d_hi = diameter_um
    psf = np.array([psf_sigma_um[0], psf_sigma_um[1], psf_sigma_um[1]], float)
    threshold = MIN_SCORE if min_score is None else float(min_score)

    counts = stack.astype(np.float32)
    a, b = noise_model(counts)
    # work in units of the noise sd at the median level, so that any scaling of the data reads the same
    var = a * float(np.median(counts)) + b
    unit = float(np.sqrt(var)) if var > 0 else float(counts.std()) or 1.0
    counts /= np.float32(unit)
    a, b = a / unit, b / unit**2
    vst = stabilise(counts, a, b)
    radii = np.geomspace(d_lo / 2, d_hi / 2, N_SCALES)
    score, which = _score(vst, voxel, psf, radii)
    peaks = _peaks(score, threshold)
    total = len(peaks) + 2
    if progress is not None:
        progress(2, total)
    if len(peaks) == 0:
        return Blobs.empty()

    # each voxel belongs to the nearest peak, distances in units of that peak's blob sigma
    k_scale = which[tuple(peaks.T)]
    scale_r = radii[k_scale]
    sig = _blob_sigma(scale_r, psf)
    sig_min, sig_max = _blob_sigma(radii[0], psf), _blob_sigma(radii[-1], psf)
    owner = _owners(counts.shape, peaks, sig, voxel)
    # weights: 1 / noise sd of each count under the fitted model
    weight = (1.0 / np.sqrt(np.maximum(a * counts + b, 1e-6))).astype(np.float32)
    n = len(peaks)
    centre = np.empty((n, 3))
    s_lat = np.full(n, np.nan)
    integral = np.full(n, np.nan)
    for k, (peak, sg) in enumerate(zip(peaks, sig)):
        fit = _fit(counts, weight, owner, k, peak, sg, voxel)
        if not _sensible(fit, sig_min, sig_max) and k_scale[k] > 0:  # a small droplet on a large scale's
            fit = _fit(counts, weight, owner, k, peak, sg, voxel, start=sig_min)  # response: start narrow
        if _sensible(fit, sig_min, sig_max):
            centre[k], _, s_lat[k], integral[k] = fit
        else:  # no sensible fit (a cell's edge in the window, too few voxels): the score's own peak
            centre[k] = (peak + _parabolic(score, peak)) * voxel
        if progress is not None and k % 32 == 31:
            progress(k + 3, total)
    if progress is not None:
        progress(total, total)
    extent = (np.array(counts.shape) - 1) * voxel
    inside = np.all((centre >= -0.5 * voxel) & (centre <= extent + 0.5 * voxel), axis=1)
    r = _radii(s_lat, integral, psf[1], scale_r)
    return Blobs(centre[inside, ::-1], r[inside], score[tuple(peaks[inside].T)].astype(float))


def _parabolic(values: NDArray, at: NDArray) -> NDArray:
    """Sub-voxel offset (per axis, within +-0.5) of a local maximum, from a parabola through it and its neighbours."""
    off = np.zeros(3)
    for axis in range(3):
        if not 0 < at[axis] < values.shape[axis] - 1:
            continue
        lo, hi = at.copy(), at.copy()
        lo[axis] -= 1
        hi[axis] += 1
        a, b, c = float(values[tuple(lo)]), float(values[tuple(at)]), float(values[tuple(hi)])
        den = a - 2 * b + c
        if den < 0:
            off[axis] = np.clip(0.5 * (a - c) / den, -0.5, 0.5)
    return off


def _owners(shape: tuple[int, ...], peaks: NDArray, sig_um: NDArray, voxel: NDArray) -> NDArray[np.int32]:
    """Label image: the peak each voxel near a peak is closest to (in blob sigmas), -1 elsewhere."""
    owner = np.full(shape, -1, np.int32)
    best = np.full(shape, np.inf, np.float32)
    for k, (p, s) in enumerate(zip(peaks, sig_um)):
        half = np.maximum(np.ceil(3.0 * s / voxel).astype(int), 1)
        lo = np.maximum(p - half, 0)
        hi = np.minimum(p + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        g = [((np.arange(a, b) - c) * v / sd) ** 2 for a, b, c, v, sd in zip(lo, hi, p, voxel, s)]
        d = (g[0][:, None, None] + g[1][None, :, None] + g[2][None, None, :]).astype(np.float32)
        closer = d < best[box]
        best[box][closer] = d[closer]
        owner[box][closer] = k
    return owner
