"""`clemflow fibsem run PROTOCOL --bridge tcp://HOST:PORT --out DIR`: slice-and-view through the bridge, resumable."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.markup import escape

from .app import app
from .console import EXIT_INVALID, EXIT_REFUSED, EXIT_UNAVAILABLE, console, load_protocol_or_exit

EXIT_PAUSED = 5  # stopped safely on a fault (or by the operator); the same command resumes the run

fibsem_app = typer.Typer(help="FIB-SEM slice-and-view through the bridge (docs/slice-and-view.md).", no_args_is_help=True)
app.add_typer(fibsem_app, name="fibsem")


@fibsem_app.command("run")
def run(
    protocol_file: Path = typer.Argument(..., help="Protocol file (YAML) with a fibsem section."),
    out: Path = typer.Option(..., "--out", help="Run folder; an existing run of the same protocol is resumed."),
    bridge: str = typer.Option(None, "--bridge", help="Bridge address tcp://HOST:PORT (default: the protocol's fibsem.bridge.address)."),
    targets: Path = typer.Option(None, "--targets", help="targets.json with em_stage_um (default: the run folder's)."),
    target_name: str = typer.Option(None, "--target", help="Name of the target in the targets file (default: by the protocol)."),
    slices: int = typer.Option(None, "--slices", min=1, help="Stop after this many slices (overrides the protocol's stop criteria)."),
    interactive: bool = typer.Option(False, "--interactive", help="p / r / a from the terminal; wait for 'r' after a fault."),
    client_keys: Path = typer.Option(None, "--client-keys", help="This client's CURVE key pair (file or folder)."),
    server_key: Path = typer.Option(None, "--server-key", help="The bridge server's public key file."),
) -> None:
    """Mill and image slice after slice; after any crash the same command continues, milling nothing twice.

    Exit codes: 0 done, 2 invalid input, 3 refused (the instrument's limits), 4 bridge unavailable,
    5 paused on a fault (the message says what to check; the same command resumes).
    """
    from ..io.run_folder import RunFolder, RunFolderError
    protocol = load_protocol_or_exit(protocol_file)
    fibsem = protocol.fibsem
    if fibsem is None:
        console.print(f"[red]✗[/red] {protocol_file} has no fibsem section: nothing to mill")
        raise typer.Exit(EXIT_INVALID)
    address = bridge or fibsem.bridge.address
    keys = (client_keys or (Path(fibsem.bridge.client_keys) if fibsem.bridge.client_keys else None),
            server_key or (Path(fibsem.bridge.server_key) if fibsem.bridge.server_key else None))
    if (keys[0] is None) != (keys[1] is None):
        console.print("[red]✗[/red] CURVE needs both --client-keys and --server-key (or neither, on loopback)")
        raise typer.Exit(EXIT_INVALID)

    from ..fibsem.plan import SlicePlan
    from ..fibsem.target import TargetError, choose_target

    targets_path = targets or (out / "targets.json")
    try:
        target = choose_target(fibsem, targets_path, target_name)
    except TargetError as exc:
        console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        folder = RunFolder.open(out, protocol, protocol_file.read_text(encoding="utf-8"))
    except RunFolderError as exc:
        console.print(f"[red]✗[/red] {exc}")
        raise typer.Exit(EXIT_INVALID) from None
    if not (folder.path / "targets.json").exists():  # a resume finds the target where the run is
        import shutil

        shutil.copyfile(targets_path, folder.path / "targets.json")
    plan = SlicePlan.from_protocol(fibsem, slices)
    from ..correlate.online import online_from_protocol

    try:  # read and searched before anything moves: a wrong stack is said now, not after the first slices
        online = online_from_protocol(protocol, protocol_file)
    except (ValueError, OSError, KeyError) as exc:
        console.print(f"[red]✗[/red] correlation.lm_stack: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    if online is not None:
        console.print(f"Online check against the confocal stack: {len(online.lm)} droplets in the chosen cell, "
                      f"verdict every {protocol.correlation.update_every} slices")
    console.print(f"Run folder {folder.path} {'resumed' if folder.resumed else 'created'} (run {folder.run_id}); "
                  f"target {target.name} at ({target.x_m * 1e6:.1f}, {target.y_m * 1e6:.1f}) µm; "
                  f"{plan.slices if plan.slices < 10**9 else 'until the time limit'} slices of {plan.thickness_m * 1e9:g} nm")
    again = ["clemflow", "fibsem", "run", str(protocol_file), "--bridge", address, "--out", str(out)]
    again += ["--targets", str(targets)] if targets else []
    again += ["--target", target_name] if target_name else []
    again += ["--slices", str(slices)] if slices else []
    again += ["--interactive"] if interactive else []
    again += ["--client-keys", str(keys[0]), "--server-key", str(keys[1])] if client_keys and server_key else []
    code = _run_engine(protocol, fibsem, folder, plan, target, address, keys, interactive, shlex.join(again), online)
    if code:
        raise typer.Exit(code)


def _run_engine(protocol, fibsem, folder, plan, target, address: str, keys, interactive: bool,  # type: ignore[no-untyped-def]
                again: str, online=None) -> int:
    from ..bridge.client import BridgeClient
    from ..fibsem.analysis import LiveAnalysis
    from ..fibsem.dashboard import SliceDashboard
    from ..fibsem.engine import SliceAndViewEngine
    from ..schedule.clock import RealClock
    from ..schedule.control import RunControl, install_sigint_abort

    control = RunControl()
    restore_sigint = install_sigint_abort(control)
    terminal = None
    if interactive:
        from ..schedule.terminal import TerminalSession

        terminal = TerminalSession(control, RealClock(), console=console)
        terminal.start()
        console.print("[dim]p = pause after this slice, r = resume, a = abort after this slice[/dim]")
    notify = protocol.qc.notify
    try:
        with BridgeClient(address, server_key=keys[1], client_keys=keys[0], name="clemflow-fibsem") as client, \
                SliceDashboard(console) as dashboard:
            analysis = LiveAnalysis(folder.path, protocol.alignment, protocol.qc, status=dashboard.analysis,
                                    correlation=online)
            engine = SliceAndViewEngine(client, fibsem, folder, plan, target, console=console, control=control,
                                        interactive=interactive, dashboard=dashboard, notify_command=notify.command,
                                        notify_webhook=str(notify.webhook) if notify.webhook else None,
                                        on_slice=analysis)
            analysis.alert = engine.alerts.send
            try:
                outcome = engine.run()
            finally:
                analysis.close()
    finally:
        restore_sigint()
    if outcome.state == "done":
        console.print(f"[green]✓[/green] slice-and-view done: {outcome.message}")
        return 0
    if outcome.state == "refused":
        for problem in outcome.problems:
            console.print(f"[red]✗[/red] {escape(str(problem))}", soft_wrap=True)
        console.print(f"[red]✗[/red] {outcome.message}")
        return EXIT_REFUSED
    if outcome.state == "unavailable":
        console.print(f"[red]✗[/red] {escape(outcome.message)}; start `clemflow bridge serve` on the microscope PC "
                      f"or check --bridge {address}")
        return EXIT_UNAVAILABLE
    if outcome.state == "paused" and outcome.fault is not None:
        from ..fibsem.safety import what_to_check

        console.print(f"[yellow]⏸ paused safely[/yellow]: {escape(outcome.message)}. "
                      f"Check: {escape(what_to_check(outcome.fault))}. Then resume with:\n  {escape(again)}", soft_wrap=True)
    else:
        console.print(f"[yellow]⏸ {escape(outcome.message)}[/yellow]; the same command resumes the run:\n  {escape(again)}",
                      soft_wrap=True)
    return EXIT_PAUSED
