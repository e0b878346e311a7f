"""Low-magnification views of a dish placed on a stage at any pose, with damage on the grid.

A dish taken out and put back sits rotated and shifted; an inverted
microscope may see it mirrored; objectives differ by a few percent from their
nominal pixel size. `DishPose` holds that placement (dish µm -> stage µm) as
the ground truth a relocation is measured against. `Damage` hides parts of the
bars and glyphs under opaque debris, as scratches, dust and cell clumps do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from .lm import Camera, _digitise, _objective, _rng, expected_lm

__all__ = ["Damage", "DishPose", "render_posed_overview"]

Float = NDArray[np.float64]


@dataclass(frozen=True)
class DishPose:
    """stage µm = scale * R(rotation) * F(mirror) * dish µm + shift."""

    rotation_deg: float = 0.0
    shift_um: tuple[float, float] = (0.0, 0.0)
    mirror: bool = False
    scale: float = 1.0

    def matrix(self) -> Float:
        t = math.radians(self.rotation_deg)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        flip = np.diag([-1.0, 1.0]) if self.mirror else np.eye(2)
        return self.scale * rot @ flip

    def dish_to_stage(self, dish_xy: Float) -> Float:
        return np.asarray(dish_xy, float) @ self.matrix().T + np.array(self.shift_um)

    def stage_to_dish(self, stage_xy: Float) -> Float:
        return (np.asarray(stage_xy, float) - np.array(self.shift_um)) @ np.linalg.inv(self.matrix()).T


@dataclass(frozen=True)
class Damage:
    """Opaque debris: `bar_fraction` of the bar length in view hidden, `glyphs` labels smudged."""

    bar_fraction: float = 0.0
    glyphs_hidden: int = 0
    seed: int = 0


def _debris_mask(shape: tuple[int, int], centres: Float, radii: Float) -> Float:
    """Soft-edged blobs with irregular outlines, 0..1."""
    h, w = shape
    mask = np.zeros(shape)
    for (cx, cy), r in zip(centres, radii):
        x0, x1 = int(max(0, cx - 1.6 * r)), int(min(w, cx + 1.6 * r + 1))
        y0, y1 = int(max(0, cy - 1.6 * r)), int(min(h, cy + 1.6 * r + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.25 * np.sin(3 * angle + r) + 0.15 * np.cos(5 * angle - r)
        d = np.hypot(xx - cx, yy - cy) / (r * wobble)
        mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], np.clip((1.1 - d) / 0.2, 0, 1))
    return mask


def render_posed_overview(
    world,
    pose: DishPose,
    stage_xy_um: tuple[float, float],
    pixel_size_um: float,
    shape: tuple[int, int],
    *,
    objective: str = "10x",
    exposure_s: float = 0.02,
    damage: Damage = Damage(),
    rng: int | np.random.Generator | None = 0,
    camera: Camera = Camera(),
) -> tuple[NDArray[np.uint16], dict]:
    """Transmitted-light overview of the dish at `pose`, camera axes along stage axes.

    Returns the frame and the truth: the dish µm of every pixel is
    pose.stage_to_dish(stage of pixel), and the debris blobs that were drawn.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    stage_x = stage_xy_um[0] + (xx - (w - 1) / 2) * pixel_size_um
    stage_y = stage_xy_um[1] + (yy - (h - 1) / 2) * pixel_size_um
    dish = pose.stage_to_dish(np.stack([stage_x.ravel(), stage_y.ravel()], 1))
    # Render the dish area under the field axis-aligned at the objective's own pixel, then resample.
    native = _objective(objective).pixel_um
    lo, hi = dish.min(0) - 4 * native, dish.max(0) + 4 * native
    centre = (lo + hi) / 2
    native_shape = (int(math.ceil((hi[1] - lo[1]) / native)) | 1, int(math.ceil((hi[0] - lo[0]) / native)) | 1)
    electrons = expected_lm(world, float(centre[0]), float(centre[1]), 0.0, objective, "TL", exposure_s, native_shape, camera)
    rows = (dish[:, 1] - centre[1]) / native + (native_shape[0] - 1) / 2
    cols = (dish[:, 0] - centre[0]) / native + (native_shape[1] - 1) / 2
    sampled = ndi.map_coordinates(electrons, [rows, cols], order=1, mode="nearest").reshape(shape)

    generator = _rng(rng)
    truth: dict = {"debris": []}
    damage_rng = np.random.default_rng(damage.seed)
    if damage.bar_fraction > 0 or damage.glyphs_hidden > 0:
        centres, radii = _debris_on_grid(world, pose, stage_xy_um, pixel_size_um, shape, damage, damage_rng)
        mask = _debris_mask(shape, centres, radii)
        level = sampled.mean() * damage_rng.uniform(0.35, 0.6)
        texture = ndi.gaussian_filter(damage_rng.normal(0, 1, shape), 3) * 0.15 * level
        sampled = sampled * (1 - mask) + (level + texture) * mask
        truth["debris"] = [{"x": float(x), "y": float(y), "r": float(r)} for (x, y), r in zip(centres, radii)]
    return _digitise(np.clip(sampled, 0, None), camera, generator), truth


def _debris_on_grid(world, pose, stage_xy_um, pixel_size_um, shape, damage: Damage, rng) -> tuple[Float, Float]:
    """Debris blobs (pixel centres, radii) on the bars in view, and on some glyphs."""
    h, w = shape
    grid = world.grid
    pitch, bar = grid.pitch_um, grid.bar_width_um

    def to_pixel(dish_xy: Float) -> Float:
        stage = pose.dish_to_stage(dish_xy)
        return np.stack(
            [(stage[:, 0] - stage_xy_um[0]) / pixel_size_um + (w - 1) / 2, (stage[:, 1] - stage_xy_um[1]) / pixel_size_um + (h - 1) / 2], 1
        )

    # Sample the bar centre lines in view densely, pick segments to hide.
    corners = pose.stage_to_dish(
        np.array([[stage_xy_um[0] + sx * w * pixel_size_um / 2, stage_xy_um[1] + sy * h * pixel_size_um / 2] for sx in (-1, 1) for sy in (-1, 1)])
    )
    lo, hi = corners.min(0), corners.max(0)
    points = []
    ncol, nrow = grid.shape
    for k in range(int(lo[0] // pitch), int(hi[0] // pitch) + 2):
        if 0 <= k <= ncol:
            ys = np.arange(max(lo[1], 0), min(hi[1], nrow * pitch), bar)
            points += [(k * pitch, y) for y in ys]
    for k in range(int(lo[1] // pitch), int(hi[1] // pitch) + 2):
        if 0 <= k <= nrow:
            xs = np.arange(max(lo[0], 0), min(hi[0], ncol * pitch), bar)
            points += [(x, k * pitch) for x in xs]
    centres, radii = [], []
    if points and damage.bar_fraction > 0:
        pts = to_pixel(np.array(points))
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
        pts = pts[inside]
        n_hide = int(round(damage.bar_fraction * len(pts)))
        radius_px = 1.6 * bar / pixel_size_um  # each blob hides about 3 bar widths of bar
        covered = 0
        order = rng.permutation(len(pts))
        for i in order:
            if covered >= n_hide:
                break
            r = radius_px * rng.uniform(0.8, 1.3)
            centres.append(pts[i])
            radii.append(r)
            covered += int(2 * r * pixel_size_um / bar)
    if damage.glyphs_hidden > 0:
        squares = [(c, r) for c in range(ncol) for r in range(nrow)]
        centres_dish = np.array([((c + 0.5) * pitch, (r + 0.5) * pitch) for c, r in squares])
        px = to_pixel(centres_dish)
        inside = np.flatnonzero((px[:, 0] > 0) & (px[:, 0] < w) & (px[:, 1] > 0) & (px[:, 1] < h))
        for i in rng.permutation(inside)[: damage.glyphs_hidden]:
            centres.append(px[i])
            radii.append(0.6 * world.params.label_height_um / pixel_size_um)
    return np.array(centres).reshape(-1, 2), np.array(radii)
