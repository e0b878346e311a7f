"""One OME-TIFF per dish, target and timepoint, valid from its first byte.

The file is created at full size before the first frame (tifffile memmap), so
a crash leaves a readable file whose missing frames are zeros; a sidecar
`<name>.frames.jsonl` records, frame by frame, what the instrument reported
(stage position, focus, exposure, time) and every gap, so a missing frame is a
recorded gap at its own index and no later frame ever moves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

__all__ = ["StackWriter", "read_frame_records"]


@dataclass
class StackWriter:
    path: Path
    channels: list[str]
    planes: int
    shape_yx: tuple[int, int]
    pixel_size_um: float
    z_step_um: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; acquired data are never overwritten")
        ome = {
            "axes": "CZYX",
            "PhysicalSizeX": self.pixel_size_um, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": self.pixel_size_um, "PhysicalSizeYUnit": "µm",
            "PhysicalSizeZ": self.z_step_um, "PhysicalSizeZUnit": "µm",
            "Channel": {"Name": list(self.channels)},
            "Description": json.dumps(self.metadata, default=str),
        }
        shape = (len(self.channels), self.planes, *self.shape_yx)
        self._data = tifffile.memmap(self.path, shape=shape, dtype="uint16", metadata=ome, ome=True)
        self._records = open(self._sidecar(self.path), "a", encoding="utf-8")
        self.frames = 0
        self.gaps: list[dict[str, Any]] = []

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name.replace(".ome.tif", "") + ".frames.jsonl")

    def write(self, c: int, z: int, image: np.ndarray, reported: dict[str, Any]) -> None:
        self._data[c, z] = image
        self._record({"c": c, "z": z, "status": "ok", **reported})
        self.frames += 1

    def gap(self, c: int, z: int, reason: str, reported: dict[str, Any] | None = None) -> None:
        record = {"c": c, "z": z, "status": "gap", "reason": reason, **(reported or {})}
        self.gaps.append(record)
        self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        self._records.write(json.dumps(record, default=str) + "\n")
        self._records.flush()

    def close(self, complete: bool) -> None:
        self._data.flush()
        del self._data
        self._record({"status": "closed", "complete": complete, "frames": self.frames, "gaps": len(self.gaps)})
        os.fsync(self._records.fileno())
        self._records.close()


def read_frame_records(stack_path: str | Path) -> list[dict[str, Any]]:
    """The per-frame records of a stack (tolerates a line cut off by a crash)."""
    records = []
    sidecar = StackWriter._sidecar(Path(stack_path))
    if not sidecar.exists():
        return records
    for line in sidecar.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
