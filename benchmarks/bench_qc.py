"""Live QC (issue 8): recall per injected fault type, false alerts on clean slices, and the cost per slice.

Recall and false alerts are measured on fault-injected series of the simulated
specimen (simulators/specimen/em_faults.py) at 256 x 256 px, 10 nm pixels and
10 nm slices, with the mild background imperfections of a good run (drift
random walk, charging, faint curtains): each slice is registered by the
streaming CoarseAligner and judged by QCMonitor as it would be live. Goals:
recall >= 95 % per fault type (>= 40 faults per type), <= 1 false alert per
500 clean slices. The cost per slice is taken at 2048 x 2048 on one core
(goal: all measures well under 50 ms).

Run: python benchmarks/bench_qc.py [--series 10] [--slices 360] [--per-kind 4] [--size 256] [--clean 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

from clemflow.align.coarse import CoarseAligner  # noqa: E402
from clemflow.qc import metrics as m  # noqa: E402
from clemflow.qc.monitor import QCMonitor  # noqa: E402
from clemflow.simulators.specimen import SpecimenParams, generate_world  # noqa: E402
from clemflow.simulators.specimen.em import render_em_slice  # noqa: E402
from clemflow.simulators.specimen.em_faults import (  # noqa: E402
    FAULT_KINDS,
    FaultScore,
    SeriesSetup,
    fault_series,
    pick_field,
    plan_faults,
    score_alerts,
)

RECALL_GOAL = 0.95
FALSE_PER_500_GOAL = 1.0
TIME_GOAL_MS = 50.0


def _world(seed: int):
    return generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=3), seed=seed)


def run_series(world_seed: int, seed: int, n_slices: int, per_kind: int, size: int,
               progress: Progress | None = None, task=None) -> FaultScore:
    """One series through CoarseAligner + QCMonitor; its alerts scored against the injected truth."""
    world = _world(world_seed)
    face, centre = pick_field(world, seed, shape=(size, size))
    setup = SeriesSetup(face=face, center_um=centre, shape=(size, size))
    faults = plan_faults(n_slices, per_kind, seed) if per_kind else []
    aligner, monitor = CoarseAligner(), QCMonitor()
    alerts: list[tuple[int, str]] = []
    for s in fault_series(world, setup, n_slices, faults, seed=seed):
        qc = monitor.add(s.position, s.image, aligner.add(s.position, s.image))
        alerts += [(qc.index, k) for k in qc.kinds]
        if progress is not None:
            progress.advance(task)
    return score_alerts(faults, alerts, n_slices)


def time_metrics(repeats: int = 8) -> dict[str, float]:
    """Milliseconds per slice at 2048 x 2048 on one core: the whole QCMonitor.add and its parts."""
    world = _world(3)
    face, centre = pick_field(world, 0, shape=(2048, 2048), pixel_size_nm=5.0)
    slices = [render_em_slice(world, 0.01 * i, centre, 5.0, (2048, 2048), face=face, seed=1, slice_index=i)[0]
              for i in range(repeats + 2)]
    aligner = CoarseAligner()
    shifts = [aligner.add(i, s) for i, s in enumerate(slices)]
    monitor = QCMonitor()
    monitor.add(0, slices[0], shifts[0])
    monitor.add(1, slices[1], shifts[1])
    total, prep, sharp, pair = [], [], [], []
    for i in range(2, len(slices)):
        t0 = time.perf_counter()
        monitor.add(i, slices[i], shifts[i])
        total.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        p = m.prepare(slices[i])
        prep.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m.sharpness(slices[i])
        sharp.append(time.perf_counter() - t0)
        q = m.prepare(slices[i - 1])
        t0 = time.perf_counter()
        m.neighbour_ncc(q, p, shifts[i].step_dx, shifts[i].step_dy)
        m.similarity(q, p, shifts[i].step_dx, shifts[i].step_dy)
        pair.append(time.perf_counter() - t0)
    ms = 1e3
    return {"QCMonitor.add (all measures and judgement)": statistics.median(total) * ms,
            "  prepare (bin, statistics, sharpness)": statistics.median(prep) * ms,
            "    of which sharpness (768 px crop)": statistics.median(sharp) * ms,
            "  one neighbour pair (NCC + change)": statistics.median(pair) * ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=10, help="fault-injected series (each a new world and field)")
    ap.add_argument("--slices", type=int, default=360, help="slices per fault series")
    ap.add_argument("--per-kind", type=int, default=4, help="faults of each type per series")
    ap.add_argument("--clean", type=int, default=3, help="fault-free series of 500 slices for the false-alert count")
    ap.add_argument("--size", type=int, default=256, help="slice size of the recall runs, px")
    args = ap.parse_args()

    print("QC cost per slice at 2048 x 2048, one core:")
    for name, v in time_metrics().items():
        print(f"  {name:45s} {v:7.1f} ms" + (f"   ({v / TIME_GOAL_MS:.2f} x the {TIME_GOAL_MS:.0f} ms goal)"
                                                  if name.startswith("QCMonitor") else ""))

    total = FaultScore()
    clean = FaultScore()
    t0 = time.perf_counter()
    n_total = args.series * args.slices + args.clean * 500
    with Progress(transient=True) as progress:
        task = progress.add_task("QC on fault-injected series", total=n_total)
        for k in range(args.series):
            total.add(run_series(10 + k, 100 + k, args.slices, args.per_kind, args.size, progress, task))
        for k in range(args.clean):
            clean.add(run_series(50 + k, 200 + k, 500, 0, args.size, progress, task))
    elapsed = time.perf_counter() - t0
    print(f"\nRecall on {args.series} series of {args.slices} slices at {args.size} x {args.size} px "
          f"({args.per_kind} faults of each type per series; {elapsed:.0f} s for all runs):")
    print(f"  {'fault':12s} {'injected':>8s} {'found':>6s} {'recall':>7s} {'goal':>6s} {'ratio':>6s}")
    for kind in FAULT_KINDS:
        r = total.recall(kind)
        print(f"  {kind:12s} {total.injected.get(kind, 0):8d} {total.found.get(kind, 0):6d} {r:7.1%} "
              f"{RECALL_GOAL:6.0%} {r / RECALL_GOAL:6.2f}")
    missed = {}
    for f in total.missed:
        missed.setdefault(f.kind, []).append(f"{f.start}")
    for kind, where in missed.items():
        print(f"    missed {kind}: onsets {', '.join(where)}")
    both = total.clean_slices + clean.clean_slices
    n_false = len(total.false_alerts) + len(clean.false_alerts)
    per500 = n_false / both * 500 if both else float("nan")
    print(f"\nFalse alerts: {n_false} on {both} clean slices ({clean.clean_slices} in {args.clean} fault-free series of "
          f"500, the rest between faults) = {per500:.2f} per 500 clean slices (goal <= {FALSE_PER_500_GOAL:.0f}; "
          f"ratio {per500 / FALSE_PER_500_GOAL:.2f})")
    kinds: dict[str, int] = {}
    for _, k in total.false_alerts + clean.false_alerts:
        kinds[k] = kinds.get(k, 0) + 1
    if kinds:
        print("  by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    other: dict[str, int] = {}
    for _, k in total.other_kind:
        other[k] = other.get(k, 0) + 1
    if other:
        print("  alerts of another kind on faulty slices (not counted as false): "
              + ", ".join(f"{k} {v}" for k, v in sorted(other.items())))
    print(f"\nnumpy {np.__version__}")


if __name__ == "__main__":
    main()
