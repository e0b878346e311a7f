"""What the bridge client hands back: errors, operations, record entries, server facts.

Kept apart from the connection so an engine can import and match on these
without pulling in ZeroMQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import errors

__all__ = [
    "TERMINAL_STATES",
    "BridgeError",
    "BridgeTimeout",
    "BridgeUnavailable",
    "Operation",
    "OperationHandle",
    "RecordEntry",
    "ServerInfo",
]

TERMINAL_STATES = frozenset({"done", "failed", "cancelled", "interrupted"})

# Codes the client gives an operation that ended without an error body.
_STATE_ERRORS = {"cancelled": (430, "cancelled", False), "interrupted": (450, "interrupted", False), "failed": (599, "internal", False)}


class BridgeError(errors.BridgeError):
    """The server answered with an error (docs/bridge-protocol.md section 3), as the client received it.

    ``retry_safe`` is the server's word on whether sending the same request
    again can do harm twice: false after a mill or move may have partly run.
    ``command``, ``key`` and ``operation`` say which request it answered.
    """

    def __init__(self, code: int, name: str, message: str, *, retry_safe: bool, details: dict[str, Any] | None = None,
                 command: str | None = None, key: str | None = None, operation: str | None = None):
        super().__init__(name, message, retry_safe=retry_safe, details=details)
        self.code, self.name = int(code), str(name)  # as the server sent them, even if this table lacks them
        self.command, self.key, self.operation = command, key, operation

    def __str__(self) -> str:
        where = ", ".join(part for part in (self.command, f"key={self.key}" if self.key else "",
                                            f"op={self.operation}" if self.operation else "") if part)
        safety = "retry safe" if self.retry_safe else "NOT retry safe"
        return f"{self.code} {self.name}: {self.message} ({where + '; ' if where else ''}{safety})"

    @classmethod
    def from_wire(cls, error: dict[str, Any], *, command: str | None = None, key: str | None = None,
                  operation: str | None = None) -> BridgeError:
        details = error.get("details") if isinstance(error.get("details"), dict) else None
        return cls(int(error.get("code", 599)), str(error.get("name", "internal")), str(error.get("message", "")),
                   retry_safe=bool(error.get("retry_safe", False)), details=details, command=command, key=key, operation=operation)


class BridgeUnavailable(ConnectionError):
    """No sign of life from the server (heartbeats, replies) for 3 x heartbeat_s, or the client was closed.

    The client never leaves a request queued for a server that is not
    there, so a dead server will not run it when it comes back. A server that
    was hung rather than dead (stopped, swapping) may still act on a request
    that had already reached it when it resumes. Either way: send it again
    with the same key once the server answers (the record answers it if it
    ran), or ask ``record(key)`` before doing anything else.
    """

    def __init__(self, address: str, message: str, *, command: str | None = None, key: str | None = None):
        self.address = address
        self.command = command
        self.key = key
        where = f" ({command}, key={key})" if key else (f" ({command})" if command else "")
        super().__init__(f"bridge unavailable at {address}: {message}{where}")


class BridgeTimeout(TimeoutError):
    """The server is alive but did not answer in time, after re-sending with the same key."""

    def __init__(self, address: str, message: str, *, command: str | None = None, key: str | None = None):
        self.address = address
        self.command = command
        self.key = key
        super().__init__(f"bridge at {address}: {message}" + (f" ({command}, key={key})" if key else f" ({command})" if command else ""))


@dataclass(frozen=True)
class Operation:
    """One long operation as the server reports it (section 5, ``OPERATION``)."""

    operation: str
    command: str
    key: str | None
    state: str
    progress: float = 0.0
    message: str = ""
    started: float | None = None
    ended: float | None = None
    expected_s: float | None = None
    timeout_s: float | None = None
    error: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Operation:
        return cls(
            operation=str(body["operation"]), command=str(body.get("command", "")), key=body.get("key"),
            state=str(body.get("state", "running")), progress=float(body.get("progress") or 0.0),
            message=str(body.get("message") or ""), started=body.get("started"), ended=body.get("ended"),
            expected_s=body.get("expected_s"), timeout_s=body.get("timeout_s"), error=body.get("error"),
        )

    def raise_for_state(self) -> None:
        """Raise the operation's own error unless it is done (or still running)."""
        if self.state in ("done", "running"):
            return
        if self.error:
            raise BridgeError.from_wire(self.error, command=self.command, key=self.key, operation=self.operation)
        code, name, safe = _STATE_ERRORS.get(self.state, (599, "internal", False))
        raise BridgeError(code, name, f"operation ended {self.state}: {self.message}", retry_safe=safe,
                          command=self.command, key=self.key, operation=self.operation)


@dataclass(frozen=True)
class OperationHandle:
    """What starting a long operation returned: enough to wait for it, cancel it, or ask the record."""

    operation: str
    command: str
    key: str
    expected_s: float
    timeout_s: float
    replayed: bool = False
    state: str = "running"
    epoch: int = 0  # the client's count of server restarts when the server answered


@dataclass(frozen=True)
class RecordEntry:
    """The server's record for an idempotency key (``record`` query)."""

    key: str
    command: str | None
    state: str  # started / done / failed / interrupted / unknown
    operation: str | None
    reply: dict[str, Any] | None

    @property
    def executed(self) -> bool | None:
        """False if never seen (not executed); None if unknown (cut off); True if it ran to an end."""
        if self.state == "unknown":
            return False
        if self.state in ("started", "interrupted"):
            return None
        return True


@dataclass(frozen=True)
class ServerInfo:
    """The ``hello`` reply."""

    protocol: int
    server: str
    server_id: str
    backend: str
    vendor: str
    model: str
    serial: str
    events_port: int | None  # None when the events are not on tcp (see ``events``)
    events: str
    heartbeat_s: float
    timeouts_s: dict[str, float]
    limits: dict[str, Any]
    supports_faults: bool
    commands: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> ServerInfo:
        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        return cls(
            protocol=int(body["protocol"]), server=str(body.get("server", "")), server_id=str(body["server_id"]),
            backend=str(body.get("backend", "")), vendor=str(body.get("vendor", "")), model=str(body.get("model", "")),
            serial=str(body.get("serial", "")), events_port=int(body["events_port"]) if body.get("events_port") is not None else None,
            events=str(body.get("events") or ""), heartbeat_s=float(body["heartbeat_s"]),
            timeouts_s={k: float(v) for k, v in dict(body.get("timeouts_s") or {}).items()},
            limits=dict(body.get("limits") or {}), supports_faults=bool(body.get("supports_faults", False)),
            commands=tuple(body.get("commands") or ()), extra={k: v for k, v in body.items() if k not in known},
        )
