"""Controller vs bare pymmcore-plus on the same simulated devices, in one run.

A 3-channel x 20-plane 512 x 512 63x z-stack: frames per second through
`ConfocalController.zstack` (gap-recording engine, OME-TIFF writer, per-frame
records) and through a bare `core.mda.run(sequence)` with no writer. Goal
(issue 5): ratio at least 0.9. Virtual clock, so the figure is software cost
(rendering the specimen dominates).

Run: python benchmarks/bench_confocal.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import useq  # noqa: E402

from clemflow.confocal.controller import ConfocalController  # noqa: E402
from clemflow.protocol import load_protocol  # noqa: E402
from clemflow.schedule.clock import VirtualClock  # noqa: E402
from clemflow.simulators.confocal.core import build_simulated_core  # noqa: E402
from clemflow.simulators.specimen.overview import DishPose  # noqa: E402
from clemflow.simulators.specimen.world import SpecimenParams, generate_world  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(repeats: int = 3) -> None:
    protocol = load_protocol(REPO / "protocols" / "nanoparticle_uptake_timecourse.yaml")
    confocal = protocol.confocal.model_copy(update={"zstack": protocol.confocal.zstack.model_copy(update={
        "channels": protocol.confocal.zstack.channels[:3], "range": 19 * 0.3e-6, "step": 0.3e-6})})
    world = generate_world(SpecimenParams(cells_per_square=4), seed=1)
    core = build_simulated_core(world, DishPose(), VirtualClock())
    controller = ConfocalController(core, confocal)
    controller.use_objective("63x")
    cell = world.cells[0]
    xy = (float(cell.center_um[0]), float(cell.center_um[1]))
    frames = 3 * 20
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeats):
            sequence = useq.MDASequence(
                stage_positions=[useq.Position(x=xy[0], y=xy[1], z=2003.0)],
                z_plan=useq.ZRangeAround(range=19 * 0.3, step=0.3),
                channels=[useq.Channel(config=c.channel, group="Channel", exposure=c.exposure * 1e3) for c in confocal.zstack.channels],
                axis_order="pzc",
            )
            start = time.perf_counter()
            core.mda.run(sequence)
            bare.append(frames / (time.perf_counter() - start))
            start = time.perf_counter()
            result = controller.zstack(Path(tmp) / f"s{k}.ome.tif", xy, 2003.0, {"bench": k})
            ours.append(result.frames / (time.perf_counter() - start))
    b, o = float(np.median(bare)), float(np.median(ours))
    print(f"bare pymmcore-plus MDA (no writer): {b:.1f} frames/s (median of {repeats})")
    print(f"clemflow controller (OME-TIFF + records + gap engine): {o:.1f} frames/s")
    print(f"ratio controller / bare: {o / b:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
