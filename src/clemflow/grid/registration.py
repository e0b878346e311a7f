"""From image pixels to stage micrometres to grid coordinates, and back, with a predicted error.

A microscope sees the grid through its camera (pixel size, rotation, flip) at
a stage position. Bar crossings measured in one or more images give pairs
(stage µm, grid µm); a robust fit of those pairs (RANSAC over similarity
transforms, then least squares of a similarity or an affine, whichever the
residuals support) is the instrument's registration to the dish. Targets are
stored in grid coordinates (square label + offset), so they survive taking the
dish out and putting it back, and moving it to another instrument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from ..protocol.grid_scheme import GridScheme
from .crossings import measure_crossings
from .find import GridFinding

__all__ = ["CameraGeometry", "GridPosition", "GridRegistration", "ImageView", "register_grid"]

Float = NDArray[np.float64]


@dataclass(frozen=True)
class CameraGeometry:
    """How camera pixels lie on the stage: size, rotation of the image x axis, mirror."""

    pixel_size_um: float
    rotation_deg: float = 0.0
    flip_x: bool = False

    def matrix(self) -> Float:
        """2x2: stage offset (µm) = M @ (pixel offset from the image centre)."""
        t = math.radians(self.rotation_deg)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        flip = np.diag([-1.0, 1.0]) if self.flip_x else np.eye(2)
        return self.pixel_size_um * rot @ flip


@dataclass(frozen=True)
class ImageView:
    """An image taken with `camera` while the stage stood at `stage_xy_um`."""

    shape: tuple[int, int]
    stage_xy_um: tuple[float, float]
    camera: CameraGeometry

    def pixel_to_stage(self, xy: Float) -> Float:
        h, w = self.shape
        centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        return (np.asarray(xy, float) - centre) @ self.camera.matrix().T + np.array(self.stage_xy_um)

    def stage_to_pixel(self, stage: Float) -> Float:
        h, w = self.shape
        centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        return (np.asarray(stage, float) - np.array(self.stage_xy_um)) @ np.linalg.inv(self.camera.matrix()).T + centre


@dataclass(frozen=True)
class GridPosition:
    """A place on the dish: the square it is in and its offset (µm) from the square's centre."""

    label: str
    offset_um: tuple[float, float]

    def grid_um(self, scheme: GridScheme) -> Float:
        cx, cy = scheme.square_center_um(self.label)
        return np.array([cx + self.offset_um[0], cy + self.offset_um[1]])

    @classmethod
    def from_grid_um(cls, scheme: GridScheme, xy: Float) -> "GridPosition":
        col = int(np.clip(xy[0] // scheme.pitch_um, 0, scheme.shape[0] - 1))
        row = int(np.clip(xy[1] // scheme.pitch_um, 0, scheme.shape[1] - 1))
        label = scheme.label(col, row)
        cx, cy = scheme.square_center_um(label)
        return cls(label, (float(xy[0] - cx), float(xy[1] - cy)))


def _design(points: Float, model: str) -> Float:
    """Rows of the linear system for grid = f(stage), unknowns stacked for x then y."""
    x, y = points[:, 0], points[:, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    if model == "similarity":  # gx = a x - b y + tx ; gy = b x + a y + ty (or mirrored: see _fit)
        return np.vstack([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    return np.vstack([np.stack([x, y, one, zero, zero, zero], 1), np.stack([zero, zero, zero, x, y, one], 1)])


def _params_to_matrix(p: Float, model: str, mirrored: bool) -> Float:
    if model == "similarity":
        a, b, tx, ty = p
        m = np.array([[a, -b, tx], [b, a, ty]])
    else:
        m = np.array([[p[0], p[1], p[2]], [p[3], p[4], p[5]]])
    if mirrored and model == "similarity":
        m = np.array([[m[0, 0], -m[0, 1], m[0, 2]], [m[1, 0], -m[1, 1], m[1, 2]]])  # acts on (x, -y)
    return m


def _fit(stage: Float, grid: Float, model: str, mirrored: bool) -> tuple[Float, Float]:
    """Least squares grid = M @ [x, y, 1]; returns M (2x3) and residuals (N, 2)."""
    src = stage * np.array([1.0, -1.0]) if (mirrored and model == "similarity") else stage
    a = _design(src, model)
    b = np.concatenate([grid[:, 0], grid[:, 1]])
    p, *_ = np.linalg.lstsq(a, b, rcond=None)
    m = _params_to_matrix(p, model, mirrored)
    predicted = stage @ m[:, :2].T + m[:, 2]
    return m, grid - predicted


@dataclass(frozen=True)
class GridRegistration:
    """grid µm = matrix @ [stage x, stage y, 1]; with the crossings it was fitted on."""

    scheme: GridScheme
    matrix: Float
    model: Literal["similarity", "affine"]
    stage_points: Float
    grid_points: Float
    residual_rms_um: float
    floor_um: float
    inliers: int
    outliers: int
    label_confidence: float
    notes: list[str] = field(default_factory=list)

    def to_grid(self, stage_xy: Float) -> Float:
        return np.asarray(stage_xy, float) @ self.matrix[:, :2].T + self.matrix[:, 2]

    def to_stage(self, grid_xy: Float) -> Float:
        return (np.asarray(grid_xy, float) - self.matrix[:, 2]) @ np.linalg.inv(self.matrix[:, :2]).T

    def locate(self, stage_xy: Float) -> GridPosition:
        return GridPosition.from_grid_um(self.scheme, self.to_grid(stage_xy))

    def stage_of(self, position: GridPosition) -> Float:
        return self.to_stage(position.grid_um(self.scheme))

    def predicted_error_um(self, stage_xy: Float) -> float:
        """RMS radial error expected at a stage point, from the fit's residuals and its leverage there."""
        k = 4 if self.model == "similarity" else 6
        n = len(self.stage_points)
        dof = 2 * n - k
        sigma = self.residual_rms_um * math.sqrt(2 * n / dof) / math.sqrt(2) if dof > 0 else self.floor_um
        sigma = max(sigma, self.floor_um)
        centre = self.stage_points.mean(0)
        spread = float(np.mean(np.sum((self.stage_points - centre) ** 2, 1))) + 1e-9
        distance2 = float(np.sum((np.asarray(stage_xy, float) - centre) ** 2))
        leverage = 1.0 / n + distance2 / (n * spread)
        return float(sigma * math.sqrt(2.0 * (1.0 + leverage)))


def register_grid(
    observations: list[tuple[NDArray, ImageView, GridFinding]],
    *,
    inlier_um: float | None = None,
    seed: int = 0,
) -> GridRegistration:
    """Fit stage -> grid from the crossings measured in one or more labelled images."""
    stage_pts, grid_pts, confidences = [], [], []
    scheme = observations[0][2].scheme
    floor = max(view.camera.pixel_size_um for _, view, _ in observations) * 0.35
    notes: list[str] = []
    for image, view, finding in observations:
        if finding.labelling is None:
            continue
        confidences.append(finding.labelling.confidence)
        crossings = measure_crossings(image, finding.lattice)
        points = [np.array(c.measured_xy) for c in crossings if c.measured_xy is not None]
        if len(points) < 3:
            # Too few crossings seen up close: the bar lines themselves fix the lattice, so use the
            # crossings they predict in and around the field (up to half a pitch outside).
            notes.append(f"{len(points)} crossing(s) measured locally; added crossings predicted from the bar lines")
            lattice = finding.lattice
            pitch = float(np.mean([f.pitch_px for f in lattice.families]))
            _, predicted = lattice.crossings(margin_px=-0.5 * pitch)
            points += list(predicted)
        for xy in points:
            g = finding.image_to_grid_um(xy[None])[0]
            g_exact = np.round(g / scheme.pitch_um) * scheme.pitch_um  # crossings lie on bar centre lines
            stage_pts.append(view.pixel_to_stage(xy[None])[0])
            grid_pts.append(g_exact)
    if len(stage_pts) < 2:
        raise ValueError("no labelled image with at least two crossings; cannot register the grid")
    stage = np.array(stage_pts)
    grid = np.array(grid_pts)
    # Handedness from the images' labelling; the fit then only needs rotation, scale and shift.
    probe = observations[0]
    mirrored = bool(np.linalg.det(probe[2]._grid_affine()[0] @ np.linalg.inv(probe[1].camera.matrix())) < 0)
    # Gross outliers first (a crossing measured on debris), with a threshold loose enough to keep
    # the few-percent shear of an embedded block, which a similarity cannot follow.
    spread = float(np.sqrt(np.mean(np.sum((stage - stage.mean(0)) ** 2, 1))))
    threshold = inlier_um if inlier_um is not None else max(4 * floor, 2.0, 0.04 * spread)
    inliers = _ransac_similarity(stage, grid, mirrored, threshold, seed)
    model: Literal["similarity", "affine"] = "similarity"
    for _ in range(2):
        stage_in, grid_in = stage[inliers], grid[inliers]
        m, resid = _fit(stage_in, grid_in, "similarity", mirrored)
        model = "similarity"
        if len(stage_in) >= 5:
            m_aff, resid_aff = _fit(stage_in, grid_in, "affine", mirrored)
            n = 2 * len(stage_in)
            aic_sim = n * math.log(float(np.sum(resid**2)) / n + 1e-12) + 2 * 4
            aic_aff = n * math.log(float(np.sum(resid_aff**2)) / n + 1e-12) + 2 * 6
            if aic_aff < aic_sim - 2:
                m, resid, model = m_aff, resid_aff, "affine"
        # then fine outliers against the chosen model
        all_resid = np.linalg.norm(stage @ m[:, :2].T + m[:, 2] - grid, axis=1)
        sigma = float(np.median(np.linalg.norm(resid, axis=1))) * 1.4826
        refined = all_resid < max(3 * sigma, 4 * floor, 1.0)
        if refined.sum() < 2 or np.array_equal(refined, inliers):
            break
        inliers = refined
    rms = float(np.sqrt(np.mean(np.sum(resid**2, 1)))) if len(resid) else float("nan")
    return GridRegistration(
        scheme=scheme,
        matrix=m,
        model=model,
        stage_points=stage_in,
        grid_points=grid_in,
        residual_rms_um=rms,
        floor_um=floor,
        inliers=int(inliers.sum()),
        outliers=int((~inliers).sum()),
        label_confidence=float(min(confidences)) if confidences else 0.0,
        notes=notes,
    )


def _ransac_similarity(stage: Float, grid: Float, mirrored: bool, threshold: float, seed: int) -> NDArray[np.bool_]:
    n = len(stage)
    if n <= 3:
        return np.ones(n, bool)
    rng = np.random.default_rng(seed)
    best = np.ones(n, bool)
    best_count = -1
    for _ in range(min(200, n * (n - 1))):
        i, j = rng.choice(n, 2, replace=False)
        m, _ = _fit(stage[[i, j]], grid[[i, j]], "similarity", mirrored)
        err = np.linalg.norm(stage @ m[:, :2].T + m[:, 2] - grid, axis=1)
        inl = err < threshold
        if inl.sum() > best_count:
            best, best_count = inl, int(inl.sum())
    return best
