"""One rich console for everything clemflow prints, and the exit codes it uses."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ..protocol import Problem, Protocol

console = Console(highlight=False)

EXIT_OK = 0
EXIT_INVALID = 2  # a protocol or input file is wrong; the message says where
EXIT_REFUSED = 3  # the input is valid but the task cannot be done safely (no grid, too few landmarks, ...)
EXIT_UNAVAILABLE = 4  # this version of clemflow cannot do it yet


def print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        console.print(f"[red]✗[/red] {escape(str(problem))}", soft_wrap=True)


def load_protocol_or_exit(path: Path) -> Protocol:
    """The protocol at ``path``; if it is invalid, every problem (file, line, field) is printed and the command
    exits with EXIT_INVALID before anything moves."""
    from ..protocol import ProtocolError, load_protocol

    try:
        return load_protocol(path)
    except ProtocolError as exc:
        print_problems(exc.problems)
        raise typer.Exit(EXIT_INVALID) from None
