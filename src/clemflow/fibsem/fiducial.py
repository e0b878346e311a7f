"""Fiducial tracking: find the milled "+" mark again in each electron frame.

The engine mills a fiducial on the block surface ahead of the face; with the
beams fixed on the sample it stays put in the electron image, so wherever it
appears to have moved is drift (stage, beam, charging) to be undone by beam
shift. Matching is normalised cross-correlation (NCC) of a band-passed
template in a window around where the mark is expected, refined to sub-pixel
by a quadratic fit to the correlation peak.

Conventions: pixel coordinates are ``(x, y)`` = (column, row) with the centre
of the top-left pixel at (0, 0); frames are 2-D arrays indexed ``[row, col]``.
The band-pass (a light Gaussian against shot noise, minus a wide Gaussian
against brightness gradients from charging) is applied to the frame around
the patch before cropping, identically at capture and at search, and NCC is
invariant to gain and offset, so similarity does not care about
brightness/contrast drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy import fft as sfft

__all__ = [
    "FiducialCandidate",
    "FiducialMatch",
    "FiducialTemplate",
    "LowContrastError",
    "capture_template",
    "cross_template",
    "find_fiducial_candidates",
    "locate_fiducial",
    "normalized_cross_correlation",
]

SMOOTH_PX = 1.0
"""Gaussian sigma (px) against shot noise; small enough to keep a sharp correlation peak."""
BACKGROUND_PX = 12.0
"""Gaussian sigma (px) of the removed background: slow brightness gradients (charging) do not count."""
MIN_CONTRAST = 1.5
"""Least band-passed patch contrast, in units of the band-passed noise, that a template may have."""


class LowContrastError(ValueError):
    """The patch has too little structure above the noise to be tracked reliably."""


@dataclass(frozen=True, eq=False)  # holds an array: compared by identity
class FiducialTemplate:
    """A band-passed, mean-removed, unit-norm patch and where it was captured.

    ``center_px`` is the exact centre (x, y) of the patch in the frame it came
    from (the patch is cut on whole pixels, so it may differ from the
    requested centre by up to half a pixel). ``pixel_size_m`` is that frame's
    pixel size (``None`` when unknown); the template only matches frames of
    the same pixel size. ``smooth_px`` / ``background_px`` are the band-pass
    used, applied again to every searched frame.
    """

    image: NDArray[np.float32]
    center_px: tuple[float, float]
    pixel_size_m: float | None = None
    smooth_px: float = SMOOTH_PX
    background_px: float = BACKGROUND_PX
    contrast: float = math.nan

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True)
class FiducialMatch:
    """Where the template was found in a frame.

    ``position_px``: sub-pixel (x, y) of the template centre in the frame;
    ``offset_px`` = position - template.center_px (how far the mark moved
    since capture); ``similarity``: NCC at the peak, in [-1, 1] (1 = same
    pattern up to gain and offset); ``peak_ratio``: peak NCC over the
    highest other local maximum outside the peak (>= 1 when the match is
    unambiguous, capped at 100); ``at_edge``: the peak lies on the border of
    the searched region (the mark may be beyond ``search_radius_px``: do not
    trust it); ``expected_px``: where the search was centred.
    """

    position_px: tuple[float, float]
    offset_px: tuple[float, float]
    similarity: float
    peak_ratio: float
    at_edge: bool
    expected_px: tuple[float, float]

    def ok(self, min_similarity: float) -> bool:
        """The match can be trusted at this similarity threshold."""
        return self.similarity >= min_similarity and not self.at_edge


@dataclass(frozen=True)
class FiducialCandidate:
    """A "+" found without a template: centre (x, y) px and its NCC with the synthetic cross."""

    position_px: tuple[float, float]
    score: float


# -- band-pass and NCC ----------------------------------------------------------------------


def _as_2d(frame: ArrayLike) -> NDArray[np.generic]:
    """The frame as an array, unconverted: only the searched region is turned into float32."""
    a = np.asarray(frame)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {a.shape}")
    return a


def _blur(region: NDArray[np.float32], sigma: float) -> NDArray[np.float32]:
    """Gaussian blur; wide ones as three box passes (same variance), whose cost does not grow with sigma."""
    if sigma <= 8:
        return ndimage.gaussian_filter(region, sigma, mode="reflect")
    width = int(round(math.sqrt(4 * sigma * sigma + 1))) | 1
    out = region
    for _ in range(3):
        out = ndimage.uniform_filter(out, width, mode="reflect")
    return out


def _bandpass(region: NDArray[np.float32], smooth_px: float, background_px: float) -> NDArray[np.float32]:
    fine = _blur(region, smooth_px) if smooth_px > 0 else region
    if background_px > 0:
        return (fine - _blur(region, background_px)).astype(np.float32)
    return fine.astype(np.float32)


def _margin(background_px: float, smooth_px: float) -> int:
    return int(math.ceil(3 * max(background_px, smooth_px)))


def _bandpassed_crop(
    frame: NDArray[np.generic], x0: int, y0: int, x1: int, y1: int, smooth_px: float, background_px: float
) -> NDArray[np.float32]:
    """Band-pass the frame around [y0:y1, x0:x1] (with a margin where the frame allows) and crop it."""
    m = _margin(background_px, smooth_px)
    h, w = frame.shape
    ax0, ay0, ax1, ay1 = max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)
    filtered = _bandpass(frame[ay0:ay1, ax0:ax1].astype(np.float32), smooth_px, background_px)
    return filtered[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]


def normalized_cross_correlation(window: NDArray[np.floating], template: NDArray[np.floating]) -> NDArray[np.float64]:
    """NCC of `template` at every placement wholly inside `window` ("valid" mode).

    Element [i, j] is the NCC with the template's top-left corner at row i,
    column j. Placements where the window is flat (no variance) score 0.
    """
    win = np.asarray(window, np.float64)
    tpl = np.asarray(template, np.float64)
    th, tw = tpl.shape
    if win.shape[0] < th or win.shape[1] < tw:
        raise ValueError(f"window {win.shape} smaller than template {tpl.shape}")
    tpl = tpl - tpl.mean()
    tnorm = math.sqrt(float((tpl * tpl).sum()))
    if tnorm == 0:
        raise LowContrastError("template is flat")
    num = _correlate_valid(win, tpl)
    # local sums of the window and its square over each placement, by cumulative sums
    c1 = _box_sum(win, th, tw)
    c2 = _box_sum(win * win, th, tw)
    n = th * tw
    var = c2 - c1 * c1 / n
    scale = max(float(np.abs(win).max()) ** 2 * n, 1e-300)
    ok = var > 1e-9 * scale
    out = np.zeros_like(num)
    out[ok] = num[ok] / (np.sqrt(var[ok]) * tnorm)
    return np.clip(out, -1.0, 1.0)


def _box_sum(a: NDArray[np.float64], th: int, tw: int) -> NDArray[np.float64]:
    c = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    c[1:, 1:] = a.cumsum(0).cumsum(1)
    return c[th:, tw:] - c[:-th, tw:] - c[th:, :-tw] + c[:-th, :-tw]


def _subpixel_peak(ncc: NDArray[np.float64], r: int, c: int) -> tuple[float, float]:
    """Peak (row, col) refined by a quadratic through the 3 x 3 neighbourhood (separable vertex)."""

    def vertex(m1: float, p0: float, p1: float) -> float:
        den = m1 - 2 * p0 + p1
        if den >= 0:  # not a maximum along this axis
            return 0.0
        return float(np.clip(0.5 * (m1 - p1) / den, -0.5, 0.5))

    h, w = ncc.shape
    dr = vertex(ncc[r - 1, c], ncc[r, c], ncc[r + 1, c]) if 0 < r < h - 1 else 0.0
    dc = vertex(ncc[r, c - 1], ncc[r, c], ncc[r, c + 1]) if 0 < c < w - 1 else 0.0
    return r + dr, c + dc


def _second_peak(ncc: NDArray[np.float64], r: int, c: int, exclusion: float) -> float:
    """Highest local maximum of `ncc` farther than `exclusion` px from (r, c)."""
    size = max(3, int(2 * exclusion // 3) | 1)
    local = ndimage.maximum_filter(ncc, size=size, mode="nearest") == ncc
    rows, cols = np.nonzero(local)
    far = (rows - r) ** 2 + (cols - c) ** 2 > exclusion**2
    vals = ncc[rows[far], cols[far]]
    return float(vals.max()) if vals.size else -1.0


# -- template ------------------------------------------------------------------------------


def _size_wh(size_px: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size_px, int | np.integer):
        return int(size_px), int(size_px)
    w, h = size_px
    return int(w), int(h)


def _noise_sigma(region: NDArray[np.float32]) -> float:
    """Robust pixel-noise estimate from differences of neighbouring lines (MAD)."""
    d = np.diff(region, axis=0).ravel()  # across scan lines: independent noise
    mad = float(np.median(np.abs(d - np.median(d))))
    return mad / (0.6745 * math.sqrt(2.0))


def capture_template(
    frame: ArrayLike,
    center_px: tuple[float, float],
    size_px: int | tuple[int, int],
    *,
    pixel_size_m: float | None = None,
    smooth_px: float = SMOOTH_PX,
    background_px: float = BACKGROUND_PX,
    min_contrast: float = MIN_CONTRAST,
) -> FiducialTemplate:
    """Cut a template of `size_px` (int or (w, h)) centred on `center_px` (x, y) from `frame`.

    Refuses (``LowContrastError``) a patch whose band-passed structure is
    below `min_contrast` x the band-passed pixel noise (a blank area, a
    blanked beam), and ``ValueError`` a patch not wholly inside the frame.
    """
    img = _as_2d(frame)
    w, h = _size_wh(size_px)
    if w < 8 or h < 8:
        raise ValueError(f"template of {w} x {h} px is too small (at least 8 x 8)")
    x0 = int(round(center_px[0] - (w - 1) / 2))
    y0 = int(round(center_px[1] - (h - 1) / 2))
    if x0 < 0 or y0 < 0 or x0 + w > img.shape[1] or y0 + h > img.shape[0]:
        raise ValueError(
            f"a {w} x {h} px template at ({center_px[0]:.1f}, {center_px[1]:.1f}) does not fit in the "
            f"{img.shape[1]} x {img.shape[0]} frame"
        )
    patch = _bandpassed_crop(img, x0, y0, x0 + w, y0 + h, smooth_px, background_px)
    patch = patch - patch.mean()
    noise = _noise_sigma(img[y0 : y0 + h, x0 : x0 + w].astype(np.float32))
    # the light Gaussian divides white noise's sigma by about 2 sqrt(pi) sigma
    noise_bp = noise / max(1.0, 2 * math.sqrt(math.pi) * smooth_px)
    std = float(patch.std())
    contrast = std / noise_bp if noise_bp > 0 else (math.inf if std > 0 else 0.0)
    if not contrast >= min_contrast or std == 0:
        raise LowContrastError(
            f"the patch at ({center_px[0]:.1f}, {center_px[1]:.1f}) has too little contrast to track "
            f"(structure {contrast:.2f} x noise, need {min_contrast:.2f}): is the fiducial there and the beam on?"
        )
    norm = float(np.sqrt((patch.astype(np.float64) ** 2).sum()))
    image = (patch / norm).astype(np.float32)
    center = (x0 + (w - 1) / 2, y0 + (h - 1) / 2)
    return FiducialTemplate(image, center, pixel_size_m, smooth_px, background_px, contrast)


# -- locate --------------------------------------------------------------------------------


def locate_fiducial(
    template: FiducialTemplate,
    frame: ArrayLike,
    expected_px: tuple[float, float] | None = None,
    search_radius_px: float = 100.0,
    *,
    pixel_size_m: float | None = None,
) -> FiducialMatch:
    """Find `template` in `frame` within `search_radius_px` of `expected_px` (default: where it was captured).

    Searches placements within +- radius in x and in y of the expected
    centre (a square), clipped to the frame. If less than the template fits, returns a match
    with similarity 0 at the expected position (``at_edge`` True). Raises
    ``ValueError`` when `pixel_size_m` is given and differs from the
    template's by more than 1 %.
    """
    img = _as_2d(frame)
    if pixel_size_m is not None and template.pixel_size_m is not None:
        if abs(pixel_size_m / template.pixel_size_m - 1) > 0.01:
            raise ValueError(
                f"frame pixel size {pixel_size_m * 1e9:.3g} nm differs from the template's "
                f"{template.pixel_size_m * 1e9:.3g} nm: capture a new template"
            )
    ex, ey = template.center_px if expected_px is None else (float(expected_px[0]), float(expected_px[1]))
    tw, th = template.size_px
    rad = int(math.ceil(max(0.0, search_radius_px)))
    # top-left corner of the template at the expected position, then +- rad
    cx0 = int(round(ex - (tw - 1) / 2))
    cy0 = int(round(ey - (th - 1) / 2))
    H, W = img.shape
    x0, y0 = max(0, cx0 - rad), max(0, cy0 - rad)
    x1, y1 = min(W, cx0 + rad + tw), min(H, cy0 + rad + th)
    if x1 - x0 < tw or y1 - y0 < th:
        return FiducialMatch((ex, ey), (ex - template.center_px[0], ey - template.center_px[1]), 0.0, 0.0, True,
                             (ex, ey))
    window = _bandpassed_crop(img, x0, y0, x1, y1, template.smooth_px, template.background_px)
    ncc = normalized_cross_correlation(window, template.image)
    r, c = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    peak = float(ncc[r, c])
    rr, cc = _subpixel_peak(ncc, int(r), int(c))
    px = x0 + cc + (tw - 1) / 2
    py = y0 + rr + (th - 1) / 2
    h, w = ncc.shape
    at_edge = (r == 0 and y0 > 0) or (c == 0 and x0 > 0) or (r == h - 1 and y1 < H) or (c == w - 1 and x1 < W)
    second = _second_peak(ncc, int(r), int(c), exclusion=max(3.0, 0.25 * min(tw, th)))
    ratio = min(100.0, peak / max(second, 0.01)) if peak > 0 else 0.0
    offset = (px - template.center_px[0], py - template.center_px[1])
    return FiducialMatch((float(px), float(py)), (float(offset[0]), float(offset[1])), peak, float(ratio),
                         bool(at_edge), (ex, ey))


# -- first capture without a template ------------------------------------------------------


Size = float | tuple[float, float]


def _pair(v: Size) -> tuple[float, float]:
    if isinstance(v, tuple | list):
        return float(v[0]), float(v[1])
    return float(v), float(v)


def cross_template(arm_length_px: Size, arm_width_px: Size, *, polarity: Literal["dark", "bright"] = "dark",
                   rim_px: float = 0.0) -> NDArray[np.float32]:
    """A synthetic "+" of two bars on a flat ground, -1 inside for a dark mark.

    Sizes are px, a number or (x, y) for a foreshortened cross:
    ``arm_length_px = (length of the horizontal bar, length of the vertical
    bar)``, ``arm_width_px = (width of the vertical bar, width of the
    horizontal bar)``. A "+" milled on the block surface and seen by the SEM
    at 54 degrees is shortened in y by cos(54) = 0.588. Pixels on an edge
    take the covered fraction, so sizes need not be whole pixels. `rim_px` >
    0 adds a bright rim (+0.5) of that width around the bars (a pit's edge).
    The array has odd sides with the centre on its middle pixel.
    """
    lx, ly = _pair(arm_length_px)
    wx, wy = _pair(arm_width_px)
    if min(lx, ly) < 3 or min(wx, wy) < 1:
        raise ValueError("a cross needs arms at least 3 px long and 1 px wide")
    sw = int(math.ceil(lx + 4 * rim_px + 4)) | 1
    sh = int(math.ceil(ly + 4 * rim_px + 4)) | 1
    dx = np.abs(np.arange(sw, dtype=np.float32) - (sw - 1) / 2)[None, :]
    dy = np.abs(np.arange(sh, dtype=np.float32) - (sh - 1) / 2)[:, None]

    def cover(d: NDArray[np.float32], half: float) -> NDArray[np.float32]:
        # fraction of each pixel (centre d, width 1) inside [-half, half]: sub-pixel sizes count
        return np.clip(np.minimum(d + 0.5, half) - np.maximum(d - 0.5, -half), 0.0, 1.0)

    def bars(grow: float) -> NDArray[np.float32]:
        horizontal = cover(dx, lx / 2 + grow) * cover(dy, wy / 2 + grow)
        vertical = cover(dx, wx / 2 + grow) * cover(dy, ly / 2 + grow)
        return np.maximum(horizontal, vertical)

    inside = bars(0.0)
    out = -inside
    if rim_px > 0:
        out += 0.5 * (bars(rim_px) - inside)
    out = out.astype(np.float32)
    return out if polarity == "dark" else -out


def find_fiducial_candidates(
    frame: ArrayLike,
    arm_length_px: Size,
    arm_width_px: Size,
    *,
    polarity: Literal["dark", "bright", "any"] = "dark",
    rim_px: float = 0.0,
    region_px: tuple[int, int, int, int] | None = None,
    max_candidates: int = 3,
    min_score: float = 0.3,
    smooth_px: float = SMOOTH_PX,
    background_px: float | None = None,
) -> list[FiducialCandidate]:
    """Find "+" marks of the given arm length and width (px) without a template, best first.

    A matched filter: NCC of the band-passed frame with a band-passed
    synthetic cross (:func:`cross_template`: sizes as there, (x, y) for a
    foreshortened one), peaks at least half an arm length apart, scores at
    least `min_score`. `region_px` = (x0, y0, x1, y1)
    limits the search (e.g. the rows above the face edge). Use it right
    after milling the fiducial, then :func:`capture_template` at the best
    candidate for tracking. `background_px` defaults to the shorter arm / 2
    (wide enough to keep the bars, narrow enough to drop charging gradients).
    """
    img = _as_2d(frame)
    H, W = img.shape
    x0, y0, x1, y1 = region_px if region_px is not None else (0, 0, W, H)
    x0, y0, x1, y1 = max(0, int(x0)), max(0, int(y0)), min(W, int(x1)), min(H, int(y1))
    lx, ly = _pair(arm_length_px)
    bg = min(lx, ly) / 2 if background_px is None else background_px
    cross = cross_template((lx, ly), arm_width_px, polarity="bright" if polarity == "bright" else "dark",
                           rim_px=rim_px)
    pad = _margin(bg, smooth_px)
    kernel = _bandpass(np.pad(cross, pad), smooth_px, bg)[pad:-pad, pad:-pad]
    th, tw = kernel.shape
    if x1 - x0 < tw or y1 - y0 < th:
        return []
    window = _bandpassed_crop(img, x0, y0, x1, y1, smooth_px, bg)
    ncc = normalized_cross_correlation(window, kernel)
    score = np.abs(ncc) if polarity == "any" else ncc
    size = max(3, int(min(lx, ly) / 2) | 1)
    peaks = (ndimage.maximum_filter(score, size=size, mode="constant", cval=-np.inf) == score) & (score >= min_score)
    rows, cols = np.nonzero(peaks)
    order = np.argsort(score[rows, cols])[::-1][: max(0, max_candidates)]
    found = []
    for k in order:
        rr, cc = _subpixel_peak(score, int(rows[k]), int(cols[k]))
        found.append(FiducialCandidate((float(x0 + cc + (tw - 1) / 2), float(y0 + rr + (th - 1) / 2)),
                                       float(score[rows[k], cols[k]])))
    return found


def _correlate_valid(window: np.ndarray, template: np.ndarray) -> np.ndarray:
    """sum(window[i + a, j + b] * template[a, b]) for every placement inside the window ("valid" mode).

    Circular correlation by FFT at the window's size: placements inside the window never wrap.
    scipy.fft rather than scipy.signal.fftconvolve: the same numbers, and no 0.6 s scipy.signal import at
    every start of the engine.
    """
    shape = [sfft.next_fast_len(int(n), real=True) for n in window.shape]
    spectrum = sfft.rfft2(window, shape) * np.conj(sfft.rfft2(template, shape))
    full = sfft.irfft2(spectrum, shape)
    return full[: window.shape[0] - template.shape[0] + 1, : window.shape[1] - template.shape[1] + 1]
