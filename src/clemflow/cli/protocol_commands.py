"""`clemflow validate` and `clemflow schema`: protocol files without instruments."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..protocol import Protocol, ProtocolError, load_protocol
from .app import app
from .console import EXIT_INVALID, console, print_problems


@app.command()
def validate(files: list[Path] = typer.Argument(..., help="Protocol files to check.")) -> None:
    """Check protocol files; exit 0 if all are valid, 2 if any is not (with file, line and field)."""
    invalid = 0
    for path in files:
        try:
            protocol = load_protocol(path)
        except ProtocolError as exc:
            invalid += 1
            print_problems(exc.problems)
            continue
        console.print(f"[green]✓[/green] {path}: {protocol.experiment.name} is valid")
    if invalid:
        console.print(f"[red]{invalid} of {len(files)} protocol file(s) invalid[/red]")
        raise typer.Exit(EXIT_INVALID)


def protocol_schema() -> dict:
    """The JSON Schema of protocol files (draft 2020-12)."""
    schema = Protocol.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://clemflow.invalid/protocol.schema.json"
    return schema


@app.command()
def schema() -> None:
    """Print the JSON Schema of protocol files (for YAML editors and other tools)."""
    print(json.dumps(protocol_schema(), indent=2, ensure_ascii=False))
