"""`clemflow run PROTOCOL --out DIR [--time-scale N]`: run a protocol into a run folder, resuming it."""

from __future__ import annotations

from pathlib import Path

import typer

from ..io.run_folder import RunFolder, RunFolderError
from ..protocol import Protocol
from .app import app
from .console import EXIT_INVALID, EXIT_REFUSED, console, load_protocol_or_exit
from .plan import print_plan


@app.command()
def run(
    protocol_file: Path = typer.Argument(..., help="Protocol file (YAML)."),
    out: Path = typer.Option(..., "--out", help="Run folder; an existing run of the same protocol is resumed."),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Planned seconds per real second (1 = real time)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated specimens (simulator only)."),
    interactive: bool = typer.Option(False, "--interactive", help="Ask the operator at each prompt (p/r/a to pause, resume, abort)."),
) -> None:
    """Run a protocol on its instruments, writing everything into one run folder."""
    if time_scale <= 0:
        raise typer.BadParameter("must be positive", param_hint="--time-scale")
    protocol = load_protocol_or_exit(protocol_file)
    from ..schedule.resume import resume_clock

    clock = resume_clock(out, time_scale) if out.exists() else _fresh_clock(time_scale)
    try:
        folder = RunFolder.open(out, protocol, protocol_file.read_text(encoding="utf-8"), clock=clock)
    except RunFolderError as exc:
        console.print(f"[red]✗[/red] {exc}")
        raise typer.Exit(EXIT_INVALID) from None
    console.print(f"Run folder {folder.path} {'resumed' if folder.resumed else 'created'} (run {folder.run_id})")
    print_plan(protocol)
    if protocol.confocal is not None and protocol.timepoints:
        code = _run_confocal(protocol, folder, clock, protocol_file, seed, interactive)
        if code:
            raise typer.Exit(code)
    if protocol.fibsem is not None:
        fibsem_command = f"clemflow fibsem run {protocol_file} --out {out}"
        if protocol.confocal is not None and protocol.timepoints:
            # The block is fixed, embedded and trimmed between the two instruments: days, not seconds.
            folder.journal.append("fibsem", "later", command=fibsem_command)
            console.print(f"The FIB-SEM part runs once the embedded block is in the FIB-SEM, from this folder's targets.json:\n"
                          f"  {fibsem_command}")
            return
        from .fibsem import run as run_fibsem

        run_fibsem(protocol_file=protocol_file, out=out, bridge=None, targets=None, target_name=None, slices=None,
                   interactive=interactive, client_keys=None, server_key=None)


def _fresh_clock(scale: float):
    from ..schedule.clock import RealClock, ScaledClock

    return RealClock() if scale == 1.0 else ScaledClock(scale)


def _run_confocal(protocol: Protocol, folder: RunFolder, clock, protocol_file: Path, seed: int, interactive: bool) -> int:
    """Build the confocal (simulated or from a .cfg), then walk the schedule; returns an exit code."""
    from ..confocal.controller import ConfocalController, ConfocalRefused
    from ..confocal.session import ConfocalSession
    from ..schedule.runner import auto_confirm, run_protocol_schedule

    confocal = protocol.confocal
    assert confocal is not None
    prompt = auto_confirm
    control = None
    if interactive:
        from ..schedule.control import RunControl, install_sigint_abort
        from ..schedule.terminal import TerminalSession

        control = RunControl()
        terminal = TerminalSession(control, clock, console=console)
        terminal.start()
        prompt = terminal.prompt
        install_sigint_abort(control)
    try:
        if confocal.config == "simulator":
            # The built-in simulator and its simulated operator are chosen here, by configuration.
            from clemflow.simulators.confocal.core import build_simulated_core, microscope_of
            from clemflow.simulators.confocal.dishes import SimulatedDishHandler

            core = build_simulated_core(None, clock=clock, seed=seed)
            samples = {s.id: (seed * 100 + i, s.role == "treated") for i, s in enumerate(protocol.samples)}
            dishes = SimulatedDishHandler(microscope_of(core), samples, list(protocol.timepoints), seed=seed)
        else:
            from pymmcore_plus import CMMCorePlus

            from ..confocal.dishes import OperatorDishHandler

            core = CMMCorePlus()
            cfg = Path(confocal.config)
            core.loadSystemConfiguration(str(cfg if cfg.is_absolute() else protocol_file.parent / cfg))
            dishes = OperatorDishHandler(prompt, core)
        controller = ConfocalController(core, confocal)
        cells = max(1, confocal.targets.cells_per_square) if confocal.targets.mode == "automatic" else 1
        stacks = len(protocol.timepoints) * max(1, len(confocal.targets.items)) * cells
        controller.preflight(confocal.targets.items, folder.path, stacks)
    except (ConfocalRefused, OSError, RuntimeError) as exc:
        folder.journal.append("confocal", "refused", reason=str(exc))
        console.print(f"[red]✗[/red] confocal not started: {exc}")
        return EXIT_REFUSED
    session = ConfocalSession(controller, protocol, folder.path, dishes)
    try:
        summary = run_protocol_schedule(protocol, folder, session.acquire, clock=clock, prompt=prompt, control=control)
    finally:
        # Finished, aborted or failed: leave the sample in the dark and the stage still.
        core.setShutterOpen(False)
        core.stop(core.getXYStageDevice())
        folder.journal.append("confocal", "safe", shutter_open=bool(core.getShutterOpen()))
    console.print(f"Schedule {summary.state}: {len(summary.done)} acquisition(s) done, {len(summary.skipped)} skipped, "
                  f"{len(summary.failed)} failed")
    return 0 if summary.state == "finished" and not summary.failed else EXIT_REFUSED
