"""The block surface ahead of the face, as the electron beam sees it above the face edge.

Rows of an electron frame above the face's top edge (v < 0 in the face
frame) look past the edge onto the top surface of the block, foreshortened:
a surface point ``d`` µm ahead of the face shows ``FACE_RISE_PER_S d`` above
the edge (see :mod:`.view`). It is drawn as the protective cap's low-contrast
grain (a periodic tile anchored to the site's face frame, so it is the same
slice after slice but for the noise) plus every milled pit still ahead of the
face (a fiducial, a pit beyond the face): dark inside, with bright rims.
A pit the face has milled into shows only the part still ahead of it.

Grey levels go through the renderer's detector model (``_detect``: the same
dose, shot noise and inverted display as the face), with the frame's defocus
blur, so the surface band is one image with the face below it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ..specimen.em import _detect, detected_electrons
from ..specimen.em_imperfections import EMImperfections, apply_blur, blur_sigmas_nm
from .view import FACE_RISE_PER_S, ElectronView

__all__ = ["CAP_DENSITY", "PIT_DENSITY", "RIM_DENSITY", "RIM_UM", "pits_ahead", "render_surface_band"]

CAP_DENSITY = 0.5  # the cap surface: mid grey in the inverted display
CAP_GRAIN = 0.04  # SD of its grain (density): low contrast, well below the face's
PIT_DENSITY = 0.9  # a pit's floor and walls: dark
RIM_DENSITY = -0.45  # added at a pit's edge: the bright rim (edge effect)
RIM_UM = 0.03  # width (SD) of the rim in the image plane, at least 1.5 pixels
TEXEL_UM = 0.01
TILE = 1024  # texels: the grain repeats every 10.24 µm


@lru_cache(maxsize=4)
def _grain_tile(seed: int) -> NDArray[np.float32]:
    """Periodic grain of unit SD: fine (~20 nm) plus a coarser mottle (~150 nm)."""
    rng = np.random.default_rng([seed, 5323])
    fine = ndimage.gaussian_filter(rng.standard_normal((TILE, TILE)), 2.0, mode="wrap")
    coarse = ndimage.gaussian_filter(rng.standard_normal((TILE, TILE)), 15.0, mode="wrap")
    tile = fine / fine.std() + 0.8 * coarse / coarse.std()
    return (tile / tile.std()).astype(np.float32)


def _sample_tile(tile: NDArray[np.float32], u_um: NDArray, s_um: NDArray) -> NDArray[np.float32]:
    """Bilinear, periodic lookup at (u, s) µm (broadcastable arrays; a row of u and a column of s, the
    unrotated case, is done separably: rows of the tile first, then columns)."""
    fu = np.asarray(u_um, np.float64) / TEXEL_UM
    fs = np.asarray(s_um, np.float64) / TEXEL_UM
    iu, is_ = np.floor(fu), np.floor(fs)
    a, b = (fu - iu).astype(np.float32), (fs - is_).astype(np.float32)
    iu0, is0 = iu.astype(np.int64) % TILE, is_.astype(np.int64) % TILE
    iu1, is1 = (iu0 + 1) % TILE, (is0 + 1) % TILE
    if fu.ndim == 2 and fs.ndim == 2 and fu.shape[0] == 1 and fs.shape[1] == 1:
        rows = tile[is0[:, 0]] * (1 - b) + tile[is1[:, 0]] * b  # (n, TILE)
        return rows[:, iu0[0]] * (1 - a) + rows[:, iu1[0]] * a
    top = tile[is0, iu0] * (1 - a) + tile[is0, iu1] * a
    bot = tile[is1, iu0] * (1 - a) + tile[is1, iu1] * a
    return top * (1 - b) + bot * b


def pits_ahead(pits_block_um: list[list[float]], origin_um: tuple[float, float], axes: NDArray,
               face_s_um: float) -> list[tuple[float, float, float, float]]:
    """Milled pits (block x0, y0, x1, y1) reaching beyond the face, as (u0, u1, s0, s1) in the face frame."""
    out = []
    o = np.asarray(origin_um, float)
    m, u = np.asarray(axes[0][:2], float), np.asarray(axes[1][:2], float)
    for x0, y0, x1, y1 in pits_block_um:
        corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) - o
        ss, uu = corners @ m, corners @ u
        if ss.max() <= face_s_um + 1e-3:
            continue  # milled away by the face (or behind it: the trench, the slices)
        out.append((float(uu.min()), float(uu.max()), float(ss.min()), float(ss.max())))
    return out


def _pit_distance(u: NDArray, s: NDArray, pits: list[tuple[float, float, float, float]], reach_um: float,
                  shape: tuple[int, int]) -> NDArray[np.float32]:
    """Signed distance (µm in the image plane, > 0 outside) to the union of the pits; +inf far away.

    ``u``/``s`` broadcast to ``shape``; when they are a row and a column (no scan rotation) each pit is
    evaluated only over its bounding box.
    """
    dist = np.full(shape, np.inf, np.float32)
    separable = u.shape[0] == 1 and s.shape[1] == 1
    for u0, u1, s0, s1 in pits:
        reach_s = reach_um / FACE_RISE_PER_S
        if separable:
            r = np.nonzero((s[:, 0] > s0 - reach_s) & (s[:, 0] < s1 + reach_s))[0]
            c = np.nonzero((u[0] > u0 - reach_um) & (u[0] < u1 + reach_um))[0]
            if len(r) == 0 or len(c) == 0:
                continue
            box = (slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))
            uu, ss = u[:, box[1]], s[box[0], :]
        else:
            box = (slice(None), slice(None))
            uu, ss = u, s
        du = np.abs(uu - (u0 + u1) / 2) - (u1 - u0) / 2
        ds = (np.abs(ss - (s0 + s1) / 2) - (s1 - s0) / 2) * FACE_RISE_PER_S
        outside = np.hypot(np.maximum(du, 0), np.maximum(ds, 0)) + np.minimum(np.maximum(du, ds), 0)
        np.minimum(dist[box], outside.astype(np.float32), out=dist[box])
    return dist


def render_surface_band(view: ElectronView, *, pits: list[tuple[float, float, float, float]], grain_seed: int,
                        imperfections: EMImperfections, dwell_s: float, line_averaging: int, current_pa: float,
                        detector: str, noise_seed: int) -> tuple[slice, NDArray[np.float32], NDArray[np.float32]] | None:
    """Grey levels (8-bit scale, float) of the frame rows that see the surface, and their weight.

    Returns ``(rows, grey, weight)`` with ``grey``/``weight`` of shape (len(rows), width); ``weight`` is 1
    above the face edge and falls to 0 across it (one pixel), 0 where the face shows. None if no row of the
    frame reaches above the edge.
    """
    p = view.pixel_um
    cols = np.arange(view.width)[None, :]
    corner_rows = np.array([[0], [view.height - 1]])
    _, v_corners = view.pixel_uv(corner_rows, np.array([[0, view.width - 1]]))
    if float(v_corners.min()) >= 0.5 * p:
        return None
    # the band: rows 0..last where some pixel is above the edge (v increases down the frame for |rotation| < 90)
    _, v_first_col = view.pixel_uv(np.arange(view.height)[:, None], np.array([[0, view.width - 1]]))
    above = np.nonzero(v_first_col.min(axis=1) < 0.5 * p)[0]
    if len(above) == 0:
        return None
    rows = slice(int(above.min()), int(above.max()) + 1)
    u, v = view.pixel_uv(np.arange(rows.start, rows.stop)[:, None], cols)
    shape = (rows.stop - rows.start, view.width)
    weight = np.clip(0.5 - v / p, 0.0, 1.0).astype(np.float32)
    s = view.face_s_um - np.minimum(v, 0.0) / FACE_RISE_PER_S  # the surface point seen (at the edge: the face's s)
    dens = np.float32(CAP_DENSITY) + np.float32(CAP_GRAIN) * np.broadcast_to(
        _sample_tile(_grain_tile(grain_seed), u, s), shape)
    if pits:
        rim = max(RIM_UM, 1.5 * p)
        d = _pit_distance(u, s, pits, 4 * rim + p, shape)
        inside = np.clip(0.5 - d / p, 0.0, 1.0)
        dens = dens + inside * (np.float32(PIT_DENSITY) - dens)
        dens = dens + np.float32(RIM_DENSITY) * np.exp(-0.5 * (d / rim) ** 2)
    dens = np.ascontiguousarray(dens, np.float32)
    if imperfections.any_blur and max(blur_sigmas_nm(imperfections)[:2]) > 0.3 * p * 1e3:  # below: invisible
        dens, _ = apply_blur(dens, imperfections, p * 1e3)
    rng = np.random.default_rng([abs(int(noise_seed)), 8087])
    grey = _detect(dens, detected_electrons(dwell_s, line_averaging, current_pa), rng, detector)
    return rows, grey, weight
