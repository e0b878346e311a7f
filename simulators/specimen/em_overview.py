"""SEM overview and FIB (ion) images of the block surface, for relocation and trench placement.

After the glass is removed, the resin surface carries a relief replica of
the etched grid: bars and label glyphs stand slightly proud, and the cells'
basal sides lie right at the surface. An overview with the chamber (SE)
detector shows that relief faintly, lit from one side (one bright and one dark
edge per bar, as in shared/data/sem_mattek_grid_surface.tif), with cells as
low bumps of slightly different brightness. Images are in the EM block frame
(columns = block x, rows = block y, µm), so the mirror and rotation of
embedding show up exactly as the real instrument would see them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = ["render_sem_overview", "render_ion_image", "surface_relief", "glyph_mask"]

Float = NDArray[np.float64]


@lru_cache(maxsize=64)
def _glyph_polygons(text: str) -> list[Float]:
    """Outline polygons of a label, unit cap height, centred, y down (dish frame)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    path = TextPath((0, 0), text, size=1.0, prop=FontProperties(family="DejaVu Sans", weight="bold"))
    polys = path.to_polygons(closed_only=True)
    allp = np.concatenate(polys)
    lo, hi = allp.min(0), allp.max(0)
    cap = hi[1] - lo[1]
    centre = (lo + hi) / 2
    return [np.column_stack([(p[:, 0] - centre[0]) / cap, -(p[:, 1] - centre[1]) / cap]) for p in polys]


def glyph_mask(world: Any, x: Float, y: Float) -> NDArray[np.bool_]:
    """True where dish-frame points (x, y) fall inside an etched label glyph."""
    from matplotlib.path import Path

    grid = world.grid
    params = getattr(world, "params", None)
    height = float(getattr(params, "label_height_um", 120.0))
    upper = bool(getattr(params, "labels_uppercase", True))
    pitch = grid.pitch_um
    out = np.zeros(np.shape(x), bool)
    ncol, nrow = grid.shape
    c0, c1 = int(np.floor(np.min(x) / pitch)), int(np.floor(np.max(x) / pitch))
    r0, r1 = int(np.floor(np.min(y) / pitch)), int(np.floor(np.max(y) / pitch))
    for c in range(max(c0, 0), min(c1, ncol - 1) + 1):
        for r in range(max(r0, 0), min(r1, nrow - 1) + 1):
            label = grid.label(c, r)
            label = label.upper() if upper else label
            cx, cy = (c + 0.5) * pitch, (r + 0.5) * pitch
            near = (np.abs(x - cx) < height * 1.6) & (np.abs(y - cy) < height * 0.6)
            if not near.any():
                continue
            pts = np.column_stack([(x[near] - cx) / height, (y[near] - cy) / height])
            inside = np.zeros(len(pts), int)
            for poly in _glyph_polygons(label):  # even-odd rule handles the holes of 0, A, B ...
                inside += Path(poly).contains_points(pts)
            out[near] = inside % 2 == 1
    return out


def _surface_to_dish(world: Any, xb: Float, yb: Float) -> tuple[Float, Float]:
    """Block-surface points -> dish (x, y) on the glass plane (dish z = 0)."""
    m = np.asarray(world.lm_to_em, float)
    a2 = m[:2, :2]
    inv = np.linalg.inv(a2)
    bx, by = xb - m[0, 3], yb - m[1, 3]
    return inv[0, 0] * bx + inv[0, 1] * by, inv[1, 0] * bx + inv[1, 1] * by


def surface_relief(world: Any, xb: Float, yb: Float, pixel_um: float) -> tuple[Float, Float]:
    """(relief µm, cell coverage 0..1) on block-surface points: bars/glyphs raised ~0.3 µm, cells ~0.15 µm."""
    x, y = _surface_to_dish(world, xb, yb)
    grid = world.grid
    pitch, half = grid.pitch_um, grid.bar_width_um / 2
    edge = max(pixel_um, 1.5)
    fx, fy = np.mod(x, pitch), np.mod(y, pitch)
    dx, dy = np.minimum(fx, pitch - fx), np.minimum(fy, pitch - fy)
    bars = np.clip((half - np.minimum(dx, dy)) / edge + 0.5, 0, 1)
    ncol, nrow = grid.shape
    ongrid = (x > -half) & (y > -half) & (x < ncol * pitch + half) & (y < nrow * pitch + half)
    relief = 0.3 * bars * ongrid
    glyph = glyph_mask(world, x, y).astype(float)
    if glyph.any():
        relief += 0.25 * ndimage.gaussian_filter(glyph, 0.5)
    cover = np.zeros_like(x)
    near = world.cells_near(x.min(), y.min(), x.max(), y.max()) if hasattr(world, "cells_near") else world.cells
    for cell in near:
        rho = np.asarray(cell.rho(x, y), float) if hasattr(cell, "rho") else np.where(cell.height_at(x, y) > 0, 0.5, 2.0)
        c = np.clip((1.0 - rho) * 8.0, 0, 1)
        cover = np.maximum(cover, c)
        relief += 0.15 * np.clip(1.0 - rho, 0, 1) ** 0.5
    return relief, cover


def _pixel_grid(center_um: tuple[float, float], pixel_um: float, shape: tuple[int, int]) -> tuple[Float, Float]:
    w, h = shape
    xs = center_um[0] + (np.arange(w) - (w - 1) / 2) * pixel_um
    ys = center_um[1] + (np.arange(h) - (h - 1) / 2) * pixel_um
    return np.meshgrid(xs, ys)


def render_sem_overview(
    world: Any,
    center_um: tuple[float, float],
    pixel_size_um: float = 2.0,
    shape: tuple[int, int] = (1024, 1024),
    dwell_s: float = 1e-6,
    seed: int = 0,
) -> tuple[NDArray[np.uint8], dict[str, Any]]:
    """SEM overview of the block surface (SE detector), centred on block (x, y) µm; shape (W, H)."""
    xb, yb = _pixel_grid(center_um, pixel_size_um, shape)
    relief, cover = surface_relief(world, xb, yb, pixel_size_um)
    gy, gx = np.gradient(relief, pixel_size_um)
    light = np.deg2rad(-35.0)  # detector on the upper right: edges facing it are bright
    shade = gx * np.cos(light) + gy * np.sin(light)
    rng = np.random.default_rng([seed, 881])
    slow = ndimage.gaussian_filter(rng.normal(0, 1, (16, 16)), 2, mode="wrap")
    slow = ndimage.zoom(slow, (shape[1] / 16, shape[0] / 16), order=1)[: shape[1], : shape[0]]
    # Secondary-electron yield rises on any slope (edge effect), whatever its direction; the detector's
    # position adds the directional shading on top.
    slope = ndimage.gaussian_filter(np.hypot(gx, gy), 0.7)
    grey = (
        146.0 + 60.0 * ndimage.gaussian_filter(shade, 0.7) + 150.0 * slope - 6.0 * cover
        + 4.0 * slow / (slow.std() + 1e-9)
    )
    sd = 7.0 * np.sqrt(1e-6 / dwell_s)
    grey = grey + rng.normal(0, sd, grey.shape)
    img = np.clip(grey + 0.5, 0, 255).astype(np.uint8)
    meta = {
        "kind": "sem_overview",
        "frame": "EM block frame: columns +x_em, rows +y_em, µm",
        "center_um": [float(center_um[0]), float(center_um[1])],
        "pixel_size_um": float(pixel_size_um),
        "shape_wh": [int(shape[0]), int(shape[1])],
        "dwell_s": float(dwell_s),
        "detector": "SE2",
    }
    return img, meta


def render_ion_image(
    world: Any,
    center_um: tuple[float, float],
    pixel_size_um: float = 0.05,
    shape: tuple[int, int] = (1024, 768),
    incidence_deg: float = 0.0,
    dwell_s: float = 0.5e-6,
    milled: list[tuple[float, float, float, float]] | None = None,
    seed: int = 0,
) -> tuple[NDArray[np.uint8], dict[str, Any]]:
    """FIB secondary-electron image of the block surface at the target.

    Ion-induced SE images show topography strongly (edges bright) and the
    cells faintly. ``incidence_deg`` is the angle between the ion beam and the
    surface normal; rows are foreshortened by its cosine (grazing view).
    ``milled`` lists block-frame rectangles (x0, y0, x1, y1) already milled
    (trenches, fiducials): dark pits with bright rims.
    """
    w, h = shape
    cos_i = np.cos(np.deg2rad(incidence_deg))
    xs = center_um[0] + (np.arange(w) - (w - 1) / 2) * pixel_size_um
    ys = center_um[1] + (np.arange(h) - (h - 1) / 2) * pixel_size_um / max(cos_i, 0.05)
    xb, yb = np.meshgrid(xs, ys)
    relief, cover = surface_relief(world, xb, yb, pixel_size_um)
    pit = np.zeros_like(relief)
    for x0, y0, x1, y1 in milled or []:
        e = max(pixel_size_um, 0.05)
        inx = np.clip((np.minimum(xb - min(x0, x1), max(x0, x1) - xb)) / e + 0.5, 0, 1)
        iny = np.clip((np.minimum(yb - min(y0, y1), max(y0, y1) - yb)) / e + 0.5, 0, 1)
        pit = np.maximum(pit, inx * iny)
    relief = relief - 2.0 * pit
    gy, gx = np.gradient(relief, pixel_size_um)
    edge = np.hypot(gx, gy)
    rng = np.random.default_rng([seed, 1103])
    grey = 120.0 + 60.0 * np.tanh(edge * 2.0) + 10.0 * cover - 70.0 * pit + 40.0 * np.tanh(gy * 0.5) * (1 - cos_i)
    grey = grey + rng.normal(0, 9.0 * np.sqrt(0.5e-6 / dwell_s), grey.shape)
    img = np.clip(grey + 0.5, 0, 255).astype(np.uint8)
    meta = {
        "kind": "ion_image",
        "frame": "EM block frame: columns +x_em, rows +y_em foreshortened by cos(incidence)",
        "center_um": [float(center_um[0]), float(center_um[1])],
        "pixel_size_um": float(pixel_size_um),
        "row_pitch_um": float(pixel_size_um / max(cos_i, 0.05)),
        "shape_wh": [int(w), int(h)],
        "incidence_deg": float(incidence_deg),
        "milled": [list(map(float, m)) for m in (milled or [])],
    }
    return img, meta
