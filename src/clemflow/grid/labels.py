"""Read the square labels and decide the labelling of the whole field at once.

Each visible square is cut out in the lattice's own frame and read in all
eight orientations the field can have (four rotations, mirrored or not): the
left character against the scheme's column characters, the right one against
its row characters, by normalised cross-correlation with rendered templates.
No single reading decides anything. The field's labelling is one choice of
orientation and offset (which square is the top-left one), scored by summing
every square's evidence for the label that choice gives it, so a smudged or
misread glyph is outvoted by its neighbours. Confidence is the margin of the
best choice over the runner-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy import fft as sfft
from scipy import ndimage as ndi

from ..protocol.grid_scheme import GridScheme
from .glyphs import char_template
from .lattice import Lattice

__all__ = ["FieldLabelling", "Orientation", "ORIENTATIONS", "read_labels"]

READ_UM_PER_PX = 3.0
"""Scale at which glyphs are compared: a 120 µm label is 40 px tall."""


@dataclass(frozen=True)
class Orientation:
    """Grid column and row steps expressed in lattice steps: (col, row) = M @ (u, v) + offset."""

    matrix: tuple[tuple[int, int], tuple[int, int]]

    @property
    def m(self) -> NDArray[np.int64]:
        return np.array(self.matrix, dtype=np.int64)


ORIENTATIONS: tuple[Orientation, ...] = tuple(
    Orientation(((a, b), (c, d)))
    for a, b, c, d in [
        (1, 0, 0, 1), (0, 1, 1, 0), (-1, 0, 0, 1), (0, -1, 1, 0),
        (1, 0, 0, -1), (0, 1, -1, 0), (-1, 0, 0, -1), (0, -1, -1, 0),
    ]
)


@dataclass(frozen=True)
class FieldLabelling:
    """The chosen labelling: lattice square (u, v) is grid square M @ (u, v) + offset."""

    orientation: Orientation
    offset: tuple[int, int]
    confidence: float
    margin: float
    squares_read: int
    agreement: float  # share of readable squares whose own best reading is the assigned label

    def square_of(self, uv: NDArray[np.int64]) -> NDArray[np.int64]:
        return np.asarray(uv) @ self.orientation.m.T + np.array(self.offset)


LABEL_REGION = 0.6
"""Share of the square (around its centre) that holds the label and is read."""


def _label_features(
    image: NDArray[np.float64], lattice: Lattice, uv: NDArray[np.int64], pitch_um: float, pixel_um: float
) -> NDArray[np.float64]:
    """Edge energy of the middle of square uv, at the reading scale, axes along +u (columns) and +v (rows).

    The middle of the square is resampled at about the image's own pixel size (an exact fraction of the
    reading scale), its edge energy computed there, then block-averaged down to the reading scale:
    averaging energy, not grey levels, keeps the fine relief outlines of SEM glyphs, whose bright and
    dark sides would cancel if the image were binned first.
    """
    factor = max(1, int(round(READ_UM_PER_PX / pixel_um)))
    size = int(round(LABEL_REGION * pitch_um / READ_UM_PER_PX))
    n = size * factor
    t = 0.5 + LABEL_REGION * ((np.arange(n) + 0.5) / n - 0.5)  # the middle of the square, 0..1 lattice units
    uu, vv = np.meshgrid(uv[0] + t, uv[1] + t, indexing="xy")
    xy = lattice.to_pixels(np.stack([uu.ravel(), vv.ravel()], 1))
    fine = ndi.map_coordinates(image, [xy[:, 1], xy[:, 0]], order=1, mode="nearest").reshape(n, n)
    energy = _edges(fine, EDGE_SIGMA * factor)
    return energy.reshape(size, factor, size, factor).mean(axis=(1, 3))


def _orient(patch: NDArray[np.float64], orientation: Orientation) -> NDArray[np.float64]:
    """View the (v rows, u columns) patch as it would look with grid columns to the right and rows down."""
    (a, b), (c, d) = orientation.matrix
    # The image axis that carries grid columns: u if a != 0 else v.
    out = patch if a != 0 else patch.T
    col_sign = a if a != 0 else b
    row_sign = d if a != 0 else c
    if col_sign < 0:
        out = out[:, ::-1]
    if row_sign < 0:
        out = out[::-1, :]
    return out


EDGE_SIGMA = 1.0
"""Blur (pixels at the reading scale) before taking edges: etched glyphs are read by their outlines,
which light microscopes (dark ink) and SEM surface images (relief shading) both show."""


def _edges(image: NDArray[np.float64], sigma: float = EDGE_SIGMA) -> NDArray[np.float64]:
    """Local edge energy: gradient and Laplacian together, so a step (dark ink) and a thin ridge
    (relief shading) both give one outline, whatever their polarity."""
    grad = ndi.gaussian_gradient_magnitude(image, sigma)
    laplace = ndi.gaussian_laplace(image, sigma) * sigma
    return np.sqrt(grad**2 + laplace**2)


@lru_cache(maxsize=64)
def _template_bank(chars: str, height_px: int) -> tuple[NDArray[np.float64], ...]:
    """Zero-mean, unit-norm edge map of each character, each in its own box."""
    maps = [_edges(char_template(char, height_px).astype(np.float64)) for char in chars]
    # Narrow characters (I, 1, J) are padded to the median width with the blank glass beside them,
    # so that they do not match the stem of every wider character.
    width = int(np.median([m.shape[1] for m in maps]))
    bank = []
    for m in maps:
        extra = max(0, width - m.shape[1])
        m = np.pad(m, ((0, 0), (extra // 2, extra - extra // 2)))
        m = m - m.mean()
        bank.append(m / np.linalg.norm(m))
    return tuple(bank)


_KERNELS: dict[tuple[int, tuple[int, int]], NDArray[np.complex128]] = {}


def _kernels(bank: tuple[NDArray[np.float64], ...], shape: tuple[int, int]) -> NDArray[np.complex128]:
    """Spectra of the flipped templates (each at the top-left corner) for one FFT size, cached."""
    key = (id(bank), shape)
    if key not in _KERNELS:
        stack = np.zeros((len(bank), *shape))
        for i, t in enumerate(bank):
            stack[i, : t.shape[0], : t.shape[1]] = t[::-1, ::-1]
        _KERNELS[key] = sfft.rfft2(stack, shape)
    return _KERNELS[key]


def _ncc_max(region: NDArray[np.float64], bank: tuple[NDArray[np.float64], ...]) -> NDArray[np.float64]:
    """Best normalised cross-correlation of each template anywhere inside `region` (one FFT for all)."""
    rh, rw = region.shape
    th_max = max(t.shape[0] for t in bank)
    tw_max = max(t.shape[1] for t in bank)
    shape = (sfft.next_fast_len(rh + th_max - 1, real=True), sfft.next_fast_len(rw + tw_max - 1, real=True))
    corr = sfft.irfft2(_kernels(bank, shape) * sfft.rfft2(region, shape)[None], shape)
    c1 = np.cumsum(np.cumsum(np.pad(region, ((1, 0), (1, 0))), 0), 1)
    c2 = np.cumsum(np.cumsum(np.pad(region**2, ((1, 0), (1, 0))), 0), 1)
    best = np.zeros(len(bank))
    for i, t in enumerate(bank):
        th, tw = t.shape
        if th > rh or tw > rw:
            continue
        s1 = c1[th:, tw:] - c1[:-th, tw:] - c1[th:, :-tw] + c1[:-th, :-tw]
        s2 = c2[th:, tw:] - c2[:-th, tw:] - c2[th:, :-tw] + c2[:-th, :-tw]
        energy = np.sqrt(np.clip(s2 - s1**2 / (th * tw), 1e-12, None))
        best[i] = float((corr[i, th - 1 : rh, tw - 1 : rw] / energy).max())
    return best


def _square_scores(
    patch: NDArray[np.float64], columns: str, rows: str, height_px: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """NCC of the label's left character with every column character and its right one with every row
    character, for each of the eight orientations (edge maps, so glyph polarity does not matter)."""
    col_bank = _template_bank(columns, height_px)
    row_bank = _template_bank(rows, height_px)
    th = max(t.shape[0] for t in col_bank + row_bank)
    tw = int(np.median([t.shape[1] for t in col_bank + row_bank]))
    edges = patch
    if edges.std() == 0:
        return None
    h, w = patch.shape
    band_h = int(th * 1.35)
    half_w = int(tw * 1.6)
    col_scores = np.zeros((len(ORIENTATIONS), len(columns)))
    row_scores = np.zeros((len(ORIENTATIONS), len(rows)))
    for g, orientation in enumerate(ORIENTATIONS):
        oriented = _orient(edges, orientation)
        top = h // 2 - band_h // 2
        band = oriented[top : top + band_h]
        left = band[:, max(0, w // 2 - half_w) : w // 2 + int(0.25 * tw)]
        right = band[:, w // 2 - int(0.25 * tw) : w // 2 + half_w]
        col_scores[g] = _ncc_max(left, col_bank)
        row_scores[g] = _ncc_max(right, row_bank)
    return col_scores, row_scores


def read_labels(
    image: NDArray,
    lattice: Lattice,
    pixel_size_um: float,
    scheme: GridScheme,
    label_height_um: float,
    *,
    uppercase: bool = True,
    max_squares: int = 9,
) -> tuple[FieldLabelling | None, dict[tuple[int, int], NDArray[np.float64]]]:
    """Choose the field's labelling; also return per-square reading scores for reporting.

    Returns (None, scores) when no square can be read (for example only bar
    crossings and no square interior in view).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=2)
    pitch_px = float(np.mean([f.pitch_px for f in lattice.families]))
    height_px = max(8, int(round(label_height_um / READ_UM_PER_PX)))
    columns = scheme.columns.upper() if uppercase else scheme.columns
    rows = scheme.rows.upper() if uppercase else scheme.rows

    # Squares whose label box is wholly inside the image.
    label_half = 0.5 * label_height_um / scheme.pitch_um * pitch_px * 1.8
    indices, centres = lattice.square_centres(margin_px=label_half)
    # The squares nearest the image centre are enough to decide the labelling, and cheaper.
    nearest = np.argsort(np.linalg.norm(centres - lattice.center, axis=1))[:max_squares]
    indices = indices[nearest]
    col_scores: list[NDArray[np.float64]] = []
    row_scores: list[NDArray[np.float64]] = []
    read: list[NDArray[np.int64]] = []
    per_square: dict[tuple[int, int], NDArray[np.float64]] = {}
    for uv in indices:
        features = _label_features(img, lattice, uv, scheme.pitch_um, pixel_size_um)
        scores = _square_scores(features, columns, rows, height_px)
        if scores is None:
            continue
        col_scores.append(scores[0])
        row_scores.append(scores[1])
        read.append(uv)
        per_square[(int(uv[0]), int(uv[1]))] = scores[0].max(1) + scores[1].max(1)
    if not read:
        return None, per_square
    return _decide(np.array(read), np.array(col_scores), np.array(row_scores), scheme), per_square


def _decide(
    uv: NDArray[np.int64], col_scores: NDArray[np.float64], row_scores: NDArray[np.float64], scheme: GridScheme
) -> FieldLabelling:
    """Best (orientation, offset) over all squares; confidence from the margin to the runner-up."""
    n_cols, n_rows = scheme.shape
    candidates: list[tuple[float, int, int, int]] = []
    for g, orientation in enumerate(ORIENTATIONS):
        base = uv @ orientation.m.T  # (N, 2) grid square minus offset
        # every offset that keeps all read squares on the grid
        c_lo, c_hi = -base[:, 0].min(), n_cols - 1 - base[:, 0].max()
        r_lo, r_hi = -base[:, 1].min(), n_rows - 1 - base[:, 1].max()
        if c_lo > c_hi or r_lo > r_hi:
            continue
        c_off = np.arange(c_lo, c_hi + 1)
        r_off = np.arange(r_lo, r_hi + 1)
        n = np.arange(len(uv))
        col_total = col_scores[n[:, None], g, base[:, 0:1] + c_off[None, :]].sum(0)  # (len c_off,)
        row_total = row_scores[n[:, None], g, base[:, 1:2] + r_off[None, :]].sum(0)
        total = col_total[:, None] + row_total[None, :]
        flat = np.argsort(total.ravel())[::-1][:3]
        for f in flat:
            i, j = np.unravel_index(f, total.shape)
            candidates.append((float(total[i, j]), g, int(c_off[i]), int(r_off[j])))
    candidates.sort(reverse=True)
    best_total, g, c0, r0 = candidates[0]
    runner_up = candidates[1][0] if len(candidates) > 1 else 0.0
    n_squares = len(uv)
    margin = (best_total - runner_up) / n_squares  # mean NCC advantage per square
    orientation = ORIENTATIONS[g]
    assigned = uv @ orientation.m.T + np.array([c0, r0])
    own_best_col = col_scores[:, g].argmax(1)
    own_best_row = row_scores[:, g].argmax(1)
    agreement = float(np.mean((own_best_col == assigned[:, 0]) & (own_best_row == assigned[:, 1])))
    mean_score = best_total / (2 * n_squares)
    confidence = float(
        np.clip(margin / 0.15, 0, 1) * np.clip((mean_score - 0.2) / 0.3, 0, 1) * (1 - math.exp(-n_squares))
    )
    return FieldLabelling(orientation, (c0, r0), confidence, float(margin), n_squares, agreement)
