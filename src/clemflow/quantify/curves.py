"""The time-course curves, one PNG per metric, drawn like the study's Fig. 5.

Each timepoint is a point at its mean with an SD error bar, the timepoints
evenly spaced (1, 2, 4, 6, 14, 24 and 48 h would crowd the early points on a
linear axis), and the significance against the reference group written above
the bar; bars of a share stop at 0 and 100 %. The untreated control is drawn apart, left of the time axis, on the
curve it is the reference of (endolysosomal volume); the reference group
carries no stars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .stats import METRICS, GroupStats, Metric  # noqa: E402

__all__ = ["curve_path", "plot_curve", "write_curves"]

TREATED_COLOUR = "#1f4e9c"
CONTROL_COLOUR = "#7f7f7f"


def curve_path(folder: str | Path, metric: Metric) -> Path:
    return Path(folder) / f"curve_{metric.name}.png"


def plot_curve(path: str | Path, stats: Sequence[GroupStats], metric: Metric, test: str = "") -> Path:
    """Write one curve (``metric`` over the groups in ``stats``) as a PNG and return its path."""
    path = Path(path)
    scale = 100.0 if metric.percent else 1.0
    control = [s for s in stats if s.group.role == "control"]
    treated = sorted((s for s in stats if s.group.role == "treated"), key=lambda s: s.group.hours)
    fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=150)
    xs, labels = [], []
    if control:
        xs.append(-1.3)
        labels.append("ctrl")
    xs += list(range(len(treated)))
    labels += [f"{s.group.hours:g}" for s in treated]
    tops = []
    for x, s in zip(xs, control + treated):
        m = s.metrics[metric.name]
        mean = m.mean * scale
        sd = m.sd * scale if math.isfinite(m.sd) else 0.0
        colour = CONTROL_COLOUR if s.group.role == "control" else TREATED_COLOUR
        # a share cannot leave 0-100 %: the bar stops there (a yes/no metric's SD would reach past 100 %)
        low, high = (min(sd, mean), min(sd, scale - mean)) if metric.percent and math.isfinite(mean) else (sd, sd)
        if math.isfinite(mean):
            ax.errorbar(x, mean, yerr=[[low], [high]], fmt="o", ms=5, color=colour, ecolor=colour, elinewidth=1.2, capsize=3,
                        markeredgecolor="white", markeredgewidth=0.6, zorder=3)
        tops.append((x, mean + high if math.isfinite(mean) else float("nan"), m))
    line = [(x, s.metrics[metric.name].mean * scale) for x, s in zip(xs[len(control):], treated)]
    line = [(x, y) for x, y in line if math.isfinite(y)]
    if len(line) > 1:
        ax.plot(*zip(*line), color=TREATED_COLOUR, lw=0.9, alpha=0.6, zorder=2)
    finite = [t for _, t, _ in tops if math.isfinite(t)]
    span = (max(finite) if finite else 1.0) or 1.0
    for x, top, m in tops:
        if m.stars and math.isfinite(top):
            ax.text(x, top + 0.03 * span, m.stars, ha="center", va="bottom", fontsize=8 if m.stars == "ns" else 10)
    ax.set_ylim(bottom=min(0.0, min((y for _, y in line), default=0.0)), top=span * 1.18)
    ax.set_xticks(xs, labels)
    if control:
        ax.axvline(-0.65, color="0.85", lw=0.8)
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_xlabel("time after particles were added (h)")
    ax.set_ylabel(metric.axis)
    ax.spines[["top", "right"]].set_visible(False)
    ns = ", ".join(f"{s.group.label}: {s.metrics[metric.name].n}" for s in control + treated)
    versus = next((m.versus for _, _, m in tops if m.versus), None)
    note = f"mean ± SD; n cells: {ns}"
    if versus:
        note += f"\n{test or 't-test'} vs {versus}: ns p≥0.05, * <0.05, ** <0.01, *** <0.001, **** <0.0001"
    fig.text(0.01, 0.005, note, fontsize=5.2, color="0.3", va="bottom", wrap=True)
    ax.set_title(metric.label, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def write_curves(folder: str | Path, stats: Sequence[GroupStats], test: str = "",
                 metrics: Sequence[Metric] = METRICS) -> list[Path]:
    """One PNG per metric in ``folder`` (curve_<metric>.png); the control point only where it is the reference."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in metrics:
        shown = [s for s in stats if s.group.role == "treated" or metric.reference == "control"]
        paths.append(plot_curve(curve_path(folder, metric), shown, metric, test))
    return paths
