"""Nanoparticle clusters in an aligned FIB-SEM volume: the densest small dots, grouped by proximity.

The particles (50-60 nm) are denser than anything the stain makes, but at the
20 nm voxels of a binned run a particle is a core of a few voxels in one or
two planes, and the mottled content of endolysosomes has specks almost as
dark. A voxel is taken as particle material when, after smoothing at about a
fifth of the particle diameter (noise down, a particle kept):

- it is **dense** (``min_level`` on the 0..1 density scale, 1 = the densest
  grey the data type can show), and
- it stands **above its surroundings** by ``min_contrast``: the surroundings
  are the largest of three line openings (a few particle diameters along z,
  ``line_um`` in the plane), which keep sheets such as the block's coating
  and large bodies but drop particles, alone or packed in a cluster.

Connected voxels form a *dot*; a dot counts only if it holds a *core*: at
least ``core_voxels`` touching voxels at ``core_level`` or more before any
smoothing. A particle cut by a plane has one; a speck of endolysosome
texture reaches that level in single voxels, rarely in touching pairs.
Dots whose edges lie within ``link_um`` of each other form one *cluster*.

The volume is read ``chunk_planes`` planes at a time (with a margin for the
filters), so a whole cell at 20 nm fits in memory; only the particle voxels
are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .working import bin_factors, binned_origin_um

__all__ = ["ParticleClusters", "density_scale", "detect_clusters", "particle_mask"]

Progress = Callable[[int, int], None]
Voxel = tuple[float, float, float]

PARTICLE_DIAMETER_UM = 0.055
RING_UM = 0.07
"""Outer radius of the ring that tells a lone dot's surroundings."""
LINE_UM = 0.8
"""In-plane length of the background lines: more than the widest cluster packed in an endolysosome."""
WORKING_VOXEL_UM = (0.04, 0.02, 0.02)
"""Finer voxels are mean-binned towards this (z, y, x): a particle stays a few voxels across, noise drops."""


@dataclass(frozen=True, eq=False)
class ParticleClusters:
    """Detected clusters: centres ``[x, y, z]`` µm (origin at the centre of voxel 0, 0, 0) and their size.

    ``volume_um3`` is the particle material, calibrated so that an isolated particle counts as one sphere of the
    nominal diameter; ``n_particles_est`` the same in particles; ``peak`` the densest smoothed voxel (0..1 scale);
    ``radius_um`` the envelope (largest reach of the cluster's dots from its centre).
    """

    center_um: NDArray[np.float64]  # (N, 3) x y z
    volume_um3: NDArray[np.float64]  # (N,)
    n_particles_est: NDArray[np.int64]  # (N,)
    peak: NDArray[np.float64]  # (N,)
    radius_um: NDArray[np.float64]  # (N,)

    def __post_init__(self) -> None:
        c = np.asarray(self.center_um, float).reshape(-1, 3)
        object.__setattr__(self, "center_um", c)
        for name, kind in (("volume_um3", float), ("n_particles_est", np.int64), ("peak", float), ("radius_um", float)):
            value = np.asarray(getattr(self, name), kind).reshape(-1)
            if len(value) != len(c):
                raise ValueError(f"ParticleClusters.{name} has {len(value)} rows; center_um has {len(c)}")
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.center_um)

    @classmethod
    def empty(cls) -> "ParticleClusters":
        return cls(np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))

    def subset(self, which: NDArray) -> "ParticleClusters":
        """The clusters picked by a boolean mask or an index array."""
        return ParticleClusters(self.center_um[which], self.volume_um3[which], self.n_particles_est[which],
                                self.peak[which], self.radius_um[which])


def density_scale(volume: Any, dense_is_dark: bool = True,
                  grey_range: tuple[float, float] | None = None) -> Callable[[NDArray], NDArray[np.float32]]:
    """The map from grey levels to a 0..1 density (1 = densest), fixed for the whole volume.

    The range is ``grey_range`` when given, else the data type's: 0..255 or 0..65535 for integers; a float volume
    (a mean-binned 8- or 16-bit one) is read as 8-bit when its values stay within 0..255, as 16-bit within
    0..65535, and as 0..1 otherwise, so that binning does not change what a level means.
    """
    if grey_range is None:
        kind = np.dtype(getattr(volume, "dtype", np.float32))
        if np.issubdtype(kind, np.integer):
            info = np.iinfo(kind)
            grey_range = (float(info.min), float(info.max))
        else:
            top = float(np.nanmax(np.asarray(volume[: min(len(volume), 64)])))
            grey_range = (0.0, 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0)
    lo, hi = (float(v) for v in grey_range)
    if not hi > lo:
        raise ValueError(f"grey_range {grey_range} is empty: give (darkest, brightest) grey of the data")
    a, b = (np.float32(-1.0 / (hi - lo)), np.float32(hi / (hi - lo))) if dense_is_dark else (
        np.float32(1.0 / (hi - lo)), np.float32(-lo / (hi - lo)))

    def to_density(block: NDArray) -> NDArray[np.float32]:
        return np.asarray(block, np.float32) * a + b

    return to_density


def _filter_sizes(voxel: NDArray, diameter_um: float, line_um: float = 0.0
                  ) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """Gaussian sigmas and the background lines (z, y, x; odd voxels) for particles of ``diameter_um``.

    Along z the line is a few particle diameters (particles on a lattice leave gaps between planes); in the plane
    it is ``line_um``, longer than a packed cluster, so that its particles stand out from the matrix between them.
    """
    sigma_um = np.array([0.11, 0.22, 0.22]) * diameter_um  # less along z: slices are coarse already
    sigma = tuple(float(s) for s in sigma_um / voxel)
    span = np.array([2.7 * diameter_um, max(line_um, 2.7 * diameter_um), max(line_um, 2.7 * diameter_um)])
    box = tuple(int(np.ceil(s / v)) | 1 for s, v in zip(span, voxel))
    return sigma, box  # type: ignore[return-value]


def particle_mask(density: NDArray[np.float32], voxel_um: Voxel, *, diameter_um: float = PARTICLE_DIAMETER_UM,
                  min_level: float = 0.72, min_contrast: float = 0.28, line_um: float = LINE_UM
                  ) -> tuple[NDArray[np.bool_], NDArray[np.float32]]:
    """(mask, smoothed density) of particle material in a 0..1 density block; see the module docstring."""
    sigma, box = _filter_sizes(np.asarray(voxel_um, float), diameter_um, line_um)
    smooth = np.asarray(density, np.float32)
    for axis, s in enumerate(sigma):
        if s >= 0.3:  # a fraction of a voxel changes nothing
            smooth = ndimage.gaussian_filter1d(smooth, s, axis=axis, mode="nearest")
    mask = smooth >= np.float32(min_level)
    where = np.nonzero(mask)
    background = _background_at(smooth, box, where)
    mask[where] = (smooth[where] - background) >= np.float32(min_contrast)
    return mask, smooth


def _running(image: NDArray[np.float32], length: int, axis: int, op: np.ufunc) -> NDArray[np.float32]:
    """Running minimum or maximum (``op``) over ``length`` voxels along ``axis``, edges repeated.

    Shifted whole-array comparisons: for the short lines used here this is many times faster than a strided
    1D filter along the slowest axis.
    """
    h = length // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (h, h)
    padded = np.pad(image, pad, mode="edge")
    n = image.shape[axis]
    take = [slice(None)] * image.ndim
    views = []
    for k in range(2 * h + 1):
        take[axis] = slice(k, k + n)
        views.append(padded[tuple(take)])
    out = op(views[0], views[1])
    for view in views[2:]:
        op(out, view, out=out)
    return out


def _opened(image: NDArray[np.float32], length: int, axis: int) -> NDArray[np.float32]:
    """Grey opening along one axis with a line of ``length`` voxels (odd)."""
    if length < 2:
        return image
    return _running(_running(image, length, axis, np.minimum), length, axis, np.maximum)


def _background_at(image: NDArray[np.float32], box: tuple[int, int, int], where: tuple[NDArray, ...]
                   ) -> NDArray[np.float32]:
    """The level around the voxels ``where`` with particle-sized dots removed: the largest of three line openings.

    A line opening keeps what is longer than the line in its direction, so a sheet such as the block's coating,
    or a membrane, stays in the background however thin it is; a particle is shorter than every line and goes.
    The in-plane openings run on 2 x 2 mean-pooled planes (a quarter of the work).
    """
    nz, ny, nx = image.shape
    if len(where[0]) == 0:
        return np.zeros(0, np.float32)
    zi, yi, xi = where
    level = _opened(image, box[0], 0)[where]
    pool = 2 if min(box[1:]) >= 7 else 1
    py, px = -(-ny // pool) * pool, -(-nx // pool) * pool
    planes = np.pad(image, ((0, 0), (0, py - ny), (0, px - nx)), mode="edge")
    planes = planes.reshape(nz, py // pool, pool, px // pool, pool).mean(axis=(2, 4), dtype=np.float32)
    at = (zi, yi // pool, xi // pool)
    for axis in (1, 2):
        length = box[axis] // pool | 1
        line = ndimage.maximum_filter1d(ndimage.minimum_filter1d(planes, length, axis=axis, mode="nearest"),
                                        length, axis=axis, mode="nearest")
        np.maximum(level, line[at], out=level)
    return level


def particle_cores(density: NDArray[np.float32], core_level: float, core_voxels: int) -> NDArray[np.bool_]:
    """Voxels of unsmoothed density ``core_level`` or more in touching groups of at least ``core_voxels``.

    A particle cut by a plane shows a core of a few voxels at full density; the mottled content of an
    endolysosome reaches that level in single voxels far more often than in touching pairs.
    """
    dense = density >= np.float32(core_level)
    if core_voxels <= 1:
        return dense
    labels, n = ndimage.label(dense, np.ones((3, 3, 3), bool))
    if n == 0:
        return dense
    size = np.bincount(labels.ravel(), minlength=n + 1)
    big = size >= core_voxels
    big[0] = False
    return big[labels]


def read_box(volume: Any, to_density: Callable, factors: tuple[int, int, int], lo: Any, hi: Any
             ) -> NDArray[np.float32]:
    """Density of the working-grid box ``lo``..``hi`` (z, y, x; exclusive), mean-binned by ``factors``."""
    f = np.asarray(factors)
    lo, hi = np.asarray(lo, int), np.asarray(hi, int)
    raw = np.asarray(volume[lo[0] * f[0]:hi[0] * f[0], lo[1] * f[1]:hi[1] * f[1], lo[2] * f[2]:hi[2] * f[2]])
    dens = to_density(raw)
    if f.prod() > 1:
        n = hi - lo
        dens = dens.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    return dens


@dataclass
class _Voxels:
    """Particle voxels gathered chunk by chunk: global (z, y, x) index, smoothed and raw density, dot label."""

    index: list[NDArray]
    level: list[NDArray]
    raw: list[NDArray]
    dot: list[NDArray]
    n_dots: int = 0


def _scan(volume: Any, to_density: Callable, factors: tuple[int, int, int], voxel: NDArray, chunk: int,
          settings: dict[str, float], progress: Progress | None) -> _Voxels:
    """Label the dots of every chunk of binned planes; keep only their voxels."""
    fz, fy, fx = factors
    nz = int(volume.shape[0]) // fz
    ny, nx = int(volume.shape[1]) // fy, int(volume.shape[2]) // fx
    sigma, box = _filter_sizes(voxel, settings["diameter_um"], settings["line_um"])
    halo = box[0] // 2 + int(np.ceil(3 * sigma[0])) + 1
    found = _Voxels([], [], [], [])
    structure = np.ones((3, 3, 3), bool)
    for z0 in range(0, nz, chunk):
        z1 = min(z0 + chunk, nz)
        a, b = max(z0 - halo, 0), min(z1 + halo, nz)
        dens = read_box(volume, to_density, factors, (a, 0, 0), (b, ny, nx))
        mask, smooth = particle_mask(dens, tuple(voxel), diameter_um=settings["diameter_um"],
                                     min_level=settings["min_level"], min_contrast=settings["min_contrast"],
                                     line_um=settings["line_um"])
        own = slice(z0 - a, z1 - a)  # the chunk's planes, without the filters' margin
        labels, n = ndimage.label(mask[own], structure)
        if n:
            zz, yy, xx = np.nonzero(labels)
            lab = labels[zz, yy, xx]
            lev = smooth[own][zz, yy, xx]
            cores = particle_cores(dens, settings["core_level"], int(settings["core_voxels"]))[own]
            keep = np.zeros(n + 1, bool)
            keep[lab[cores[zz, yy, xx]]] = True
            keep = keep[1:]
            ok = keep[lab - 1]
            renumber = np.cumsum(keep) - 1 + found.n_dots
            found.index.append(np.column_stack([zz[ok] + z0, yy[ok], xx[ok]]))
            found.level.append(lev[ok])
            found.raw.append(dens[own][zz[ok], yy[ok], xx[ok]])
            found.dot.append(renumber[lab[ok] - 1])
            found.n_dots += int(keep.sum())
        if progress is not None:
            progress(z1, nz)
    return found


def _group(centre: NDArray, reach: NDArray, link_um: float) -> NDArray[np.intp]:
    """Cluster label of each dot: dots whose edges (centre +- reach) come within ``link_um`` share one."""
    n = len(centre)
    if n == 0:
        return np.zeros(0, np.intp)
    pairs = cKDTree(centre).query_pairs(2 * float(reach.max()) + link_um, output_type="ndarray")
    if len(pairs):
        gap = np.linalg.norm(centre[pairs[:, 0]] - centre[pairs[:, 1]], axis=1) - reach[pairs[:, 0]] - reach[pairs[:, 1]]
        pairs = pairs[gap <= link_um]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else \
        coo_matrix((n, n))
    return connected_components(graph, directed=False)[1]


def detect_clusters(
    volume: Any,
    voxel_um: Voxel,
    *,
    dense_is_dark: bool = True,
    grey_range: tuple[float, float] | None = None,
    diameter_um: float = PARTICLE_DIAMETER_UM,
    min_level: float = 0.72,
    core_level: float = 0.9,
    core_voxels: int = 2,
    dense_context: float = 0.5,
    strict_core_level: float = 0.96,
    min_contrast: float = 0.28,
    link_um: float = 0.08,
    line_um: float = LINE_UM,
    working_voxel_um: Voxel = WORKING_VOXEL_UM,
    chunk_planes: int = 48,
    progress: Progress | None = None,
) -> ParticleClusters:
    """Particle clusters in a (Z, Y, X) EM volume (numpy, memmap or zarr) with ``voxel_um`` (z, y, x).

    Levels are on the 0..1 density scale of :func:`density_scale` (``grey_range`` and ``dense_is_dark`` set it);
    the defaults suit an inverted-backscatter display where resin is near 0.2 and particles near 0.95.
    ``progress(done, total)`` is called after each chunk of planes.
    """
    if np.ndim(volume) != 3:
        raise ValueError(f"volume has shape {np.shape(volume)}; expected (Z, Y, X)")
    voxel_in = np.asarray(voxel_um, float)
    if voxel_in.shape != (3,) or np.any(voxel_in <= 0):
        raise ValueError(f"voxel_um {voxel_um} must be three positive sizes (z, y, x) in µm")
    factors = bin_factors(tuple(voxel_in), working_voxel_um)
    if any(int(s) // f == 0 for s, f in zip(volume.shape, factors)):
        raise ValueError(f"volume {tuple(volume.shape)} is smaller than one working voxel {working_voxel_um} µm")
    voxel = voxel_in * np.array(factors)
    origin_xyz = binned_origin_um(tuple(voxel_in), working_voxel_um)
    settings = {"diameter_um": diameter_um, "min_level": min_level, "core_level": core_level, "core_voxels": core_voxels,
                "min_contrast": min_contrast, "line_um": line_um, "dense_context": dense_context,
                "strict_core_level": strict_core_level}
    to_density = density_scale(volume, dense_is_dark, grey_range)
    found = _scan(volume, to_density, factors, voxel,
                  max(int(chunk_planes), 1), settings, progress)
    if found.n_dots == 0:
        return ParticleClusters.empty()
    index = np.concatenate(found.index)
    level = np.concatenate(found.level)
    raw = np.concatenate(found.raw)
    dot = np.concatenate(found.dot)
    xyz = index[:, ::-1] * voxel[::-1] + origin_xyz
    count = np.bincount(dot, minlength=found.n_dots).astype(float)
    dot_centre = np.column_stack([np.bincount(dot, xyz[:, k], found.n_dots) for k in range(3)]) / count[:, None]
    half = 0.5 * float(voxel.min())
    dot_reach = np.zeros(found.n_dots)
    np.maximum.at(dot_reach, dot, np.linalg.norm(xyz - dot_centre[dot], axis=1))
    dot_reach += half
    dot_cluster = _group(dot_centre, dot_reach, link_um)
    # a lone dot in dense, mottled surroundings needs a core at the density of a particle, not of a speck
    lone = np.flatnonzero(np.bincount(dot_cluster) == 1)
    lone_dots = np.flatnonzero(np.isin(dot_cluster, lone))
    shape = tuple(int(s) // f for s, f in zip(volume.shape, factors))
    order = np.argsort(dot, kind="stable")
    start = np.concatenate([[0], np.cumsum(count.astype(int))])
    specks = [d for d in lone_dots if not _lone_particle(
        index[order[start[d]:start[d + 1]]], raw[order[start[d]:start[d + 1]]], volume, to_density, factors, voxel,
        shape, settings)]
    keep_dot = np.ones(found.n_dots, bool)
    keep_dot[specks] = False
    if not keep_dot.any():
        return ParticleClusters.empty()
    kept = keep_dot[dot]
    index, level, dot, xyz = index[kept], level[kept], dot[kept], xyz[kept]
    _, dot_cluster = np.unique(dot_cluster[keep_dot], return_inverse=True)
    renumber = np.cumsum(keep_dot) - 1
    dot = renumber[dot]
    count = count[keep_dot]
    cluster = dot_cluster[dot]  # per voxel
    n = int(cluster.max()) + 1
    # an isolated particle's voxel count, from this volume's own dots (most dots are single particles)
    single = float(np.median(count)) if len(count) >= 20 else np.pi / 6 * diameter_um ** 3 / float(np.prod(voxel))
    size = np.bincount(cluster, minlength=n).astype(float)
    centre = np.column_stack([np.bincount(cluster, xyz[:, k], n) for k in range(3)]) / size[:, None]
    n_est = np.zeros(n)
    np.add.at(n_est, dot_cluster, np.maximum(1.0, np.rint(count / single)))
    reach = np.zeros(n)
    np.maximum.at(reach, cluster, np.linalg.norm(xyz - centre[cluster], axis=1))
    peak = np.zeros(n)
    np.maximum.at(peak, cluster, level)
    volume_um3 = size / single * (np.pi / 6 * diameter_um ** 3)
    return ParticleClusters(centre, volume_um3, n_est.astype(np.int64), peak, reach + half)


def _lone_particle(index: NDArray, raw: NDArray, volume: Any, to_density: Callable, factors: tuple[int, int, int],
                   voxel: NDArray, shape: tuple[int, ...], settings: dict[str, float]) -> bool:
    """Whether a dot that forms a cluster alone is a particle rather than a speck of dense, mottled content.

    Its surroundings (a ring 1 voxel to ``RING_UM`` out in its planes, particle material left out) are read from
    the volume; when a quarter of them is as dense as ``dense_context`` (an endolysosome around it, or at its
    rim) the dot's two densest voxels must average ``strict_core_level``.
    """
    top2 = float(np.mean(np.sort(raw)[-2:]))
    if top2 >= settings["strict_core_level"]:
        return True
    pad = np.array([0, *np.ceil(RING_UM / voxel[1:]).astype(int)]) + 1
    lo = np.maximum(index.min(axis=0) - pad, 0)
    hi = np.minimum(index.max(axis=0) + pad + 1, np.array(shape))
    dens = read_box(volume, to_density, factors, lo, hi)
    own = np.zeros(dens.shape, bool)
    own[tuple((index - lo).T)] = True
    outer = ndimage.binary_dilation(own, np.ones((1, 2 * pad[1] - 1, 2 * pad[2] - 1), bool))
    ring = outer & ~ndimage.binary_dilation(own, np.ones((1, 3, 3), bool)) & (dens < settings["min_level"])
    if ring.sum() < 4:
        return True
    return float(np.percentile(dens[ring], 75)) < settings["dense_context"]
