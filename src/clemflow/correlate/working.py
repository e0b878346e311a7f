"""The EM volume at the voxel size an analysis needs, read plane by plane so a day's run fits in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["bin_factors", "binned_origin_um", "binned_volume", "fill_no_data"]

Target = float | tuple[float, float, float]


def bin_factors(voxel_um: tuple[float, float, float], target_um: Target) -> tuple[int, int, int]:
    """Integer (z, y, x) binning that brings each voxel edge up to about ``target_um`` (one value or z, y, x)."""
    targets = (target_um,) * 3 if isinstance(target_um, int | float) else tuple(target_um)
    return tuple(max(1, int(np.floor(t / v + 0.25))) for t, v in zip(targets, voxel_um))  # type: ignore[return-value]


def fill_no_data(block: np.ndarray, no_data: float | None = 0) -> np.ndarray:
    """Replace the aligned store's "no data" value (0: outside the slice after its shift) by the median of the rest.

    Left at 0 it reads as the densest material there is, and a detector of dense objects would find the
    margins of every drifted slice.
    """
    if no_data is None:
        return block
    empty = block == no_data
    if empty.any() and not empty.all():
        block = block.astype(np.float32, copy=True)
        block[empty] = np.median(block[~empty])
    return block


def binned_volume(data: Any, voxel_um: tuple[float, float, float], target_um: Target,
                  progress: Callable[[int, int], None] | None = None,
                  no_data: float | None = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Mean-bin a (Z, Y, X) array-like (numpy, zarr, memmap) to about ``target_um`` voxels; returns (float32, voxel).

    Voxels equal to ``no_data`` are filled first (:func:`fill_no_data`). Planes are read ``fz`` at a time; the last incomplete group of planes and edge rows/columns are dropped
    (less than one binned voxel), so the origin, the centre of voxel (0, 0, 0), moves by half the binning: the
    returned volume's voxel (0, 0, 0) is centred at ``((f - 1) / 2) * voxel`` in the input's frame, which
    callers add back with :func:`binned_origin_um`.
    """
    fz, fy, fx = bin_factors(voxel_um, target_um)
    nz, ny, nx = (int(s) for s in data.shape)
    oz, oy, ox = nz // fz, ny // fy, nx // fx
    if min(oz, oy, ox) == 0:
        raise ValueError(f"volume of shape {data.shape} is smaller than one {target_um} µm voxel")
    out = np.empty((oz, oy, ox), np.float32)
    for k in range(oz):
        block = fill_no_data(np.asarray(data[k * fz:(k + 1) * fz, : oy * fy, : ox * fx], dtype=np.float32), no_data)
        out[k] = block.reshape(fz, oy, fy, ox, fx).mean(axis=(0, 2, 4))
        if progress is not None:
            progress(k + 1, oz)
    return out, (voxel_um[0] * fz, voxel_um[1] * fy, voxel_um[2] * fx)


def binned_origin_um(voxel_um: tuple[float, float, float], target_um: Target) -> np.ndarray:
    """``[x, y, z]`` µm of the binned volume's voxel (0, 0, 0) centre in the unbinned physical frame."""
    fz, fy, fx = bin_factors(voxel_um, target_um)
    return np.array([(fx - 1) / 2 * voxel_um[2], (fy - 1) / 2 * voxel_um[1], (fz - 1) / 2 * voxel_um[0]])
