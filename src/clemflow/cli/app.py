"""Top-level typer application; each capability registers its commands here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="clemflow",
    help="Acquisition and control orchestrator for 3D correlative light and electron microscopy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from . import align, bridge, correlate, demo, fibsem, grid, protocol_commands, qc, quantify, run, specimen  # noqa: F401


def main() -> None:
    _register()
    app()
