"""What the simulated instrument raises; each look-alike turns these into its vendor's errors."""

from __future__ import annotations

from typing import Any

__all__ = [
    "Aborted",
    "AutofunctionFailed",
    "BeamOff",
    "BeamTrip",
    "Busy",
    "FrameTimeout",
    "InstrumentError",
    "Interlock",
    "InvalidPattern",
    "OutOfRange",
    "StageError",
]


class InstrumentError(Exception):
    """Base: ``kind`` names the failure; ``details`` says what the instrument knows."""

    kind = "instrument_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Interlock(InstrumentError):
    """Refused before anything happened: the vacuum is not ready."""

    kind = "interlock"


class BeamOff(InstrumentError):
    """Refused before anything happened: the beam is off (or tripped); ``details['beam']``."""

    kind = "beam_off"


class BeamTrip(InstrumentError):
    """The beam tripped part-way through a grab or mill; ``details['beam']``, ``details['fraction']``."""

    kind = "beam_trip"


class FrameTimeout(InstrumentError):
    kind = "frame_timeout"


class AutofunctionFailed(InstrumentError):
    kind = "autofunction_failed"


class StageError(InstrumentError):
    """The stage stopped part-way; ``details['position']`` is where it is."""

    kind = "stage_error"


class OutOfRange(InstrumentError):
    """A value outside the instrument's limits; ``details['field']``, ``details['limits']``."""

    kind = "out_of_range"


class InvalidPattern(InstrumentError):
    kind = "invalid_pattern"


class Busy(InstrumentError):
    """Another action holds what this one needs (e.g. a stage move during a mill)."""

    kind = "busy"


class Aborted(InstrumentError):
    """Stopped on request (abort / stop / cancel); a mill logged what it removed."""

    kind = "aborted"
