"""Find the etched grid's bars in an image: two bar directions, their lines, and the lattice.

Works the same on transmitted/reflected light overviews and on SEM images of
the block surface, because it looks only at what both show: the two edges of
each bar, a known distance apart, running straight across the field. Cells,
debris and scratches have edges too, but not pairs of long parallel ones at the
bar width, so they score low.

Method: gradient-magnitude edge map at a working scale where a bar is about
ten pixels wide; for each angle, the profile of the edge map projected across
the bar direction (a Radon projection); an edge-pair filter at the bar width on
that profile; the two best directions about 90 degrees apart; then bar centre
lines with sub-pixel offsets, and the pitch and phase of each family by a
least-squares fit of the integer lattice to the detected bars. Crossings hidden
by cells are predicted from the fitted lines.

Image coordinates: x to the right, y down, the centre of the top-left pixel at
(0, 0). A bar family is described by its normal angle theta (degrees from +x
towards +y) and the signed distances rho of its centre lines from the image
centre along that normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

__all__ = ["BarFamily", "GridNotFound", "Lattice", "find_lattice"]

Float = NDArray[np.float64]

EDGE_SIGMA = 1.0
"""Gaussian of the edge map (working pixels): wide enough to merge the double response of a thin ridge
(SEM shows bar edges as bright or dark lines, light microscopes as steps)."""

MIN_PAIR_SCORE = 5.0
"""Edge-pair response, in robust SDs of the profile, that a bar must reach."""


class GridNotFound(Exception):
    """No grid in the image; the message says why (for `{"found": false, "reason": ...}`)."""


@dataclass(frozen=True)
class BarFamily:
    """Parallel bars: normal angle, and centre lines rho_k = phase + k * pitch (full-resolution px)."""

    angle_deg: float
    pitch_px: float
    phase_px: float
    bar_width_px: float
    detected_k: tuple[int, ...]
    strengths: tuple[float, ...]
    residual_px: float

    @property
    def normal(self) -> Float:
        t = math.radians(self.angle_deg)
        return np.array([math.cos(t), math.sin(t)])

    def rho(self, k: float) -> float:
        return self.phase_px + k * self.pitch_px


@dataclass(frozen=True)
class Lattice:
    """Two bar families in one image, and the affine map between pixels and lattice coordinates.

    Lattice coordinates (u, v): u counts bars of the first family, v of the
    second; integer (u, v) are crossings and half-integers are square centres.
    """

    shape: tuple[int, int]
    families: tuple[BarFamily, BarFamily]
    score: float
    observed: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    @property
    def center(self) -> Float:
        h, w = self.shape
        return np.array([(w - 1) / 2.0, (h - 1) / 2.0])

    def _matrix(self) -> tuple[Float, Float]:
        """A (2x2) and b with (u, v) = A @ (x, y) + b."""
        f1, f2 = self.families
        a = np.vstack([f1.normal / f1.pitch_px, f2.normal / f2.pitch_px])
        b = -a @ self.center - np.array([f1.phase_px / f1.pitch_px, f2.phase_px / f2.pitch_px])
        return a, b

    def to_lattice(self, xy: Float) -> Float:
        a, b = self._matrix()
        return np.asarray(xy, float) @ a.T + b

    def to_pixels(self, uv: Float) -> Float:
        a, b = self._matrix()
        return (np.asarray(uv, float) - b) @ np.linalg.inv(a).T

    def crossings(self, margin_px: float = 0.0) -> tuple[NDArray[np.int64], Float]:
        """Integer lattice indices (N, 2) and pixel positions (N, 2) of crossings inside the image."""
        return self._points_inside(0.0, margin_px)

    def square_centres(self, margin_px: float = 0.0) -> tuple[NDArray[np.int64], Float]:
        """Lattice indices (of the square's lower-index corner) and pixel centres of squares inside the image."""
        return self._points_inside(0.5, margin_px)

    def _points_inside(self, offset: float, margin: float) -> tuple[NDArray[np.int64], Float]:
        h, w = self.shape
        corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
        uv = self.to_lattice(corners)
        lo, hi = np.floor(uv.min(0)) - 1, np.ceil(uv.max(0)) + 1
        uu, vv = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        idx = np.stack([uu.ravel(), vv.ravel()], 1)
        xy = self.to_pixels(idx + offset)
        inside = (xy[:, 0] >= margin) & (xy[:, 0] <= w - 1 - margin) & (xy[:, 1] >= margin) & (xy[:, 1] <= h - 1 - margin)
        return idx[inside].astype(np.int64), xy[inside]


# -- edge map and projections --------------------------------------------------


def _downsample(image: Float, factor: int) -> Float:
    if factor <= 1:
        return image
    h, w = (s // factor * factor for s in image.shape)
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _edge_map(image: Float, sigma: float) -> Float:
    """Gradient magnitude in robust z-units, clipped so that no single strong feature dominates.

    Taken at `sigma` and at 1.5 x `sigma`, whichever stands out more: the fine scale keeps faint
    step edges sharp (light microscopy, real SEM), the coarse one merges the double response of a
    thin bright or dark ridge (bar edges in a shaded SEM image).
    """
    best = None
    for s in (sigma, 1.5 * sigma):
        grad = ndi.gaussian_gradient_magnitude(image, s)
        median = float(np.median(grad))
        mad = float(np.median(np.abs(grad - median))) * 1.4826 + 1e-9
        z = np.clip((grad - median) / mad, 0.0, 6.0)
        best = z if best is None else np.maximum(best, z)
    return best


class _Projector:
    """Projections of an edge map across lines at any angle, normalised by pixels per bin."""

    def __init__(self, edges: Float, bin_px: float = 1.0, mask: NDArray[np.bool_] | None = None) -> None:
        h, w = edges.shape
        self.edges = edges
        yy, xx = np.mgrid[0:h, 0:w]
        self.x = (xx - (w - 1) / 2.0).ravel()
        self.y = (yy - (h - 1) / 2.0).ravel()
        keep = edges.ravel() > 1.0  # strong edges only: bars are strong, and fewer points project faster
        if mask is not None:
            keep &= mask.ravel()
        self.weights = edges.ravel()[keep]
        # Each pixel covers an area; spreading its position over that area (a fixed jitter) keeps the
        # projections of the pixel lattice from combing the profile at rational slopes.
        jitter = np.random.default_rng(0).uniform(-0.5, 0.5, (2, int(keep.sum())))
        self.xk, self.yk = self.x[keep] + jitter[0], self.y[keep] + jitter[1]
        if mask is not None:  # normalise by the pixels of the mask only
            self.x, self.y = self.x[mask.ravel()], self.y[mask.ravel()]
        self.bin = bin_px
        self.half = int(math.ceil(math.hypot(h, w) / 2 / bin_px)) + 2
        # Pixel counts per bin vary smoothly with angle; a subsample is enough to normalise.
        step = max(1, int(len(self.x) // 20000))
        self.xs, self.ys, self.count_scale = self.x[::step], self.y[::step], float(step)

    def profile(self, angle_deg: float) -> tuple[Float, NDArray[np.bool_]]:
        t = math.radians(angle_deg)
        c, s = math.cos(t), math.sin(t)
        n = 2 * self.half + 1
        rho = (self.xk * c + self.yk * s) / self.bin + self.half
        i0 = np.floor(rho).astype(np.int64)
        frac = rho - i0
        total = np.bincount(i0, self.weights * (1 - frac), minlength=n + 1)[: n + 1]
        total[1:] += np.bincount(i0, self.weights * frac, minlength=n + 1)[: n]
        rho_s = (self.xs * c + self.ys * s) / self.bin + self.half
        j0 = np.floor(rho_s).astype(np.int64)
        frac_s = rho_s - j0
        counts = np.bincount(j0, 1 - frac_s, minlength=n + 1)[: n + 1]
        counts[1:] += np.bincount(j0, frac_s, minlength=n + 1)[:n]
        counts = ndi.uniform_filter1d(counts * self.count_scale, 5)
        valid = counts > 0.25 * counts.max()
        return np.where(valid, total / np.maximum(counts, 1.0), 0.0), valid


def _detrend(profile: Float, valid: NDArray[np.bool_], width: float) -> tuple[Float, float]:
    """Profile minus its slowly varying baseline, and the robust SD of what remains."""
    base = ndi.median_filter(profile, size=max(9, int(3 * width) | 1), mode="nearest")
    d = np.where(valid, profile - base, 0.0)
    sd = float(np.median(np.abs(d[valid]))) * 1.4826 + 1e-9 if valid.any() else 1.0
    return d, sd


def _pair_response(d: Float, sd: float, valid: NDArray[np.bool_], width: float) -> Float:
    """Geometric mean of the two edge peaks a bar of `width` makes, in robust SDs of the profile."""
    idx = np.arange(len(d), dtype=float)
    left = np.interp(idx - width / 2, idx, d)
    right = np.interp(idx + width / 2, idx, d)
    r = np.sqrt(np.clip(left, 0, None) * np.clip(right, 0, None)) / sd
    inner = ndi.binary_erosion(valid, iterations=int(width) + 2)
    return np.where(inner, r, 0.0)


def _best_pair(profile: Float, valid: NDArray[np.bool_], widths: Float) -> tuple[float, float, Float]:
    """(best score, its width, response at that width) over candidate bar widths."""
    d, sd = _detrend(profile, valid, float(np.max(widths)))
    best = (-1.0, float(widths[0]), np.zeros_like(profile))
    for width in widths:
        r = _pair_response(d, sd, valid, float(width))
        score = float(r.max())
        if score > best[0]:
            best = (score, float(width), r)
    return best


# -- peaks and lattice fit -----------------------------------------------------


def _peaks(response: Float, min_separation: float, threshold: float) -> list[tuple[float, float]]:
    """(sub-pixel position, height) of local maxima above threshold, strongest first, non-maximum suppressed."""
    size = max(3, int(min_separation) | 1)
    local_max = (response == ndi.maximum_filter(response, size=size)) & (response >= threshold)
    found = []
    for i in np.flatnonzero(local_max):
        if 0 < i < len(response) - 1:
            a, b, c = response[i - 1], response[i], response[i + 1]
            denom = a - 2 * b + c
            offset = 0.5 * (a - c) / denom if denom < 0 else 0.0
            found.append((i + float(np.clip(offset, -0.5, 0.5)), float(b)))
    found.sort(key=lambda p: -p[1])
    kept: list[tuple[float, float]] = []
    for pos, height in found:
        if all(abs(pos - k) >= min_separation for k, _ in kept):
            kept.append((pos, height))
    return kept


def _fit_family(
    peaks: list[tuple[float, float]],
    expected_pitch: float,
    pitch_known: bool,
    tolerance: float,
    max_pitch_change: float = 0.15,
) -> tuple[float, float, list[int], list[float], float]:
    """Pitch, phase, lattice indices and strengths of the bars that fit one lattice; residual RMS.

    Bars are assigned lattice indices from the expected pitch, then the lattice
    is fitted by least squares (weighted by strength squared) and the worst bar
    is dropped while any misses the fit by more than `tolerance` (a bar cut by
    the image border or a scratch parallel to the bars).
    """
    ref = peaks[0][0]
    pos = np.array([p for p, _ in peaks])
    weight = np.array([s for _, s in peaks]) ** 2
    k = np.round((pos - ref) / expected_pitch)
    keep = np.abs(pos - ref - k * expected_pitch) < 0.12 * expected_pitch
    pitch, phase = expected_pitch, ref
    while True:
        ks, ps, ws = k[keep], pos[keep], weight[keep]
        if len(np.unique(ks)) >= 2:
            a = np.vstack([np.ones(len(ks)), ks]).T * np.sqrt(ws)[:, None]
            sol, *_ = np.linalg.lstsq(a, ps * np.sqrt(ws), rcond=None)
            phase, pitch = float(sol[0]), float(sol[1])
            if pitch_known and abs(pitch / expected_pitch - 1) > max_pitch_change:
                pitch = expected_pitch
                phase = float(np.average(ps - ks * pitch, weights=ws))
        else:
            phase = float(np.average(ps - ks * pitch, weights=ws))
        resid = np.where(keep, pos - phase - k * pitch, 0.0)
        worst = int(np.argmax(np.abs(resid)))
        # With the pitch known, even one bar fixes the family; without it, two are needed.
        if abs(resid[worst]) <= tolerance or keep.sum() <= (1 if pitch_known else 2):
            break
        keep[worst] = False
    ks, ps, ws = k[keep], pos[keep], weight[keep]
    resid = ps - phase - ks * pitch
    rms = float(np.sqrt(np.average(resid**2, weights=ws)))
    return pitch, phase, [int(v) for v in ks], [float(np.sqrt(v)) for v in ws], rms


# -- the detector ---------------------------------------------------------------


def _variance_peaks(projector: _Projector, angles: Float, count: int) -> list[float]:
    """The `count` angles whose projections are most concentrated, at least 8 degrees apart.

    Candidates are local maxima of the variance, so one strong scratch fills one slot, not several.
    """
    variance = np.array([float(np.var(p[v])) if v.any() else 0.0 for p, v in map(projector.profile, angles)])
    order = np.argsort(variance)[::-1]
    chosen: list[float] = []
    for i in order:
        if all(abs(((angles[i] - c) + 90) % 180 - 90) >= 8 for c in chosen):
            chosen.append(float(angles[i]))
        if len(chosen) == count:
            break
    return chosen


def _best_pair_of_directions(scored: list[tuple], width_known: bool) -> list[tuple] | None:
    """Two refined directions 65-115 degrees apart, bars of about equal width, best by the weaker score.

    A scratch or a seam is a single strong line; a grid is two families of
    equally wide bars, so a pair is only as good as its weaker member.
    """
    best, best_score = None, MIN_PAIR_SCORE
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            a, b = scored[i], scored[j]
            apart = abs(((a[0] - b[0]) + 90) % 180 - 90)
            ratio = a[2] / b[2]
            score = min(a[1], b[1])
            same_width = width_known or 0.6 < ratio < 1.67  # a known width already bounds both
            if apart >= 65 and same_width and score >= best_score:
                best, best_score = [a, b], score
    return best


def _refine_angle(projector: _Projector, angle: float, span: float, step: float) -> float:
    """Angle that concentrates the edges most: the variance of the projection peaks when lines align."""
    angles = angle + np.arange(-span, span + step / 2, step)
    scores = []
    for a in angles:
        profile, valid = projector.profile(a)
        scores.append(float(np.var(profile[valid])) if valid.any() else 0.0)
    scores_a = np.array(scores)
    i = int(np.argmax(scores_a))
    if 0 < i < len(angles) - 1:
        a, b, c = scores_a[i - 1 : i + 2]
        denom = a - 2 * b + c
        if denom < 0:
            return float(angles[i] + step * float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5)))
    return float(angles[i])


def find_lattice(
    image: NDArray,
    bar_width_px: float | None,
    pitch_px: float | None,
    *,
    pitch_tolerance: float = 0.08,
) -> Lattice:
    """Detect the grid's two bar families; raise GridNotFound with a reason when there is no grid.

    `bar_width_px` and `pitch_px` are the expected sizes in pixels of this image
    (from the scheme and the pixel size); either may be None when unknown, and
    is then estimated.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=2)
    if img.ndim != 2 or min(img.shape) < 32:
        raise GridNotFound(f"image of shape {np.shape(image)} is too small or not a 2D image")
    if float(img.std()) == 0.0:
        raise GridNotFound("the image is blank (constant)")

    expected_width = bar_width_px if bar_width_px else min(img.shape) / 12
    factor = max(1, int(expected_width // 20), int(math.ceil(max(img.shape) / 1024)))
    coarse_factor = max(factor, int(math.ceil(max(img.shape) / 512)))
    if bar_width_px:
        lo, hi = 0.75 * bar_width_px, 1.35 * bar_width_px
    else:
        lo, hi = max(12.0, 6.0 * factor), max(img.shape) / 6

    # Candidate directions: where the edge projection is most concentrated (Radon variance).
    coarse = _Projector(_edge_map(_downsample(img, coarse_factor), max(1.0, EDGE_SIGMA * factor / coarse_factor)))
    angles = np.arange(0.0, 180.0, 1.0)
    candidates = _variance_peaks(coarse, angles, count=10)

    # Each candidate scored for bars (edge pairs at the bar width) at the working scale; the best few
    # are refined. Variance alone ranks a scratch or a seam as high as a bar.
    work = _downsample(img, factor)
    fine = _Projector(_edge_map(work, EDGE_SIGMA), bin_px=0.5)
    widths_f = np.unique(np.geomspace(lo / factor, hi / factor, 12)) / fine.bin  # in profile bins
    bin_full = fine.bin * factor  # full-resolution pixels per profile bin
    quick = []
    for start in candidates:
        score, angle = max((_best_pair(*fine.profile(a), widths_f[::2])[0], a) for a in (start - 0.5, start, start + 0.5))
        quick.append((score, angle))
    scored = []
    for _, start in sorted(quick, reverse=True)[:5]:
        angle = _refine_angle(fine, float(start), span=1.0, step=1.0 / 3)
        angle = _refine_angle(fine, angle, span=0.25, step=0.05)
        profile, valid = fine.profile(angle)
        score, width_bins, response = _best_pair(profile, valid, widths_f)
        scored.append((angle, score, width_bins, profile, valid, response))
    pair = _best_pair_of_directions(scored, width_known=bar_width_px is not None)
    if pair is None:
        best = max((s[1] for s in scored), default=0.0)
        raise GridNotFound(
            f"no two crossing families of bars: the strongest edge pair at the bar width scores {best:.1f}, "
            f"and a grid needs two directions 65-115 degrees apart scoring at least {MIN_PAIR_SCORE}"
        )

    edges_work = fine.edges
    families: list[BarFamily] = []
    # The stronger family first: a grid's squares are square, so its pitch is the weaker one's prior.
    for angle, score, width_bins, profile, valid, response in sorted(pair, key=lambda s: -s[1]):
        known = families[0].pitch_px / bin_full if families else None
        if families and pitch_px:
            # The labels sit in the middle of every square, so their strokes repeat at the pitch and
            # can outshine faint bars; look for the second family away from the squares' middles.
            away = _away_from_labels(edges_work.shape, families[0], factor, img.shape)
            masked = _Projector(edges_work, bin_px=fine.bin, mask=away)
            m_profile, m_valid = masked.profile(angle)
            m_score, m_width, m_response = _best_pair(m_profile, m_valid, widths_f)
            if m_score >= MIN_PAIR_SCORE:
                profile, valid, width_bins, response = m_profile, m_valid, m_width, m_response
        expected_pitch_bins = known or ((pitch_px / bin_full) if pitch_px else None)
        separation = 0.6 * expected_pitch_bins if expected_pitch_bins else 3 * width_bins
        peaks = _peaks(response, separation, MIN_PAIR_SCORE)
        peaks, width_bins = _refine_bars(profile, valid, peaks, width_bins)
        # Second pass: fit straight lines to the bars' own edge points, so that glyphs, cells and
        # debris no longer pull the angle and each bar's centre is measured along its whole length.
        to_px = lambda b: (b - fine.half) * fine.bin  # profile bins -> working pixels from the centre  # noqa: E731
        fitted = _fit_bar_edges(edges_work, angle, [to_px(c) for c, _ in peaks], width_bins * fine.bin)
        if fitted is not None:
            angle, centres_px, width_px = fitted
            strength = {i: s for i, (_, s) in enumerate(peaks)}
            peaks = [(c / fine.bin + fine.half, strength[i]) for i, c in centres_px]
            width_bins = width_px / fine.bin
        guess = expected_pitch_bins or _pitch_from_peaks(peaks) or 10 * width_bins
        pitch_b, phase_b, ks, strengths, rms_b = _fit_family(
            peaks,
            guess,
            pitch_known=expected_pitch_bins is not None,
            tolerance=max(1.0, 2.0 / bin_full),
            max_pitch_change=0.015 if known else 0.15,
        )
        families.append(
            BarFamily(
                angle_deg=float(angle % 180.0),
                pitch_px=pitch_b * bin_full,
                phase_px=(phase_b - fine.half) * bin_full + _centre_shift(img.shape, factor, angle),
                bar_width_px=width_bins * bin_full,
                detected_k=tuple(ks),
                strengths=tuple(strengths),
                residual_px=rms_b * bin_full,
            )
        )
    f1, f2 = sorted(families, key=lambda f: f.angle_deg % 180)
    for fam in (f1, f2):
        if pitch_px and abs(fam.pitch_px / pitch_px - 1) > pitch_tolerance and len(set(fam.detected_k)) >= 2:
            raise GridNotFound(
                f"bars found at {fam.angle_deg % 180:.1f} degrees are {fam.pitch_px:.1f} px apart, "
                f"not the {pitch_px:.1f} px the grid scheme and pixel size predict"
            )
    observed = frozenset((u, v) for u in f1.detected_k for v in f2.detected_k)
    return Lattice(img.shape, (f1, f2), float(min(max(f1.strengths), max(f2.strengths))), observed)


def _away_from_labels(
    shape: tuple[int, int], family: BarFamily, factor: int, full_shape: tuple[int, int]
) -> NDArray[np.bool_]:
    """Working-scale pixels near the given family's bars, i.e. outside the middle band of each square."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    # working pixel -> full-resolution position relative to the full image centre
    fh, fw = full_shape
    x = xx * factor + (factor - 1) / 2.0 - (fw - 1) / 2.0
    y = yy * factor + (factor - 1) / 2.0 - (fh - 1) / 2.0
    n = family.normal
    u = (x * n[0] + y * n[1] - family.phase_px) / family.pitch_px
    return np.abs((u % 1.0) - 0.5) > 0.22


def _fit_bar_edges(
    edges: Float, angle: float, centres_px: list[float], width_px: float, segment_widths: float = 2.0
) -> tuple[float, list[tuple[int, float]], float] | None:
    """Refine a bar family by fitting straight lines to its edges.

    Edge points near each expected edge are averaged in segments along the
    bar; one common slope and one offset per edge are fitted by least squares
    with outliers (debris, crossings, glyph strokes) dropped. Returns the
    corrected angle, (index, centre) of every bar whose two edges were both
    seen, and the median bar width; None if nothing could be fitted.
    """
    h, w = edges.shape
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = xx - (w - 1) / 2.0, yy - (h - 1) / 2.0
    strong = edges > 1.0
    segment = max(4.0, segment_widths * width_px)
    for _ in range(2):
        t = math.radians(angle)
        rho = (x * math.cos(t) + y * math.sin(t))[strong]
        along = (-x * math.sin(t) + y * math.cos(t))[strong]
        weight = edges[strong]
        points: list[tuple[int, float, float, float]] = []  # (edge id, along, rho, weight)
        edge_of: list[tuple[int, int]] = []  # edge id -> (bar index, side)
        for bar, centre in enumerate(centres_px):
            for side in (-1, 1):
                guess = centre + side * width_px / 2
                sel = np.abs(rho - guess) < max(1.5, width_px / 4)
                if sel.sum() < 10:
                    continue
                seg = np.floor(along[sel] / segment).astype(np.int64)
                seg -= seg.min()
                wsum = np.bincount(seg, weight[sel])
                rsum = np.bincount(seg, weight[sel] * rho[sel])
                asum = np.bincount(seg, weight[sel] * along[sel])
                good = wsum > 0.25 * np.median(wsum[wsum > 0])
                edge_id = len(edge_of)
                edge_of.append((bar, side))
                points += [(edge_id, a / s, r / s, s) for a, r, s in zip(asum[good], rsum[good], wsum[good])]
        if len(edge_of) < 2 or len(points) < 6:
            return None
        pts = np.array(points)
        ids = pts[:, 0].astype(int)
        keep = np.ones(len(pts), bool)
        for _ in range(3):
            design = np.zeros((keep.sum(), len(edge_of) + 1))
            design[np.arange(keep.sum()), ids[keep]] = 1.0
            design[:, -1] = pts[keep, 1]
            sw = np.sqrt(pts[keep, 3])
            sol, *_ = np.linalg.lstsq(design * sw[:, None], pts[keep, 2] * sw, rcond=None)
            resid = pts[:, 2] - sol[ids] - sol[-1] * pts[:, 1]
            mad = float(np.median(np.abs(resid[keep]))) * 1.4826
            keep = np.abs(resid) < max(0.5, 3 * mad)
        slope = float(sol[-1])
        angle = angle - math.degrees(math.atan(slope))
        offsets = {edge_of[i]: float(sol[i]) for i in range(len(edge_of)) if (ids[keep] == i).sum() >= 3}
        new_centres = list(centres_px)
        for bar in range(len(centres_px)):
            if (bar, -1) in offsets and (bar, 1) in offsets:
                new_centres[bar] = (offsets[(bar, -1)] + offsets[(bar, 1)]) / 2
        centres_px = new_centres
    paired = [bar for bar in range(len(centres_px)) if (bar, -1) in offsets and (bar, 1) in offsets]
    if not paired:
        return None
    widths = [offsets[(b, 1)] - offsets[(b, -1)] for b in paired]
    return angle, [(b, centres_px[b]) for b in paired], float(np.median(widths))


def _refine_bars(
    profile: Float, valid: NDArray[np.bool_], peaks: list[tuple[float, float]], width: float
) -> tuple[list[tuple[float, float]], float]:
    """Each bar's centre as the midpoint of its two edges, each edge located on its own.

    The pair filter finds bars robustly, but its peak drifts when the assumed
    width is off; the edges themselves give an unbiased centre and the width.
    """
    d, _ = _detrend(profile, valid, width)
    refined, widths = [], []
    reach = max(2, int(width / 4))
    for centre, strength in peaks:
        edges = []
        for side in (-1, 1):
            guess = int(round(centre + side * width / 2))
            lo, hi = max(1, guess - reach), min(len(d) - 2, guess + reach)
            if hi <= lo:
                break
            window = d[lo : hi + 1]
            # Centroid of the part above half the peak: saturated edges have flat tops.
            weight = np.clip(window - 0.5 * window.max(), 0, None)
            if weight.sum() <= 0:
                break
            edges.append(lo + float(np.sum(weight * np.arange(len(window))) / weight.sum()))
        if len(edges) == 2:
            refined.append(((edges[0] + edges[1]) / 2, strength))
            widths.append(edges[1] - edges[0])
        else:
            refined.append((centre, strength))
    return refined, float(np.median(widths)) if widths else width


def _pitch_from_peaks(peaks: list[tuple[float, float]]) -> float | None:
    """Smallest robust spacing between detected bars, when the pitch is not known."""
    if len(peaks) < 2:
        return None
    pos = np.sort([p for p, _ in peaks])
    gaps = np.diff(pos)
    return float(np.min(gaps))


def _centre_shift(shape: tuple[int, int], factor: int, angle_deg: float) -> float:
    """Rho of the downsampled image's centre measured in the full image (block means shift the origin)."""
    h, w = shape
    hs, ws = h // factor, w // factor
    cx_full, cy_full = (w - 1) / 2.0, (h - 1) / 2.0
    cx_small = ((ws - 1) / 2.0) * factor + (factor - 1) / 2.0
    cy_small = ((hs - 1) / 2.0) * factor + (factor - 1) / 2.0
    t = math.radians(angle_deg)
    return (cx_small - cx_full) * math.cos(t) + (cy_small - cy_full) * math.sin(t)
