"""`clemflow demo`: the whole workflow on the built-in simulators, stage by stage.

Each capability joins the demo when it lands. Today: validate the example
protocols and show the plan of the 3D-CLEM protocol.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.rule import Rule

from ..io.run_folder import RunFolder
from ..protocol import ProtocolError, load_protocol
from .app import app
from .console import EXIT_INVALID, console, print_problems
from .plan import print_plan

CLEM_PROTOCOL = "clem_2h_6h_24h.yaml"


def examples_folder() -> Path:
    """The repository's protocols/ folder (the demo runs from a source checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "protocols"
        if (candidate / CLEM_PROTOCOL).is_file():
            return candidate
    raise FileNotFoundError("protocols/ with the example protocols was not found beside the clemflow sources")


@app.command()
def demo(
    out: Path = typer.Option(Path("clemflow-demo"), "--out", help="Parent folder of the demo's run folder."),
) -> None:
    """Run the 3D-CLEM workflow on the built-in simulators and show each stage."""
    folder = examples_folder()
    console.print(Rule("1. Protocols"))
    protocols = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            protocols[path.name] = load_protocol(path)
        except ProtocolError as exc:
            print_problems(exc.problems)
            raise typer.Exit(EXIT_INVALID) from None
        console.print(f"[green]✓[/green] {path.name}: valid")
    clem_path = folder / CLEM_PROTOCOL
    clem = protocols[CLEM_PROTOCOL]

    console.print(Rule("2. Plan of the 3D-CLEM protocol"))
    print_plan(clem)

    run_dir = out / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run = RunFolder.open(run_dir, clem, clem_path.read_text(encoding="utf-8"))
    run.journal.append("demo", "done", stages=["protocols", "plan"])
    console.print(Rule())
    console.print(f"Demo run folder: {run.path}")
