"""What the simulated camera sees: the specimen under the objective, through the dish's pose.

The camera's columns run along +stage x, rows along +stage y, and the image
centre is the stage position, so the centre of camera pixel (i, j) of an
(H, W) frame with object-side pixel ``p`` lies at stage

    (sx + (j - (W - 1) / 2) * p,  sy + (i - (H - 1) / 2) * p)

and at dish ``pose.stage_to_dish`` of that. The specimen renderer
(:func:`clemflow.simulators.specimen.lm.expected_lm`) draws an axis-aligned
patch of the dish frame; this module maps it into the camera:

- exact path: when the pose is a multiple of 90 degrees (with or without
  mirror, any scale), each camera pixel centre falls on a pixel centre of a
  patch rendered at ``p / scale`` dish µm per pixel, so the frame is a pure
  re-indexing (no interpolation);
- general path (any other rotation): the dish patch under the field (its
  bounding box plus a margin) is rendered at ``p / scale`` and sampled at the
  camera pixel centres with bilinear interpolation. This is an approximation:
  it adds a little blur (a bilinear kernel, variance about p²/6 per axis) to
  the rendered PSF, and it is the same for every channel, transmitted light
  and fluorescence at 10x and 63x alike.

Noise (shot and read) is added after the mapping, with the specimen module's
camera model, so pixels stay independent.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from ..specimen.lm import OBJECTIVES, Camera, _digitise, expected_lm

if TYPE_CHECKING:
    from .context import PlacedDish

__all__ = ["expected_view", "render_view"]


def _blank(channel: str, exposure_s: float, shape: tuple[int, int], camera: Camera) -> np.ndarray:
    """No dish under the objective: clear light path (TL) or bare background (fluorescence)."""
    rate = camera.tl_e_per_s if channel == "TL" else camera.background_e_per_s.get(channel, 0.0)
    return np.full(shape, rate * exposure_s)


def expected_view(
    dish: "PlacedDish | None",
    stage_xy_um: tuple[float, float],
    focus_height_um: float,
    objective: str,
    channel: str,
    exposure_s: float,
    shape: tuple[int, int],
    pixel_um: float,
    camera: Camera = Camera(),
) -> np.ndarray:
    """Mean detected electrons (float64, ``shape``) of a camera frame at a stage position."""
    if dish is None:
        return _blank(channel, exposure_s, shape, camera)
    h, w = shape
    pose = dish.pose
    a = np.linalg.inv(pose.matrix())  # stage offset -> dish offset
    centre = pose.stage_to_dish(np.asarray(stage_xy_um, float))
    q = pixel_um * math.sqrt(abs(np.linalg.det(a)))  # dish µm per camera pixel
    base = OBJECTIVES[objective]
    obj = replace(base, camera_pixel_um=q * base.magnification)  # renders at q µm per pixel
    ex, ey = a[:, 0] * pixel_um / q, a[:, 1] * pixel_um / q  # dish step (in q) per camera column / row
    jj = np.arange(w) - (w - 1) / 2
    ii = np.arange(h) - (h - 1) / 2
    signed_perm = np.allclose(np.abs(np.concatenate([ex, ey])), np.rint(np.abs(np.concatenate([ex, ey]))), atol=1e-9)
    if signed_perm:
        # columns along dish x (ex = (+-1, 0)) or along dish y (ex = (0, +-1))
        patch_shape = (h, w) if abs(ex[0]) > 0.5 else (w, h)
        patch = expected_lm(dish.world, centre[0], centre[1], focus_height_um, obj, channel, exposure_s, patch_shape, camera)
        ph, pw = patch_shape
        cols = np.rint((pw - 1) / 2 + ex[0] * jj[None, :] + ey[0] * ii[:, None]).astype(np.intp)
        rows = np.rint((ph - 1) / 2 + ex[1] * jj[None, :] + ey[1] * ii[:, None]).astype(np.intp)
        return patch[rows, cols]
    # general rotation: render the bounding box of the field in the dish frame and resample
    corners_j = np.array([jj[0], jj[-1], jj[0], jj[-1]])
    corners_i = np.array([ii[0], ii[0], ii[-1], ii[-1]])
    margin = 3
    half_w = math.ceil(float(np.abs(ex[0] * corners_j + ey[0] * corners_i).max())) + margin
    half_h = math.ceil(float(np.abs(ex[1] * corners_j + ey[1] * corners_i).max())) + margin
    patch_shape = (2 * half_h + 1, 2 * half_w + 1)
    patch = expected_lm(dish.world, centre[0], centre[1], focus_height_um, obj, channel, exposure_s, patch_shape, camera)
    # patch (row, col) of camera pixel (i, j): (half_h + ex[1] dj + ey[1] di, half_w + ex[0] dj + ey[0] di)
    ci, cj = (h - 1) / 2, (w - 1) / 2
    matrix = np.array([[ey[1], ex[1]], [ey[0], ex[0]]])
    offset = np.array([half_h, half_w]) - matrix @ np.array([ci, cj])
    return ndi.affine_transform(patch, matrix, offset, output_shape=(h, w), order=1, mode="nearest")


def render_view(
    dish: "PlacedDish | None",
    stage_xy_um: tuple[float, float],
    focus_height_um: float,
    objective: str,
    channel: str,
    exposure_s: float,
    shape: tuple[int, int],
    pixel_um: float,
    rng: np.random.Generator,
    camera: Camera = Camera(),
    *,
    dark: bool = False,
) -> np.ndarray:
    """One uint16 frame: :func:`expected_view` plus shot and read noise (``dark``: no light at all)."""
    if dark:
        electrons = np.zeros(shape)
    else:
        electrons = expected_view(dish, stage_xy_um, focus_height_um, objective, channel, exposure_s, shape, pixel_um, camera)
    return _digitise(np.clip(electrons, 0, None), camera, rng)
