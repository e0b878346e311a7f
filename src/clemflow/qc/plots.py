"""PNG views of an alignment for the operator: reslices of the aligned volume, drift and QC over slice number.

They are redrawn every few slices during a run and once by ``clemflow qc
report``, so each reads only what it draws (one row and one column of every
slice for the reslices) and takes well under a second for 500 slices of
512 x 512. Figures are drawn on their own Agg canvas (no pyplot state, so a
background thread may draw them) and replace the old PNG in one rename, so a
viewer never shows a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..align.outputs import ALIGNED, TRANSFORMS
from .qclog import QC_CSV

__all__ = [
    "VolumeGeometry",
    "qc_columns",
    "transform_columns",
    "volume_geometry",
    "write_drift_plot",
    "write_qc_plot",
    "write_reslices",
]

QC = QC_CSV

_KIND_COLOURS = {
    "defocus": "tab:purple", "charging": "tab:orange", "curtaining": "tab:brown", "drift_jump": "tab:red",
    "duplicate": "tab:pink", "missing": "black", "low_ncc": "tab:olive", "low_confidence": "tab:cyan",
}


# --- reading -----------------------------------------------------------------------------------------------------


class VolumeGeometry:
    """Voxel size of one level of an aligned volume: z, y, x in ``unit`` ("µm", or "px" when the store has none)."""

    def __init__(self, z: float, y: float, x: float, unit: str = "µm") -> None:
        self.z, self.y, self.x, self.unit = float(z), float(y), float(x), unit

    def __repr__(self) -> str:
        return f"VolumeGeometry(z={self.z:g}, y={self.y:g}, x={self.x:g}, unit={self.unit!r})"


_UNIT_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}


def _open_volume(path: Path, display_px: int | None = None) -> tuple[Any, VolumeGeometry]:
    """Level 0 of the aligned volume, or with ``display_px`` its 2x level when that is still so wide."""
    from ..align.volume import read_scale, read_volume

    if not path.exists():
        raise FileNotFoundError(f"{path}: no aligned volume here (expected an OME-Zarr written by `clemflow align`)")
    level = 0
    if display_px is not None and min(read_volume(path, 0).shape[1:]) >= 2 * display_px:
        try:
            read_scale(path, 1)
            level = 1
        except ValueError:  # no 2x level in this store
            pass
    (z, y, x), units = read_scale(path, level)
    unit = units[-1]
    if unit is None:
        return read_volume(path, level), VolumeGeometry(z, y, x, "px")
    if unit not in _UNIT_UM:
        raise ValueError(f"{path}: unit {unit!r} on the x axis; expected micrometer, nanometer or millimeter")
    f = _UNIT_UM[unit]
    return read_volume(path, level), VolumeGeometry(z * f, y * f, x * f)


def volume_geometry(out_dir: str | os.PathLike[str]) -> VolumeGeometry:
    """Voxel size of ``out_dir``/aligned.ome.zarr (level 0)."""
    return _open_volume(Path(out_dir) / ALIGNED)[1]


def qc_columns(out_dir: str | os.PathLike[str]) -> tuple[dict[str, NDArray[np.float64]], list[list[str]]]:
    """qc.csv through clemflow.qc.qclog as numeric columns in slice order, and each slice's alert kinds."""
    from .qclog import read_qc

    rows = sorted(read_qc(out_dir), key=lambda r: r["slice"])
    names = list(rows[0]) if rows else ["slice"]
    cols = {n: np.array([float(r.get(n, np.nan)) for r in rows]) for n in names if n != "alerts"}
    return cols, [list(r.get("alerts", [])) for r in rows]


def transform_columns(path: str | os.PathLike[str]) -> dict[str, NDArray[Any]]:
    """transforms.csv as columns, through clemflow.align.csvio (its checks, one row per slice, slice order)."""
    from ..align.csvio import read_transforms

    rows = read_transforms(path)
    cols: dict[str, NDArray[Any]] = {
        "slice": np.array([t.index for t in rows], float),
        "dx": np.array([t.dx for t in rows]), "dy": np.array([t.dy for t in rows]),
        "confidence": np.array([t.confidence for t in rows]),
        "coarse_dx": np.array([t.coarse_dx for t in rows]), "coarse_dy": np.array([t.coarse_dy for t in rows]),
    }
    for k, name in enumerate(("a11", "a12", "a21", "a22")):
        cols[name] = np.array([t.linear[k] for t in rows])
    for name in sorted({k for t in rows for k in t.extra}):
        cols[name] = np.array([t.extra.get(name, np.nan) for t in rows])
    return cols


def _is_numeric(col: NDArray[Any]) -> bool:
    return col.dtype.kind == "f" and bool(np.isfinite(col).any())


# --- drawing -----------------------------------------------------------------------------------------------------


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))  # fixed margins: a layout engine would double the drawing time
    FigureCanvasAgg(fig)
    return fig


def _margins(fig: Any, left: float = 0.75, right: float = 0.2, top: float = 0.45, bottom: float = 0.5,
             hspace: float = 0.5, wspace: float = 0.25) -> None:
    """Margins in inches, so text keeps its room whatever the figure's size."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        hspace=hspace, wspace=wspace)


def _save(fig: Any, path: Path, dpi: float = 100) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi, pil_kwargs={"compress_level": 1})  # fast to write; size matters less here
    os.replace(tmp, path)
    return path


def _grey_limits(*images: NDArray[Any]) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(im, dtype=np.float32).ravel() for im in images])
    vals = vals[vals != 0]  # 0 is the empty field outside the aligned slice
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, (0.5, 99.5))
    return float(lo), float(max(hi, lo + 1))


def _trim_unwritten(section: NDArray[Any]) -> NDArray[Any]:
    """Drop trailing all-zero rows: slices the live writer has not reached yet."""
    written = np.flatnonzero(np.any(section != 0, axis=1))
    return section[: written[-1] + 1] if written.size else section[:0]


def _reslice_pair(volume: Any, n: int | None = None, block: int = 64) -> tuple[NDArray[Any], NDArray[Any]]:
    """(xz through the middle row, yz through the middle column), z down, each trimmed to the written slices.

    Read in blocks of whole slices, so each chunk is fetched and decoded once for both sections.
    """
    nz, ny, nx = volume.shape
    nz = nz if n is None else min(nz, n)
    xz = np.empty((nz, nx), dtype=volume.dtype)
    yz = np.empty((nz, ny), dtype=volume.dtype)
    for z0 in range(0, nz, block):
        part = np.asarray(volume[z0: min(nz, z0 + block)])
        xz[z0: z0 + len(part)] = part[:, ny // 2, :]
        yz[z0: z0 + len(part)] = part[:, :, nx // 2]
    keep = max(len(_trim_unwritten(xz)), len(_trim_unwritten(yz)))
    return xz[:keep], yz[:keep]


def _draw_section(ax: Any, section: NDArray[Any], lateral: float, z: float, unit: str,
                  limits: tuple[float, float], title: str, lateral_name: str) -> None:
    extent = (0.0, section.shape[1] * lateral, section.shape[0] * z, 0.0)
    ax.imshow(section, cmap="gray", vmin=limits[0], vmax=limits[1], extent=extent, aspect="equal",
              interpolation="antialiased")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{lateral_name} ({unit})")
    ax.set_ylabel(f"z ({unit}, milling direction)")
    ax.tick_params(labelsize=8)


def write_reslices(out_dir: str | os.PathLike[str], raw: Any | None = None, display_px: int = 1024) -> list[Path]:
    """Write reslice_xz.png and reslice_yz.png of ``out_dir``/aligned.ome.zarr through the middle row and column.

    z is drawn to scale (slice thickness against pixel size), so structures
    keep their true proportions; axes are in µm (px for a store without
    physical sizes). With ``raw`` (an array-like (z, y, x) of the unaligned
    input, same shape) the unaligned reslice is drawn beside the aligned one,
    so the gain of alignment shows. A volume at least twice ``display_px``
    wide is read from its 2x level (a quarter of the bytes for the same
    picture). Returns the PNGs written: none while no slice has been written.
    """
    out = Path(out_dir)
    volume, geo = _open_volume(out / ALIGNED, display_px=None if raw is not None else display_px)
    xz, yz = _reslice_pair(volume)
    if len(xz) == 0:
        return []  # no slice written yet: nothing to draw
    raw_xz = raw_yz = None
    if raw is not None:
        if tuple(raw.shape[1:]) != tuple(volume.shape[1:]):
            raise ValueError(f"raw stack has slices of shape {tuple(raw.shape[1:])}, the aligned volume "
                             f"{tuple(volume.shape[1:])}: give the input the alignment was run on")
        raw_xz, raw_yz = _reslice_pair(raw, n=len(xz))
    written = []
    for name, sec, raw_sec, step, lateral in (("reslice_xz.png", xz, raw_xz, geo.x, "x"),
                                              ("reslice_yz.png", yz, raw_yz, geo.y, "y")):
        panels = [("aligned", sec)] if raw_sec is None else [("unaligned", raw_sec), ("aligned", sec)]
        width, depth = sec.shape[1] * step, sec.shape[0] * geo.z
        panel_w = min(8.0, max(3.0, sec.shape[1] / 100))  # inches; about one screen pixel per voxel up to 800
        panel_h = float(np.clip(panel_w * depth / width, 0.5, 13.0))  # true proportions unless extreme
        n = len(panels)
        fig = _figure(n * panel_w + 0.75 + 0.6 * n, panel_h + 0.95)
        _margins(fig, left=0.75, right=0.15, top=0.4, bottom=0.55, wspace=0.6 / panel_w)
        axes = fig.subplots(1, n, squeeze=False)[0]
        limits = _grey_limits(*(p for _, p in panels))
        where = f"middle {'row' if lateral == 'x' else 'column'}"
        for ax, (label, section) in zip(axes, panels):
            _draw_section(ax, section, step, geo.z, geo.unit, limits,
                          f"{label} {lateral}z reslice, {where}, {len(section)} slices", lateral)
        written.append(_save(fig, out / name, dpi=max(100, sec.shape[1] / panel_w)))
    return written


def write_drift_plot(out_dir: str | os.PathLike[str]) -> Path:
    """Write drift.png from ``out_dir``/transforms.csv: translation, the fine stage's share, and confidence over slice."""
    out = Path(out_dir)
    cols = transform_columns(out / TRANSFORMS)
    if len(cols["slice"]) == 0:
        raise ValueError(f"{out / TRANSFORMS}: no slice aligned yet, no drift to draw")
    z = cols["slice"]
    fine = _fine_columns(cols)
    fig = _figure(9.0, 7.0 if fine else 5.0)
    _margins(fig, left=0.85, hspace=0.35)
    axes = fig.subplots(3 if fine else 2, 1, sharex=True)
    ax = axes[0]
    for name, colour in (("dx", "tab:blue"), ("dy", "tab:orange")):
        ax.plot(z, cols[name], color=colour, lw=1.2, label=f"{name} (final)")
        if _is_numeric(cols.get(f"coarse_{name}", np.array([]))):
            ax.plot(z, cols[f"coarse_{name}"], color=colour, lw=0.8, ls="--", alpha=0.7, label=f"coarse_{name}")
    ax.set_ylabel("shift applied (px)")
    ax.set_title("translation applied to each input slice (+dx right, +dy down)", fontsize=9)
    ax.legend(fontsize=7, ncols=4, loc="best")
    if fine:
        ax = axes[1]
        for label, values in fine.items():
            ax.plot(z, values, lw=0.9, label=label)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_ylabel("fine stage")
        ax.set_title("fine stage: beyond coarse (px), linear part − identity (×1000), residuals (px)", fontsize=9)
        ax.legend(fontsize=7, ncols=4, loc="best")
    ax = axes[-1]
    if _is_numeric(cols.get("confidence", np.array([]))):
        conf = np.where(np.isfinite(cols["confidence"]), cols["confidence"], np.nan)  # slice 0 has no neighbour: inf
        ax.plot(z, conf, color="tab:green", lw=0.9)
        if np.nanmin(conf) > 0 and np.nanmax(conf) > 20 * np.nanmin(conf):
            ax.set_yscale("log")
    ax.set_ylabel("confidence (PSR)")
    ax.set_xlabel("slice")
    for a in axes:
        a.grid(alpha=0.3)
        a.tick_params(labelsize=8)
    return _save(fig, out / "drift.png")


def _fine_columns(cols: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """The fine stage's numbers worth drawing: residual translation, linear deviations (x1000), extra parameters."""
    fine: dict[str, NDArray[Any]] = {}
    for name in ("dx", "dy"):
        if _is_numeric(cols.get(f"coarse_{name}", np.array([]))):
            d = cols[name] - cols[f"coarse_{name}"]
            if np.nanmax(np.abs(d)) > 0:
                fine[f"{name} − coarse"] = d
    for name, identity in (("a11", 1.0), ("a12", 0.0), ("a21", 0.0), ("a22", 1.0)):
        if _is_numeric(cols.get(name, np.array([]))):
            d = (cols[name] - identity) * 1000.0
            if np.nanmax(np.abs(d)) > 0:
                fine[f"{name} − {identity:g} (×1000)"] = d
    known = {"slice", "dx", "dy", "confidence", "coarse_dx", "coarse_dy", "fine_model", "a11", "a12", "a21", "a22"}
    for name, col in cols.items():  # further fine parameters in pixels (counts and the like would swamp the axis)
        if name not in known and name.endswith("_px") and _is_numeric(col):
            fine[name] = col
    return fine


def _alert_slices(slices: NDArray[Any], alerts: Sequence[Sequence[str]]) -> dict[str, NDArray[Any]]:
    by_kind: dict[str, list[float]] = {}
    for z, kinds in zip(slices, alerts):
        for kind in kinds:
            by_kind.setdefault(kind, []).append(float(z))
    return {k: np.asarray(v) for k, v in sorted(by_kind.items())}


def write_qc_plot(out_dir: str | os.PathLike[str], columns: Iterable[str] | None = None) -> Path:
    """Write qc.png from ``out_dir``/qc.csv: every numeric QC measure over slice, slices with alerts marked by kind."""
    out = Path(out_dir)
    cols, kinds = qc_columns(out)
    z = cols["slice"]
    names = [n for n in (columns or cols) if n not in ("slice", "alerts") and n in cols and _is_numeric(cols[n])]
    if not names:
        raise ValueError(f"{out / QC}: no numeric QC column to draw")
    alerts = _alert_slices(z, kinds)
    ncols = 2 if len(names) > 3 else 1
    nrows = -(-len(names) // ncols)
    legend_in = 0.35 * -(-len(alerts) // 4) if alerts else 0.0
    fig = _figure(9.0 if ncols == 2 else 8.0, 1.0 + legend_in + 1.45 * nrows)
    _margins(fig, left=0.6, top=0.65, bottom=0.45 + legend_in, hspace=0.45, wspace=0.2)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        ax.plot(z, cols[name], color="0.15", lw=0.8)
        ax.set_title(name, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        for kind, where in alerts.items():
            ax.vlines(where, 0, 1, transform=ax.get_xaxis_transform(), colors=_KIND_COLOURS.get(kind, "tab:red"),
                      lw=0.8, alpha=0.6, label=kind)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(names) - ncols): len(names)]:  # the lowest drawn panel of each column
        ax.set_xlabel("slice", fontsize=8)
        ax.xaxis.set_tick_params(labelbottom=True)
    n_alerts = sum(len(v) for v in alerts.values())
    title = f"live QC, {len(z)} slices, {n_alerts} alert{'s' if n_alerts != 1 else ''}"
    if alerts:
        handles = [axes[0].plot([], [], color=_KIND_COLOURS.get(k, "tab:red"), lw=2)[0] for k in alerts]
        fig.legend(handles, [f"{k} ({len(v)})" for k, v in alerts.items()], loc="lower center",
                   ncols=min(4, len(alerts)), fontsize=8)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig.get_size_inches()[1], va="top")
    return _save(fig, out / "qc.png")
