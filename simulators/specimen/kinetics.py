"""Nanoparticle uptake over time: the study's curves, as data.

The generator asks these curves what a cell should look like a given number of
hours after the particles were added. The points are the study's reported
values where it reports them (about 80 % of cells carry particles at 1 h, all
from 4 h; particle area per cell area about 2.6 % at 6 h and 6.1 % at 24 h,
flat to 48 h; endolysosomal volume up between 2 and 6 h, back to baseline
after) and plausible, monotone fill-ins elsewhere. Between points the curves
are shape-preserving cubic (PCHIP) in time, so they never overshoot.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.interpolate import PchipInterpolator

__all__ = ["UptakeKinetics", "UptakeState"]


class UptakeState(BaseModel):
    """What the kinetics predict for the average cell at one time point."""

    model_config = ConfigDict(frozen=True)

    hours: float | None
    fraction_cells_with_particles: float
    particle_area_fraction: float
    fraction_particles_in_endolysosomes: float
    endolysosomal_volume_fraction: float


class UptakeKinetics(BaseModel):
    """Curves of uptake against hours since treatment; each list pairs with ``hours``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hours: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 6.0, 14.0, 24.0, 48.0)
    fraction_cells_with_particles: tuple[float, ...] = (0.0, 0.80, 0.92, 1.0, 1.0, 1.0, 1.0, 1.0)
    particle_area_fraction: tuple[float, ...] = (0.0, 0.004, 0.009, 0.018, 0.026, 0.045, 0.061, 0.061)
    fraction_particles_in_endolysosomes: tuple[float, ...] = (0.0, 0.15, 0.30, 0.50, 0.60, 0.72, 0.80, 0.85)
    endolysosomal_volume_fraction: tuple[float, ...] = (0.02, 0.02, 0.021, 0.028, 0.032, 0.022, 0.02, 0.02)
    baseline_endolysosomal_volume_fraction: float = Field(
        0.02, description="Endolysosome volume over cell volume in untreated cells."
    )
    cell_to_cell_cv: float = Field(
        0.3, ge=0, le=1.5, description="Coefficient of variation of a cell's particle load about the mean curve."
    )

    @model_validator(mode="after")
    def _same_lengths(self) -> "UptakeKinetics":
        n = len(self.hours)
        if n < 2 or any(b <= a for a, b in zip(self.hours, self.hours[1:])):
            raise ValueError("hours must be at least two strictly increasing values")
        for name in (
            "fraction_cells_with_particles",
            "particle_area_fraction",
            "fraction_particles_in_endolysosomes",
            "endolysosomal_volume_fraction",
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one value per entry of hours ({n})")
        return self

    @cached_property
    def _curves(self) -> dict[str, PchipInterpolator]:
        t = np.asarray(self.hours)
        return {
            name: PchipInterpolator(t, np.asarray(getattr(self, name)), extrapolate=False)
            for name in (
                "fraction_cells_with_particles",
                "particle_area_fraction",
                "fraction_particles_in_endolysosomes",
                "endolysosomal_volume_fraction",
            )
        }

    def _at(self, name: str, hours: float) -> float:
        t = float(np.clip(hours, self.hours[0], self.hours[-1]))
        return float(self._curves[name](t))

    def at(self, hours: float | None) -> UptakeState:
        """The mean state ``hours`` after treatment; ``None`` is an untreated control."""
        if hours is None:
            return UptakeState(
                hours=None,
                fraction_cells_with_particles=0.0,
                particle_area_fraction=0.0,
                fraction_particles_in_endolysosomes=0.0,
                endolysosomal_volume_fraction=self.baseline_endolysosomal_volume_fraction,
            )
        if hours < 0:
            raise ValueError("hours since treatment cannot be negative")
        return UptakeState(
            hours=float(hours),
            fraction_cells_with_particles=float(np.clip(self._at("fraction_cells_with_particles", hours), 0, 1)),
            particle_area_fraction=max(self._at("particle_area_fraction", hours), 0.0),
            fraction_particles_in_endolysosomes=float(
                np.clip(self._at("fraction_particles_in_endolysosomes", hours), 0, 1)
            ),
            endolysosomal_volume_fraction=max(self._at("endolysosomal_volume_fraction", hours), 0.0),
        )
