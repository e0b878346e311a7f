"""Offline alignment of a whole input, in bounded memory, in-process or on a dask.distributed cluster.

Pass 1 streams every slice through the coarse aligner (sequential by nature:
each slice is placed against the ones before it) and keeps only the shifts.
Pass 2 is the fine stage, which needs nothing but the raw slices around a
slice and their coarse shifts, so it splits into independent chunks of slices:
each chunk reads its slices plus ``fine_radius`` on either side from the input
itself, keeps a sliding window of ``2 r + 1`` raw slices, writes its aligned
and display slices straight into the OME-Zarr stores and hands back only the
transforms. The same chunk function runs in this process or as a dask task,
so a cluster run gives the same numbers as a laptop run.

The output folder records what it was made from (``alignment.json``): the
same input and settings resume (slices in ``transforms.csv`` are not redone),
anything else is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from numpy.typing import NDArray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import __version__
from ..protocol.analysis import Alignment
from .csvio import TransformsCsv, read_coarse, read_transforms, write_coarse
from .sources import SliceSource, open_source
from .transforms import CoarseShift, SliceTransform
from .outputs import TRANSFORMS, AlignedStores

__all__ = ["AlignmentFolderError", "ChunkJob", "OfflineResult", "align_chunk", "align_offline", "chunks_of"]

MANIFEST = "alignment.json"
COARSE = "coarse.csv"


class AlignmentFolderError(ValueError):
    """The output folder holds something else than a resumable alignment of this input; nothing was changed."""


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of the fine stage: everything a worker needs, small enough to ship to it."""

    source: SliceSource  # restricted to the chunk's slices and their neighbours
    indices: tuple[int, ...]  # slices to align (not yet in transforms.csv)
    coarse: Mapping[int, CoarseShift]  # coarse shifts of those slices and their neighbours
    settings: Alignment
    out_dir: str
    first_index: int  # slice index at z = 0 of the volumes
    pixel_size_nm: float | None
    slice_thickness_nm: float | None
    display: bool = True


@dataclass
class OfflineResult:
    out_dir: Path
    transforms: list[SliceTransform]
    aligned: int  # slices aligned by this call
    resumed: int  # slices found already aligned in the folder
    coarse_reused: bool  # pass 1 was read back from coarse.csv
    notes: list[str] = field(default_factory=list)


def align_offline(input_path: str | Path, out_dir: str | Path, settings: Alignment | None = None, *,
                  scheduler: str | Any | None = None, chunk: int = 32, workers: int | None = None,
                  pixel_size_nm: float | None = None, slice_thickness_nm: float | None = None,
                  display: bool = True, report: bool = True, console: Console | None = None,
                  progress: bool = True) -> OfflineResult:
    """Align ``input_path`` into ``out_dir``; ``scheduler`` None (in-process), "local", an address or a Client.

    ``pixel_size_nm`` / ``slice_thickness_nm`` override what the input's metadata says (or fill it in);
    ``report`` False skips the QC report (plots and qc.csv) after the run.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: a chunk holds at least one slice")
    settings = settings or Alignment()
    source = open_source(Path(input_path).absolute())  # workers elsewhere must find it (on a shared file system)
    pixel = pixel_size_nm or source.pixel_size_nm
    thickness = slice_thickness_nm or source.slice_thickness_nm
    out = Path(out_dir).absolute()
    manifest = _manifest(source, settings, pixel, thickness)
    _claim_folder(out, manifest)
    notes: list[str] = []
    if pixel is None:
        notes.append("pixel size unknown: the volumes are in pixel units (give --pixel-size)")
    elif thickness is None:
        notes.append("slice thickness unknown: voxels written as isotropic (give --slice-thickness)")

    console = console or Console(stderr=True)
    with _progress(console, progress) as bar:
        coarse, reused = _coarse_pass(source, settings, out / COARSE, bar)
        first = source.indices[0]
        depth = source.indices[-1] - first + 1
        AlignedStores(out, source.shape, source.dtype, pixel, thickness, display=display, depth=depth)  # final size
        table = TransformsCsv(out / TRANSFORMS)
        done = table.written
        todo = [i for i in source.indices if i not in done]
        radius = int(settings.fine_radius)
        jobs = [ChunkJob(source.subset(_with_neighbours(part, radius)), tuple(part),
                         {j: coarse[j] for j in _with_neighbours(part, radius) if j in coarse}, settings, str(out),
                         first, pixel, thickness, display) for part in chunks_of(todo, chunk)]
        task = bar.add_task("fine", total=len(source), completed=len(source) - len(todo))
        aligned = 0
        for transforms in _run_jobs(jobs, scheduler, workers):
            aligned += table.write_many(transforms)
            bar.advance(task, len(transforms))
    table.sort()
    if report:
        _write_report(out, console, notes)
    return OfflineResult(out, read_transforms(out / TRANSFORMS), aligned, len(source) - len(todo), reused, notes)


def align_chunk(job: ChunkJob) -> list[SliceTransform]:
    """Fine-align the slices of ``job`` (window: raw slices index-r..index+r that exist); write them; return transforms."""
    from .fine import align_fine

    radius = int(job.settings.fine_radius)
    out = Path(job.out_dir)
    stores = AlignedStores(out, job.source.shape, job.source.dtype, job.pixel_size_nm, job.slice_thickness_nm,
                           display=job.display)
    raw: dict[int, NDArray[Any]] = {}
    cache: dict[int, NDArray[Any]] = {}  # align_fine's coarse-aligned binned slices, reused across the window
    results: list[SliceTransform] = []
    for index in job.indices:
        wanted = [j for j in range(index - radius, index + radius + 1) if j in job.source]
        for held in (raw, cache):
            for j in [j for j in held if j < index - radius]:
                del held[j]  # the window slides: memory holds 2 r + 1 slices, whatever the chunk size
        for j in wanted:
            if j not in raw:
                raw[j] = job.source.read(j)
        window = {j: raw[j] for j in wanted}
        result = align_fine(index, window, job.coarse, job.settings, cache=cache)
        stores.write(index - job.first_index, result.image)
        results.append(result.transform)
    return results


def chunks_of(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive pieces of ``size`` slices."""
    for start in range(0, len(indices), size):
        yield list(indices[start:start + size])


def _with_neighbours(part: Sequence[int], radius: int) -> list[int]:
    return list(range(part[0] - radius, part[-1] + radius + 1))


def _coarse_pass(source: SliceSource, settings: Alignment, path: Path, bar: Progress) -> tuple[dict[int, CoarseShift], bool]:
    """Pass 1 (streaming): read back from coarse.csv when a previous run completed it, else run it and save it."""
    known = read_coarse(path)
    if known and all(i in known for i in source.indices):
        bar.add_task("coarse (from coarse.csv)", total=len(source), completed=len(source))
        return known, True
    from .coarse import CoarseAligner

    aligner = CoarseAligner(settings)
    task = bar.add_task("coarse", total=len(source))
    shifts: dict[int, CoarseShift] = {}
    for index, image in source:
        shifts[index] = aligner.add(index, image)
        bar.advance(task)
    write_coarse(path, shifts.values())
    return shifts, False


def _run_jobs(jobs: list[ChunkJob], scheduler: str | Any | None, workers: int | None) -> Iterator[list[SliceTransform]]:
    """Each job's transforms as it finishes: in this process, or as dask tasks on ``scheduler``."""
    if not jobs:
        return
    if scheduler is None:
        for job in jobs:
            yield align_chunk(job)
        return
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if isinstance(scheduler, Client):
        client, own = scheduler, False
    elif scheduler == "local":
        cluster = LocalCluster(n_workers=workers or max(1, (os.cpu_count() or 2) - 1), threads_per_worker=1,
                               dashboard_address=None)
        client, own = Client(cluster), True
    else:
        client, own = Client(str(scheduler), timeout="30s"), True
    try:
        futures = [client.submit(align_chunk, job, pure=False) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
            future.release()
    finally:
        if own:
            client.close()
        if cluster is not None:
            cluster.close()


def _manifest(source: SliceSource, settings: Alignment, pixel: float | None, thickness: float | None) -> dict[str, Any]:
    return {"input": source.describe(), "settings": settings.model_dump(mode="json"),
            "pixel_size_nm": pixel, "slice_thickness_nm": thickness, "clemflow": __version__}


def _claim_folder(out: Path, manifest: dict[str, Any]) -> None:
    """Create ``out`` or accept it for resuming; refuse a folder holding anything else."""
    path = out / MANIFEST
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise AlignmentFolderError(f"{path}: unreadable ({exc}); give another --out folder") from None
        differences = _differences(previous, manifest)
        if differences:
            raise AlignmentFolderError(
                f"{out} holds another alignment ({'; '.join(differences)}); give another --out folder, or delete "
                "this one to start again")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlignmentFolderError(f"{out} exists and is not an alignment folder (no {MANIFEST}); give a new or empty "
                                   "--out folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in ("kind", "path", "slices", "first", "last", "shape", "dtype"):
        a, b = (old.get("input") or {}).get(key), new["input"].get(key)
        if a != b:
            out.append(f"input {key} was {a}, now {b}")
    old_settings = old.get("settings") or {}
    for key, value in new["settings"].items():
        if old_settings.get(key) != value:
            out.append(f"alignment.{key} was {old_settings.get(key)}, now {value}")
    for key in ("pixel_size_nm", "slice_thickness_nm"):
        if old.get(key) != new.get(key):
            out.append(f"{key} was {old.get(key)}, now {new.get(key)}")
    return out


def _write_report(out: Path, console: Console, notes: list[str]) -> None:
    """Hand the finished folder to the QC report (PNGs, qc.csv) when that module is installed."""
    try:
        from ..qc.report import write_report  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        if exc.name in ("clemflow.qc", "clemflow.qc.report"):
            return  # QC not installed: the alignment outputs stand alone
        raise
    report: Callable[[Path], Any] = write_report
    try:
        report(out)
    except Exception as exc:  # the alignment is complete and stays valid without its plots
        notes.append(f"QC report not written: {exc}")
        console.print(f"[yellow]![/yellow] QC report not written: {exc}")


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not enabled, transient=False)
