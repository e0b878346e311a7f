"""The plan of a protocol as rich tables: the timeline and the FIB-SEM estimate."""

from __future__ import annotations

from rich.table import Table

from ..fibsem.estimate import estimate_slice_and_view
from ..protocol import Protocol
from ..protocol.units import format_quantity
from ..schedule.timeline import timeline
from .console import console


def _hours(seconds: float) -> str:
    sign = "-" if seconds < 0 else "+"
    seconds = abs(seconds)
    return f"{sign}{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def timeline_table(protocol: Protocol) -> Table:
    table = Table(title=f"Timeline of {protocol.experiment.name} (h:mm after treatment)", title_justify="left")
    table.add_column("at", justify="right")
    table.add_column("timepoint", justify="right")
    table.add_column("dish")
    table.add_column("step")
    table.add_column("what")
    roles = {s.id: s.role for s in protocol.samples}
    for entry in timeline(protocol):
        style = "cyan" if entry.kind == "stain" else ""
        dish = entry.sample + (" (control)" if roles[entry.sample] == "control" else "")
        table.add_row(_hours(entry.at_s), format_quantity(entry.timepoint_s, "duration"), dish, entry.kind, entry.what, style=style)
    return table


def fibsem_table(protocol: Protocol) -> Table:
    fibsem = protocol.fibsem
    assert fibsem is not None
    estimate = estimate_slice_and_view(fibsem)
    sem = fibsem.sem
    width, height = sem.frame
    table = Table(title="FIB-SEM slice-and-view estimate", title_justify="left", show_header=False)
    table.add_column("quantity")
    table.add_column("value")
    rows = [
        ("imaging", f"{format_quantity(sem.voltage, 'voltage')}, {format_quantity(sem.current, 'current')}, {sem.detector}, "
                    f"{format_quantity(sem.pixel_size, 'length')} pixels, {width} x {height}, "
                    f"{format_quantity(sem.dwell, 'duration')} dwell x {sem.line_averaging} lines"),
        ("milling", f"{format_quantity(fibsem.fib.voltage, 'voltage')}, {format_quantity(fibsem.fib.current, 'current')}, "
                    f"{format_quantity(fibsem.slice_thickness, 'length')} slices"),
        ("field of view", f"{width * sem.pixel_size * 1e6:.2f} x {height * sem.pixel_size * 1e6:.2f} µm"),
        ("slices", f"{estimate.slices} ({format_quantity(estimate.depth_m, 'length')} deep; stops on {estimate.limited_by})"),
        ("frame time", f"{estimate.frame_time_s:.1f} s  (pixels x dwell x line averaging)"),
        ("mill time", f"{estimate.mill_time_s:.1f} s per slice (estimate from sputter yield)"),
        ("duration", f"{estimate.duration_s / 3600:.1f} h  (without stage and autofunction overheads)"),
        ("data", f"{_bytes(estimate.total_bytes)}  ({_bytes(estimate.bytes_per_slice)} per slice)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_plan(protocol: Protocol) -> None:
    if protocol.confocal is not None and protocol.timepoints:
        console.print(timeline_table(protocol))
    if protocol.fibsem is not None:
        console.print(fibsem_table(protocol))
