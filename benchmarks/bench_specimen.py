"""Benchmark of the simulated specimen against the issue's budgets, on one core.

    python benchmarks/bench_specimen.py

Budgets: a world of 3x3 grid squares with 60 cells generated in <= 2 s and
held in <= 500 MB; a 63x 1024x1024 LM plane per channel in <= 0.15 s.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import gc  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from clemflow.simulators.specimen import SpecimenParams, generate_world  # noqa: E402
from clemflow.simulators.specimen.lm import render_lm  # noqa: E402

WORLD_S, WORLD_MB, PLANE_S = 2.0, 500.0, 0.15


def _world_nbytes(world) -> int:
    total = world.lm_to_em.nbytes
    for name in ("lipid_droplets", "endolysosomes", "clusters", "mitochondria"):
        total += sum(v.nbytes for v in vars(getattr(world, name)).values() if isinstance(v, np.ndarray))
    total += sum(v.nbytes for c in world.cells for v in vars(c).values() if isinstance(v, np.ndarray))
    return total


def _row(what: str, value: float, unit: str, budget: float) -> None:
    print(f"{what:<48} {value:10.3f} {unit:<3} budget {budget:7.2f} {unit:<3} ratio {value / budget:5.2f}")


def main() -> None:
    params = SpecimenParams(n_cells=60, hours_since_treatment=24.0)  # 3x3 squares, heaviest uptake
    generate_world(params, seed=0)  # warm imports and caches
    times = []
    for seed in range(1, 6):
        t0 = time.perf_counter()
        world = generate_world(params, seed=seed)
        times.append(time.perf_counter() - t0)
    _row("world 3x3 squares, 60 cells, 24 h: generate (median of 5)", float(np.median(times)), "s", WORLD_S)
    gc.collect()
    tracemalloc.start()
    world = generate_world(params, seed=1)
    held = tracemalloc.get_traced_memory()[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    _row("world: memory held (tracemalloc)", held / 2**20, "MB", WORLD_MB)
    _row("world: peak while generating (tracemalloc)", peak / 2**20, "MB", WORLD_MB)
    _row("world: object arrays (nbytes)", _world_nbytes(world) / 2**20, "MB", WORLD_MB)
    print(
        f"  ({len(world.cells)} cells, {len(world.lipid_droplets)} droplets, {len(world.endolysosomes)} endolysosomes, "
        f"{len(world.clusters)} clusters, {len(world.clusters.particles_um)} particles, {len(world.mitochondria)} mito segments)"
    )
    # 63x planes: the busiest field, centred on the cell with the most clusters
    busiest = int(np.argmax(np.bincount(world.clusters.cell_id, minlength=len(world.cells))))
    x, y = world.cells[busiest].center_um
    for ch in ("405", "488", "639", "TL"):
        render_lm(world, x, y, 2.0, "63x", ch, 0.1, (1024, 1024), rng=0)
        ts = []
        for k in range(5):
            t0 = time.perf_counter()
            render_lm(world, x, y, 1.0 + 0.5 * k, "63x", ch, 0.1, (1024, 1024), rng=k)
            ts.append(time.perf_counter() - t0)
        _row(f"LM 63x 1024x1024 plane, channel {ch} (median of 5)", float(np.median(ts)), "s", PLANE_S)
    t0 = time.perf_counter()
    render_lm(world, x, y, 0.0, "10x", "TL", 0.02, (1024, 1024), rng=0)
    print(f"{'LM 10x 1024x1024 transmitted light (no budget)':<48} {time.perf_counter() - t0:10.3f} s")


if __name__ == "__main__":
    main()
