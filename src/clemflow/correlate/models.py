"""Transform models between the light and electron frames, fitted to paired points by weighted least squares.

Three models, from the fewest parameters to the most:

- ``similarity``: rotation, isotropic scale and translation. The rotation may
  be improper: a dish seen from below, or a block face viewed from the other
  side, mirrors the image, so a mirror is a normal outcome, not an error.
- ``similarity_z``: the same after an extra scale of the *source* z axis. The
  light-microscopy z axis is the optical axis; focusing an oil objective into
  an aqueous sample (or a wrong slice thickness on the EM side) stretches
  depth alone, by 10-20 %.
- ``affine``: any linear map and translation (shrinkage and shear of the
  block included), for when the others leave a clear residual.

All matrices are 4x4 homogeneous, acting on rows ``[x, y, z, 1]`` as
``p @ m[:3, :3].T + m[:3, 3]`` (see :func:`apply`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MODELS", "MIN_POINTS", "apply", "fit_model", "fit_similarity", "fit_similarity_z", "fit_affine",
           "describe"]

MODELS = ("similarity", "similarity_z", "affine")
"""Model names, simplest first: model selection prefers the earlier one when errors tie."""

MIN_POINTS = {"similarity": 3, "similarity_z": 4, "affine": 4}
"""Pairs each model needs to be determined (affine: 4 not in one plane)."""


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 3) points mapped by a 4x4 homogeneous matrix."""
    p = np.asarray(points, float).reshape(-1, 3)
    m = np.asarray(matrix, float)
    return p @ m[:3, :3].T + m[:3, 3]


def _homogeneous(linear: np.ndarray, offset: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = offset
    return m


def _prepare(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None, model: str
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(src, float).reshape(-1, 3)
    q = np.asarray(dst, float).reshape(-1, 3)
    if len(p) != len(q):
        raise ValueError(f"src and dst must pair up row by row: {len(p)} vs {len(q)} points")
    w = np.ones(len(p)) if weights is None else np.asarray(weights, float).reshape(-1)
    if len(w) != len(p):
        raise ValueError(f"weights must have one value per pair: {len(w)} for {len(p)} pairs")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and non-negative")
    if np.count_nonzero(w) < MIN_POINTS[model]:
        raise ValueError(f"the {model} model needs at least {MIN_POINTS[model]} weighted pairs, "
                         f"got {np.count_nonzero(w)}")
    return p, q, w / w.sum()


def _rotation(cov: np.ndarray, handedness: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal R maximising trace(R^T cov) with det R = handedness (0: either), and the signs used."""
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(3)
    base = np.sign(np.linalg.det(u @ vt)) or 1.0
    if handedness and base != handedness:
        d[2] = -1.0
    return u @ np.diag(d) @ vt, d * s


def fit_similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, *,
                   handedness: int = 0) -> np.ndarray:
    """Least-squares similarity (Umeyama), the rotation proper (+1), improper (-1) or whichever fits (0).

    Three points in a plane fit a rotation and its mirror through that plane equally well, which is
    why triangle hypotheses ask for each handedness explicitly.
    """
    p, q, w = _prepare(src, dst, weights, "similarity")
    pc, qc = w @ p, w @ q
    p0, q0 = p - pc, q - qc
    cov = (q0 * w[:, None]).T @ p0
    r, sd = _rotation(cov, handedness)
    var = float(w @ np.einsum("ij,ij->i", p0, p0))
    if var <= 0:
        raise ValueError("the source points coincide: no scale or rotation can be fitted")
    scale = sd.sum() / var
    return _homogeneous(scale * r, qc - scale * r @ pc)


def fit_similarity_z(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, *,
                     start: np.ndarray | None = None, iterations: int = 60, tol: float = 1e-10) -> np.ndarray:
    """Least-squares ``R @ diag(a, a, b)``: a similarity after a separate scale of the source z axis.

    Solved by alternation: for fixed lateral/axial scales the rotation is an orthogonal Procrustes
    problem (improper allowed); for a fixed rotation the two scales are a linear least-squares fit.
    Starts from the similarity fit, so it is never worse than that, or from ``start`` (a 4x4 of this
    model fitted to nearly the same points, e.g. all pairs when one is left out: a few steps then).
    Stops when both scales change by less than ``tol`` (relative).
    """
    p, q, w = _prepare(src, dst, weights, "similarity_z")
    pc, qc = w @ p, w @ q
    p0, q0 = p - pc, q - qc
    if float(w @ p0[:, 2] ** 2) <= 1e-12 * max(float(w @ np.einsum("ij,ij->i", p0, p0)), 1e-300):
        raise ValueError("the source points lie in one z plane: their z scale cannot be fitted")
    if start is None:
        sim = fit_similarity(p, q, w)[:3, :3]
        a = b = float(np.cbrt(abs(np.linalg.det(sim))))
        r = sim / a
    else:
        lin = np.asarray(start, float)[:3, :3]
        col = np.linalg.norm(lin, axis=0)
        a, b = float(col[:2].mean()), float(col[2])
        u, _, vt = np.linalg.svd(lin / col)
        r = u @ vt
    wq = q0 * w[:, None]
    sxy = float(w @ np.einsum("ij,ij->i", p0[:, :2], p0[:, :2]))
    sz = float(w @ p0[:, 2] ** 2)
    for _ in range(iterations):
        # scales for this rotation: residual q0 - R @ (a p_xy, b p_z), linear in (a, b)
        rq = wq @ r  # rows: w * R^T q0
        a_new = float(np.sum(rq[:, :2] * p0[:, :2])) / sxy
        b_new = float(np.sum(rq[:, 2] * p0[:, 2])) / sz
        r, _ = _rotation(wq.T @ (p0 * [a_new, a_new, b_new]), 0)
        done = abs(a_new - a) <= tol * abs(a) and abs(b_new - b) <= tol * abs(b)
        a, b = a_new, b_new
        if done:
            break
    lin = r @ np.diag([a, a, b])
    return _homogeneous(lin, qc - lin @ pc)


def fit_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares affine map; refuses points that lie in one plane (the map would be a guess)."""
    p, q, w = _prepare(src, dst, weights, "affine")
    pc, qc = w @ p, w @ q
    p0, q0 = p - pc, q - qc
    sw = np.sqrt(w)[:, None]
    sv = np.linalg.svd(p0 * sw, compute_uv=False)
    if sv[-1] <= 1e-9 * max(sv[0], 1e-300):
        raise ValueError("the source points lie in one plane: an affine map is not determined by them")
    lin = np.linalg.lstsq(p0 * sw, q0 * sw, rcond=None)[0].T
    return _homogeneous(lin, qc - lin @ pc)


def fit_model(model: str, src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The 4x4 matrix of ``model`` (one of :data:`MODELS`) best mapping ``src`` (N, 3) onto ``dst`` (N, 3)."""
    if model == "similarity":
        return fit_similarity(src, dst, weights)
    if model == "similarity_z":
        return fit_similarity_z(src, dst, weights)
    if model == "affine":
        return fit_affine(src, dst, weights)
    raise ValueError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")


def describe(matrix: np.ndarray) -> dict[str, float | bool]:
    """Mirror, isotropic scale and source-z scale read off a matrix (exact for the two similarity models).

    ``scale`` is the mean stretch of the source x and y axes; ``z_scale`` the stretch of source z
    relative to it; ``mirrored`` whether the map flips handedness.
    """
    lin = np.asarray(matrix, float)[:3, :3]
    col = np.linalg.norm(lin, axis=0)
    scale = float((col[0] + col[1]) / 2)
    return {"mirrored": bool(np.linalg.det(lin) < 0), "scale": scale,
            "z_scale": float(col[2] / scale) if scale > 0 else float("nan")}
