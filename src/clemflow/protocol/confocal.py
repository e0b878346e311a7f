"""The confocal side: instrument, channels, overview tiling, targets, z-stacks and autofocus."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .base import ProtocolModel, in_range
from .units import Duration, Length

__all__ = [
    "Autofocus",
    "Channel",
    "ChannelExposure",
    "Confocal",
    "Objective",
    "Overview",
    "StagePosition",
    "Target",
    "Targets",
    "ZStack",
]


class Objective(ProtocolModel):
    """An objective on the turret; the pixel size is set from it when it is selected."""

    name: str = Field(description="Name used in the protocol, e.g. '63x'.")
    magnification: float = Field(gt=0, le=200)
    numerical_aperture: float = Field(gt=0, le=1.7)
    immersion: Literal["air", "water", "oil", "silicone", "glycerol"] = "air"
    pixel_size: Length = Field(description="Camera pixel size in the sample plane, e.g. '0.103 um'.")
    preset: str | None = Field(None, description="Micro-Manager preset in the objective group; defaults to the name.")
    focus_offset: Length = Field(
        "0 um",
        description="Focus-drive position of this objective's focal plane relative to the others' (parfocal offset), "
        "e.g. '-8 um'; measured once per microscope by focusing each objective on the coverslip.",
    )

    _pixel_size = in_range("pixel_size", low=10e-9, high=20e-6, what="pixel size", dimension="length")


class Channel(ProtocolModel):
    """A light path: a laser line or the transmitted-light lamp."""

    name: str = Field(description="Name used in the protocol, e.g. '488' or 'TL'.")
    kind: Literal["fluorescence", "transmitted"] = "fluorescence"
    excitation: Length | None = Field(None, description="Excitation wavelength, e.g. '488 nm'; empty for transmitted light.")
    emission: Length | None = Field(None, description="Centre of the emission band, e.g. '525 nm'.")
    preset: str | None = Field(None, description="Micro-Manager preset in the channel group; defaults to the name.")

    _visible = in_range("excitation", "emission", low=300e-9, high=1100e-9, what="wavelength", dimension="length")

    @model_validator(mode="after")
    def _fluorescence_has_wavelength(self) -> "Channel":
        if self.kind == "fluorescence" and self.excitation is None:
            raise ValueError(f"fluorescence channel {self.name!r} needs an excitation wavelength, e.g. '488 nm'")
        return self


class ChannelExposure(ProtocolModel):
    """One channel of an acquisition with its exposure and light power."""

    channel: str = Field(description="Name of a channel in confocal.channels.")
    exposure: Duration = Field(description="Camera exposure, e.g. '100 ms'.")
    power_percent: float = Field(10.0, ge=0, le=100, description="Laser or lamp power in percent of maximum.")

    _exposure = in_range("exposure", low=10e-6, high=10.0, what="exposure", dimension="duration")


class Overview(ProtocolModel):
    """The low-magnification transmitted-light tile scan that finds the grid."""

    objective: str = "10x"
    channel: ChannelExposure = Field(
        default_factory=lambda: ChannelExposure(channel="TL", exposure="20 ms", power_percent=30.0)
    )
    squares: list[str] = Field(
        default_factory=list, description="Grid squares to cover, e.g. ['3C', '3D']; empty = around the targets."
    )
    margin_squares: int = Field(1, ge=0, le=5, description="Extra squares tiled around those listed.")
    overlap_percent: float = Field(10.0, ge=0, lt=50, description="Tile overlap for stitching.")


class StagePosition(ProtocolModel):
    x: Length
    y: Length
    z: Length | None = None


class Target(ProtocolModel):
    """A cell to image, by grid square (preferred: it survives moving the dish) or by stage position."""

    sample: str = Field(description="Id of the dish (samples[].id).")
    square: str | None = Field(None, description="Grid label of the square, e.g. '3C'.")
    offset: tuple[Length, Length] = Field(
        ("0 um", "0 um"), description="Offset of the cell from the square's centre, x right and y down, e.g. ['20 um', '-15 um']."
    )
    position: StagePosition | None = Field(None, description="Explicit stage position instead of a square.")
    name: str | None = None

    @model_validator(mode="after")
    def _square_or_position(self) -> "Target":
        if (self.square is None) == (self.position is None):
            raise ValueError("a target needs exactly one of 'square' (e.g. '3C') or 'position'")
        return self


class Targets(ProtocolModel):
    mode: Literal["listed", "automatic"] = Field(
        "listed", description="'listed' images the targets below; 'automatic' picks cells in the listed squares."
    )
    cells_per_square: int = Field(1, ge=1, le=50, description="With 'automatic': how many cells per square.")
    items: list[Target] = Field(default_factory=list)


class ZStack(ProtocolModel):
    objective: str = "63x"
    channels: list[ChannelExposure] = Field(min_length=1)
    range: Length = Field(description="Total z range centred on focus, e.g. '8 um'.")
    step: Length = Field(description="z step, e.g. '0.3 um'.")

    _range = in_range("range", low=0.0, high=500e-6, what="z range", dimension="length")

    _step = in_range("step", low=20e-9, high=50e-6, what="z step", dimension="length")

    @property
    def planes(self) -> int:
        return int(round(self.range / self.step)) + 1


class Autofocus(ProtocolModel):
    enabled: bool = True
    channel: str = "TL"
    range: Length = "10 um"  # type: ignore[assignment]
    step: Length = "1 um"  # type: ignore[assignment]


class Confocal(ProtocolModel):
    """A live-cell confocal driven by pymmcore-plus."""

    config: str = Field(
        "simulator",
        description="'simulator' for the built-in simulated confocal, or the path of a Micro-Manager .cfg file.",
    )
    channel_group: str = "Channel"
    objective_group: str = "Objective"
    objectives: list[Objective] = Field(
        default_factory=lambda: [
            Objective(name="10x", magnification=10, numerical_aperture=0.3, immersion="air", pixel_size="0.65 um",
                      focus_offset="-8 um"),
            Objective(name="63x", magnification=63, numerical_aperture=1.4, immersion="oil", pixel_size="0.103 um"),
        ]
    )
    channels: list[Channel] = Field(
        default_factory=lambda: [
            Channel(name="TL", kind="transmitted"),
            Channel(name="405", excitation="405 nm", emission="450 nm"),
            Channel(name="488", excitation="488 nm", emission="525 nm"),
            Channel(name="639", excitation="639 nm", emission="690 nm"),
        ]
    )
    overview: Overview = Field(default_factory=Overview)
    targets: Targets = Field(default_factory=Targets)
    zstack: ZStack
    autofocus: Autofocus = Field(default_factory=Autofocus)
    late_policy: Literal["run_late", "skip"] = Field(
        "run_late", description="What to do with a timepoint whose window has passed (e.g. after a crash)."
    )
    late_tolerance: Annotated[Duration, Field(description="How late a timepoint may start and still count as on time.")] = (
        "15 min"  # type: ignore[assignment]
    )

    @field_validator("config")
    @classmethod
    def _config(cls, value: str) -> str:
        if value != "simulator" and not value.endswith(".cfg"):
            raise ValueError("config must be 'simulator' or the path of a Micro-Manager '.cfg' file")
        return value
