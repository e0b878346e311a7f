"""The two volumes correlation starts from, with the voxel sizes that make their coordinates physical.

Registration works in µm, so a file whose voxel size is unknown cannot be
correlated: sizes come from the file's own metadata (OME, ImageJ, OME-Zarr
multiscales) and, failing that, from an explicit override; a guess would
silently scale the result. Channels are found by name because the same stain
sits at different indices in different protocols.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from ..align.outputs import ALIGNED, DISPLAY
from ..align.volume import VolumeError, read_scale, read_volume

__all__ = ["ElectronVolume", "LightStack", "read_em", "read_lm", "STAIN_CHANNELS"]

Voxel = tuple[float, float, float]

STAIN_CHANNELS: dict[str, str] = {
    "bodipy": "488",
    "lysotracker": "405",
    "particle": "639",
}
"""Stain names a channel may be asked for by, and the excitation line they are imaged with in clemflow protocols."""

_UM_PER_UNIT = {
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "\\u00b5m": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "mm": 1e3, "millimeter": 1e3,
    "millimetre": 1e3, "m": 1e6, "meter": 1e6, "metre": 1e6, "å": 1e-4, "angstrom": 1e-4, "cm": 1e4,
    "centimeter": 1e4,
}


@dataclass(frozen=True, eq=False)
class LightStack:
    """A confocal stack as (C, Z, Y, X), its channel names and voxel size (z, y, x) µm.

    ``selected`` is the channel correlation uses for droplets (the one asked for, or the one that looks like the
    BODIPY channel), or None when neither could be told.
    """

    data: np.ndarray
    channels: list[str]
    voxel_um: Voxel
    path: Path | None = None
    selected: str | None = None

    def index(self, name_or_index: str | int) -> int:
        """The index of a channel given by name (``"488"``, ``"BODIPY"``) or by index (``1``, ``"1"``)."""
        found = _find_channel(self.channels, name_or_index)
        if found is None:
            where = f"{self.path}: " if self.path else ""
            raise ValueError(f"{where}no channel {name_or_index!r}; the file has channels "
                             f"{', '.join(f'{i}: {c!r}' for i, c in enumerate(self.channels))}; give --lm-channel "
                             "with one of these names or indices")
        return found

    def channel(self, name_or_index: str | int) -> np.ndarray:
        """One channel as (Z, Y, X)."""
        return self.data[self.index(name_or_index)]


@dataclass(frozen=True, eq=False)
class ElectronVolume:
    """An aligned EM volume (Z, Y, X), possibly lazy (a zarr array: index it like numpy), and its voxel size.

    ``dense_is_dark``: stained, dense matter (membranes, droplets, particles) is dark, as in the inverted
    backscatter images a FIB-SEM run records.
    """

    data: Any
    voxel_um: Voxel
    path: Path | None = None
    dense_is_dark: bool = True
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]


def read_lm(path: str | Path, *, channel: str | int | None = None, voxel_um: Voxel | None = None) -> LightStack:
    """Read a confocal stack (OME-TIFF in CZYX, ZCYX or ZYX, or an ImageJ hyperstack) as a :class:`LightStack`.

    ``channel`` is checked now so that a wrong name fails before any work; ``voxel_um`` (z, y, x) overrides the
    file's metadata, and is required when the file has none.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; give the confocal stack (an .ome.tif) with --lm")
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes
        meta = _tiff_metadata(tif)
    data = _to_czyx(data, axes, path)
    channels = [str(c) for c in meta.get("channels") or []]
    if len(channels) != data.shape[0]:
        channels = [f"C{i}" for i in range(data.shape[0])]
    voxel = _voxel(path, voxel_um, meta.get("voxel_um"), data.shape[1], "--lm-voxel-um")
    stack = LightStack(data=data, channels=channels, voxel_um=voxel, path=path)
    if channel is not None:
        selected: int | None = stack.index(channel)
    else:
        selected = _find_channel(channels, "bodipy") if len(channels) > 1 else 0
    return LightStack(data=data, channels=channels, voxel_um=voxel, path=path,
                      selected=None if selected is None else channels[selected])


def read_em(path: str | Path, *, voxel_um: Voxel | None = None, dense_is_dark: bool = True) -> ElectronVolume:
    """Read an aligned EM volume: an alignment folder (``clemflow align --out``), a run folder (its ``aligned/``),
    an OME-Zarr, or a TIFF stack (OME or ImageJ metadata).

    Of an alignment folder the aligned store is read, not its display copy: the display copy is contrast-equalised
    (CLAHE) and smoothed, which flattens the density differences droplet detection relies on; the display copy is
    used only when it is all there is. ``voxel_um`` (z, y, x) overrides the metadata.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; give the EM volume with --em")
    if path.is_dir():
        store = _em_store(path)
        data, meta_voxel, source = _read_zarr(store)
        source["store"] = str(store)
    else:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
            meta = _tiff_metadata(tif)
        data = _tiff_array(path)
        data = _to_zyx(data, axes, shape, path)
        meta_voxel, source = meta.get("voxel_um"), {"format": "ome-tiff" if meta.get("ome") else "tiff"}
    voxel = _voxel(path, voxel_um, meta_voxel, int(data.shape[0]), "--em-voxel-um")
    return ElectronVolume(data=data, voxel_um=voxel, path=path, dense_is_dark=dense_is_dark, source=source)


# -- channels -----------------------------------------------------------------------------------------------------

def _find_channel(channels: list[str], wanted: str | int) -> int | None:
    """Exact name (any case), then an index, then the one name containing the wanted one or its stain alias."""
    if isinstance(wanted, (int, np.integer)):
        return int(wanted) % len(channels) if -len(channels) <= int(wanted) < len(channels) else None
    key = str(wanted).strip().lower()
    names = [c.strip().lower() for c in channels]
    if key in names:
        return names.index(key)
    if key.lstrip("-").isdigit() and -len(channels) <= int(key) < len(channels):
        return int(key) % len(channels)
    candidates = [key] + [line for stain, line in STAIN_CHANNELS.items() if stain in key]
    candidates += [stain for stain, line in STAIN_CHANNELS.items() if line == key]
    for cand in candidates:
        hits = [i for i, n in enumerate(names) if len(cand) >= 3 and cand in n]
        if len(hits) == 1:
            return hits[0]
    return None


# -- TIFF ---------------------------------------------------------------------------------------------------------

def _tiff_metadata(tif: tifffile.TiffFile) -> dict[str, Any]:
    """Voxel size (z, y, x) µm (entries None where unknown) and channel names, from OME or ImageJ metadata."""
    if tif.is_ome and tif.ome_metadata:
        return {"ome": True, **_ome_metadata(tif.ome_metadata)}
    if tif.is_imagej and tif.imagej_metadata is not None:
        return _imagej_metadata(tif.imagej_metadata, tif.pages[0])
    return {}


def _ome_metadata(xml: str) -> dict[str, Any]:
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    sizes = []
    for axis in ("Z", "Y", "X"):
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        sizes.append(_to_um(value, unit))
    channels = [el.get("Name") or f"C{i}" for i, el in
                enumerate(el for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel")]
    return {"voxel_um": tuple(sizes), "channels": channels}


def _imagej_metadata(meta: dict[str, Any], page: Any) -> dict[str, Any]:
    unit = meta.get("unit")
    xy = [None, None]
    for k, tag in enumerate(("YResolution", "XResolution")):
        res = page.tags.get(tag)
        if res is not None and unit:
            num, den = res.value
            if num and den and (num, den) != (1, 1):
                xy[k] = _to_um(den / num, unit)
    z = _to_um(meta.get("spacing"), unit) if unit else None
    out: dict[str, Any] = {"voxel_um": (z, xy[0], xy[1])}
    labels = meta.get("Labels")
    n_channels = int(meta.get("channels", 1))
    if labels and n_channels > 1 and len(labels) >= n_channels:
        out["channels"] = [str(s) for s in labels[:n_channels]]
    return out


def _to_um(value: Any, unit: str | None) -> float | None:
    if value is None:
        return None
    scale = _UM_PER_UNIT.get(str(unit or "µm").strip().lower())
    if scale is None:
        return None
    value = float(value) * scale
    return value if np.isfinite(value) and value > 0 else None


def _to_czyx(data: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Put a series' axes in (C, Z, Y, X) order; singleton extra axes dropped, a lone unnamed axis taken as Z."""
    axes = axes.upper()
    for k in range(len(axes) - 1, -1, -1):
        if axes[k] not in "CZYX" and data.shape[k] == 1:
            data, axes = data.take(0, axis=k), axes[:k] + axes[k + 1:]
    if "Z" not in axes:
        spare = [a for a in axes if a not in "CYX"]
        if len(spare) == 1:
            axes = axes.replace(spare[0], "Z")
    extra = [a for a in axes if a not in "CZYX"]
    if extra or "Y" not in axes or "X" not in axes:
        raise ValueError(f"{path}: image axes {axes} {data.shape}; expected a z-stack (C)ZYX of one time point")
    for a in "CZ":
        if a not in axes:
            data, axes = data[np.newaxis], a + axes
    order = [axes.index(a) for a in "CZYX"]
    return np.ascontiguousarray(np.transpose(data, order))


def _tiff_array(path: Path) -> Any:
    """The first series, memory-mapped when the file allows (a large EM stack need not fit in memory)."""
    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:
        return tifffile.imread(path)


def _to_zyx(data: Any, axes: str, shape: tuple[int, ...], path: Path) -> Any:
    axes = axes.upper()
    keep = [k for k, n in enumerate(shape) if n != 1 or axes[k] in "YX"]
    if len(keep) == 2:
        keep = [k for k in range(len(shape)) if axes[k] in "YX"]
        data = np.asarray(data).reshape(1, shape[keep[0]], shape[keep[1]])
        return data
    if len(keep) != 3 or axes[keep[1]] != "Y" or axes[keep[2]] != "X":
        raise ValueError(f"{path}: image axes {axes} {tuple(shape)}; expected one grey-level stack (Z, Y, X)")
    return np.asarray(data).reshape(shape[keep[0]], shape[keep[1]], shape[keep[2]]) if data.ndim != 3 else data


# -- zarr ---------------------------------------------------------------------------------------------------------

def _em_store(path: Path) -> Path:
    """The OME-Zarr store to read for ``path``: itself, or the aligned (else display) store of an alignment folder."""
    for folder in (path, path / "aligned"):
        for name in (ALIGNED, DISPLAY):
            if (folder / name).is_dir():
                return folder / name
    if (path / "zarr.json").exists() or (path / ".zattrs").exists() or (path / ".zgroup").exists():
        return path
    raise FileNotFoundError(f"{path}: neither an OME-Zarr nor an alignment folder (no {ALIGNED} here or in "
                            f"{path / 'aligned'}); give `clemflow align --out DIR`, a run folder, an .ome.zarr or a "
                            "TIFF stack with --em")


def _read_zarr(store: Path) -> tuple[Any, Voxel | None, dict[str, Any]]:
    if (store / "zarr.json").exists():
        try:
            (z, y, x), units = read_scale(store)
            array = read_volume(store)
            if array.ndim == 3:
                voxel = tuple(_to_um(s, u) if u else None for s, u in zip((z, y, x), units))
                return array, voxel, {"format": "ome-zarr"}  # type: ignore[return-value]
        except (VolumeError, KeyError, TypeError, StopIteration):
            pass
    return _read_generic_zarr(store)


def _read_generic_zarr(store: Path) -> tuple[Any, Voxel | None, dict[str, Any]]:
    """Level 0 of any OME-Zarr (0.4 on zarr v2, or 0.5), singleton t/c axes dropped."""
    group = zarr.open_group(store, mode="r")
    attrs = dict(group.attrs)
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        raise ValueError(f"{store}: a zarr store without OME multiscales metadata; give an OME-Zarr or a TIFF stack")
    ms = multiscales[0]
    dataset = ms["datasets"][0]
    array = group[dataset["path"]]
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])] or list("tczyx"[-array.ndim:])
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes", [])] or [None] * array.ndim
    scale = next((t["scale"] for t in dataset.get("coordinateTransformations", []) if t["type"] == "scale"),
                 [1.0] * array.ndim)
    index: list[Any] = []
    spatial = []
    for k, name in enumerate(axes):
        if name in ("z", "y", "x"):
            index.append(slice(None))
            spatial.append(k)
        elif array.shape[k] == 1:
            index.append(0)
        else:
            raise ValueError(f"{store}: axis {name!r} has {array.shape[k]} entries; an EM volume has one channel "
                             "and one time point")
    if [axes[k] for k in spatial] != ["z", "y", "x"]:
        raise ValueError(f"{store}: spatial axes {[axes[k] for k in spatial]}; expected z, y, x")
    data = array if all(isinstance(i, slice) for i in index) else _Lazy(array, tuple(index))
    voxel = tuple(_to_um(scale[k], units[k]) if units[k] else None for k in spatial)
    return data, voxel, {"format": "ome-zarr"}  # type: ignore[return-value]


class _Lazy:
    """A (z, y, x) view of an array with singleton leading axes, read only where indexed."""

    def __init__(self, array: Any, index: tuple[Any, ...]) -> None:
        self._array, self._index = array, index
        self.shape = tuple(n for n, i in zip(array.shape, index) if isinstance(i, slice))
        self.dtype = array.dtype
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        it = iter(key)
        full = tuple(next(it) if isinstance(i, slice) else i for i in self._index)
        return np.asarray(self._array[full])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :, :]
        return out.astype(dtype) if dtype is not None else out


# -- voxel sizes --------------------------------------------------------------------------------------------------

def _voxel(path: Path, override: Voxel | None, meta: Any, planes: int, option: str) -> Voxel:
    if override is not None:
        values = tuple(float(v) for v in override)
        if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"{option} {override}: three positive sizes Z Y X in µm")
        return values  # type: ignore[return-value]
    z, y, x = tuple(meta) if meta is not None else (None, None, None)
    if y is None and x is not None:
        y = x
    if x is None and y is not None:
        x = y
    if z is None and planes == 1 and x is not None:
        z = x
    if z is None or y is None or x is None:
        missing = [n for n, v in zip("ZYX", (z, y, x)) if v is None]
        raise ValueError(f"{path}: no physical voxel size in the file's metadata (missing {', '.join(missing)}); "
                         f"give it with {option} Z Y X (µm)")
    return float(z), float(y), float(x)
