"""Which cell to mill: the protocol's FIB-SEM target, looked up in a ``targets.json``.

``em_stage_um`` of a target is the EM stage position (µm) the grid
registration predicts for it (see ``clemflow.grid.targets``). A protocol with
``target.source: square`` names the sample, square and offset: the target
written for them is used. With ``source: confocal`` the first target that has
an EM position is used, unless ``name`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..grid.targets import Target, read_targets
from ..protocol.fibsem import FIBSEM

__all__ = ["ChosenTarget", "TargetError", "choose_target"]

OFFSET_TOLERANCE_UM = 1.0


class TargetError(ValueError):
    """No usable target; the message says what to provide."""


@dataclass(frozen=True)
class ChosenTarget:
    name: str
    sample: str
    label: str
    x_m: float
    y_m: float
    predicted_error_um: float | None
    source: str  # the targets file it came from

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "sample": self.sample, "label": self.label, "x_m": self.x_m, "y_m": self.y_m,
                "predicted_error_um": self.predicted_error_um, "source": self.source}


def choose_target(fibsem: FIBSEM, targets_path: Path, name: str | None = None) -> ChosenTarget:
    """The target to mill, from ``targets_path``; ``TargetError`` says why none fits."""
    if not targets_path.is_file():
        raise TargetError(f"no targets file at {targets_path}: relocate the cell first (the confocal run or `clemflow grid` "
                          "writes targets.json with em_stage_um), or give --targets FILE")
    try:
        targets = read_targets(targets_path).targets
    except (ValidationError, ValueError) as exc:
        raise TargetError(f"{targets_path} is not a readable targets file: {exc}") from None
    usable = [t for t in targets if t.em_stage_um is not None]
    if not usable:
        raise TargetError(f"{targets_path} has no target with an EM stage position (em_stage_um); register the grid in the SEM "
                          "overview first")
    picked: Target | None
    if name is not None:
        picked = next((t for t in usable if t.name == name), None)
        if picked is None:
            raise TargetError(f"no target named {name!r} with an EM position in {targets_path}; "
                              f"there are: {', '.join(t.name for t in usable)}")
    elif fibsem.target.source == "square":
        want = fibsem.target
        ox, oy = (v * 1e6 for v in want.offset)
        matches = [t for t in usable if t.sample == want.sample and t.label == want.square]
        picked = min(matches, key=lambda t: (t.offset_um[0] - ox) ** 2 + (t.offset_um[1] - oy) ** 2, default=None)
        if picked is None or max(abs(picked.offset_um[0] - ox), abs(picked.offset_um[1] - oy)) > OFFSET_TOLERANCE_UM:
            raise TargetError(f"{targets_path} has no target in sample {want.sample} square {want.square} at offset "
                              f"({ox:g}, {oy:g}) µm with an EM position; relocate it with `clemflow grid` first")
    else:
        picked = usable[0]
    assert picked.em_stage_um is not None
    return ChosenTarget(name=picked.name, sample=picked.sample, label=picked.label, x_m=picked.em_stage_um[0] * 1e-6,
                        y_m=picked.em_stage_um[1] * 1e-6, predicted_error_um=picked.em_predicted_error_um, source=str(targets_path))
