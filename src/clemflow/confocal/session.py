"""One confocal acquisition of the schedule: a dish at a timepoint, from overview to z-stacks.

For each timeline entry the session has the dish placed, tiles an overview,
finds the grid and its labels, turns every target (kept as square + offset)
into a stage position, focuses, and takes the z-stack. Targets and the
registration of each dish are kept in `targets.json`, so a dish put back
rotated or shifted at the next timepoint is found again by its grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from ..grid.find import GridNotFound
from ..grid.registration import GridPosition
from ..grid.targets import Target, TargetsFile, read_targets, write_targets
from ..protocol import Protocol
from ..schedule.runner import AcquisitionResult
from ..schedule.timeline import TimelineEntry
from .cells import pick_cells
from .controller import ConfocalController, ConfocalRefused
from .dishes import DishHandler

__all__ = ["ConfocalSession"]

CELL_FOCUS_ABOVE_GLASS_UM = 3.0
"""Where the search for a live cell's focus starts, above the coverslip."""

OVERVIEW_SPAN_PITCHES = 2.4
"""The overview covers this many grid squares across: enough to read labels in both directions."""


class ConfocalSession:
    def __init__(self, controller: ConfocalController, protocol: Protocol, run_dir: Path, dishes: DishHandler) -> None:
        self.controller = controller
        self.protocol = protocol
        self.run_dir = Path(run_dir)
        self.dishes = dishes
        self.targets_path = self.run_dir / "targets.json"
        self.focus_z: dict[str, float] = {}
        self.last_centre: dict[str, tuple[float, float]] = {}

    # -- targets --------------------------------------------------------------------

    def _targets(self) -> TargetsFile:
        if self.targets_path.exists():
            return read_targets(self.targets_path)
        scheme = self.protocol.samples[0].grid
        targets = []
        if self.protocol.confocal.targets.mode == "automatic":
            return TargetsFile(scheme=scheme, targets=targets)  # chosen from the first overview of each dish
        for i, item in enumerate(self.protocol.confocal.targets.items):
            if item.square is not None:
                targets.append(Target(name=item.name or f"{item.sample}-{item.square}-{i}", sample=item.sample,
                                      label=item.square, offset_um=(item.offset[0] * 1e6, item.offset[1] * 1e6)))
        return TargetsFile(scheme=scheme, targets=targets)

    def acquire(self, entry: TimelineEntry, attempt: int) -> AcquisitionResult:
        """Acquire every target of one dish at one timepoint (called by the schedule runner)."""
        ctl, sample = self.controller, self.protocol.sample(entry.sample)
        index = self.protocol.timepoints.index(entry.timepoint_s)
        folder = self.run_dir / "confocal" / sample.id / f"t{index:02d}_{entry.timepoint_s / 3600:g}h"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            centre = self.dishes.place(sample.id, index, self.last_centre.get(sample.id))
            z_glass = ctl.find_glass(centre, self.focus_z.get(sample.id, ctl.core.getPosition()))
            self.focus_z[sample.id] = z_glass
            z_glass_stack = z_glass - ctl.focus_offset(self.protocol.confocal.overview.objective) + ctl.focus_offset(
                self.protocol.confocal.zstack.objective)
            span = OVERVIEW_SPAN_PITCHES * sample.grid.pitch_um
            mosaic, view = ctl.overview(centre, span, focus_z=z_glass)
            tifffile.imwrite(folder / f"overview_a{attempt}.tif", mosaic.astype(np.float32))
            registration = ctl.register(mosaic, view, sample.grid)
        except (GridNotFound, ConfocalRefused) as exc:
            return AcquisitionResult("failed", details={"reason": str(exc)})
        self.last_centre[sample.id] = centre

        targets = self._targets()
        if self.protocol.confocal.targets.mode == "automatic" and not any(t.sample == sample.id for t in targets.targets):
            # First visit of this dish: choose cells in the listed squares and keep them for every timepoint.
            per_square = self.protocol.confocal.targets.cells_per_square
            stain = self.protocol.confocal.zstack.channels[0]
            for item in self.protocol.confocal.targets.items:
                if item.sample == sample.id and item.square:
                    # a fluorescence overview of this square, centred on it
                    square_xy = tuple(float(v) for v in registration.stage_of(GridPosition(item.square, (0.0, 0.0))))
                    glow, glow_view = ctl.overview(square_xy, sample.grid.pitch_um * 1.05, focus_z=z_glass + CELL_FOCUS_ABOVE_GLASS_UM, channel=stain)
                    tifffile.imwrite(folder / f"overview_{item.square}_{stain.channel}_a{attempt}.tif", glow.astype(np.float32))
                    for k, cell in enumerate(pick_cells(glow, glow_view, registration, item.square, per_square)):
                        targets.targets.append(Target(name=f"{sample.id}-{item.square}-cell{k}", sample=sample.id,
                                                      label=cell.label, offset_um=cell.offset_um))
        mine = [t for t in targets.targets if t.sample == sample.id]
        files, gaps, details = [], 0, {"targets": []}
        for target in mine:
            position = GridPosition(target.label, target.offset_um)
            xy = tuple(float(v) for v in registration.stage_of(position))
            error = registration.predicted_error_um(np.array(xy))
            try:
                # Cells sit on the glass: focus on the cell from just above the glass, stack around it.
                z = ctl.autofocus(xy, z_glass_stack + CELL_FOCUS_ABOVE_GLASS_UM)
                stack_path = folder / f"{target.name}_a{attempt}.ome.tif"
                result = ctl.zstack(stack_path, xy, z, {
                    "protocol": self.protocol.experiment.name, "sample": sample.id, "timepoint_s": entry.timepoint_s,
                    "target": target.name, "label": target.label, "offset_um": list(target.offset_um),
                    "stage_um": list(xy), "predicted_error_um": error, "attempt": attempt,
                })
            except ConfocalRefused as exc:
                details["targets"].append({"name": target.name, "refused": str(exc)})
                continue
            except OSError as exc:  # a full disk: what is written stays valid; stop, do not retry blindly
                details["targets"].append({"name": target.name, "error": str(exc)})
                write_targets(self.targets_path, targets)
                return AcquisitionResult("failed", files=tuple(files), details={**details, "reason": str(exc)}, fatal=True)
            files.append(str(stack_path.relative_to(self.run_dir)))
            gaps += len(result.gaps)
            target.lm_stage_um = xy
            target.lm_predicted_error_um = error
            details["targets"].append({"name": target.name, "stage_um": list(xy), "focus_um": z, "frames": result.frames,
                                       "gaps": len(result.gaps)})
        write_targets(self.targets_path, targets)
        (folder / f"registration_a{attempt}.json").write_text(json.dumps({
            "matrix": registration.matrix.tolist(), "model": registration.model,
            "residual_rms_um": registration.residual_rms_um, "inliers": registration.inliers,
        }, indent=2))
        status = "done" if files and gaps == 0 else ("incomplete" if files else "failed")
        return AcquisitionResult(status, files=tuple(files), details={**details, "gaps": gaps})

