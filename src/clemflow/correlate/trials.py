"""Registration trials built from the simulated specimen: droplet point sets in both frames, with the truth.

One trial is what registration faces on a real pair: the lipid droplets of a
cell as the confocal stack reports them and as the (partial) EM volume
reports them, in two physical frames related by an unknown transform. The
trial perturbs the light side the way real data does (any rotation about the
optical axis, a mirror or not, a scale error, a different z scale) and makes
both sides imperfect (position noise of each modality, droplets missed,
spurious ones, droplets below the light resolution absent, the EM covering
part of the cell). It keeps what judges a result: the true LM -> EM matrix,
the true droplet pairs (for the floor: the same model fitted to them), and
structures not used for registration (endolysosome and particle-cluster
centres) on which the target registration error (TRE) is measured.

Truth comes from the specimen geometry alone (:func:`cell_truth`, no
rendering) or from a rendered :class:`~clemflow.simulators.specimen.clem_pair.ClemPair`
(:func:`pair_truth`); detected droplets of such a pair can replace the
simulated noise and misses of either side (``lm_detected`` / ``em_detected``
of :func:`make_trial`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .models import apply, fit_model

__all__ = ["CellTruth", "Trial", "TrialSettings", "cell_truth", "pair_truth", "make_trial", "make_trials",
           "eligible_cells"]

_PERM = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)  # face (s, u, v) -> EM volume (x=u, y=v, z=s)


@dataclass(frozen=True, eq=False)
class CellTruth:
    """A cell's droplets and TRE structures in the LM and EM physical frames, and the exact map between them.

    EM z is the milling axis (planes), so "the EM covers part of the cell" is a window in EM z.
    """

    lm_to_em: np.ndarray  # (4, 4)
    droplets_lm: np.ndarray  # (N, 3) µm
    droplets_em: np.ndarray  # (N, 3) µm
    droplet_radius_um: np.ndarray  # (N,)
    targets_lm: np.ndarray  # (S, 3) endolysosome and particle-cluster centres
    targets_em: np.ndarray  # (S, 3)
    em_z_range: tuple[float, float]  # the cell's extent along the milling axis in EM µm
    label: str = ""


@dataclass(frozen=True)
class TrialSettings:
    """How a trial perturbs and degrades the truth. Ranges are drawn uniformly per trial.

    Defaults follow the issue's goal (any rotation about the optical axis, mirrored or not, scale
    0.95-1.05, z-scale +-15 %, EM over half the cell, 20-30 % missing and spurious on each side) and
    the field notes on localisation error (LM 30-60 nm lateral and 80-200 nm axial, EM 20-50 nm,
    standard deviations per axis). On the light side droplets below ``lm_min_diameter_um`` are absent
    *in addition* to the random misses; droplets closer than the light resolution are merged on both
    sides (the EM detector merges them too, as light microscopy sees one).
    """

    mirror_probability: float = 0.5
    scale: tuple[float, float] = (0.95, 1.05)
    z_scale: tuple[float, float] = (0.85, 1.15)
    em_coverage: float = 0.5
    missing: tuple[float, float] = (0.2, 0.3)
    spurious: tuple[float, float] = (0.2, 0.3)
    lm_noise_lateral_um: tuple[float, float] = (0.03, 0.06)
    lm_noise_axial_um: tuple[float, float] = (0.08, 0.2)
    em_noise_um: tuple[float, float] = (0.02, 0.05)
    lm_min_diameter_um: float = 0.3
    merge_gap_um: tuple[float, float] = (0.2, 0.5)  # lateral, axial surface gap under which droplets merge
    detection_match_um: float = 0.6  # a detection within this of a true droplet is that droplet


@dataclass(frozen=True, eq=False)
class Trial:
    """Two droplet point sets, the true LM -> EM matrix, the true pairs and the TRE structures."""

    lm_um: np.ndarray  # (N, 3) light droplets, in the perturbed light frame
    em_um: np.ndarray  # (M, 3) EM droplets
    lm_to_em: np.ndarray  # (4, 4) true map from this trial's light frame to EM
    pairs: np.ndarray  # (K, 2) int: (lm index, em index) of the same droplet
    targets_lm: np.ndarray  # (S, 3) TRE structures within the EM-covered part, true positions
    targets_em: np.ndarray  # (S, 3)
    perturbation: np.ndarray  # (4, 4) the cell's light frame -> this trial's light frame
    mirrored: bool
    scale: float
    z_scale: float
    angle_deg: float
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def tre_um(self, matrix: np.ndarray) -> float:
        """Median distance over the TRE structures between where ``matrix`` puts them and the truth."""
        return float(np.median(np.linalg.norm(apply(matrix, self.targets_lm) - self.targets_em, axis=1)))

    def floor_um(self, model: str = "similarity_z") -> float:
        """TRE of ``model`` fitted to the true droplet pairs, positions as detected: what no matching beats."""
        m = fit_model(model, self.lm_um[self.pairs[:, 0]], self.em_um[self.pairs[:, 1]])
        return self.tre_um(m)


# ---------------------------------------------------------------------------------------------- truth


def _matrix(linear: np.ndarray, offset: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = offset
    return m


def _cell_objects(world: Any, cell_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dish positions of the cell's droplets, their radii, and its endolysosome + cluster centres."""
    ld = world.lipid_droplets
    d = ld.cell_id == cell_id
    targets = [world.endolysosomes.center_um[world.endolysosomes.cell_id == cell_id],
               world.clusters.center_um[world.clusters.cell_id == cell_id]]
    return ld.center_um[d], ld.radius_um[d], np.concatenate(targets)


def cell_truth(world: Any, cell_id: int, *, lm_axial_factor: float = 1.0, max_targets: int = 600,
               seed: int = 0) -> CellTruth:
    """A cell's truth from the specimen geometry, without rendering (milliseconds instead of seconds).

    The light frame is the one ``make_clem_pair`` gives the cell's 63x stack; the EM frame has the
    same axes as that pair's EM volume (milled along the block's y through the cell's centre) with
    its origin at the corner of the cell's box, so only the EM translation differs from a rendered
    pair's. ``max_targets`` TRE structures are kept (a random subset, for speed).
    """
    from clemflow.simulators.specimen.em import face_through
    from clemflow.simulators.specimen.em_geometry import face_frame
    from clemflow.simulators.specimen.lm import OBJECTIVES

    cell = world.cells[cell_id]
    pl = OBJECTIVES["63x"].pixel_um
    n = int(np.ceil(2 * (cell.max_radius_um + 1.5) / pl / 16) * 16)
    cx, cy = cell.center_um
    dish_to_lm = _matrix(np.diag([1.0, 1.0, 1.0 / lm_axial_factor]),
                         np.array([-(cx - (n - 1) / 2 * pl), -(cy - (n - 1) / 2 * pl), 0.5 / lm_axial_factor]))
    frame = face_frame(np.asarray(world.lm_to_em, float), face_through(world, [cx, cy, 0.0]))
    block = np.asarray(world.lm_to_em, float)
    lin = _PERM @ frame.axes @ block[:3, :3]
    off = _PERM @ frame.axes @ (block[:3, 3] - frame.origin)
    drops, radii, targets = _cell_objects(world, cell_id)
    em_all = np.concatenate([drops, targets]) @ lin.T + off
    dish_to_em = _matrix(lin, off - em_all.min(axis=0) + 1.0)
    return _truth(dish_to_lm, dish_to_em, drops, radii, targets, max_targets, seed,
                  f"world {getattr(world, 'seed', '?')} cell {cell_id}")


def pair_truth(pair: Any, *, max_targets: int = 600, seed: int = 0) -> CellTruth:
    """A rendered pair's truth (its exact frames), for trials on detected droplets."""
    drops, radii, targets = _cell_objects(pair.world, pair.cell_id)
    return _truth(np.asarray(pair.dish_to_lm, float), np.asarray(pair.dish_to_em, float), drops, radii, targets,
                  max_targets, seed, f"pair of cell {pair.cell_id}")


def _truth(dish_to_lm, dish_to_em, drops, radii, targets, max_targets, seed, label) -> CellTruth:
    all_em = apply(dish_to_em, np.concatenate([drops, targets]))
    if len(targets) > max_targets:
        targets = targets[np.random.default_rng(seed).choice(len(targets), max_targets, replace=False)]
    return CellTruth(lm_to_em=dish_to_em @ np.linalg.inv(dish_to_lm), droplets_lm=apply(dish_to_lm, drops),
                     droplets_em=apply(dish_to_em, drops), droplet_radius_um=np.asarray(radii, float),
                     targets_lm=apply(dish_to_lm, targets), targets_em=apply(dish_to_em, targets),
                     em_z_range=(float(all_em[:, 2].min()), float(all_em[:, 2].max())), label=label)


# ---------------------------------------------------------------------------------------------- one trial


def _merge(lm: np.ndarray, em: np.ndarray, radius: np.ndarray, gap: tuple[float, float]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Droplets whose surfaces are closer than the light resolution, merged (volume-weighted centres)."""
    if len(lm) < 2:
        return lm, em, radius
    reach = 2 * float(radius.max()) + max(gap)
    pairs = cKDTree(lm).query_pairs(reach, output_type="ndarray")
    if len(pairs):
        i, j = pairs.T
        dxy = np.linalg.norm(lm[i, :2] - lm[j, :2], axis=1)
        dz = np.abs(lm[i, 2] - lm[j, 2])
        rr = radius[i] + radius[j]
        close = (dxy / (rr + gap[0])) ** 2 + (dz / (rr + gap[1])) ** 2 < 1.0
        i, j = i[close], j[close]
    else:
        i = j = np.zeros(0, int)
    n = len(lm)
    _, group = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    vol = radius**3
    tot = np.bincount(group, vol)
    centre = lambda p: np.stack([np.bincount(group, vol * p[:, k]) for k in range(3)], axis=1) / tot[:, None]  # noqa: E731
    return centre(lm), centre(em), np.cbrt(tot)


def _random_rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _match_detections(detected: np.ndarray, truth: np.ndarray, within: float) -> np.ndarray:
    """For each truth point, the index of the detection that is it (one-to-one, within ``within``), or -1."""
    out = np.full(len(truth), -1)
    if len(detected) == 0 or len(truth) == 0:
        return out
    d = np.linalg.norm(truth[:, None, :] - detected[None, :, :], axis=2)
    r, c = linear_sum_assignment(np.minimum(d, 10 * within))
    ok = d[r, c] <= within
    out[r[ok]] = c[ok]
    return out


def _spurious(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` false droplets: places inside the cell (other organelles) with 0.3 µm jitter."""
    if n <= 0 or len(pool) == 0:
        return np.zeros((0, 3))
    return pool[rng.integers(0, len(pool), n)] + rng.normal(0.0, 0.3, (n, 3))


def make_trial(truth: CellTruth, rng: np.random.Generator | int, settings: TrialSettings = TrialSettings(), *,
               lm_detected: np.ndarray | None = None, em_detected: np.ndarray | None = None) -> Trial:
    """One trial from a cell's truth: perturb the light frame, degrade both sides, keep the judge's truth.

    ``lm_detected`` (N, 3) in the truth's LM frame / ``em_detected`` (M, 3) in its EM frame: detected
    droplet centres to use instead of the simulated noise, misses and spurious droplets of that side
    (the true pairs are then the detections within ``detection_match_um`` of a true droplet). The EM
    coverage window still applies to EM detections; pass ``em_coverage=1`` when the volume itself is
    already partial.
    """
    s = settings
    rng = np.random.default_rng(rng)
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    lm0, em0, rad = _merge(truth.droplets_lm, truth.droplets_em, truth.droplet_radius_um, s.merge_gap_um)
    n = len(rad)
    # -- the perturbed light frame: z stretched, mirrored or not, rotated about the optical axis, scaled
    mirrored = bool(rng.random() < s.mirror_probability)
    angle = float(rng.uniform(-np.pi, np.pi))
    scale, zs = u(s.scale), u(s.z_scale)
    centre = lm0.mean(axis=0) if n else np.zeros(3)
    lin = scale * _random_rotation_z(angle) @ np.diag([1.0, -1.0 if mirrored else 1.0, 1.0]) @ np.diag([1, 1, zs])
    perturb = _matrix(lin, centre - lin @ centre)
    true_lm_to_em = truth.lm_to_em @ np.linalg.inv(perturb)
    # -- EM coverage: a window along the milling axis
    z0, z1 = truth.em_z_range
    start = z0 + rng.uniform(0, 1 - s.em_coverage) * (z1 - z0)
    window = (start, start + s.em_coverage * (z1 - z0))
    inside = lambda p: (p[:, 2] >= window[0]) & (p[:, 2] <= window[1])  # noqa: E731
    pool_lm, pool_em = truth.targets_lm, truth.targets_em[inside(truth.targets_em)]

    # -- light side: index into the merged droplets, or -1 for a spurious one
    if lm_detected is None:
        seen = np.flatnonzero(2 * rad >= s.lm_min_diameter_um)
        seen = seen[rng.random(len(seen)) >= u(s.missing)]
        sigma = np.array([u(s.lm_noise_lateral_um)] * 2 + [u(s.lm_noise_axial_um)])
        lm_pts = lm0[seen] + rng.normal(0.0, 1.0, (len(seen), 3)) * sigma
        fake = _spurious(rng, pool_lm, int(round(u(s.spurious) * len(seen))))
        lm_pts, lm_id = np.concatenate([lm_pts, fake]), np.concatenate([seen, np.full(len(fake), -1)])
    else:
        lm_pts = np.asarray(lm_detected, float).reshape(-1, 3)
        which = _match_detections(lm_pts, lm0, s.detection_match_um)
        lm_id = np.full(len(lm_pts), -1)
        lm_id[which[which >= 0]] = np.flatnonzero(which >= 0)
    lm_pts = apply(perturb, lm_pts)
    # -- electron side
    if em_detected is None:
        seen = np.flatnonzero(inside(em0))
        seen = seen[rng.random(len(seen)) >= u(s.missing)]
        em_pts = em0[seen] + rng.normal(0, u(s.em_noise_um), (len(seen), 3))
        fake = _spurious(rng, pool_em, int(round(u(s.spurious) * len(seen))))
        em_pts, em_id = np.concatenate([em_pts, fake]), np.concatenate([seen, np.full(len(fake), -1)])
    else:
        em_pts = np.asarray(em_detected, float).reshape(-1, 3)
        em_pts = em_pts[inside(em_pts)]
        which = _match_detections(em_pts, em0, s.detection_match_um)
        em_id = np.full(len(em_pts), -1)
        em_id[which[which >= 0]] = np.flatnonzero(which >= 0)
    # -- shuffle (indices must carry no hint), then the true pairs
    pl, pe = rng.permutation(len(lm_pts)), rng.permutation(len(em_pts))
    lm_pts, lm_id, em_pts, em_id = lm_pts[pl], lm_id[pl], em_pts[pe], em_id[pe]
    where_em = np.full(n, -1)
    where_em[em_id[em_id >= 0]] = np.flatnonzero(em_id >= 0)
    li = np.flatnonzero(lm_id >= 0)
    li = li[where_em[lm_id[li]] >= 0]
    pairs = np.stack([li, where_em[lm_id[li]]], axis=1) if len(li) else np.zeros((0, 2), int)
    keep = inside(truth.targets_em)
    return Trial(lm_um=lm_pts, em_um=em_pts, lm_to_em=true_lm_to_em, pairs=pairs.astype(int),
                 targets_lm=apply(perturb, truth.targets_lm[keep]), targets_em=truth.targets_em[keep],
                 perturbation=perturb, mirrored=mirrored, scale=scale, z_scale=zs,
                 angle_deg=float(np.degrees(angle)), label=truth.label,
                 info={"em_window_um": window, "droplets": n})


# ---------------------------------------------------------------------------------------------- many trials


_WORLDS: dict[tuple[int, Any], Any] = {}


def _world(seed: int, params: Any) -> Any:
    from clemflow.simulators.specimen import SpecimenParams, generate_world

    p = params if params is not None else SpecimenParams(n_columns=1, n_rows=1)
    key = (seed, p)
    if key not in _WORLDS:
        _WORLDS[key] = generate_world(p, seed=seed)
    return _WORLDS[key]


def eligible_cells(world: Any, min_droplets: int) -> list[int]:
    """Cells with at least ``min_droplets`` lipid droplets (the ones a person would pick for correlation)."""
    counts = np.bincount(world.lipid_droplets.cell_id, minlength=len(world.cells))
    return [int(c) for c in np.flatnonzero(counts >= min_droplets)]


def make_trials(n: int, seed: int = 0, settings: TrialSettings = TrialSettings(), *,
                world_seeds: tuple[int, ...] = (0, 1, 2, 3), params: Any = None, min_droplets: int = 60,
                min_pairs: int = 10) -> list[Trial]:
    """``n`` trials on cells of simulated worlds (one 600 µm square each unless ``params`` says otherwise).

    Cells are drawn among those with at least ``min_droplets`` droplets. A draw whose true pairs are
    fewer than ``min_pairs`` is drawn again (at most 20 times; ``info["redrawn"]`` counts it): with so
    few droplets in common no method can confirm a registration, and refusing is then the right
    answer, which the trials of the refusal rule test separately. Deterministic for ``seed``.
    """
    cells = [(w, c) for w in world_seeds for c in eligible_cells(_world(w, params), min_droplets)]
    if not cells:
        raise ValueError(f"no cell with at least {min_droplets} droplets in worlds {world_seeds}; lower min_droplets")
    truths: dict[tuple[int, int], CellTruth] = {}
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        for attempt in range(20):
            w, c = cells[int(rng.integers(len(cells)))]
            if (w, c) not in truths:
                truths[(w, c)] = cell_truth(_world(w, params), c, seed=seed)
            trial = make_trial(truths[(w, c)], rng, settings)
            if len(trial.pairs) >= min_pairs:
                break
        trial.info["redrawn"] = attempt
        out.append(trial)
    return out
