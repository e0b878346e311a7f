"""`clemflow align INPUT --out DIR`: align a TIFF stack, a folder of slices or a run folder, offline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from .app import app
from .console import EXIT_INVALID, EXIT_REFUSED, EXIT_UNAVAILABLE, console, load_protocol_or_exit


@app.command("align")
def align(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="Multi-page TIFF, folder of slice TIFFs, or run folder."),
    out: Path = typer.Option(..., "--out", help="Output folder; a partial alignment of the same input is resumed."),
    protocol_file: Path = typer.Option(None, "--protocol", help="Protocol whose alignment section sets the method."),
    scheduler: str = typer.Option(None, "--scheduler",
                                  help="Fine stage on dask.distributed: 'local' (a cluster on this machine) or "
                                       "tcp://HOST:PORT (the input and --out must be visible to the workers)."),
    chunk: int = typer.Option(32, "--chunk", min=1, help="Slices per fine-stage task (a task also reads fine_radius slices either side; it holds 2 fine_radius + 1 slices in memory whatever the chunk)."),
    workers: int = typer.Option(None, "--workers", min=1, help="Workers of --scheduler local (default: cores - 1)."),
    pixel_size: float = typer.Option(None, "--pixel-size", min=0.0, help="Pixel size in nm, if the input lacks it."),
    slice_thickness: float = typer.Option(None, "--slice-thickness", min=0.0, help="Slice thickness in nm."),
    no_display: bool = typer.Option(False, "--no-display", help="Skip the CLAHE display copy."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the QC report (plots, qc.csv) after aligning."),
) -> None:
    """Coarse (streaming) then fine alignment; writes aligned.ome.zarr, display.ome.zarr and transforms.csv.

    Exit codes: 0 done, 2 invalid input or protocol, 3 the output folder holds another alignment,
    4 the dask scheduler cannot be reached.
    """
    from ..align.offline import AlignmentFolderError, align_offline
    from ..align.sources import SourceError
    from ..protocol.analysis import Alignment

    settings = load_protocol_or_exit(protocol_file).alignment if protocol_file is not None else Alignment()
    if scheduler is not None and scheduler != "local" and "://" not in scheduler:
        raise typer.BadParameter(f"{scheduler!r}: write 'local' or an address such as tcp://10.0.0.5:8786",
                                 param_hint="--scheduler")
    try:
        result = align_offline(input_path, out, settings, scheduler=scheduler, chunk=chunk, workers=workers,
                               pixel_size_nm=pixel_size or None, slice_thickness_nm=slice_thickness or None,
                               display=not no_display, report=not no_report, console=console)
    except SourceError as exc:
        console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    except AlignmentFolderError as exc:
        console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_REFUSED) from None
    except OSError as exc:
        if scheduler is not None and scheduler != "local" and "timed out" in str(exc).lower():
            console.print(f"[red]✗[/red] dask scheduler {escape(scheduler)} cannot be reached ({escape(str(exc))}); "
                          "start one with 'dask scheduler' or use --scheduler local", soft_wrap=True)
            raise typer.Exit(EXIT_UNAVAILABLE) from None
        raise
    for note in result.notes:
        console.print(f"[yellow]![/yellow] {escape(note)}", soft_wrap=True)
    console.print(f"[green]✓[/green] {len(result.transforms)} slices in {escape(str(result.out_dir))}: {result.aligned} "
                  "aligned now" + (f", {result.resumed} from before" if result.resumed else "")
                  + (" (coarse shifts from coarse.csv)" if result.coarse_reused else ""))
