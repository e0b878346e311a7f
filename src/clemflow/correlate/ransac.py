"""Transform hypotheses from congruent droplet triangles, and their scores: the part of registration that needs no guess.

Three droplets form a triangle whose side lengths do not depend on where the
cell lies, how it is turned or whether the image is mirrored; only the scale
(and a little the z scale) changes them. So a triangle in the light set and
one with the same shape in the EM set propose a transform: the similarity
that lays one on the other. Three points in a plane fit a rotation and its
mirror through that plane equally well, so each pairing gives both
handednesses. Most pairings are wrong; a hypothesis is judged by how many
droplets of the whole set it brings onto a droplet of the other set.

Triangles are taken among each droplet's nearest neighbours: small triangles
are likelier to lie wholly in the part of the cell both modalities saw and to
be missed by none of the detectors. Everything here is vectorised over
hypotheses; :mod:`.register` refines the best few.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["Triangles", "triangles", "match_triangles", "triangle_similarities", "HitGrid"]


@dataclass(frozen=True, eq=False)
class Triangles:
    """Triangles of a point set: vertex indices (T, 3) in canonical order and the sorted log side lengths (T, 3).

    Canonical order: the vertex opposite the shortest side first, opposite the longest last, so that
    two triangles with matching sorted sides pair their vertices in column order.
    """

    vertices: np.ndarray
    log_sides: np.ndarray

    def __len__(self) -> int:
        return len(self.vertices)


def triangles(points: np.ndarray, neighbours: int, *, min_side_um: float = 1.0, min_angle_deg: float = 20.0
              ) -> Triangles:
    """Triangles formed by each point with two of its ``neighbours`` nearest, without duplicates.

    Triangles with a side under ``min_side_um`` or an angle under ``min_angle_deg`` are dropped: the
    position noise of a droplet would turn their orientation by too much.
    """
    p = np.asarray(points, float).reshape(-1, 3)
    k = min(neighbours, len(p) - 1)
    if k < 2:
        return Triangles(np.zeros((0, 3), int), np.zeros((0, 3)))
    _, nn = cKDTree(p).query(p, k + 1)
    a, b = np.triu_indices(k, 1)
    tri = np.concatenate([np.repeat(np.arange(len(p)), len(a))[:, None],
                          nn[:, 1:][:, a].reshape(-1, 1), nn[:, 1:][:, b].reshape(-1, 1)], axis=1)
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    # side opposite each vertex
    opp = np.stack([np.linalg.norm(p[tri[:, 1]] - p[tri[:, 2]], axis=1),
                    np.linalg.norm(p[tri[:, 0]] - p[tri[:, 2]], axis=1),
                    np.linalg.norm(p[tri[:, 0]] - p[tri[:, 1]], axis=1)], axis=1)
    order = np.argsort(opp, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    sides = np.take_along_axis(opp, order, axis=1)
    # smallest angle is opposite the shortest side: law of cosines
    a_, b_, c_ = sides.T
    cos_min = (b_**2 + c_**2 - a_**2) / np.maximum(2 * b_ * c_, 1e-300)
    ok = (a_ >= min_side_um) & (cos_min <= np.cos(np.radians(min_angle_deg)))
    return Triangles(tri[ok], np.log(sides[ok]))


def match_triangles(src: Triangles, dst: Triangles, *, shape_tol: float, log_scale: tuple[float, float]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (H, 2) of (src, dst) triangle indices of nearly the same shape, and their shape distances (H,).

    Shape: the sorted log sides less their mean (scale-free); two triangles match when every side's log
    ratio is within ``shape_tol`` of the mean log ratio, and that mean (the triangle's scale) lies in
    ``log_scale``. Sorted best first.
    """
    if len(src) == 0 or len(dst) == 0:
        return np.zeros((0, 2), int), np.zeros(0)
    ss = src.log_sides - src.log_sides.mean(axis=1, keepdims=True)
    ds = dst.log_sides - dst.log_sides.mean(axis=1, keepdims=True)
    # the scale-free shape lives in the plane normal to (1, 1, 1): two coordinates suffice
    basis = np.array([[1, -1, 0], [1, 1, -2]], float).T / np.array([np.sqrt(2), np.sqrt(6)])
    near = cKDTree(ss @ basis).sparse_distance_matrix(cKDTree(ds @ basis), shape_tol * np.sqrt(2.0),
                                                       output_type="ndarray")
    if len(near) == 0:
        return np.zeros((0, 2), int), np.zeros(0)
    i, j = near["i"].astype(int), near["j"].astype(int)
    r = dst.log_sides[j] - src.log_sides[i]
    mean = r.mean(axis=1)
    dev = np.abs(r - mean[:, None]).max(axis=1)
    ok = (dev <= shape_tol) & (mean >= log_scale[0]) & (mean <= log_scale[1])
    i, j, dev = i[ok], j[ok], dev[ok]
    order = np.argsort(dev, kind="stable")
    return np.stack([i[order], j[order]], axis=1), dev[order]


def _frames(p0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal frames (H, 3, 3), columns x (along vertex 0 -> 1), y, normal, and in-plane coordinates (H, 3, 2)."""
    e1 = p0[:, 1] - p0[:, 0]
    x = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    n = np.cross(e1, p0[:, 2] - p0[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)
    y = np.cross(n, x)
    return np.stack([x, y, n], axis=2), np.stack([np.einsum("hki,hi->hk", p0, x), np.einsum("hki,hi->hk", p0, y)], axis=2)


def triangle_similarities(src_pts: np.ndarray, dst_pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both-handedness least-squares similarities laying each source triangle (H, 3, 3) on its destination.

    The triangle planes are brought together by their frames, then the in-plane angle and the scale
    are the closed-form 2D least-squares fit; the mirror is the same map followed by a reflection
    through the destination plane. Returns ``linear`` (2H, 3, 3) and ``offset`` (2H, 3): the first H
    proper, the next H mirrored.
    """
    pc, qc = src_pts.mean(axis=1), dst_pts.mean(axis=1)
    p0, q0 = src_pts - pc[:, None], dst_pts - qc[:, None]
    fs, p2 = _frames(p0)
    fd, q2 = _frames(q0)
    dot = np.einsum("hkc,hkc->h", p2, q2)
    crs = np.einsum("hk,hk->h", p2[..., 0], q2[..., 1]) - np.einsum("hk,hk->h", p2[..., 1], q2[..., 0])
    norm = np.maximum(np.hypot(dot, crs), 1e-300)
    c, s = dot / norm, crs / norm
    scale = norm / np.maximum(np.einsum("hki,hki->h", p0, p0), 1e-300)
    rz = np.zeros((len(c), 3, 3))
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1], rz[:, 2, 2] = c, -s, s, c, 1.0
    proper = fd @ rz @ fs.transpose(0, 2, 1)
    mirror = proper - 2 * np.einsum("hi,hj->hij", fd[:, :, 2], fs[:, :, 2])
    lin = np.concatenate([proper, mirror]) * np.concatenate([scale, scale])[:, None, None]
    off = np.concatenate([qc, qc]) - np.einsum("hij,hj->hi", lin, np.concatenate([pc, pc]))
    return lin, off


class HitGrid:
    """A voxel map of "which destination point is within ``radius``", for scoring many hypotheses at once.

    Looking a transformed point up is an array index instead of a tree search, tens of times faster;
    the answer is exact to within a grid cell (``radius / 3``), enough to rank hypotheses.
    """

    def __init__(self, points: np.ndarray, radius: float) -> None:
        p = np.asarray(points, float).reshape(-1, 3)
        self.cell = radius / 3.0
        # two empty cells on every side: truncation toward zero and clipping land there, never on a hit
        self.lo = p.min(axis=0) - radius - 2 * self.cell
        shape = np.ceil((p.max(axis=0) + radius + 2 * self.cell - self.lo) / self.cell).astype(int) + 1
        self.shape = shape
        grid = np.full(int(np.prod(shape)), -1, np.int32)
        r = np.arange(-4, 5)
        off = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
        cells = np.floor((p - self.lo) / self.cell).astype(int)[:, None, :] + off[None, :, :]
        dist = np.linalg.norm(self.lo + (cells + 0.5) * self.cell - p[:, None, :], axis=2)
        which = np.nonzero(dist <= radius)
        order = np.argsort(-dist[which])  # the nearest point is written last and wins
        grid[np.ravel_multi_index(tuple(cells[which][order].T), shape)] = which[0][order]
        self.grid = grid
        self.n = len(p)

    def _lookup_cells(self, cells: np.ndarray) -> np.ndarray:
        hi = self.shape - 1
        ix = np.clip(cells[..., 0], 0, hi[0]).astype(np.int32)
        iy = np.clip(cells[..., 1], 0, hi[1]).astype(np.int32)
        iz = np.clip(cells[..., 2], 0, hi[2]).astype(np.int32)
        return self.grid[(ix * self.shape[1] + iy) * self.shape[2] + iz]

    def count(self, linear: np.ndarray, offset: np.ndarray, src: np.ndarray, subset: np.ndarray | None = None,
              chunk: int = 2048) -> np.ndarray:
        """Per hypothesis (H, 3, 3), (H, 3): how many source points land within ``radius`` of a destination point.

        ``subset`` (H, k) indices: count only those source points for each hypothesis (a cheap first
        look at the neighbourhood of the triangle that proposed it).
        """
        out = np.zeros(len(linear), int)
        lin = linear / self.cell
        off = (offset - self.lo) / self.cell
        src = np.asarray(src, float)
        for a in range(0, len(linear), chunk):
            b = slice(a, a + chunk)
            if subset is None:
                cells = (lin[b] @ src.T + off[b, :, None]).transpose(0, 2, 1)
            else:
                cells = src[subset[b]] @ lin[b].transpose(0, 2, 1) + off[b, None, :]
            out[b] = np.count_nonzero(self._lookup_cells(cells) >= 0, axis=1)
        return out
