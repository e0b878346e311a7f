"""A small hand-made world that follows the World contract, for EM tests.

The EM renderer only reads the World contract (cells, spheres, clusters,
tubes, grid, lm_to_em), so its tests and benchmark can run on this stand-in
with known, simple truth even before or without the full generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from clemflow.protocol.grid_scheme import MATTEK, GridScheme

__all__ = ["make_test_world", "TestWorld"]

Float = NDArray[np.float64]


@dataclass
class _Spheres:
    center_um: Float
    radius_um: Float
    cell_id: NDArray[np.int64]


@dataclass
class _Tubes:
    p0_um: Float
    p1_um: Float
    radius_um: Float
    cell_id: NDArray[np.int64]


@dataclass
class _Clusters:
    center_um: Float
    radius_um: Float
    n_particles: NDArray[np.int64]
    cell_id: NDArray[np.int64]
    lysosome_index: NDArray[np.int64]
    particles_um: Float | None = None
    particle_radius_um: Float | None = None


@dataclass
class _Nucleus:
    center_um: Float
    semi_axes_um: Float


@dataclass
class _Cell:
    """A dome-shaped cell: height h0 * (1 - (r/R)^2)^0.5 over an elliptical footprint."""

    id: int
    center_um: Float
    height_um: float
    radii_um: tuple[float, float]
    nucleus: _Nucleus

    def height_at(self, x: Float, y: Float) -> Float:
        rx, ry = self.radii_um
        r2 = ((np.asarray(x) - self.center_um[0]) / rx) ** 2 + ((np.asarray(y) - self.center_um[1]) / ry) ** 2
        return np.where(r2 < 1.0, self.height_um * np.sqrt(np.clip(1.0 - r2, 0.0, None)), 0.0)

    def contains(self, x: Float, y: Float, z: Float) -> NDArray[np.bool_]:
        return (np.asarray(z) >= 0) & (np.asarray(z) <= self.height_at(x, y))

    def footprint_radius(self, theta: Float) -> Float:
        rx, ry = self.radii_um
        t = np.asarray(theta)
        return 1.0 / np.sqrt((np.cos(t) / rx) ** 2 + (np.sin(t) / ry) ** 2)


@dataclass
class TestWorld:
    grid: GridScheme
    cells: list[_Cell]
    lipid_droplets: _Spheres
    endolysosomes: _Spheres
    clusters: _Clusters
    mitochondria: _Tubes
    lm_to_em: Float
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_em(self, points: Float) -> Float:
        p = np.asarray(points, float)
        return p @ self.lm_to_em[:3, :3].T + self.lm_to_em[:3, 3]

    def to_lm(self, points: Float) -> Float:
        inv = np.linalg.inv(self.lm_to_em)
        p = np.asarray(points, float)
        return p @ inv[:3, :3].T + inv[:3, 3]


def _lm_to_em(rotation_deg: float, shrink: float, mirror: bool, shear: float, offset: Float) -> Float:
    a = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    mir = np.diag([-1.0, 1.0, -1.0]) if mirror else np.eye(3)  # turned over: x and z flip
    sh = np.eye(3)
    sh[0, 1] = shear
    lin = (1 - shrink) * rot @ mir @ sh
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = offset
    return m


def make_test_world(seed: int = 0, *, mirror: bool = True, rotation_deg: float = 12.0, shrink: float = 0.03) -> TestWorld:
    """One HeLa-like cell in square 3C with droplets, lysosomes, mitochondria and particles."""
    rng = np.random.default_rng(seed)
    cx, cy = MATTEK.square_center_um("3C")
    nucleus = _Nucleus(center_um=np.array([cx + 2.0, cy - 1.0, 3.2]), semi_axes_um=np.array([7.0, 5.5, 2.6]))
    cell = _Cell(id=0, center_um=np.array([cx, cy]), height_um=7.0, radii_um=(18.0, 14.0), nucleus=nucleus)

    def inside_cytoplasm(n: int, margin: float) -> Float:
        out = []
        while len(out) < n:
            p = np.array([cx, cy, 0.0]) + rng.uniform([-16, -12, 0.3], [16, 12, 6.5])
            h = cell.height_at(p[0], p[1])
            q = (p - nucleus.center_um) / (nucleus.semi_axes_um + margin)
            if margin < p[2] < h - margin and np.sum(q**2) > 1.0:
                out.append(p)
        return np.array(out)

    ld_c = inside_cytoplasm(40, 0.5)
    lds = _Spheres(ld_c, rng.uniform(0.2, 0.45, len(ld_c)), np.zeros(len(ld_c), np.int64))
    ly_c = inside_cytoplasm(40, 0.5)
    lys = _Spheres(ly_c, rng.uniform(0.2, 0.4, len(ly_c)), np.zeros(len(ly_c), np.int64))
    mito_c = inside_cytoplasm(60, 0.4)
    direction = rng.normal(size=(60, 3)) * [1, 1, 0.3]
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    half = rng.uniform(0.4, 1.2, (60, 1))
    mito = _Tubes(mito_c - direction * half, mito_c + direction * half, rng.uniform(0.12, 0.2, 60), np.zeros(60, np.int64))
    # clusters: half inside lysosomes, half in cytoplasm
    n_in = 12
    cl_c = np.concatenate([ly_c[:n_in] + rng.normal(0, 0.03, (n_in, 3)), inside_cytoplasm(8, 0.4)])
    cl_r = np.concatenate([lys.radius_um[:n_in] * 0.6, np.full(8, 0.12)])
    clusters = _Clusters(
        center_um=cl_c,
        radius_um=cl_r,
        n_particles=rng.integers(3, 25, len(cl_c)),
        cell_id=np.zeros(len(cl_c), np.int64),
        lysosome_index=np.concatenate([np.arange(n_in), -np.ones(8, np.int64)]),
    )
    m = _lm_to_em(rotation_deg, shrink, mirror, 0.004, np.zeros(3))
    m[:3, 3] = -m[:3, :3] @ np.array([cx, cy, 0.0])  # cell centre at the block origin
    return TestWorld(MATTEK, [cell], lds, lys, clusters, mito, m, seed=seed)
