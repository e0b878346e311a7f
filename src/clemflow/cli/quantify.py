"""`clemflow quantify RUN_DIR --out DIR`: uptake per cell and per timepoint from a time course's z-stacks."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .app import app
from .console import EXIT_INVALID, console


def _cell(mean: float, sd: float, stars: str, percent: bool) -> str:
    if not math.isfinite(mean):
        return "—"
    k = 100.0 if percent else 1.0
    text = f"{mean * k:.2f} ± {sd * k:.2f}" if math.isfinite(sd) else f"{mean * k:.2f}"
    return f"{text} {stars}".rstrip()


@app.command("quantify")
def quantify(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run folder of a confocal time course (holds confocal/)."),
    out: Path = typer.Option(..., "--out", help="Output folder for cells.csv, timepoints.csv, curves and overlays."),
    workers: int = typer.Option(2, "--workers", min=1, help="Stacks quantified in parallel (processes; each holds one stack)."),
    student: bool = typer.Option(False, "--student", help="Student's t-test (equal variances) instead of Welch's."),
) -> None:
    """Segment cells, particles and endolysosomes in every z-stack; per-timepoint statistics and curves.

    Settings come from the run's protocol (quantification section); cells cut by the image border are
    excluded and counted. Exit codes: 0 done, 2 no stacks or an unreadable stack.
    """
    from ..protocol import ProtocolError
    from ..quantify.stats import METRICS
    from ..quantify.timecourse import quantify_run
    from ..quantify.writers import write_outputs

    if not run_dir.is_dir():
        console.print(f"[red]✗[/red] {escape(str(run_dir))} is not a folder; give the run folder of a time course",
                      soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("quantifying z-stacks", total=None)

        def advance(done: int, total: int, stack) -> None:
            progress.update(task, completed=done, total=total,
                            description=f"{escape(stack.sample)} {escape(stack.group.label)}: {escape(stack.target)}")

        try:
            run = quantify_run(run_dir, overlays_dir=out / "overlays", workers=workers, progress=advance)
        except ProtocolError as exc:
            console.print(f"[red]✗[/red] the run's protocol is invalid: {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_INVALID) from None
        except (FileNotFoundError, ValueError) as exc:
            console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_INVALID) from None
    stats, files = write_outputs(out, run, welch=not student)
    for path, why in run.skipped:
        console.print(f"[yellow]![/yellow] skipped {escape(str(path))}: {escape(why)}", soft_wrap=True)
    table = Table(title=f"uptake per timepoint: {escape(str(run_dir))}")
    for name in ("group", "images", "cells", "cut"):
        table.add_column(name, justify="right")
    for m in METRICS:
        table.add_column(f"{m.label} (%)" if m.percent else m.label, justify="right")
    for s in stats:
        table.add_row(s.group.label, str(s.n_images), str(s.n_cells), str(s.excluded_at_border),
                      *(_cell(s.metrics[m.name].mean, s.metrics[m.name].sd, s.metrics[m.name].stars, m.percent)
                        for m in METRICS))
    console.print(table)
    console.print("mean ± SD per cell; stars: " + ("Student's" if student else "Welch's")
                  + " t-test vs the first timepoint (endolysosomal volume vs the untreated control)")
    for path in files + run.overlays:
        console.print(f"  wrote {escape(str(path))}", soft_wrap=True)
