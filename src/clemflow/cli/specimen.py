"""`clemflow specimen ...`: look at the simulated ground-truth specimen."""

from __future__ import annotations

import typer

from .app import app

specimen_app = typer.Typer(help="The simulated ground-truth specimen.", no_args_is_help=True)
app.add_typer(specimen_app, name="specimen")
