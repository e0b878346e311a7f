"""A simulated uptake time course on disk: the run folder a confocal time course leaves, plus its truth.

The study images the same dishes at 1-48 h after the particles are added and
an untreated control dish beside them. Here each dish is one specimen world
(the same cells at every timepoint: a world's cells are drawn before anything
that depends on the hours) grown confluent, so that a 63x field holds several
whole cells. The fields are chosen once per dish, like the targets of a run,
as non-overlapping fields that hold the most whole cells and no cell that
just grazes the frame (whether such a cell is "cut by the border" is a matter
of a pixel, and the count would hinge on it).

The layout is the confocal session's (``clemflow.confocal.session``): a run
folder (run.json, protocol.yaml, journal.jsonl) with
``confocal/<dish>/t<ii>_<h>h/<target>_a1.ome.tif`` written by the confocal's
own ``StackWriter`` (CZYX uint16 and a ``.frames.jsonl`` sidecar), so that
whatever reads a real run reads this one. Truth goes beside it in ``truth/``:
``cells.csv`` holds every cell that appears in a field, with the specimen's own
per-cell metrics and whether the field holds it whole; ``timecourse.json``
holds the settings. The protocol's ``targets`` list each field by grid square
and offset, as an operator would.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from clemflow.confocal.writer import StackWriter
from clemflow.io.run_folder import RunFolder
from clemflow.protocol import parse_protocol

from .lm import OBJECTIVES, render_lm
from .truth import cell_metrics, union_disc_area
from .world import CellParams, SpecimenParams, World, generate_world

__all__ = [
    "TRUTH_COLUMNS",
    "TimecourseSpec",
    "choose_fields",
    "read_truth",
    "truth_by_group",
    "write_timecourse",
]

CHANNELS = ("405", "488", "639")
"""LysoTracker (endolysosomes), MitoTracker (mitochondria), the particles' own dye."""

STAINS = ("lysotracker", "mitotracker", "particle_dye")

TRUTH_COLUMNS = (
    "sample", "role", "hours", "timepoint_s", "stack", "cell_id", "whole", "x_um", "y_um", "area_um2", "volume_um3",
    "has_particles", "particle_area_fraction", "fraction_particles_in_endolysosomes",
    "particle_area_in_endolysosomes_fraction", "endolysosomal_volume_fraction",
)
"""Columns of truth/cells.csv. ``whole``: the field holds the cell whole (it is not cut by the image border).
``fraction_particles_in_endolysosomes`` counts particles, ``particle_area_in_endolysosomes_fraction`` measures
projected particle area, as a light microscope does."""

ProgressCallback = Callable[[int, int, str], None]
"""progress(done, total, what): called after each stack is written."""


class TimecourseSpec(BaseModel):
    """What to simulate: timepoints, dishes, cells per timepoint and the 63x stack geometry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hours: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0, 14.0, 24.0, 48.0)
    control_hours: tuple[float, ...] = Field(
        (1.0,), description="Timepoints at which the untreated control dish is imaged; empty: no control dish.")
    cells_per_timepoint: int = Field(40, ge=1, description="Whole cells the fields of one dish must hold, at least.")
    cells_per_dish: int = Field(140, ge=1, description="Cells in the dish's one grid square (140: confluent).")
    square: tuple[int, int] = Field((3, 2), description="(column, row) of the grid square the cells grow in.")
    shape: tuple[int, int] = (1024, 1024)
    planes: int = Field(30, ge=1)
    z_step_um: float = Field(0.3, gt=0)
    z_first_um: float = Field(0.15, description="Height above the glass of the first plane.")
    exposure_s: float = Field(0.1, gt=0)
    objective: str = "63x"
    edge_margin_um: float = Field(1.5, ge=0, description="A cell this close to a field's edge, in or out, grazes it.")
    seed: int = 0

    @property
    def pixel_um(self) -> float:
        return OBJECTIVES[self.objective].pixel_um

    @property
    def field_um(self) -> tuple[float, float]:
        """(width, height) of a field in µm."""
        return self.shape[1] * self.pixel_um, self.shape[0] * self.pixel_um

    @property
    def z_um(self) -> np.ndarray:
        return self.z_first_um + np.arange(self.planes) * self.z_step_um

    def specimen(self, hours: float | None) -> SpecimenParams:
        """The specimen of a dish at ``hours`` after treatment (None: the untreated control)."""
        return SpecimenParams(
            first_square=self.square, n_columns=1, n_rows=1, n_cells=self.cells_per_dish,
            cell=CellParams(gap_um=0.0), stains=STAINS, hours_since_treatment=hours,
        )


@dataclass(frozen=True)
class Dish:
    id: str
    role: str  # "treated" or "control"
    seed: int
    hours: tuple[float, ...]  # when it is imaged


def _dishes(spec: TimecourseSpec) -> list[Dish]:
    dishes = [Dish("D1", "treated", spec.seed * 1000 + 1, spec.hours)]
    if spec.control_hours:
        dishes.append(Dish("C1", "control", spec.seed * 1000 + 2, spec.control_hours))
    return dishes


# -- fields ------------------------------------------------------------------------------------


def _outlines(world: World, n: int = 128) -> np.ndarray:
    """(cells, n, 2) points on each cell's outline, dish µm."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.stack([c.center_um[0] + c.footprint_radius(theta) * np.cos(theta),
                               c.center_um[1] + c.footprint_radius(theta) * np.sin(theta)], 1) for c in world.cells])


def _classify(outline: np.ndarray, centre: np.ndarray, half: np.ndarray, margin: float) -> np.ndarray:
    """Per cell: 1 whole (inset by margin), -1 grazing the edge, 0 clearly cut or absent."""
    d = np.abs(outline - centre) - half  # > 0: beyond the edge along that axis
    reach = d.max(axis=2)  # how far each outline point lies outside the field (negative: inside)
    whole = reach.max(axis=1) <= -margin
    # a point more than `margin` beyond one edge while inside the other axis' span: a clean cut
    beyond = (d >= margin) & (d[..., ::-1] <= -margin)
    cut = beyond.any(axis=(1, 2))
    touches = reach.max(axis=1) > -margin
    present = reach.min(axis=1) < margin
    grazing = touches & present & ~cut & ~whole
    return np.where(whole, 1, np.where(grazing, -1, 0))


def choose_fields(world: World, spec: TimecourseSpec, step_um: float = 4.0) -> list[tuple[tuple[float, float], list[int]]]:
    """Non-overlapping field centres (dish µm) holding at least ``cells_per_timepoint`` whole cells, greedily.

    Returns (centre, ids of the cells the field holds whole) per field, best field first. Fields
    with a cell grazing their edge are not used.
    """
    half = np.array(spec.field_um) / 2
    margin = spec.edge_margin_um
    outline = _outlines(world)
    lo, hi = outline.min(axis=1), outline.max(axis=1)  # (cells, 2) extent of each footprint
    xs = np.arange(lo[:, 0].min() + half[0] - 10, hi[:, 0].max() - half[0] + 10 + 1e-9, step_um)
    ys = np.arange(lo[:, 1].min() + half[1] - 10, hi[:, 1].max() - half[1] + 10 + 1e-9, step_um)
    centres = np.array([(x, y) for y in ys for x in xs]).reshape(-1, 2)
    if len(centres) == 0:
        raise ValueError(f"a {spec.field_um[0]:.0f} µm field does not fit the cells' region; use a smaller shape")
    whole = np.all(lo[None] >= centres[:, None] - half + margin, axis=2) & np.all(
        hi[None] <= centres[:, None] + half - margin, axis=2)  # (centres, cells)
    usable = np.ones(len(centres), bool)
    taken = np.zeros(len(world.cells), bool)
    fields: list[tuple[tuple[float, float], list[int]]] = []
    while taken.sum() < spec.cells_per_timepoint:
        gain = np.where(usable, (whole & ~taken).sum(axis=1), -1)
        k = int(gain.argmax())
        if gain[k] <= 0:
            raise ValueError(f"the dish's fields hold only {int(taken.sum())} whole cells, fewer than "
                             f"cells_per_timepoint={spec.cells_per_timepoint}; raise cells_per_dish or lower "
                             "cells_per_timepoint")
        usable[k] = False
        near = np.flatnonzero(np.all((hi > centres[k] - half - margin) & (lo < centres[k] + half + margin), axis=1))
        if np.any(_classify(outline[near], centres[k], half, margin) == -1):
            continue  # a cell grazes this field's edge
        ids = np.flatnonzero(whole[k] & ~taken)
        fields.append(((float(centres[k, 0]), float(centres[k, 1])), ids.tolist()))
        taken[ids] = True
        usable &= np.any(np.abs(centres - centres[k]) >= 2 * half, axis=1)
    return fields


# -- truth -----------------------------------------------------------------------------------


def _area_in_endolysosomes(world: World, particle_area_um2: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Per cell: projected area of the particle clusters inside endolysosomes over all its projected particle
    area (computed for ``cells`` only, NaN elsewhere and where a cell has no particles)."""
    n = len(world.cells)
    cl = world.clusters
    pick = cl.in_lysosome.astype(bool) & np.isin(cl.cell_id, cells)
    part = union_disc_area(cl.cell_id[pick], cl.center_um[pick, 0], cl.center_um[pick, 1], cl.radius_um[pick], n)
    out = np.full(n, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[cells] = np.where(particle_area_um2[cells] > 0, part[cells] / particle_area_um2[cells], np.nan)
    return out


def _cells_in_field(world: World, centre: tuple[float, float], spec: TimecourseSpec) -> dict[int, bool]:
    """Cells whose footprint shows in the field -> whether it lies whole inside (touches no edge pixel)."""
    from .lm import field_coordinates

    xs, ys = field_coordinates(centre[0], centre[1], spec.shape, spec.pixel_um)
    ids = world.cell_id_at(xs[None, ::2], ys[::2, None])
    ring = np.concatenate([world.cell_id_at(xs, ys[0]), world.cell_id_at(xs, ys[-1]),
                           world.cell_id_at(xs[0], ys), world.cell_id_at(xs[-1], ys)])
    border = set(np.unique(ring).tolist())
    return {int(i): int(i) not in border for i in np.unique(ids) if i >= 0}


# -- writing -----------------------------------------------------------------------------------


def _protocol_text(spec: TimecourseSpec, dishes: list[Dish], targets: dict[str, list[tuple[str, tuple[float, float]]]]) -> str:
    """A protocol that, run on a confocal, would take these stacks (listed targets, same channels and z)."""
    hours = sorted({h for d in dishes for h in d.hours})
    items = "\n".join(f"      - {{sample: {d}, square: {square}, offset: [{dx:.2f} um, {dy:.2f} um], name: {d}-{square}-field{k}}}"
                      for d, fields in targets.items() for k, (square, (dx, dy)) in enumerate(fields))
    samples = "\n".join(f"  - {{id: {d.id}, cell_line: HeLa, role: {d.role}, grid: {{pitch: 600 um, bar_width: 40 um}}}}"
                        for d in dishes)
    channels = "\n".join(f"      - {{channel: \"{c}\", exposure: {spec.exposure_s * 1e3:g} ms, power_percent: 10}}"
                         for c in CHANNELS)
    return f"""# Simulated uptake time course (clemflow.simulators.specimen.timecourse), seed {spec.seed}.
clemflow_protocol: 1
experiment:
  name: simulated-uptake-timecourse
  notes: Specimen simulator; treated dish D1{', untreated control C1' if len(dishes) > 1 else ''}.
samples:
{samples}
treatment: {{particle: SiO2-Cy5 50 nm, concentration: 50 ug/mL}}
stains:
  - {{name: LysoTracker Blue DND-22, marks: endolysosomes, channel: "405", lead_time: 30 min}}
  - {{name: MitoTracker Green FM, marks: mitochondria, channel: "488", lead_time: 30 min}}
timepoints: [{', '.join(f'{h:g} h' for h in hours)}]
confocal:
  config: simulator
  targets:
    mode: listed
    items:
{items}
  zstack:
    objective: {spec.objective}
    channels:
{channels}
    range: {(spec.planes - 1) * spec.z_step_um:.4g} um
    step: {spec.z_step_um:g} um
"""


@dataclass(frozen=True)
class _Group:
    """One dish at one timepoint: what a worker renders."""

    dish: Dish
    hours: float
    index: int  # the timepoint's index in the protocol
    fields: tuple[tuple[str, tuple[float, float]], ...]  # (target name, centre)


def _render_group(spec: TimecourseSpec, group: _Group, run_dir: Path, experiment: str,
                  world: World | None = None) -> list[dict[str, Any]]:
    """Render and write every stack of one dish at one timepoint; return its truth rows."""
    treated = group.dish.role == "treated"
    if world is None:
        world = generate_world(spec.specimen(group.hours if treated else None), seed=group.dish.seed)
    metrics = cell_metrics(world)
    seen = {k: _cells_in_field(world, centre, spec) for k, (_, centre) in enumerate(group.fields)}
    area_in = _area_in_endolysosomes(world, metrics["particle_area_um2"],
                                     np.array(sorted({i for cells in seen.values() for i in cells}), int))
    folder = run_dir / "confocal" / group.dish.id / f"t{group.index:02d}_{group.hours:g}h"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (name, centre) in enumerate(group.fields):
        path = folder / f"{name}_a1.ome.tif"
        rng = np.random.default_rng([spec.seed, group.dish.seed, group.index, k])
        writer = StackWriter(path, list(CHANNELS), spec.planes, spec.shape, spec.pixel_um, spec.z_step_um, {
            "protocol": experiment, "sample": group.dish.id, "timepoint_s": group.hours * 3600.0, "target": name,
            "stage_um": list(centre), "attempt": 1, "objective": spec.objective, "simulated": True,
        })
        for c, channel in enumerate(CHANNELS):
            for z, height in enumerate(spec.z_um):
                image = render_lm(world, centre[0], centre[1], float(height), spec.objective, channel, spec.exposure_s,
                                  spec.shape, rng)
                writer.write(c, z, image, {"x_um": centre[0], "y_um": centre[1], "z_um": float(height),
                                           "exposure_ms": spec.exposure_s * 1e3})
        writer.close(True)
        stack = str(path.relative_to(run_dir))
        for cell_id, whole in seen[k].items():
            rows.append({
                "sample": group.dish.id, "role": group.dish.role, "hours": group.hours if treated else None,
                "timepoint_s": group.hours * 3600.0, "stack": stack, "cell_id": cell_id, "whole": whole,
                "x_um": metrics["x_um"][cell_id], "y_um": metrics["y_um"][cell_id],
                "area_um2": metrics["area_um2"][cell_id], "volume_um3": metrics["volume_um3"][cell_id],
                "has_particles": bool(metrics["has_particles"][cell_id]),
                "particle_area_fraction": metrics["particle_area_fraction"][cell_id],
                "fraction_particles_in_endolysosomes": metrics["fraction_particles_in_endolysosomes"][cell_id],
                "particle_area_in_endolysosomes_fraction": area_in[cell_id],
                "endolysosomal_volume_fraction": metrics["endolysosomal_volume_fraction"][cell_id],
            })
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(value) else f"{float(value):.6g}"
    return str(value)


def write_timecourse(
    folder: str | Path, spec: TimecourseSpec = TimecourseSpec(), *, workers: int = 1,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write the simulated time course as a run folder at ``folder`` (new or empty); returns the folder.

    ``workers`` > 1 renders dishes-at-timepoints in that many processes (same files either way).
    """
    folder = Path(folder)
    dishes = _dishes(spec)
    targets: dict[str, list[tuple[str, tuple[float, float]]]] = {}
    fields_of: dict[str, list[tuple[str, tuple[float, float]]]] = {}
    first_world: dict[tuple[str, float], World] = {}  # the world that chose the fields renders its own timepoint
    for dish in dishes:
        # the cells do not depend on the hours: any timepoint's world shows where they are
        layout = generate_world(spec.specimen(dish.hours[0] if dish.role == "treated" else None), seed=dish.seed)
        first_world[(dish.id, dish.hours[0])] = layout
        grid = layout.grid
        label = grid.label(*spec.square)
        sx, sy = grid.square_center_um(label)
        chosen = choose_fields(layout, spec)
        targets[dish.id] = [(label, (x - sx, y - sy)) for (x, y), _ in chosen]
        fields_of[dish.id] = [(f"{dish.id}-{label}-field{k}", centre) for k, (centre, _) in enumerate(chosen)]
    text = _protocol_text(spec, dishes, targets)
    protocol = parse_protocol(text, "simulated-timecourse.yaml")
    run = RunFolder.open(folder, protocol, text)
    hours_all = list(protocol.timepoints)
    groups = [_Group(d, h, hours_all.index(h * 3600.0), tuple(fields_of[d.id])) for d in dishes for h in d.hours]
    total = sum(len(g.fields) for g in groups)
    done = 0
    rows: list[dict[str, Any]] = []

    def finished(group: _Group, group_rows: list[dict[str, Any]]) -> None:
        nonlocal done
        rows.extend(group_rows)
        done += len(group.fields)
        run.journal.append("acquire", "done", sample=group.dish.id, timepoint=group.index,
                           timepoint_s=group.hours * 3600.0, attempt=1, simulated=True,
                           files=sorted({r["stack"] for r in group_rows}))
        if progress is not None:
            progress(done, total, f"{group.dish.id} at {group.hours:g} h")

    name = protocol.experiment.name
    def world_of(group: _Group) -> World | None:
        return first_world.pop((group.dish.id, group.hours), None)

    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [(g, pool.submit(_render_group, spec, g, run.path, name, world_of(g))) for g in groups]
            for group, future in futures:
                finished(group, future.result())
    else:
        for group in groups:
            finished(group, _render_group(spec, group, run.path, name, world_of(group)))
    truth = run.path / "truth"
    truth.mkdir(exist_ok=True)
    rows.sort(key=lambda r: (r["sample"], r["timepoint_s"], r["stack"], r["cell_id"]))
    with open(truth / "cells.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(TRUTH_COLUMNS)
        writer.writerows([[_fmt(r[c]) for c in TRUTH_COLUMNS] for r in rows])
    (truth / "timecourse.json").write_text(json.dumps({
        "format": "clemflow.simulators.timecourse/1", "spec": spec.model_dump(mode="json"),
        "dishes": [{"id": d.id, "role": d.role, "world_seed": d.seed, "hours": list(d.hours)} for d in dishes],
    }, indent=1), encoding="utf-8")
    run.journal.append("schedule", "finished", done=len(groups), skipped=0, failed=0, pending=0, simulated=True)
    return run.path


# -- reading the truth ---------------------------------------------------------------------------------


def read_truth(folder: str | Path) -> list[dict[str, Any]]:
    """Rows of truth/cells.csv with numbers and booleans parsed (``hours`` None for the control)."""
    path = Path(folder) / "truth" / "cells.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a simulated time course (write_timecourse)")
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            parsed: dict[str, Any] = dict(row)
            for key in ("timepoint_s", "x_um", "y_um", "area_um2", "volume_um3", "particle_area_fraction",
                        "fraction_particles_in_endolysosomes", "particle_area_in_endolysosomes_fraction",
                        "endolysosomal_volume_fraction"):
                parsed[key] = float(row[key])
            parsed["hours"] = float(row["hours"]) if row["hours"] else None
            parsed["cell_id"] = int(row["cell_id"])
            parsed["whole"] = row["whole"] == "1"
            parsed["has_particles"] = row["has_particles"] == "1"
            out.append(parsed)
    return out


def _groups(rows: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    keys = sorted({r["hours"] for r in rows if r["role"] == "treated"})
    for h in keys:
        yield f"{h:g} h", [r for r in rows if r["role"] == "treated" and r["hours"] == h]
    control = [r for r in rows if r["role"] == "control"]
    if control:
        yield "control", control


def truth_by_group(folder: str | Path) -> dict[str, dict[str, float]]:
    """Per timepoint ('1 h', ..., 'control'): the cells held whole and the study's four means over them.

    ``particle_in_endolysosome_fraction`` is by projected area (what a light microscope measures); the
    count-based share is given as ``particle_in_endolysosome_fraction_by_number``.
    """
    out = {}
    for name, rows in _groups(read_truth(folder)):
        whole = [r for r in rows if r["whole"]]

        def mean(key: str, cells: list[dict[str, Any]] = whole) -> float:
            values = np.array([float(r[key]) for r in cells])
            values = values[np.isfinite(values)]
            return float(values.mean()) if len(values) else float("nan")

        out[name] = {
            "n_cells": len(whole),
            "n_cut": len(rows) - len(whole),
            "has_particles": mean("has_particles"),
            "particle_area_fraction": mean("particle_area_fraction"),
            "particle_in_endolysosome_fraction": mean("particle_area_in_endolysosomes_fraction"),
            "particle_in_endolysosome_fraction_by_number": mean("fraction_particles_in_endolysosomes"),
            "endolysosomal_volume_fraction": mean("endolysosomal_volume_fraction"),
        }
    return out
