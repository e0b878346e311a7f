"""Where the electron image looks: the sample-fixed view of the face and the block surface ahead of it.

Slice-and-view geometry at 54 degrees between the beams: with the beams
fixed on the sample, a mark on the block surface stays put in the SEM image,
while each slice of thickness t moves the face ``sin(54) t`` (~0.8 t) further
along the SEM axis and ``cos(54) t`` (~0.6 t) *up* the image. The simulator
uses one projection for the whole frame, in the face's tilt-corrected
coordinates (u along the face, v depth below the block surface, both µm):

    image row coordinate (µm, down)  y = v - FACE_RISE_PER_S * (s - S0_UM)
    image column coordinate (µm)     x = u

for a point of the face (s = the face's s) or of the block surface (v = 0,
s = its distance along the milling axis). So a surface point (v = 0) sits at
``y = -FACE_RISE_PER_S (s - S0)`` whatever the face does, the face content
rises by ``FACE_RISE_PER_S`` per µm milled, and a surface point ``d`` µm
ahead of the face appears ``FACE_RISE_PER_S d`` above the face edge. (On a
real instrument with tilt correction on, the face is shown at true height and
the rise per slice is cot(54) t; the simulator keeps the 0.6 t of the issue.)

The frame is centred, before drift, on
``x_c = (stage xy - site origin) . u axis + beam shift x`` and
``y_c = V_CENTER_UM - beam shift y`` (µm), so beam shift +x moves the view to
+u (the content moves left) and beam shift +y moves the view up the sample
(towards the surface: the content moves down), like the ion image's +y up.
Drift (``DriftModel.offset_nm``: where the beam lands, image axes x right,
y down) shifts the view by the same amount in the face plane (rotated by
the scan rotation), so the content moves the other way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .state import S0_UM, V_CENTER_UM

__all__ = ["ElectronView", "FACE_RISE_PER_S", "electron_view"]

FACE_RISE_PER_S = math.cos(math.radians(54.0))  # image rise of the face per µm milled (0.588)


@dataclass(frozen=True)
class ElectronView:
    """One electron frame's geometry (µm unless named otherwise)."""

    width: int
    height: int
    pixel_um: float
    face_s_um: float
    shift_um: tuple[float, float]  # electron beam shift (x, y)
    drift_nm: tuple[float, float]  # beam landing offset, image axes (x right, y down)
    rotation_deg: float
    u0_um: float  # u at the centre with no beam shift and no drift

    @property
    def rise_um(self) -> float:
        """How far the face content has risen in the image since S0."""
        return FACE_RISE_PER_S * (self.face_s_um - S0_UM)

    @property
    def drift_face_um(self) -> tuple[float, float]:
        """The drift as an offset of the view in the face plane (u, v)."""
        a = math.radians(self.rotation_deg)
        c, s = math.cos(a), math.sin(a)
        bx, by = self.drift_nm
        return (c * bx - s * by) * 1e-3, (s * bx + c * by) * 1e-3

    @property
    def render_center_um(self) -> tuple[float, float]:
        """The ``center_um`` (u, v on the face) for ``render_em_slice`` (which adds the drift itself)."""
        return self.u0_um + self.shift_um[0], V_CENTER_UM - self.shift_um[1] + self.rise_um

    def _to_frame(self, d_col: float, d_row: float) -> tuple[float, float]:
        """A displacement on the unrotated face canvas (columns, rows) -> frame pixels (x, y)."""
        a = math.radians(self.rotation_deg)
        c, s = math.cos(a), math.sin(a)
        return s * d_row + c * d_col, c * d_row - s * d_col

    def sample_offset_px(self) -> tuple[float, float]:
        """Where a sample-fixed surface point appears relative to where it would with no drift and no beam
        shift (frame pixels, x right, y down)."""
        du, dv = self.drift_face_um
        return self._to_frame(-(self.shift_um[0] + du) / self.pixel_um, (self.shift_um[1] - dv) / self.pixel_um)

    def face_offset_px(self) -> tuple[float, float]:
        """The same for content of the current face: the sample offset plus the face's rise."""
        du, dv = self.drift_face_um
        return self._to_frame(-(self.shift_um[0] + du) / self.pixel_um,
                              (self.shift_um[1] - dv - self.rise_um) / self.pixel_um)

    def face_edge_row(self) -> float:
        """Row of the face's top edge (v = 0) at the centre column (rotation ignored)."""
        v_mid = self.render_center_um[1] + self.drift_face_um[1]
        return (self.height - 1) / 2 - v_mid / self.pixel_um

    def pixel_uv(self, rows: NDArray, cols: NDArray) -> tuple[NDArray, NDArray]:
        """Face-plane (u, v) of frame pixels (broadcastable row and column index arrays), drift included,
        as ``render_em_slice`` lays them out (scan rotation about the frame centre)."""
        a = math.radians(self.rotation_deg)
        c, s = math.cos(a), math.sin(a)
        ro = np.asarray(rows, np.float64) - (self.height - 1) / 2
        co = np.asarray(cols, np.float64) - (self.width - 1) / 2
        if self.rotation_deg % 360.0 == 0.0:
            cr, cc = ro, co
        else:
            cr, cc = c * ro + s * co, -s * ro + c * co
        u_c, v_c = self.render_center_um
        du, dv = self.drift_face_um
        return u_c + du + cc * self.pixel_um, v_c + dv + cr * self.pixel_um


def electron_view(*, width: int, height: int, hfw_m: float, face_s_um: float, stage_offset_um: tuple[float, float],
                  u_axis: tuple[float, float], beam_shift_m: tuple[float, float], drift_nm: tuple[float, float],
                  rotation_deg: float) -> ElectronView:
    """The view of a frame: ``stage_offset_um`` = stage xy - site origin, ``u_axis`` = the face's u axis in
    block (x, y)."""
    u0 = stage_offset_um[0] * u_axis[0] + stage_offset_um[1] * u_axis[1]
    return ElectronView(width=int(width), height=int(height), pixel_um=hfw_m / width * 1e6,
                        face_s_um=float(face_s_um),
                        shift_um=(beam_shift_m[0] * 1e6, beam_shift_m[1] * 1e6),
                        drift_nm=(float(drift_nm[0]), float(drift_nm[1])), rotation_deg=float(rotation_deg),
                        u0_um=float(u0))
