"""Applying transforms to pixels: sub-pixel shifts for templates, the final warp for the aligned volume."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .transforms import SliceTransform

__all__ = ["shift_image", "warp_slice"]


def shift_image(image: NDArray[np.floating], dx: float, dy: float) -> NDArray[np.float32]:
    """Move the content by (dx, dy) px (cubic spline; edges repeated so a template has no black border)."""
    return ndimage.shift(np.asarray(image, np.float32), (dy, dx), order=3, mode="nearest").astype(np.float32, copy=False)


def warp_slice(image: NDArray[np.generic], transform: SliceTransform) -> NDArray[np.generic]:
    """The input slice resampled into the aligned frame (bilinear), same shape and dtype, 0 where it has no data."""
    m = transform.matrix(image.shape[:2])
    inv = np.linalg.inv(m)
    # scipy works in (row, col): swap x and y of the output -> input map
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    rc = swap @ inv @ swap
    src = np.asarray(image)
    out = ndimage.affine_transform(src.astype(np.float32, copy=False), rc[:2, :2], offset=rc[:2, 2], order=1,
                                   mode="constant", cval=0.0)
    if np.issubdtype(src.dtype, np.integer):
        info = np.iinfo(src.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(src.dtype)
    return out.astype(src.dtype, copy=False)
