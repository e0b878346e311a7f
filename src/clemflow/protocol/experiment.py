"""What the experiment is: who runs it, which dishes, which treatment, stains and timepoints."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator

from .base import ProtocolModel
from .grid_scheme import GridScheme
from .units import Duration

__all__ = ["Experiment", "Sample", "Stain", "Treatment"]


class Experiment(ProtocolModel):
    """Identity of the experiment, for the record and the run folder name."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                      description="Short name used in folder names: letters, digits, '_', '.', '-'.")
    operator: str = Field("", description="Who runs it.")
    notes: str = Field("", description="Free text kept with the run.")


class Sample(ProtocolModel):
    """One gridded dish."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$", description="Dish id, e.g. 'D1'.")
    grid: GridScheme = Field(default_factory=GridScheme, description="Etched grid of the coverslip; MatTek by default.")
    cell_line: str = Field("HeLa", description="Cell line, e.g. 'HeLa'.")
    seeding: str = Field("", description="How and when cells were seeded, e.g. '2e5 cells, 24 h before treatment'.")
    role: Literal["treated", "control"] = Field(
        "treated", description="'control' dishes get no particles and are imaged at the same timepoints."
    )


_CONCENTRATION = r"^\s*\d+(\.\d+)?([eE][-+]?\d+)?\s*(ug/mL|µg/mL|mg/mL|ng/mL|pM|nM|uM|µM|mM|particles/mL)\s*$"


class Treatment(ProtocolModel):
    """The nanoparticles added at t = 0."""

    particle: str = Field(min_length=1, description="Particle name, e.g. 'SiO2-Cy5 50 nm'.")
    concentration: str = Field(
        pattern=_CONCENTRATION,
        description="Concentration with its unit, e.g. '50 ug/mL' or '1 nM'.",
    )
    added_at: datetime | None = Field(
        None,
        description="Wall-clock time the particles were added (ISO 8601). Leave empty to confirm it at the start of the run.",
    )


    @field_validator("concentration", mode="before")
    @classmethod
    def _with_unit(cls, value: object) -> object:
        if not (isinstance(value, str) and re.match(_CONCENTRATION, value)):
            raise ValueError(
                f"{value!r} is not a concentration with its unit; write e.g. '50 ug/mL', '1 nM' or '1e10 particles/mL'"
            )
        return value


class Stain(ProtocolModel):
    """A live stain added ahead of every timepoint."""

    name: str = Field(min_length=1, description="e.g. 'LysoTracker Blue DND-22'.")
    marks: Literal["endolysosomes", "lipid_droplets", "mitochondria", "nuclei", "particles"] = Field(
        description="The structure the stain labels."
    )
    channel: str = Field(description="Name of the confocal channel it is imaged in (see confocal.channels).")
    lead_time: Duration = Field(
        "30 min", description="How long before each timepoint the stain is added, e.g. '30 min'."
    )

    @field_validator("lead_time")
    @classmethod
    def _added_before(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(
                "a stain must be added before its timepoint: lead_time must be positive, e.g. '30 min'"
            )
        if value > 48 * 3600:
            raise ValueError("lead_time over 48 h is not a live stain; use at most '48 h'")
        return value
