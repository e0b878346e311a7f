"""The aligned volume on disk: OME-Zarr 0.5 (zarr v3), written slice by slice, readable while it grows.

One chunk never spans two slices (chunks are ``(1, rows, cols)``), so slices
written by different processes never touch the same file: dask workers may
write distinct slices at once, provided the array was created beforehand
with its final depth (growing the depth rewrites the array's metadata, which
only one process may do). Opening an existing store continues it: nothing
already written is erased, and the depth only ever grows.

Level ``0`` holds the full resolution, level ``1`` a 2x2 mean for viewers;
physical sizes are in micrometres on axes z, y, x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import DTypeLike, NDArray

__all__ = ["AlignedVolumeWriter", "VolumeError", "read_scale", "read_volume"]

OME_VERSION = "0.5"


class VolumeError(ValueError):
    """An existing store does not fit what is being written; the message says which store and why."""


class AlignedVolumeWriter:
    """Writes slices of an (z, y, x) volume into ``path`` (an ``.ome.zarr`` folder), creating or continuing it.

    ``depth`` is the z extent to create up front (the final one when several processes write); ``write`` beyond it
    grows the volume. ``pixel_size_nm`` None writes pixel units; ``slice_thickness_nm`` None assumes isotropic voxels.
    """

    def __init__(self, path: str | Path, shape_yx: tuple[int, int], dtype: DTypeLike, pixel_size_nm: float | None,
                 slice_thickness_nm: float | None, chunks: tuple[int, int, int] = (1, 512, 512), depth: int = 0,
                 levels: int = 2, name: str = "aligned") -> None:
        self.path = Path(path)
        self.shape_yx = (int(shape_yx[0]), int(shape_yx[1]))
        self.dtype = np.dtype(dtype)
        if chunks[0] != 1:
            raise ValueError(f"chunks {chunks}: a chunk must hold exactly one slice (first entry 1)")
        if levels not in (1, 2):
            raise ValueError(f"levels={levels}: 1 (full resolution) or 2 (plus a 2x downsample)")
        self.levels = levels
        level_shapes = [self.shape_yx, ((self.shape_yx[0] + 1) // 2, (self.shape_yx[1] + 1) // 2)][:levels]
        if (self.path / "zarr.json").exists():
            self._group = zarr.open_group(self.path, mode="r+", zarr_format=3)
            self._arrays = [self._open_level(str(k), level_shapes[k]) for k in range(levels)]
            if depth > self.depth:
                self._grow(depth)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._group = zarr.open_group(self.path, mode="w-", zarr_format=3)
        self._group.attrs["ome"] = _ome_attributes(name, pixel_size_nm, slice_thickness_nm, levels)
        self._arrays = []
        for k, (h, w) in enumerate(level_shapes):
            self._arrays.append(self._group.create_array(
                str(k), shape=(int(depth), h, w), chunks=(1, min(chunks[1], h), min(chunks[2], w)),
                dtype=self.dtype, fill_value=0, dimension_names=("z", "y", "x")))

    @property
    def depth(self) -> int:
        return int(self._arrays[0].shape[0])

    def write(self, z: int, image: NDArray[Any]) -> None:
        """Store ``image`` as slice ``z`` (and its 2x downsample), growing the volume if ``z`` is beyond its depth."""
        image = np.asarray(image)
        if image.shape != self.shape_yx:
            raise ValueError(f"{self.path}: slice {z} is {image.shape}, the volume's slices are {self.shape_yx}")
        if z < 0:
            raise ValueError(f"{self.path}: slice position {z} is negative")
        if z >= self.depth:
            self._grow(z + 1)
        image = image.astype(self.dtype, copy=False)
        self._arrays[0][z] = image
        if self.levels > 1:
            self._arrays[1][z] = downsample2(image)

    def _grow(self, depth: int) -> None:
        """Grow to ``depth`` slices, never shrinking below what another writer of this store has made it."""
        for k, array in enumerate(self._arrays):
            current = zarr.open_array(self.path / str(k), mode="r+", zarr_format=3)
            new_depth = max(depth, int(current.shape[0]))
            if new_depth > current.shape[0]:
                current.resize((new_depth, *current.shape[1:]))
            self._arrays[k] = current

    def _open_level(self, key: str, shape: tuple[int, int]) -> Any:
        try:
            array = self._group[key]
        except KeyError:
            raise VolumeError(f"{self.path}: an existing store without level {key}; it was not written by clemflow "
                              "align: give another output folder") from None
        if tuple(array.shape[1:]) != shape or np.dtype(array.dtype) != self.dtype:
            raise VolumeError(f"{self.path}/{key}: holds slices of {tuple(array.shape[1:])} {array.dtype}, this "
                              f"alignment writes {shape} {self.dtype}; give another output folder")
        return array


def downsample2(image: NDArray[Any]) -> NDArray[Any]:
    """2x2 mean (edge rows and columns repeated for odd sizes), in the input's dtype."""
    h, w = image.shape
    padded = np.pad(image, ((0, h % 2), (0, w % 2)), mode="edge") if (h % 2 or w % 2) else image
    total = (padded[0::2, 0::2].astype(np.float32) + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2])
    out = total / 4.0
    if np.issubdtype(image.dtype, np.integer):
        out = np.rint(out)
    return out.astype(image.dtype)


def read_volume(path: str | Path, level: int = 0) -> Any:
    """The (z, y, x) zarr array of ``level`` in an OME-Zarr written here (read-only; index it like numpy)."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise VolumeError(f"{path}: not a zarr v3 store (no zarr.json); give the .ome.zarr folder of an alignment")
    group = zarr.open_group(path, mode="r", zarr_format=3)
    try:
        return group[str(level)]
    except KeyError:
        raise VolumeError(f"{path}: no resolution level {level}") from None


def read_scale(path: str | Path, level: int = 0) -> tuple[tuple[float, float, float], tuple[str | None, ...]]:
    """Voxel size (z, y, x) and the axes' units, from the store's OME multiscales metadata."""
    group = zarr.open_group(Path(path), mode="r", zarr_format=3)
    try:
        multiscale = group.attrs["ome"]["multiscales"][0]
    except (KeyError, IndexError, TypeError):
        raise VolumeError(f"{path}: no OME multiscales metadata") from None
    dataset = next((d for d in multiscale["datasets"] if d["path"] == str(level)), None)
    if dataset is None:
        raise VolumeError(f"{path}: the multiscales metadata lists no level {level}")
    scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
    units = tuple(axis.get("unit") for axis in multiscale["axes"])
    return (float(scale[0]), float(scale[1]), float(scale[2])), units


def _ome_attributes(name: str, pixel_size_nm: float | None, thickness_nm: float | None, levels: int) -> dict[str, Any]:
    if pixel_size_nm:
        unit: str | None = "micrometer"
        xy = float(pixel_size_nm) / 1000.0
        z = float(thickness_nm) / 1000.0 if thickness_nm else xy
    else:
        unit, xy, z = None, 1.0, 1.0
    axes = []
    for axis in ("z", "y", "x"):
        entry: dict[str, Any] = {"name": axis, "type": "space"}
        if unit:
            entry["unit"] = unit
        axes.append(entry)
    datasets = []
    for k in range(levels):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [z, xy * 2 ** k, xy * 2 ** k]}]
        if k:  # a 2x2 mean sits half a full-resolution pixel off the first pixel's centre
            transforms.append({"type": "translation", "translation": [0.0, xy * (2 ** k - 1) / 2, xy * (2 ** k - 1) / 2]})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    multiscale: dict[str, Any] = {"name": name, "axes": axes, "datasets": datasets}
    if levels > 1:
        multiscale["type"] = "2x2 mean in y and x"
    return {"version": OME_VERSION, "multiscales": [multiscale]}
