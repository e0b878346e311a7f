"""Ground truth out of a world: the numbers every accuracy claim is measured against.

Per-cell metrics are measured from the objects themselves (not copied from the
kinetics targets), so they are exactly what a perfect quantification of this
specimen would report. Definitions:

- ``particle_area_fraction``: area of the union of the particle clusters'
  projected discs (envelope radius) over the cell's projected area. Clusters,
  not single particles: a 60 nm particle is far below the confocal resolution,
  and what the study measured is the area of particle signal.
- ``fraction_particles_in_endolysosomes``: particles in clusters that sit in an
  endolysosome over all particles of the cell (NaN with no particles).
- ``endolysosomal_volume_fraction``: summed endolysosome volume over cell volume.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .world import World

__all__ = ["cell_metrics", "save_truth", "summary", "truth_dict", "union_disc_area"]

CELL_COLUMNS = (
    "cell_id",
    "square",
    "x_um",
    "y_um",
    "height_um",
    "area_um2",
    "volume_um3",
    "nucleus_volume_um3",
    "distance_to_bar_um",
    "touches_bar",
    "has_particles",
    "n_particles",
    "n_clusters",
    "particle_area_um2",
    "particle_area_fraction",
    "fraction_particles_in_endolysosomes",
    "n_endolysosomes",
    "n_endolysosomes_with_particles",
    "endolysosomal_volume_um3",
    "endolysosomal_volume_fraction",
    "n_lipid_droplets",
    "lipid_droplet_volume_um3",
    "n_mitochondria",
    "mitochondrial_volume_um3",
)


def union_disc_area(
    group: np.ndarray, x: np.ndarray, y: np.ndarray, r: np.ndarray, n_groups: int, row_um: float = 0.005
) -> np.ndarray:
    """Area (µm²) of the union of discs in each group, by scan lines.

    Each disc cuts an exact x-interval from each scan line (rows ``row_um``
    apart on a shared lattice); the union length of the intervals of a line
    times the row spacing sums to the area. Exact along x, midpoint rule along y.
    """
    out = np.zeros(n_groups)
    if len(r) == 0:
        return out
    h = row_um
    j0 = np.ceil((y - r) / h - 0.5).astype(np.int64)
    j1 = np.floor((y + r) / h - 0.5).astype(np.int64)
    n_rows = np.maximum(j1 - j0 + 1, 0)
    disc = np.repeat(np.arange(len(r)), n_rows)
    row = j0[disc] + (np.arange(disc.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows))
    dy = (row + 0.5) * h - y[disc]
    half = np.sqrt(np.clip(r[disc] ** 2 - dy * dy, 0.0, None))
    # order by (group, row) then start; shift each line far apart so one running max serves all lines
    line = group[disc].astype(np.int64) * (1 << 40) + (row - row.min())
    _, line_id = np.unique(line, return_inverse=True)
    xc = x[disc] - np.mean(x)
    span = float(np.abs(xc).max() + r.max()) * 2 + 1.0
    start = line_id * span + (xc - half)
    stop = line_id * span + (xc + half)
    order = np.argsort(start, kind="stable")
    start, stop = start[order], stop[order]
    reach = np.maximum.accumulate(stop)
    before = np.concatenate([[-np.inf], reach[:-1]])
    length = np.clip(stop - np.maximum(start, before), 0.0, None)
    return np.bincount(group[disc][order], weights=length * h, minlength=n_groups)[:n_groups]


def _distance_to_bar(world: "World", cell) -> float:
    """Least distance from the cell's bounding circle to the nearest bar edge (negative: on a bar)."""
    pitch, half = world.grid.pitch_um, world.grid.bar_width_um / 2
    cx, cy = cell.center_um
    fx, fy = cx % pitch, cy % pitch
    to_line = min(fx, pitch - fx, fy, pitch - fy)
    return float(to_line - half - cell.max_radius_um)


def cell_metrics(world: "World", row_um: float = 0.005) -> dict[str, np.ndarray]:
    """Per-cell truth, one array per column of cells.csv (see module docstring)."""
    n = len(world.cells)
    cl = world.clusters
    lys = world.endolysosomes
    ld = world.lipid_droplets
    mt = world.mitochondria
    area = np.array([c.area_um2() for c in world.cells])
    volume = np.array([c.volume_um3() for c in world.cells])
    n_part = np.bincount(cl.cell_id, weights=cl.n_particles, minlength=n)
    n_part_lys = np.bincount(cl.cell_id, weights=cl.n_particles * cl.in_lysosome, minlength=n)
    part_area = union_disc_area(cl.cell_id, cl.center_um[:, 0], cl.center_um[:, 1], cl.radius_um, n, row_um)
    lys_vol = np.bincount(lys.cell_id, weights=lys.volume_um3(), minlength=n)
    loaded = np.zeros(len(lys), bool)
    loaded[cl.lysosome_index[cl.in_lysosome]] = True
    dist = np.array([_distance_to_bar(world, c) for c in world.cells])
    with np.errstate(invalid="ignore", divide="ignore"):
        frac_lys = np.where(n_part > 0, n_part_lys / n_part, np.nan)
    return {
        "cell_id": np.array([c.id for c in world.cells]),
        "square": np.array([world.grid.label(*world.square_of_cell(c)) for c in world.cells]),
        "x_um": np.array([c.center_um[0] for c in world.cells]),
        "y_um": np.array([c.center_um[1] for c in world.cells]),
        "height_um": np.array([c.height_um for c in world.cells]),
        "area_um2": area,
        "volume_um3": volume,
        "nucleus_volume_um3": np.array([4 / 3 * np.pi * np.prod(c.nucleus_semi_axes_um) for c in world.cells]),
        "distance_to_bar_um": dist,
        "touches_bar": dist <= 0,
        "has_particles": n_part > 0,
        "n_particles": n_part.astype(np.int64),
        "n_clusters": np.bincount(cl.cell_id, minlength=n),
        "particle_area_um2": part_area,
        "particle_area_fraction": part_area / area,
        "fraction_particles_in_endolysosomes": frac_lys,
        "n_endolysosomes": np.bincount(lys.cell_id, minlength=n),
        "n_endolysosomes_with_particles": np.bincount(lys.cell_id[loaded], minlength=n),
        "endolysosomal_volume_um3": lys_vol,
        "endolysosomal_volume_fraction": lys_vol / volume,
        "n_lipid_droplets": np.bincount(ld.cell_id, minlength=n),
        "lipid_droplet_volume_um3": np.bincount(ld.cell_id, weights=ld.volume_um3(), minlength=n),
        "n_mitochondria": np.array([len(np.unique(mt.chain_id[mt.cell_id == i])) for i in range(n)]),
        "mitochondrial_volume_um3": np.bincount(mt.cell_id, weights=mt.volume_um3(), minlength=n),
    }


def summary(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """What the study reports per time point, from per-cell truth."""
    has = metrics["has_particles"]
    frac = metrics["fraction_particles_in_endolysosomes"]
    return {
        "n_cells": int(len(has)),
        "fraction_cells_with_particles": float(np.mean(has)) if len(has) else float("nan"),
        "mean_particle_area_fraction": float(np.mean(metrics["particle_area_fraction"])) if len(has) else float("nan"),
        "mean_fraction_particles_in_endolysosomes": float(np.nanmean(frac)) if np.any(has) else float("nan"),
        "mean_endolysosomal_volume_fraction": float(np.mean(metrics["endolysosomal_volume_fraction"]))
        if len(has)
        else float("nan"),
        "total_particles": int(np.sum(metrics["n_particles"])),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def truth_dict(world: "World", metrics: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Everything of truth.json: parameters, seed, frames, kinetics targets, per-cell metrics, summary."""
    m = metrics if metrics is not None else cell_metrics(world)
    cells = [{k: m[k][i] for k in CELL_COLUMNS} for i in range(len(world.cells))]
    return _jsonable(
        {
            "format": "clemflow.specimen.truth/1",
            "seed": world.seed,
            "params": world.params.model_dump(mode="json"),
            "frames": {
                "dish": "live dish frame, µm: x right, y down seen from above with glyphs upright; z up from the glass",
                "em_block": "EM block frame, µm: block face = former glass plane seen from outside; z_em = depth",
                "lm_to_em": world.lm_to_em,
            },
            "kinetics_target": world.uptake.model_dump(),
            "summary": summary(m),
            "cells": cells,
            "counts": {
                "lipid_droplets": len(world.lipid_droplets),
                "endolysosomes": len(world.endolysosomes),
                "particle_clusters": len(world.clusters),
                "particles": len(world.clusters.particles_um),
                "mitochondrial_segments": len(world.mitochondria),
            },
        }
    )


def _object_rows(world: "World"):
    em = world.to_em
    sets = [
        ("lipid_droplet", world.lipid_droplets.center_um, world.lipid_droplets.radius_um, world.lipid_droplets.cell_id, None, None),
        ("endolysosome", world.endolysosomes.center_um, world.endolysosomes.radius_um, world.endolysosomes.cell_id, None, None),
        (
            "particle_cluster",
            world.clusters.center_um,
            world.clusters.radius_um,
            world.clusters.cell_id,
            world.clusters.lysosome_index,
            world.clusters.n_particles,
        ),
    ]
    for name, c, r, cid, lys, npart in sets:
        e = em(c) if len(c) else c
        for i in range(len(r)):
            yield (
                name,
                i,
                int(cid[i]),
                f"{c[i, 0]:.6f}",
                f"{c[i, 1]:.6f}",
                f"{c[i, 2]:.6f}",
                f"{r[i]:.6f}",
                int(lys[i] >= 0) if lys is not None else 0,
                int(lys[i]) if lys is not None else -1,
                int(npart[i]) if npart is not None else 0,
                f"{e[i, 0]:.6f}",
                f"{e[i, 1]:.6f}",
                f"{e[i, 2]:.6f}",
            )


def save_truth(world: "World", folder: str | Path, particles: bool = False) -> Path:
    """Write truth.json, cells.csv, objects.csv, mitochondria.csv (and particles.npz) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = cell_metrics(world)
    (folder / "truth.json").write_text(json.dumps(truth_dict(world, m), indent=1, allow_nan=False))
    with open(folder / "cells.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CELL_COLUMNS)
        for i in range(len(world.cells)):
            w.writerow([_fmt(m[k][i]) for k in CELL_COLUMNS])
    with open(folder / "objects.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ("class", "id", "cell_id", "x_um", "y_um", "z_um", "radius_um", "in_lysosome", "lysosome_index",
             "n_particles", "x_em_um", "y_em_um", "z_em_um")
        )
        w.writerows(_object_rows(world))
    mt = world.mitochondria
    with open(folder / "mitochondria.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("id", "chain_id", "cell_id", "x0_um", "y0_um", "z0_um", "x1_um", "y1_um", "z1_um", "radius_um"))
        for i in range(len(mt)):
            w.writerow([i, int(mt.chain_id[i]), int(mt.cell_id[i]), *(f"{v:.6f}" for v in (*mt.p0_um[i], *mt.p1_um[i], mt.radius_um[i]))])
    if particles:
        cl = world.clusters
        np.savez_compressed(
            folder / "particles.npz",
            position_um=cl.particles_um,
            radius_um=cl.particle_radius_um,
            cluster=cl.particle_cluster,
        )
    return folder / "truth.json"


def _fmt(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else f"{float(v):.6g}"
    return v
