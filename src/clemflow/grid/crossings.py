"""Measure each bar crossing on its own, so the grid fit has residuals and a predicted error.

The lattice gives every crossing from two global line families; that hides
local errors. Here each crossing is re-measured from the bar edges in a window
around it: the projection of the window's edges across each bar direction
gives the bar's local centre, and the two local centres give the crossing.
A crossing covered by a cell or debris has no clean edge pairs and is left
as predicted only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from .lattice import Lattice

__all__ = ["MeasuredCrossing", "measure_crossings"]

Float = NDArray[np.float64]


@dataclass(frozen=True)
class MeasuredCrossing:
    uv: tuple[int, int]
    predicted_xy: tuple[float, float]
    measured_xy: tuple[float, float] | None  # None when the bars are not clean around it
    evidence: float  # weaker of the two edge-pair contrasts, robust SDs


def _edge_centre(profile: Float, centre: float, width: float) -> tuple[float, float] | None:
    """Midpoint of the two edge peaks nearest centre -/+ width/2, and their weaker height."""
    if not np.isfinite(profile).any():
        return None
    base = np.nanmedian(profile)
    d = np.nan_to_num(profile - base, nan=0.0)
    noise = float(np.median(np.abs(d))) * 1.4826 + 1e-9
    edges, heights = [], []
    reach = max(2, int(width / 3))
    for side in (-1, 1):
        guess = int(round(centre + side * width / 2))
        lo, hi = max(0, guess - reach), min(len(d) - 1, guess + reach)
        if hi <= lo:
            return None
        window = d[lo : hi + 1]
        peak = float(window.max())
        weight = np.clip(window - 0.5 * peak, 0, None)
        if peak <= 0 or weight.sum() <= 0:
            return None
        edges.append(lo + float(np.sum(weight * np.arange(len(window))) / weight.sum()))
        heights.append(peak / noise)
    return (edges[0] + edges[1]) / 2, min(heights)


def measure_crossings(image: NDArray, lattice: Lattice, min_evidence: float = 4.0) -> list[MeasuredCrossing]:
    """Re-measure every crossing inside the image from its local bar edges."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=2)
    f1, f2 = lattice.families
    width = float(np.mean([f1.bar_width_px, f2.bar_width_px]))
    pitch = float(np.mean([f1.pitch_px, f2.pitch_px]))
    sigma = max(1.0, width / 20)
    pad = int(3 * sigma) + 1
    half = int(min(0.35 * pitch, 3 * width))
    idx, xy = lattice.crossings(margin_px=half)
    out: list[MeasuredCrossing] = []
    h, w = img.shape
    for (u, v), (x, y) in zip(idx, xy):
        x0, x1 = int(max(0, x - half)), int(min(w, x + half + 1))
        y0, y1 = int(max(0, y - half)), int(min(h, y + half + 1))
        py0, py1, px0, px1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
        local = ndi.gaussian_gradient_magnitude(img[py0:py1, px0:px1], sigma)
        patch = local[y0 - py0 : y0 - py0 + (y1 - y0), x0 - px0 : x0 - px0 + (x1 - x0)]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        rel_x, rel_y = xx - x, yy - y
        centres, evidence = [], []
        for fam, other in ((f1, f2), (f2, f1)):
            n = fam.normal
            along = rel_x * n[0] + rel_y * n[1]  # across this family's bar
            across_other = rel_x * other.normal[0] + rel_y * other.normal[1]
            # Leave out the other bar's arm, whose edges run across this projection.
            keep = (np.abs(across_other) > 0.75 * width) & (rel_x**2 + rel_y**2 <= half**2)
            bins = np.round(along[keep]).astype(int) + half
            profile = np.bincount(bins, patch[keep], minlength=2 * half + 1)
            counts = np.bincount(bins, minlength=2 * half + 1)
            prof = np.where(counts > 0, profile / np.maximum(counts, 1), np.nan)
            found = _edge_centre(prof, half, width)
            if found is None:
                break
            centres.append(found[0] - half)
            evidence.append(found[1])
        measured = None
        score = min(evidence) if len(evidence) == 2 else 0.0
        if len(centres) == 2 and score >= min_evidence:
            a = np.vstack([f1.normal, f2.normal])
            shift = np.linalg.solve(a, np.array(centres))
            measured = (float(x + shift[0]), float(y + shift[1]))
        out.append(MeasuredCrossing((int(u), int(v)), (float(x), float(y)), measured, float(score)))
    return out

