"""Correlation by droplets (issue 9): registration with no initial guess vs rigid CPD from identity.

On the same specimen trials (clemflow.correlate.trials: any rotation about the
optical axis, mirrored or not, scale 0.95-1.05, z-scale +-15 %, EM over half
the cell, 20-30 % missing and spurious droplets on each side, light-resolution
losses, realistic localisation noise), side by side:

- ours: ``register_points`` (droplet-triangle hypotheses, refinement, model
  chosen by leave-one-out error);
- rigid CPD from identity (the CLEM-Reg approach; own numpy implementation,
  w = 0 as CLEM-Reg's default), in the frames as they come;
- the same CPD (outlier weight 0.3) given the pair's orientation except the
  trial's turn and mirror (what a person would set by hand first), for context;
- the floor: our model fitted to the true droplet pairs.

Success: median TRE (endolysosome and particle-cluster centres, never used
for registration) under 500 nm. Goals: success >= 97 %, our median TRE within
15 % of the floor, registration <= 0.5 s for 60 droplets on each side (one
core). Also counted: unrelated droplet sets (other cells, other worlds)
wrongly confirmed, which must be none.

Run: python benchmarks/bench_correlate.py [--trials 40] [--seed 0] [--timing 20] [--unrelated 60]
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

from clemflow.correlate.cpd import rigid_cpd  # noqa: E402
from clemflow.correlate.models import apply  # noqa: E402
from clemflow.correlate.register import CorrelationRefused, register_points  # noqa: E402
from clemflow.correlate.trials import Trial, TrialSettings, make_trials  # noqa: E402

SUCCESS_GOAL = 0.97
TRE_RATIO_GOAL = 1.15
TIME_GOAL_S = 0.5
SUCCESS_UM = 0.5


def _cpd_oriented(t: Trial, w: float) -> np.ndarray:
    """CPD after the pair's own orientation (rotation part of the trial-free map) is applied to the light side."""
    base = t.lm_to_em @ t.perturbation
    lin = base[:3, :3]
    u, _, vt = np.linalg.svd(lin)
    pre = np.eye(4)
    pre[:3, :3] = u @ vt  # the orientation only: no scale, no translation
    return rigid_cpd(apply(pre, t.lm_um), t.em_um, w=w) @ pre


def compare(trials: list[Trial], progress: Progress, task) -> dict[str, list[float]]:
    """Per trial TREs (µm; inf when refused) of each method and the floors."""
    out: dict[str, list[float]] = {k: [] for k in ("ours", "cpd", "cpd_oriented", "floor", "floor_z")}
    out["tre_estimate"], out["small_turn"] = [], []
    for t in trials:
        try:
            r = register_points(t.lm_um, t.em_um)
            out["ours"].append(t.tre_um(r.matrix))
            out["floor"].append(t.floor_um(r.model))
            out["tre_estimate"].append(r.tre_estimate_um)
        except CorrelationRefused:
            out["ours"].append(float("inf"))
            out["floor"].append(t.floor_um("similarity_z"))
        out["floor_z"].append(t.floor_um("similarity_z"))
        out["cpd"].append(t.tre_um(rigid_cpd(t.lm_um, t.em_um)))
        out["cpd_oriented"].append(t.tre_um(_cpd_oriented(t, 0.3)))
        out["small_turn"].append(float(abs(t.angle_deg) <= 45 and not t.mirrored))
        progress.advance(task)
    return out


def timing(n: int, seed: int, repeats: int = 3) -> tuple[list[float], list[float], list[float], int]:
    """Seconds per registration with 60 droplets on each side (whole-cell EM, cells of >= 80 droplets, all
    droplet sizes seen in light: the 60 kept on each side are drawn at random, so about half pair up).

    Returns the best wall time of ``repeats`` runs of each, the best CPU time of the process over
    them (what an unloaded core gives: this machine is shared), CPD's best wall time, and how many
    of ours succeeded.
    """
    settings = TrialSettings(em_coverage=1.0, lm_min_diameter_um=0.0)
    cpu, best, cpd, ok = [], [], [], 0
    for t in make_trials(n, seed=seed + 1000, settings=settings, min_droplets=80):
        lm, em = t.lm_um[:60], t.em_um[:60]
        if len(lm) < 60 or len(em) < 60:
            continue
        runs, cpus = [], []
        for k in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                r = register_points(lm, em)
                ok += k == 0 and t.tre_um(r.matrix) < SUCCESS_UM
            except CorrelationRefused:
                pass
            runs.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        cpu.append(min(cpus))
        best.append(min(runs))
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rigid_cpd(lm, em)
            runs.append(time.perf_counter() - t0)
        cpd.append(min(runs))
    return best, cpu, cpd, ok


def unrelated(n: int, seed: int) -> tuple[int, int, list[int]]:
    """Droplets of one cell registered to the EM droplets of another: how many are (wrongly) confirmed."""
    a = make_trials(n, seed=seed + 2000)
    b = make_trials(n, seed=seed + 3000)
    confirmed, tried, agreeing = 0, 0, []
    for k in range(n):
        x, y = a[k], b[(k + 1) % n]
        if x.label == y.label:
            continue
        tried += 1
        try:
            r = register_points(x.lm_um, y.em_um)
            confirmed += 1
            agreeing.append(len(r.pairs))
        except CorrelationRefused as why:
            agreeing.append(why.best_inliers)
    return confirmed, tried, agreeing


def _summary(name: str, tre: list[float], floor: float) -> str:
    ok = np.mean(np.asarray(tre) < SUCCESS_UM)
    med = float(np.median(tre))
    return (f"  {name:42s} {ok:7.1%} {ok / SUCCESS_GOAL:6.2f}   {med * 1e3:9.0f} nm"
            + (f"  {med / floor:6.2f}" if np.isfinite(med) else "       -"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing", type=int, default=20, help="registrations timed at 60 droplets per side")
    ap.add_argument("--unrelated", type=int, default=60, help="pairs of unrelated droplet sets")
    args = ap.parse_args()

    trials = make_trials(args.trials, seed=args.seed)
    with Progress(transient=True) as progress:
        task = progress.add_task("registering trials", total=len(trials))
        res = compare(trials, progress, task)
    floor = float(np.median(res["floor"]))
    n_lm = statistics.median(len(t.lm_um) for t in trials)
    n_em = statistics.median(len(t.em_um) for t in trials)
    n_pairs = [len(t.pairs) for t in trials]
    print(f"{len(trials)} trials (seed {args.seed}): median {n_lm:.0f} light and {n_em:.0f} EM droplets, "
          f"{min(n_pairs)}-{max(n_pairs)} true pairs (median {statistics.median(n_pairs):.0f}), "
          f"{sum(t.mirrored for t in trials)} mirrored, EM over half the cell")
    print(f"  {'method':42s} {'success':>7s} {'ratio':>6s}   {'median TRE':>12s}  {'/floor':>6s}")
    print(_summary("ours (register_points, model auto)", res["ours"], floor))
    print(_summary("rigid CPD from identity (CLEM-Reg approach)", res["cpd"], floor))
    print(_summary("rigid CPD w=0.3, orientation given but turn", res["cpd_oriented"], floor))
    small = [c for c, s in zip(res["cpd_oriented"], res["small_turn"]) if s]
    if small:
        print(f"    of which trials turned <= 45 deg and not mirrored: {np.mean(np.asarray(small) < SUCCESS_UM):.0%} "
              f"of {len(small)}")
    print(f"  floor: our model on the true pairs, median {floor * 1e3:.0f} nm (similarity_z on them: "
          f"{np.median(res['floor_z']) * 1e3:.0f} nm)")
    ratio = float(np.median(res["ours"])) / floor
    print(f"  ours vs floor: {ratio:.3f} (goal <= {TRE_RATIO_GOAL}; ratio to goal {ratio / TRE_RATIO_GOAL:.2f}); "
          f"leave-one-out TRE estimate median {np.median(res['tre_estimate']) * 1e3:.0f} nm")

    best, cpu, cpd_t, ok = timing(args.timing, args.seed)
    med, med_cpu = statistics.median(best), statistics.median(cpu)
    print(f"\nRegistration time, 60 light and 60 EM droplets, one thread ({len(best)} registrations, {ok} successful;"
          f" best of 3 runs each):")
    print(f"  ours       CPU median {med_cpu:.3f} s, max {max(cpu):.3f} s   goal {TIME_GOAL_S} s   ratio "
          f"{med_cpu / TIME_GOAL_S:.2f}   (wall median {med:.3f} s on this shared machine, load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  rigid CPD  median {statistics.median(cpd_t):.3f} s (best of 3)")

    confirmed, tried, agreeing = unrelated(args.unrelated, args.seed)
    print(f"\nUnrelated droplet sets (another cell, often another world): {confirmed} of {tried} wrongly confirmed "
          f"(goal 0); agreeing droplets of the best placement: max {max(agreeing)}, median "
          f"{statistics.median(agreeing):.0f} (8 needed)")
    print(f"\nnumpy {np.__version__}")


if __name__ == "__main__":
    main()
