"""Where each particle cluster sits: packed in an endolysosome, or free in the cytoplasm.

Two independent kinds of evidence, both reported:

- **EM enclosure.** An endolysosome is a membrane-bounded body whose content
  is denser and more mottled than the cytoplasm. Around a cluster, the
  particles are masked out and the rest is smoothed (a normalised
  convolution, so the masked particles do not bleed into it); the voxels
  within ``inner_um`` of the cluster's particles, between them and just
  outside, are compared with the cytoplasm level (the median of a shell
  0.3-0.6 µm beyond the cluster's envelope). ``em_enclosure_score`` is the share of those near voxels denser
  than the cytoplasm by ``body_contrast``: near 1 for a cluster that fills
  an endolysosome, near 0 in plain cytoplasm, partial beside an organelle.
  A body that does not end within the reference distance is not an
  enclosure (the score is scaled down by how much of the surroundings is as
  dense). The membrane itself is not traced: at 20 nm voxels it is fainter
  than the texture; a dense body that ends is taken as bounded.
- **LysoTracker** (light, resampled onto the EM grid): the signal at the
  cluster's centre against :func:`lysotracker_threshold`. At light resolution a
  free cluster beside an endolysosome glows too, so it decides only what the
  EM leaves open.

The call: EM when its score is clear of ``em_threshold`` by ``em_margin``;
otherwise LysoTracker when there is one; otherwise the EM score's side of
the threshold. Each row says which, in ``reason``. (On the specimen, clusters
in the cytoplasm score below 0.1 and those in endolysosomes mostly above
0.65; a cluster beside an organelle lands in between.)
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .particles_detect import (
    LINE_UM,
    PARTICLE_DIAMETER_UM,
    WORKING_VOXEL_UM,
    ParticleClusters,
    density_scale,
    particle_mask,
    read_box,
)
from .working import bin_factors, binned_origin_um

__all__ = ["CLUSTER_COLUMNS", "ClusterTable", "classify_clusters", "em_enclosure", "lysotracker_threshold"]

Progress = Callable[[int, int], None]
Voxel = tuple[float, float, float]

CLUSTER_COLUMNS = ("id", "x_um", "y_um", "z_um", "volume_um3", "n_particles_est", "in_endolysosome",
                   "em_enclosure_score", "lysotracker", "particle_signal", "reason")


@dataclass
class ClusterTable:
    """One row per particle cluster of a cell: where, how much, which compartment and why."""

    center_um: NDArray[np.float64]  # (N, 3) x y z, EM frame
    volume_um3: NDArray[np.float64]
    n_particles_est: NDArray[np.int64]
    in_endolysosome: NDArray[np.bool_]
    em_enclosure_score: NDArray[np.float64]
    lysotracker: NDArray[np.float64]  # nan where no LysoTracker channel was given
    particle_signal: NDArray[np.float64]  # nan where no particle channel was given
    reason: list[str] = field(default_factory=list)
    lysotracker_threshold: float = float("nan")

    def __len__(self) -> int:
        return len(self.center_um)

    def rows(self) -> list[dict[str, Any]]:
        """The table as dicts keyed by :data:`CLUSTER_COLUMNS`."""
        out = []
        for k in range(len(self)):
            x, y, z = (float(v) for v in self.center_um[k])
            out.append({"id": k, "x_um": x, "y_um": y, "z_um": z, "volume_um3": float(self.volume_um3[k]),
                        "n_particles_est": int(self.n_particles_est[k]),
                        "in_endolysosome": bool(self.in_endolysosome[k]),
                        "em_enclosure_score": float(self.em_enclosure_score[k]),
                        "lysotracker": float(self.lysotracker[k]), "particle_signal": float(self.particle_signal[k]),
                        "reason": self.reason[k]})
        return out

    def write_csv(self, path: str | Path) -> Path:
        """Write the rows (numbers to 0.1 nm or 4 digits, nan as empty); returns the path."""
        path = Path(path)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CLUSTER_COLUMNS)
            for row in self.rows():
                writer.writerow([_cell(row[c]) for c in CLUSTER_COLUMNS])
        return path

    def summary(self) -> dict[str, Any]:
        """The cell's totals: clusters and particle volume in endolysosomes and in the cytoplasm."""
        inside = self.in_endolysosome
        vol = float(self.volume_um3.sum())
        n = len(self)
        return {
            "clusters": n,
            "in_endolysosome": int(inside.sum()),
            "in_cytoplasm": int(n - inside.sum()),
            "share_in_endolysosomes": float(inside.mean()) if n else float("nan"),
            "particle_volume_um3": vol,
            "particle_volume_in_endolysosomes_um3": float(self.volume_um3[inside].sum()),
            "particle_volume_share_in_endolysosomes": float(self.volume_um3[inside].sum() / vol) if vol > 0
            else float("nan"),
            "particles_est": int(self.n_particles_est.sum()),
        }


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not np.isfinite(value):
            return ""
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.4g}"
    return value


@dataclass(frozen=True)
class _Crop:
    """A box of the working grid around one cluster: density, particle mask, and where the cluster is in it."""

    density: NDArray[np.float32]
    particles: NDArray[np.bool_]
    own: NDArray[np.bool_]  # the cluster's own particle voxels


def em_enclosure(density: NDArray[np.float32], particles: NDArray[np.bool_], own: NDArray[np.bool_],
                 voxel_um: Voxel, *, inner_um: float = 0.07, reference_um: tuple[float, float] = (0.3, 0.6),
                 body_contrast: float = 0.05, smooth_um: float = 0.03) -> float:
    """EM enclosure score (0..1) of the cluster ``own`` in a crop; see the module docstring. nan if unmeasurable.

    ``reference_um``: the cytoplasm shell, as distances beyond the cluster's envelope (its own voxels' reach
    from their centre).
    """
    voxel = np.asarray(voxel_um, float)
    where = np.argwhere(own)
    if len(where) == 0:
        return float("nan")
    keep = ~ndimage.binary_dilation(particles, np.ones((1, 3, 3), bool))
    sigma = smooth_um / voxel
    weight = ndimage.gaussian_filter(keep.astype(np.float32), sigma, mode="nearest")
    matrix = ndimage.gaussian_filter(np.where(keep, density, 0).astype(np.float32), sigma, mode="nearest")
    matrix /= np.maximum(weight, 1e-3)
    # near: within inner_um of the cluster's own voxels (distance map only over their box)
    pad = np.ceil(inner_um / voxel).astype(int) + 1
    lo = np.maximum(where.min(axis=0) - pad, 0)
    hi = np.minimum(where.max(axis=0) + pad + 1, np.array(own.shape))
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    near = np.zeros(own.shape, bool)
    near[box] = ndimage.distance_transform_edt(~own[box], sampling=voxel) <= inner_um
    near &= keep
    # far: a shell around the envelope
    centre = where.mean(axis=0) * voxel
    grid = np.ogrid[tuple(slice(0, n) for n in own.shape)]
    r2 = sum((g * v - c) ** 2 for g, v, c in zip(grid, voxel, centre))
    reach = float(np.sqrt(((where * voxel - centre) ** 2).sum(axis=1).max()))
    far = keep & (r2 >= (reach + reference_um[0]) ** 2) & (r2 <= (reach + reference_um[1]) ** 2)
    if near.sum() < 4 or far.sum() < 20:
        return float("nan")
    level = float(np.median(matrix[far]))
    threshold = level + body_contrast
    inside = float(np.mean(matrix[near] > threshold))
    dense_around = float(np.mean(matrix[far] > threshold))
    return inside * (1.0 - dense_around)


def _crop(volume: Any, to_density: Callable, factors: tuple[int, int, int], voxel: NDArray, origin_xyz: NDArray,
          shape: tuple[int, int, int], centre_xyz: NDArray, radius_um: float, outer_um: float,
          settings: dict[str, float]) -> _Crop:
    """Density and particles in a box of ``radius_um + outer_um`` around one cluster, on the working grid."""
    centre = (np.asarray(centre_xyz, float) - origin_xyz)[::-1] / voxel  # z y x working index
    half = (radius_um + outer_um) / voxel
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, np.array(shape))
    dens = read_box(volume, to_density, factors, lo, hi)
    mask, _ = particle_mask(dens, tuple(voxel), diameter_um=settings["diameter_um"], min_level=settings["min_level"],
                            min_contrast=settings["min_contrast"], line_um=settings["line_um"])
    grid = np.meshgrid(*[(np.arange(a, b) - c) * v for a, b, c, v in zip(lo, hi, centre, voxel)], indexing="ij")
    near = sum(g * g for g in grid) <= (radius_um + 0.5 * settings["diameter_um"]) ** 2
    return _Crop(dens, mask, mask & near)


def _sample(channel: NDArray | None, points_xyz: NDArray, voxel_um: Voxel) -> NDArray[np.float64]:
    """Trilinear samples of a channel on the EM grid at EM-frame points; nan without a channel."""
    if channel is None:
        return np.full(len(points_xyz), np.nan)
    idx = (np.asarray(points_xyz, float)[:, ::-1] / np.asarray(voxel_um, float)).T
    return ndimage.map_coordinates(np.asarray(channel, np.float32), idx, order=1, mode="nearest").astype(float)


def lysotracker_threshold(lyso_on_em: NDArray) -> float:
    """The LysoTracker level above which a place counts as positive.

    Half-way, on a log scale, from the volume's usual level to its bright tail (median and 99.5th percentile of
    the voxels the light stack reaches): endolysosomes are a few per cent of the volume and tens of times
    brighter than the cytoplasm, so the tail is theirs however many there are.
    """
    values = np.asarray(lyso_on_em[:: max(1, len(lyso_on_em) // 32)], np.float32).ravel()
    values = values[values > 0]
    if values.size == 0:
        return float("nan")
    base, top = np.percentile(values, [50, 99.5])
    return float(np.sqrt(base * top))


def classify_clusters(
    clusters: ParticleClusters,
    em_volume: Any,
    em_voxel_um: Voxel,
    *,
    lyso_on_em: NDArray | None = None,
    particle_on_em: NDArray | None = None,
    dense_is_dark: bool = True,
    grey_range: tuple[float, float] | None = None,
    em_threshold: float = 0.4,
    em_margin: float = 0.15,
    outer_um: float = 0.6,
    diameter_um: float = PARTICLE_DIAMETER_UM,
    min_level: float = 0.72,
    min_contrast: float = 0.28,
    line_um: float = LINE_UM,
    working_voxel_um: Voxel = WORKING_VOXEL_UM,
    progress: Progress | None = None,
) -> ClusterTable:
    """Classify each detected cluster as in an endolysosome or in the cytoplasm; one table row per cluster.

    ``lyso_on_em`` / ``particle_on_em``: the LysoTracker and particle-dye channels already resampled onto the EM
    grid (the shape of ``em_volume``), or None. Detection settings must match those given to
    :func:`~.particles_detect.detect_clusters`, since the particles are masked out again around each cluster.
    """
    n = len(clusters)
    shape_in = tuple(int(s) for s in np.shape(em_volume))
    for name, channel in (("lyso_on_em", lyso_on_em), ("particle_on_em", particle_on_em)):
        if channel is not None and tuple(np.shape(channel)) != shape_in:
            raise ValueError(f"{name} has shape {tuple(np.shape(channel))}; it must be resampled onto the EM grid "
                             f"{shape_in} (outputs.resample_to_em)")
    voxel_in = np.asarray(em_voxel_um, float)
    factors = bin_factors(tuple(voxel_in), working_voxel_um)
    voxel = voxel_in * np.array(factors)
    origin_xyz = binned_origin_um(tuple(voxel_in), working_voxel_um)
    shape = tuple(s // f for s, f in zip(shape_in, factors))
    to_density = density_scale(em_volume, dense_is_dark, grey_range)
    settings = {"diameter_um": diameter_um, "min_level": min_level, "min_contrast": min_contrast, "line_um": line_um}
    score = np.full(n, np.nan)
    for k in range(n):
        crop = _crop(em_volume, to_density, factors, voxel, origin_xyz, shape, clusters.center_um[k],
                     float(clusters.radius_um[k]), outer_um, settings)
        score[k] = em_enclosure(crop.density, crop.particles, crop.own, tuple(voxel))
        if progress is not None:
            progress(k + 1, n)
    lyso = _sample(lyso_on_em, clusters.center_um, em_voxel_um)
    signal = _sample(particle_on_em, clusters.center_um, em_voxel_um)
    threshold = lysotracker_threshold(lyso_on_em) if lyso_on_em is not None else float("nan")
    calls, reasons = _decide(score, lyso, threshold, em_threshold, em_margin)
    return ClusterTable(clusters.center_um.copy(), clusters.volume_um3.copy(), clusters.n_particles_est.copy(),
                        calls, score, lyso, signal, reasons, threshold)


def _decide(score: NDArray, lyso: NDArray, threshold: float, em_threshold: float, margin: float
            ) -> tuple[NDArray[np.bool_], list[str]]:
    """The combined call and its reason for every cluster (see the module docstring)."""
    calls = np.zeros(len(score), bool)
    reasons = []
    for k, (s, lt) in enumerate(zip(score, lyso)):
        has_lm = np.isfinite(lt) and np.isfinite(threshold)
        lm_pos = bool(has_lm and lt >= threshold)
        lm_text = (f"LysoTracker {'positive' if lm_pos else 'negative'} ({lt:.0f} vs {threshold:.0f})" if has_lm
                   else "no LysoTracker")
        if np.isfinite(s) and abs(s - em_threshold) >= margin:
            calls[k] = s >= em_threshold
            em_text = (f"EM: enclosed in a dense membrane-bounded body (score {s:.2f})" if calls[k]
                       else f"EM: in plain cytoplasm (score {s:.2f})")
            agree = "" if not has_lm else ("; " + lm_text + (" agrees" if lm_pos == calls[k] else ", overruled"))
            reasons.append(em_text + agree)
        elif has_lm:
            calls[k] = lm_pos
            em_text = "EM unclear" + (f" (score {s:.2f})" if np.isfinite(s) else " (too near the volume's edge)")
            reasons.append(f"{em_text}; {lm_text} decides")
        else:
            calls[k] = bool(np.isfinite(s) and s >= em_threshold)
            em_text = "EM unclear" + (f" (score {s:.2f})" if np.isfinite(s) else " (too near the volume's edge)")
            reasons.append(f"{em_text}, no LysoTracker: {'endolysosome' if calls[k] else 'cytoplasm'} by EM alone")
    return calls, reasons
