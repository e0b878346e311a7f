"""The QC record of a run: ``qc.csv`` (one row per slice) and ``alerts.jsonl`` (one alert per line).

Both files are appended slice by slice, each line flushed as it is written,
so a run that stops leaves a readable record. A run that resumes appends to
the same files: slices and alerts already there are not written again, and a
line cut short by a crash is dropped before anything is appended.

``qc.csv`` columns: ``slice``, one per measure (:data:`QC_COLUMNS`; empty =
not measured, e.g. the neighbour measures of the first slice), and
``alerts``, the kinds of the slice's warnings joined by ";" ("cleared"
notes are only in ``alerts.jsonl``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .monitor import METRICS, QCAlert, SliceQC

__all__ = ["ALERTS_JSONL", "QC_COLUMNS", "QC_CSV", "QCLog", "read_alerts", "read_qc"]

QC_CSV = "qc.csv"
ALERTS_JSONL = "alerts.jsonl"
QC_COLUMNS: tuple[str, ...] = METRICS


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a crash left without its newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def _alert_key(d: dict[str, Any]) -> tuple[int, str, str, str]:
    return (int(d["slice"]), str(d["kind"]), str(d.get("level", "")), str(d.get("message", "")))


class QCLog:
    """Appends QC results to ``folder/qc.csv`` and ``folder/alerts.jsonl``; safe to reopen on resume."""

    def __init__(self, folder: str | os.PathLike[str], columns: Iterable[str] = QC_COLUMNS) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / QC_CSV
        self.alerts_path = self.folder / ALERTS_JSONL
        _drop_torn_tail(self.csv_path)
        _drop_torn_tail(self.alerts_path)
        self.columns = list(columns)
        self.slices: set[int] = set()
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with open(self.csv_path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                if not header or header[0] != "slice" or header[-1] != "alerts":
                    raise ValueError(f"{self.csv_path} is not a QC table (its header is {header!r}); "
                                     "move it away or choose another output folder")
                self.columns = header[1:-1]  # keep the columns the run started with
                for row in reader:
                    if row:
                        self.slices.add(int(row[0]))
        else:
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(["slice", *self.columns, "alerts"])
        self._said: set[tuple[int, str, str, str]] = {_alert_key(a.to_dict()) for a in read_alerts(self.folder)}

    def append(self, qc: SliceQC) -> bool:
        """Write the slice's row and its alerts; False (nothing written) when the slice is already recorded."""
        new_alerts = [a for a in qc.alerts if _alert_key(a.to_dict()) not in self._said]
        if new_alerts:
            with open(self.alerts_path, "a") as f:
                for a in new_alerts:
                    f.write(json.dumps(a.to_dict()) + "\n")
                    self._said.add(_alert_key(a.to_dict()))
                f.flush()
        if qc.index in self.slices:
            return False
        buf = io.StringIO()
        csv.writer(buf).writerow([qc.index, *(_cell(qc.metrics.get(c)) for c in self.columns), ";".join(qc.kinds)])
        with open(self.csv_path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
        self.slices.add(qc.index)
        return True


def _cell(v: Any) -> str:
    if v is None:
        return ""
    v = float(v)
    return f"{v:.6g}" if math.isfinite(v) else ""


def read_qc(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of ``qc.csv``: ``slice`` (int), each measure (float, NaN when empty) and ``alerts`` (list of kinds)."""
    path = Path(folder) / QC_CSV
    if not path.exists():
        raise FileNotFoundError(f"no QC table at {path}: run the alignment/QC on this folder first")
    rows: list[dict[str, Any]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for line, raw in enumerate(reader, start=2):
            if raw.get("slice") in (None, ""):
                continue
            if None in raw.values():  # a row cut short (the run stopped while writing it)
                continue
            try:
                row: dict[str, Any] = {"slice": int(raw["slice"])}
                for k, v in raw.items():
                    if k in ("slice", "alerts"):
                        continue
                    row[k] = float(v) if v not in ("", None) else float("nan")
            except ValueError as e:
                raise ValueError(f"{path}, line {line}: {e}; fix or remove that line") from None
            row["alerts"] = [k for k in (raw.get("alerts") or "").split(";") if k]
            rows.append(row)
    return rows


def read_alerts(folder: str | os.PathLike[str]) -> list[QCAlert]:
    """Alerts of ``alerts.jsonl`` in the order they were raised (an unreadable last line, cut by a crash, is skipped)."""
    path = Path(folder) / ALERTS_JSONL
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out: list[QCAlert] = []
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            out.append(QCAlert.from_dict(json.loads(text)))
        except (ValueError, KeyError, TypeError) as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}, line {n}: not an alert ({e}); fix or remove that line") from None
    return out
