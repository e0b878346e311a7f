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


def _polarity(image: NDArray[np.float64], lattice: Lattice) -> float:
    """+1 if etched marks (bars, glyphs) are brighter than the clear glass, -1 if darker."""
    h, w = image.shape
    step = max(1, int(max(h, w) // 400))
    yy, xx = np.mgrid[0:h:step, 0:w:step]
    uv = lattice.to_lattice(np.stack([xx.ravel(), yy.ravel()], 1))
    frac = np.abs(uv - np.round(uv))
    f1, f2 = lattice.families
    half_bar = 0.5 * np.array([f1.bar_width_px / f1.pitch_px, f2.bar_width_px / f2.pitch_px])
    on_bar = (frac < 0.8 * half_bar).any(1)
    clear = (frac > 1.6 * half_bar).all(1)
    values = image[::step, ::step].ravel()
    if on_bar.sum() < 10 or clear.sum() < 10:
        return -1.0
    return 1.0 if np.median(values[on_bar]) > np.median(values[clear]) else -1.0


def _square_patch(image: NDArray[np.float64], lattice: Lattice, uv: NDArray[np.int64], size_px: int) -> NDArray[np.float64]:
    """The square at lattice index uv resampled to size x size, axes along +u (columns) and +v (rows)."""
    t = (np.arange(size_px) + 0.5) / size_px  # 0..1 across the square
    uu, vv = np.meshgrid(uv[0] + t, uv[1] + t, indexing="xy")
    xy = lattice.to_pixels(np.stack([uu.ravel(), vv.ravel()], 1))
    values = ndi.map_coordinates(image, [xy[:, 1], xy[:, 0]], order=1, mode="nearest")
    return values.reshape(size_px, size_px)


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


GLYPH_SIZE = 20
"""Side of the square each character is resampled to before comparison."""


def _normalise(crop: NDArray[np.float64]) -> NDArray[np.float64] | None:
    """Zero-mean, unit-norm GLYPH_SIZE x GLYPH_SIZE version of a character crop (None if blank)."""
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side))
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
    zoom = GLYPH_SIZE / side
    small = ndi.zoom(square, zoom, order=1, prefilter=False)[:GLYPH_SIZE, :GLYPH_SIZE]
    if small.shape != (GLYPH_SIZE, GLYPH_SIZE):
        small = np.pad(small, [(0, GLYPH_SIZE - small.shape[0]), (0, GLYPH_SIZE - small.shape[1])])
    small = small - small.mean()
    norm = float(np.linalg.norm(small))
    return None if norm == 0 else (small / norm).ravel()


@lru_cache(maxsize=64)
def _template_matrix(chars: str, height_px: int) -> NDArray[np.float64]:
    """One row per character: its normalised ink crop."""
    rows = []
    for char in chars:
        ink = char_template(char, height_px).astype(np.float64)
        ys, xs = np.nonzero(ink > 0.5)
        rows.append(_normalise(ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    return np.array(rows)


def _glyph_crops(oriented: NDArray[np.float64], height_px: int) -> list[NDArray[np.float64]] | None:
    """Ink of the label's characters, left to right, from the middle of an upright square patch.

    Characters are the largest ink components in the label box; None when
    fewer than two plausible characters are found (covered, damaged, blank).
    """
    h, w = oriented.shape
    box = int(height_px * 1.6)
    top, left = max(0, h // 2 - box // 2), max(0, w // 2 - int(box * 0.9))
    region = oriented[top : top + box, left : left + int(box * 1.8)]
    lo, hi = np.percentile(region, [5, 99.5])
    if hi - lo <= 0:
        return None
    ink = np.clip((region - lo) / (hi - lo), 0, 1)
    mask = ink > 0.5
    labels, n = ndi.label(mask)
    if n < 2:
        return None
    sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1]
    expected = 0.12 * height_px * height_px
    chosen = [int(i) + 1 for i in order[:2] if sizes[i] > 0.25 * expected]
    if len(chosen) < 2:
        return None
    slices = ndi.find_objects(labels)
    boxes = [slices[i - 1] for i in chosen]
    heights = [b[0].stop - b[0].start for b in boxes]
    if min(heights) < 0.6 * height_px or max(heights) > 1.4 * height_px:
        return None
    boxes.sort(key=lambda b: b[1].start)
    return [ink[b] for b in boxes]


def _square_scores(
    patch: NDArray[np.float64], columns: str, rows: str, height_px: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Correlation of the square's two characters with every column and row character, per orientation."""
    col_t = _template_matrix(columns, height_px)
    row_t = _template_matrix(rows, height_px)
    col_scores = np.zeros((len(ORIENTATIONS), len(columns)))
    row_scores = np.zeros((len(ORIENTATIONS), len(rows)))
    readable = False
    for g, orientation in enumerate(ORIENTATIONS):
        crops = _glyph_crops(_orient(patch, orientation), height_px)
        if crops is None:
            continue
        first, second = (_normalise(c) for c in crops)
        if first is None or second is None:
            continue
        readable = True
        col_scores[g] = col_t @ first
        row_scores[g] = row_t @ second
    return (col_scores, row_scores) if readable else None


def read_labels(
    image: NDArray,
    lattice: Lattice,
    pixel_size_um: float,
    scheme: GridScheme,
    label_height_um: float,
    *,
    uppercase: bool = True,
) -> tuple[FieldLabelling | None, dict[tuple[int, int], NDArray[np.float64]]]:
    """Choose the field's labelling; also return per-square reading scores for reporting.

    Returns (None, scores) when no square can be read (for example only bar
    crossings and no square interior in view).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=2)
    pitch_px = float(np.mean([f.pitch_px for f in lattice.families]))
    size = int(round(scheme.pitch_um / READ_UM_PER_PX))
    smooth = READ_UM_PER_PX / pixel_size_um / 2.5
    if smooth > 0.5:
        img = ndi.gaussian_filter(img, smooth)
    sign = _polarity(img, lattice)
    height_px = max(8, int(round(label_height_um / READ_UM_PER_PX)))
    columns = scheme.columns.upper() if uppercase else scheme.columns
    rows = scheme.rows.upper() if uppercase else scheme.rows

    # Squares whose label box is wholly inside the image.
    label_half = 0.5 * label_height_um / scheme.pitch_um * pitch_px * 1.8
    indices, centres = lattice.square_centres(margin_px=label_half)
    col_scores: list[NDArray[np.float64]] = []
    row_scores: list[NDArray[np.float64]] = []
    read: list[NDArray[np.int64]] = []
    per_square: dict[tuple[int, int], NDArray[np.float64]] = {}
    for uv in indices:
        patch = sign * _square_patch(img, lattice, uv, size)
        scores = _square_scores(patch, columns, rows, height_px)
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
