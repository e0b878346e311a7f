"""One TIFF per slice, written so that a crash never leaves half a file under a slice's name; frame checks.

``slices/slice_000001.tif`` holds the face image as the instrument sent it
and, in its ImageDescription, one JSON object: the instrument's own report of
the frame (beams, detector, stage, working distance, dwell, pixel size, start
and end times) under ``instrument``, and the engine's account (slice index,
nominal depth, idempotency keys, tracking state) beside it. The file is
written under a temporary name, flushed to disk and renamed: a slice either
exists whole or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

__all__ = ["FrameProblem", "SliceWriter", "check_frame", "read_slice", "slice_name", "write_tiff"]

BLANK_P99_FRACTION = 0.03  # a frame whose 99.5th percentile is below 3 % of full scale saw no signal
FLAT_STD_FRACTION = 0.004  # ... or one that hardly varies at all
TRUNCATED_ROWS_FRACTION = 0.02  # trailing constant rows: the scan stopped early


def slice_name(index: int) -> str:
    return f"slice_{index:06d}.tif"


@dataclass(frozen=True)
class FrameProblem:
    """Why a frame cannot be kept as a slice (imaging is safe to repeat, so the engine grabs again)."""

    kind: str  # size, dtype, blank, truncated
    message: str


def check_frame(image: NDArray[Any], width: int, height: int, bit_depth: int) -> FrameProblem | None:
    """None when the frame is whole and shows something; else what is wrong with it."""
    if image.ndim != 2 or image.shape != (height, width):
        return FrameProblem("size", f"frame is {list(image.shape)}, asked for [{height}, {width}] (rows, columns)")
    want = np.uint16 if bit_depth == 16 else np.uint8
    if image.dtype != want:
        return FrameProblem("dtype", f"frame is {image.dtype}, asked for {np.dtype(want).name}")
    full = 65535.0 if bit_depth == 16 else 255.0
    step = max(1, int(np.sqrt(image.size / 65536)))  # a subsample is plenty for these statistics
    sample = np.asarray(image[::step, ::step], dtype=np.float32)
    if float(np.percentile(sample, 99.5)) < BLANK_P99_FRACTION * full:
        return FrameProblem("blank", "frame is dark (no signal: beam blanked or off, detector off?)")
    if float(sample.std()) < FLAT_STD_FRACTION * full:
        return FrameProblem("blank", f"frame is flat (standard deviation {sample.std():.2f} of {full:.0f})")
    tail = image[-max(2, height // 4):]
    rows_constant = (tail == tail[:, :1]).all(axis=1)
    trailing = 0
    for constant in rows_constant[::-1]:
        if not constant:
            break
        trailing += 1
    if trailing >= max(2, int(TRUNCATED_ROWS_FRACTION * height)):
        return FrameProblem("truncated", f"the last {trailing} of {height} rows are constant: the scan ended early")
    return None


class SliceWriter:
    """Writes ``slices/slice_NNNNNN.tif`` atomically; rewriting an index replaces it whole."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "slices"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.dir / slice_name(index)

    def write(self, index: int, image: NDArray[Any], metadata: dict[str, Any]) -> Path:
        """Write slice ``index``; raises ``OSError`` (e.g. disk full) with nothing left under the final name."""
        return write_tiff(self.path(index), image, metadata)

    def existing(self) -> list[int]:
        """Indices of the slice files on disk."""
        out = []
        for p in self.dir.glob("slice_*.tif"):
            try:
                out.append(int(p.stem.split("_")[1]))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def remove_stale(self) -> int:
        """Delete temporary files a crash left behind (never a finished slice); returns how many."""
        stale = list(self.dir.glob(".slice_*.tif.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


def write_tiff(final: Path, image: NDArray[Any], metadata: dict[str, Any]) -> Path:
    """Write one TIFF whole (temporary name, fsync, rename) with ``metadata`` as JSON in its description."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    description = json.dumps(metadata, separators=(",", ":"), default=_json_default)
    pixel = (metadata.get("instrument") or {}).get("pixel_size_m") or [None, None]
    resolution = None
    if pixel[0] and pixel[1]:
        resolution = (1.0 / (float(pixel[0]) * 100.0), 1.0 / (float(pixel[1]) * 100.0))  # pixels per cm
    try:
        with open(tmp, "wb") as handle:
            tifffile.imwrite(handle, np.ascontiguousarray(image), description=description, metadata=None,
                             resolution=resolution, resolutionunit="CENTIMETER" if resolution else None)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def read_slice(path: Path) -> tuple[NDArray[Any], dict[str, Any]]:
    """A slice's pixels and its metadata (the JSON written by ``SliceWriter``)."""
    with tifffile.TiffFile(path) as tif:
        image = tif.pages[0].asarray()
        description = tif.pages[0].description
    try:
        meta = json.loads(description)
    except json.JSONDecodeError:
        meta = {}
    return image, meta


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
