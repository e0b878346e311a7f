"""Segmentation of one confocal field: cells, particles and endolysosomes, plane by plane where volume matters.

The study's recipe (Fiji + CellProfiler) works on maximum projections: white
top-hat to lift puncta off the cytoplasm, a small Gaussian, Li thresholds for
the organelle channels, Otsu for cells and endolysosomes, an adaptive threshold
for particles. Volumes cannot come from a projection, so the same filters run
on every plane and the projection is, by construction, the maximum of the
filtered planes: a pixel is in a projected mask exactly when some plane has it.

Cheap where it can be: the top-hat's background (a grey opening) and everything
about whole cells is computed on blocks of about 0.4 µm, where cytoplasm is
still resolved and a 1024 x 1024 x 30 stack is 64 times smaller; only puncta
are handled at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy import stats
from skimage import filters, measure, morphology, segmentation

__all__ = [
    "Cells",
    "enhance_planes",
    "segment_cells",
    "block_mean",
    "block_size_for",
    "cell_labels",
    "drop_small",
    "expand_blocks",
    "opening_background",
    "pixel_noise",
    "Particles",
    "find_particles",
    "block_noise",
    "smoothing_gain",
    "keep_particles",
    "plane_significance",
    "significance_threshold",
    "robust_background",
    "threshold_value",
]

COARSE_PIXEL_UM = 0.4
"""Block size for cytoplasm and cells: finer than a cell's edge ramp (the axial PSF over a thin margin), coarser
than any punctum."""


def block_size_for(pixel_um: float, target_um: float = COARSE_PIXEL_UM) -> int:
    """Pixels per block side so that blocks are about ``target_um`` wide (at least 1)."""
    return max(1, int(round(target_um / pixel_um)))


def block_mean(stack: NDArray, b: int) -> NDArray[np.float32]:
    """Mean over b x b blocks of the last two axes; rows and columns beyond a whole block are dropped."""
    if b == 1:
        return np.asarray(stack, np.float32)
    *lead, h, w = stack.shape
    hh, ww = h // b, w // b
    if hh == 0 or ww == 0:
        raise ValueError(f"image of {h} x {w} px is smaller than one {b} x {b} block")
    cut = stack[..., : hh * b, : ww * b]
    rows = cut.reshape(*lead, hh, b, ww * b).sum(-2, dtype=np.float32)
    return rows.reshape(*lead, hh, ww, b).sum(-1) / np.float32(b * b)


def _lerp_axis(a: NDArray[np.float32], axis: int, n_full: int, b: int) -> NDArray[np.float32]:
    """Linear interpolation along ``axis`` from block centres (k * b + (b - 1) / 2) to ``n_full`` pixels, clamped.

    Pixel j of block k lies between block k and its neighbour on j's side, at
    a fraction that depends on j only, so each of the b offsets is one
    weighted sum of two shifted copies of the blocks (no gathers).
    """
    a = np.moveaxis(np.asarray(a, np.float32), axis, -1)
    n = a.shape[-1]
    padded = np.concatenate([a[..., :1], a, a[..., -1:]], axis=-1)
    out = np.empty(a.shape[:-1] + (n, b), np.float32)
    for j in range(b):
        d = (j - (b - 1) / 2) / b
        near = 1 if d < 0 else 0  # the other block is k - 1 (d < 0) or k + 1
        first, second = padded[..., 1 - near: 1 - near + n], padded[..., 2 - near: 2 - near + n]
        w_first = -d if d < 0 else 1 - d
        np.multiply(first, np.float32(w_first), out=out[..., j])
        out[..., j] += second * np.float32(1 - w_first)
    flat = out.reshape(a.shape[:-1] + (n * b,))
    if n_full > n * b:
        flat = np.concatenate([flat, np.repeat(a[..., -1:], n_full - n * b, axis=-1)], axis=-1)
    return np.moveaxis(flat[..., :n_full], -1, axis)


def expand_blocks(coarse: NDArray, b: int, shape: tuple[int, int], smooth: bool = False) -> NDArray:
    """Back to full resolution: block values repeated (labels, masks) or linear between block centres (``smooth``).

    Rows and columns that :func:`block_mean` dropped take the values of the last block.
    """
    h, w = shape
    if b == 1:
        return coarse[..., :h, :w]
    if smooth:
        a = np.asarray(coarse, np.float32)
        return _lerp_axis(_lerp_axis(a, a.ndim - 1, w, b), a.ndim - 2, h, b)
    iy = np.minimum(np.arange(h) // b, coarse.shape[-2] - 1)
    ix = np.minimum(np.arange(w) // b, coarse.shape[-1] - 1)
    return coarse[..., iy[:, None], ix[None, :]]


def opening_background(coarse: NDArray, radius_px: float) -> NDArray[np.float32]:
    """Grey opening of each plane (last two axes) by a square of half-width ``radius_px`` (coarse pixels).

    What a white top-hat of that radius subtracts: everything smaller than the
    structuring element (puncta, tubules) is removed, the cytoplasm stays.
    """
    k = 2 * int(round(radius_px)) + 1
    size = (1,) * (coarse.ndim - 2) + (k, k)
    return ndi.grey_opening(np.asarray(coarse, np.float32), size=size)


def threshold_value(values: NDArray, method: str) -> float:
    """A global threshold by name ("otsu", "li" or "triangle") over the finite values given."""
    v = np.asarray(values, np.float32).ravel()
    v = v[np.isfinite(v)]
    if v.size > 1_000_000:  # a regular subsample is as good for a histogram method and 4x cheaper
        v = v[:: v.size // 500_000]
    if v.size == 0 or v.min() == v.max():
        return float("inf")
    if method == "otsu":
        return float(filters.threshold_otsu(v))
    if method == "li":
        return float(filters.threshold_li(v))
    if method == "triangle":
        return float(filters.threshold_triangle(v))
    raise ValueError(f"unknown threshold method {method!r}; use 'otsu', 'li' or 'triangle'")


def robust_background(image: NDArray, block_px: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Local background and noise: median and scaled MAD of each block, bilinear between block centres.

    Medians ignore the few bright pixels of puncta, so the background under a
    punctum is the cytoplasm around it, and the SD is that of the noise.
    """
    h, w = image.shape
    b = max(4, min(int(block_px), h, w))
    hh, ww = max(h // b, 1), max(w // b, 1)
    cut = np.asarray(image[: hh * b, : ww * b], np.float32)
    blocks = cut.reshape(hh, b, ww, b).transpose(0, 2, 1, 3).reshape(hh, ww, b * b)
    med = np.median(blocks, axis=-1)
    mad = np.median(np.abs(blocks - med[..., None]), axis=-1) * np.float32(1.4826)
    mad = np.maximum(mad, np.float32(max(float(np.median(mad)), 1e-6) * 0.25))  # a flat block is not noise-free
    return expand_blocks(med, b, (h, w), smooth=True), expand_blocks(mad, b, (h, w), smooth=True)


def drop_small(mask: NDArray[np.bool_], min_px: float) -> NDArray[np.bool_]:
    """The mask without its 8-connected pieces of fewer than ``min_px`` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


@dataclass(frozen=True)
class Particles:
    """Particle objects of a projection.

    ``regions``: one label per object over its detection footprint (the
    adaptive threshold); ``signal``: the object's own extent, the area that
    is reported (see :func:`find_particles`); ``peak_yx``: each object's
    brightest pixel (row i is label i+1); ``point_var_px``: the variance (px²,
    per axis) of a point source in the smoothed projection, measured or assumed;
    ``height`` and ``score``: each object's peak above the background, in
    grey levels and in noise SDs.
    """

    regions: NDArray[np.int32]
    signal: NDArray[np.bool_]
    peak_yx: NDArray[np.int64]  # (N, 2)
    point_var_px: float = float("nan")
    height: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    score: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))


BALL_VARIANCE = 0.2
"""Per-axis variance of a uniform ball over its squared radius (r²/5): how an object's width becomes its size."""


def find_particles(
    mip: NDArray, sigma_px: float, block_px: int, offset_sd: float, psf_sigma_px: float | None = None,
) -> Particles:
    """Particles in a projection: outlined ``offset_sd`` noise SDs above the local background, sized by their width.

    Detection runs on the Gaussian-smoothed projection; an object counts only
    if its peak reaches twice the offset (hysteresis: the maximum of many noisy
    planes has a long upper tail, and one pixel of it is not a particle).
    Touching objects are split at the saddles between their maxima. The SD
    is the pixel noise's (neighbour differences, smoothed as the image is) or
    the spread of the block, whichever is less: where particles are dense
    (late timepoints) their own signal widens a block's spread, and dim ones
    among them would be lost against it.

    An object's size is not its footprint (which grows with brightness) nor
    its half-maximum area (a cluster below the resolution still shows the
    point spread's). Its width is: the variance of the smoothed profile (from
    its half-maximum area) is the point source's plus the object's own, and a
    ball of radius r has a variance of r²/5 per axis. The reported extent is
    where the profile stands above the level it has at radius r, i.e. a disc
    of radius r for a round object, the object's own shape otherwise; a point
    source keeps just its peak pixel. The point source's variance is measured
    on the image (the narrowest objects that stand ten times the block's
    spread above it, where a width is not bent by noise or neighbours); with fewer than ten bright
    objects it is taken from ``psf_sigma_px`` (default: ``sigma_px``, the
    smoothing being matched to the point spread) and the smoothing.
    """
    raw = np.asarray(mip, np.float32)
    smooth = ndi.gaussian_filter(raw, sigma_px) if sigma_px > 0 else raw
    bg, spread = robust_background(smooth, block_px)
    sd = np.minimum(spread, block_noise(raw, block_px) * np.float32(smoothing_gain(sigma_px)))
    score = (smooth - bg) / sd
    # the smoothing averages fewer independent pixels at the image edge, so its noise is larger there: the outer
    # frame is not searched (only cells cut by the border, which are not measured, reach into it)
    frame = int(np.ceil(2 * sigma_px)) + 1
    score[:frame], score[-frame:], score[:, :frame], score[:, -frame:] = 0, 0, 0, 0
    low, n = ndi.label(score > offset_sd, structure=np.ones((3, 3), bool))
    psf = sigma_px if psf_sigma_px is None else psf_sigma_px
    assumed = psf * psf + sigma_px * sigma_px
    if n == 0:
        return Particles(np.zeros(raw.shape, np.int32), np.zeros(raw.shape, bool), np.zeros((0, 2), np.int64), assumed)
    confirmed = _label_max(score, low, n) >= 2 * offset_sd
    confirmed[0] = False
    found = confirmed[low]
    maxima = found & (smooth == ndi.maximum_filter(smooth, size=3))
    markers, _ = ndi.label(maxima, structure=np.ones((3, 3), bool))
    regions = segmentation.watershed(-smooth, markers, mask=found).astype(np.int32)
    m = int(regions.max())
    height = smooth - bg
    peak = _label_max(height, regions, m)
    peak[0] = np.inf
    half = np.bincount(regions.ravel(), weights=(height >= 0.5 * peak[regions]).ravel(), minlength=m + 1)
    var = half / (2 * np.pi * np.log(2))  # a Gaussian's area at half maximum is 2 ln2 pi variance
    bright = (peak[1:] >= 10 * _label_max(spread, regions, m)[1:]) if m else np.zeros(0, bool)
    point = float(np.percentile(var[1:][bright], 10)) if bright.sum() >= 10 else assumed
    own = np.clip(var - point, 0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(var > 0, np.exp(-own / (2 * BALL_VARIANCE * var)), 1.0)
    signal = (regions > 0) & (height >= (level * peak)[regions])
    where = np.flatnonzero(regions)
    lab, val = regions.ravel()[where], smooth.ravel()[where]
    order = np.lexsort((val, lab))
    last = np.flatnonzero(np.diff(lab[order], append=m + 1))  # the brightest pixel of each label, labels 1..m
    peak_yx = np.stack(np.unravel_index(where[order[last]], raw.shape), 1).astype(np.int64)
    at = (peak_yx[:, 0], peak_yx[:, 1])
    return Particles(regions, signal, peak_yx, point, height[at].astype(np.float64), score[at].astype(np.float64))


def plane_significance(stack: NDArray, peak_yx: NDArray, sigma_px: float, window_px: int = 10) -> NDArray[np.float64]:
    """Per object: how many noise SDs its smoothed signal stands above the background in its best plane.

    A projection's noise is not Gaussian (the maximum of many noisy planes
    has a long upper tail, one the robust SD of the projection does not
    describe), so significance is judged where the noise is simple: in each
    plane, smoothed by the same Gaussian, whose noise SD follows from the
    plane's pixel noise and the kernel (SD x sqrt(sum of squared weights)).
    Background: the median of the plane over ``window_px`` around the peak.
    Only small windows around the peaks are read, so it is cheap.
    """
    planes = np.asarray(stack)
    if planes.ndim == 2:
        planes = planes[None]
    n = len(peak_yx)
    if n == 0:
        return np.zeros(0)
    r = max(int(np.ceil(3 * sigma_px)), 1)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / max(sigma_px, 1e-6)) ** 2)
    g /= g.sum()
    noise = np.array([pixel_noise(p[::4]) for p in planes]) * smoothing_gain(sigma_px)
    w = max(window_px, r + 1)
    yy = np.clip(peak_yx[:, 0][:, None] + np.arange(-w, w + 1)[None], 0, planes.shape[1] - 1)  # (n, 2w+1)
    xx = np.clip(peak_yx[:, 1][:, None] + np.arange(-w, w + 1)[None], 0, planes.shape[2] - 1)
    patch = planes[:, yy[:, :, None], xx[:, None, :]].astype(np.float32)  # (Z, n, 2w+1, 2w+1)
    bg = np.median(patch.reshape(patch.shape[0], n, -1), axis=-1)  # (Z, n)
    core = patch[:, :, w - r - 1: w + r + 2, w - r - 1: w + r + 2]  # the 3 x 3 around the peak, with the kernel's reach
    smooth_y = np.stack([np.tensordot(core[:, :, k: k + 2 * r + 1, :], g, axes=([2], [0])) for k in range(3)], 2)
    smooth = np.stack([np.tensordot(smooth_y[..., k: k + 2 * r + 1], g, axes=([3], [0])) for k in range(3)], 3)
    score = (smooth.max(axis=(2, 3)) - bg) / noise[:, None]  # (Z, n)
    return score.max(0)


def smoothing_gain(sigma_px: float) -> float:
    """Factor by which a Gaussian of ``sigma_px`` (truncated at 3 sigma) scales white pixel noise.

    A separable kernel g x g scales it by sqrt(sum of its squared weights), which is sum(g²).
    """
    if sigma_px <= 0:
        return 1.0
    r = max(int(np.ceil(3 * sigma_px)), 1)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    g /= g.sum()
    return float(np.sum(g * g))


def block_noise(image: NDArray, block_px: int) -> NDArray[np.float32]:
    """One pixel's noise SD per block (as :func:`pixel_noise`: neighbour differences, robust to structure),
    bilinear between block centres."""
    h, w = image.shape
    b = max(4, min(int(block_px), h, w))
    hh, ww = max(h // b, 1), max(w // b, 1)
    d = np.diff(np.asarray(image[: hh * b, : ww * b + 1], np.float32), axis=-1)
    if d.shape[1] < ww * b:  # the block grid reaches the last column: it repeats its neighbour's difference
        d = np.concatenate([d, d[:, -1:]], axis=1)
    blocks = d.reshape(hh, b, ww, b).transpose(0, 2, 1, 3).reshape(hh, ww, b * b)
    med = np.median(blocks, axis=-1)
    mad = np.median(np.abs(blocks - med[..., None]), axis=-1) * np.float32(1.4826 / np.sqrt(2))
    return expand_blocks(mad, b, (h, w), smooth=True)


def significance_threshold(n_tests: float, alpha: float = 0.01) -> float:
    """The Gaussian SD that noise alone exceeds with probability ``alpha`` somewhere among ``n_tests`` tries."""
    return float(stats.norm.isf(alpha / max(n_tests, 1.0)))


def keep_particles(found: Particles, keep: NDArray[np.bool_]) -> Particles:
    """``found`` with only the objects where ``keep`` (one per object) is true, relabelled 1..k in order."""
    lut = np.zeros(len(keep) + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    regions = lut[found.regions]
    per_object = [v[keep] if len(v) == len(keep) else v for v in (found.height, found.score)]
    return Particles(regions, found.signal & (regions > 0), found.peak_yx[keep], found.point_var_px, *per_object)


def _label_max(values: NDArray, labels: NDArray, n: int) -> NDArray[np.float32]:
    """Maximum of ``values`` over each label 0..n (label 0 and empty labels: -inf); cheap for sparse labels."""
    out = np.full(n + 1, -np.inf, np.float32)
    where = np.flatnonzero(labels)
    np.maximum.at(out, labels.ravel()[where], values.ravel()[where])
    return out


def cell_labels(
    cytoplasm: NDArray,
    threshold: float,
    organelles: NDArray[np.bool_] | None,
    min_area_px: float,
    split_depth_px: float,
    seeds: NDArray | None = None,
) -> NDArray[np.int32]:
    """Cells in a cytoplasm image: foreground above ``threshold`` (and organelle pixels), filled, split.

    Touching cells are split by a watershed of the distance to the background,
    seeded by the distance maxima that stand at least ``split_depth_px`` above
    the saddle to any higher one (a lobe of one cell is shallower than the neck
    between two), or by ``seeds`` (labelled nuclei) when a nuclear stain exists.
    Pieces smaller than ``min_area_px`` are dropped unless the image border cuts
    them (those are counted as excluded, so they are kept down to a tenth).
    """
    fg = cytoplasm > threshold
    if organelles is not None:
        fg |= organelles
    if seeds is not None:
        fg |= seeds > 0  # a nucleus is part of its cell
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=2))
    fg = drop_small(fg, 0.1 * min_area_px)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    if seeds is not None and np.any(seeds[fg]):
        markers = measure.label((seeds > 0) & fg)
    else:
        peaks = morphology.h_maxima(ndi.gaussian_filter(dist, 1.0), max(split_depth_px, 1.0))
        markers = measure.label(peaks & fg)
    labels = segmentation.watershed(-dist, markers, mask=fg)
    # components the markers missed keep their own label
    lost = fg & (labels == 0)
    if lost.any():
        extra = measure.label(lost)
        labels = np.where(lost, extra + labels.max(), labels)
    labels, _, _ = segmentation.relabel_sequential(labels.astype(np.int32))
    sizes = np.bincount(labels.ravel())
    border = np.zeros(len(sizes), bool)
    border[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    keep = (sizes >= min_area_px) | (border & (sizes >= 0.1 * min_area_px))
    keep[0] = False
    lut = np.zeros(len(sizes), np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


@dataclass(frozen=True)
class Cells:
    """Cells of a field and the block-level cytoplasm behind them.

    ``labels`` is full resolution; ``coarse_labels``, ``cytoplasm`` (Z, y, x;
    0 = background, 1 = cytoplasm plateau) and ``threshold`` are on blocks of
    ``block`` pixels, where per-plane cell volume is measured.
    """

    labels: NDArray[np.int32]
    coarse_labels: NDArray[np.int32]
    cytoplasm: NDArray[np.float32]
    threshold: float
    block: int


def _disk(radius: float) -> NDArray[np.bool_]:
    r = max(int(round(radius)), 1)
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    return yy * yy + xx * xx <= r * r + 0.5


def pixel_noise(image: NDArray) -> float:
    """SD of one pixel's noise, from differences of horizontal neighbours (robust: most neighbours see the same
    structure)."""
    d = np.diff(np.asarray(image, np.float32), axis=-1)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def _class_levels(image: NDArray) -> tuple[float, float]:
    """Background and foreground levels of a two-class image: the medians of its Otsu classes."""
    t = threshold_value(image, "otsu")
    lo, hi = image[image <= t], image[image > t]
    if lo.size == 0 or hi.size == 0:
        return float(np.min(image)), float(np.max(image)) + 1e-6
    return float(np.median(lo)), float(np.median(hi))


def segment_cells(
    backgrounds: list[NDArray],
    shape: tuple[int, int],
    block: int,
    method: str,
    min_diameter_px: float,
    organelles: NDArray[np.bool_] | None = None,
    nuclei: NDArray | None = None,
    closing_radius_blocks: float = 2.0,
    noise_sd: list[float] | None = None,
    contrast: float = 5.0,
) -> Cells:
    """Cells from the top-hat backgrounds (the cytoplasm) of the organelle channels, on blocks.

    Each channel's block-level planes are scaled so its background is 0 and
    its cytoplasm 1 (medians of the Otsu classes of its projection), the
    channels are averaged, and the projection is thresholded (``method``): a
    cell is where some plane holds cytoplasm. ``organelles`` (full resolution,
    e.g. Li masks of the organelle channels) count as cell too where they are
    dense (closed over ``closing_radius_blocks``); a channel counts only if its
    cytoplasm stands ``contrast`` block noise SDs (``noise_sd``: one pixel's,
    per channel) above its background, so bare glass yields no cells; ``nuclei`` (a
    block-level projection of a nuclear stain) seed the split of touching cells.
    """
    norm = []
    for planes, sd in zip(backgrounds, noise_sd or [0.0] * len(backgrounds)):
        lo, hi = _class_levels(planes.max(0))
        # a channel whose two classes are no further apart than the noise of a block shows no cells (bare glass)
        if hi - lo > contrast * sd / block:
            norm.append((planes - np.float32(lo)) / np.float32(hi - lo))
    if not norm:
        empty = np.zeros(backgrounds[0].shape[-2:], np.int32)
        return Cells(np.zeros(shape, np.int32), empty, np.zeros(backgrounds[0].shape, np.float32), float("inf"), block)
    cytoplasm = np.mean(norm, axis=0, dtype=np.float32)
    projection = cytoplasm.max(0)
    threshold = threshold_value(projection, method)
    organelles_c = None
    if organelles is not None:
        # organelles closer than two top-hat radii belong to one stretch of cytoplasm
        organelles_c = ndi.binary_closing(block_mean(organelles, block) > 0.1, _disk(closing_radius_blocks))
    d = min_diameter_px / block
    seeds = None
    if nuclei is not None:
        # one seed per nucleus: filled (chromatin is patchy), specks under a tenth of the smallest cell dropped
        seeds = ndi.binary_fill_holes(ndi.binary_opening(nuclei > threshold_value(nuclei, "otsu")))
        seeds = drop_small(seeds, 0.1 * np.pi * (d / 2) ** 2)
    coarse = cell_labels(projection, threshold, organelles_c, np.pi * (d / 2) ** 2, d / 4, seeds)
    labels = np.ascontiguousarray(expand_blocks(coarse, block, shape), dtype=np.int32)
    return Cells(labels, coarse, cytoplasm, threshold, block)


def enhance_planes(planes: NDArray, background: NDArray, block: int, sigma_px: float) -> NDArray[np.float32]:
    """White top-hat then Gaussian, plane by plane: each plane minus its (block-level) opening, smoothed in-plane.

    The background is interpolated between block centres as it is subtracted,
    a band of rows at a time, so no full-resolution copy of it is made.
    """
    out = np.array(planes, np.float32)
    h, w = out.shape[-2:]
    bx = _lerp_axis(np.asarray(background, np.float32), background.ndim - 1, w, block)  # (..., hy, w)
    n = bx.shape[-2]
    padded = np.concatenate([bx[..., :1, :], bx, bx[..., -1:, :]], axis=-2)
    rows = min(h // block, n)
    body = out[..., : rows * block, :].reshape(out.shape[:-2] + (rows, block, w))
    for j in range(block):
        d = (j - (block - 1) / 2) / block
        near = 1 if d < 0 else 0
        w_first = np.float32(-d if d < 0 else 1 - d)
        band = padded[..., 1 - near: 1 - near + rows, :] * w_first
        band += padded[..., 2 - near: 2 - near + rows, :] * (np.float32(1) - w_first)
        body[..., j, :] -= band
    if h > rows * block:
        out[..., rows * block:, :] -= bx[..., -1:, :]
    if sigma_px > 0:
        out = ndi.gaussian_filter(out, (0,) * (out.ndim - 2) + (sigma_px, sigma_px), truncate=3.0)
    return out
