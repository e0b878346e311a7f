"""The report of an alignment: its PNGs and the few numbers an operator reads first.

``write_report`` is what the offline aligner calls when it is done and what
``clemflow qc report DIR`` runs on a finished (or running) acquisition: it
redraws the reslices, drift and QC plots from the files in the output folder,
so it needs nothing but that folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import plots

__all__ = ["ReportSummary", "alignment_dir", "summarize", "write_report"]

_OUTPUTS = (plots.ALIGNED, plots.TRANSFORMS, plots.QC)


@dataclass(frozen=True)
class ReportSummary:
    """What a report says in numbers; ranges are NaN when no slice has been aligned yet."""

    out_dir: Path
    slices: int  # rows of transforms.csv (aligned slices)
    qc_slices: int  # rows of qc.csv
    alerts_by_kind: dict[str, int] = field(default_factory=dict)  # warnings and critical alerts of alerts.jsonl
    dx_range: tuple[float, float] = (math.nan, math.nan)  # min, max of the translation applied, px
    dy_range: tuple[float, float] = (math.nan, math.nan)
    median_ncc: float = math.nan  # median neighbour correlation after alignment (qc.csv "ncc")
    pngs: list[Path] = field(default_factory=list)

    @property
    def alerts(self) -> int:
        return sum(self.alerts_by_kind.values())


def alignment_dir(path: str | os.PathLike[str]) -> Path:
    """The folder holding the alignment outputs: ``path`` itself, or ``path``/aligned for a run folder."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such folder; give the --out folder of `clemflow align` or a run folder")
    for candidate in (p, p / "aligned"):
        if any((candidate / name).exists() for name in _OUTPUTS):
            return candidate
    raise FileNotFoundError(
        f"{p}: no alignment outputs here or in {p / 'aligned'} (looked for {', '.join(_OUTPUTS)}); "
        "run `clemflow align INPUT --out DIR` first, or give the run folder of an acquisition that aligned live")


def _range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)


def summarize(out_dir: str | os.PathLike[str]) -> ReportSummary:
    """Slices, alerts by kind, drift range and median NCC of an alignment output folder (or run folder)."""
    d = alignment_dir(out_dir)
    slices, dx, dy = 0, (math.nan, math.nan), (math.nan, math.nan)
    if (d / plots.TRANSFORMS).is_file():
        cols = plots.transform_columns(d / plots.TRANSFORMS)
        slices = len(cols["slice"])
        dx, dy = _range(cols["dx"]), _range(cols["dy"])
    qc_slices, ncc, kinds = 0, math.nan, {}
    if (d / plots.QC).is_file():
        from .qclog import read_alerts

        qc, _ = plots.qc_columns(d)
        qc_slices = len(qc["slice"])
        values = qc.get("ncc", np.array([]))
        if np.isfinite(values).any():
            ncc = float(np.nanmedian(values))
        for alert in read_alerts(d):
            if alert.level != "info":  # "cleared" notes are not alerts
                kinds[alert.kind] = kinds.get(alert.kind, 0) + 1
    return ReportSummary(d, slices, qc_slices, dict(sorted(kinds.items())), dx, dy, ncc)


def write_report(out_dir: str | os.PathLike[str], raw: object | None = None) -> ReportSummary:
    """Draw every PNG the folder has data for (reslices, drift, QC) and return the summary with their paths.

    ``raw``: the unaligned input as an array-like (z, y, x), drawn beside the aligned reslices when given.
    """
    d = alignment_dir(out_dir)
    summary = summarize(d)
    pngs: list[Path] = []
    if (d / plots.ALIGNED).exists():
        pngs += plots.write_reslices(d, raw=raw)
    if summary.slices:
        pngs.append(plots.write_drift_plot(d))
    if summary.qc_slices:
        pngs.append(plots.write_qc_plot(d))
    return ReportSummary(**{**summary.__dict__, "pngs": pngs})
