"""Where slices to align come from: a multi-page TIFF, a folder of slice TIFFs, or a slice-and-view run folder.

Every kind is read one slice at a time (a terabyte run never fits in memory)
and names its slices by index: the page or file position for a TIFF stack or
folder, the engine's slice number for a run folder (which may have gaps where
a slice is missing). A source can be pickled and sent to a dask worker, which
reopens the file itself.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

__all__ = ["SliceSource", "SourceError", "open_source"]

TIFF_SUFFIXES = (".tif", ".tiff")
ACCEPTED = ("a multi-page TIFF (.tif/.tiff), a folder of slice TIFFs, "
            "or a slice-and-view run folder (with slices.jsonl)")


class SourceError(ValueError):
    """The input cannot be read as slices; the message names the path and what would fix it."""


@dataclass(frozen=True)
class _Geometry:
    shape: tuple[int, int]
    dtype: np.dtype[Any]
    pixel_size_nm: float | None
    slice_thickness_nm: float | None


class SliceSource:
    """Slices of one input, read lazily by index; ``len``, ``shape`` (rows, cols), ``dtype`` and physical sizes."""

    kind: str = ""

    def __init__(self, path: Path, indices: Sequence[int], geometry: _Geometry) -> None:
        self.path = Path(path)
        self.indices: tuple[int, ...] = tuple(int(i) for i in indices)
        self.shape = geometry.shape
        self.dtype = np.dtype(geometry.dtype).newbyteorder("=")
        self.pixel_size_nm = geometry.pixel_size_nm
        self.slice_thickness_nm = geometry.slice_thickness_nm
        self._position = {index: pos for pos, index in enumerate(self.indices)}

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, NDArray[Any]]]:
        for index in self.indices:
            yield index, self.read(index)

    def __contains__(self, index: object) -> bool:
        return index in self._position

    def read(self, index: int) -> NDArray[Any]:
        """The slice numbered ``index`` (see ``indices``) as a 2D array of ``shape`` and ``dtype``."""
        try:
            pos = self._position[int(index)]
        except KeyError:
            raise IndexError(f"{self.path}: no slice {index} (this input has slices {self._span()})") from None
        image = np.asarray(self._read(pos))
        if image.dtype != self.dtype and image.dtype.newbyteorder("=") == self.dtype:
            image = image.astype(self.dtype)  # a big-endian file
        if image.shape != self.shape or image.dtype != self.dtype:
            raise SourceError(f"{self._where(pos)}: slice {index} is {image.shape} {image.dtype}, the others are "
                              f"{self.shape} {self.dtype}; all slices of one stack must have the same size and type")
        return image

    def subset(self, indices: Sequence[int]) -> SliceSource:
        """The same input restricted to ``indices`` (what a dask task needs to carry, not the whole listing)."""
        keep = [i for i in indices if i in self._position]
        clone = copy.copy(self)
        clone.indices = tuple(keep)
        clone._position = {index: pos for pos, index in enumerate(clone.indices)}
        return clone

    def describe(self) -> dict[str, Any]:
        """What identifies this input (kind, path, slices, size): an alignment folder records it to resume safely."""
        return {"kind": self.kind, "path": str(self.path.resolve()), "slices": len(self),
                "first": self.indices[0], "last": self.indices[-1], "shape": list(self.shape),
                "dtype": self.dtype.name}

    def _read(self, pos: int) -> NDArray[Any]:
        raise NotImplementedError

    def _where(self, pos: int) -> str:
        return str(self.path)

    def _span(self) -> str:
        return f"{self.indices[0]}..{self.indices[-1]}" if self.indices else "none"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, {len(self)} slices {self._span()}, {self.shape}, "
                f"{self.dtype.name}, pixel {self.pixel_size_nm} nm, thickness {self.slice_thickness_nm} nm)")


class TiffStackSource(SliceSource):
    """A multi-page TIFF, one page per slice, read page by page from one open file handle."""

    kind = "tiff"

    def __init__(self, path: Path) -> None:
        self._tif: tifffile.TiffFile | None = None
        self._lock = threading.Lock()
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # any parser failure is the user's file
            raise SourceError(f"{path}: cannot be read as a TIFF ({exc}); accepted inputs are {ACCEPTED}") from None
        with tif:
            pages = tif.pages
            n = len(pages)
            if n == 0:
                raise SourceError(f"{path}: the TIFF holds no images; accepted inputs are {ACCEPTED}")
            first = pages.first
            if first.ndim != 2 or first.samplesperpixel != 1:
                raise SourceError(f"{path}: pages are {first.shape} (colour or multi-sample); a slice stack needs "
                                  "one grey 2D image per page: convert it to single-channel first")
            geometry = _Geometry(tuple(first.shape), first.dtype, *_tiff_physical(tif, first))  # type: ignore[arg-type]
            # ImageJ writes stacks over 4 GB with one IFD and the planes contiguous after it: map those instead
            self._contiguous: tuple[int, str] | None = None
            series = tif.series[0] if tif.series else None
            planes = int(np.prod(series.shape[:-2])) if series is not None and len(series.shape) > 2 else n
            if planes > n and series is not None and series.dataoffset is not None:
                self._contiguous = (int(series.dataoffset), series.dtype.str)
                n = planes
        self._map: np.memmap[Any, Any] | None = None
        super().__init__(path, range(n), geometry)

    def _read(self, pos: int) -> NDArray[Any]:
        with self._lock:
            if self._contiguous is not None:
                if self._map is None:
                    offset, dtype = self._contiguous
                    self._map = np.memmap(self.path, dtype=np.dtype(dtype), mode="r", offset=offset,
                                          shape=(self.indices[-1] + 1, *self.shape))
                return np.array(self._map[self.indices[pos]])
            if self._tif is None:
                self._tif = tifffile.TiffFile(self.path)
            return self._tif.pages[self.indices[pos]].asarray()  # type: ignore[union-attr]

    def _where(self, pos: int) -> str:
        return f"{self.path} page {self.indices[pos]}"

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._tif.close()
                self._tif = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tif"], state["_lock"], state["_map"] = None, None, None
        return state

    def __copy__(self) -> TiffStackSource:
        clone = object.__new__(TiffStackSource)
        clone.__setstate__(self.__getstate__())
        return clone

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class FileListSource(SliceSource):
    """One TIFF per slice: a folder of slice files, or a run folder's ``slices/`` listed by its ``slices.jsonl``."""

    def __init__(self, path: Path, kind: str, files: dict[int, Path], pixel_size_nm: float | None = None,
                 slice_thickness_nm: float | None = None) -> None:
        self.kind = kind
        self.files = dict(sorted(files.items()))
        first_index = next(iter(self.files))
        first = self.files[first_index]
        try:
            with tifffile.TiffFile(first) as tif:
                page = tif.pages.first
                shape, dtype, samples = tuple(page.shape), page.dtype, page.samplesperpixel
                pixel, thickness = _tiff_physical(tif, page)
        except FileNotFoundError:
            raise SourceError(f"{first}: slice {first_index} is listed but its file is missing") from None
        except Exception as exc:
            raise SourceError(f"{first}: cannot be read as a TIFF ({exc})") from None
        if len(shape) != 2 or samples != 1:
            raise SourceError(f"{first}: the slice is {shape} (colour or a stack); each slice file must hold one "
                              "grey 2D image")
        geometry = _Geometry(shape, dtype, pixel_size_nm or pixel, slice_thickness_nm or thickness)  # type: ignore[arg-type]
        super().__init__(path, list(self.files), geometry)

    def subset(self, indices: Sequence[int]) -> SliceSource:
        clone = super().subset(indices)
        assert isinstance(clone, FileListSource)
        clone.files = {i: self.files[i] for i in clone.indices}
        return clone

    def _read(self, pos: int) -> NDArray[Any]:
        file = self.files[self.indices[pos]]
        try:
            with tifffile.TiffFile(file) as tif:
                return tif.pages.first.asarray()
        except FileNotFoundError:
            raise SourceError(f"{file}: slice {self.indices[pos]} is listed but its file is missing") from None

    def _where(self, pos: int) -> str:
        return str(self.files[self.indices[pos]])


def open_source(path: str | Path) -> SliceSource:
    """Open ``path`` as a slice source; raise ``SourceError`` naming the path and the accepted kinds otherwise."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder; accepted inputs are {ACCEPTED}")
    if path.is_file():
        if path.suffix.lower() not in TIFF_SUFFIXES and path.name != "slices.jsonl":
            raise SourceError(f"{path}: not a TIFF; accepted inputs are {ACCEPTED}")
        if path.name == "slices.jsonl":
            return _run_folder(path.parent)
        return TiffStackSource(path)
    if (path / "slices.jsonl").is_file():
        return _run_folder(path)
    files = _tiff_files(path)
    if not files and (path / "slices").is_dir():
        files = _tiff_files(path / "slices")
    if not files:
        raise SourceError(f"{path}: the folder holds no .tif/.tiff files and no slices.jsonl; accepted inputs are "
                          f"{ACCEPTED}")
    if len(files) == 1:
        return TiffStackSource(files[0])
    return FileListSource(path, "folder", dict(enumerate(files)))


def _run_folder(run_dir: Path) -> FileListSource:
    from ..fibsem.stream import read_stream

    records = [r for r in read_stream(run_dir) if "index" in r and "path" in r]
    if not records:
        raise SourceError(f"{run_dir / 'slices.jsonl'}: lists no saved slice yet; wait for the first slice, or give "
                          "the slices/ folder to align the files on disk")
    files: dict[int, Path] = {}
    for record in records:
        files.setdefault(int(record["index"]), run_dir / str(record["path"]))
    last = records[-1]
    pixel = _nm((last.get("pixel_size_m") or [None])[0])
    thickness = _nm(last.get("thickness_m"))
    return FileListSource(run_dir, "run", files, pixel, thickness)


def _tiff_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    """slice_2 before slice_10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _nm(metres: Any) -> float | None:
    try:
        value = float(metres)
    except (TypeError, ValueError):
        return None
    return value * 1e9 if value > 0 else None


_OME_UNITS_NM = {"nm": 1.0, "µm": 1e3, "um": 1e3, "\u03bcm": 1e3, "mm": 1e6, "m": 1e9, "pm": 1e-3, "Å": 0.1}


def _tiff_physical(tif: tifffile.TiffFile, page: Any) -> tuple[float | None, float | None]:
    """Pixel size and slice thickness in nm from OME-XML, ImageJ, clemflow JSON or resolution tags, else None."""
    if tif.is_ome and tif.ome_metadata:
        found = _ome_physical(tif.ome_metadata)
        if found[0]:
            return found
    description = page.description or ""
    if description.startswith("{"):
        try:
            meta = json.loads(description)
        except json.JSONDecodeError:
            meta = {}
        instrument = meta.get("instrument") or {}
        clem = meta.get("clemflow") or {}
        pixel = _nm((instrument.get("pixel_size_m") or [None])[0])
        if pixel:
            return pixel, _nm(clem.get("slice_thickness_m"))
    ij = tif.imagej_metadata or {}
    unit_nm = _unit_nm(str(ij.get("unit", "")).replace("\\u00B5", "µ")) if ij else None
    pixel = _resolution_nm(page, unit_nm)
    thickness = None
    if ij and unit_nm and ij.get("spacing"):
        thickness = float(ij["spacing"]) * unit_nm
    return pixel, thickness


def _ome_physical(xml: str) -> tuple[float | None, float | None]:
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not pixels:
        return None, None
    tag = pixels.group(0)

    def size(axis: str) -> float | None:
        m = re.search(rf'PhysicalSize{axis}="([^"]+)"', tag)
        if not m:
            return None
        unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', tag)
        factor = _unit_nm(unit.group(1) if unit else "µm")
        try:
            return float(m.group(1)) * factor if factor else None
        except ValueError:
            return None

    return size("X"), size("Z")


def _unit_nm(unit: str) -> float | None:
    unit = unit.strip()
    if unit in _OME_UNITS_NM:
        return _OME_UNITS_NM[unit]
    lowered = unit.lower()
    if lowered in ("micron", "microns", "micrometer", "micrometre"):
        return 1e3
    if lowered in ("nanometer", "nanometre"):
        return 1.0
    return None


def _resolution_nm(page: Any, unit_nm: float | None) -> float | None:
    """Pixel size from XResolution (pixels per unit); ImageJ keeps its unit in the metadata, not the tag."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    per_unit = num / den
    unit_tag = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit_tag == 3:
        unit = 1e7  # centimetre in nm
    elif unit_tag == 2:
        unit = 2.54e7
    elif unit_nm:
        unit = unit_nm  # ImageJ writes resolution unit NONE and names the unit in its metadata
    else:
        return None
    size = unit / per_unit
    return size if size < 1e5 else None  # above 100 µm per pixel it is a writer's default dpi, not a measurement
