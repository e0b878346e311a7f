"""The whole correlation of a confocal stack with an aligned EM volume: detect, register, place the particles, write.

This is what ``clemflow correlate`` and the end of a run call. Each step can
also be used alone (see the package docstring); here they are chained with
the settings of the protocol's ``correlation`` section and everything a
person checks is written to one folder:

- ``transform.json`` (4x4, LM µm -> EM µm), ``landmarks.csv``;
- ``lm_droplets.csv`` and ``em_droplets.csv``, every detection, matched or not;
- ``lm_on_em.ome.tif``: the confocal channels resampled onto the EM grid;
- ``clusters.csv`` and ``cell_summary.json``: particle clusters, endolysosome or cytoplasm;
- ``overlay_*.png``: EM slices with the light signals drawn as contours.

When too few droplets agree nothing but ``refused.json`` (the reason and the
detections) is written, and :class:`CorrelationRefused` is raised.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..protocol.analysis import Correlation
from .blobs import Blobs
from .detect_em import detect_em_droplets
from .detect_lm import detect_lm_droplets
from .inputs import ElectronVolume, LightStack
from .merge import merge_touching
from .register import CorrelationRefused, Registration, register_points
from .working import binned_origin_um, binned_volume

__all__ = ["Correlated", "correlate", "write_blobs"]

Progress = Callable[[str, int, int], None]  # (step, done, total)

DROPLET_VOXEL_UM = (0.1, 0.05, 0.05)
"""(z, y, x) voxel the EM droplet detection works at: droplets are 0.1-1 µm."""
PARTICLE_VOXEL_UM = (0.04, 0.02, 0.02)
"""Voxel the particle-cluster detection works at (finer: particles are 50-60 nm)."""
PARTICLE_MAX_PIXEL_UM = 0.03
"""Coarser EM pixels do not resolve 50-60 nm particles: the clusters are not looked for."""


@dataclass
class Correlated:
    """What one correlation found and where it was written."""

    registration: Registration
    lm_droplets: Blobs
    em_droplets: Blobs
    clusters: Any = None  # particles.ClusterTable
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _shifted(blobs: Blobs, origin_um: np.ndarray) -> Blobs:
    return Blobs(blobs.center_um + origin_um, blobs.radius_um, blobs.score)


def _to_binned(matrix: np.ndarray, em: ElectronVolume, target: tuple[float, float, float]) -> np.ndarray:
    """LM µm -> the µm of the binned EM grid (its voxel 0 sits half a bin in from the full grid's)."""
    shift = np.eye(4)
    shift[:3, 3] = -binned_origin_um(em.voxel_um, target)
    return shift @ matrix


def write_blobs(path: Path, blobs: Blobs) -> Path:
    """One row per detected droplet: index, x_um, y_um, z_um, radius_um, score."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "x_um", "y_um", "z_um", "radius_um", "score"])
        for i, (c, r, s) in enumerate(zip(blobs.center_um, blobs.radius_um, blobs.score)):
            w.writerow([i, f"{c[0]:.4f}", f"{c[1]:.4f}", f"{c[2]:.4f}", f"{r:.4f}", f"{s:.3f}"])
    return path


ROLES = {"488": ("488", "BODIPY", 1), "405": ("405", "LysoTracker", 0), "639": ("639", "Cy5", 2)}
"""Where each stain is looked for in a light stack: by channel name, stain, then the usual index."""


def _channel_index(lm: LightStack, role: str) -> int | None:
    """Index of the channel that holds ``role`` (a key of :data:`ROLES`), or None when the stack has none."""
    for name in ROLES[role]:
        try:
            return lm.index(name)
        except (KeyError, ValueError, IndexError):
            continue
    return None


def correlate(lm: LightStack, em: ElectronVolume, out: str | Path, settings: Correlation | None = None, *,
              lm_channel: str | int | None = None, particles: bool = True, overlays: bool = True,
              progress: Progress | None = None) -> Correlated:
    """Register ``lm`` to ``em`` on lipid droplets and write the results into ``out``.

    Raises :class:`CorrelationRefused` (after writing ``refused.json``) when fewer than
    ``settings.min_inliers`` droplets agree.
    """
    from .outputs import write_landmarks, write_lm_on_em, write_transform

    s = settings or Correlation()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda *_: None)
    channel = lm_channel if lm_channel is not None else s.lm_channel

    # -- droplets in both modalities, in physical µm of each ---------------------------------------------
    lm_droplets = detect_lm_droplets(np.asarray(lm.channel(channel)), lm.voxel_um)
    step("light droplets", 1, 1)
    volume, voxel = binned_volume(em.data, em.voxel_um, DROPLET_VOXEL_UM,
                                  progress=lambda k, n: step("binning the EM volume", k, n))
    em_raw = detect_em_droplets(volume, voxel, dense_is_dark=em.dense_is_dark)
    em_droplets = _shifted(merge_touching(em_raw), binned_origin_um(em.voxel_um, DROPLET_VOXEL_UM))
    step("EM droplets", 1, 1)
    files = [write_blobs(out / "lm_droplets.csv", lm_droplets), write_blobs(out / "em_droplets.csv", em_droplets)]

    # -- registration ------------------------------------------------------------------------------------
    try:
        reg = register_points(lm_droplets.center_um, em_droplets.center_um, model=s.model,
                              min_inliers=s.min_inliers, max_residual_um=float(s.max_residual) * 1e6)
    except CorrelationRefused as refused:
        (out / "refused.json").write_text(json.dumps({
            "reason": refused.reason, "lm_droplets": len(lm_droplets), "em_droplets": len(em_droplets),
            "min_inliers": s.min_inliers, "lm": str(lm.path), "em": str(em.path)}, indent=2), encoding="utf-8")
        raise
    step("registration", 1, 1)
    files.append(write_transform(out / "transform.json", reg, lm=lm, em=em,
                                 extra={"lm_droplets": len(lm_droplets), "em_droplets": len(em_droplets)},
                                 channel=str(channel)))
    files.append(write_landmarks(out / "landmarks.csv", lm_droplets, em_droplets, reg))
    # on the droplet grid (about 50 nm): the light channels gain nothing from a finer one
    lm_on_em = write_lm_on_em(out / "lm_on_em.ome.tif", lm, _to_binned(reg.matrix, em, DROPLET_VOXEL_UM),
                              tuple(volume.shape), voxel)
    files.append(lm_on_em)
    step("light channels on the EM grid", 1, 1)
    result = Correlated(reg, lm_droplets, em_droplets, files=files)

    if particles and em.voxel_um[2] > PARTICLE_MAX_PIXEL_UM:
        result.notes.append(f"particle clusters not analysed: EM pixels of {em.voxel_um[2] * 1000:.0f} nm do not resolve "
                            f"50-60 nm particles (needs {PARTICLE_MAX_PIXEL_UM * 1000:.0f} nm or finer)")
    elif particles:
        result.clusters = _particles(lm, em, reg, out, files, step)
    if overlays:
        written = tifffile.memmap(lm_on_em, mode="r")
        written = written[None] if written.ndim == 3 else written  # a one-channel stack reads back as (Z, Y, X)
        files.extend(_overlays(lm, written, out, volume, voxel, em, reg, result))
        step("overlays", 1, 1)
    return result


def _particles(lm: LightStack, em: ElectronVolume, reg: Registration, out: Path, files: list[Path],
               step: Progress) -> Any:
    """Particle clusters in the EM, each with its EM context and the light signals at its place."""
    from .outputs import resample_to_em
    from .particles import classify_clusters, detect_clusters

    fine, fine_voxel = binned_volume(em.data, em.voxel_um, PARTICLE_VOXEL_UM,
                                     progress=lambda k, n: step("EM volume for particles", k, n))
    clusters = detect_clusters(fine, fine_voxel, dense_is_dark=em.dense_is_dark)
    matrix = _to_binned(reg.matrix, em, PARTICLE_VOXEL_UM)
    on_em: dict[str, np.ndarray | None] = {}
    for key, role in (("lyso", "405"), ("particle", "639")):
        c = _channel_index(lm, role)
        on_em[key] = None if c is None else resample_to_em(lm.data[c], lm.voxel_um, matrix, fine.shape, fine_voxel)
    table = classify_clusters(clusters, fine, fine_voxel, lyso_on_em=on_em["lyso"], particle_on_em=on_em["particle"],
                              dense_is_dark=em.dense_is_dark)
    # back to the EM volume's own frame (the binned grid's voxel 0 sits half a bin in)
    table = dataclasses.replace(table, center_um=table.center_um + binned_origin_um(em.voxel_um, PARTICLE_VOXEL_UM))
    files.append(table.write_csv(out / "clusters.csv"))
    summary = out / "cell_summary.json"
    summary.write_text(json.dumps(table.summary(), indent=2, default=float), encoding="utf-8")
    files.append(summary)
    step("particle clusters", 1, 1)
    return table


def _overlays(lm: LightStack, lm_on_em: np.ndarray, out: Path, volume: np.ndarray, voxel: tuple[float, float, float],
              em: ElectronVolume, reg: Registration, result: Correlated) -> list[Path]:
    """EM planes with the light channels as contours; ``lm_on_em`` (C, Z, Y, X) is the resampled stack just written."""
    from .models import apply
    from .overlays import write_overlays

    origin = binned_origin_um(em.voxel_um, DROPLET_VOXEL_UM)
    matrix = _to_binned(reg.matrix, em, DROPLET_VOXEL_UM)
    channels = {role: _channel_index(lm, role) for role in ROLES}
    on_em = {role: np.asarray(lm_on_em[c]) for role, c in channels.items() if c is not None}
    return write_overlays(out, volume, voxel, on_em,
                          droplets_em=_shifted(result.em_droplets, -origin),
                          mapped_lm_droplets=apply(matrix, result.lm_droplets.center_um))
