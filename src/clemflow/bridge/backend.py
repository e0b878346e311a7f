"""What the bridge server needs from an instrument: the backend interface.

A backend turns the bridge's vendor-neutral requests into calls on one vendor
API (Zeiss SmartSEM, Thermo AutoScript, OpenFIBSEM) and reports back what the
instrument says it did. The server checks every value against
``Backend.describe().limits`` *before* calling a backend, so a backend may
assume its arguments are in range (drivers still let the vendor API refuse).

Units on this interface are SI (m, s, A, V) and degrees for angles, the same
as on the wire (see docs/bridge-protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "AUTOFUNCTIONS",
    "Autofunction",
    "Backend",
    "BeamChanges",
    "BeamLimits",
    "BeamName",
    "Description",
    "FAULT_NAMES",
    "Frame",
    "FrameRequest",
    "InstrumentFault",
    "InstrumentLimits",
    "Job",
    "MillPattern",
    "MillRequest",
    "Range",
    "StageMove",
    "Unsupported",
]

BeamName = Literal["electron", "ion"]
Autofunction = Literal["autofocus", "autostigmation", "auto_contrast"]
AUTOFUNCTIONS: tuple[str, ...] = ("autofocus", "autostigmation", "auto_contrast")

# Faults a look-alike simulator can switch on; names shared by the wire error table.
FAULT_NAMES: tuple[str, ...] = (
    "beam_trip",
    "vacuum_interlock",
    "frame_timeout",
    "autofocus_diverges",
    "stage_error",
    "server_crash",
    "network_drop",
)


@dataclass(frozen=True)
class Range:
    """Closed interval a value must lie in; ``unit`` is for messages only."""

    low: float
    high: float
    unit: str = ""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= float(value) <= self.high

    def as_json(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class BeamLimits:
    voltage_v: Range
    current_a: Range
    working_distance_m: Range
    horizontal_field_width_m: Range
    stigmation: Range  # each of x, y (arbitrary vendor units, normalised to -1..1 is typical)
    beam_shift_m: Range  # each of x, y
    detectors: tuple[str, ...]
    # The currents the column can give (apertures / probes), when it gives only some; empty = any in ``current_a``.
    currents_a: tuple[float, ...] = ()


@dataclass(frozen=True)
class InstrumentLimits:
    """The ranges the server enforces before anything reaches the instrument."""

    electron: BeamLimits
    ion: BeamLimits
    stage: dict[str, Range]  # x_m, y_m, z_m, r_deg, t_deg
    dwell_s: Range
    frame_width_px: Range
    frame_height_px: Range
    line_averaging: Range
    mill_depth_m: Range  # per pattern, per request
    pattern_size_m: Range  # width and height of one pattern
    max_patterns: int = 16

    def beam(self, name: BeamName) -> BeamLimits:
        return self.electron if name == "electron" else self.ion


@dataclass(frozen=True)
class Description:
    """Who the instrument is and what it accepts: the body of the ``hello`` reply."""

    vendor: str
    model: str
    serial: str
    backend: str
    limits: InstrumentLimits
    supports_faults: bool = False


@dataclass(frozen=True)
class BeamChanges:
    """Beam settings to change; ``None`` leaves a setting as it is."""

    voltage_v: float | None = None
    current_a: float | None = None
    working_distance_m: float | None = None
    horizontal_field_width_m: float | None = None
    stigmation: tuple[float, float] | None = None
    beam_shift_m: tuple[float, float] | None = None
    scan_rotation_deg: float | None = None
    blanked: bool | None = None


@dataclass(frozen=True)
class FrameRequest:
    beam: BeamName
    width_px: int
    height_px: int
    dwell_s: float
    line_averaging: int = 1
    detector: str | None = None  # None: the beam's current detector
    horizontal_field_width_m: float | None = None  # None: keep; pixel size = hfw / width
    bit_depth: Literal[8, 16] = 8


@dataclass
class Frame:
    """An image and the instrument's own account of how it was taken."""

    image: NDArray[np.uint8] | NDArray[np.uint16]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MillPattern:
    """One ion-beam pattern in the ion image's frame (m, centre of field = 0, +y up the image)."""

    kind: Literal["rectangle", "cleaning_cross_section"]
    center_m: tuple[float, float]
    width_m: float
    height_m: float
    depth_m: float
    scan_direction: Literal["top_to_bottom", "bottom_to_top", "left_to_right", "right_to_left"] = "top_to_bottom"


@dataclass(frozen=True)
class MillRequest:
    patterns: tuple[MillPattern, ...]
    current_a: float
    voltage_v: float | None = None  # None: keep


@dataclass(frozen=True)
class StageMove:
    """Absolute target; ``None`` keeps an axis where it is."""

    x_m: float | None = None
    y_m: float | None = None
    z_m: float | None = None
    r_deg: float | None = None
    t_deg: float | None = None


class Job(Protocol):
    """Handed to a long operation: report progress, and stop when asked."""

    def progress(self, fraction: float, message: str = "") -> None: ...

    @property
    def cancelled(self) -> bool: ...


class InstrumentFault(Exception):
    """The instrument (or its software) refused or failed; becomes an error reply.

    ``name`` is one of the wire error names (``beam_trip``, ``vacuum_interlock``,
    ``frame_timeout``, ``autofunction_diverged``, ``stage_error``, ``link_lost``,
    ``vendor_error``, ``interlock``, ``cancelled``); ``retry_safe`` says whether
    sending the same request again cannot do harm twice (False when a mill may
    have partly run).
    """

    def __init__(self, name: str, message: str, *, retry_safe: bool, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.name = name
        self.message = message
        self.retry_safe = retry_safe
        self.details = dict(details or {})


class Unsupported(Exception):
    """This backend cannot do what was asked (e.g. faults on a real instrument)."""


@runtime_checkable
class Backend(Protocol):
    """One instrument behind the bridge.

    The server runs at most one long operation at a time and never overlaps a
    beam or detector change with one; ``state`` and ``set_fault`` may arrive
    on another thread while a long operation runs, so they must be safe to
    call concurrently with it.

    Short calls (``state``, ``set_beam``, ``set_detector``) return at once;
    long ones take a ``Job``, report progress and poll ``job.cancelled``.
    Every return value is what the instrument *reports* after the call, not
    an echo of the request.
    """

    def describe(self) -> Description: ...

    def state(self) -> dict[str, Any]:
        """Snapshot: vacuum, beams (on, blanked, voltage, current, wd, ...), detectors, stage, interlocks."""
        ...

    def set_beam(self, beam: BeamName, changes: BeamChanges) -> dict[str, Any]: ...

    def set_detector(self, beam: BeamName, detector: str, brightness: float | None, contrast: float | None) -> dict[str, Any]: ...

    def grab_frame(self, request: FrameRequest, job: Job) -> Frame: ...

    def mill(self, request: MillRequest, job: Job) -> dict[str, Any]: ...

    def move_stage(self, move: StageMove, job: Job) -> dict[str, Any]: ...

    def autofunction(self, kind: Autofunction, beam: BeamName, job: Job) -> dict[str, Any]: ...

    def set_fault(self, name: str, on: bool, options: dict[str, Any]) -> dict[str, Any]:
        """Switch a simulated fault; real instruments raise ``Unsupported``."""
        ...

    def close(self) -> None: ...
