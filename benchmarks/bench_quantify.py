"""Uptake quantification (issue 10): accuracy on a simulated time course and throughput on 2 cores.

The data are the full simulated time course of clemflow.simulators.specimen.timecourse: 7 timepoints
(1-48 h) and an untreated control, at least 40 whole cells each, 63x stacks 1024 x 1024 x 30 planes x
3 channels, written as a confocal run folder. Rendering them takes long (tens of minutes), so the folder is
kept (``--data``, by default in the system's temporary folder) and reused when its settings match.

Goals: every per-timepoint metric within 10 % (relative) or 2 percentage points, whichever is larger, of the
specimen's truth, and the cell count within 5 %; 100 cells quantified in at most 60 s on 2 cores (the
whole course is quantified with 2 worker processes, files read included, and the time scaled to 100 cells).

Run: python benchmarks/bench_quantify.py [--data DIR] [--workers 2] [--render-workers 2] [--seed 0]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from clemflow.quantify.stats import METRICS  # noqa: E402
from clemflow.quantify.timecourse import RunQuant, quantify_run, run_protocol  # noqa: E402
from clemflow.simulators.specimen.timecourse import (  # noqa: E402
    TimecourseSpec,
    read_truth,
    truth_by_group,
    write_timecourse,
)

SECONDS_PER_100_CELLS_GOAL = 60.0
RELATIVE_GOAL, ABSOLUTE_GOAL, COUNT_GOAL = 0.10, 0.02, 0.05


def course(folder: Path, spec: TimecourseSpec, workers: int) -> Path:
    """The simulated course in ``folder``, written now unless a complete one with the same settings is there."""
    settings = folder / "truth" / "timecourse.json"
    if settings.is_file() and json.loads(settings.read_text())["spec"] == spec.model_dump(mode="json"):
        print(f"simulated time course: reusing {folder}")
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    print(f"simulated time course: rendering into {folder} (once; tens of minutes) ...", flush=True)
    t0 = time.perf_counter()
    write_timecourse(folder, spec, workers=workers,
                     progress=lambda done, total, what: print(f"  {done}/{total} stacks ({what})", flush=True))
    print(f"  rendered in {time.perf_counter() - t0:.0f} s")
    return folder


def per_cell(run: RunQuant, spec: TimecourseSpec) -> None:
    """Each measured cell matched to the truth cell nearest its centroid in the same stack: median errors."""
    truth = read_truth(run.run_dir)
    by_stack: dict[str, list[dict]] = {}
    for row in truth:
        by_stack.setdefault(row["stack"], []).append(row)
    protocol = run_protocol(run.run_dir)  # the field centres: the protocol's targets (square + offset)
    grid = protocol.samples[0].grid
    centre = {t.name: np.add(grid.square_center_um(t.square), (t.offset[0] * 1e6, t.offset[1] * 1e6))
              for t in protocol.confocal.targets.items}
    half = (np.array(spec.shape[::-1]) - 1) / 2 * spec.pixel_um
    pairs = {m: [] for m in ("area_um2", "volume_um3", "particle_area_fraction", "endolysosomal_volume_fraction")}
    areas: dict[str, np.ndarray] = {}  # group -> summed particle area (µm²): inside measured, truth; free measured, truth
    unmatched = 0
    for row in run.cells:
        key = row.stack.path.relative_to(run.run_dir).as_posix()
        xy = centre[row.stack.target] + np.array(row.cell.centroid_um) - half
        candidates = [t for t in by_stack.get(key, []) if t["whole"]]
        if not candidates:
            unmatched += 1
            continue
        d = [np.hypot(t["x_um"] - xy[0], t["y_um"] - xy[1]) for t in candidates]
        best = candidates[int(np.argmin(d))]
        if min(d) > 6.0:
            unmatched += 1
            continue
        for m in pairs:
            pairs[m].append((getattr(row.cell, m), best[m]))
        share, true_share = row.cell.particle_in_endolysosome_fraction, best["particle_area_in_endolysosomes_fraction"]
        if math.isfinite(share) and math.isfinite(true_share):
            got, want = row.cell.particle_area_um2, best["particle_area_fraction"] * best["area_um2"]
            group = areas.setdefault(f"{row.stack.timepoint_s / 3600:g} h", np.zeros(4))
            group += (got * share, want * true_share, got * (1 - share), want * (1 - true_share))
    print(f"\nper cell (matched by centroid within 6 µm; {unmatched} of {len(run.cells)} unmatched): "
          "median measured/truth, and the middle 80 %")
    for m, v in pairs.items():
        a = np.array(v, float)
        ok = np.isfinite(a).all(1) & (a[:, 1] > 0)
        r = a[ok, 0] / a[ok, 1]
        if len(r):
            print(f"  {m:32s} {np.median(r):6.3f}   [{np.percentile(r, 10):6.3f}, {np.percentile(r, 90):6.3f}]  n={len(r)}")
    print("\nparticle area inside endolysosomes and free, summed over matched cells with particles: measured / truth µm²"
          " (the share is off where the two ratios differ)")
    for group, (got_in, want_in, got_free, want_free) in areas.items():
        print(f"  {group:6s} inside {got_in:8.1f} / {want_in:8.1f} ({got_in / max(want_in, 1e-9):4.2f})   "
              f"free {got_free:8.1f} / {want_free:8.1f} ({got_free / max(want_free, 1e-9):4.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="folder of the simulated course (kept, reused)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the quantification (2 cores)")
    ap.add_argument("--render-workers", type=int, default=2, help="worker processes rendering the course")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec = TimecourseSpec(seed=args.seed)
    folder = args.data or Path(tempfile.gettempdir()) / f"clemflow-bench-quantify-seed{args.seed}"
    run_dir = course(folder, spec, args.render_workers)

    t0 = time.perf_counter()
    run = quantify_run(run_dir, workers=args.workers)
    seconds = time.perf_counter() - t0
    n_cells = len(run.cells)
    per_100 = seconds * 100 / max(n_cells, 1)
    print(f"\nthroughput ({len(run.stacks)} stacks of {spec.shape[0]}x{spec.shape[1]}x{spec.planes}x3, "
          f"{args.workers} workers, files read included):")
    print(f"  whole course: {n_cells} cells in {seconds:.1f} s")
    print(f"  per 100 cells: {per_100:6.1f} s   goal {SECONDS_PER_100_CELLS_GOAL:.0f} s   "
          f"ratio {per_100 / SECONDS_PER_100_CELLS_GOAL:4.2f}")

    truth = truth_by_group(run_dir)
    stats = {s.group.label: s for s in run.stats()}
    print("\naccuracy per timepoint: measured / truth (|error| over the goal's tolerance; <= 1 meets it)")
    header = f"  {'group':8s} {'cells':>11s} " + " ".join(f"{m.name[:30]:>32s}" for m in METRICS)
    print(header)
    worst, worst_count = 0.0, 0.0
    total_found = total_true = 0
    for name, t in truth.items():
        s = stats.get(name)
        found = s.n_cells if s else 0
        total_found += found
        total_true += t["n_cells"]
        count_ratio = abs(found - t["n_cells"]) / (COUNT_GOAL * t["n_cells"])
        worst_count = max(worst_count, count_ratio)
        cells = f"{found:3d}/{t['n_cells']:3d} ({count_ratio:4.2f})"
        parts = []
        for m in METRICS:
            want = t[m.name]
            got = s.metrics[m.name].mean if s else float("nan")
            if math.isnan(want):
                parts.append(f"{'—' if math.isnan(got) else f'{got:.4f}':>14s} / {'—':>7s}        ")
                continue
            ratio = abs(got - want) / max(RELATIVE_GOAL * abs(want), ABSOLUTE_GOAL)
            worst = max(worst, ratio if math.isfinite(ratio) else math.inf)
            parts.append(f"{got:14.4f} / {want:7.4f} ({ratio:4.2f})")
        print(f"  {name:8s} {cells:>11s} " + " ".join(f"{p:>32s}" for p in parts))
    count = abs(total_found - total_true) / (COUNT_GOAL * total_true)
    print(f"\n  worst metric ratio {worst:4.2f} (goal <= 1); cell count {total_found}/{total_true}, "
          f"ratio {count:4.2f} (goal <= 1; worst single timepoint {worst_count:4.2f})")
    per_cell(run, spec)
    by_number = {n: t["particle_in_endolysosome_fraction_by_number"] for n, t in truth.items()}
    print("  (share in endolysosomes is compared by projected area; by particle number the truth is "
          + ", ".join(f"{n} {v:.3f}" for n, v in by_number.items() if math.isfinite(v)) + ")")


if __name__ == "__main__":
    main()
