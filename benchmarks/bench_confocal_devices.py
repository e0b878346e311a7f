"""Frames per second of bare pymmcore-plus on the simulated confocal: 3 channels x 20 planes, 512x512, 63x.

The baseline the confocal controller is compared against (issue 5 asks for a ratio >= 0.9).
Two clocks: a virtual clock (exposure and moves cost no wall time: the software ceiling,
rendering included) and the real clock (10 ms exposures and Z moves really take their time).

Run: python benchmarks/bench_confocal_devices.py [--repeats N]
"""

from __future__ import annotations

import argparse
import logging
import time

import useq

from clemflow.schedule.clock import RealClock, VirtualClock
from clemflow.simulators.confocal import build_simulated_core, microscope_of
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.overview import DishPose

CHANNELS = ("405", "488", "639")
PLANES = 20
EXPOSURE_MS = 10.0


def make_sequence(x: float, y: float, z: float) -> useq.MDASequence:
    return useq.MDASequence(
        stage_positions=[(x, y, z)],
        channels=[{"config": c, "exposure": EXPOSURE_MS} for c in CHANNELS],
        z_plan={"range": (PLANES - 1) * 0.3, "step": 0.3},
        axis_order="pzc",
    )


def run_once(core, x: float, y: float, z: float) -> tuple[int, float]:
    frames = []

    def on_frame(img, event, meta) -> None:
        frames.append(event.index)

    core.mda.events.frameReady.connect(on_frame)
    seq = make_sequence(x, y, z)  # built right before running: useq caches iteration
    t0 = time.perf_counter()
    core.mda.run(seq)
    dt = time.perf_counter() - t0
    core.mda.events.frameReady.disconnect(on_frame)
    return len(frames), dt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)
    world = generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=5), seed=2)
    pose = DishPose(rotation_deg=12.0, shift_um=(800.0, -400.0))
    n_expected = len(CHANNELS) * PLANES
    for name, clock in (("virtual clock", VirtualClock()), ("real clock", RealClock())):
        core = build_simulated_core(world, pose, clock)
        ctx = microscope_of(core)
        core.setConfig("Objective", "63x")
        x, y = ctx.dish_to_stage(world.cells[0].center_um)
        z = ctx.z_drive_for(3.0, "63x", stage_xy=(x, y))
        run_once(core, float(x), float(y), float(z))  # warm-up
        rates = []
        for _ in range(args.repeats):
            n, dt = run_once(core, float(x), float(y), float(z))
            assert n == n_expected, (n, n_expected)
            rates.append(n / dt)
        best, worst = max(rates), min(rates)
        print(
            f"bare core.mda.run, {len(CHANNELS)} ch x {PLANES} z, 512x512, 63x, {EXPOSURE_MS:g} ms, {name}: "
            f"{sorted(rates)[len(rates) // 2]:.1f} frames/s (range {worst:.1f}-{best:.1f}, {args.repeats} runs)"
        )


if __name__ == "__main__":
    main()
