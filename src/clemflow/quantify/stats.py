"""Per-timepoint statistics of the uptake metrics, as the study reports them.

Each timepoint gets n, mean and SD (ddof = 1) of every per-cell metric and a
two-sided t-test of its cells against the reference group's cells: the first
treated timepoint (1 h in the study) for the uptake metrics, the untreated
control for the endolysosomal volume (particles swell endolysosomes; the 1 h
point may already be swollen). Welch's t-test is the default because the
groups' variances differ by orders of magnitude along the time course
(nearly no particles at 1 h, many at 24 h), which Student's test assumes
away; Student's is available for comparison with analyses that used it.
Cells without particles have no share of particles in endolysosomes: that
metric is averaged and tested over the cells that have particles.

p-values are reported as numbers and as the usual stars: ns (p >= 0.05),
* (< 0.05), ** (< 0.01), *** (< 0.001), **** (< 0.0001).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats as sps

__all__ = [
    "CONTROL",
    "METRICS",
    "Group",
    "GroupStats",
    "Metric",
    "MetricStats",
    "stars",
    "t_test",
    "test_name",
    "timepoint_stats",
]


@dataclass(frozen=True)
class Metric:
    """A per-cell metric: its CellQuant field, how to show it, and what it is tested against."""

    name: str
    label: str
    axis: str  # what the value is a share of, for a plot's axis
    percent: bool
    reference: Literal["first", "control"]


METRICS: tuple[Metric, ...] = (
    Metric("has_particles", "Cells with particles", "% of cells", True, "first"),
    Metric("particle_area_fraction", "Particle area per cell area", "% of cell area", True, "first"),
    Metric("particle_in_endolysosome_fraction", "Particle area in endolysosomes", "% of particle area", True, "first"),
    Metric("endolysosomal_volume_fraction", "Endolysosomal volume per cell volume", "% of cell volume", True, "control"),
)


@dataclass(frozen=True, order=True)
class Group:
    """Cells pooled for one point of the curves: treated cells at one timepoint, or all control cells."""

    role: Literal["control", "treated"]
    hours: float | None = None  # None for the pooled control

    @property
    def label(self) -> str:
        return "control" if self.role == "control" else f"{self.hours:g} h"


CONTROL = Group("control", None)


@dataclass(frozen=True)
class MetricStats:
    n: int
    mean: float
    sd: float
    versus: str | None  # label of the reference group; None for the reference itself or with no reference
    p: float  # nan when untested
    stars: str  # "" when untested


@dataclass(frozen=True)
class GroupStats:
    group: Group
    n_cells: int
    metrics: dict[str, MetricStats]
    n_images: int = 0
    excluded_at_border: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def stars(p: float) -> str:
    """GraphPad-style significance stars for a p-value; '' for nan."""
    if not math.isfinite(p):
        return ""
    for limit, mark in ((1e-4, "****"), (1e-3, "***"), (1e-2, "**"), (0.05, "*")):
        if p < limit:
            return mark
    return "ns"


def test_name(welch: bool = True) -> str:
    return "Welch's t-test, two-sided" if welch else "Student's t-test, two-sided"


def t_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, welch: bool = True) -> float:
    """Two-sided p of a t-test between two samples (NaNs dropped); nan when either has fewer than 2 values
    or neither varies."""
    a = _finite(a)
    b = _finite(b)
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        if len(a) >= 2 and len(b) >= 2 and a[0] != b[0]:
            return 0.0  # two different constants: as different as samples get
        return float("nan")
    with warnings.catch_warnings():  # nearly equal samples: scipy warns of precision loss, p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_ind(a, b, equal_var=not welch).pvalue)


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def _reference(metric: Metric, groups: Sequence[Group]) -> Group | None:
    treated = sorted(g for g in groups if g.role == "treated")
    if metric.reference == "control" and CONTROL in groups:
        return CONTROL
    return treated[0] if treated else None


def timepoint_stats(
    values: Mapping[Group, Mapping[str, Sequence[float] | np.ndarray]],
    welch: bool = True,
    metrics: Sequence[Metric] = METRICS,
) -> list[GroupStats]:
    """Statistics of every group (control first, then treated by time) from per-cell values.

    The control is compared with nothing: it is the reference of the endolysosomal volume, and its
    uptake is nil by design.
    ``values[group][metric.name]`` holds one value per cell (bools count as 0/1, NaN means "not
    defined for this cell" and is left out). A metric whose reference group is missing (no control
    in the run) falls back to the first treated timepoint.
    """
    groups = sorted(values)
    out = []
    for group in groups:
        per_metric = {}
        for metric in metrics:
            v = _finite(values[group].get(metric.name, []))
            ref = _reference(metric, groups)
            if ref is None or ref == group or (metric.reference == "first" and group.role == "control"):
                versus, p = None, float("nan")
            else:
                versus, p = ref.label, t_test(v, values[ref].get(metric.name, []), welch)
            per_metric[metric.name] = MetricStats(
                n=len(v),
                mean=float(v.mean()) if len(v) else float("nan"),
                sd=float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                versus=versus, p=p, stars=stars(p),
            )
        n_cells = max((len(np.ravel(x)) for x in values[group].values()), default=0)
        out.append(GroupStats(group=group, n_cells=n_cells, metrics=per_metric))
    return out
