"""The ground-truth specimen: one simulated world that both instruments image.

Frames
------
Dish frame (live, "LM" frame), µm: seen from above with the etched glyphs
upright; x to the right, y down, exactly the grid frame of
:class:`clemflow.protocol.grid_scheme.GridScheme` (the centre line of the bar
left of / above square (0, 0) is at 0; square (c, r) has its clear area
between ``c * pitch + bar / 2`` and ``(c + 1) * pitch - bar / 2``). z is the
height above the glass surface: cells sit on z = 0 and reach 5-8 µm. (x, y, z)
is a left-handed triple; nothing here depends on handedness.

EM block frame, µm: after fixation and embedding the glass is removed and the
block is mounted with its former-glass face towards the beams, so the cells
are seen from below. Its origin is the image of the dish origin, x_em / y_em
lie in the block face (the former glass plane) as seen looking at that face,
and z_em is the depth into the block (z_em = 0 at the face, growing into the
cells). ``World.lm_to_em`` takes live dish µm to block µm; it composes, in
order: mirror (x -> -x, from viewing the face from the glass side), resin
shrinkage (lateral and axial), a small in-plane shear, a rotation about z (how
the block sits on the stub) and an offset.

Everything is generated from ``(SpecimenParams, seed)`` with one
``numpy.random.Generator``; the same pair gives a bit-identical world.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy.spatial import cKDTree

from clemflow.protocol.grid_scheme import MATTEK, GridScheme

from .kinetics import UptakeKinetics, UptakeState
from .shapes import Cell, ParticleClusters, SphereSet, TubeSet, polar_radius, profile_height

__all__ = [
    "CellParams",
    "EmbeddingParams",
    "OrganelleParams",
    "SpecimenParams",
    "World",
    "generate_world",
]

Range = tuple[float, float]


def _check_range(value: Range) -> Range:
    lo, hi = value
    if not 0 <= lo <= hi:
        raise ValueError(f"range {value} must satisfy 0 <= low <= high")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CellParams(_Frozen):
    """Shape of HeLa-like adherent cells."""

    base_diameter_um: Range = Field((22.0, 40.0), description="Diameter before the outline harmonics.")
    height_um: Range = (5.0, 8.0)
    outline_harmonics: int = Field(4, ge=0, le=8, description="Harmonics k = 2 .. K+1 of the polar outline.")
    outline_roughness: float = Field(0.10, ge=0, le=0.3, description="Amplitude of harmonic 2; k-th is this * 2/k.")
    profile_exponent: Range = Field((0.7, 1.3), description="Top surface height * (1 - rho^2)^p.")
    nucleus_diameter_um: Range = (10.0, 16.0)
    nucleus_aspect: Range = Field((0.7, 0.95), description="Short over long lateral nucleus axis.")
    margin_to_bar_um: float = Field(3.0, ge=0, description="Least distance from a cell to an etched bar.")
    gap_um: float = Field(2.0, ge=0, description="Least distance between neighbouring cells' bounding circles.")

    _ranges = field_validator("base_diameter_um", "height_um", "profile_exponent", "nucleus_diameter_um")(
        _check_range
    )


class OrganelleParams(_Frozen):
    """Sizes and numbers of the objects inside a cell."""

    lipid_droplets_per_cell: tuple[int, int] = (20, 100)
    lipid_droplet_diameter_um: Range = (0.1, 1.0)
    endolysosome_diameter_um: Range = (0.2, 1.0)
    mitochondria_per_cell: tuple[int, int] = Field((60, 110), description="Number of mitochondria (chains).")
    mitochondrion_segments: tuple[int, int] = Field((2, 8), description="Capsule segments per mitochondrion.")
    mitochondrion_segment_um: Range = (0.5, 1.1)
    mitochondrion_diameter_um: Range = (0.2, 0.35)
    particle_diameter_nm: Range = (50.0, 60.0)
    lattice_spacing_factor: float = Field(
        1.1, ge=1.0, description="Particle lattice constant over the largest particle diameter."
    )
    lattice_occupancy: Range = Field((0.45, 0.9), description="Fraction of lattice sites in a cluster holding a particle.")
    lysosome_fill: Range = Field((0.6, 0.9), description="Cluster envelope radius over its endolysosome's radius.")
    free_cluster_radius_um: float = Field(0.14, gt=0, description="Largest envelope of a cluster free in the cytoplasm.")
    min_separation_um: float = Field(0.02, ge=0, description="Least gap between organelles.")
    membrane_um: float = Field(0.15, ge=0, description="Least distance of organelles from the cell surface and glass.")

    _ranges = field_validator(
        "lipid_droplet_diameter_um",
        "endolysosome_diameter_um",
        "mitochondrion_segment_um",
        "mitochondrion_diameter_um",
        "particle_diameter_nm",
        "lattice_occupancy",
        "lysosome_fill",
    )(_check_range)


class EmbeddingParams(_Frozen):
    """How fixation, resin embedding and mounting move the specimen (live dish -> EM block)."""

    shrinkage: float = Field(0.03, ge=0, le=0.05, description="Lateral resin shrinkage, 0-5 %.")
    axial_shrinkage: float = Field(0.04, ge=0, le=0.1, description="Shrinkage along z.")
    rotation_deg: float = Field(23.0, description="Rotation of the block on the stub about z.")
    mirror: bool = Field(True, description="The block face is seen from the former glass side: x -> -x.")
    shear: float = Field(0.01, ge=-0.1, le=0.1, description="In-plane shear: x += shear * y.")
    offset_um: tuple[float, float, float] = (0.0, 0.0, 0.0)


class SpecimenParams(_Frozen):
    """Everything that shapes one simulated specimen (a dish at one time point)."""

    grid: GridScheme = MATTEK
    first_square: tuple[int, int] = Field((3, 2), description="(column, row) of the region's top-left square.")
    n_columns: int = Field(3, ge=1)
    n_rows: int = Field(3, ge=1)
    cells_per_square: int = Field(7, ge=0)
    n_cells: int | None = Field(None, ge=0, description="Total cells; overrides cells_per_square.")
    hours_since_treatment: float | None = Field(24.0, description="None: an untreated control, no particles.")
    kinetics: UptakeKinetics = UptakeKinetics()
    cell: CellParams = CellParams()
    organelles: OrganelleParams = OrganelleParams()
    embedding: EmbeddingParams = EmbeddingParams()
    stains: tuple[str, ...] = Field(
        ("lysotracker", "bodipy", "particle_dye"),
        description="Stains applied before imaging; see lm.STAINS for what each labels and in which channel.",
    )
    label_height_um: float = Field(120.0, gt=0, description="Height of the etched label glyphs.")
    labels_uppercase: bool = Field(True, description="Glyphs etched upper-case (MatTek prints column 'a' as 'A').")

    @model_validator(mode="after")
    def _region_on_grid(self) -> "SpecimenParams":
        c0, r0 = self.first_square
        nc, nr = self.grid.shape
        if not (0 <= c0 and 0 <= r0 and c0 + self.n_columns <= nc and r0 + self.n_rows <= nr):
            raise ValueError(f"region {self.first_square} + {self.n_columns}x{self.n_rows} leaves the grid {nc}x{nr}")
        if self.hours_since_treatment is not None and self.hours_since_treatment < 0:
            raise ValueError("hours_since_treatment cannot be negative")
        return self

    @property
    def squares(self) -> list[tuple[int, int]]:
        """(column, row) of every square of the region, row by row."""
        c0, r0 = self.first_square
        return [(c0 + i, r0 + j) for j in range(self.n_rows) for i in range(self.n_columns)]

    @property
    def total_cells(self) -> int:
        return self.n_cells if self.n_cells is not None else self.cells_per_square * len(self.squares)


def embedding_matrix(p: EmbeddingParams) -> np.ndarray:
    """4x4 homogeneous matrix, live dish µm -> EM block µm (see module docstring)."""
    mirror = np.diag([-1.0 if p.mirror else 1.0, 1.0, 1.0, 1.0])
    shrink = np.diag([1 - p.shrinkage, 1 - p.shrinkage, 1 - p.axial_shrinkage, 1.0])
    shear = np.eye(4)
    shear[0, 1] = p.shear
    a = np.deg2rad(p.rotation_deg)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    shift = np.eye(4)
    shift[:3, 3] = p.offset_um
    return shift @ rot @ shear @ shrink @ mirror


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True, eq=False)
class World:
    """The specimen: cells and every object inside them, plus the live -> EM transform."""

    params: SpecimenParams
    seed: int
    grid: GridScheme
    cells: list[Cell]
    lipid_droplets: SphereSet
    endolysosomes: SphereSet
    clusters: ParticleClusters
    mitochondria: TubeSet
    lm_to_em: np.ndarray  # (4, 4)
    cell_has_particles: np.ndarray  # (n_cells,) bool: the cell took up particles (kinetics draw)
    uptake: UptakeState  # the mean state the kinetics predicted

    # -- frames ----------------------------------------------------------------

    @cached_property
    def em_to_lm(self) -> np.ndarray:
        return np.linalg.inv(self.lm_to_em)

    def to_em(self, points: np.ndarray) -> np.ndarray:
        """Live dish µm (N, 3) -> EM block µm (N, 3)."""
        return _apply(self.lm_to_em, points)

    def to_lm(self, points: np.ndarray) -> np.ndarray:
        """EM block µm (N, 3) -> live dish µm (N, 3)."""
        return _apply(self.em_to_lm, points)

    # -- spatial look-up -------------------------------------------------------

    @cached_property
    def _cell_boxes(self) -> np.ndarray:
        return np.array([c.bbox_um for c in self.cells]).reshape(-1, 4)

    def cells_near(self, x0: float, y0: float, x1: float, y1: float) -> list[Cell]:
        """Cells whose bounding box meets the dish-frame box [x0, x1] x [y0, y1]."""
        b = self._cell_boxes
        hit = (b[:, 2] >= min(x0, x1)) & (b[:, 0] <= max(x0, x1)) & (b[:, 3] >= min(y0, y1)) & (b[:, 1] <= max(y0, y1))
        return [self.cells[i] for i in np.flatnonzero(hit)]

    def cell_id_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Id of the cell whose footprint holds each point, -1 on bare glass."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        out = np.full(x.shape, -1, np.int32)
        if x.size == 0:
            return out
        for cell in self.cells_near(x.min(), y.min(), x.max(), y.max()):
            out[cell.rho(x, y) < 1.0] = cell.id
        return out

    # -- truth ------------------------------------------------------------------

    def truth(self) -> dict:
        """truth.json content: parameters, seed, frames and per-cell metrics measured from the objects."""
        from .truth import truth_dict

        return truth_dict(self)

    def square_of_cell(self, cell: Cell) -> tuple[int, int]:
        sq = self.grid.square_at_um(*cell.center_um)
        assert sq is not None
        return sq


# ======================================================================================
# generation
# ======================================================================================


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


@dataclass
class _CellArrays:
    """Per-cell parameters as arrays, so candidate points of many cells are tested at once."""

    center: np.ndarray  # (C, 2)
    base: np.ndarray  # (C,)
    harm: np.ndarray  # (C, K, 2)
    height: np.ndarray  # (C,)
    expo: np.ndarray  # (C,)
    n_center: np.ndarray  # (C, 3)
    n_axes: np.ndarray  # (C, 3)
    n_angle: np.ndarray  # (C,)
    rmax: np.ndarray  # (C,)

    def rho(self, owner: np.ndarray, x: np.ndarray, y: np.ndarray, extra: np.ndarray | float = 0.0) -> np.ndarray:
        """Normalised radius of (x, y) in cell ``owner``, pushed outward by ``extra`` µm."""
        dx = x - self.center[owner, 0]
        dy = y - self.center[owner, 1]
        d = np.hypot(dx, dy)
        safe = np.where(d > 0, d, 1.0)
        r = polar_radius(self.base[owner], self.harm[owner], np.where(d > 0, dx / safe, 1.0), dy / safe)
        return (d + extra) / r

    def height_at(self, owner, x, y, extra=0.0) -> np.ndarray:
        return profile_height(self.rho(owner, x, y, extra), self.height[owner], self.expo[owner])

    def nucleus_q(self, owner, pts: np.ndarray, pad: np.ndarray | float = 0.0) -> np.ndarray:
        """Ellipsoid form of the nucleus grown by ``pad`` µm; >= 1 outside."""
        c, s = np.cos(self.n_angle[owner]), np.sin(self.n_angle[owner])
        d = pts - self.n_center[owner]
        ax = self.n_axes[owner] + np.asarray(pad, float)[..., None]
        u = (c * d[:, 0] + s * d[:, 1]) / ax[:, 0]
        v = (-s * d[:, 0] + c * d[:, 1]) / ax[:, 1]
        w = d[:, 2] / ax[:, 2]
        return u * u + v * v + w * w

    def valid_sphere(self, owner, pts, radius, membrane: float) -> np.ndarray:
        """Sphere lies inside its cell (clear of glass and surface by ``membrane``) and outside the nucleus."""
        z = pts[:, 2]
        top = self.height_at(owner, pts[:, 0], pts[:, 1], extra=radius + membrane)
        return (z - radius >= membrane) & (z + radius + membrane <= top) & (self.nucleus_q(owner, pts, radius + membrane) >= 1.0)


class _Occupancy:
    """Spheres already placed; answers which candidate spheres would overlap them.

    Keeps a k-d tree of the bulk and a small pending list, merged when the list
    grows, so that many small placement rounds do not rebuild a large tree.
    """

    def __init__(self, gap: float) -> None:
        self.gap = gap
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._bulk = (np.zeros((0, 3)), np.zeros(0))
        self._bulk_tree: cKDTree | None = None
        self._bulk_rmax = 0.0
        self._pending = (np.zeros((0, 3)), np.zeros(0))

    @property
    def radii(self) -> np.ndarray:
        return np.concatenate([self._bulk[1], self._pending[1]])

    @property
    def centers(self) -> np.ndarray:
        return np.concatenate([self._bulk[0], self._pending[0]])

    def add(self, centers: np.ndarray, radii: np.ndarray) -> None:
        pc, pr = self._pending
        pc, pr = np.concatenate([pc, centers]), np.concatenate([pr, radii])
        if len(pr) > max(2000, len(self._bulk[1]) // 4):
            bc, br = np.concatenate([self._bulk[0], pc]), np.concatenate([self._bulk[1], pr])
            self._bulk = (bc, br)
            self._bulk_tree = cKDTree(bc)
            self._bulk_rmax = float(br.max())
            pc, pr = np.zeros((0, 3)), np.zeros(0)
        self._pending = (pc, pr)

    def _against(self, cand: cKDTree, radii, tree, their_r, rmax) -> np.ndarray:
        bad = np.zeros(len(radii), bool)
        pairs = cand.sparse_distance_matrix(tree, radii.max() + rmax + self.gap, output_type="ndarray")
        if len(pairs):
            i, j, dist = pairs["i"], pairs["j"], pairs["v"]
            hit = dist < radii[i] + their_r[j] + self.gap
            bad[i[hit]] = True
        return bad

    def clashes(self, centers: np.ndarray, radii: np.ndarray, within: bool = True) -> np.ndarray:
        """True where a candidate overlaps a placed sphere or (``within``) an earlier candidate of the batch."""
        bad = np.zeros(len(radii), bool)
        if len(radii) == 0:
            return bad
        cand = cKDTree(centers)
        if self._bulk_tree is not None:
            bad |= self._against(cand, radii, self._bulk_tree, self._bulk[1], self._bulk_rmax)
        pc, pr = self._pending
        if len(pr):
            bad |= self._against(cand, radii, cKDTree(pc), pr, float(pr.max()))
        if within:
            pairs = cand.query_pairs(2 * radii.max() + self.gap, output_type="ndarray")
            if len(pairs):
                i, j = pairs[:, 0], pairs[:, 1]
                dist = np.linalg.norm(centers[i] - centers[j], axis=1)
                hit = dist < radii[i] + radii[j] + self.gap
                bad[np.maximum(i, j)[hit]] = True
        return bad


def _sample_in_cells(rng, cells: _CellArrays, owner, radius, membrane: float) -> np.ndarray:
    """Candidate centres, uniform in the cells' volume (lateral rejection on height)."""
    n = len(owner)
    ang = rng.uniform(0, 2 * np.pi, n)
    rad = cells.rmax[owner] * np.sqrt(rng.uniform(0, 1, n))
    x = cells.center[owner, 0] + rad * np.cos(ang)
    y = cells.center[owner, 1] + rad * np.sin(ang)
    top = cells.height_at(owner, x, y, extra=radius + membrane)
    # accept laterally in proportion to the usable column height -> uniform in volume
    span = top - 2 * (radius + membrane)
    z = membrane + radius + rng.uniform(0, 1, n) * np.clip(span, 0, None)
    keep = rng.uniform(0, 1, n) * cells.height[owner] < span
    z[~keep] = -1.0  # marks a rejected candidate (invalid for every cell)
    return np.column_stack([x, y, z])


def _place_spheres(rng, cells: _CellArrays, owner, radius, occ: _Occupancy, membrane: float, rounds: int = 40):
    """Place spheres of given radii in their owner cells; returns centres and a placed mask."""
    n = len(owner)
    centers = np.zeros((n, 3))
    placed = np.zeros(n, bool)
    for _ in range(rounds):
        todo = np.flatnonzero(~placed)
        if len(todo) == 0:
            break
        # several candidates per object and round; the first valid one of each goes forward
        tries = 3 if len(todo) > 2000 else 12
        rep = np.tile(todo, tries)
        cand = _sample_in_cells(rng, cells, owner[rep], radius[rep], membrane)
        ok = cand[:, 2] >= 0
        ok[ok] = cells.valid_sphere(owner[rep][ok], cand[ok], radius[rep][ok], membrane)
        first = np.flatnonzero(ok)
        first = first[np.unique(rep[first], return_index=True)[1]]
        first.sort()  # candidates keep the order in which they were drawn
        idx, cand = rep[first], cand[first]
        good = ~occ.clashes(cand, radius[idx])
        idx = idx[good]
        centers[idx] = cand[good]
        placed[idx] = True
        occ.add(centers[idx], radius[idx])
    return centers, placed


def _make_cells(rng, p: SpecimenParams) -> tuple[list[Cell], _CellArrays]:
    cp = p.cell
    grid = p.grid
    pitch, half_bar = grid.pitch_um, grid.bar_width_um / 2
    squares = p.squares
    K = cp.outline_harmonics
    centers, bases, harms, rmaxs = [], [], [], []
    n_target = p.total_cells
    attempts = 0
    while len(centers) < n_target and attempts < 200 * max(n_target, 1):
        attempts += 1
        base = rng.uniform(*cp.base_diameter_um) / 2
        amp = cp.outline_roughness * 2.0 / np.arange(2, K + 2)
        harm = rng.normal(0, 1, (K, 2)) * amp[:, None] / np.sqrt(2)
        total = np.abs(harm).sum()
        if total > 0.45:
            harm *= 0.45 / total
        rmax = base * (1 + np.hypot(harm[:, 0], harm[:, 1]).sum())
        c, r = squares[rng.integers(len(squares))]
        lo_x = c * pitch + half_bar + cp.margin_to_bar_um + rmax
        hi_x = (c + 1) * pitch - half_bar - cp.margin_to_bar_um - rmax
        lo_y = r * pitch + half_bar + cp.margin_to_bar_um + rmax
        hi_y = (r + 1) * pitch - half_bar - cp.margin_to_bar_um - rmax
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        xy = np.array([rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)])
        if centers:
            d = np.linalg.norm(np.array(centers) - xy, axis=1)
            if np.any(d < np.array(rmaxs) + rmax + cp.gap_um):
                continue
        centers.append(xy)
        bases.append(base)
        harms.append(harm)
        rmaxs.append(rmax)
    n = len(centers)
    if n < n_target:
        raise RuntimeError(f"could place only {n} of {n_target} cells in the region; use fewer or a larger region")

    height = rng.uniform(*cp.height_um, n)
    expo = rng.uniform(*cp.profile_exponent, n)
    arr = _CellArrays(
        center=np.array(centers).reshape(n, 2),
        base=np.array(bases),
        harm=np.array(harms).reshape(n, K, 2),
        height=height,
        expo=expo,
        n_center=np.zeros((n, 3)),
        n_axes=np.zeros((n, 3)),
        n_angle=rng.uniform(0, np.pi, n),
        rmax=np.array(rmaxs),
    )
    _fit_nuclei(rng, p, arr)
    cells = [
        Cell(
            id=i,
            center_um=arr.center[i].copy(),
            base_radius_um=float(arr.base[i]),
            harmonics=arr.harm[i].copy(),
            height_um=float(arr.height[i]),
            profile_exponent=float(arr.expo[i]),
            nucleus_center_um=arr.n_center[i].copy(),
            nucleus_semi_axes_um=arr.n_axes[i].copy(),
            nucleus_angle_rad=float(arr.n_angle[i]),
            max_radius_um=float(arr.rmax[i]),
        )
        for i in range(n)
    ]
    return cells, arr


def _fit_nuclei(rng, p: SpecimenParams, arr: _CellArrays) -> None:
    """Size each nucleus so that it sits inside the dome with cytoplasm above and around it."""
    cp = p.cell
    n = len(arr.base)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    q = np.array([0.0, 0.5, 0.8, 0.95, 1.0])
    uu = (np.cos(t)[None, :] * q[:, None]).ravel()
    vv = (np.sin(t)[None, :] * q[:, None]).ravel()
    ww = np.sqrt(np.clip(1 - uu**2 - vv**2, 0, None))
    floor, roof = 0.5, 0.6  # µm of cytoplasm below and above the nucleus
    for i in range(n):
        a = rng.uniform(*cp.nucleus_diameter_um) / 2
        a = min(a, 0.45 * arr.base[i])
        b = a * rng.uniform(*cp.nucleus_aspect)
        off = rng.uniform(0, 0.12 * arr.base[i])
        ang = rng.uniform(0, 2 * np.pi)
        nc = arr.center[i] + off * np.array([np.cos(ang), np.sin(ang)])
        ca, sa = np.cos(arr.n_angle[i]), np.sin(arr.n_angle[i])
        owner = np.full(uu.size, i)
        for _ in range(40):
            x = nc[0] + ca * a * uu - sa * b * vv
            y = nc[1] + sa * a * uu + ca * b * vv
            rho = arr.rho(owner, x, y)
            if rho.max() < 0.8:
                break
            a *= 0.95
            b *= 0.95
        top = profile_height(rho, arr.height[i], arr.expo[i])
        # nucleus surface z = floor + c + c * w must stay below top - roof: c <= (top - roof - floor) / (1 + w)
        c = float(np.min((top - roof - floor) / (1 + ww)))
        c = max(min(c, 0.5 * (arr.height[i] - roof - floor)), 0.5)
        arr.n_center[i] = [nc[0], nc[1], floor + c]
        arr.n_axes[i] = [a, b, c]


def _random_rotations(rng, n: int) -> np.ndarray:
    """(n, 3, 3) uniformly random rotation matrices (Shoemake's quaternions)."""
    u1, u2, u3 = rng.uniform(0, 1, (3, n))
    q = np.column_stack(
        [
            np.sqrt(1 - u1) * np.sin(2 * np.pi * u2),
            np.sqrt(1 - u1) * np.cos(2 * np.pi * u2),
            np.sqrt(u1) * np.sin(2 * np.pi * u3),
            np.sqrt(u1) * np.cos(2 * np.pi * u3),
        ]
    )
    x, y, z, w = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


class _Lattice:
    """Cubic lattice sites sorted by distance from the origin, to pack clusters."""

    def __init__(self, spacing: float, particle_r_max: float, r_max: float) -> None:
        n = int(np.ceil(r_max / spacing)) + 1
        g = np.arange(-n, n + 1)
        sites = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3).astype(float) * spacing
        norm = np.linalg.norm(sites, axis=1)
        order = np.lexsort((sites[:, 2], sites[:, 1], sites[:, 0], norm))
        self.sites = sites[order]
        self.norm = norm[order]
        self.spacing = spacing
        self.particle_r_max = particle_r_max

    def n_sites(self, envelope_um: np.ndarray) -> np.ndarray:
        """Sites whose particle stays within the envelope radius (at least the centre one)."""
        k = np.searchsorted(self.norm, np.asarray(envelope_um) - self.particle_r_max + 1e-12, side="right")
        return np.maximum(k, 1)

    def envelope(self, k: np.ndarray) -> np.ndarray:
        """Envelope radius of a fully packed cluster of the first k sites."""
        return self.norm[np.asarray(k) - 1] + self.particle_r_max


def _pack_clusters(rng, lat: _Lattice, centers, n_sites, occupancy, o: OrganelleParams):
    """Particles of every cluster on a jittered, randomly oriented lattice; none overlap.

    Each cluster takes the first ``n_sites`` sites (nearest the centre) of one of
    a few dozen pre-rotated copies of the lattice; rotation keeps distances, so
    the sort by distance holds for every copy.
    """
    n = len(n_sites)
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0)
    n_orient = 48
    rot = _random_rotations(rng, n_orient)
    templates = np.einsum("oij,sj->osi", rot, lat.sites)  # (orientations, sites, 3)
    orient = rng.integers(0, n_orient, n)
    total = int(n_sites.sum())
    cl = np.repeat(np.arange(n, dtype=np.int32), n_sites)
    site = np.arange(total) - np.repeat(np.cumsum(n_sites) - n_sites, n_sites)
    keep = (site == 0) | (rng.uniform(0, 1, total) < occupancy[cl])
    cl, site = cl[keep], site[keep]
    m = cl.size
    d_max = o.particle_diameter_nm[1] * 1e-3
    jitter = (lat.spacing - d_max) / (2 * np.sqrt(3))
    off = templates[orient[cl], site]
    off += rng.uniform(-jitter, jitter, (m, 3))
    pts = centers[cl] + off
    pr = rng.uniform(*o.particle_diameter_nm, m) * 0.5e-3
    counts = np.bincount(cl, minlength=n)
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    reach = np.sqrt(np.einsum("ij,ij->i", off, off)) + pr
    env = np.maximum.reduceat(reach, start[:-1])  # every cluster keeps its centre particle: no empty groups
    return pts, pr, cl, start, counts.astype(np.int32), env


def _make_mitochondria(rng, p: SpecimenParams, arr: _CellArrays, occ: _Occupancy) -> TubeSet:
    """Mitochondria as chains of capsules, grown as persistent random walks in the flat cytoplasm."""
    o = p.organelles
    n_cells = len(arr.base)
    counts = rng.integers(o.mitochondria_per_cell[0], o.mitochondria_per_cell[1] + 1, n_cells)
    owner = np.repeat(np.arange(n_cells), counts)
    m = len(owner)
    radius = rng.uniform(*o.mitochondrion_diameter_um, m) / 2
    length = rng.integers(o.mitochondrion_segments[0], o.mitochondrion_segments[1] + 1, m)
    membrane = o.membrane_um
    start, placed = _place_spheres(rng, arr, owner, radius, _Occupancy(o.min_separation_um), membrane)
    chains = np.flatnonzero(placed)
    phi = rng.uniform(0, 2 * np.pi, m)
    elev = rng.normal(0, 0.15, m)
    cur = start.copy()
    alive = placed.copy()
    p0s, p1s, ids = [], [], []
    mito_pts = [start[placed]]
    mito_r = [radius[placed]]
    mito_chain = [chains]
    for step in range(int(length.max())):
        active = np.flatnonzero(alive & (length > step))
        if len(active) == 0:
            break
        seen = np.concatenate(mito_pts)
        seen_tree = cKDTree(seen)
        seen_r = np.concatenate(mito_r)
        seen_chain = np.concatenate(mito_chain)
        done = np.zeros(len(active), bool)
        for _attempt in range(4):
            todo = active[~done]
            if len(todo) == 0:
                break
            ph = phi[todo] + rng.normal(0, 0.45 + 0.5 * _attempt, len(todo))
            el = np.clip(0.6 * elev[todo] + rng.normal(0, 0.12, len(todo)), -0.5, 0.5)
            seg = rng.uniform(*o.mitochondrion_segment_um, len(todo))
            d = np.column_stack([np.cos(ph) * np.cos(el), np.sin(ph) * np.cos(el), np.sin(el)])
            end = cur[todo] + seg[:, None] * d
            mid = 0.5 * (cur[todo] + end)
            r = radius[todo]
            ok = arr.valid_sphere(owner[todo], end, r, membrane) & arr.valid_sphere(owner[todo], mid, r, membrane)
            # clear of other chains and of everything placed before (endolysosomes)
            for probe in (mid, end):
                hits = seen_tree.query_ball_point(probe, r + seen_r.max() + o.min_separation_um)
                for k, h in enumerate(hits):
                    if not ok[k] or not h:
                        continue
                    h = np.asarray(h)
                    other = seen_chain[h] != todo[k]
                    if np.any(np.linalg.norm(seen[h[other]] - probe[k], axis=1) < r[k] + seen_r[h[other]] + o.min_separation_um):
                        ok[k] = False
            sub = np.flatnonzero(ok)
            if len(sub):
                both = np.concatenate([mid[sub], end[sub]])
                bad = occ.clashes(both, np.concatenate([r[sub], r[sub]]), within=False)
                ok[sub[bad.reshape(2, -1).any(0)]] = False
            good = todo[ok]
            p0s.append(cur[good].copy())
            p1s.append(end[ok])
            ids.append(good)
            mito_pts += [mid[ok], end[ok]]
            mito_r += [r[ok], r[ok]]
            mito_chain += [good, good]
            cur[good] = end[ok]
            phi[good] = ph[ok]
            elev[good] = el[ok]
            idx_in_active = np.searchsorted(active, good)
            done[idx_in_active] = True
        alive[active[~done]] = False
    if not ids:
        return TubeSet.empty()
    chain = np.concatenate(ids)
    order = np.argsort(chain, kind="stable")
    chain = chain[order]
    p0 = np.concatenate(p0s)[order]
    p1 = np.concatenate(p1s)[order]
    pts = np.concatenate(mito_pts)
    occ.add(pts, np.concatenate(mito_r))
    return TubeSet(p0, p1, radius[chain], owner[chain].astype(np.int32), chain.astype(np.int32))


def generate_world(params: SpecimenParams | None = None, seed: int = 0) -> World:
    """Build the specimen for ``params`` from ``seed``; same inputs, bit-identical world."""
    p = params or SpecimenParams()
    o = p.organelles
    rng = np.random.default_rng(seed)
    cells, arr = _make_cells(rng, p)
    n = len(cells)
    state = p.kinetics.at(p.hours_since_treatment)
    area = np.array([c.area_um2() for c in cells])
    volume = np.array([c.volume_um3() for c in cells])
    occ = _Occupancy(o.min_separation_um)

    # -- endolysosomes: total volume from the kinetics ------------------------------------
    lo, hi = (d / 2 for d in o.endolysosome_diameter_um)
    lyso_target = state.endolysosomal_volume_fraction * volume * rng.lognormal(-0.02, 0.2, n)
    lyso_r, lyso_owner = [], []
    for i in range(n):
        mean_vol = 4 / 3 * np.pi * ((hi**3 - lo**3) / (3 * np.log(hi / lo)) if hi > lo else lo**3)
        r = _log_uniform(rng, lo, hi, int(2 * lyso_target[i] / mean_vol) + 20)
        k = int(np.searchsorted(np.cumsum(4 / 3 * np.pi * r**3), lyso_target[i])) + 1
        lyso_r.append(r[:k])
        lyso_owner.append(np.full(min(k, len(r)), i))
    lyso_r = np.concatenate(lyso_r)
    lyso_owner = np.concatenate(lyso_owner)
    lyso_c, ok = _place_spheres(rng, arr, lyso_owner, lyso_r, occ, o.membrane_um)
    endolysosomes = SphereSet(lyso_c[ok], lyso_r[ok], lyso_owner[ok].astype(np.int32))

    # -- mitochondria, then lipid droplets -----------------------------------------------
    mitochondria = _make_mitochondria(rng, p, arr, occ)
    nd = rng.integers(o.lipid_droplets_per_cell[0], o.lipid_droplets_per_cell[1] + 1, n)
    ld_owner = np.repeat(np.arange(n), nd)
    ld_r = _log_uniform(rng, *(d / 2 for d in o.lipid_droplet_diameter_um), len(ld_owner))
    ld_c, ok = _place_spheres(rng, arr, ld_owner, ld_r, occ, o.membrane_um)
    lipid_droplets = SphereSet(ld_c[ok], ld_r[ok], ld_owner[ok].astype(np.int32))

    # -- particle clusters ------------------------------------------------------------------
    pr_max = o.particle_diameter_nm[1] * 0.5e-3
    spacing = o.lattice_spacing_factor * 2 * pr_max
    lat = _Lattice(spacing, pr_max, max(hi * o.lysosome_fill[1], o.free_cluster_radius_um))
    # exactly the curve's share of cells takes particles up (which ones is random)
    has = np.zeros(n, bool)
    has[rng.permutation(n)[: int(round(state.fraction_cells_with_particles * n))]] = True
    cv = p.kinetics.cell_to_cell_cv
    sigma = np.sqrt(np.log1p(cv**2))
    load = rng.lognormal(-sigma**2 / 2, sigma, n) if cv > 0 else np.ones(n)
    # the curve is the mean over all cells; cells that took particles up carry it all
    per_carrier = state.particle_area_fraction / max(state.fraction_cells_with_particles, 1e-9)
    area_target = np.where(has, per_carrier * area * load, 0.0)
    f_l = state.fraction_particles_in_endolysosomes

    lyso_cells = endolysosomes.cell_id
    lc_lyso, lc_sites, free_owner, free_sites = [], [], [], []
    for i in np.flatnonzero(area_target > 0):
        mine = np.flatnonzero(lyso_cells == i)
        mine = mine[rng.permutation(len(mine))]
        fill = rng.uniform(*o.lysosome_fill, len(mine))
        k_l = lat.n_sites(fill * endolysosomes.radius_um[mine])
        env_l = lat.envelope(k_l)
        # free clusters: a few particles to a few dozen
        k_f = lat.n_sites(o.free_cluster_radius_um * rng.uniform(0, 1, 4000) ** 0.7)
        env_f = lat.envelope(k_f)
        # split the area so that particle numbers (~ sites) split as f_l : 1 - f_l
        per_area_l = k_l.sum() / max((np.pi * env_l**2).sum(), 1e-12) if len(mine) else 0.0
        per_area_f = k_f.sum() / (np.pi * env_f**2).sum()
        w = f_l * per_area_f / (f_l * per_area_f + (1 - f_l) * per_area_l) if per_area_l > 0 else 0.0
        cum_l = np.cumsum(np.pi * env_l**2)
        n_l = int(np.searchsorted(cum_l, w * area_target[i])) + (1 if w > 0 else 0)
        n_l = min(n_l, len(mine))
        got_l = cum_l[n_l - 1] if n_l else 0.0
        rest = max(area_target[i] - got_l, 0.0)
        cum_f = np.cumsum(np.pi * env_f**2)
        n_f = min(int(np.searchsorted(cum_f, rest)) + (1 if rest > 0 else 0), len(k_f))
        lc_lyso.append(mine[:n_l])
        lc_sites.append(k_l[:n_l])
        free_owner.append(np.full(n_f, i))
        free_sites.append(k_f[:n_f])

    clusters = ParticleClusters.empty()
    if lc_lyso:
        lc_lyso = np.concatenate(lc_lyso).astype(np.int64)
        lc_sites = np.concatenate(lc_sites)
        free_owner = np.concatenate(free_owner)
        free_sites = np.concatenate(free_sites)
        # free clusters are placed as spheres of their envelope; clusters in endolysosomes sit off-centre inside them
        f_env = lat.envelope(free_sites)
        f_c, ok = _place_spheres(rng, arr, free_owner, f_env, occ, o.membrane_um)
        free_owner, free_sites, f_c = free_owner[ok], free_sites[ok], f_c[ok]
        l_env = lat.envelope(lc_sites)
        slack = np.clip(endolysosomes.radius_um[lc_lyso] - l_env, 0, None)
        v = rng.normal(0, 1, (len(lc_lyso), 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        l_c = endolysosomes.center_um[lc_lyso] + v * (slack * rng.uniform(0, 0.8, len(lc_lyso)))[:, None]
        centers = np.concatenate([l_c, f_c])
        sites = np.concatenate([lc_sites, free_sites])
        owner = np.concatenate([endolysosomes.cell_id[lc_lyso], free_owner]).astype(np.int32)
        lyso_index = np.concatenate([lc_lyso, np.full(len(free_owner), -1)]).astype(np.int32)
        occupancy = rng.uniform(*o.lattice_occupancy, len(sites))
        pts, prad, pcl, start, counts, env = _pack_clusters(rng, lat, centers, sites, occupancy, o)
        clusters = ParticleClusters(centers, env, counts, owner, lyso_index, pts, prad, pcl, start)

    return World(
        params=p,
        seed=int(seed),
        grid=p.grid,
        cells=cells,
        lipid_droplets=lipid_droplets,
        endolysosomes=endolysosomes,
        clusters=clusters,
        mitochondria=mitochondria,
        lm_to_em=embedding_matrix(p.embedding),
        cell_has_particles=has & (np.bincount(clusters.cell_id, minlength=n) > 0),
        uptake=state,
    )
