"""cells.csv and timepoints.csv: the numbers behind the curves, for a spreadsheet or a second analysis.

cells.csv has one row per quantified cell (cells cut by the image border are
not in it; timepoints.csv counts them), with the stack it came from relative
to the run folder. timepoints.csv has one row per group (the pooled control,
then each timepoint) and, per metric, n, mean, SD, the group it was tested
against, p and stars; its ``test`` column names the test. Fractions are
written as fractions (0.061, not 6.1 %); an undefined value is empty.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from .stats import METRICS, GroupStats, Metric
from .timecourse import RunQuant

__all__ = ["CELL_COLUMNS", "timepoint_columns", "write_cells_csv", "write_timepoints_csv"]

CELL_COLUMNS = (
    "group", "role", "hours", "sample", "target", "attempt", "stack", "cell", "x_um", "y_um", "area_um2",
    "volume_um3", "has_particles", "particle_area_um2", "particle_area_fraction",
    "particle_in_endolysosome_fraction", "endolysosomal_volume_um3", "endolysosomal_volume_fraction",
)


def _num(value: float | int | bool | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return "" if not math.isfinite(value) else f"{value:.6g}"


def write_cells_csv(path: str | Path, run: RunQuant) -> Path:
    """One row per quantified cell (CELL_COLUMNS)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CELL_COLUMNS)
        for row in run.cells:
            s, c = row.stack, row.cell
            stack = s.path.relative_to(run.run_dir) if s.path.is_relative_to(run.run_dir) else s.path
            writer.writerow([
                s.group.label, s.role, _num(s.hours), s.sample, s.target, s.attempt, stack.as_posix(), c.label,
                _num(c.centroid_um[0]), _num(c.centroid_um[1]), _num(c.area_um2), _num(c.volume_um3),
                _num(bool(c.has_particles)), _num(c.particle_area_um2), _num(c.particle_area_fraction),
                _num(c.particle_in_endolysosome_fraction), _num(c.endolysosomal_volume_um3),
                _num(c.endolysosomal_volume_fraction),
            ])
    return path


def timepoint_columns(metrics: Sequence[Metric] = METRICS) -> list[str]:
    columns = ["group", "role", "hours", "n_images", "n_cells", "excluded_at_border"]
    for m in metrics:
        columns += [f"{m.name}_{k}" for k in ("n", "mean", "sd", "vs", "p", "stars")]
    return columns + ["test"]


def write_timepoints_csv(path: str | Path, stats: Sequence[GroupStats], test: str,
                         metrics: Sequence[Metric] = METRICS) -> Path:
    """One row per group (timepoint_columns)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(timepoint_columns(metrics))
        for s in stats:
            row = [s.group.label, s.group.role, _num(s.group.hours), s.n_images, s.n_cells, s.excluded_at_border]
            for m in metrics:
                v = s.metrics[m.name]
                row += [v.n, _num(v.mean), _num(v.sd), v.versus or "", _num(v.p) if v.versus else "", v.stars]
            writer.writerow(row + [test])
    return path


def write_outputs(out: str | Path, run: RunQuant, welch: bool = True) -> tuple[list[GroupStats], list[Path]]:
    """cells.csv, timepoints.csv and one curve PNG per metric in ``out``; returns the statistics and the files."""
    from .curves import write_curves
    from .stats import test_name

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = run.stats(welch)
    test = test_name(welch)
    files = [write_cells_csv(out / "cells.csv", run), write_timepoints_csv(out / "timepoints.csv", stats, test)]
    files += write_curves(out, stats, test)
    return stats, files
