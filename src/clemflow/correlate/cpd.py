"""Rigid coherent point drift (CPD), the baseline that CLEM-Reg registers point clouds with.

Kept to compare against (benchmarks/bench_correlate.py), not used by the
pipeline: CPD is a local method. It models the destination points as samples
of Gaussians centred on the moved source points and climbs the likelihood by
expectation-maximisation from the starting pose (identity here, as CLEM-Reg
does), so it converges only when the start is within a fraction of a turn of
the answer, and its rotation is proper, so a mirrored pair is out of its
reach. Own implementation of Myronenko and Song (2010), rigid with scale,
rather than the ``pycpd`` package: one function, no extra dependency, and the
coordinate normalisation under our control (the outlier weight ``w`` is only
meaningful on centred, unit-scaled coordinates).
"""

from __future__ import annotations

import numpy as np

__all__ = ["rigid_cpd"]


def _normalise(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    c = p.mean(axis=0)
    s = float(np.sqrt(np.mean(np.sum((p - c) ** 2, axis=1)))) or 1.0
    return (p - c) / s, c, s


def rigid_cpd(src: np.ndarray, dst: np.ndarray, w: float = 0.0, max_iter: int = 150, tol: float = 1e-8,
              with_scale: bool = True) -> np.ndarray:
    """4x4 matrix mapping ``src`` (N, 3) onto ``dst`` (M, 3) by rigid CPD started from the identity.

    ``w`` in [0, 1): the weight of the uniform outlier term (0: every destination point is explained
    by a source point). Both sets are centred and scaled to unit RMS radius first, as CPD expects;
    "identity" means no rotation between those normalised sets.
    """
    if not 0.0 <= w < 1.0:
        raise ValueError(f"w is the outlier weight and must lie in [0, 1), got {w}")
    y, yc, ys = _normalise(np.asarray(src, float).reshape(-1, 3))  # GMM centroids (moving)
    x, xc, xs = _normalise(np.asarray(dst, float).reshape(-1, 3))  # data (fixed)
    n, m, dim = len(x), len(y), 3
    r, s, t = np.eye(dim), 1.0, np.zeros(dim)
    sigma2 = float(np.sum((x[:, None, :] - y[None, :, :]) ** 2) / (dim * n * m))
    prev = np.inf
    for _ in range(max_iter):
        ty = s * y @ r.T + t
        d2 = np.sum((x[:, None, :] - ty[None, :, :]) ** 2, axis=2)  # (N, M)
        p = np.exp(-d2 / (2 * sigma2))
        c = (2 * np.pi * sigma2) ** (dim / 2) * w / (1 - w) * m / n
        p /= np.maximum(p.sum(axis=1, keepdims=True) + c, 1e-300)
        np_ = p.sum()
        mu_x = p.sum(axis=1) @ x / np_
        mu_y = p.sum(axis=0) @ y / np_
        xh, yh = x - mu_x, y - mu_y
        a = xh.T @ p @ yh  # (3, 3)
        u, _, vt = np.linalg.svd(a)
        cc = np.eye(dim)
        cc[-1, -1] = np.sign(np.linalg.det(u @ vt)) or 1.0
        r = u @ cc @ vt
        tr_ar = float(np.trace(a.T @ r))
        tr_y = float(np.sum(p.sum(axis=0) * np.sum(yh**2, axis=1)))
        s = tr_ar / tr_y if with_scale else 1.0
        t = mu_x - s * r @ mu_y
        tr_x = float(np.sum(p.sum(axis=1) * np.sum(xh**2, axis=1)))
        sigma2 = max((tr_x - s * tr_ar) / (np_ * dim), 1e-10)
        q = sigma2
        if abs(prev - q) < tol:
            break
        prev = q
    # back to the original frames: dst = xc + xs * (s R (src - yc) / ys + t)
    lin = xs * s * r / ys
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = xc + xs * t - lin @ yc
    return out
