"""Round objects found in a volume, in physical µm: what detection hands to registration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Blobs", "checked_sizes"]


@dataclass(frozen=True, eq=False)
class Blobs:
    """Detected round objects: centres ``[x, y, z]`` µm (origin at the centre of voxel 0, 0, 0), radii, scores.

    ``score`` is detector-specific evidence (contrast over the local background); larger is surer.
    """

    center_um: np.ndarray  # (N, 3) float64, x y z
    radius_um: np.ndarray  # (N,) float64
    score: np.ndarray  # (N,) float64

    def __post_init__(self) -> None:
        c = np.asarray(self.center_um, float).reshape(-1, 3)
        object.__setattr__(self, "center_um", c)
        object.__setattr__(self, "radius_um", np.asarray(self.radius_um, float).reshape(-1))
        object.__setattr__(self, "score", np.asarray(self.score, float).reshape(-1))
        if not (len(self.radius_um) == len(self.score) == len(c)):
            raise ValueError("center_um, radius_um and score must have one row per blob")

    def __len__(self) -> int:
        return len(self.radius_um)

    @classmethod
    def empty(cls) -> "Blobs":
        return cls(np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    def subset(self, which: np.ndarray) -> "Blobs":
        """The blobs picked by a boolean mask or an index array."""
        return Blobs(self.center_um[which], self.radius_um[which], self.score[which])


def checked_sizes(voxel_um: tuple[float, float, float], diameter_um: tuple[float, float]) -> np.ndarray:
    """A detector's voxel (z, y, x) as an array, after checking it and the diameter range it looks for."""
    voxel = np.asarray(voxel_um, float)
    if voxel.shape != (3,) or np.any(voxel <= 0):
        raise ValueError(f"voxel_um must be three positive sizes (z, y, x) in µm; got {voxel_um}")
    d_lo, d_hi = diameter_um
    if not 0 < d_lo <= d_hi:
        raise ValueError(f"diameter_um must be (smallest, largest) with 0 < smallest <= largest; got {diameter_um}")
    return voxel
