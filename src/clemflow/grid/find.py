"""Grid finding: from one image to bars, crossings, labelled squares and grid coordinates.

The result maps image pixels to the grid frame of the scheme (µm, glyphs
upright, see `clemflow.protocol.grid_scheme`) and back, whatever the image's
rotation, mirror and scale, so a cell can be named by its square and offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..protocol.grid_scheme import GridScheme
from .labels import FieldLabelling, read_labels
from .lattice import GridNotFound, Lattice, find_lattice

__all__ = ["GridFinding", "GridNotFound", "find_grid"]

Float = NDArray[np.float64]

MIN_LABEL_CONFIDENCE = 0.3
"""Below this the labelling is reported but not trusted for relocation."""


@dataclass(frozen=True)
class GridFinding:
    """Bars, crossings and labels found in one image, with the map to grid coordinates."""

    scheme: GridScheme
    pixel_size_um: float
    lattice: Lattice
    labelling: FieldLabelling | None

    # -- coordinate maps ------------------------------------------------------

    @property
    def labelled(self) -> bool:
        return self.labelling is not None and self.labelling.confidence >= MIN_LABEL_CONFIDENCE

    def _grid_affine(self) -> tuple[Float, Float]:
        """G (2x2), t with grid µm = G @ (x, y) + t."""
        if self.labelling is None:
            raise GridNotFound("the squares could not be read, so grid coordinates are unknown")
        a, b = self.lattice._matrix()
        m = self.labelling.orientation.m.astype(float)
        pitch = self.scheme.pitch_um
        offset = np.array(self.labelling.offset, float)
        # Square (col, row) = M (u, v) + offset for the square whose lower lattice corner is (u, v); its
        # centre (u, v) + 0.5 must land on ((col, row) + 0.5) * pitch in the grid frame.
        g = pitch * (m @ a)
        t = pitch * (m @ b - 0.5 * m @ np.ones(2) + offset + 0.5)
        return g, t

    def image_to_grid_um(self, xy: Float) -> Float:
        g, t = self._grid_affine()
        return np.asarray(xy, float) @ g.T + t

    def grid_um_to_image(self, grid_xy: Float) -> Float:
        g, t = self._grid_affine()
        return (np.asarray(grid_xy, float) - t) @ np.linalg.inv(g).T

    @property
    def mirrored(self) -> bool:
        g, _ = self._grid_affine()
        return bool(np.linalg.det(g) < 0)

    @property
    def angle_deg(self) -> float:
        """Direction in the image of the grid's +x (columns increasing), degrees from +x towards +y."""
        g, _ = self._grid_affine()
        step = np.linalg.inv(g) @ np.array([1.0, 0.0])
        return math.degrees(math.atan2(step[1], step[0])) % 360.0

    @property
    def pitch_px(self) -> float:
        return float(np.mean([f.pitch_px for f in self.lattice.families]))

    # -- report ----------------------------------------------------------------

    def crossings(self) -> list[dict[str, Any]]:
        idx, xy = self.lattice.crossings()
        return [
            {"x": float(x), "y": float(y), "observed": (int(u), int(v)) in self.lattice.observed}
            for (u, v), (x, y) in zip(idx, xy)
        ]

    def squares(self) -> list[dict[str, Any]]:
        if self.labelling is None:
            return []
        idx, xy = self.lattice.square_centres()
        squares = self.labelling.square_of(idx)
        n_cols, n_rows = self.scheme.shape
        out = []
        for (c, r), (x, y) in zip(squares, xy):
            if 0 <= c < n_cols and 0 <= r < n_rows:
                out.append(
                    {"label": self.scheme.label(int(c), int(r)), "x": float(x), "y": float(y),
                     "confidence": round(self.labelling.confidence, 3)}
                )
        return out

    def as_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {"found": True, "pitch_px": self.pitch_px, "crossings": self.crossings()}
        if self.labelling is not None:
            report |= {
                "angle_deg": round(self.angle_deg, 4) % 360.0,
                "mirrored": self.mirrored,
                "labels_confident": self.labelled,
                "label_confidence": self.labelling.confidence,
                "squares": self.squares(),
            }
        else:
            f1, _ = self.lattice.families
            report |= {"angle_deg": (f1.angle_deg + 90.0) % 90.0, "mirrored": False, "labels_confident": False,
                       "label_confidence": 0.0, "squares": []}
        return report


def find_grid(
    image: NDArray,
    pixel_size_um: float | None,
    scheme: GridScheme,
    *,
    label_height_um: float | None = None,
    read: bool = True,
) -> GridFinding:
    """Find bars, crossings and labels; raise GridNotFound (with the reason) when there is no grid."""
    if pixel_size_um is not None and pixel_size_um <= 0:
        raise ValueError("pixel size must be positive")
    bar_px = scheme.bar_width_um / pixel_size_um if pixel_size_um else None
    pitch_px = scheme.pitch_um / pixel_size_um if pixel_size_um else None
    lattice = find_lattice(image, bar_px, pitch_px)
    labelling = None
    if read and pixel_size_um:
        height = label_height_um if label_height_um is not None else scheme.label_height_um
        labelling, _ = read_labels(image, lattice, pixel_size_um, scheme, height)
    return GridFinding(scheme, pixel_size_um or float("nan"), lattice, labelling)
