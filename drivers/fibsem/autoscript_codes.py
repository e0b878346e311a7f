"""AutoScript ``ApplicationServerException.code`` values and what each one means on the bridge's wire.

These are the codes of clemflow's AutoScript look-alike
(``clemflow.simulators.fibsem.autoscript_types.ErrorCode``). Thermo does not
publish a stable code list; on a real instrument an unknown code arrives as
``vendor_error`` with ``details.vendor_code`` and the server's message, and a
site that learns its codes adds them here.
"""

from __future__ import annotations

__all__ = ["API_ERRORS", "wire_name"]

API_ERRORS: dict[int, tuple[str, str]] = {
    1: ("link_lost", "communication with the microscope server lost"),
    2: ("link_lost", "not connected"),
    3: ("out_of_range", "invalid value"),
    4: ("vendor_error", "not allowed in the present state"),
    5: ("vacuum_interlock", "vacuum not ready"),
    6: ("interlock", "beam is off"),
    7: ("beam_trip", "beam tripped"),
    8: ("frame_timeout", "acquisition timed out"),
    9: ("autofunction_diverged", "autofunction failed"),
    10: ("stage_error", "stage error"),
    11: ("vendor_error", "patterning failed"),
    12: ("cancelled", "aborted"),
}
"""code -> (wire error name, meaning)."""


def wire_name(code: int) -> tuple[str, str]:
    """The wire name and a readable meaning for an AutoScript code; unknown codes are ``vendor_error``."""
    return API_ERRORS.get(int(code), ("vendor_error", f"AutoScript error {code}"))
