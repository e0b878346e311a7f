"""Time the FIB-SEM renderer on one core: a 2048x1536 block-face slice (budget 0.25 s) and an overview.

Run: python benchmarks/bench_em.py
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from clemflow.simulators.specimen import SpecimenParams, generate_world  # noqa: E402
from clemflow.simulators.specimen.em import face_through, render_em_slice  # noqa: E402
from clemflow.simulators.specimen.em_overview import render_ion_image, render_sem_overview  # noqa: E402

BUDGET_S = 0.25


def main() -> None:
    t0 = time.perf_counter()
    world = generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=5), seed=2)
    print(f"world: {len(world.cells)} cells, {len(world.clusters.particles_um)} particles ({time.perf_counter() - t0:.2f} s)")
    cell = world.cells[0]
    face = face_through(world, cell.nucleus_center_um)
    t0 = time.perf_counter()
    render_em_slice(world, -3.0, (0.0, 3.5), face=face)  # builds the per-world scene and texture tiles
    print(f"first slice (scene + texture set-up): {time.perf_counter() - t0:.3f} s")
    times = []
    for i, depth in enumerate(np.linspace(-4.0, 4.0, 9)):
        t0 = time.perf_counter()
        render_em_slice(world, float(depth), (0.0, 3.5), 5.0, (2048, 1536), face=face, slice_index=i)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"EM slice 2048x1536 @ 5 nm: median {med:.3f} s (min {min(times):.3f}, max {max(times):.3f}) over "
          f"{len(times)} depths; {med / BUDGET_S:.2f} x the {BUDGET_S} s budget")
    b = world.to_em(np.array([[*cell.center_um, 0.0]]))[0]
    t0 = time.perf_counter()
    render_sem_overview(world, (b[0], b[1]), 1.0, (1024, 1024))
    print(f"SEM overview 1024x1024 @ 1 um: {time.perf_counter() - t0:.3f} s")
    t0 = time.perf_counter()
    render_ion_image(world, (b[0], b[1]), 0.05, (1024, 768))
    print(f"ion image 1024x768 @ 50 nm: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
