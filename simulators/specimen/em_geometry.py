"""Geometry of slice-and-view: the embedded block and its milled face.

Frames (all µm)
---------------
dish frame
    The live specimen as the light microscope saw it: x right, y down seen
    from above with the grid glyphs upright, z = height above the glass.
block frame
    The resin block in the FIB-SEM, ``world.lm_to_em`` maps dish -> block
    (shrinkage, rotation, the mirror of mounting the block glass-side up, a
    little shear). The block surface is the image of the glass plane: the
    glass is removed after embedding, so the cells' basal side lies at the
    surface and their apical side deeper in the resin. The block z axis is
    normal to the surface; whether +z points into or out of the resin is
    read from ``lm_to_em`` (``depth_axis``), so either convention works.
face frame (s, u, v)
    Slice-and-view mills faces perpendicular to the block surface. ``s`` is
    the milled depth along the milling axis ``m`` (a face is the plane
    ``s = const``; each slice advances ``s`` by the slice thickness). ``v`` is
    the depth below the block surface, along the ion beam; ``u`` runs along
    the face. The SEM views the face from the trench (looking along +m) at
    54 degrees; the image is rendered tilt-corrected, i.e. as the true
    cross-section, with image columns along +u (the viewer's right) and image
    rows along +v: row 0 is nearest the block surface, so going down the
    image goes from the cell's basal side (at the former glass) up through
    the cell towards its apical surface and into the resin above it.

``FaceGeometry`` fixes where the face frame sits on the block: ``origin_um``
is the block-surface point (block x, y) with s = u = 0, and ``azimuth_deg``
turns the milling axis in the block surface (0: m = +block y; 90: m = +block x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["FaceGeometry", "FaceFrame", "face_frame"]

Float = NDArray[np.float64]


@dataclass(frozen=True)
class FaceGeometry:
    """Where the milled faces lie on the block: origin and milling direction."""

    origin_um: tuple[float, float] = (0.0, 0.0)
    azimuth_deg: float = 0.0


@dataclass(frozen=True)
class FaceFrame:
    """Affine maps between face coordinates (s, u, v) and the block and dish frames.

    ``to_block(suv) = origin + suv @ axes`` (rows of ``axes``: m, u, v unit
    vectors in the block frame); ``to_dish(suv) = dish0 + suv @ dish_axes``.
    """

    origin: Float  # (3,) block point with s = u = v = 0
    axes: Float  # (3, 3) rows m, u, v in block coordinates (orthonormal)
    dish0: Float  # (3,) dish point of the face origin
    dish_axes: Float  # (3, 3) rows d(dish)/ds, d(dish)/du, d(dish)/dv
    scale: float  # isotropic block/dish length ratio (1 - shrinkage)

    def block_to_face(self, points: Float) -> Float:
        """(N, 3) block points -> (N, 3) face coordinates (s, u, v)."""
        return (np.asarray(points, float) - self.origin) @ self.axes.T

    def face_to_block(self, suv: Float) -> Float:
        return self.origin + np.asarray(suv, float) @ self.axes

    def face_to_dish(self, suv: Float) -> Float:
        return self.dish0 + np.asarray(suv, float) @ self.dish_axes


def _split(lm_to_em: Float) -> tuple[Float, Float]:
    m = np.asarray(lm_to_em, float)
    if m.shape != (4, 4):
        raise ValueError(f"lm_to_em must be a 4x4 homogeneous matrix, got shape {m.shape}")
    return m[:3, :3], m[:3, 3]


def face_frame(lm_to_em: Float, face: FaceGeometry) -> FaceFrame:
    """Build the face frame for a block given by the dish -> block transform."""
    lin, trans = _split(lm_to_em)
    inv = np.linalg.inv(lin)
    # depth axis: block z, signed so that it points from the surface into the resin (dish z > 0)
    depth_sign = 1.0 if lin[2, 2] >= 0 else -1.0
    d = np.array([0.0, 0.0, depth_sign])
    a = np.deg2rad(face.azimuth_deg)
    m = np.array([np.sin(a), np.cos(a), 0.0])
    u = np.cross(d, m)  # the viewer's right, looking along +m with the surface up
    axes = np.stack([m, u, d])
    # origin: the block surface (image of dish z = 0) below/above origin_um
    ox, oy = face.origin_um
    # dish point that maps to (ox, oy, zb) with dish z = 0: solve lin @ (x, y, 0) + t = (ox, oy, zb)
    a2 = np.array([[lin[0, 0], lin[0, 1]], [lin[1, 0], lin[1, 1]]])
    xy = np.linalg.solve(a2, np.array([ox, oy]) - trans[:2])
    zb = lin[2, 0] * xy[0] + lin[2, 1] * xy[1] + trans[2]
    origin = np.array([ox, oy, zb])
    dish0 = inv @ (origin - trans)
    dish_axes = (inv @ axes.T).T
    scale = float(abs(np.linalg.det(lin)) ** (1.0 / 3.0))
    return FaceFrame(origin=origin, axes=axes, dish0=dish0, dish_axes=dish_axes, scale=scale)
