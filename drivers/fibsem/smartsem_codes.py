"""SmartSEM remote API error codes and what each one means on the bridge's wire.

The CZEMApi returns a number from every call (0 = success). A driver must say
which of those numbers are a tripped beam, a lost vacuum or a dead link,
because the client decides from the wire name what to do next.
"""

from __future__ import annotations

__all__ = ["API_ERRORS", "wire_name"]

API_ERRORS: dict[int, tuple[str, str]] = {
    1000: ("link_lost", "API not initialised"),
    1002: ("vendor_error", "unknown parameter"),
    1003: ("out_of_range", "value out of range"),
    1005: ("vendor_error", "parameter is read only"),
    1008: ("vendor_error", "command failed"),
    1010: ("interlock", "not allowed in this state"),
    1014: ("vacuum_interlock", "vacuum not ready"),
    1017: ("beam_trip", "beam not on or tripped"),
    1021: ("frame_timeout", "frame grab timed out"),
    1025: ("stage_error", "stage error"),
    1032: ("link_lost", "communication with the microscope lost"),
    2027: ("interlock", "FIB not ready"),
    2028: ("beam_trip", "ion source tripped"),
    2029: ("vendor_error", "milling failed"),
    2030: ("vendor_error", "pattern file invalid"),
    2031: ("vendor_error", "milling aborted"),
}
"""code -> (wire error name, SmartSEM's meaning)."""


def wire_name(code: int) -> tuple[str, str]:
    """The wire name and a readable meaning for a SmartSEM code; unknown codes are ``vendor_error``."""
    return API_ERRORS.get(int(code), ("vendor_error", f"SmartSEM API error {code}"))
