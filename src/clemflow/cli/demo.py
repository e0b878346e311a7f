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
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated specimen."),
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

    console.print(Rule("3. The simulated specimen (ground truth both instruments image)"))
    pictures = _specimen_stage(run.path / "specimen", seed=seed)
    run.journal.append("specimen", "done", seed=seed, pictures=[p.name for p in pictures])

    run.journal.append("demo", "done", stages=["protocols", "plan", "specimen"])
    console.print(Rule())
    console.print(f"Demo run folder: {run.path}")


def _specimen_stage(folder: Path, seed: int) -> list[Path]:
    """Generate the specimen, save its truth, and write the preview pictures."""
    from rich.progress import Progress

    from clemflow.simulators.specimen.preview import write_preview
    from clemflow.simulators.specimen.world import SpecimenParams

    with Progress(transient=True, console=console) as progress:
        task = progress.add_task("generating the specimen and rendering LM and EM previews", total=None)
        pictures = write_preview(folder, seed=seed, params=SpecimenParams(hours_since_treatment=24.0))
        progress.update(task, completed=1)
    for picture in pictures:
        console.print(f"  [green]✓[/green] {picture}")
    return pictures
