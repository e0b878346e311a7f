"""A correlative pair: the confocal z-stack of one cell and a FIB-SEM volume of (part of) a cell, with the truth.

What correlation is tested against. The light stack is what the 63x confocal
records of the cell (channels 405 LysoTracker, 488 BODIPY, 639 particle dye);
the EM volume is the aligned slice-and-view stack of the block, rendered
directly at a survey voxel size (the analytic renderer at 50 nm is what
binning a 10 nm run gives, without the cost). ``lm_to_em`` is the exact
4x4 map between the two *physical* frames of the issue's convention:

    [x, y, z, 1] in µm, origin at the centre of voxel (0, 0, 0), x along columns, y along rows, z along planes

so ``lm_to_em`` composes: LM stack -> dish (the stage position, and the
refractive-index focal shift ``lm_axial_factor`` = true / nominal z step),
dish -> block (``World.lm_to_em``: mirror, shrinkage, shear, rotation), block
-> face frame (s, u, v) -> EM volume (u along columns, v along rows, s along
planes).

``em_cell_id`` may differ from ``cell_id``: the run was started on a
neighbouring cell, the case online correlation has to flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .em import EMImperfections, FaceGeometry, face_through, render_em_slice
from .em_scene import get_scene
from .lm import OBJECTIVES, render_lm_stack

__all__ = ["LM_CHANNELS", "ClemPair", "make_clem_pair"]

LM_CHANNELS = ("405", "488", "639")
"""Channel order of ``ClemPair.lm``: LysoTracker, BODIPY (lipid droplets), particle dye."""


@dataclass(frozen=True, eq=False)
class ClemPair:
    """Light and electron images of the specimen and the exact map between their physical frames."""

    world: Any
    cell_id: int  # the cell the confocal stack was taken of
    em_cell_id: int  # the cell the EM volume was milled through
    lm: np.ndarray  # (C, Z, Y, X) uint16, channels LM_CHANNELS
    lm_voxel_um: tuple[float, float, float]  # nominal (z, y, x), as the instrument reports it
    em: np.ndarray  # (Z, Y, X) uint8, inverted backscatter (dense = dark)
    em_voxel_um: tuple[float, float, float]  # (z, y, x)
    lm_to_em: np.ndarray  # (4, 4) LM physical µm -> EM physical µm
    dish_to_lm: np.ndarray  # (4, 4) dish µm -> LM physical µm
    dish_to_em: np.ndarray  # (4, 4) dish µm -> EM physical µm
    face: FaceGeometry

    @property
    def lm_shape(self) -> tuple[int, int, int]:
        return tuple(self.lm.shape[1:])  # type: ignore[return-value]

    def em_extent_um(self) -> np.ndarray:
        """(3,) size of the EM volume in µm along x, y, z (voxel centre to voxel centre)."""
        return _extent(self.em.shape, self.em_voxel_um)

    def in_em(self, em_points: np.ndarray, margin_um: float = 0.0) -> np.ndarray:
        """Which EM-frame points (N, 3) lie inside the EM volume, ``margin_um`` in from its faces."""
        return _inside(em_points, self.em_extent_um(), margin_um)

    def in_lm(self, lm_points: np.ndarray, margin_um: float = 0.0) -> np.ndarray:
        """Which light-frame points (N, 3) lie inside the confocal stack, ``margin_um`` in from its faces."""
        return _inside(lm_points, _extent(self.lm_shape, self.lm_voxel_um), margin_um)

    def objects(self, kind: str, cell_id: int | None = None) -> dict[str, np.ndarray]:
        """Truth of one kind of object of a cell, in both frames.

        ``kind``: ``lipid_droplets``, ``endolysosomes`` or ``clusters``. Returns ``index`` (into the world's
        set), ``dish``, ``lm`` and ``em`` (N, 3) µm, ``radius_um`` and, for clusters, ``in_lysosome``.
        """
        objs = getattr(self.world, kind)
        cell = self.cell_id if cell_id is None else cell_id
        idx = np.flatnonzero(objs.cell_id == cell)
        dish = objs.center_um[idx]
        out = {"index": idx, "dish": dish, "lm": apply(self.dish_to_lm, dish), "em": apply(self.dish_to_em, dish),
               "radius_um": objs.radius_um[idx]}
        if kind == "clusters":
            out["in_lysosome"] = objs.lysosome_index[idx] >= 0
            out["n_particles"] = objs.n_particles[idx]
        return out


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 homogeneous matrix to (N, 3) points."""
    p = np.asarray(points, float).reshape(-1, 3)
    return p @ matrix[:3, :3].T + matrix[:3, 3]


def _cell_face_box(world: Any, cell: Any, face: FaceGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the cell in face coordinates (s, u, v), from its outline at the glass and its height."""
    frame = get_scene(world, face).frame
    ang = np.linspace(0, 2 * np.pi, 181)[:-1]
    cx, cy = cell.center_um
    r = cell.max_radius_um * 1.05
    # the outline: bisect along each ray from the centre
    pts = []
    for a in ang:
        lo, hi = 0.0, r
        for _ in range(24):
            mid = (lo + hi) / 2
            if cell.rho(np.array([cx + mid * np.cos(a)]), np.array([cy + mid * np.sin(a)]))[0] < 1.0:
                lo = mid
            else:
                hi = mid
        pts.append([cx + lo * np.cos(a), cy + lo * np.sin(a), 0.0])
    pts = np.array(pts)
    top = pts.copy()
    top[:, 2] = cell.height_um
    suv = frame.block_to_face(world.to_em(np.concatenate([pts, top])))
    return suv.min(axis=0), suv.max(axis=0)


def _matrix(linear: np.ndarray, offset: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = offset
    return m


def _extent(shape: tuple[int, ...], voxel_um: tuple[float, float, float]) -> np.ndarray:
    """(3,) x, y, z size in µm of a (Z, Y, X) volume, voxel centre to voxel centre."""
    nz, ny, nx = shape[-3:]
    z, y, x = voxel_um
    return np.array([(nx - 1) * x, (ny - 1) * y, (nz - 1) * z])


def _inside(points: np.ndarray, extent: np.ndarray, margin_um: float) -> np.ndarray:
    p = np.asarray(points, float).reshape(-1, 3)
    return np.all((p >= margin_um) & (p <= extent - margin_um), axis=1)


def make_clem_pair(
    world: Any,
    cell_id: int,
    *,
    em_cell_id: int | None = None,
    em_fraction: tuple[float, float] = (0.0, 1.0),
    em_pixel_nm: float = 50.0,
    em_slice_nm: float = 100.0,
    em_margin_um: float = 1.0,
    lm_z_step_um: float = 0.25,
    lm_axial_factor: float = 1.0,
    lm_exposure_s: float = 0.1,
    seed: int = 0,
    progress: Any = None,
) -> ClemPair:
    """Render the confocal stack of ``cell_id`` and an EM volume through ``em_cell_id`` (default the same cell).

    ``em_fraction``: the part of the cell's extent along the milling axis that the EM volume covers, as
    fractions (0, 1) = the whole cell, (0, 0.5) = the first half milled. ``lm_axial_factor``: true focal
    step over the nominal one (about 0.88 for an oil objective focusing into an aqueous sample); the stack
    reports the nominal step. ``progress(done, total)`` is called after each rendered plane.
    """
    em_cell = cell_id if em_cell_id is None else int(em_cell_id)
    cell = world.cells[cell_id]
    obj = OBJECTIVES["63x"]
    pl = obj.pixel_um
    # -- light: a square field around the cell, planes from just below the glass to above the cell top
    n = int(np.ceil(2 * (cell.max_radius_um + 1.5) / pl / 16) * 16)
    z_true = -0.5 + np.arange(int(np.ceil((cell.height_um + 1.0) / (lm_z_step_um * lm_axial_factor))) + 1) * (
        lm_z_step_um * lm_axial_factor)
    cx, cy = cell.center_um
    # dish -> LM physical: x = x_d - (cx - (n-1)/2 pl), z = (z_d - z0) / axial_factor
    dish_to_lm = _matrix(np.diag([1.0, 1.0, 1.0 / lm_axial_factor]),
                         np.array([-(cx - (n - 1) / 2 * pl), -(cy - (n - 1) / 2 * pl), -z_true[0] / lm_axial_factor]))
    # -- electron: faces through the EM cell's centre, milled along the block's y; box around the cell
    ecell = world.cells[em_cell]
    face = face_through(world, [*ecell.center_um, 0.0])
    lo, hi = _cell_face_box(world, ecell, face)
    s_lo, s_hi = lo[0] + em_fraction[0] * (hi[0] - lo[0]), lo[0] + em_fraction[1] * (hi[0] - lo[0])
    if em_fraction[0] <= 0.0:
        s_lo -= em_margin_um
    if em_fraction[1] >= 1.0:
        s_hi += em_margin_um
    p, ds = em_pixel_nm * 1e-3, em_slice_nm * 1e-3
    u0, u1 = lo[1] - em_margin_um, hi[1] + em_margin_um
    v0, v1 = -0.3, hi[2] + 0.7
    w = int(np.ceil((u1 - u0) / p / 8) * 8)
    h = int(np.ceil((v1 - v0) / p / 8) * 8)
    planes = int(np.floor((s_hi - s_lo) / ds)) + 1
    u_c, v_c = u0 + (w - 1) / 2 * p, v0 + (h - 1) / 2 * p
    frame = get_scene(world, face).frame
    # dish -> block -> (s, u, v) -> EM physical (u - u0, v - v0, s - s_lo)
    block = np.asarray(world.lm_to_em, float)
    face_lin = frame.axes @ block[:3, :3]  # rows: s, u, v
    face_off = frame.axes @ (block[:3, 3] - frame.origin)
    perm = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)  # (s, u, v) -> (u, v, s)
    dish_to_em = _matrix(perm @ face_lin, perm @ face_off - np.array([u0, v0, s_lo]))
    lm_to_em = dish_to_em @ np.linalg.inv(dish_to_lm)

    total = len(LM_CHANNELS) * len(z_true) + planes
    done = 0
    lm = []
    for k, ch in enumerate(LM_CHANNELS):
        lm.append(render_lm_stack(world, cx, cy, z_true, obj, ch, lm_exposure_s, (n, n), rng=seed * 7 + k))
        done += len(z_true)
        if progress is not None:
            progress(done, total)
    imp = EMImperfections(drift=False)
    em = np.empty((planes, h, w), np.uint8)
    for k in range(planes):
        em[k], _ = render_em_slice(world, s_lo + k * ds, (u_c, v_c), em_pixel_nm, (w, h), imperfections=imp,
                                   face=face, seed=seed, slice_index=k)
        done += 1
        if progress is not None and (k % 10 == 9 or k == planes - 1):
            progress(done, total)
    return ClemPair(world=world, cell_id=int(cell_id), em_cell_id=em_cell, lm=np.stack(lm),
                    lm_voxel_um=(float(lm_z_step_um), float(pl), float(pl)), em=em,
                    em_voxel_um=(float(ds), float(p), float(p)), lm_to_em=lm_to_em, dish_to_lm=dish_to_lm,
                    dish_to_em=dish_to_em, face=face)
