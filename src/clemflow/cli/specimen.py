"""`clemflow specimen ...`: look at the simulated ground-truth specimen."""

from __future__ import annotations

import typer

from .app import app

specimen_app = typer.Typer(help="The simulated ground-truth specimen.", no_args_is_help=True)
app.add_typer(specimen_app, name="specimen")


@specimen_app.command("preview")
def preview(
    seed: int = typer.Option(0, "--seed", help="Seed of the world; the same seed gives the same specimen."),
    out: str = typer.Option("specimen-preview", "--out", help="Folder for the PNGs and truth files."),
    hours: float = typer.Option(24.0, "--hours", help="Hours since particles were added (negative: untreated control)."),
    em: bool = typer.Option(True, "--em/--no-em", help="Also render the EM slice and reslice."),
    cells: int = typer.Option(0, "--cells", help="Number of cells in the 3x3-square region (0: 7 per square)."),
) -> None:
    """Write PNG previews (10x overview, 63x composite, EM slice and reslice) with the truth overlaid."""
    from clemflow.simulators.specimen.preview import write_preview
    from clemflow.simulators.specimen.world import SpecimenParams

    params = SpecimenParams(hours_since_treatment=None if hours < 0 else hours, n_cells=cells or None)
    for path in write_preview(out, seed=seed, params=params, em=em):
        typer.echo(str(path))
