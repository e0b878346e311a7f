"""SmartSEM look-alike: its numeric error codes and which instrument failure gets which.

The numbers lie in SmartSEM's API ranges; the meanings are this look-alike's.
"""

from __future__ import annotations

from .errors import (Aborted, AutofunctionFailed, BeamOff, BeamTrip, Busy, FrameTimeout, Interlock, InvalidPattern,
                     OutOfRange, StageError)

__all__ = ["ERRORS", "Refused", "error_code"]

ERRORS: dict[int, str] = {
    0: "OK",
    1000: "API not initialised",
    1002: "unknown parameter or command",
    1003: "value out of range",
    1005: "parameter is read only",
    1008: "command failed",
    1010: "not allowed in this state",
    1014: "vacuum not ready",
    1017: "beam not on / tripped",
    1021: "frame grab timed out",
    1025: "stage error",
    1032: "communication with the microscope lost",
    2027: "FIB not ready",
    2028: "ion source tripped",
    2029: "milling failed",
    2030: "pattern file invalid",
    2031: "milling aborted",
}


class Refused(Exception):
    """A refusal that already has its code (e.g. a stage move that could not start)."""

    def __init__(self, code: int) -> None:
        super().__init__(ERRORS.get(code, "refused"))
        self.code = code


def error_code(e: Exception, kind: str = "") -> int:
    """The SmartSEM code for an instrument error during ``kind`` (grab/mill/stage/auto/set)."""
    if isinstance(e, Refused):
        return e.code
    ion = getattr(e, "details", {}).get("beam") == "ion" or kind == "mill"
    if isinstance(e, Interlock):
        return 1014
    if isinstance(e, BeamTrip):
        return 2028 if ion else 1017
    if isinstance(e, BeamOff):
        return 2027 if ion else 1017
    if isinstance(e, FrameTimeout):
        return 1021
    if isinstance(e, StageError):
        return 1025
    if isinstance(e, (OutOfRange, ValueError)):
        return 1003
    if isinstance(e, InvalidPattern):
        return 2030
    if isinstance(e, (Busy, PermissionError)):
        return 1010
    if isinstance(e, Aborted):
        return 2031 if kind == "mill" else 0
    if isinstance(e, AutofunctionFailed):
        return 1008
    return 2029 if kind == "mill" else 1008
