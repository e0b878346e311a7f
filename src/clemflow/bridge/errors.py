"""The bridge's error table (docs/bridge-protocol.md, section 3) and the exception that carries one.

Every refusal or failure the server sends is a row of this table: a number, a
name, and whether sending the same request again is safe. Keeping the table in
one place means the server, the client and the documentation cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ERRORS", "BridgeError", "ErrorKind", "error_kind"]


@dataclass(frozen=True)
class ErrorKind:
    code: int
    name: str
    retry_safe: bool  # the default; a backend may report otherwise (a mill that partly ran)
    summary: str


_TABLE = [
    ErrorKind(400, "bad_message", False, "not JSON, not an object, missing or mistyped envelope field"),
    ErrorKind(401, "unsupported_version", False, "protocol version is not 1"),
    ErrorKind(402, "unknown_command", False, "no such command"),
    ErrorKind(403, "invalid_arguments", False, "missing, unknown or mistyped argument"),
    ErrorKind(404, "too_large", False, "request over 1 MiB"),
    ErrorKind(405, "key_conflict", False, "key used before with a different command or arguments"),
    ErrorKind(406, "unknown_operation", False, "no such operation id"),
    ErrorKind(407, "not_done", True, "the operation has not finished yet"),
    ErrorKind(409, "busy", True, "another long operation is running"),
    ErrorKind(410, "out_of_range", False, "a value is outside the instrument's limits"),
    ErrorKind(411, "interlock", True, "refused by an interlock before anything happened"),
    ErrorKind(420, "unsupported", False, "this backend cannot do this"),
    ErrorKind(430, "cancelled", False, "the operation was cancelled"),
    ErrorKind(440, "timeout", False, "the operation exceeded its timeout"),
    ErrorKind(450, "interrupted", False, "the server stopped while this keyed request ran"),
    ErrorKind(460, "result_gone", True, "a frame's pixels are no longer held"),
    ErrorKind(500, "beam_trip", False, "the beam tripped"),
    ErrorKind(501, "vacuum_interlock", False, "vacuum lost during the operation"),
    ErrorKind(502, "frame_timeout", True, "the frame grab did not complete"),
    ErrorKind(503, "autofunction_diverged", True, "autofunction failed; previous settings restored"),
    ErrorKind(504, "stage_error", False, "the stage reported an error"),
    ErrorKind(505, "link_lost", False, "the server cannot reach the vendor software"),
    ErrorKind(506, "vendor_error", False, "another vendor API error"),
    ErrorKind(599, "internal", False, "a bug in the server"),
]

ERRORS: dict[str, ErrorKind] = {kind.name: kind for kind in _TABLE}
_BY_CODE: dict[int, ErrorKind] = {kind.code: kind for kind in _TABLE}


def error_kind(name_or_code: str | int) -> ErrorKind:
    """The table row for a name or a code; unknown ones are ``vendor_error``/``internal`` rather than a crash."""
    if isinstance(name_or_code, int):
        return _BY_CODE.get(name_or_code, ERRORS["internal"])
    return ERRORS.get(name_or_code, ERRORS["vendor_error"])


class BridgeError(Exception):
    """An error reply: raised inside the server, turned into ``{"ok": false, "error": ...}``."""

    def __init__(self, name: str, message: str, *, retry_safe: bool | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        kind = error_kind(name)
        self.code = kind.code
        self.name = kind.name
        self.message = message
        self.retry_safe = kind.retry_safe if retry_safe is None else bool(retry_safe)
        self.details = dict(details or {})
        if kind.name != name:  # an instrument error name this table does not know: keep it visible
            self.details.setdefault("reported_name", name)

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "message": self.message, "retry_safe": self.retry_safe, "details": self.details}

    @classmethod
    def from_json(cls, error: dict[str, Any]) -> BridgeError:
        """Rebuild from an error body (a recorded reply, or a reply a client received)."""
        out = cls(str(error.get("name", "internal")), str(error.get("message", "")), retry_safe=bool(error.get("retry_safe", False)),
                  details=error.get("details") if isinstance(error.get("details"), dict) else None)
        if isinstance(error.get("code"), int):
            out.code = error["code"]
        return out

    def __str__(self) -> str:
        return f"{self.code} {self.name}: {self.message}"
