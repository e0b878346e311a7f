"""`clemflow qc ...`: look at the quality of an alignment and its slices."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .app import app
from .console import EXIT_INVALID, console

qc_app = typer.Typer(help="Quality of an aligned FIB-SEM stack: reslices, drift, QC plots.", no_args_is_help=True)
app.add_typer(qc_app, name="qc")


def _fmt_range(r: tuple[float, float]) -> str:
    return "—" if any(math.isnan(v) for v in r) else f"{r[0]:+.1f} … {r[1]:+.1f} px"


@qc_app.command("report")
def report(
    folder: Path = typer.Argument(..., help="An alignment output folder (clemflow align --out) or a run folder."),
) -> None:
    """Write reslice_xz.png, reslice_yz.png, drift.png and qc.png and print a summary."""
    from ..qc.report import write_report

    try:
        summary = write_report(folder)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    table = Table(title=f"alignment report: {escape(str(summary.out_dir))}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("slices aligned", str(summary.slices))
    table.add_row("slices checked (QC)", str(summary.qc_slices))
    table.add_row("drift dx", _fmt_range(summary.dx_range))
    table.add_row("drift dy", _fmt_range(summary.dy_range))
    table.add_row("median neighbour NCC", "—" if math.isnan(summary.median_ncc) else f"{summary.median_ncc:.3f}")
    if summary.qc_slices:
        alerts = ", ".join(f"{kind} {n}" for kind, n in summary.alerts_by_kind.items()) or "none"
        table.add_row("alerts", f"[{'yellow' if summary.alerts else 'green'}]{summary.alerts}[/]: {escape(alerts)}")
    else:
        table.add_row("alerts", "— (no qc.csv: this folder was aligned without live QC)")
    console.print(table)
    for png in summary.pngs:
        console.print(f"  wrote {escape(str(png))}", soft_wrap=True)
