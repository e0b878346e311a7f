"""Placing the electron view on a new face: find the milled fiducial, centre the frame, keep its template.

Right after the fiducial is milled nobody knows where it shows in the
electron image: that depends on the instrument's coincidence point, the
stage height and the beam shifts, and a face full of cell structure offers
many "+"-like spots to a matched filter. So the engine finds it the way an
operator would: it images the area before milling the fiducial and again
after, at a few fields of view (the protocol's, 3x and 6x wider, same pixel
count), and looks for the one place that changed (``change_peak``: local
energy of the registered difference, well above its noise). The beam is then
shifted so that the fiducial sits near the top of the frame with the face
below it: a surface mark ``d`` ahead of the face shows ``cos(tilt) d`` above
the face edge, so the edge lands at ``EDGE_ROW_FRACTION`` of the frame height
when the frame is tall enough. The template is cut from a frame at the final
settings and kept on disk (``fiducial_template.npy`` + ``.json``, the frame as
``fiducial_frame.tif``), its numbers in the journal: a resumed run
re-captures nothing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.registration import phase_cross_correlation

from .fiducial import FiducialTemplate, capture_template
from .plan import FIDUCIAL_ARM_M, FIDUCIAL_WIDTH_M
from .tracking import shift_for_offset

__all__ = ["EDGE_ROW_FRACTION", "FiducialSighting", "change_peak", "desired_fiducial_px", "load_template",
           "save_template", "template_size_px"]

EDGE_ROW_FRACTION = 0.4
ZOOMS_OUT = (1.0, 3.0, 6.0)
MIN_ARM_PX = 8.0  # a wider field than this shows the "+" too small to find


MIN_CHANGE_Z = 15.0
"""The change must stand this many robust deviations above the difference image's background energy."""


def change_peak(before: NDArray[Any], after: NDArray[Any], pixel_m: float) -> tuple[tuple[float, float], float]:
    """Where ``after`` differs most from ``before`` at the fiducial's scale: ((x, y) px in ``after``, robust z-score).

    The frames are registered first (phase correlation) and only their
    overlap is compared, away from its border, so drift between them does
    not show as change.
    """
    b = np.asarray(before, np.float32)
    a = np.asarray(after, np.float32)
    shift, _, _ = phase_cross_correlation(b, a, upsample_factor=10)
    whole = np.round(shift).astype(int)  # before[r, c] shows what after shows at [r - dr, c - dc]
    dr, dc = int(whole[0]), int(whole[1])
    h, w = b.shape
    r0, r1 = max(0, dr), min(h, h + dr)
    c0, c1 = max(0, dc), min(w, w + dc)
    if r1 - r0 < 32 or c1 - c0 < 32:
        return (0.0, 0.0), 0.0
    b_overlap = b[r0:r1, c0:c1]
    a_overlap = a[r0 - dr:r1 - dr, c0 - dc:c1 - dc]
    a_overlap = ndimage.shift(a_overlap, shift - whole, order=1, mode="nearest")
    width_px = FIDUCIAL_WIDTH_M / pixel_m
    arm_px = FIDUCIAL_ARM_M / pixel_m
    d = ndimage.gaussian_filter(a_overlap - b_overlap, max(1.0, width_px / 3))
    sigma = max(1.0, arm_px / 4)
    energy = ndimage.gaussian_filter(d * d, sigma)
    margin = int(math.ceil(2 * sigma)) + 2
    inner = energy[margin:energy.shape[0] - margin, margin:energy.shape[1] - margin]
    if inner.size == 0:
        return (0.0, 0.0), 0.0
    median = float(np.median(inner))
    spread = float(np.median(np.abs(inner - median))) * 1.4826 or 1e-12
    r, c = np.unravel_index(int(np.argmax(inner)), inner.shape)
    x, y = c + margin + c0 - float(shift[1]), r + margin + r0 - float(shift[0])  # before's pixel -> after's
    return (float(x), float(y)), (float(inner[r, c]) - median) / spread


@dataclass(frozen=True)
class FiducialSighting:
    """The new fiducial as the before/after difference found it, in a frame ``zoom_out`` x wider than the protocol's."""

    position_px: tuple[float, float]
    offset_m: tuple[float, float]  # from the frame centre, image axes (x right, y down)
    score: float  # the change's robust z-score
    zoom_out: float


def template_size_px(pixel_m: float, tilt_deg: float, frame: tuple[int, int]) -> tuple[int, int]:
    """A template that holds the whole "+" (its arm along the milling axis is foreshortened by cos(tilt)) and a margin."""
    arm = FIDUCIAL_ARM_M / pixel_m
    w = int(math.ceil(arm * 1.3)) + 8
    h = int(math.ceil(arm * max(math.cos(math.radians(tilt_deg)), 0.3) * 1.3)) + 8
    return min(w, frame[0] // 2), min(h, frame[1] // 3)


def desired_fiducial_px(frame: tuple[int, int], edge_below_px: float, template_h: int, search_px: float) -> tuple[float, float]:
    """Where the fiducial should sit: centred across, high enough that the face edge is at EDGE_ROW_FRACTION."""
    w, h = frame
    row = EDGE_ROW_FRACTION * h - edge_below_px
    top = template_h / 2 + search_px / 2 + 4
    return ((w - 1) / 2, max(row, top))


def correction_to(position_px: tuple[float, float], desired_px: tuple[float, float], pixel_m: float) -> tuple[float, float]:
    """Beam-shift change that moves content at ``position_px`` to ``desired_px``."""
    return shift_for_offset((position_px[0] - desired_px[0], position_px[1] - desired_px[1]), pixel_m)


def save_template(run_dir: Path, template: FiducialTemplate, name: str = "fiducial_template") -> Path:
    """Keep the template's pixels (``.npy``) and numbers (``.json``), each written whole."""
    path = Path(run_dir) / f"{name}.npy"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, template.image)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    meta = {"center_px": list(template.center_px), "pixel_size_m": template.pixel_size_m, "smooth_px": template.smooth_px,
            "background_px": template.background_px, "contrast": template.contrast}
    jpath = path.with_suffix(".json")
    jtmp = jpath.with_name(f".{jpath.name}.tmp")
    jtmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    os.replace(jtmp, jpath)
    return path


def load_template(path: Path, data: dict[str, Any]) -> FiducialTemplate:
    """The template saved by ``save_template``; ``data`` is its journal record (center_px, pixel_size_m, ...)."""
    image = np.load(Path(path)).astype(np.float32)
    return FiducialTemplate(image, (float(data["center_px"][0]), float(data["center_px"][1])), data.get("pixel_size_m"),
                            float(data.get("smooth_px", 1.0)), float(data.get("background_px", 12.0)),
                            float(data.get("contrast", math.nan)))


def capture(image: NDArray[Any], center_px: tuple[float, float], size_px: tuple[int, int], pixel_m: float) -> FiducialTemplate:
    return capture_template(image, center_px, size_px, pixel_size_m=pixel_m)
