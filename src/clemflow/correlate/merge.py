"""Droplets that light microscopy cannot tell apart, merged into the one blob it sees.

EM resolves two droplets that touch; the confocal stack shows one blob at
their common centre of mass. Matching EM droplets one-to-one with LM blobs
therefore needs the EM side merged first, with the light microscope's
resolution: two droplets merge when the gap between their surfaces is within
the resolution along the line that joins them (an ellipsoid with the lateral
and the axial resolution as semi-axes). The merged droplet sits at the
volume-weighted centre and holds the combined volume; merging repeats until
no merged droplet comes near another.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .blobs import Blobs

__all__ = ["merge_touching"]


def _touching(center: NDArray, radius: NDArray, lateral: float, axial: float) -> NDArray[np.bool_]:
    """(N, N) which pairs have surfaces within the resolution along the line between their centres."""
    d = center[:, None, :] - center[None, :, :]
    dist = np.linalg.norm(d, axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = d / dist[..., None]
        reach = 1.0 / np.sqrt((u[..., 0] ** 2 + u[..., 1] ** 2) / lateral**2 + u[..., 2] ** 2 / axial**2)
    reach = np.where(dist > 0, reach, np.inf)
    gap = dist - radius[:, None] - radius[None, :]
    near = gap <= reach
    np.fill_diagonal(near, False)
    return near


def merge_touching(blobs: Blobs, resolution_um: tuple[float, float] = (0.25, 0.6)) -> Blobs:
    """Merge droplets whose surfaces come within ``resolution_um`` = (lateral, axial) of each other.

    A merged droplet has the volume-weighted centre of its parts, the radius of their combined volume and
    the best score among them. Order: untouched droplets keep their order, merged ones follow.
    """
    lateral, axial = (float(v) for v in resolution_um)
    if lateral <= 0 or axial <= 0:
        raise ValueError(f"resolution_um must be positive (lateral, axial); got {resolution_um}")
    center, radius, score = blobs.center_um, blobs.radius_um, blobs.score
    while len(radius) > 1:
        near = _touching(center, radius, lateral, axial)
        if not near.any():
            break
        i, j = np.nonzero(near)
        n = len(radius)
        count, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
        volume = np.maximum(radius, 1e-9) ** 3
        sizes = np.bincount(label, minlength=count)
        single = sizes[label] == 1
        groups = [g for g in range(count) if sizes[g] > 1]
        new_c = [np.average(center[label == g], axis=0, weights=volume[label == g]) for g in groups]
        new_r = [np.cbrt(volume[label == g].sum()) for g in groups]
        new_s = [score[label == g].max() for g in groups]
        center = np.concatenate([center[single], np.reshape(new_c, (-1, 3))])
        radius = np.concatenate([radius[single], new_r])
        score = np.concatenate([score[single], new_s])
    return Blobs(center, radius, score)
