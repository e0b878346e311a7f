"""Per-cell uptake metrics of one confocal z-stack (issue 10, parts 1 and 2).

One call, :func:`quantify_stack`, turns a (C, Z, Y, X) stack into labelled
cells and the four numbers the study plots per cell: whether the cell took up
particles, particle area over cell area, the share of that particle area inside
endolysosomes, and endolysosomal volume over cell volume. Volumes are summed
plane by plane (area x step), never read off a projection, because a
projection makes every organelle as tall as the cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from ..protocol.analysis import Quantification
from . import segment as seg

__all__ = ["CellQuant", "ChannelRoles", "ImageQuant", "quantify_stack"]

PARTICLE_FALSE_ALARM = 0.01
"""Chance that noise alone yields a particle anywhere in a stack (what keeps untreated cells free of them)."""

ENDOLYSOSOME_RADIUS_UM = 0.5
"""The largest endolysosome's radius: how far from a particle the body holding it can peak."""

FAINT_SD = 10.0
"""Objects whose peak stands fewer noise SDs above the background than this are sized by their particles, not their
width: at this contrast a spot's width is uncertain by more than a small cluster adds to the point spread's."""


@dataclass(frozen=True)
class ChannelRoles:
    """Which channel name carries which stain; ``None`` where the image has no such channel.

    ``nuclei``: a nuclear stain, used only to seed the split of touching cells.
    """

    endolysosomes: str = "405"
    mitochondria: str = "488"
    particles: str | None = "639"
    nuclei: str | None = None


@dataclass
class CellQuant:
    """One segmented cell. Fractions are NaN where their denominator is empty (no particles, no z-stack)."""

    label: int
    centroid_um: tuple[float, float]  # x, y; origin at the centre of pixel (0, 0)
    area_um2: float
    volume_um3: float
    has_particles: bool
    particle_area_um2: float
    particle_area_fraction: float
    particle_in_endolysosome_fraction: float
    endolysosomal_volume_um3: float
    endolysosomal_volume_fraction: float
    touches_border: bool
    particle_signal_in_endolysosome_fraction: float = float("nan")


@dataclass
class ImageQuant:
    """Everything measured in one image: the cells (border cells included, flagged) and the masks behind them."""

    cells: list[CellQuant]
    excluded_at_border: int
    labels: NDArray[np.int32]  # (Y, X), 0 = background
    particles: NDArray[np.bool_]  # (Y, X), projection
    endolysosomes: NDArray[np.bool_]  # (Y, X), projection
    mip: dict[str, NDArray] = field(default_factory=dict)  # channel name -> (Y, X) maximum projection
    voxel_um: tuple[float, float, float] = (1.0, 1.0, 1.0)
    roles: ChannelRoles = field(default_factory=ChannelRoles)

    @property
    def measured(self) -> list[CellQuant]:
        """The cells that count: those the image border does not cut."""
        return [c for c in self.cells if not c.touches_border]


def _um(length_m: float) -> float:
    return float(length_m) * 1e6


def _channel(stack: NDArray, channels: list[str], name: str, role: str) -> NDArray:
    try:
        return stack[channels.index(name)]
    except ValueError:
        raise ValueError(
            f"channel {name!r} ({role}) is not in the image's channels {channels}; set ChannelRoles.{role} to one "
            f"of them" + (" or None" if role in ("particles", "nuclei") else "")
        ) from None


def _per_cell(labels: NDArray, mask: NDArray | None, n: int, weights: NDArray | None = None) -> NDArray[np.float64]:
    """Pixel count (or summed weights) of ``mask`` in each label 0..n."""
    lab = labels if mask is None else labels[mask]
    w = None if weights is None else (weights if mask is None else weights[mask])
    return np.bincount(lab.ravel(), weights=None if w is None else w.ravel(), minlength=n + 1)[: n + 1].astype(float)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 and np.isfinite(b) else float("nan")


def quantify_stack(
    stack: NDArray,
    channels: Sequence[str],
    voxel_um: tuple[float, float, float],
    settings: Quantification | None = None,
    roles: ChannelRoles = ChannelRoles(),
) -> ImageQuant:
    """Segment cells, particles and endolysosomes in one field and measure every cell.

    ``stack``: (C, Z, Y, X) or (C, Y, X) in the order of ``channels``;
    ``voxel_um``: (z, y, x) µm (z is unused for a single plane, whose volumes
    are NaN). Filter sizes and thresholds come from ``settings`` (the
    protocol's quantification block; its defaults are the study's).
    """
    s = settings if settings is not None else Quantification()
    channels = [str(c) for c in channels]
    stack = np.asarray(stack)
    if stack.ndim == 3:
        stack = stack[:, None]
    if stack.ndim != 4:
        raise ValueError(f"stack must be (C, Z, Y, X) or (C, Y, X), got shape {stack.shape}")
    if len(channels) != stack.shape[0]:
        raise ValueError(f"{len(channels)} channel names {channels} for a stack of {stack.shape[0]} channels")
    dz, py, px = (float(v) for v in voxel_um)
    n_z, h, w = stack.shape[1:]
    if min(py, px) <= 0 or (n_z > 1 and dz <= 0):
        raise ValueError(f"voxel_um must be positive (z, y, x) µm, got {voxel_um}")
    mips = {name: stack[k].max(0) for k, name in enumerate(channels)}
    endo = _channel(stack, channels, roles.endolysosomes, "endolysosomes")
    mito = _channel(stack, channels, roles.mitochondria, "mitochondria")
    part = _channel(stack, channels, roles.particles, "particles") if roles.particles is not None else None
    nuc = _channel(stack, channels, roles.nuclei, "nuclei") if roles.nuclei is not None else None

    b = seg.block_size_for(px)
    sigma_px = _um(s.gaussian_sigma) / px
    radius_blocks = _um(s.tophat_radius) / (b * px)

    # top-hat backgrounds (on blocks) are the cytoplasm; what stands above them are the puncta
    endo_bg = seg.opening_background(seg.block_mean(endo, b), radius_blocks)
    mito_bg = seg.opening_background(seg.block_mean(mito, b), radius_blocks)
    organelles = np.zeros((h, w), bool)
    for name, bg in ((roles.endolysosomes, endo_bg), (roles.mitochondria, mito_bg)):
        enhanced = seg.enhance_planes(mips[name], bg.max(0), b, sigma_px)
        organelles |= enhanced > seg.threshold_value(enhanced, s.organelle_threshold)
    nuclei = seg.block_mean(mips[roles.nuclei], b) if nuc is not None else None
    cells = seg.segment_cells([endo_bg, mito_bg], (h, w), b, s.cell_threshold, _um(s.min_cell_diameter) / px,
                              organelles, nuclei, radius_blocks,
                              noise_sd=[seg.pixel_noise(c[n_z // 2]) for c in (endo, mito)])
    labels = cells.labels
    n = int(labels.max())

    # endolysosomes, plane by plane where there are cells: Otsu over the cells' pixels of the enhanced projection,
    # the same threshold in every plane, so the projected mask is exactly the union of the plane masks
    y0, y1, x0, x1 = _cell_box(cells.coarse_labels, b, (h, w))
    endo_planes = seg.enhance_planes(endo[:, y0:y1, x0:x1], endo_bg[:, y0 // b:, x0 // b:], b, sigma_px)
    endo_enh = np.zeros((h, w), np.float32)
    endo_enh[y0:y1, x0:x1] = endo_planes.max(0)
    t_endo = seg.threshold_value(endo_enh[labels > 0], "otsu") if n else float("inf")
    endo_mask = endo_enh > t_endo
    endo_vox = np.zeros(n + 1)
    for plane in endo_planes:
        endo_vox += _per_cell(labels[y0:y1, x0:x1], plane > t_endo, n)

    # cells: volume from the per-plane cytoplasm masks (nuclei filled), on blocks
    if n_z > 1:
        cell_vox = np.zeros(n + 1)
        for plane in cells.cytoplasm:
            cell_vox += _per_cell(cells.coarse_labels, ndi.binary_fill_holes(plane > cells.threshold), n)
        volume = cell_vox * (b * px) * (b * py) * dz
        endo_volume = endo_vox * px * py * dz
    else:
        volume = endo_volume = np.full(n + 1, np.nan)

    # particles: half-maximum area in the projection; share in endolysosomes by area (pixels) and by signal (objects)
    if part is not None:
        block_px = max(int(round(_um(s.particle_block_size) / px)), 4)
        found = seg.find_particles(mips[roles.particles], sigma_px, block_px, s.particle_offset_sd)
        # an object must stand out of the noise in some plane, against every try noise had in the stack
        tries = n_z * h * w / (4 * np.pi * max(sigma_px, 0.5) ** 2)
        found = seg.keep_particles(found, seg.plane_significance(part, found.peak_yx, sigma_px)
                                   >= seg.significance_threshold(tries, PARTICLE_FALSE_ALARM))
        particles = found.signal
        reach = max(int(round(ENDOLYSOSOME_RADIUS_UM / px)), 1)
        inside = _in_endolysosomes(part, found, endo[:, y0:y1, x0:x1], endo_planes, (y0, x0), labels, sigma_px,
                                   seg.significance_threshold(tries, PARTICLE_FALSE_ALARM), reach)
        flux, flux_in = _particle_signal(part, found, inside, labels, block_px, n)
        # an object's area counts as inside when the object is (in 3D), not where its projection overlaps one
        particles_in = particles & np.concatenate([[False], inside])[found.regions]
        weight = _pixel_areas(found, np.pi * (_um(s.particle_diameter) / 2) ** 2 / (px * py))
    else:
        particles = particles_in = np.zeros((h, w), bool)
        flux = flux_in = np.zeros(n + 1)
        weight = np.zeros((h, w), np.float32)
    has_px = _per_cell(labels, particles, n)
    part_px = _per_cell(labels, particles, n, weight)
    part_in_px = _per_cell(labels, particles_in, n, weight)

    area_px = _per_cell(labels, None, n)
    yy, xx = np.indices((h, w), dtype=np.float64)
    cx = _per_cell(labels, None, n, xx) / np.maximum(area_px, 1) * px
    cy = _per_cell(labels, None, n, yy) / np.maximum(area_px, 1) * py
    border = np.zeros(n + 1, bool)
    border[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True

    nan = float("nan")
    out = []
    for i in range(1, n + 1):
        area = area_px[i] * px * py
        p_area = part_px[i] * px * py if part is not None else nan
        out.append(CellQuant(
            label=i,
            centroid_um=(float(cx[i]), float(cy[i])),
            area_um2=float(area),
            volume_um3=float(volume[i]),
            has_particles=bool(has_px[i] > 0),
            particle_area_um2=float(p_area),
            particle_area_fraction=_ratio(p_area, area),
            particle_in_endolysosome_fraction=_ratio(part_in_px[i], part_px[i]),
            endolysosomal_volume_um3=float(endo_volume[i]),
            endolysosomal_volume_fraction=_ratio(endo_volume[i], volume[i]),
            touches_border=bool(border[i]),
            particle_signal_in_endolysosome_fraction=_ratio(flux_in[i], flux[i]),
        ))
    return ImageQuant(
        cells=out,
        excluded_at_border=int(border[1:].sum()),
        labels=labels,
        particles=particles,
        endolysosomes=endo_mask,
        mip=mips,
        voxel_um=(dz, py, px),
        roles=roles,
    )


def _cell_box(coarse_labels: NDArray, b: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows y0:y1 and columns x0:x1 holding every cell, on block boundaries (empty when there is no cell)."""
    rows = np.flatnonzero(coarse_labels.any(1))
    cols = np.flatnonzero(coarse_labels.any(0))
    if len(rows) == 0:
        return 0, 0, 0, 0
    y1 = shape[0] if rows[-1] == coarse_labels.shape[0] - 1 else (rows[-1] + 1) * b
    x1 = shape[1] if cols[-1] == coarse_labels.shape[1] - 1 else (cols[-1] + 1) * b
    return int(rows[0] * b), int(y1), int(cols[0] * b), int(x1)


def _in_endolysosomes(
    part: NDArray, found: seg.Particles, endo: NDArray, endo_planes: NDArray, origin: tuple[int, int],
    labels: NDArray, sigma_px: float, min_sd: float, reach_px: int,
) -> NDArray[np.bool_]:
    """Per object: is it in an endolysosome? Judged in 3D, in the plane where the object is brightest.

    There, the endolysosome channel (top-hat, smoothed) must hold a maximum
    within ``reach_px`` (an endolysosome's radius) that stands ``min_sd`` noise
    SDs above the plane's local background, so a real body is there, and the
    object's peak must lie within that body's half maximum, its edge. Neither
    a projection (a free particle above an endolysosome overlaps it there) nor
    one global threshold (dim small endolysosomes fall below it, bright ones
    are cut short of their edge) can tell.
    """
    inside = np.zeros(len(found.peak_yx), bool)
    r, c = found.peak_yx[:, 0], found.peak_yx[:, 1]
    rr, cc = r - origin[0], c - origin[1]
    _, hp, wp = endo_planes.shape
    ok = np.flatnonzero((labels[r, c] > 0) & (rr >= 0) & (rr < hp) & (cc >= 0) & (cc < wp))
    if len(ok) == 0:
        return inside
    z = part[:, r, c].argmax(0)
    noise = np.array([seg.pixel_noise(p[::4]) for p in endo]) * seg.smoothing_gain(sigma_px)
    window = 2 * reach_px
    for i in ok:
        plane = endo_planes[z[i]]
        y, x = rr[i], cc[i]
        bg = float(np.median(plane[max(y - window, 0): y + window + 1, max(x - window, 0): x + window + 1]))
        top = float(plane[max(y - reach_px, 0): y + reach_px + 1, max(x - reach_px, 0): x + reach_px + 1].max()) - bg
        inside[i] = top > min_sd * noise[z[i]] and plane[y, x] - bg >= 0.5 * top
    return inside


def _pixel_areas(found: seg.Particles, particle_px: float) -> NDArray[np.float32]:
    """Area (pixels) each pixel of the particles' extent stands for: 1, except in faint objects.

    A faint spot (peak under ``FAINT_SD`` noise SDs) is one particle or a
    few, far smaller than the pixel it is drawn on, and too faint for its
    width to say so (a lone 55 nm particle covers a fifth of a 100 nm pixel;
    counted as its pixels it weighs six times its area, and the many free
    ones outweigh the packed ones in endolysosomes). It counts the cross-
    sections of its particles: as many as its peak holds the typical faint
    spot's, at least one, never more than its pixels.
    """
    weight = found.signal.astype(np.float32)
    m = len(found.peak_yx)
    if m == 0 or len(found.score) != m:
        return weight
    faint = found.score < FAINT_SD
    if not faint.any():
        return weight
    one = float(np.median(found.height[faint]))
    count = np.maximum(found.height / one, 1.0) if one > 0 else np.ones(m)
    extent = np.bincount(found.regions[found.signal], minlength=m + 1)[1:].astype(np.float64)
    per_pixel = np.ones(m + 1, np.float32)
    per_pixel[1:][faint] = np.minimum(particle_px * count[faint] / np.maximum(extent[faint], 1.0), 1.0)
    return weight * per_pixel[found.regions]


def _particle_signal(
    part: NDArray, found: seg.Particles, inside: NDArray[np.bool_], labels: NDArray, block_px: int, n: int,
) -> tuple[NDArray, NDArray]:
    """Particle signal per cell, all of it and the part in endolysosomes (objects ``inside``).

    Signal (the sum projection above its background) is proportional to the
    number of particles whatever their packing, so its share estimates the
    share of particles, which areas cannot: a lone 50 nm particle looks as big
    as the diffraction spot.
    """
    total = part.sum(0, dtype=np.float32)
    bg, _ = seg.robust_background(total, block_px)
    above = total - bg
    flux = _per_cell(labels, None, n, np.clip(above, 0, None) * (found.regions > 0))
    if len(found.peak_yx) == 0:
        return flux, np.zeros(n + 1)
    index = np.arange(1, len(found.peak_yx) + 1)
    obj_flux = np.clip(ndi.sum(above, found.regions, index), 0, None)
    owner = labels[found.peak_yx[:, 0], found.peak_yx[:, 1]]
    flux_in = np.bincount(owner, weights=obj_flux * inside, minlength=n + 1)[: n + 1]
    return flux, flux_in
