"""Demo stage: a survey slice-and-view run through the target cell, checked online against its confocal stack.

The confocal z-stack of the relocated cell (rendered by the specimen
simulator as the 63x confocal records it: LysoTracker 405, BODIPY 488,
particle dye 639) is written as the confocal run writes its stacks. The
protocol names it in ``correlation.lm_stack``; the engine then mills through
the cell at survey settings (50 nm pixels, 100 nm slices) while the live
analysis aligns each slice and, every few slices, asks whether the droplets
milled so far are the chosen cell's. At the end the whole aligned volume is
correlated as ``clemflow correlate`` would, and the overlays are drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..bridge.server import BridgeServer
from ..protocol import load_protocol
from .bridge_backends import BackendOptions, open_backend
from .console import console
from .demo_slice_and_view import _demo_protocol_text, _run_engine

__all__ = ["correlation_stage"]

SURVEY_SLICES = 70  # 7 µm at 100 nm: from the cell's middle, well past where the droplets confirm it
UPDATE_EVERY = 10  # slices (1 µm) between online verdicts


def correlation_stage(folder: Path, targets_path: Path, protocol_path: Path, seed: int) -> dict[str, Any]:
    """Write the target's confocal stack, mill through the cell with the online check, correlate the volume."""
    from ..correlate.inputs import read_em, read_lm
    from ..correlate.online import online_from_protocol
    from ..correlate.pipeline import correlate
    from ..correlate.register import CorrelationRefused

    folder.mkdir(parents=True, exist_ok=True)
    stack = _write_confocal_stack(folder / "confocal_target_cell.ome.tif", targets_path, seed)
    console.print(f"  [green]✓[/green] confocal stack of the target cell: {stack}")
    survey = folder / "survey.yaml"
    survey.write_text(_survey_protocol_text(protocol_path, targets_path, stack), encoding="utf-8")
    protocol = load_protocol(survey)
    options = BackendOptions(sim_state=folder / "instrument", sim_time_scale=0.0, sim_seed=seed, sim_world="full",
                             sim_drift_nm_per_slice=(12.0, -8.0))
    server = BridgeServer(open_backend("sim-smartsem", options), bind="tcp://127.0.0.1:0", events="tcp://127.0.0.1:0",
                          record_dir=folder / "record", backend_name="sim-smartsem").start()
    run_dir = folder / "run"
    online = online_from_protocol(protocol, survey)
    try:
        outcome = _run_engine(server, protocol, survey, run_dir, targets_path, SURVEY_SLICES, correlation=online)
    finally:
        server.close()
    if outcome.state != "done":
        raise RuntimeError(f"survey run stopped: {outcome.message}")
    confirmed = next((v for v in online.history if v.state == "confirmed"), None) if online is not None else None
    if confirmed is not None:
        console.print(f"  [green]✓[/green] online: confirmed on the chosen cell after {confirmed.depth_um:.1f} µm "
                      f"({confirmed.agreeing} droplets, TRE about {confirmed.tre_um * 1000:.0f} nm)")
    else:
        console.print("  [yellow]![/yellow] online: the run was not confirmed on the chosen cell")
    out = folder / "correlation"
    console.print("  correlating the confocal stack with the whole aligned volume (as `clemflow correlate` does):")
    try:
        result = correlate(read_lm(stack), read_em(run_dir / "aligned"), out, protocol.correlation)
    except CorrelationRefused as refused:
        console.print(f"  [red]✗[/red] correlation refused: {refused.reason}")
        return {"confirmed_at_um": confirmed.depth_um if confirmed else None, "refused": refused.reason}
    reg = result.registration
    console.print(f"  {len(result.lm_droplets)} droplets in the confocal stack, {len(result.em_droplets)} in the EM, "
                  f"{len(reg.pairs)} agree ({reg.model}, {'mirrored' if reg.mirrored else 'not mirrored'}, scale "
                  f"{reg.scale:.3f}); leave-one-out TRE {reg.tre_estimate_um * 1000:.0f} nm")
    for note in result.notes:
        console.print(f"  [yellow]![/yellow] {note}")
    if result.clusters is not None:
        summary = result.clusters.summary()
        console.print(f"  particle clusters: {summary}")
    for path in result.files:
        if path.suffix in (".png", ".json", ".csv"):
            console.print(f"  [green]✓[/green] {path}")
    return {"confirmed_at_um": confirmed.depth_um if confirmed else None, "inliers": len(reg.pairs),
            "tre_estimate_um": float(reg.tre_estimate_um), "model": reg.model, "mirrored": bool(reg.mirrored)}


def _survey_protocol_text(source: Path, targets_path: Path, stack: Path) -> str:
    """The demo's slice-and-view protocol at survey settings, with the online check against ``stack``."""
    text = _demo_protocol_text(source, targets_path)
    edits = {
        "pixel_size: 10 nm, frame: [1024, 768],": "pixel_size: 50 nm, frame: [800, 288],",
        "slice_thickness: 15 nm": "slice_thickness: 100 nm",
        "dwell: 1 us, line_averaging: 1,": "dwell: 2 us, line_averaging: 4,",  # survey frames: 4x fewer pixels
    }
    for old, new in edits.items():
        if old not in text:
            raise ValueError(f"{source} no longer has {old!r}; update demo_correlation._survey_protocol_text")
        text = text.replace(old, new)
    return text + f"\ncorrelation: {{lm_stack: {stack.name}, update_every: {UPDATE_EVERY}}}\n"


def _write_confocal_stack(path: Path, targets_path: Path, seed: int) -> Path:
    """The 63x stack of the relocated cell, three channels, as the confocal writes its stacks."""
    from clemflow.simulators.specimen.lm import OBJECTIVES, render_lm_stack
    from clemflow.simulators.specimen.world import SpecimenParams, generate_world

    from ..confocal.writer import StackWriter
    from ..grid.targets import read_targets

    if path.exists():
        return path
    world = generate_world(SpecimenParams(hours_since_treatment=24.0), seed=seed)
    target = read_targets(targets_path).targets[0]
    cell = world.cells[int(target.name.split("-")[-1])]
    obj = OBJECTIVES["63x"]
    n = int(np.ceil(2 * (cell.max_radius_um + 1.5) / obj.pixel_um / 16) * 16)
    step = 0.25
    z = -0.5 + np.arange(int(np.ceil((cell.height_um + 1.0) / step)) + 1) * step
    channels = ["405", "488", "639"]
    writer = StackWriter(path, channels, len(z), (n, n), obj.pixel_um, step,
                         metadata={"source": "clemflow demo: specimen simulator, 63x/1.4 confocal", "cell": cell.id})
    for c, ch in enumerate(channels):
        planes = render_lm_stack(world, *cell.center_um, z, obj, ch, 0.1, (n, n), rng=seed * 7 + c)
        for k, plane in enumerate(planes):
            writer.write(c, k, plane, {"z_um": float(z[k]), "channel": ch})
    writer.close(complete=True)
    return path
