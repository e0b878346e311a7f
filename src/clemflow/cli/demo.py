"""`clemflow demo`: the whole workflow on the built-in simulators, stage by stage.

Each capability joins the demo when it lands. Today: validate the example
protocols and show the plan of the 3D-CLEM protocol.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.rule import Rule

from ..io.run_folder import RunFolder
from .app import app
from .console import console, load_protocol_or_exit
from .plan import print_plan

CLEM_PROTOCOL = "clem_2h_6h_24h.yaml"


def examples_folder() -> Path:
    """The repository's protocols/ folder (the demo runs from a source checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "protocols"
        if (candidate / CLEM_PROTOCOL).is_file():
            return candidate
    raise FileNotFoundError("protocols/ with the example protocols was not found beside the clemflow sources")


@app.command()
def demo(
    out: Path = typer.Option(Path("clemflow-demo"), "--out", help="Parent folder of the demo's run folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated specimen."),
) -> None:
    """Run the 3D-CLEM workflow on the built-in simulators and show each stage."""
    folder = examples_folder()
    console.print(Rule("1. Protocols"))
    protocols = {}
    for path in sorted(folder.glob("*.yaml")):
        protocols[path.name] = load_protocol_or_exit(path)
        console.print(f"[green]✓[/green] {path.name}: valid")
    clem_path = folder / CLEM_PROTOCOL
    clem = protocols[CLEM_PROTOCOL]

    console.print(Rule("2. Plan of the 3D-CLEM protocol"))
    print_plan(clem)

    run_dir = out / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run = RunFolder.open(run_dir, clem, clem_path.read_text(encoding="utf-8"))

    console.print(Rule("3. The simulated specimen (ground truth both instruments image)"))
    pictures = _specimen_stage(run.path / "specimen", seed=seed)
    run.journal.append("specimen", "done", seed=seed, pictures=[p.name for p in pictures])

    console.print(Rule("4. Relocation: the target cell from the confocal overview to the FIB-SEM"))
    relocated = _relocation_stage(run.path / "relocation", seed=seed)
    run.journal.append("relocation", "done", **relocated)

    console.print(Rule("5. Live-cell time course on the simulated confocal (virtual clock)"))
    course = _timecourse_stage(folder / "nanoparticle_uptake_timecourse.yaml", run.path / "timecourse", seed=seed)
    run.journal.append("timecourse", "done", **course)

    console.print(Rule("6. FIB-SEM through the bridge: the Zeiss look-alike at the relocated target"))
    from .demo_bridge import bridge_stage

    bridged = bridge_stage(run.path / "fibsem", run.path / "relocation" / "targets.json", seed=seed)
    run.journal.append("fibsem-bridge", "done", **bridged)

    console.print(Rule("7. Slice-and-view through the bridge: stopped half way, resumed, nothing milled twice"))
    from .demo_slice_and_view import slice_and_view_stage

    sliced = slice_and_view_stage(run.path / "slice-and-view", run.path / "relocation" / "targets.json",
                                  folder / "fibsem_slice_and_view.yaml", seed=seed)
    run.journal.append("slice-and-view", "done", **sliced)

    console.print(Rule("8. Correlation: a survey run through the cell, checked online against its confocal stack"))
    from .demo_correlation import correlation_stage

    correlated = correlation_stage(run.path / "correlation", run.path / "relocation" / "targets.json",
                                   folder / "fibsem_slice_and_view.yaml", seed=seed)
    run.journal.append("correlation", "done", **correlated)

    run.journal.append("demo", "done", stages=["protocols", "plan", "specimen", "relocation", "timecourse", "fibsem-bridge",
                                             "slice-and-view", "correlation"])
    console.print(Rule())
    console.print(f"Demo run folder: {run.path}")


def _specimen_stage(folder: Path, seed: int) -> list[Path]:
    """Generate the specimen, save its truth, and write the preview pictures."""
    from rich.progress import Progress

    from clemflow.simulators.specimen.preview import write_preview
    from clemflow.simulators.specimen.world import SpecimenParams

    with Progress(transient=True, console=console) as progress:
        task = progress.add_task("generating the specimen and rendering LM and EM previews", total=None)
        pictures = write_preview(folder, seed=seed, params=SpecimenParams(hours_since_treatment=24.0))
        progress.update(task, completed=1)
    for picture in pictures:
        console.print(f"  [green]✓[/green] {picture}")
    return pictures


def _relocation_stage(folder: Path, seed: int) -> dict:
    """Find the grid in a 10x overview and in the SEM overview of the block; carry a cell across."""
    import numpy as np

    from clemflow.grid.find import find_grid
    from clemflow.grid.plots import plot_grid_finding
    from clemflow.grid.registration import CameraGeometry, ImageView, register_grid
    from clemflow.grid.targets import Target, TargetsFile, write_targets
    from clemflow.simulators.specimen.em_overview import render_sem_overview
    from clemflow.simulators.specimen.overview import Damage, DishPose, render_posed_overview
    from clemflow.simulators.specimen.world import SpecimenParams, generate_world

    folder.mkdir(parents=True, exist_ok=True)
    world = generate_world(SpecimenParams(hours_since_treatment=24.0), seed=seed)
    scheme = world.grid
    # the operator picks, in the middle square, the cell with the most lipid droplets: the landmarks of correlation
    middle = world.square_of_cell(world.cells[len(world.cells) // 2])
    candidates = [c for c in world.cells if world.square_of_cell(c) == middle]
    droplets = np.bincount(world.lipid_droplets.cell_id[world.lipid_droplets.radius_um >= 0.2], minlength=len(world.cells))
    cell = max(candidates, key=lambda c: droplets[c.id])
    target = np.array(cell.center_um, float)

    # Confocal: the dish sits rotated on the stage; the 10x overview is not centred on the cell.
    pose = DishPose(rotation_deg=143.0, shift_um=(12000.0, -3500.0), mirror=False)
    lm_centre = pose.dish_to_stage((target + [180.0, -120.0])[None])[0]
    lm_image, _ = render_posed_overview(world, pose, tuple(lm_centre), 0.65, (2048, 2048), damage=Damage(0.12, 1, seed), rng=seed)
    lm_view = ImageView(lm_image.shape, tuple(lm_centre), CameraGeometry(0.65))
    lm = find_grid(lm_image, 0.65, scheme)
    lm_registration = register_grid([(lm_image, lm_view, lm)])
    lm_stage = pose.dish_to_stage(target[None])[0]  # where the 63x stack of this cell was taken
    position = lm_registration.locate(lm_stage)
    plot_grid_finding(lm_image, lm, folder / "lm_10x_grid.png", targets={"target": tuple(lm_view.stage_to_pixel(lm_stage[None])[0])},
                      title=f"10x overview: grid at {lm.angle_deg:.1f} deg, target in {position.label}")

    # FIB-SEM: SEM overview of the block surface around where the target should be.
    block = world.to_em(np.array([[*target, 0.0]]))[0][:2]
    em_centre = block + np.array([-140.0, 90.0])
    em_image, _ = render_sem_overview(world, tuple(em_centre), 1.0, (2048, 2048), dwell_s=4e-6, seed=seed)
    em_view = ImageView(em_image.shape, tuple(em_centre), CameraGeometry(1.0))
    em = find_grid(em_image, 1.0, scheme)
    em_registration = register_grid([(em_image, em_view, em)])
    em_stage = em_registration.stage_of(position)
    plot_grid_finding(em_image, em, folder / "sem_overview_grid.png", targets={"target": tuple(em_view.stage_to_pixel(em_stage[None])[0])},
                      title=f"SEM overview of the block: {'mirrored' if em.mirrored else 'not mirrored'}, target in {position.label}")

    error = float(np.linalg.norm(em_stage - block))
    targets = TargetsFile(scheme=scheme, targets=[Target(
        name=f"cell-{cell.id}", sample="D1", label=position.label, offset_um=position.offset_um,
        lm_stage_um=tuple(map(float, lm_stage)), lm_predicted_error_um=lm_registration.predicted_error_um(lm_stage),
        em_stage_um=tuple(map(float, em_stage)), em_predicted_error_um=em_registration.predicted_error_um(em_stage),
    )])
    write_targets(folder / "targets.json", targets)
    console.print(f"  10x overview: grid found, labels read with confidence {lm.labelling.confidence:.2f}; target cell "
                  f"{cell.id} is in square {position.label} at offset ({position.offset_um[0]:+.1f}, {position.offset_um[1]:+.1f}) µm")
    console.print(f"  SEM overview of the block: grid found ({'mirrored' if em.mirrored else 'not mirrored'}); "
                  f"target at EM stage ({em_stage[0]:.1f}, {em_stage[1]:.1f}) µm, predicted error "
                  f"{em_registration.predicted_error_um(em_stage):.2f} µm, true error {error:.2f} µm")
    for picture in ("lm_10x_grid.png", "sem_overview_grid.png", "targets.json"):
        console.print(f"  [green]✓[/green] {folder / picture}")
    return {"label": position.label, "error_um": error}


def _timecourse_stage(protocol_path: Path, out: Path, seed: int) -> dict:
    """The 48 h time course, 2 dishes x 7 timepoints, on the simulator with a virtual clock.

    The demo images one automatically chosen cell per dish in 5-plane stacks so that it takes a
    couple of minutes; `clemflow run` runs the protocol as written.
    """
    from rich.progress import BarColumn, Progress, TextColumn

    from clemflow.confocal.controller import ConfocalController
    from clemflow.confocal.session import ConfocalSession
    from clemflow.simulators.confocal.core import build_simulated_core, microscope_of
    from clemflow.simulators.confocal.dishes import SimulatedDishHandler

    from ..io.run_folder import RunFolder
    from ..schedule.clock import VirtualClock
    from ..schedule.runner import run_protocol_schedule

    protocol = load_protocol_or_exit(protocol_path)
    stack = protocol.confocal.zstack.model_copy(update={"range": 4 * 1e-6, "step": 1e-6})
    first_square = {}
    for item in protocol.confocal.targets.items:
        first_square.setdefault(item.sample, item)
    targets = protocol.confocal.targets.model_copy(update={"cells_per_square": 1, "items": list(first_square.values())})
    confocal = protocol.confocal.model_copy(update={"zstack": stack, "targets": targets})
    protocol = protocol.model_copy(update={"confocal": confocal})
    clock = VirtualClock()
    folder = RunFolder.open(out, protocol, protocol_path.read_text(encoding="utf-8"), clock=clock)
    core = build_simulated_core(None, clock=clock, seed=seed)
    samples = {s.id: (seed * 100 + i, s.role == "treated") for i, s in enumerate(protocol.samples)}
    dishes = SimulatedDishHandler(microscope_of(core), samples, list(protocol.timepoints), seed=seed)
    session = ConfocalSession(ConfocalController(core, confocal), protocol, folder.path, dishes)
    total = len(protocol.samples) * len(protocol.timepoints)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console) as progress:
        task = progress.add_task("acquisitions", total=total)

        def listen(event) -> None:
            if event.step == "acquire" and event.outcome in ("done", "failed", "skipped", "incomplete"):
                hours = event.data.get("timepoint_s", 0) / 3600
                progress.update(task, advance=1 if event.outcome != "incomplete" else 0,
                                description=f"dish {event.data.get('sample')} at {hours:g} h: {event.outcome}")

        summary = run_protocol_schedule(protocol, folder, session.acquire, clock=clock, listener=listen)
    stacks = sorted(folder.path.glob("confocal/*/*/*.ome.tif"))
    console.print(f"  schedule {summary.state}: {len(summary.done)} of {total} acquisitions done, "
                  f"{len(stacks)} z-stacks in {folder.path / 'confocal'}")
    _timecourse_picture(stacks, folder.path / "timecourse_639_mip.png")
    console.print(f"  [green]✓[/green] {folder.path / 'timecourse_639_mip.png'}")
    quantified = _quantify_stage(folder.path)
    return {"done": len(summary.done), "stacks": len(stacks), "cells_quantified": quantified}


def _quantify_stage(run_dir: Path) -> int:
    """Uptake per cell and per timepoint from the stacks just taken, as `clemflow quantify` does: curves and tables."""
    from ..quantify.timecourse import quantify_run
    from ..quantify.writers import write_outputs

    out = run_dir / "quantified"
    run = quantify_run(run_dir, overlays_dir=out / "overlays")
    _, files = write_outputs(out, run)
    console.print(f"  quantified {len(run.cells)} cells in {len(run.stacks)} stacks ({sum(run.excluded_at_border.values())} cut by the "
                  "image border, left out); curves in the style of the study's Fig. 5:")
    for path in files:
        if path.suffix in (".png", ".csv"):
            console.print(f"  [green]✓[/green] {path}")
    return len(run.cells)


def _timecourse_picture(stacks: list[Path], path: Path) -> None:
    """One row per dish and target, one column per timepoint: particle channel (639 nm), max projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import tifffile

    rows: dict[str, list[Path]] = {}
    for stack in stacks:
        rows.setdefault(f"{stack.parent.parent.name}/{stack.name.rsplit('_a', 1)[0]}", []).append(stack)
    names = sorted(rows)
    columns = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(names), columns, figsize=(1.6 * columns, 1.7 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, stack in enumerate(sorted(rows[name])):
            with tifffile.TiffFile(stack) as tif:
                data = tif.asarray()
                channel = [i for i, n in enumerate(_channel_names(tif.ome_metadata)) if n == "639"] or [0]
            mip = data[channel[0]].max(axis=0).astype(float)
            axes[r, c].imshow(mip, cmap="magma", vmin=np.percentile(mip, 1), vmax=np.percentile(mip, 99.9))
            axes[r, c].set_title(stack.parent.name.split("_", 1)[1], fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("Particles (639 nm) in the same cells over the time course", fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _channel_names(ome: str) -> list[str]:
    import re

    return re.findall(r'<Channel [^>]*Name="([^"]+)"', ome)
