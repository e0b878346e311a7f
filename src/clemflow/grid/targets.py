"""`targets.json`: the cells to image, in grid coordinates, with their stage positions per instrument.

Grid coordinates (square label + offset from its centre, µm) are the truth of
a target: they do not change when the dish is moved. Stage positions are what
each instrument needs, with the error predicted from its grid registration.
The FIB-SEM engine reads the EM entries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..protocol.grid_scheme import GridScheme

__all__ = ["Target", "TargetsFile", "read_targets", "write_targets"]


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    sample: str
    label: str = Field(description="Grid square, e.g. '3C'.")
    offset_um: tuple[float, float] = Field(description="Offset from the square's centre in the grid frame, x right, y down.")
    lm_stage_um: tuple[float, float] | None = None
    lm_predicted_error_um: float | None = None
    em_stage_um: tuple[float, float] | None = None
    em_predicted_error_um: float | None = None


class TargetsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    scheme: GridScheme = Field(default_factory=GridScheme)
    targets: list[Target] = Field(default_factory=list)


def read_targets(path: str | Path) -> TargetsFile:
    return TargetsFile.model_validate_json(Path(path).read_text(encoding="utf-8"))


def write_targets(path: str | Path, targets: TargetsFile) -> None:
    """Replace the file atomically: a crash leaves the old or the new version, never half of one."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(targets.model_dump(mode="json"), indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
