"""Quantify a whole time course: every z-stack of a run folder, grouped by timepoint.

A confocal run leaves ``confocal/<dish>/t<ii>_<h>h/<target>_a<n>.ome.tif``
(see ``clemflow.confocal.session``), each with a ``.frames.jsonl`` sidecar.
Of the attempts at one target the last complete one counts: an attempt cut
off by a crash or with a missing frame holds zeros where the frame should be,
and would read as a cell with fewer organelles; such stacks are listed as
skipped, never quantified. Which dishes are untreated controls, which
channel shows what and the quantification settings come from the run's own
protocol (``protocol.resolved.json``: what was run, not what was written).
Timepoints come from each stack's metadata, its folder name as a fallback.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
from pydantic import ValidationError

from ..confocal.writer import read_frame_records
from ..protocol import Protocol, load_protocol
from ..protocol.analysis import Quantification
from .measure import CellQuant, ChannelRoles, ImageQuant, quantify_stack
from .stats import CONTROL, METRICS, Group, GroupStats, timepoint_stats

__all__ = [
    "CellRow",
    "RunQuant",
    "StackInfo",
    "find_stacks",
    "quantify_run",
    "read_stack",
    "roles_from_protocol",
    "run_protocol",
]

STACK_NAME = re.compile(r"^(?P<target>.+)_a(?P<attempt>\d+)\.ome\.tif$")
TIMEPOINT_FOLDER = re.compile(r"^t(?P<index>\d+)_(?P<hours>[0-9.eE+-]+)h$")

ProgressCallback = Callable[[int, int, "StackInfo"], None]
"""progress(done, total, stack): called after each stack is quantified."""


@dataclass(frozen=True)
class StackInfo:
    """One z-stack of the run and where it belongs in the time course."""

    path: Path
    sample: str
    role: Literal["treated", "control"]
    timepoint_s: float
    target: str
    attempt: int

    @property
    def hours(self) -> float:
        return self.timepoint_s / 3600.0

    @property
    def group(self) -> Group:
        """Treated cells group by timepoint; control cells are pooled over all timepoints."""
        return CONTROL if self.role == "control" else Group("treated", round(self.hours, 6))


@dataclass(frozen=True)
class CellRow:
    """One quantified cell and the stack it came from."""

    stack: StackInfo
    cell: CellQuant


@dataclass
class RunQuant:
    """Everything quantified in a run folder."""

    run_dir: Path
    stacks: list[StackInfo]
    cells: list[CellRow]
    excluded_at_border: dict[Path, int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (stack, why it was not quantified)
    overlays: list[Path] = field(default_factory=list)

    def values(self) -> dict[Group, dict[str, np.ndarray]]:
        """Per group, one array per metric with one value per cell (input of ``timepoint_stats``)."""
        out: dict[Group, dict[str, list[float]]] = {}
        for stack in self.stacks:
            out.setdefault(stack.group, {m.name: [] for m in METRICS})
        for row in self.cells:
            for m in METRICS:
                out[row.stack.group][m.name].append(float(getattr(row.cell, m.name)))
        return {g: {k: np.asarray(v, float) for k, v in d.items()} for g, d in out.items()}

    def stats(self, welch: bool = True) -> list[GroupStats]:
        """``timepoint_stats`` of the cells, with images and border exclusions counted per group."""
        result = []
        for s in timepoint_stats(self.values(), welch=welch):
            mine = [st for st in self.stacks if st.group == s.group]
            excluded = sum(self.excluded_at_border.get(st.path, 0) for st in mine)
            result.append(replace(s, n_images=len(mine), excluded_at_border=excluded))
        return result


# -- the run folder -------------------------------------------------------------------------------


def run_protocol(run_dir: str | Path) -> Protocol | None:
    """The protocol as run (protocol.resolved.json), else protocol.yaml, else None."""
    run_dir = Path(run_dir)
    resolved = run_dir / "protocol.resolved.json"
    if resolved.is_file():
        try:
            return Protocol.model_validate_json(resolved.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise ValueError(f"{resolved} is not a protocol this clemflow reads ({exc.error_count()} problems, "
                             f"first: {exc.errors()[0]['msg']}); quantify a copy without it to use protocol.yaml "
                             "or the defaults") from None
    if (run_dir / "protocol.yaml").is_file():
        return load_protocol(run_dir / "protocol.yaml")
    return None


def roles_from_protocol(protocol: Protocol | None) -> ChannelRoles:
    """Which channel shows what, from the protocol's stains (the particle dye defaults to 639 nm)."""
    roles = ChannelRoles()
    if protocol is None:
        return roles
    marks = {s.marks: s.channel for s in protocol.stains}
    update = {k: marks[k] for k in ("endolysosomes", "mitochondria", "particles") if k in marks}
    return replace(roles, **update)


def _description(path: Path) -> dict[str, Any]:
    with tifffile.TiffFile(path) as tif:
        ome = tif.ome_metadata
    if not ome:
        return {}
    node = ET.fromstring(ome).find(".//{*}Image/{*}Description")
    try:
        return json.loads(node.text) if node is not None and node.text else {}
    except json.JSONDecodeError:
        return {}


def _complete(path: Path) -> tuple[bool, str]:
    """Whether the writer closed the stack with every frame; a stack without sidecar counts as complete."""
    records = read_frame_records(path)
    if not records:
        return True, ""
    closed = [r for r in records if r.get("status") == "closed"]
    if not closed:
        return False, "never closed (the acquisition was cut off)"
    if not closed[-1].get("complete", False):
        return False, f"{closed[-1].get('gaps', '?')} missing frame(s)"
    return True, ""


def find_stacks(run_dir: str | Path, protocol: Protocol | None = None) -> tuple[list[StackInfo], list[tuple[Path, str]]]:
    """The stacks to quantify (last complete attempt per dish, timepoint and target) and those skipped, with why."""
    run_dir = Path(run_dir)
    confocal = run_dir / "confocal"
    layout = "confocal/<dish>/t<ii>_<h>h/<target>_a<n>.ome.tif"
    if not confocal.is_dir():
        raise FileNotFoundError(f"{run_dir} has no confocal/ folder; a time course run folder holds {layout}")
    roles = {s.id: s.role for s in protocol.samples} if protocol is not None else {}
    chosen: dict[tuple[str, float, str], StackInfo] = {}
    skipped: list[tuple[Path, str]] = []
    for path in sorted(confocal.glob("*/*/*.ome.tif")):
        name, folder = STACK_NAME.match(path.name), TIMEPOINT_FOLDER.match(path.parent.name)
        if name is None or folder is None:
            skipped.append((path, f"not named like {layout}"))
            continue
        ok, why = _complete(path)
        if not ok:
            skipped.append((path, why))
            continue
        meta = _description(path)
        sample = str(meta.get("sample", path.parent.parent.name))
        timepoint_s = float(meta.get("timepoint_s", float(folder["hours"]) * 3600.0))
        info = StackInfo(path, sample, roles.get(sample, "treated"), timepoint_s, name["target"], int(name["attempt"]))
        key = (sample, timepoint_s, info.target)
        if key in chosen and chosen[key].attempt > info.attempt:
            skipped.append((path, f"superseded by attempt {chosen[key].attempt}"))
            continue
        if key in chosen:
            skipped.append((chosen[key].path, f"superseded by attempt {info.attempt}"))
        chosen[key] = info
    if not chosen:
        raise FileNotFoundError(f"no complete z-stacks in {confocal} (expected {layout})"
                                + (f"; skipped {len(skipped)}: {skipped[0][0].name}: {skipped[0][1]}" if skipped else ""))
    stacks = sorted(chosen.values(), key=lambda s: (s.group, s.sample, s.target))
    return stacks, skipped


def read_stack(path: str | Path, channels: Sequence[str] | None = None) -> tuple[np.ndarray, list[str], tuple[float, float, float]]:
    """(C, Z, Y, X) data of the named channels (all if None), their names, and the voxel size (z, y, x) in µm."""
    path = Path(path)
    with tifffile.TiffFile(path) as tif:
        ome = tif.ome_metadata
        series = tif.series[0]
        axes = series.axes
        if ome is None or axes not in ("CZYX", "ZCYX", "CYX", "ZYX", "YX"):
            raise ValueError(f"{path}: expected an OME-TIFF with axes CZYX (as the confocal writes), found {axes}")
        root = ET.fromstring(ome)
        pixels = root.find(".//{*}Pixels")
        names = [c.get("Name") or str(i) for i, c in enumerate(pixels.findall("{*}Channel"))] if pixels is not None else []
        voxel = tuple(float(pixels.get(f"PhysicalSize{a}", "nan")) if pixels is not None else float("nan") for a in "ZYX")
        data = series.asarray() if not _memmappable(tif) else None
    if data is None:
        data = tifffile.memmap(path, mode="r")
    data = {"CZYX": lambda d: d, "ZCYX": lambda d: np.moveaxis(d, 1, 0), "CYX": lambda d: d[:, None],
            "ZYX": lambda d: d[None], "YX": lambda d: d[None, None]}[axes](data)
    if len(names) != data.shape[0]:
        names = [str(i) for i in range(data.shape[0])]
    if not all(np.isfinite(voxel[1:])):
        raise ValueError(f"{path}: no PhysicalSizeX/Y in its OME metadata; the pixel size is needed for areas in µm²")
    if not np.isfinite(voxel[0]):
        voxel = (1.0, voxel[1], voxel[2]) if data.shape[1] == 1 else voxel
        if not np.isfinite(voxel[0]):
            raise ValueError(f"{path}: no PhysicalSizeZ in its OME metadata; the z step is needed for volumes")
    keep = list(range(len(names))) if channels is None else [names.index(c) for c in channels if c in names]
    return np.ascontiguousarray(data[keep]), [names[i] for i in keep], voxel  # type: ignore[return-value]


def _memmappable(tif: tifffile.TiffFile) -> bool:
    page = tif.pages.first
    return bool(page.is_contiguous) and page.compression == 1 and tif.byteorder == "<"


# -- quantifying -----------------------------------------------------------------------------------


def _wanted(roles: ChannelRoles) -> list[str]:
    return [c for c in (roles.endolysosomes, roles.mitochondria, roles.particles, roles.nuclei) if c]


def _quantify_one(stack: StackInfo, settings: Quantification, roles: ChannelRoles,
                  overlay: Path | None) -> tuple[list[CellQuant], int, Path | None]:
    """Quantify one stack (in a worker process, or here); write its overlay if asked."""
    try:
        data, names, voxel = read_stack(stack.path, _wanted(roles))
        result: ImageQuant = quantify_stack(data, names, voxel, settings, roles)
    except (KeyError, ValueError) as exc:  # a missing channel, an unreadable file: name the stack
        raise ValueError(f"{stack.path}: {exc}") from exc
    if overlay is not None:
        from .overlay import write_overlay

        overlay.parent.mkdir(parents=True, exist_ok=True)
        write_overlay(overlay, result, title=f"{stack.sample} {stack.group.label}: {stack.target}")
    return [c for c in result.cells if not c.touches_border], int(result.excluded_at_border), overlay


def overlay_sample(stacks: Sequence[StackInfo], per_group: int) -> set[Path]:
    """Up to ``per_group`` stacks of every group, spread evenly over its stacks, for segmentation overlays."""
    chosen: set[Path] = set()
    for group in {s.group for s in stacks}:
        mine = [s for s in stacks if s.group == group]
        if per_group > 0 and mine:
            index = np.unique(np.linspace(0, len(mine) - 1, min(per_group, len(mine))).round().astype(int))
            chosen.update(mine[i].path for i in index)
    return chosen


def _overlay_name(stack: StackInfo) -> str:
    return f"{stack.group.label.replace(' ', '')}_{stack.sample}_{stack.target}_a{stack.attempt}.png"


def quantify_run(
    run_dir: str | Path,
    settings: Quantification | None = None,
    roles: ChannelRoles | None = None,
    *,
    overlays_dir: str | Path | None = None,
    workers: int = 1,
    progress: ProgressCallback | None = None,
) -> RunQuant:
    """Quantify every stack of a run folder; overlays for ``settings.overlays_per_timepoint`` stacks per group.

    Settings and channel roles default to the run's protocol (the study's defaults without one).
    ``workers`` > 1 quantifies stacks in that many processes.
    """
    run_dir = Path(run_dir)
    protocol = run_protocol(run_dir)
    settings = settings or (protocol.quantification if protocol is not None else Quantification())
    roles = roles or roles_from_protocol(protocol)
    stacks, skipped = find_stacks(run_dir, protocol)
    drawn = overlay_sample(stacks, settings.overlays_per_timepoint) if overlays_dir is not None else set()
    overlay_of = {s.path: Path(overlays_dir) / _overlay_name(s) if s.path in drawn else None for s in stacks}
    result = RunQuant(run_dir, stacks, [], {}, skipped)

    def collect(k: int, stack: StackInfo, answer: tuple[list[CellQuant], int, Path | None]) -> None:
        cells, excluded, overlay = answer
        result.cells.extend(CellRow(stack, c) for c in cells)
        result.excluded_at_border[stack.path] = excluded
        if overlay is not None:
            result.overlays.append(overlay)
        if progress is not None:
            progress(k + 1, len(stacks), stack)

    if workers > 1 and len(stacks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(stacks))) as pool:
            futures = [pool.submit(_quantify_one, s, settings, roles, overlay_of[s.path]) for s in stacks]
            for k, (stack, future) in enumerate(zip(stacks, futures)):
                collect(k, stack, future.result())
    else:
        for k, stack in enumerate(stacks):
            collect(k, stack, _quantify_one(stack, settings, roles, overlay_of[stack.path]))
    return result
