"""The FIB-SEM side: bridge, target, trench, beams, slice-and-view cadence and stop criteria.

Bounds here are the first line of defence for a destructive instrument: a value
outside them is refused when the protocol is read, long before a beam is on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import ProtocolModel, in_range
from .units import Current, Duration, Length, Voltage

__all__ = ["Bridge", "FIBBeam", "FIBSEM", "SEMImaging", "SliceAndViewCadence", "StopCriteria", "Trench"]


class Bridge(ProtocolModel):
    """Where the bridge server runs and which backend drives the instrument."""

    address: str = Field(
        "tcp://127.0.0.1:5555", pattern=r"^tcp://[^:\s]+:\d{1,5}$", description="Bridge command address, tcp://HOST:PORT."
    )
    backend: Literal["sim-smartsem", "sim-autoscript", "smartsem", "autoscript", "openfibsem"] = Field(
        "sim-smartsem", description="Instrument backend behind the bridge; 'sim-*' are the built-in look-alikes."
    )
    client_keys: str | None = Field(
        None, description="Folder with this client's CURVE key pair; required for a bridge beyond this computer."
    )
    server_key: str | None = Field(None, description="Path of the server's public CURVE key.")


class FIBTarget(ProtocolModel):
    """The cell to mill, by grid square and offset, or taken from the confocal's targets.json."""

    source: Literal["confocal", "square"] = Field(
        "confocal", description="'confocal' takes the target from the run's targets.json; 'square' uses the fields below."
    )
    sample: str | None = None
    square: str | None = None
    offset: tuple[Length, Length] = ("0 um", "0 um")  # type: ignore[assignment]

    @model_validator(mode="after")
    def _square_given(self) -> "FIBTarget":
        if self.source == "square" and (self.sample is None or self.square is None):
            raise ValueError("with source 'square' give both 'sample' and 'square'")
        return self


class Trench(ProtocolModel):
    """The trench milled in front of the cell so the SEM can see the face."""

    width: Length = "30 um"  # type: ignore[assignment]
    height: Length = "25 um"  # type: ignore[assignment]
    depth: Length = "15 um"  # type: ignore[assignment]
    current: Current = "15 nA"  # type: ignore[assignment]

    _size = in_range("width", "height", low=1e-6, high=300e-6, what="trench size", dimension="length")

    _depth = in_range("depth", low=0.5e-6, high=100e-6, what="trench depth", dimension="length")

    _current = in_range("current", low=1e-12, high=100e-9, what="FIB current", dimension="current")


class SEMImaging(ProtocolModel):
    """Electron-beam imaging of each milled face."""

    voltage: Voltage = "1.5 kV"  # type: ignore[assignment]
    current: Current = "1000 pA"  # type: ignore[assignment]
    detector: str = Field("EsB", description="Detector name as the instrument knows it, e.g. 'EsB', 'InLens', 'TLD'.")
    pixel_size: Length = "5 nm"  # type: ignore[assignment]
    frame: tuple[int, int] = Field((4096, 3072), description="Frame size in pixels, [width, height].")
    dwell: Duration = "2 us"  # type: ignore[assignment]
    line_averaging: int = Field(5, ge=1, le=256)
    working_distance: Length = "5 mm"  # type: ignore[assignment]
    bit_depth: Literal[8, 16] = 8

    _voltage = in_range("voltage", low=100.0, high=30e3, what="SEM voltage", dimension="voltage")

    _current = in_range("current", low=1e-12, high=100e-9, what="SEM current", dimension="current")

    _pixel = in_range("pixel_size", low=0.1e-9, high=1e-6, what="SEM pixel size", dimension="length")

    @field_validator("frame")
    @classmethod
    def _frame(cls, value: tuple[int, int]) -> tuple[int, int]:
        for n in value:
            if not 64 <= n <= 32768:
                raise ValueError(f"frame side {n} px is out of range; each side must lie between 64 and 32768 pixels")
        return value

    _dwell = in_range("dwell", low=10e-9, high=1e-3, what="dwell time", dimension="duration")

    _wd = in_range("working_distance", low=1e-3, high=50e-3, what="working distance", dimension="length")

    @property
    def frame_time_s(self) -> float:
        """Pixels x dwell x line averaging: the time the beam spends on one frame."""
        width, height = self.frame
        return width * height * self.dwell * self.line_averaging

    @property
    def field_of_view_m(self) -> tuple[float, float]:
        width, height = self.frame
        return width * self.pixel_size, height * self.pixel_size


class FIBBeam(ProtocolModel):
    """Ion-beam settings for slice milling."""

    voltage: Voltage = "30 kV"  # type: ignore[assignment]
    current: Current = "700 pA"  # type: ignore[assignment]

    _voltage = in_range("voltage", low=500.0, high=30e3, what="FIB voltage", dimension="voltage")

    _current = in_range("current", low=1e-12, high=100e-9, what="FIB current", dimension="current")


class SliceAndViewCadence(ProtocolModel):
    """How often the engine re-focuses, re-stigmates and re-centres on the fiducial."""

    autofocus_every: int = Field(25, ge=0, description="Slices between autofocus runs; 0 = never.")
    autostigmation_every: int = Field(50, ge=0, description="Slices between autostigmation runs; 0 = never.")
    drift_correction_every: int = Field(1, ge=0, description="Slices between fiducial drift corrections; 0 = never.")
    min_fiducial_similarity: float = Field(0.75, gt=0, le=1, description="Below this the fiducial is rescanned, then the run pauses.")


class StopCriteria(ProtocolModel):
    """The run stops at whichever comes first."""

    depth: Length | None = Field("10 um", description="Total milled depth, e.g. '10 um'.")  # type: ignore[assignment]
    slices: int | None = Field(None, ge=1, le=100000)
    duration: Duration | None = Field(None, description="Wall-clock limit, e.g. '30 h'.")

    _depth = in_range("depth", low=2e-9, high=200e-6, what="milling depth", dimension="length")

    @model_validator(mode="after")
    def _some_stop(self) -> "StopCriteria":
        if self.depth is None and self.slices is None and self.duration is None:
            raise ValueError("give at least one stop criterion: depth, slices or duration")
        return self


class FIBSEM(ProtocolModel):
    """A slice-and-view run on a FIB-SEM through the bridge."""

    bridge: Bridge = Field(default_factory=Bridge)
    target: FIBTarget = Field(default_factory=FIBTarget)
    trench: Trench = Field(default_factory=Trench)
    slice_thickness: Length = "15 nm"  # type: ignore[assignment]
    sem: SEMImaging = Field(default_factory=SEMImaging)
    fib: FIBBeam = Field(default_factory=FIBBeam)
    cadence: SliceAndViewCadence = Field(default_factory=SliceAndViewCadence)
    stop: StopCriteria = Field(default_factory=StopCriteria)
    stage_tilt_deg: float = Field(54.0, ge=0, le=90, description="Angle between the beams, 54 degrees on a Crossbeam.")

    _thickness = in_range("slice_thickness", low=2e-9, high=500e-9, what="slice thickness", dimension="length")
