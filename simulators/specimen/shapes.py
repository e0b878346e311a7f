"""Geometric primitives of the simulated specimen: object sets and cells.

Every object set is a frozen dataclass of flat numpy arrays (one row per
object) so that renderers can select, transform and draw thousands of objects
without Python loops. All coordinates are µm in the live dish frame (see
:mod:`clemflow.simulators.specimen.world`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Cell", "ParticleClusters", "SphereSet", "TubeSet", "profile_height", "polar_radius"]


def _box_mask(points: np.ndarray, pad: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    return (x + pad >= x0) & (x - pad <= x1) & (y + pad >= y0) & (y - pad <= y1)


@dataclass(frozen=True, eq=False)
class SphereSet:
    """Solid spheres (lipid droplets, endolysosomes)."""

    center_um: np.ndarray  # (N, 3) float64, x y z
    radius_um: np.ndarray  # (N,) float64
    cell_id: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.radius_um)

    @classmethod
    def empty(cls) -> "SphereSet":
        return cls(np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int32))

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of spheres whose extent meets the axis-aligned box [x0, x1] x [y0, y1]."""
        return np.flatnonzero(_box_mask(self.center_um, self.radius_um, x0, y0, x1, y1))

    def volume_um3(self) -> np.ndarray:
        return 4.0 / 3.0 * np.pi * self.radius_um**3


@dataclass(frozen=True, eq=False)
class ParticleClusters:
    """Aggregates of 50-60 nm nanoparticles and the particles themselves.

    A cluster is a sphere packed with particles on a jittered, randomly rotated
    lattice (no two particles overlap). ``lysosome_index`` is the index into
    ``World.endolysosomes`` of the endolysosome that holds the cluster, or -1
    for a cluster free in the cytoplasm.
    """

    center_um: np.ndarray  # (N, 3)
    radius_um: np.ndarray  # (N,) envelope radius
    n_particles: np.ndarray  # (N,) int32
    cell_id: np.ndarray  # (N,) int32
    lysosome_index: np.ndarray  # (N,) int32, -1 = free in cytoplasm
    particles_um: np.ndarray  # (M, 3)
    particle_radius_um: np.ndarray  # (M,)
    particle_cluster: np.ndarray  # (M,) int32 index into the clusters; sorted ascending
    particle_start: np.ndarray = field(repr=False)  # (N + 1,) int64 offsets into the particle arrays

    def __len__(self) -> int:
        return len(self.radius_um)

    @classmethod
    def empty(cls) -> "ParticleClusters":
        z3, z = np.zeros((0, 3)), np.zeros(0)
        zi = np.zeros(0, np.int32)
        return cls(z3, z, zi, zi, zi, z3, z, zi, np.zeros(1, np.int64))

    @property
    def in_lysosome(self) -> np.ndarray:
        return self.lysosome_index >= 0

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of clusters whose extent meets the box [x0, x1] x [y0, y1]."""
        return np.flatnonzero(_box_mask(self.center_um, self.radius_um, x0, y0, x1, y1))

    def particles_of(self, clusters: np.ndarray | int) -> np.ndarray:
        """Indices into the particle arrays of the particles of the given clusters."""
        idx = np.atleast_1d(np.asarray(clusters, dtype=np.int64))
        if idx.size == 0:
            return np.zeros(0, np.int64)
        starts, stops = self.particle_start[idx], self.particle_start[idx + 1]
        counts = stops - starts
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts)
        return offsets + np.arange(counts.sum())


@dataclass(frozen=True, eq=False)
class TubeSet:
    """Capsules (cylinders with hemispherical caps): the mitochondrial network."""

    p0_um: np.ndarray  # (N, 3)
    p1_um: np.ndarray  # (N, 3)
    radius_um: np.ndarray  # (N,)
    cell_id: np.ndarray  # (N,) int32
    chain_id: np.ndarray  # (N,) int32, consecutive segments of one mitochondrion share it

    def __len__(self) -> int:
        return len(self.radius_um)

    @classmethod
    def empty(cls) -> "TubeSet":
        z3, z, zi = np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int32)
        return cls(z3, z3, z, zi, zi)

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        lo = np.minimum(self.p0_um, self.p1_um)[:, :2] - self.radius_um[:, None]
        hi = np.maximum(self.p0_um, self.p1_um)[:, :2] + self.radius_um[:, None]
        return np.flatnonzero((hi[:, 0] >= x0) & (lo[:, 0] <= x1) & (hi[:, 1] >= y0) & (lo[:, 1] <= y1))

    def volume_um3(self) -> np.ndarray:
        length = np.linalg.norm(self.p1_um - self.p0_um, axis=1)
        return np.pi * self.radius_um**2 * length + 4.0 / 3.0 * np.pi * self.radius_um**3


# -- cell body geometry, shared by Cell and the vectorised world generator ---------------


def polar_radius(base_um, harmonics: np.ndarray, ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    """Outline radius r(theta) = base * (1 + sum_k a_k cos k theta + b_k sin k theta), k = 2, 3, ...

    ``(ux, uy)`` is the unit direction (cos theta, sin theta); the angle-addition
    recurrence gives cos k theta, sin k theta without trigonometric calls.
    ``harmonics`` is (K, 2) for one cell, or (N, K, 2) with ``ux`` of shape (N,).
    """
    ck, sk = ux, uy
    total = np.ones(np.shape(ux))
    for k in range(harmonics.shape[-2]):
        ck, sk = ck * ux - sk * uy, sk * ux + ck * uy
        a, b = harmonics[..., k, 0], harmonics[..., k, 1]
        total += a * ck
        total += b * sk
    total *= base_um
    return total


def profile_height(rho: np.ndarray, height_um: np.ndarray | float, exponent: np.ndarray | float) -> np.ndarray:
    """Dome-like top surface: height * (1 - rho^2)^exponent inside the footprint, 0 outside."""
    inside = np.asarray(1.0 - rho * rho)
    inside = np.clip(inside, 0.0, None, out=inside if inside.ndim else None)
    if np.ndim(exponent) == 0 and exponent == 1.0:
        return height_um * inside
    return height_um * inside**exponent


@dataclass(frozen=True, eq=False)
class Cell:
    """One adherent cell: an irregular dome on the glass with an ellipsoidal nucleus.

    Footprint: polar radius r(theta) about ``center_um`` (a base radius and a few
    harmonics, smooth and star-shaped). Top surface: ``height_um * (1 - rho^2)^p``
    with rho the distance from the centre over r(theta) of that direction.
    """

    id: int
    center_um: np.ndarray  # (2,) x, y
    base_radius_um: float
    harmonics: np.ndarray  # (K, 2): a_k, b_k for k = 2 .. K+1
    height_um: float
    profile_exponent: float
    nucleus_center_um: np.ndarray  # (3,)
    nucleus_semi_axes_um: np.ndarray  # (3,) along the nucleus' own x', y' and z
    nucleus_angle_rad: float  # rotation of the nucleus' x' axis from dish x
    max_radius_um: float  # bound of r(theta), for quick rejection

    @property
    def bbox_um(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) that contains the footprint."""
        cx, cy = self.center_um
        r = self.max_radius_um
        return cx - r, cy - r, cx + r, cy + r

    def footprint_radius(self, theta: np.ndarray) -> np.ndarray:
        """Outline radius (µm) for polar angles theta (rad, from dish +x towards +y)."""
        theta = np.asarray(theta, dtype=float)
        return polar_radius(self.base_radius_um, self.harmonics, np.cos(theta), np.sin(theta))

    def rho(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius: distance from the centre over r(theta); < 1 inside the footprint.

        Broadcasts ``x`` against ``y`` (pass a row of x and a column of y for a
        plane). Points beyond the bounding circle get +inf without evaluating the outline.
        """
        dx = np.asarray(x, dtype=float) - self.center_um[0]
        dy = np.asarray(y, dtype=float) - self.center_um[1]
        dx, dy = np.broadcast_arrays(dx, dy)
        d2 = dx * dx + dy * dy
        near = d2 < self.max_radius_um**2
        n_near = np.count_nonzero(near)
        if n_near > 0.25 * near.size:  # gathering would cost more than evaluating everywhere
            out = self._rho_near(dx, dy, d2)
            if out.ndim == 0:
                return out if near else np.float64(np.inf)
            out[~near] = np.inf
            return out
        out = np.full(d2.shape, np.inf)
        if n_near:
            out[near] = self._rho_near(dx[near], dy[near], d2[near])
        return out

    def _rho_near(self, dx: np.ndarray, dy: np.ndarray, d2: np.ndarray) -> np.ndarray:
        d = np.sqrt(d2, dtype=float)
        if d.ndim == 0:
            d = d.reshape(1)
            return self._rho_near(np.reshape(dx, 1), np.reshape(dy, 1), d * d)[0]
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        ux = dx * inv
        ux[d == 0] = 1.0
        uy = dy * inv
        r = polar_radius(self.base_radius_um, self.harmonics, ux, uy)
        np.divide(d, r, out=d)
        return d

    def height_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Top-surface height z (µm) above the glass at (x, y); 0 outside the footprint."""
        return profile_height(self.rho(x, y), self.height_um, self.profile_exponent)

    def in_nucleus(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """True inside the nucleus ellipsoid."""
        return self._nucleus_q(x, y, z) < 1.0

    def _nucleus_q(self, x, y, z) -> np.ndarray:
        c, s = np.cos(self.nucleus_angle_rad), np.sin(self.nucleus_angle_rad)
        dx = np.asarray(x, float) - self.nucleus_center_um[0]
        dy = np.asarray(y, float) - self.nucleus_center_um[1]
        dz = np.asarray(z, float) - self.nucleus_center_um[2]
        a, b, h = self.nucleus_semi_axes_um
        u = (c * dx + s * dy) / a
        v = (-s * dx + c * dy) / b
        return u * u + v * v + (dz / h) ** 2

    def nucleus_span_at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z_bottom, z_top) of the nucleus above (x, y); both equal the centre z where it is absent."""
        c, s = np.cos(self.nucleus_angle_rad), np.sin(self.nucleus_angle_rad)
        dx = np.asarray(x, float) - self.nucleus_center_um[0]
        dy = np.asarray(y, float) - self.nucleus_center_um[1]
        a, b, h = self.nucleus_semi_axes_um
        u = (c * dx + s * dy) / a
        v = (-s * dx + c * dy) / b
        half = h * np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, None))
        zc = self.nucleus_center_um[2]
        return zc - half, zc + half

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """True for points inside the cell body (nucleus included), between the glass and the top surface."""
        z = np.asarray(z, dtype=float)
        top = self.height_at(x, y)
        return (z >= 0.0) & (z <= top) & (top > 0.0)

    def area_um2(self) -> float:
        """Footprint area, exact for the harmonic outline: 1/2 integral r(theta)^2 dtheta."""
        k = self.harmonics
        return float(np.pi * self.base_radius_um**2 * (1.0 + 0.5 * np.sum(k * k)))

    def volume_um3(self) -> float:
        """Volume under the dome: area * height * integral_0^1 2 rho (1 - rho^2)^p d rho = A H / (p + 1)."""
        return self.area_um2() * self.height_um / (self.profile_exponent + 1.0)
