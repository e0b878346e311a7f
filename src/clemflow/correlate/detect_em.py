"""Lipid droplets in an aligned FIB-SEM volume: dense, homogeneous, round bodies that span several slices.

Osmium stains the droplets' lipid heavily and evenly, so in the volume they are
the densest large objects apart from the particles and the block's coating.
Detection works on the whole 3D volume in µm, so anisotropic voxels and
droplets cut by several slices need no special case:

1. **Bin** to about ``working_voxel_um`` (integer factors, mean), and smooth
   lightly: droplets of 0.15 µm and more stay several voxels across.
2. **Noise and dense class.** Shot noise grows with the signal; its size at
   each grey level is the lower envelope of the neighbour differences found
   at that level (texture only adds). The grey levels split into three
   classes (resin or lumen, cytoplasm and organelles, the dense class) by a
   three-class Otsu threshold on the volume itself: no grey level is
   assumed. A volume where the dense class does not stand out of the bulk
   (resin only, early slices) has no droplets.
3. **Bodies.** Connected dense regions are measured and kept when they are
   droplet-like: an equivalent diameter in ``diameter_um``; round (principal
   spreads within 1.6 of each other: mitochondria are tubes, the coating a
   sheet); homogeneous (the grey spread inside at most 1.5 noise sds, and
   no speck far above the median: endolysosomes are mottled and hold the
   particle clusters). A second pass takes cores halfway from the dense
   threshold to the level the first pass found for droplets and grows them
   back by an edge's width, so that a droplet touching a lysosome or a
   mitochondrion stands alone; its inside must then be near that level.
4. **Size and contrast.** The size is read where the grey crosses halfway
   from the surroundings (a shell around the body) to the inside, and the
   inside must stand ``MIN_CONTRAST`` noise sds above the surroundings.
5. **Cut by a face.** A body that touches a face of the volume is kept only
   when its centre is inside. Its cross-section area along the axis
   normal to the face follows a sphere's ``pi (r² - (t - c)²)``; the fitted
   ``c`` is the centre along that axis (and must lie inside), ``r`` the radius.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from .blobs import Blobs, checked_sizes

__all__ = ["bin_volume", "detect_em_droplets", "noise_curve"]

Progress = Callable[[int, int], None]

MAX_ELONGATION = 1.6  # largest / smallest principal spread; two touching equal balls reach 2.4, a ball 1.0
MAX_TEXTURE = 1.5  # interior grey spread over the voxel noise; a homogeneous body is 1.0
MIN_CONTRAST = 5.0  # inside over surroundings in noise sds; droplets in cytoplasm stand out by about 12
MAX_SPECKLE = 4.0  # (99th percentile - median) of the body in noise units; particles inside reach 6 and more
SMOOTH_UM = 0.04  # Gaussian sigma of the light smoothing before thresholding
SHELL_UM = 0.25  # outer radius of the shell around a body that gives its surroundings' grey
GROW_UM = 0.1  # how far a core is grown back out: about the width of a body's blurred edge


def bin_volume(volume: NDArray, voxel_um: tuple[float, float, float], working_voxel_um: float
               ) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Mean-bin a (Z, Y, X) volume by integer factors towards ``working_voxel_um``; returns (binned, voxel)."""
    voxel = np.asarray(voxel_um, float)
    f = np.maximum(1, np.rint(working_voxel_um / voxel)).astype(int)
    v = np.asarray(volume)
    if np.all(f == 1):
        return v.astype(np.float32, copy=False), voxel
    shape = np.array(v.shape) // f
    if np.any(shape == 0):
        raise ValueError(f"volume {v.shape} is smaller than one working voxel (binning {tuple(f)}); "
                         f"lower working_voxel_um")
    v = v[: shape[0] * f[0], : shape[1] * f[1], : shape[2] * f[2]]
    v = v.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    # the centre of binned voxel 0 is the centre of the first f voxels
    return v, voxel * f


@dataclass(frozen=True, eq=False)
class _Body:
    """One connected dense region, measured."""

    centre: NDArray  # zyx µm
    radius: float
    elongation: float
    texture: float
    speckle: float
    cut: bool  # touches a face of the volume
    level: float  # median grey inside
    region: NDArray  # boolean box ...
    lo: NDArray  # ... whose first voxel is this one of the volume
    contrast: float = 0.0  # inside over surroundings, noise sds (set once sized at the half level)


def noise_curve(dens: NDArray, bins: int = 48, min_count: int = 200) -> tuple[NDArray, NDArray]:
    """Voxel noise sd as a function of grey level: ``(levels, sd)`` to interpolate.

    Shot noise grows smoothly with the signal and texture only adds to it, so the noise at a level is the
    lower envelope of the spread measured there: differences of in-plane neighbours (smooth texture
    cancels), a low quantile per level bin, and the lower convex hull through the bins.
    """
    step = max(1, dens.shape[0] // 64)
    a, b = dens[::step, :, 1:], dens[::step, :, :-1]
    level = (0.5 * (a + b)).ravel()
    diff = np.abs(a - b).ravel()
    lo, hi = np.percentile(level, [0.1, 99.9])
    if not hi > lo:
        sd = float(np.median(diff)) / 0.954 + 1e-6
        return np.array([lo, lo + 1.0]), np.array([sd, sd])
    which = np.clip(((level - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
    pts = []
    for k in range(bins):
        d = diff[which == k]
        if d.size >= min_count:  # |N(0, 2 sd²)| has its 20th percentile at 0.2533 * sqrt(2) sd
            pts.append((lo + (k + 0.5) * (hi - lo) / bins, float(np.percentile(d, 20)) / (0.2533 * np.sqrt(2))))
    if not pts:
        sd = float(np.median(diff)) / 0.954 + 1e-6
        return np.array([lo, hi]), np.array([sd, sd])
    hull: list[tuple[float, float]] = []  # lower convex hull, left to right (monotone chain)
    for p in pts:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(p)
    x, y = np.array(hull).T
    return x, np.maximum(y, 1e-6)


def _face_fit(region: NDArray, axis: int, voxel: NDArray, origin: float) -> tuple[float, float] | None:
    """(centre along ``axis`` in µm, radius) of a sphere from the region's cross-section areas along it."""
    other = tuple(a for a in range(3) if a != axis)
    area = region.sum(axis=other) * float(np.prod(voxel[list(other)]))
    t = origin + np.arange(len(area)) * voxel[axis]
    keep = area > 0
    if np.count_nonzero(keep) < 2:
        return None
    # A(t) = pi (r² - (t - c)²)  <=>  A + pi t² = pi (r² - c²) + 2 pi c t: a line in t
    slope, intercept = np.polyfit(t[keep], area[keep] + np.pi * t[keep] ** 2, 1)
    c = slope / (2 * np.pi)
    r2 = intercept / np.pi + c * c
    if r2 <= 0:
        return None
    return float(c), float(np.sqrt(r2))


def _geometry(region: NDArray, lo: NDArray, voxel: NDArray, shape: tuple[int, ...]
              ) -> tuple[NDArray, float, bool] | None:
    """(centre zyx µm, radius µm, cut by a face) of a region; None when its centre lies beyond a face."""
    idx = np.argwhere(region)
    centre = (idx + lo).mean(axis=0) * voxel
    radius = float(np.cbrt(3 * len(idx) * np.prod(voxel) / (4 * np.pi)))
    faces = np.flatnonzero((idx.min(axis=0) + lo == 0) | (idx.max(axis=0) + lo == np.array(shape) - 1))
    for axis in faces:
        fit = _face_fit(region, int(axis), voxel, lo[axis] * voxel[axis])
        if fit is None:
            return None
        centre[axis], radius = fit
    return centre, radius, len(faces) > 0


def _measure(dens: NDArray, region: NDArray, lo: NDArray, voxel: NDArray, shape: tuple[int, ...],
             noise: tuple[NDArray, NDArray]) -> _Body | None:
    """Features of one region (``region`` a boolean box whose first voxel is ``lo`` in the volume)."""
    n = int(np.count_nonzero(region))
    if n < 4:
        return None
    geometry = _geometry(region, lo, voxel, shape)
    if geometry is None:
        return None
    values = dens[tuple(slice(a, a + s) for a, s in zip(lo, region.shape))]
    pts = np.argwhere(region) * voxel
    spread = np.sqrt(np.maximum(np.linalg.eigvalsh(np.cov(pts.T)), 0.0))
    elong = float(spread[-1] / max(spread[0], 0.25 * float(voxel.min())))
    core = ndimage.binary_erosion(region, structure=ndimage.generate_binary_structure(3, 1))
    if np.count_nonzero(core) < 8:
        core = region
    inner = values[core]
    level = float(np.median(inner))
    sd = float(np.interp(level, *noise))
    texture = float(inner.std() / sd)
    speckle = float((np.percentile(values[region], 99) - level) / sd)
    return _Body(*geometry[:2], elong, texture, speckle, geometry[2], level, region, lo)


def _at_half_level(body: _Body, smooth: NDArray, voxel: NDArray, noise: tuple[NDArray, NDArray]) -> _Body | None:
    """The body's extent where the grey crosses halfway from its surroundings to its inside: its true size.

    The surroundings are the median of a shell 0.1-0.25 µm out; the region may grow 0.1 µm into it. None
    when the body does not stand out of them by ``MIN_CONTRAST`` noise sds (a clump of noise in resin).
    """
    pad = np.floor(SHELL_UM / voxel).astype(int)
    lo = np.maximum(body.lo - pad, 0)
    hi = np.minimum(body.lo + np.array(body.region.shape) + pad, smooth.shape)
    values = smooth[tuple(slice(a, b) for a, b in zip(lo, hi))]
    region = np.zeros(values.shape, bool)
    off = body.lo - lo
    region[tuple(slice(a, a + s) for a, s in zip(off, body.region.shape))] = body.region
    near = ndimage.binary_dilation(region, structure=_ellipsoid(GROW_UM, voxel))
    shell = ndimage.binary_dilation(region, structure=_ellipsoid(SHELL_UM, voxel)) & ~near
    if not shell.any():
        return body
    around = float(np.median(values[shell]))
    contrast = (body.level - around) / float(np.interp(body.level, *noise))
    if contrast < MIN_CONTRAST:
        return None
    half = 0.5 * (body.level + around)
    grown, _ = ndimage.label(near & (values > half))
    mine = np.unique(grown[region & (grown > 0)])
    sized = np.isin(grown, mine)
    geometry = _geometry(sized, lo, voxel, smooth.shape) if sized.any() else None
    if geometry is None:
        return None
    return replace(body, centre=geometry[0], radius=geometry[1], cut=geometry[2], region=sized, lo=lo,
                   contrast=contrast)


def _bodies(labels: NDArray, count: int, dens: NDArray, voxel: NDArray, noise: tuple[NDArray, NDArray],
            sizes: tuple[float, float], progress: Progress | None, grow: tuple[NDArray, NDArray] | None = None
            ) -> list[_Body]:
    """Each labelled region of ``sizes`` = (fewest, most) voxels measured (specks of noise and the coating
    are not worth it). ``grow``: (structuring element, mask) to grow every region into first."""
    bodies = []
    pad = np.zeros(3, int) if grow is None else np.array(grow[0].shape) // 2
    shape = np.array(dens.shape)
    n_vox = np.bincount(labels.ravel(), minlength=count + 1)
    for k, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None or not sizes[0] <= n_vox[k] <= sizes[1]:
            continue
        lo = np.maximum(np.array([s.start for s in box]) - pad, 0)
        hi = np.minimum(np.array([s.stop for s in box]) + pad, shape)
        sub = tuple(slice(a, b) for a, b in zip(lo, hi))
        region = labels[sub] == k
        if grow is not None:
            region = ndimage.binary_dilation(region, structure=grow[0]) & grow[1][sub]
        body = _measure(dens, region, lo, voxel, dens.shape, noise)
        if body is not None:
            bodies.append(body)
        if progress is not None and k % 256 == 0:
            progress(k, count + 1)
    return bodies


def _ellipsoid(radius_um: float, voxel: NDArray) -> NDArray[np.bool_]:
    """Boolean structuring element: a ball of ``radius_um`` on the voxel grid."""
    half = np.maximum(np.floor(radius_um / voxel).astype(int), 0)
    g = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((gi * v / radius_um) ** 2 for gi, v in zip(g, voxel)) <= 1.0 + 1e-9


def _droplet_like(bodies: list[_Body], diameter_um: tuple[float, float], extent: NDArray, voxel: NDArray,
                  min_level: float = -np.inf) -> list[_Body]:
    d_lo, d_hi = diameter_um
    return [b for b in bodies
            if d_lo <= 2 * b.radius <= 1.25 * d_hi and b.level >= min_level
            and (b.cut or b.elongation <= MAX_ELONGATION)
            and b.texture <= MAX_TEXTURE and b.speckle <= MAX_SPECKLE
            and np.all((b.centre >= -0.5 * voxel) & (b.centre <= extent + 0.5 * voxel))]


def detect_em_droplets(
    volume: NDArray,
    voxel_um: tuple[float, float, float],
    *,
    diameter_um: tuple[float, float] = (0.15, 1.2),
    dense_is_dark: bool = True,
    working_voxel_um: float = 0.05,
    progress: Progress | None = None,
) -> Blobs:
    """Lipid droplets in an aligned FIB-SEM volume (Z, Y, X); centres in µm (x, y, z), origin at voxel 0.

    ``voxel_um`` is (z, y, x). ``dense_is_dark``: the usual inverted backscatter display (stain dark); set it
    False for raw backscatter. A droplet cut by a face of the volume is kept when its centre (from a sphere
    fitted to its cross-sections) lies inside. ``radius_um`` is taken where the grey crosses halfway from the
    surroundings to the inside. ``score`` is the contrast of the inside over the surroundings in voxel noise
    sds. ``progress(done, total)`` as regions are measured.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (Z, Y, X); got shape {volume.shape}")
    voxel = checked_sizes(voxel_um, diameter_um)
    d_lo, d_hi = diameter_um
    binned, vox = bin_volume(volume, voxel, working_voxel_um)
    dens = -binned if dense_is_dark else binned
    extent = (np.array(dens.shape) - 1) * vox

    smooth = ndimage.gaussian_filter(dens, SMOOTH_UM / vox, mode="nearest")
    step = max(1, int(np.cbrt(smooth.size / 2e6)))
    sample = smooth[::step, ::step, ::step]
    if np.ptp(sample) <= 0:
        return Blobs.empty()
    dense = float(threshold_multiotsu(sample, classes=3, nbins=1024)[-1])
    noise = noise_curve(dens)
    typical = float(np.median(sample))
    if dense - typical < 0.5 * MIN_CONTRAST * float(np.interp(typical, *noise)):
        return Blobs.empty()  # nothing stands out of the bulk: resin or cytoplasm only, or noise
    mask = smooth > dense
    labels, count = ndimage.label(mask)
    ball = 4 / 3 * np.pi / float(np.prod(vox))  # voxels per µm³ of ball radius cubed
    sizes = (max(2.0, 0.5 * ball * (d_lo / 2) ** 3), ball * (0.75 * d_hi * 1.5) ** 3)
    found = _droplet_like(_bodies(labels, count, dens, vox, noise, sizes, progress), diameter_um, extent, vox)
    if len(found) >= 3:
        # second pass: cores at least halfway from the dense threshold to the droplets' own level, grown
        # back out to the dense threshold by the width of an edge: a droplet touching a lysosome or a
        # mitochondrion (dense, but less so) is then its own body. Droplets share one stain, so
        # a body's inside must be near their level: in the top quarter from the dense threshold up to it
        level = float(np.median([b.level for b in found]))
        core = 0.5 * (dense + level)
        labels, count = ndimage.label(smooth > core)
        bodies = _bodies(labels, count, dens, vox, noise, (1, sizes[1]), progress,
                         grow=(_ellipsoid(GROW_UM, vox), mask))
        found = _droplet_like(bodies, diameter_um, extent, vox, min_level=0.5 * (core + level))
    found = [b for b in (_at_half_level(b, smooth, vox, noise) for b in found)
             if b is not None and np.all((b.centre >= -0.5 * vox) & (b.centre <= extent + 0.5 * vox))]
    if progress is not None:
        progress(1, 1)
    if not found:
        return Blobs.empty()
    centre = np.array([b.centre for b in found])
    # centres of binned voxels sit (f - 1) / 2 fine voxels in from the fine grid's first voxel centre
    centre += (vox - voxel) / 2
    return Blobs(centre[:, ::-1], np.array([b.radius for b in found]),
                 np.array([b.contrast for b in found]))
