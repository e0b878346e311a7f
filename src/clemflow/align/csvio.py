"""``transforms.csv``: one row per input slice, appended as slices are aligned, each slice written once.

Columns ``slice,dx,dy,confidence,coarse_dx,coarse_dy,fine_model,a11,a12,a21,a22`` then the fine stage's further
parameters (``SliceTransform.extra``), in the sign convention of ``transforms.py`` (dx, dy are the shift applied
to the slice). Numbers are written in Python's shortest exact form, so reading gives back the very floats.
A crash can leave at most a torn last line, which is dropped on reopening (that slice is aligned again).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .transforms import CoarseShift, SliceTransform

__all__ = ["BASE_COLUMNS", "TransformsCsv", "read_coarse", "read_transforms", "write_coarse"]

BASE_COLUMNS = ("slice", "dx", "dy", "confidence", "coarse_dx", "coarse_dy", "fine_model", "a11", "a12", "a21", "a22")
COARSE_COLUMNS = ("slice", "dx", "dy", "step_dx", "step_dy", "confidence", "fallback", "long_range")


class TransformsCsv:
    """Appends ``SliceTransform`` rows to ``path``; a slice already in the file is not written again.

    The further columns are the union of the rows' ``extra`` keys in alphabetical order (``extra`` adds some up
    front), so the file does not depend on which rows came first; a row bringing a new key rewrites the file once
    with the wider header (a row without a key leaves its cell empty).
    """

    def __init__(self, path: str | Path, extra: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._columns: tuple[str, ...] | None = None
        self._written: set[int] = set()
        self._extra = tuple(extra) if extra is not None else ()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._drop_torn_line()
            with self.path.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None:
                    return
                if tuple(header[:len(BASE_COLUMNS)]) != BASE_COLUMNS:
                    raise ValueError(f"{self.path}: the header {header[:len(BASE_COLUMNS)]} is not that of "
                                     f"transforms.csv ({','.join(BASE_COLUMNS)}); give another output folder")
                self._columns = tuple(header)
                for row in reader:
                    if row:
                        self._written.add(int(row[0]))

    @property
    def written(self) -> set[int]:
        """Indices of the slices already in the file."""
        return set(self._written)

    def __contains__(self, index: object) -> bool:
        return index in self._written

    def write(self, transform: SliceTransform) -> bool:
        """Append one row unless the slice is already there; returns whether it was written."""
        return self.write_many([transform]) == 1

    def write_many(self, transforms: Iterable[SliceTransform]) -> int:
        """Append the rows of slices not yet in the file, flushed to disk together; returns how many."""
        fresh: list[SliceTransform] = []
        seen = set(self._written)
        for t in transforms:
            if t.index not in seen:
                seen.add(t.index)
                fresh.append(t)
        if not fresh:
            return 0
        new_file = self._columns is None
        known = set(self._columns or ()) | set(self._extra)
        keys = known.union(*(t.extra for t in fresh)) - set(BASE_COLUMNS)
        if new_file or not keys <= set(self._columns or ()):
            self._columns = BASE_COLUMNS + tuple(sorted(keys))
            if not new_file:
                self._rewrite()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if new_file:
            writer.writerow(self._columns)
        for t in fresh:
            writer.writerow(_row(t, self._columns))  # type: ignore[arg-type]
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        self._written.update(t.index for t in fresh)
        return len(fresh)

    def sort(self) -> None:
        """Rewrite the file in slice order (rows arrive out of order from parallel workers); atomic."""
        if self._columns is not None:
            self._rewrite()

    def _rewrite(self) -> None:
        rows = read_transforms(self.path)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self._columns)
        for t in rows:
            writer.writerow(_row(t, self._columns))
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def _drop_torn_line(self) -> None:
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with self.path.open("r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())


def read_transforms(path: str | Path) -> list[SliceTransform]:
    """The transforms in ``path``, one per slice, in slice order."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no transforms.csv here; run 'clemflow align' first") from None
    out: dict[int, SliceTransform] = {}
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in BASE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: lacks the column(s) {', '.join(missing)} of transforms.csv")
        extra_columns = [c for c in reader.fieldnames or [] if c not in BASE_COLUMNS]
        for line, row in enumerate(reader, start=2):
            if not row.get("slice") or None in row.values():
                continue  # a torn last line
            try:
                t = SliceTransform(
                    index=int(row["slice"]), dx=float(row["dx"]), dy=float(row["dy"]),
                    linear=(float(row["a11"]), float(row["a12"]), float(row["a21"]), float(row["a22"])),
                    confidence=float(row["confidence"]), coarse_dx=float(row["coarse_dx"]),
                    coarse_dy=float(row["coarse_dy"]), fine_model=row["fine_model"],
                    extra={c: float(row[c]) for c in extra_columns if row.get(c) not in (None, "")})
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
            out.setdefault(t.index, t)
    return [out[k] for k in sorted(out)]


def _row(t: SliceTransform, columns: Sequence[str]) -> list[str]:
    values = {"slice": str(t.index), "dx": _num(t.dx), "dy": _num(t.dy), "confidence": _num(t.confidence),
              "coarse_dx": _num(t.coarse_dx), "coarse_dy": _num(t.coarse_dy), "fine_model": t.fine_model,
              "a11": _num(t.linear[0]), "a12": _num(t.linear[1]), "a21": _num(t.linear[2]), "a22": _num(t.linear[3])}
    return [values[c] if c in values else (_num(t.extra[c]) if c in t.extra else "") for c in columns]


def _num(value: float) -> str:
    value = float(value) + 0.0  # -0.0 -> 0.0
    return "nan" if math.isnan(value) else repr(value)


def write_coarse(path: str | Path, shifts: Iterable[CoarseShift]) -> None:
    """All coarse shifts of a pass at once (``coarse.csv``, atomic): an offline run that resumes skips the pass."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COARSE_COLUMNS)
    for c in sorted(shifts, key=lambda c: c.index):
        writer.writerow([str(c.index), _num(c.dx), _num(c.dy), _num(c.step_dx), _num(c.step_dy), _num(c.confidence),
                         c.fallback, "1" if c.long_range else "0"])
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_coarse(path: str | Path) -> dict[int, CoarseShift]:
    """The coarse shifts in ``path`` by slice index (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    out: dict[int, CoarseShift] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COARSE_COLUMNS:
            raise ValueError(f"{path}: not a coarse.csv (columns {reader.fieldnames}); give another output folder")
        for line, row in enumerate(reader, start=2):
            try:
                out[int(row["slice"])] = CoarseShift(
                    int(row["slice"]), float(row["dx"]), float(row["dy"]), float(row["step_dx"]),
                    float(row["step_dy"]), float(row["confidence"]), row["fallback"] or "", row["long_range"] == "1")
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
    return out
