"""Switchable FIB-SEM imperfections, each with its truth recorded.

All are off by default. Drift is applied before rendering (the face is
rendered at the drifted position, so the image moves by exactly the
recorded amount); charging and curtaining change the density/brightness;
defocus and astigmatism blur the noise-free image with a Gaussian whose
width grows with the focus error (beam convergence angle x error).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

__all__ = ["EMImperfections", "DriftModel", "apply_blur", "charging_field", "curtain_field", "blur_sigmas_nm"]

F32 = NDArray[np.float32]


class EMImperfections(BaseModel):
    """Which imperfections are on and how strong; all off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drift: bool = Field(False, description="Stage/beam drift: random walk plus occasional jumps (DriftModel).")
    drift_step_nm: float = Field(3.0, ge=0, description="Random-walk SD per slice, nm.")
    drift_jump_probability: float = Field(0.01, ge=0, le=1, description="Chance of a jump per slice.")
    drift_jump_nm: float = Field(150.0, ge=0, description="SD of a jump, nm.")
    charging: bool = Field(False, description="Slow brightness drift and horizontal streaks.")
    charging_strength: float = Field(1.0, ge=0, description="1 = clearly visible, like a poorly grounded block.")
    curtaining: bool = Field(False, description="Vertical stripes along the milling direction.")
    curtaining_strength: float = Field(1.0, ge=0)
    focus_error_um: float = Field(0.0, description="Working-distance error (defocus), µm.")
    stigmator_error_um: tuple[float, float] = Field((0.0, 0.0), description="Astigmatism (x, y components), µm.")
    convergence_mrad: float = Field(5.0, gt=0, description="Beam half-angle: blur = angle x focus error.")

    @property
    def any_blur(self) -> bool:
        return self.focus_error_um != 0.0 or any(v != 0.0 for v in self.stigmator_error_um)


class DriftModel:
    """Per-slice beam/stage offsets: deterministic from (seed, slice index).

    ``offset_nm(i)`` is the cumulative drift at slice i, image axes (x, y),
    nm; slice 0 has no drift. Same seed -> same sequence, whatever order the
    slices are asked for.
    """

    def __init__(self, seed: int, step_nm: float = 3.0, jump_probability: float = 0.01, jump_nm: float = 150.0) -> None:
        self.seed = seed
        self.step_nm = step_nm
        self.jump_probability = jump_probability
        self.jump_nm = jump_nm
        self._path = np.zeros((1, 2))
        self._jumps: list[int] = []

    @classmethod
    def from_config(cls, seed: int, cfg: EMImperfections) -> "DriftModel":
        return cls(seed, cfg.drift_step_nm, cfg.drift_jump_probability, cfg.drift_jump_nm)

    def _extend(self, n: int) -> None:
        have = len(self._path)
        if n <= have:
            return
        steps = np.zeros((n - have, 2))
        for k, i in enumerate(range(have, n)):
            rng = np.random.default_rng([self.seed, 3571, i])
            step = rng.normal(0.0, self.step_nm, 2)
            if rng.uniform() < self.jump_probability:
                step += rng.normal(0.0, self.jump_nm, 2)
                self._jumps.append(i)
            steps[k] = step
        self._path = np.concatenate([self._path, self._path[-1] + np.cumsum(steps, axis=0)])

    def offset_nm(self, slice_index: int) -> tuple[float, float]:
        if slice_index < 0:
            raise ValueError("slice index must be >= 0")
        self._extend(slice_index + 1)
        x, y = self._path[slice_index]
        return float(x), float(y)

    def jumps(self, upto: int) -> list[int]:
        """Slice indices (<= upto) where a jump happened."""
        self._extend(upto + 1)
        return [j for j in self._jumps if j <= upto]


def blur_sigmas_nm(cfg: EMImperfections) -> tuple[float, float, float]:
    """(sigma_major, sigma_minor, angle_rad) of the defocus/astigmatism blur."""
    sx, sy = cfg.stigmator_error_um
    stig = float(np.hypot(sx, sy))
    angle = 0.5 * float(np.arctan2(sy, sx))
    a = cfg.convergence_mrad * 1e-3
    # astigmatism: two line foci at +-stig around the defocus; blur ~ angle x distance to each
    s1 = a * abs(cfg.focus_error_um + stig) * 1e3 / 2.0
    s2 = a * abs(cfg.focus_error_um - stig) * 1e3 / 2.0
    return s1, s2, angle


def apply_blur(image: F32, cfg: EMImperfections, pixel_nm: float) -> tuple[F32, dict[str, Any]]:
    """Blur a noise-free density image for defocus/astigmatism; returns it and its truth."""
    s1, s2, angle = blur_sigmas_nm(cfg)
    truth = {"sigma_major_nm": s1, "sigma_minor_nm": s2, "angle_deg": float(np.rad2deg(angle))}
    p1, p2 = s1 / pixel_nm, s2 / pixel_nm
    if max(p1, p2) < 0.05:
        return image, truth
    if abs(p1 - p2) < 1e-3 or abs(np.sin(angle)) < 1e-6 or abs(np.cos(angle)) < 1e-6:
        sx, sy = (p1, p2) if abs(np.cos(angle)) >= abs(np.sin(angle)) else (p2, p1)
        return ndimage.gaussian_filter(image, (sy, sx), mode="nearest").astype(np.float32), truth
    # rotated anisotropic Gaussian in Fourier space
    h, w = image.shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    k1 = kx * c + ky * s
    k2 = -kx * s + ky * c
    otf = np.exp(-2 * np.pi**2 * (k1**2 * p1**2 + k2**2 * p2**2))
    out = np.fft.irfft2(np.fft.rfft2(image) * otf, s=image.shape)
    return out.astype(np.float32), truth


def charging_field(shape: tuple[int, int], seed: int, slice_index: int, strength: float) -> tuple[F32, dict[str, Any]]:
    """Additive density change from charging: slow per-slice level, row drift and streaks with tails."""
    h, w = shape
    rng = np.random.default_rng([seed, 6007, slice_index])
    level = 0.04 * strength * np.sin(2 * np.pi * slice_index / 97.0 + seed % 7)
    rows = np.linspace(0, 1, h, dtype=np.float32)
    ramp = np.float32(0.03 * strength * rng.normal()) * rows
    field = np.zeros(shape, np.float32)
    field += np.float32(level) + ramp[:, None]
    n_streaks = int(rng.poisson(4 * strength))
    streaks = []
    x = np.arange(w, dtype=np.float32)
    for _ in range(n_streaks):
        r0 = int(rng.integers(0, h))
        height = int(rng.integers(1, 4))
        x0 = float(rng.uniform(0, w * 0.8))
        amp = float(-rng.uniform(0.08, 0.2) * strength)  # charged: brighter (less dense in the inverted display)
        tail = float(rng.uniform(0.05, 0.4) * w)
        prof = np.where(x >= x0, np.exp(-(x - x0) / tail), 0.0).astype(np.float32) * np.float32(amp)
        field[r0 : r0 + height] += prof
        streaks.append({"row": r0, "height": height, "x0": x0, "amplitude": amp, "tail_px": tail})
    return field, {"level": float(level), "streaks": streaks}


def curtain_field(u_um: NDArray, v_um: NDArray, s_um: float, seed: int, strength: float) -> tuple[F32, dict[str, Any]]:
    """Vertical stripes: a column profile anchored to the block (it persists slice to slice, slowly
    changing), growing from the block surface downwards."""
    rng = np.random.default_rng([seed, 4099])
    n = 40
    centers = rng.uniform(-30, 30, n)  # µm along the face
    widths = rng.uniform(0.02, 0.25, n)
    amps = rng.normal(0, 0.06, n) * strength
    phase = rng.uniform(0, 2 * np.pi, n)
    u = np.asarray(u_um, float)
    prof = np.zeros(len(u))
    for c, wd, a, ph in zip(centers, widths, amps, phase):
        for period in (0.0, 60.0, -60.0):  # wrap so that faces far from 0 still show curtains
            prof += a * (0.7 + 0.3 * np.sin(s_um / 1.5 + ph)) * np.exp(-0.5 * ((u - c - period) / wd) ** 2)
    env = 1.0 - np.exp(-np.clip(np.asarray(v_um, float), 0, None) / 1.5)
    field = (env[:, None] * prof[None, :]).astype(np.float32)
    return field, {"n_curtains": n, "strength": strength}
