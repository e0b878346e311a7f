"""`clemflow correlate --lm LM --em EM --out DIR`: register a confocal stack to an aligned EM volume on lipid droplets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .app import app
from .console import EXIT_INVALID, EXIT_REFUSED, console, load_protocol_or_exit

VOXEL_HELP = "Voxel size Z Y X in µm, when the file's metadata lacks it (or to override it)."


def _channel(value: str | None) -> str | int | None:
    if value is None:
        return None
    return int(value) if value.isdigit() and len(value) < 3 else value


@app.command("correlate")
def correlate_command(
    lm_path: Path = typer.Option(..., "--lm", help="Confocal z-stack (OME-TIFF or ImageJ TIFF) of the chosen cell."),
    em_path: Path = typer.Option(..., "--em", help="Aligned EM volume: an alignment or run folder, an OME-Zarr, or a TIFF stack."),
    out: Path = typer.Option(..., "--out", help="Output folder (transform.json, landmarks.csv, overlays, ...)."),
    lm_channel: str = typer.Option(None, "--lm-channel", help="Droplet (BODIPY) channel: name or index; default from the protocol, else 488."),
    lm_voxel: tuple[float, float, float] = typer.Option((0.0, 0.0, 0.0), "--lm-voxel-um", help=VOXEL_HELP),
    em_voxel: tuple[float, float, float] = typer.Option((0.0, 0.0, 0.0), "--em-voxel-um", help=VOXEL_HELP),
    protocol_file: Path = typer.Option(None, "--protocol", help="Protocol whose correlation section sets model, min_inliers, max_residual."),
    no_particles: bool = typer.Option(False, "--no-particles", help="Skip the particle clusters."),
) -> None:
    """Find the droplets in both, register with no starting guess, place the particles, write the results.

    Exit codes: 0 done, 2 an input is unreadable or lacks what is needed (the message says what), 3 refused:
    too few droplets agree (unrelated volumes, or too few droplets in one of them).
    """
    from ..correlate.inputs import read_em, read_lm
    from ..correlate.pipeline import correlate
    from ..correlate.register import CorrelationRefused
    from ..protocol.analysis import Correlation

    settings = load_protocol_or_exit(protocol_file).correlation if protocol_file is not None else Correlation()
    try:
        lm = read_lm(lm_path, channel=_channel(lm_channel) if lm_channel else settings.lm_channel,
                     voxel_um=lm_voxel if all(lm_voxel) else None)
        em = read_em(em_path, voxel_um=em_voxel if all(em_voxel) else None)
    except (ValueError, OSError, KeyError) as exc:
        console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    console.print(f"light: {escape(str(lm_path))} {lm.data.shape} voxel {_voxel(lm.voxel_um)}, channels {', '.join(lm.channels)}")
    console.print(f"EM: {escape(str(em_path))} {tuple(em.data.shape)} voxel {_voxel(em.voxel_um)}")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)

        try:
            result = correlate(lm, em, out, settings, lm_channel=_channel(lm_channel), particles=not no_particles,
                               progress=progress)
        except CorrelationRefused as refused:
            console.print(f"[red]✗[/red] correlation refused: {escape(refused.reason)} (see {escape(str(out / 'refused.json'))})",
                          soft_wrap=True)
            raise typer.Exit(EXIT_REFUSED) from None
        except (KeyError, ValueError) as exc:
            console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_INVALID) from None
    reg = result.registration
    console.print(f"[green]✓[/green] {len(result.lm_droplets)} droplets in the light stack, {len(result.em_droplets)} in "
                  f"the EM; {len(reg.pairs)} agree ({reg.model}{', mirrored' if reg.mirrored else ''}, scale "
                  f"{reg.scale:.3f}, z-scale {reg.z_scale:.3f}); leave-one-out TRE {reg.tre_estimate_um * 1000:.0f} nm")
    for note in result.notes:
        console.print(f"  [yellow]![/yellow] {escape(note)}", soft_wrap=True)
    if result.clusters is not None:
        s = result.clusters.summary()
        console.print(f"  particle clusters: {escape(_summary_line(s))}")
    for path in result.files:
        console.print(f"  [green]✓[/green] {escape(str(path))}")


def _voxel(v: tuple[float, float, float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ") µm"


def _summary_line(summary: dict) -> str:
    parts = [f"{k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
             for k, v in summary.items() if not isinstance(v, dict | list)]
    return ", ".join(parts)
