"""Register light-microscopy droplets to EM droplets with no initial guess, or refuse.

The transform between the confocal stack and the FIB-SEM volume is unknown in
every respect that matters: the block was trimmed and mounted at any angle,
the dish may be seen from below (a mirror), shrinkage and the refractive
index change scale and depth, and the EM covers only part of the cell. So
registration does not iterate from a start; it searches (:mod:`.ransac`):

1. pair droplet triangles of the same shape in the two sets and turn each
   pairing into a similarity, both handednesses (tens of thousands of them);
2. rank them by how many droplets they bring within reach of an EM droplet;
3. refine the best few: one-to-one nearest neighbours (mutual), least
   squares, again, with the depth scale free once enough pairs agree;
4. keep the refinement with the most droplets agreeing within
   ``max_residual_um``, choose the model by leave-one-out error, preferring
   the simpler one when they tie within noise.

A wrong answer that looks confirmed is the dangerous failure (the particles
would be placed in the wrong organelles), so fewer than ``min_inliers``
agreeing droplets, or a transform outside the plausible scale range, raise
:class:`CorrelationRefused` with the reason instead of returning a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .models import MIN_POINTS, MODELS, apply, describe, fit_model, fit_similarity_z
from .ransac import HitGrid, match_triangles, triangle_similarities, triangles

__all__ = ["Registration", "CorrelationRefused", "register_points", "leave_one_out", "choose_model"]

_MIN_PAIRS_LOO = {"similarity": 6, "similarity_z": 8, "affine": 12}
"""Pairs below which a model is not compared: its leave-one-out fits would rest on too few points."""


@dataclass(frozen=True, eq=False)
class Registration:
    """The LM -> EM transform found, with the evidence a person (and the journal) needs to trust it."""

    matrix: np.ndarray  # (4, 4) LM physical µm -> EM physical µm, rows [x, y, z, 1]
    model: str
    mirrored: bool
    scale: float
    z_scale: float  # stretch of the LM z axis relative to x and y
    pairs: np.ndarray  # (K, 2) int: (lm index, em index) of the agreeing droplets
    residuals_um: np.ndarray  # (K,) distance of each pair after the transform
    loo_tre_um: np.ndarray  # (K,) error at each pair when it is left out of the fit
    tre_estimate_um: float  # median of loo_tre_um
    candidates: int  # transform hypotheses examined
    models_tried: dict[str, float] = field(default_factory=dict)  # model -> median leave-one-out error, µm


class CorrelationRefused(Exception):
    """Registration declined to answer: too few droplets, or too few of them agree on one transform.

    ``reason`` says which, in words for the log and the journal; ``best_inliers`` is how many droplets
    the best placement found did bring together (0 when there was nothing to try).
    """

    def __init__(self, reason: str, best_inliers: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.best_inliers = int(best_inliers)


# ------------------------------------------------------------------------------------------ helpers


class _Agreement:
    """Which droplets agree under a transform: one to one, mutual nearest, within the light microscope's error.

    Confocal localisation is two to three times worse along the optical axis than across it, so a
    pair agrees when its error, split along the mapped LM optical axis and across it, lies inside
    the ellipsoid of semi-axes ``max_residual`` (along) and ``lateral_fraction * max_residual``
    (across). An isotropic gate as loose as the axial error would let chance coincidences in
    from a volume several times larger.
    """

    def __init__(self, lm: np.ndarray, em: np.ndarray, max_residual: float, lateral_fraction: float) -> None:
        self.lm, self.em = lm, em
        self.max_residual = float(max_residual)
        self.lateral = float(lateral_fraction)

    def _whiten(self, matrix: np.ndarray) -> np.ndarray:
        """The map that shrinks the mapped LM optical axis by 1 / lateral_fraction (identity across it)."""
        axis = matrix[:3, 2] / np.linalg.norm(matrix[:3, 2])
        return np.eye(3) - (1.0 - self.lateral) * np.outer(axis, axis)

    def pairs(self, matrix: np.ndarray, widen: float = 1.0) -> np.ndarray:
        """(K, 2) agreeing pairs (lm, em); ``widen`` scales the gate (a rough hypothesis needs room)."""
        w = self._whiten(matrix)
        moved = apply(matrix, self.lm) @ w.T
        em = self.em @ w.T
        gate = widen * self.lateral * self.max_residual
        d, j = cKDTree(em).query(moved, 1, distance_upper_bound=gate)
        i = np.flatnonzero(np.isfinite(d))
        if len(i) == 0:
            return np.zeros((0, 2), int)
        back = cKDTree(moved[i]).query(em[j[i]], 1)[1]
        mutual = back == np.arange(len(i))
        return np.stack([i[mutual], j[i][mutual]], axis=1)

    def residuals(self, matrix: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Euclidean EM-frame distances (µm) of the pairs under ``matrix``."""
        return np.linalg.norm(apply(matrix, self.lm[pairs[:, 0]]) - self.em[pairs[:, 1]], axis=1)

    def fit(self, model: str, pairs: np.ndarray) -> np.ndarray:
        return fit_model(model, self.lm[pairs[:, 0]], self.em[pairs[:, 1]])

    def prune(self, model: str, matrix: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """The pairs that the others predict: worst leave-one-out error outside the gate dropped, one at a time.

        A chance coincidence fits because the transform was bent to it; left out, it is not predicted.
        """
        w = self._whiten(matrix)
        gate = self.lateral * self.max_residual
        while len(pairs) > MIN_POINTS[model] + 1:
            err = np.linalg.norm(_loo_vectors(model, self.lm[pairs[:, 0]], self.em[pairs[:, 1]]) @ w.T, axis=1)
            worst = int(np.argmax(err))
            if err[worst] <= gate:
                break
            pairs = np.delete(pairs, worst, axis=0)
        return pairs


def _within(matrix: np.ndarray, scale_range: tuple[float, float], z_range: tuple[float, float]) -> bool:
    d, eps = describe(matrix), 1e-9
    return (scale_range[0] - eps <= d["scale"] <= scale_range[1] + eps) and (
        z_range[0] - eps <= d["z_scale"] <= z_range[1] + eps)


def _loo_vectors(model: str, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(K, 3) error vector at each pair of ``model`` fitted to all the other pairs."""
    k = len(src)
    out = np.empty((k, 3))
    keep = np.ones(k, bool)
    start = fit_similarity_z(src, dst) if model == "similarity_z" else None
    for i in range(k):
        keep[i] = False
        if start is not None:  # one pair less barely moves the fit: start the alternation from the full one
            m = fit_similarity_z(src[keep], dst[keep], start=start, tol=1e-7)
        else:
            m = fit_model(model, src[keep], dst[keep])
        out[i] = dst[i] - apply(m, src[i:i + 1])[0]
        keep[i] = True
    return out


def leave_one_out(model: str, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(K,) error at each pair of ``model`` fitted to all the other pairs: an honest TRE estimate."""
    return np.linalg.norm(_loo_vectors(model, src, dst), axis=1)


@dataclass
class _Fit:
    matrix: np.ndarray
    model: str
    pairs: np.ndarray
    residuals: np.ndarray

    @property
    def key(self) -> tuple[int, float]:  # more agreeing droplets first, then tighter
        return (len(self.pairs), -float(np.sqrt(np.mean(self.residuals**2))) if len(self.residuals) else 0.0)


def _refine(matrix: np.ndarray, agree: _Agreement, seen: set[bytes], iterations: int = 8
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """Similarity and one-to-one nearest-neighbour pairs, alternated from a hypothesis; ``None`` if nowhere new.

    The gate narrows from twice the agreement gate (a hypothesis is only as good as its triangle).
    ``seen`` holds the first pairings of hypotheses already refined: the best triangles often propose
    the same transform, and it need not be refined twice.
    """
    m = matrix
    widen = np.linspace(2.0, 1.0, 3)
    last = b""
    pairs = np.zeros((0, 2), int)
    for it in range(iterations):
        pairs = agree.pairs(m, widen[min(it, len(widen) - 1)])
        if len(pairs) < 4:
            return None
        key = pairs.tobytes()
        if it == 0:
            if key in seen:
                return None
            seen.add(key)
        if key == last:
            break
        last = key
        m = agree.fit("similarity", pairs)
    return m, agree.pairs(m)


def _enrich(m: np.ndarray, pairs: np.ndarray, agree: _Agreement, models: tuple[str, ...], scale_range, z_range
            ) -> _Fit | None:
    """The refined similarity, given the richer model (depth scale free) where enough pairs allow and it stays
    within the plausible ranges; ``None`` if nothing plausible remains."""
    for name in models[1:] if len(pairs) >= 8 else ():
        cand = m
        for _ in range(3):
            try:
                cand = agree.fit(name, pairs)
            except ValueError:
                break
            new = agree.pairs(cand)
            if len(new) < 4 or np.array_equal(new, pairs):
                break
            pairs = new
        if _within(cand, scale_range, z_range):
            m = cand
    if not _within(m, scale_range, z_range):
        return None
    pairs = agree.pairs(m)
    return _Fit(m, "refine", pairs, agree.residuals(m, pairs))


def _refit(model: str, agree: _Agreement, pairs: np.ndarray, rounds: int = 3) -> _Fit:
    """``model`` fitted to pairs, pairs re-found with it, a few rounds (the final pairs are the model's own)."""
    m = agree.fit(model, pairs)
    for _ in range(rounds):
        new = agree.pairs(m)
        if len(new) < 4 or np.array_equal(new, pairs):
            break
        pairs = new
        m = agree.fit(model, pairs)
    return _Fit(m, model, pairs, agree.residuals(m, pairs))


# ------------------------------------------------------------------------------------------ the search


_STAGES = ((5, 12, 30), (8, 14, 60))
"""Search stages (neighbours of the sparser set, of the denser set, hypotheses refined): the second,
three times the work, runs only when the first confirms nothing (few droplets in common, spread out)."""


_LOCAL, _SHORTLIST = 12, 2000
"""Droplets around a triangle for the first look at its hypotheses, and hypotheses kept for the full count."""

_CONTENDER_MARGIN = 3
"""Refined similarities within this many pairs of the best are tried with the depth scale free."""


@dataclass(frozen=True)
class _Setup:
    model: str
    min_inliers: int
    scale_range: tuple[float, float]
    z_range: tuple[float, float]
    shape_tol: float
    max_hypotheses: int
    seed: int


def _search(agree: _Agreement, setup: _Setup, k_sparse: int, k_dense: int, refine_top: int
            ) -> tuple[_Fit | None, int]:
    """The refined hypothesis with the most agreeing droplets, and how many hypotheses were ranked."""
    lm, em = agree.lm, agree.em
    # the sparser set gives few small triangles, the denser many: its neighbours include droplets
    # the other side lacks, and the triangle must be found whole on both sides
    spacing = [max(float(np.median(cKDTree(p).query(p, min(4, len(p)))[0][:, -1])), 1e-6) for p in (lm, em)]
    spacing[0] *= _scale_mid(setup.scale_range)
    density_ratio = (max(spacing) / min(spacing)) ** 3
    k_other = int(np.clip(np.ceil(1.5 * k_sparse * density_ratio), k_sparse + 3, k_dense))
    k_lm, k_em = (k_sparse, k_other) if spacing[0] >= spacing[1] else (k_other, k_sparse)
    tri_lm, tri_em = triangles(lm, k_lm), triangles(em, k_em, min_side_um=0.7, min_angle_deg=15)
    lo = setup.scale_range[0] * min(1.0, setup.z_range[0])
    hi = setup.scale_range[1] * max(1.0, setup.z_range[1])
    pairs, _ = match_triangles(tri_lm, tri_em, shape_tol=setup.shape_tol, log_scale=(np.log(lo), np.log(hi)))
    if len(pairs) > setup.max_hypotheses // 2:
        keep = np.random.default_rng(setup.seed).choice(len(pairs), setup.max_hypotheses // 2, replace=False)
        pairs = pairs[np.sort(keep)]
    if len(pairs) == 0:
        return None, 0
    lin, off = triangle_similarities(lm[tri_lm.vertices[pairs[:, 0]]], em[tri_em.vertices[pairs[:, 1]]])
    # rank by droplets brought within reach (isotropic, a little wide: the hypotheses are rough), first
    # among the droplets around the proposing triangle, then, for the best of those, among all
    grid = HitGrid(em, 1.2 * agree.max_residual)
    near = min(_LOCAL, len(lm))
    local = cKDTree(lm).query(lm[tri_lm.vertices].mean(axis=1), near)[1].reshape(len(tri_lm), near)
    first = grid.count(lin, off, lm, subset=np.concatenate([local[pairs[:, 0]]] * 2))
    shortlist = np.argsort(-first, kind="stable")[:_SHORTLIST]
    counts = np.full(len(lin), -1)
    counts[shortlist] = grid.count(lin[shortlist], off[shortlist], lm)
    models = ("similarity",) if setup.model == "similarity" else ("similarity", "similarity_z")
    refined = []
    seen: set[bytes] = set()
    for h in np.argsort(-counts, kind="stable")[:refine_top]:
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = lin[h], off[h]
        got = _refine(m, agree, seen)
        if got is not None:
            refined.append(got)
    # the richer model only for the contenders: it can add a few pairs, not turn an also-ran into a winner
    most = max((len(p) for _, p in refined), default=0)
    best: _Fit | None = None
    for m, p in refined:
        if len(p) < most - _CONTENDER_MARGIN:
            continue
        fit = _enrich(m, p, agree, models, setup.scale_range, setup.z_range)
        if fit is not None and (best is None or fit.key > best.key):
            best = fit
    return best, len(lin)


def _confirm(best: _Fit | None, agree: _Agreement, setup: _Setup, candidates: int) -> Registration:
    """Choose the model, keep only droplets the others predict, and check enough agree; or refuse."""
    n = 0 if best is None else len(best.pairs)
    if best is None or n < setup.min_inliers:
        raise CorrelationRefused(f"only {n} droplets agree ({setup.min_inliers} needed)", n)
    # the model: leave-one-out errors on the agreeing pairs; a richer model must earn its parameters
    names = MODELS if setup.model == "auto" else (setup.model,)
    src, dst = agree.lm[best.pairs[:, 0]], agree.em[best.pairs[:, 1]]
    loos: dict[str, np.ndarray] = {}
    for name in names:
        if n < (_MIN_PAIRS_LOO[name] if setup.model == "auto" else MIN_POINTS[name] + 2):
            continue
        try:
            loos[name] = leave_one_out(name, src, dst)
        except ValueError:  # e.g. droplets in one plane: that model is not determined by them
            continue
    if not loos:
        raise CorrelationRefused(f"the {n} agreeing droplets do not determine a {setup.model} transform", n)
    chosen = choose_model(loos)
    fit = _refit(chosen, agree, best.pairs)
    kept = agree.prune(chosen, fit.matrix, fit.pairs)
    if len(kept) < len(fit.pairs) and len(kept) > MIN_POINTS[chosen]:
        m = agree.fit(chosen, kept)
        fit = _Fit(m, chosen, kept, agree.residuals(m, kept))
    k = len(fit.pairs)
    if k < setup.min_inliers:
        raise CorrelationRefused(f"only {k} droplets agree ({setup.min_inliers} needed)", k)
    d = describe(fit.matrix)
    if not _within(fit.matrix, setup.scale_range, setup.z_range):
        raise CorrelationRefused(f"the best placement needs scale {d['scale']:.2f} and z scale {d['z_scale']:.2f}, "
                                 f"outside {setup.scale_range} and {setup.z_range}", k)
    loo = leave_one_out(chosen, agree.lm[fit.pairs[:, 0]], agree.em[fit.pairs[:, 1]])
    return Registration(matrix=fit.matrix, model=chosen, mirrored=bool(d["mirrored"]), scale=float(d["scale"]),
                        z_scale=float(d["z_scale"]), pairs=fit.pairs, residuals_um=fit.residuals, loo_tre_um=loo,
                        tre_estimate_um=float(np.median(loo)), candidates=candidates,
                        models_tried={name: float(np.median(v)) for name, v in loos.items()})


def register_points(
    lm_um: np.ndarray,
    em_um: np.ndarray,
    *,
    model: str = "auto",
    min_inliers: int = 8,
    max_residual_um: float = 0.5,
    scale_range: tuple[float, float] = (0.8, 1.25),
    z_scale_range: tuple[float, float] = (0.7, 1.4),
    seed: int = 0,
    lateral_fraction: float = 0.5,
    shape_tol: float = 0.08,
    max_hypotheses: int = 200_000,
) -> Registration:
    """Find the LM -> EM transform from droplet centres (``[x, y, z]`` µm in each frame), with no starting guess.

    ``model``: ``"auto"`` (chosen by leave-one-out error) or one of :data:`~.models.MODELS`.
    ``scale_range``: plausible isotropic scale (block shrinkage, pixel-size error);
    ``z_scale_range``: plausible stretch of the LM z axis against x and y (refractive index, EM slice
    thickness). Droplets agree when, after the transform, they are each other's nearest, their
    distance is within ``max_residual_um`` along the light optical axis and ``lateral_fraction`` of
    that across it (confocal localisation is that much better laterally), and the transform fitted
    to the other pairs predicts them as well. Raises :class:`CorrelationRefused` when fewer than
    ``min_inliers`` agree. Deterministic: ``seed`` only picks which hypotheses are examined when
    there are more than ``max_hypotheses``.
    """
    lm = np.asarray(lm_um, float).reshape(-1, 3)
    em = np.asarray(em_um, float).reshape(-1, 3)
    if model != "auto" and model not in MODELS:
        raise ValueError(f"unknown model {model!r}; use 'auto' or one of {', '.join(MODELS)}")
    if not (np.all(np.isfinite(lm)) and np.all(np.isfinite(em))):
        raise ValueError("droplet centres must be finite (NaN or inf in lm_um or em_um)")
    if min_inliers < 4:
        raise ValueError(f"min_inliers must be at least 4 (got {min_inliers}): fewer pairs cannot confirm anything")
    if not (0 < scale_range[0] <= scale_range[1]) or not (0 < z_scale_range[0] <= z_scale_range[1]):
        raise ValueError(f"scale_range {scale_range} and z_scale_range {z_scale_range} must be (low, high) > 0")
    if len(em) < min_inliers:
        raise CorrelationRefused(f"fewer than {min_inliers} droplets detected in the EM volume ({len(em)})")
    if len(lm) < min_inliers:
        raise CorrelationRefused(f"fewer than {min_inliers} droplets detected in the light-microscopy stack ({len(lm)})")
    z_range = z_scale_range if model != "similarity" else (1.0, 1.0)
    setup = _Setup(model, int(min_inliers), tuple(scale_range), tuple(z_range), shape_tol, max_hypotheses, seed)
    agree = _Agreement(lm, em, max_residual_um, lateral_fraction)
    candidates = 0
    refused: CorrelationRefused | None = None
    for k_sparse, k_dense, top in _STAGES:
        best, n = _search(agree, setup, k_sparse, k_dense, top)
        candidates += n
        try:
            return _confirm(best, agree, setup, candidates)
        except CorrelationRefused as why:
            if refused is None or why.best_inliers >= refused.best_inliers:
                refused = why
    assert refused is not None
    raise refused


def _scale_mid(scale_range: tuple[float, float]) -> float:
    return float(np.sqrt(scale_range[0] * scale_range[1]))


def choose_model(loo: dict[str, np.ndarray], strictness: float = 1.0) -> str:
    """The model to use, from leave-one-out errors (K,) of each model on the same pairs.

    Walks from the simplest model up; a richer one replaces the current choice only if it lowers the
    squared leave-one-out errors, pair by pair, by more than ``strictness`` standard errors of that
    mean difference. Depth scaling is real but often small, and a parameter fitted to noise costs
    accuracy everywhere else.
    """
    names = [m for m in MODELS if m in loo]
    pick = names[0]
    for name in names[1:]:
        d = loo[pick] ** 2 - loo[name] ** 2
        if len(d) > 1 and d.mean() > strictness * d.std(ddof=1) / np.sqrt(len(d)):
            pick = name
    return pick
