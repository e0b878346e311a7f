"""Look before deciding: did a mill whose outcome is unknown remove its slice?

When the bridge server crashed during a mill (the record says
``interrupted``) or a mill failed part-way, nobody knows whether the slice
was milled. Milling it again could take a second slice; not milling it would
leave a gap. The face itself tells: one slice of thickness ``t`` lifts the
face content by ``cos(tilt) t`` in the electron image while marks on the
surface (the fiducial) stay where they were. So a frame taken with the same
beam settings as the last saved slice is compared with that slice: the face
region's shift (sub-pixel phase correlation) minus the fiducial's shift
(drift moves both) is the face's own rise. About the expected rise: milled;
about zero: not milled; in between (a partial mill): not milled, and milling
the slice again is safe because its pattern ends at the slice's absolute far
edge, so it removes only what is left of that slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from skimage.registration import phase_cross_correlation

from .fiducial import FiducialTemplate, locate_fiducial

__all__ = ["FaceEvidence", "MILLED_FRACTION", "measure_face_rise"]

MILLED_FRACTION = 0.75
"""A rise of at least this fraction of one slice's counts as milled; less is re-milled (to the same absolute edge)."""


@dataclass(frozen=True)
class FaceEvidence:
    """What a frame says about the face since the last saved slice (pixels; +y = down the image)."""

    fiducial_shift_px: tuple[float, float]
    face_shift_px: tuple[float, float]
    rise_px: float  # face content up the image, relative to the fiducial
    expected_rise_px: float
    fiducial_similarity: float
    face_error: float  # phase correlation's own error estimate
    milled: bool

    @property
    def fraction(self) -> float:
        return self.rise_px / self.expected_rise_px if self.expected_rise_px else float("nan")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fraction"] = self.fraction
        return out


def _content_shift(reference: NDArray[Any], moving: NDArray[Any]) -> tuple[tuple[float, float], float]:
    """How far the content of ``moving`` lies from ``reference`` (x, y) px, and the correlation's error."""
    ref = np.asarray(reference, np.float32)
    mov = np.asarray(moving, np.float32)
    shift, error, _ = phase_cross_correlation(ref - ref.mean(), mov - mov.mean(), upsample_factor=50, normalization=None)
    # phase_cross_correlation returns the shift that registers moving onto reference: the content moved by its negative
    return (-float(shift[1]), -float(shift[0])), float(error)


def measure_face_rise(previous: NDArray[Any], current: NDArray[Any], template: FiducialTemplate,
                      fiducial_previous_px: tuple[float, float], face_top_row: int, expected_rise_px: float,
                      search_radius_px: float = 60.0) -> FaceEvidence:
    """Compare ``current`` with ``previous`` (same beam settings): the face's rise relative to the fiducial.

    ``fiducial_previous_px``: where the fiducial was in ``previous``;
    ``face_top_row``: the first row that shows only face (below its edge) in
    ``previous``; rows from there down are compared.
    """
    before = locate_fiducial(template, previous, fiducial_previous_px, search_radius_px)
    after = locate_fiducial(template, current, before.position_px, search_radius_px)
    fid = (after.position_px[0] - before.position_px[0], after.position_px[1] - before.position_px[1])
    top = int(max(0, min(face_top_row, previous.shape[0] - 32)))
    face, error = _content_shift(previous[top:], current[top:])
    rise = -(face[1] - fid[1])
    milled = rise >= MILLED_FRACTION * expected_rise_px
    return FaceEvidence(fid, face, float(rise), float(expected_rise_px), float(min(before.similarity, after.similarity)),
                        error, bool(milled))
