"""PNG overlays of EM slices with the light signals drawn on them: the check a person makes at a glance.

A registration's numbers say how well the droplets agree; the picture says
whether the result makes sense: BODIPY outlines lying on the dense round
droplets, LysoTracker on the mottled endolysosomes, particle dye on the dark
dots. Slices are drawn to physical scale with µm axes, so an anisotropic
reslice across planes is not stretched. Each figure is drawn on its own Agg
canvas (no pyplot state).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .blobs import Blobs

__all__ = ["channel_colour", "write_overlays"]

Voxel = tuple[float, float, float]

_COLOURS = (("488", "lime"), ("bodipy", "lime"), ("405", "cyan"), ("lyso", "cyan"), ("639", "magenta"),
            ("640", "magenta"), ("particle", "magenta"))
_OTHER = ("yellow", "orange", "white")
_DETECTED = "yellow"
_MAPPED = "red"
_CLUSTER = "orange"


def channel_colour(name: str, k: int = 0) -> str:
    """Droplets (488, BODIPY) green, endolysosomes (405, LysoTracker) cyan, particles (639) magenta."""
    key = name.lower()
    return next((colour for tag, colour in _COLOURS if tag in key), _OTHER[k % len(_OTHER)])


def write_overlays(folder: str | Path, em_volume: Any, em_voxel_um: Voxel,
                   lm_on_em: Mapping[str, Any] | None = None, *, droplets_em: Blobs | None = None,
                   mapped_lm_droplets: np.ndarray | None = None, clusters: Any = None,
                   planes: list[int] | None = None, n: int = 4,
                   levels: Mapping[str, float] | None = None) -> list[Path]:
    """Write ``n`` xy planes spread through the EM volume and one reslice across planes, as PNGs in ``folder``.

    ``lm_on_em``: LM channels already on the EM grid (name -> (Z, Y, X), see ``outputs.resample_to_em``), drawn as
    one contour each, at ``levels[name]`` or a level set from the channel's own bright tail. ``droplets_em``
    (detected EM droplets) are circled where the plane cuts them; ``mapped_lm_droplets`` (N, 3) EM µm (the LM
    droplets through the transform) are marked where they lie near the plane; ``clusters`` ((N, 3) EM µm, or
    anything with ``center_um``) are marked as squares. ``planes`` overrides the choice of xy planes; each picked
    plane is the one of its stretch that cuts the most droplets. Returns the PNG paths, xy planes first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    em_voxel = tuple(float(v) for v in em_voxel_um)
    nz, ny, nx = (int(s) for s in em_volume.shape)
    channels = dict(lm_on_em or {})
    for name, vol in channels.items():
        if tuple(vol.shape) != (nz, ny, nx):
            raise ValueError(f"lm_on_em[{name!r}] has shape {tuple(vol.shape)}; expected the EM grid {(nz, ny, nx)}")
    contour_levels = {name: (levels or {}).get(name) or _auto_level(vol) for name, vol in channels.items()}
    marks = _Marks(droplets_em, mapped_lm_droplets, _centres(clusters))
    if planes is None:
        planes = _pick_planes(nz, n, em_voxel[0], marks)
    paths = []
    for k in planes:
        if not 0 <= int(k) < nz:
            raise ValueError(f"plane {k} is outside the EM volume's {nz} planes")
        image = np.asarray(em_volume[int(k)])
        lm = {name: np.asarray(vol[int(k)]) for name, vol in channels.items()}
        title = f"EM plane {int(k)} (z = {int(k) * em_voxel[0]:.2f} µm)"
        paths.append(_draw(folder / f"overlay_xy_z{int(k):04d}.png", image, (em_voxel[1], em_voxel[2]), lm,
                           contour_levels, marks.section(axis=2, at=int(k) * em_voxel[0]), ("x (µm)", "y (µm)"), title))
    row = _pick_row(ny, em_voxel[1], marks)
    image = np.asarray(em_volume[:, row, :])
    lm = {name: np.asarray(vol[:, row, :]) for name, vol in channels.items()}
    title = f"EM reslice across planes at row {row} (y = {row * em_voxel[1]:.2f} µm)"
    paths.append(_draw(folder / f"overlay_xz_y{row:04d}.png", image, (em_voxel[0], em_voxel[2]), lm, contour_levels,
                       marks.section(axis=1, at=row * em_voxel[1], vertical=2), ("x (µm)", "z (µm)"), title))
    return paths


class _Marks:
    """The points drawn on slices, and which of them a given slice shows."""

    def __init__(self, droplets: Blobs | None, mapped: np.ndarray | None, clusters: np.ndarray | None) -> None:
        self.droplets = droplets if droplets is not None else Blobs.empty()
        self.mapped = np.zeros((0, 3)) if mapped is None else np.asarray(mapped, float).reshape(-1, 3)
        self.clusters = np.zeros((0, 3)) if clusters is None else clusters

    def count(self, axis: int, at: np.ndarray) -> np.ndarray:
        """How many detected droplets (or, lacking them, mapped ones) each of the slices at ``at`` µm cuts."""
        if len(self.droplets):
            c, r = self.droplets.center_um[:, axis], self.droplets.radius_um
        else:
            c, r = self.mapped[:, axis], np.full(len(self.mapped), 0.3)
        return (np.abs(at[:, None] - c[None, :]) < r[None, :]).sum(axis=1)

    def section(self, axis: int, at: float, vertical: int = 1) -> dict[str, Any]:
        """Circles, mapped points and clusters near the slice at ``at`` µm along ``axis``, in (x, vertical) µm."""
        d = self.droplets
        depth = np.abs(d.center_um[:, axis] - at)
        cut = depth < d.radius_um
        circles = [(c[0], c[vertical], float(np.sqrt(r ** 2 - dz ** 2)))
                   for c, r, dz in zip(d.center_um[cut], d.radius_um[cut], depth[cut])]
        near = np.abs(self.mapped[:, axis] - at) < 0.3
        close = np.abs(self.clusters[:, axis] - at) < 0.2
        return {"circles": circles, "mapped": self.mapped[near][:, [0, vertical]],
                "clusters": self.clusters[close][:, [0, vertical]]}


def _centres(clusters: Any) -> np.ndarray | None:
    if clusters is None:
        return None
    centres = getattr(clusters, "center_um", clusters)
    return np.asarray(centres, float).reshape(-1, 3)


def _pick_planes(nz: int, n: int, dz: float, marks: _Marks) -> list[int]:
    """``n`` planes, one per equal stretch of the volume: the one cutting the most droplets (the middle if none)."""
    n = max(1, min(n, nz))
    edges = np.linspace(0, nz, n + 1).round().astype(int)
    picked = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ks = np.arange(lo, max(hi, lo + 1))
        counts = marks.count(2, ks * dz)
        middle = np.abs(ks - (lo + hi - 1) / 2)
        picked.append(int(ks[np.lexsort((middle, -counts))[0]]))
    return picked


def _pick_row(ny: int, dy: float, marks: _Marks) -> int:
    rows = np.arange(ny)
    counts = marks.count(1, rows * dy)
    return int(rows[np.lexsort((np.abs(rows - (ny - 1) / 2), -counts))[0]])


def _auto_level(volume: Any) -> float:
    """A contour level between the channel's background and its brightest objects, from a sample of planes."""
    nz = volume.shape[0]
    sample = np.concatenate([np.asarray(volume[k], np.float32).ravel()[::3]
                             for k in np.unique(np.linspace(0, nz - 1, min(nz, 24)).round().astype(int))])
    sample = sample[sample > 0]  # zero: outside the light stack
    if not sample.size:
        return 1.0
    background, bright = np.percentile(sample, (50, 99.9))
    return float(background + 0.3 * max(bright - background, 1e-6))


def _draw(path: Path, image: np.ndarray, voxel_vh: tuple[float, float], lm: Mapping[str, np.ndarray],
          levels: Mapping[str, float], marks: dict[str, Any], labels: tuple[str, str], title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle

    dv, dh = voxel_vh
    rows, cols = image.shape
    width_um, height_um = cols * dh, rows * dv
    axes_w = 7.0  # inches; legend to the right, fixed margins in inches around
    axes_h = float(np.clip(axes_w * height_um / width_um, 1.0, 10.0))
    left, right, bottom, top = 0.7, 2.1, 0.6, 0.45
    fig = Figure(figsize=(left + axes_w + right, bottom + axes_h + top))
    FigureCanvasAgg(fig)
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, bottom / fh, axes_w / fw, axes_h / fh))
    lo, hi = _grey_limits(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
              extent=(-dh / 2, (cols - 0.5) * dh, (rows - 0.5) * dv, -dv / 2))
    h_axis, v_axis = np.arange(cols) * dh, np.arange(rows) * dv
    handles = []
    for k, (name, plane) in enumerate(lm.items()):
        colour = channel_colour(name, k)
        level = levels[name]
        if np.nanmax(plane) > level > np.nanmin(plane):
            ax.contour(h_axis, v_axis, plane, levels=[level], colors=[colour], linewidths=0.8)
        handles.append(Line2D([], [], color=colour, lw=1.2, label=f"LM {name}"))
    ring = 0.012 * max(width_um, height_um)  # a droplet smaller than this is ringed at this size, to be seen
    for x, v, r in marks["circles"]:  # a ring just outside the droplet's section, so its edge stays visible
        ax.add_patch(Circle((x, v), max(1.5 * r, ring), fill=False, edgecolor=_DETECTED, lw=0.8))
    if marks["circles"]:
        handles.append(Line2D([], [], color=_DETECTED, marker="o", mfc="none", lw=0, label="EM droplet, detected"))
    if len(marks["mapped"]):
        ax.plot(marks["mapped"][:, 0], marks["mapped"][:, 1], "+", color=_MAPPED, ms=5, mew=1.0)
        handles.append(Line2D([], [], color=_MAPPED, marker="+", lw=0, ms=6, label="LM droplet, mapped"))
    if len(marks["clusters"]):
        ax.plot(marks["clusters"][:, 0], marks["clusters"][:, 1], "s", mfc="none", color=_CLUSTER, ms=4, mew=0.7)
        handles.append(Line2D([], [], color=_CLUSTER, marker="s", mfc="none", lw=0, label="particle cluster"))
    ax.set_xlim(-dh / 2, (cols - 0.5) * dh)
    ax.set_ylim((rows - 0.5) * dv, -dv / 2)
    ax.set_aspect("equal")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=((left + axes_w + 0.1) / fw, 1 - top / fh),
                   fontsize=8, frameon=False)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)
    return path


def _grey_limits(image: np.ndarray) -> tuple[float, float]:
    values = np.asarray(image, np.float32).ravel()
    if not values.size:
        return 0.0, 1.0
    lo, hi = np.percentile(values, (0.5, 99.5))
    return float(lo), float(max(hi, lo + 1))
