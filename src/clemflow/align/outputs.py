"""The files of an alignment folder, and the aligned volume written together with its display copy.

``clemflow align``, its dask workers and the live analysis of a run all write
the same folder; the names and the pairing live here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from numpy.typing import DTypeLike, NDArray

from .display import display_slice
from .volume import AlignedVolumeWriter

__all__ = ["ALIGNED", "DISPLAY", "TRANSFORMS", "AlignedStores"]

ALIGNED = "aligned.ome.zarr"
DISPLAY = "display.ome.zarr"
TRANSFORMS = "transforms.csv"


class AlignedStores:
    """The aligned volume and, unless ``display`` is False, its display copy (uint8, CLAHE + Gaussian)."""

    def __init__(self, out: str | Path, shape_yx: tuple[int, int], dtype: DTypeLike, pixel_size_nm: float | None,
                 slice_thickness_nm: float | None, *, display: bool = True, depth: int = 0) -> None:
        out = Path(out)
        self.aligned = AlignedVolumeWriter(out / ALIGNED, shape_yx, dtype, pixel_size_nm, slice_thickness_nm, depth=depth,
                                           name="aligned")
        self.display = (AlignedVolumeWriter(out / DISPLAY, shape_yx, "uint8", pixel_size_nm, slice_thickness_nm,
                                            depth=depth, name="display") if display else None)

    def write(self, z: int, image: NDArray[Any]) -> None:
        """Slice ``z`` of the aligned volume, and its display copy."""
        self.aligned.write(z, image)
        if self.display is not None:
            self.display.write(z, display_slice(image))
