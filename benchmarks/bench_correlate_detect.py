"""Lipid-droplet detection (issue 9): time of a 20 x 20 x 8 µm confocal stack against the 5 s goal, and
the EM volume of a correlative pair; recall, precision and centre errors against the specimen truth.

Light: the BODIPY channel of the 63x confocal rendered over 194 x 194 px (0.103 µm) x 33 planes
(0.25 µm) centred on the target cell, one core. Electron: the pair's survey volume (50 nm pixels,
100 nm slices) through the middle half of the same cell. Recall counts droplets of 0.4 µm and more whose
centre lies inside the volume; precision counts detections within 0.3 µm of any droplet of the world;
centre errors are split lateral (x, y) and axial (z).

Run: python benchmarks/bench_correlate_detect.py [--seeds 3] [--em-seeds 2] [--repeat 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

from clemflow.correlate.detect_em import detect_em_droplets  # noqa: E402
from clemflow.correlate.detect_lm import detect_lm_droplets  # noqa: E402
from clemflow.correlate.merge import merge_touching  # noqa: E402
from clemflow.simulators.specimen import SpecimenParams, generate_world  # noqa: E402
from clemflow.simulators.specimen.clem_pair import LM_CHANNELS, apply, make_clem_pair  # noqa: E402
from clemflow.simulators.specimen.lm import OBJECTIVES, render_lm_stack  # noqa: E402
from clemflow.simulators.specimen.preview import pick_cell  # noqa: E402

LM_GOAL_S = 5.0
MATCH_UM = 0.3
FIELD = (194, 194, 33)  # x, y px and planes: 20 x 20 x 8 µm at 0.103 / 0.25 µm


@dataclass
class Tally:
    """Detections against truth, pooled over volumes."""

    big: int = 0
    big_found: int = 0
    found: int = 0
    true_found: int = 0
    lateral: list[float] = field(default_factory=list)
    axial: list[float] = field(default_factory=list)
    radius_ratio: list[float] = field(default_factory=list)

    def add(self, centre: np.ndarray, radius: np.ndarray, inside: np.ndarray, every: np.ndarray,
            found_c: np.ndarray, found_r: np.ndarray) -> None:
        big = inside & (2 * radius >= 0.4)
        self.big += int(big.sum())
        self.found += len(found_c)
        if len(found_c) == 0:
            return
        d = np.linalg.norm(found_c[:, None] - centre[None], axis=2)
        self.big_found += int((d.min(axis=0)[big] <= MATCH_UM).sum())
        self.true_found += int((np.linalg.norm(found_c[:, None] - every[None], axis=2).min(axis=1) <= MATCH_UM).sum())
        j = d.argmin(axis=1)
        ok = d[np.arange(len(found_c)), j] <= MATCH_UM
        err = found_c[ok] - centre[j[ok]]
        self.lateral += np.hypot(err[:, 0], err[:, 1]).tolist()
        self.axial += np.abs(err[:, 2]).tolist()
        self.radius_ratio += (found_r[ok] / radius[j[ok]]).tolist()

    def lines(self) -> list[str]:
        lat, ax = np.array(self.lateral) * 1e3, np.array(self.axial) * 1e3
        return [
            f"recall (>= 0.4 µm, inside)  {self.big_found}/{self.big} = {self.big_found / max(self.big, 1):.1%}",
            f"precision                   {self.true_found}/{self.found} = {self.true_found / max(self.found, 1):.1%}",
            f"centre error lateral        median {np.median(lat):6.1f} nm   p90 {np.percentile(lat, 90):6.1f} nm",
            f"centre error axial          median {np.median(ax):6.1f} nm   p90 {np.percentile(ax, 90):6.1f} nm",
            f"radius found / true         median {np.median(self.radius_ratio):.3f}   "
            f"p10-p90 {np.percentile(self.radius_ratio, 10):.3f}-{np.percentile(self.radius_ratio, 90):.3f}",
        ]


def light(seed: int, repeat: int, tally: Tally) -> float:
    """Render one 20 x 20 x 8 µm BODIPY stack on the target cell; median detection time in s."""
    world = generate_world(SpecimenParams(), seed=seed)
    cell = world.cells[pick_cell(world)]
    cx, cy = cell.center_um
    obj = OBJECTIVES["63x"]
    nx, ny, nz = FIELD
    z = -0.5 + 0.25 * np.arange(nz)
    stack = render_lm_stack(world, cx, cy, z, obj, "488", 0.1, (ny, nx), rng=seed)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        found = detect_lm_droplets(stack, (0.25, obj.pixel_um, obj.pixel_um))
        times.append(time.perf_counter() - t0)
    # dish -> stack frame: pixel (0, 0) at the field's corner, plane 0 at z[0]
    origin = np.array([cx - (nx - 1) / 2 * obj.pixel_um, cy - (ny - 1) / 2 * obj.pixel_um, z[0]])
    ld = world.lipid_droplets
    every = ld.center_um - origin
    extent = np.array([(nx - 1) * obj.pixel_um, (ny - 1) * obj.pixel_um, (nz - 1) * 0.25])
    inside = np.all((every >= 0) & (every <= extent), axis=1)
    tally.add(every, ld.radius_um, inside, every, found.center_um, found.radius_um)
    return statistics.median(times)


def electron(seed: int, tally: Tally, merged: list[tuple[int, int]]) -> tuple[float, tuple[int, ...]]:
    """Detection time (s) on a pair's EM volume through the middle half of the target cell, and its shape."""
    world = generate_world(SpecimenParams(), seed=seed)
    pair = make_clem_pair(world, pick_cell(world), em_fraction=(0.25, 0.75), seed=seed)
    t0 = time.perf_counter()
    found = detect_em_droplets(pair.em, pair.em_voxel_um)
    elapsed = time.perf_counter() - t0
    merged.append((len(found), len(merge_touching(found))))
    t = pair.objects("lipid_droplets")
    scale = abs(np.linalg.det(pair.dish_to_em[:3, :3])) ** (1 / 3)
    every = apply(pair.dish_to_em, world.lipid_droplets.center_um)
    tally.add(t["em"], t["radius_um"] * scale, pair.in_em(t["em"]), every, found.center_um, found.radius_um)
    return elapsed, pair.em.shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="worlds for the confocal stack (one stack each)")
    ap.add_argument("--em-seeds", type=int, default=2, help="worlds for the EM volume (one pair each)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per stack (median)")
    args = ap.parse_args()

    lm = Tally()
    times = [light(1 + k, args.repeat, lm) for k in range(args.seeds)]
    t = statistics.median(times)
    print(f"Confocal stack {FIELD[0]} x {FIELD[1]} px x {FIELD[2]} planes (20 x 20 x 8 µm), BODIPY, one core, "
          f"{args.seeds} worlds:")
    print(f"  detection time              median {t:.2f} s (max {max(times):.2f} s)   "
          f"goal <= {LM_GOAL_S:.0f} s   ratio {t / LM_GOAL_S:.2f}")
    for line in lm.lines():
        print("  " + line)

    em = Tally()
    merged: list[tuple[int, int]] = []
    runs = [electron(1 + k, em, merged) for k in range(args.em_seeds)]
    print(f"\nEM survey volume (50 nm pixels, 100 nm slices; middle half of the cell), one core, "
          f"{args.em_seeds} pairs:")
    for (secs, shape), (n, m) in zip(runs, merged):
        vox = int(np.prod(shape))
        print(f"  {shape[0]} x {shape[1]} x {shape[2]} voxels: {secs:.2f} s ({vox / secs / 1e6:.1f} Mvoxel/s); "
              f"{n} droplets, {m} after merging at the LM resolution (0.25, 0.6) µm")
    for line in em.lines():
        print("  " + line)
    print(f"\n(LM channel order {LM_CHANNELS}; numpy {np.__version__})")


if __name__ == "__main__":
    main()
