"""`clemflow grid find` and `clemflow grid relocate`: the etched grid in any image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from ..protocol import GridScheme, ProtocolError
from .app import app
from .console import EXIT_INVALID, EXIT_REFUSED, console, print_problems

grid_app = typer.Typer(help="Find the etched grid and relocate targets by it.", no_args_is_help=True)
app.add_typer(grid_app, name="grid")


def _scheme(value: str) -> GridScheme:
    if value.lower() == "mattek":
        return GridScheme()
    from ..protocol.loader import load_model

    try:
        return load_model(value, GridScheme)
    except ProtocolError as exc:
        print_problems(exc.problems)
        raise typer.Exit(EXIT_INVALID) from None


def _read_image(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
        else:
            from skimage import io

            image = io.imread(path)
    except FileNotFoundError:
        console.print(f"[red]✗[/red] {path}: file not found")
        raise typer.Exit(EXIT_INVALID) from None
    except Exception as exc:  # any reader failure is the user's file, not our crash
        console.print(f"[red]✗[/red] {path}: cannot be read as an image ({exc})")
        raise typer.Exit(EXIT_INVALID) from None
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if image.ndim != 2:
        console.print(f"[red]✗[/red] {path}: expected one 2D image, got an array of shape {image.shape}")
        raise typer.Exit(EXIT_INVALID)
    return image


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a point; write X,Y such as 512.5,300") from None
    return x, y


@grid_app.command("find")
def find(
    image_path: Path = typer.Argument(..., metavar="IMAGE", help="Overview image (TIFF or PNG)."),
    pixel_size: float = typer.Option(..., "--pixel-size", help="Pixel size of the image in µm."),
    scheme: str = typer.Option("mattek", "--scheme", help="'mattek' or a YAML file describing the grid."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (found or not) instead of a summary."),
) -> None:
    """Find bars, crossings and square labels; exit 3 when the image shows no grid."""
    from ..grid.find import GridNotFound, find_grid

    grid = _scheme(scheme)
    image = _read_image(image_path)
    if pixel_size <= 0:
        raise typer.BadParameter("pixel size must be positive", param_hint="--pixel-size")
    try:
        finding = find_grid(image, pixel_size, grid)
    except GridNotFound as exc:
        if as_json:
            print(json.dumps({"found": False, "reason": str(exc)}))
        else:
            console.print(f"[yellow]no grid found[/yellow] in {image_path}: {exc}")
        raise typer.Exit(EXIT_REFUSED) from None
    report = finding.as_json()
    if as_json:
        print(json.dumps(report))
        return
    console.print(
        f"[green]grid found[/green] in {image_path}: bars every {report['pitch_px']:.1f} px, "
        f"grid x axis at {report['angle_deg']:.2f}°, {'mirrored' if report['mirrored'] else 'not mirrored'}"
    )
    console.print(f"  {len(report['crossings'])} crossings, labels read with confidence {report['label_confidence']:.2f}")
    for square in report["squares"]:
        console.print(f"  {square['label']:>3} at ({square['x']:.1f}, {square['y']:.1f}) px")


@grid_app.command("relocate")
def relocate(
    source: Path = typer.Argument(..., help="Image in which the points are given."),
    destination: Path = typer.Argument(..., help="Image (of another session or instrument) to find them in."),
    source_pixel_size: float = typer.Option(..., "--source-pixel-size", help="µm per pixel of SOURCE."),
    destination_pixel_size: float = typer.Option(..., "--destination-pixel-size", help="µm per pixel of DESTINATION."),
    points: list[str] = typer.Option(..., "--point", help="A point in SOURCE pixels, X,Y; repeat for several."),
    source_stage: str = typer.Option("0,0", "--source-stage", help="Stage position (µm) at SOURCE's centre, X,Y."),
    destination_stage: str = typer.Option("0,0", "--destination-stage", help="Stage position (µm) at DESTINATION's centre."),
    scheme: str = typer.Option("mattek", "--scheme", help="'mattek' or a YAML file describing the grid."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Map points from one image to another through the grid: pixels, stage µm, square and offset, error."""
    from ..grid.find import GridNotFound, find_grid
    from ..grid.registration import CameraGeometry, ImageView, register_grid

    grid = _scheme(scheme)
    results = []
    try:
        registrations = []
        for path, size, stage in ((source, source_pixel_size, source_stage), (destination, destination_pixel_size, destination_stage)):
            image = _read_image(path)
            finding = find_grid(image, size, grid)
            if not finding.labelled:
                raise GridNotFound(f"{path}: the square labels could not be read with confidence")
            view = ImageView(image.shape, _point(stage), CameraGeometry(size))
            registrations.append((view, register_grid([(image, view, finding)])))
    except GridNotFound as exc:
        print(json.dumps({"relocated": False, "reason": str(exc)})) if as_json else console.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(EXIT_REFUSED) from None
    (src_view, src_reg), (dst_view, dst_reg) = registrations
    for text in points:
        px = np.array([_point(text)])
        stage_src = src_view.pixel_to_stage(px)[0]
        position = src_reg.locate(stage_src)
        stage_dst = dst_reg.stage_of(position)
        px_dst = dst_view.stage_to_pixel(stage_dst[None])[0]
        error = float(np.hypot(src_reg.predicted_error_um(stage_src), dst_reg.predicted_error_um(stage_dst)))
        results.append({
            "source_px": [float(px[0, 0]), float(px[0, 1])],
            "label": position.label, "offset_um": list(position.offset_um),
            "destination_px": [float(px_dst[0]), float(px_dst[1])],
            "destination_stage_um": [float(stage_dst[0]), float(stage_dst[1])],
            "predicted_error_um": error,
        })
    if as_json:
        print(json.dumps({"relocated": True, "points": results}))
        return
    for r in results:
        console.print(
            f"({r['source_px'][0]:.1f}, {r['source_px'][1]:.1f}) px -> square {r['label']} "
            f"{r['offset_um'][0]:+.1f}, {r['offset_um'][1]:+.1f} µm -> ({r['destination_px'][0]:.1f}, "
            f"{r['destination_px'][1]:.1f}) px, stage ({r['destination_stage_um'][0]:.1f}, "
            f"{r['destination_stage_um'][1]:.1f}) µm, predicted error {r['predicted_error_um']:.2f} µm"
        )
