"""The world's objects moved once into the face frame, cached per world and face.

Rendering a slice then only selects the objects whose extent crosses the
face plane (a vectorised interval test) and draws their cross-sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .em_geometry import FaceFrame, FaceGeometry, face_frame

__all__ = ["EMScene", "SphereFace", "TubeFace", "CellFace", "get_scene"]

Float = NDArray[np.float64]
PARTICLE_RADIUS_UM = 0.0275  # 55 nm diameter when the world gives no particle radius


@dataclass
class SphereFace:
    """Spheres in face coordinates: suv (N, 3), radius (N,), source index."""

    suv: Float
    radius: Float
    index: NDArray[np.int64]

    def crossing(self, s: float) -> NDArray[np.int64]:
        return np.flatnonzero(np.abs(self.suv[:, 0] - s) < self.radius)


@dataclass
class TubeFace:
    """Capsules (mitochondria) in face coordinates."""

    a: Float  # (N, 3) end points, face coordinates
    b: Float
    radius: Float

    def crossing(self, s: float) -> NDArray[np.int64]:
        lo = np.minimum(self.a[:, 0], self.b[:, 0]) - self.radius
        hi = np.maximum(self.a[:, 0], self.b[:, 0]) + self.radius
        return np.flatnonzero((lo <= s) & (hi >= s))


@dataclass
class CellFace:
    """A cell: dish-frame object plus its extent in face coordinates."""

    cell: Any
    s: float
    u: float
    reach: float  # max footprint radius, face units
    nucleus_center: Float  # dish frame (3,)
    nucleus_q: Float  # (3, 3): inside where (x - c)^T Q (x - c) <= 1 (dish frame); zeros = none


@dataclass
class EMScene:
    frame: FaceFrame
    cells: list[CellFace]
    droplets: SphereFace
    lysosomes: SphereFace
    particles: SphereFace
    mitochondria: TubeFace
    vesicles: SphereFace
    seed: int


def _spheres(frame: FaceFrame, world: Any, centers: Any, radii: Any) -> SphereFace:
    c = np.asarray(centers, float).reshape(-1, 3)
    r = np.asarray(radii, float).reshape(-1)
    block = world.to_em(c) if len(c) else np.zeros((0, 3))
    return SphereFace(frame.block_to_face(block), r * frame.scale, np.arange(len(c)))


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if obj is not None and hasattr(obj, n):
            v = getattr(obj, n)
            if v is not None:
                return v
    return default


def _particles(world: Any, seed: int) -> tuple[Float, Float]:
    """Individual particles (dish frame): the world's own, or made deterministically from its clusters."""
    cl = getattr(world, "clusters", None)
    if cl is None:
        return np.zeros((0, 3)), np.zeros(0)
    pts = _get(cl, "particles_um")
    if pts is not None and len(pts):
        pr = _get(cl, "particle_radius_um", default=PARTICLE_RADIUS_UM)
        pr = np.broadcast_to(np.asarray(pr, float), (len(pts),)).copy()
        return np.asarray(pts, float).reshape(-1, 3), pr
    centers = np.asarray(cl.center_um, float).reshape(-1, 3)
    radii = np.asarray(cl.radius_um, float).reshape(-1)
    counts = np.asarray(cl.n_particles, int).reshape(-1)
    out, rad = [], []
    for i, (c, r, n) in enumerate(zip(centers, radii, counts)):
        rng = np.random.default_rng([seed, 104729, i])
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-12
        rr = max(r - PARTICLE_RADIUS_UM, 0.0) * rng.uniform(0, 1, (n, 1)) ** (1 / 3)
        out.append(c + d * rr)
        rad.append(rng.uniform(0.025, 0.03, n))
    if not out:
        return np.zeros((0, 3)), np.zeros(0)
    return np.concatenate(out), np.concatenate(rad)


def _nucleus(cell: Any) -> tuple[Float, Float]:
    """(centre, Q): the nucleus is the dish-frame ellipsoid (x - c)^T Q (x - c) <= 1."""
    c = _get(cell, "nucleus_center_um")
    a = _get(cell, "nucleus_semi_axes_um")
    angle = float(_get(cell, "nucleus_angle_rad", default=0.0))
    if c is None:
        nuc = getattr(cell, "nucleus", None)
        if nuc is None:
            return np.zeros(3), np.zeros((3, 3))
        c = _get(nuc, "center_um", "center")
        a = _get(nuc, "semi_axes_um", "semi_axes", "radii_um")
        angle = float(_get(nuc, "angle_rad", default=0.0))
    co, si = np.cos(angle), np.sin(angle)
    rot = np.array([[co, -si, 0.0], [si, co, 0.0], [0.0, 0.0, 1.0]])  # columns: nucleus axes in dish
    q = rot @ np.diag(1.0 / np.asarray(a, float) ** 2) @ rot.T
    return np.asarray(c, float), q


VESICLES_PER_UM3 = 10.0


def _vesicles(world: Any, cells: list[CellFace], seed: int) -> tuple[Float, Float]:
    """Small transport vesicles (40-120 nm) in the cytoplasm: texture the truth does not list."""
    out, rad = [], []
    for k, cf in enumerate(cells):
        cell = cf.cell
        cx, cy = np.asarray(cell.center_um, float)[:2]
        r = float(np.max(cell.footprint_radius(np.linspace(0, 2 * np.pi, 72, endpoint=False))))
        hmax = float(getattr(cell, "height_um", 8.0))
        rng = np.random.default_rng([seed, 5153, k])
        n = int(VESICLES_PER_UM3 * 4 * r * r * hmax)
        p = rng.uniform([cx - r, cy - r, 0.0], [cx + r, cy + r, hmax], (n, 3))
        keep = np.asarray(cell.contains(p[:, 0], p[:, 1], p[:, 2]), bool)
        if cf.nucleus_q.any():
            e = p - cf.nucleus_center
            keep &= np.einsum("ni,ij,nj->n", e, cf.nucleus_q, e) > 1.0
        out.append(p[keep])
        rad.append(0.02 + rng.gamma(2.0, 0.012, int(keep.sum())).clip(0, 0.1))
    if not out:
        return np.zeros((0, 3)), np.zeros(0)
    return np.concatenate(out), np.concatenate(rad)


def build_scene(world: Any, face: FaceGeometry) -> EMScene:
    lm_to_em = np.asarray(world.lm_to_em, float)
    frame = face_frame(lm_to_em, face)
    seed = int(getattr(world, "seed", 0) or 0)
    cells = []
    theta = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    for cell in world.cells:
        cxy = np.asarray(cell.center_um, float)[:2]
        reach = float(np.max(cell.footprint_radius(theta))) * frame.scale
        suv = frame.block_to_face(world.to_em(np.array([[cxy[0], cxy[1], 0.0]])))[0]
        nc, nq = _nucleus(cell)
        cells.append(CellFace(cell, float(suv[0]), float(suv[1]), reach, nc, nq))
    ld = world.lipid_droplets
    ly = world.endolysosomes
    pts, prad = _particles(world, seed)
    mi = world.mitochondria
    a = frame.block_to_face(world.to_em(np.asarray(mi.p0_um, float).reshape(-1, 3))) if len(mi.p0_um) else np.zeros((0, 3))
    b = frame.block_to_face(world.to_em(np.asarray(mi.p1_um, float).reshape(-1, 3))) if len(mi.p1_um) else np.zeros((0, 3))
    return EMScene(
        frame=frame,
        cells=cells,
        droplets=_spheres(frame, world, ld.center_um, ld.radius_um),
        lysosomes=_spheres(frame, world, ly.center_um, ly.radius_um),
        particles=_spheres(frame, world, pts, prad),
        mitochondria=TubeFace(a, b, np.asarray(mi.radius_um, float).reshape(-1) * frame.scale),
        vesicles=_spheres(frame, world, *_vesicles(world, cells, seed)),
        seed=seed,
    )


_CACHE: dict[tuple[int, FaceGeometry], tuple[Any, EMScene]] = {}


def get_scene(world: Any, face: FaceGeometry) -> EMScene:
    """The cached scene of (world, face); keeps a reference so ids are not reused."""
    key = (id(world), face)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is world:
        return hit[1]
    scene = build_scene(world, face)
    if len(_CACHE) >= 8:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (world, scene)
    return scene
