"""Etched label glyphs of a gridded coverslip, as cached coverage bitmaps.

Geometry (shared with the SEM overview in :mod:`.em_overview`): the label text
set in DejaVu Sans Bold, scaled so the ink's bounding box is
``SpecimenParams.label_height_um`` tall, centred on the square's centre, glyphs
upright in the dish frame (x right, y down). Bitmaps are rendered once per
label with matplotlib's Agg rasteriser (anti-aliased, holes of 0/A/B/D right)
and sampled by the renderers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from .world import World

__all__ = ["GLYPH_PX_PER_HEIGHT", "glyph_bitmap", "label_text", "glyph_coverage"]

GLYPH_PX_PER_HEIGHT = 256
"""Bitmap rows per label height: 0.47 µm per bitmap pixel for 120 µm labels."""


@lru_cache(maxsize=1024)
def glyph_bitmap(text: str) -> np.ndarray:
    """Coverage (0..1, float32) of ``text``; rows = label height in GLYPH_PX_PER_HEIGHT, centred ink box."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import PathPatch
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    path = TextPath((0, 0), text, size=1.0, prop=FontProperties(family="DejaVu Sans", weight="bold"))
    # the ink box of the flattened outlines (Bezier control points overshoot the curves)
    polys = path.to_polygons(closed_only=True)
    allp = np.concatenate(polys) if polys else np.zeros((1, 2))
    lo, hi = allp.min(0), allp.max(0)
    cap = hi[1] - lo[1]
    n = GLYPH_PX_PER_HEIGHT
    w_px = int(np.ceil((hi[0] - lo[0]) / cap * n)) + 4
    h_px = n + 4
    fig = Figure(figsize=(w_px / 100, h_px / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    # data units = bitmap pixels, y up in matplotlib; the bitmap comes back y down
    scale = n / cap
    tr = Affine2D().translate(-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2).scale(scale).translate(w_px / 2, h_px / 2)
    ax.add_patch(PathPatch(tr.transform_path(path), facecolor="black", edgecolor="none", antialiased=True))
    ax.set_xlim(0, w_px)
    ax.set_ylim(0, h_px)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return (1.0 - rgba[..., 0].astype(np.float32) / 255.0).copy()


def label_text(world: "World", column: int, row: int) -> str:
    """The characters etched in square (column, row), in the case they are printed on the glass."""
    text = world.grid.label(column, row)
    return text.upper() if world.params.labels_uppercase else text


def glyph_coverage(world: "World", xs: np.ndarray, ys: np.ndarray, blur_px: float = 0.0) -> np.ndarray:
    """Glyph ink coverage on the axis-aligned pixel lattice xs (columns) x ys (rows), dish µm.

    ``xs`` and ``ys`` are increasing 1D arrays of pixel-centre coordinates;
    ``blur_px`` is the sd (output pixels) of an optical blur applied around each label.
    """
    out = np.zeros((len(ys), len(xs)), np.float32)
    grid = world.grid
    pitch = grid.pitch_um
    height = world.params.label_height_um
    ncol, nrow = grid.shape
    c0, c1 = int(np.floor(xs[0] / pitch)), int(np.floor(xs[-1] / pitch))
    r0, r1 = int(np.floor(ys[0] / pitch)), int(np.floor(ys[-1] / pitch))
    for c in range(max(c0, 0), min(c1, ncol - 1) + 1):
        for r in range(max(r0, 0), min(r1, nrow - 1) + 1):
            bmp = glyph_bitmap(label_text(world, c, r))
            um_per_px = height / GLYPH_PX_PER_HEIGHT
            cx, cy = (c + 0.5) * pitch, (r + 0.5) * pitch
            half_w, half_h = bmp.shape[1] * um_per_px / 2, bmp.shape[0] * um_per_px / 2
            jj = np.flatnonzero((xs > cx - half_w) & (xs < cx + half_w))
            ii = np.flatnonzero((ys > cy - half_h) & (ys < cy + half_h))
            if len(jj) == 0 or len(ii) == 0:
                continue
            # bitmap pixel centres sit at (k + 0.5) * um_per_px from the bitmap's top-left corner
            bx = (xs[jj] - (cx - half_w)) / um_per_px - 0.5
            by = (ys[ii] - (cy - half_h)) / um_per_px - 0.5
            pixel = xs[1] - xs[0] if len(xs) > 1 else um_per_px
            src = bmp
            if pixel > 1.5 * um_per_px:  # area-average before point sampling when pixels are coarser
                src = ndimage.uniform_filter(bmp, size=int(round(pixel / um_per_px)))
            byy, bxx = np.meshgrid(by, bx, indexing="ij")
            vals = ndimage.map_coordinates(src, [byy, bxx], order=1, mode="constant", cval=0.0)
            if blur_px > 0.3:
                pad = int(np.ceil(3 * blur_px))
                ii0, ii1 = max(ii[0] - pad, 0), min(ii[-1] + pad + 1, len(ys))
                jj0, jj1 = max(jj[0] - pad, 0), min(jj[-1] + pad + 1, len(xs))
                local = np.zeros((ii1 - ii0, jj1 - jj0), np.float32)
                local[ii[0] - ii0 : ii[-1] - ii0 + 1, jj[0] - jj0 : jj[-1] - jj0 + 1] = vals
                local = ndimage.gaussian_filter(local, blur_px, mode="constant")
                np.maximum(out[ii0:ii1, jj0:jj1], local, out=out[ii0:ii1, jj0:jj1])
            else:
                out[np.ix_(ii, jj)] = np.maximum(out[np.ix_(ii, jj)], vals)
    return out
