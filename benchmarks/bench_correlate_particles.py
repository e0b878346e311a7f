"""Particles in context (issue 9, part 4): detection recall, classification agreement, false clusters, cost.

Each trial is a thin slab (``--fraction`` of the cell along the milling axis, centred) through the FIB-SEM
target cell of a small specimen world, at 20 nm pixels and 40 nm slices, with its confocal stack; the
LysoTracker and particle-dye channels are resampled onto the EM grid with the true transform. Detections are
matched to the world's clusters (a detection belongs to the cluster of its nearest particle within its reach +
60 nm). The untreated control of every world (same cell, same slab) gives the false clusters.
Goal: classification (endolysosome vs cytoplasm) agrees with the truth for >= 90 % of the clusters.

Run: python benchmarks/bench_correlate_particles.py [--seeds 4] [--fraction 0.06]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from clemflow.correlate.outputs import resample_to_em  # noqa: E402
from clemflow.correlate.particles import classify_clusters, detect_clusters  # noqa: E402
from clemflow.simulators.specimen import SpecimenParams, generate_world  # noqa: E402
from clemflow.simulators.specimen.clem_pair import apply, make_clem_pair  # noqa: E402
from clemflow.simulators.specimen.preview import pick_cell  # noqa: E402

AGREEMENT_GOAL = 0.90
SIZES = ((1, 1), (2, 3), (4, 9), (10, 49), (50, 10**6))
SMALL = dict(n_columns=1, n_rows=1, cells_per_square=3)


def _owner(world, pair, found) -> np.ndarray:
    cl = world.clusters
    pts = apply(pair.dish_to_em, cl.particles_um)
    tree = cKDTree(pts)
    owner = np.full(len(found), -1)
    for k, (c, r) in enumerate(zip(found.center_um, found.radius_um)):
        near = tree.query_ball_point(c, r + 0.06)
        if near:
            owner[k] = cl.particle_cluster[near[int(np.argmin(np.linalg.norm(pts[near] - c, axis=1)))]]
    return owner


def trial(seed: int, fraction: float) -> dict:
    world = generate_world(SpecimenParams(**SMALL), seed=seed)
    cell = pick_cell(world)
    span = (0.5 - fraction / 2, 0.5 + fraction / 2)
    pair = make_clem_pair(world, cell, em_pixel_nm=20, em_slice_nm=40, em_fraction=span)
    t0 = time.perf_counter()
    found = detect_clusters(pair.em, pair.em_voxel_um)
    t_detect = time.perf_counter() - t0
    lyso, dye = (resample_to_em(pair.lm[c], pair.lm_voxel_um, pair.lm_to_em, pair.em.shape, pair.em_voxel_um)
                 for c in (0, 2))
    t0 = time.perf_counter()
    table = classify_clusters(found, pair.em, pair.em_voxel_um, lyso_on_em=lyso, particle_on_em=dye)
    t_classify = time.perf_counter() - t0
    em_only = classify_clusters(found, pair.em, pair.em_voxel_um)
    owner = _owner(world, pair, found)
    cl = world.clusters
    in_slab = np.flatnonzero(pair.in_em(apply(pair.dish_to_em, cl.center_um)))
    hit = np.isin(in_slab, owner)
    n = cl.n_particles[in_slab]
    matched = owner >= 0
    truth = cl.lysosome_index[owner[matched]] >= 0
    control_world = generate_world(SpecimenParams(**SMALL, hours_since_treatment=None), seed=seed)
    control = make_clem_pair(control_world, cell, em_pixel_nm=20, em_slice_nm=40, em_fraction=span)
    false_control = len(detect_clusters(control.em, control.em_voxel_um))
    return {
        "seed": seed, "voxels": pair.em.size, "clusters": len(found), "t_detect": t_detect, "t_classify": t_classify,
        "hit": {s: (int(hit[(n >= s[0]) & (n <= s[1])].sum()), int(((n >= s[0]) & (n <= s[1])).sum())) for s in SIZES},
        "false": int((~matched).sum()), "matched": int(matched.sum()), "in_lyso": int(truth.sum()),
        "agree": int((table.in_endolysosome[matched] == truth).sum()),
        "agree_em": int((em_only.in_endolysosome[matched] == truth).sum()),
        "agree_lt": int(((table.lysotracker[matched] >= table.lysotracker_threshold) == truth).sum()),
        "false_control": false_control,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.06)
    args = ap.parse_args()
    results = []
    for seed in range(1, args.seeds + 1):
        r = trial(seed, args.fraction)
        results.append(r)
        print(f"seed {seed}: {r['clusters']} clusters, {r['matched']} matched ({r['in_lyso']} in endolysosomes), "
              f"agreement {r['agree'] / max(r['matched'], 1):.3f}, {r['false']} not particles, "
              f"control {r['false_control']}; detect {r['t_detect']:.1f} s, classify {r['t_classify']:.1f} s",
              flush=True)
    tot = {k: sum(r[k] for r in results) for k in ("voxels", "clusters", "t_detect", "t_classify", "false", "matched",
                                                  "in_lyso", "agree", "agree_em", "agree_lt", "false_control")}
    print(f"\nparticles in context over {len(results)} slabs ({args.fraction:.0%} of a cell each, 20 nm x 40 nm):")
    for s in SIZES:
        got = sum(r["hit"][s][0] for r in results)
        of = sum(r["hit"][s][1] for r in results)
        label = f"{s[0]}" if s[0] == s[1] else f"{s[0]}-{s[1]}" if s[1] < 10**6 else f">={s[0]}"
        print(f"  detection recall, clusters of {label:>5} particles: {got / max(of, 1):.3f} ({got}/{of})")
    print(f"  detections that are no particle: {tot['false']} of {tot['clusters']}")
    print(f"  false clusters in the untreated control slabs: {tot['false_control']} "
          f"({tot['false_control'] / len(results):.1f} per slab)")
    agreement = tot["agree"] / max(tot["matched"], 1)
    print(f"  classification agreement: {agreement:.3f} over {tot['matched']} clusters ({tot['in_lyso']} in "
          f"endolysosomes); goal >= {AGREEMENT_GOAL:.2f} -> ratio {agreement / AGREEMENT_GOAL:.2f}")
    print(f"    EM evidence alone: {tot['agree_em'] / max(tot['matched'], 1):.3f}; "
          f"LysoTracker alone: {tot['agree_lt'] / max(tot['matched'], 1):.3f}")
    rate = tot["voxels"] / tot["t_detect"] / 1e6
    print(f"  detection: {rate:.1f} Mvoxel/s at 20 nm x 40 nm (a 20 x 20 x 8 µm cell: "
          f"{20 * 20 * 8 / (0.02 * 0.02 * 0.04) / 1e6 / rate:.0f} s); classification "
          f"{1000 * tot['t_classify'] / max(tot['clusters'], 1):.0f} ms per cluster")
    return 0 if agreement >= AGREEMENT_GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
