"""The bridge client: a typed Python API over docs/bridge-protocol.md for the engine.

Every call that changes the instrument carries an idempotency key, so the
engine can always send a request again after a timeout, a dead connection or
a server restart without milling twice: the server answers a key it has seen
from its on-disk record. The connection (``client_io.Link``) reconnects by
itself, re-sends on timeouts with the same key, and raises
``BridgeUnavailable`` within 3 heartbeats when the server goes silent.

    with BridgeClient("tcp://fibsem-pc:5555", server_key=..., client_keys=...) as bridge:
        frame = bridge.grab_frame(FrameRequest("electron", 4096, 3072, 2e-6), key="run42/slice-000317/frame")
        bridge.mill([MillPattern("rectangle", (0, 0), 20e-6, 15e-9, 5e-6)], 7e-10, key="run42/slice-000317/mill")
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import wire
from .backend import BeamChanges, BeamName, Frame, FrameRequest, MillPattern, StageMove
from .client_io import CurveKeys, Link
from .client_types import (
    BridgeError,
    BridgeTimeout,
    BridgeUnavailable,
    Operation,
    OperationHandle,
    RecordEntry,
    ServerInfo,
)

__all__ = [
    "BridgeClient",
    "BridgeError",
    "BridgeTimeout",
    "BridgeUnavailable",
    "Operation",
    "OperationHandle",
    "RecordEntry",
    "ServerInfo",
    "load_curve_keys",
]

log = logging.getLogger("clemflow.bridge.client")

QUERY = frozenset({"hello", "ping", "state", "operation", "result", "record"})
SET = frozenset({"set_beam", "set_detector", "cancel", "set_fault"})
LONG = frozenset({"grab_frame", "mill", "move_stage", "autofocus", "autostigmation", "auto_contrast"})

Progress = Callable[[Operation], None]


def command_class(command: str) -> str:
    """The timeout class of a command: ``query``, ``set`` or ``long_start``."""
    if command in SET:
        return "set"
    if command in LONG:
        return "long_start"
    return "query"


def load_curve_keys(server_key: str | bytes | Path, client_keys: str | Path, name: str | None = None) -> CurveKeys:
    """CURVE keys from a key folder made by ``clemflow bridge keys`` (docs/bridge-protocol.md section 9).

    ``server_key``: the server's ``server.key`` file, the key folder holding
    it, or the Z85 public key itself. ``client_keys``: this client's
    ``NAME.key_secret`` file or a folder holding it (``name`` picks one).
    """
    from . import security

    if isinstance(server_key, Path) or (isinstance(server_key, str) and Path(server_key).exists()):
        server_public = security.load_public_key(server_key)
    else:
        server_public = server_key.encode("ascii") if isinstance(server_key, str) else bytes(server_key)
    public, secret = security.load_client_keys(client_keys, name)
    return CurveKeys(server_public=server_public, public=public, secret=secret)


def _wire(value: Any) -> Any:
    """Dataclasses and tuples as JSON values (tuples become lists; the server compares canonical JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_wire(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _wire(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _wire(v) for k, v in values.items() if v is not None}


def decode_frame(result: dict[str, Any], buffers: list[memoryview]) -> Frame:
    """A frame reply (section 6) as a ``Frame``; the image is a read-only view of the received bytes (copy to edit)."""
    try:
        image = wire.decode_image(result["image"], buffers)
    except (KeyError, TypeError, ValueError) as error:
        raise BridgeError(400, "bad_message", f"unreadable frame reply: {error}", retry_safe=True, command="result",
                          operation=result.get("operation")) from error
    metadata = dict(result.get("metadata") or {})
    if "operation" in result:
        metadata.setdefault("operation", result["operation"])
    return Frame(image=image, metadata=metadata)


class BridgeClient:
    """One bridge server, reached from one engine thread (plus event callbacks on their own thread).

    ``address``: the command endpoint, e.g. ``tcp://127.0.0.1:5555``; events
    are on ``events`` or the port the server names in ``hello``.
    ``server_key`` / ``client_keys``: CURVE keys (see ``load_curve_keys``).
    ``timeouts``: per-class reply timeouts overriding ``hello``.timeouts_s
    (``query``, ``set``, ``long_start``); ``retries``: re-sends after a timeout
    before ``BridgeTimeout``. ``heartbeat_s``: overrides the server's value for
    noticing silence (3 x heartbeat_s) and for pinging.
    """

    def __init__(self, address: str, *, events: str | None = None, server_key: str | bytes | Path | None = None,
                 client_keys: str | Path | None = None, timeouts: Mapping[str, float] | None = None,
                 heartbeat_s: float | None = None, retries: int = 2, name: str = "clemflow") -> None:
        if (server_key is None) != (client_keys is None):
            raise ValueError("CURVE needs both server_key and client_keys (or neither, on loopback)")
        curve = load_curve_keys(server_key, client_keys) if server_key is not None else None
        self.address = address
        self.name = name
        self._link = Link(address, events=events, curve=curve, heartbeat_s=heartbeat_s, timeouts=dict(timeouts or {}),
                          retries=retries, name=name)
        self._link.on_restart = self._after_restart
        self._handles: dict[str, OperationHandle] = {}
        self._handles_lock = threading.Lock()
        self.interrupted: list[RecordEntry] = []  # keyed operations a server restart cut off, as the record says

    # ------------------------------------------------------------------ lifetime and facts

    def close(self) -> None:
        self._link.close()

    def __enter__(self) -> BridgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def server_id(self) -> str | None:
        """The server's id as last heard; it changes when the server restarts."""
        return self._link.server_id

    @property
    def restarts(self) -> int:
        """Server restarts this client has seen."""
        return self._link.epoch

    @property
    def resends(self) -> int:
        """Requests sent again (same key) because no reply came within their class's timeout."""
        return self._link.resent

    @property
    def available(self) -> bool:
        """False while the server has been silent for more than 3 heartbeats."""
        return self._link.alive

    def subscribe(self, callback: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback(topic, body)`` for every event (and ``restart``); returns an unsubscribe function.

        Callbacks run on the client's event thread, one at a time; they may
        call the client.
        """
        return self._link.add_listener(callback)

    # ------------------------------------------------------------------ requests

    def request(self, command: str, args: Mapping[str, Any] | None = None, *, key: str | None = None) -> tuple[dict[str, Any], list[Any]]:
        """Send one request and wait for its reply: ``(result, buffers)``; an error reply raises ``BridgeError``."""
        cls = command_class(command)
        if cls != "query" and key is None:
            key = self.new_key(command)
        pending = self._link.submit(command, dict(args or {}), key, cls)
        pending.done.wait()
        if pending.failure is not None:
            raise pending.failure
        reply = pending.reply or {}
        if not reply.get("ok"):
            raise BridgeError.from_wire(reply.get("error") or {}, command=command, key=key)
        result = reply.get("result")
        if isinstance(result, dict) and reply.get("replayed"):
            result = {**result, "replayed": True}
        return result, pending.buffers

    def new_key(self, command: str) -> str:
        """A fresh idempotency key; the engine should pass its own (``<run>/slice-N/<action>``)."""
        return f"{self.name}/{command}/{uuid.uuid4().hex}"

    def hello(self) -> ServerInfo:
        return ServerInfo.from_wire(self.request("hello")[0])

    def ping(self) -> float:
        """The server's clock (Unix seconds)."""
        return float(self.request("ping")[0]["time"])

    def state(self) -> dict[str, Any]:
        """Instrument snapshot: vacuum, beams, stage, interlocks, busy (section 4)."""
        return self.request("state")[0]

    def record(self, key: str) -> RecordEntry:
        """What the server's record says about an idempotency key (``unknown`` = never executed)."""
        body = self.request("record", {"key": key})[0]
        return RecordEntry(key=str(body.get("key", key)), command=body.get("command"), state=str(body["state"]),
                           operation=body.get("operation"), reply=body.get("reply"))

    def operation(self, op: str | OperationHandle) -> Operation:
        body = self.request("operation", {"operation": _op_id(op)})[0]
        self._link.note_operation(body)
        return Operation.from_wire(body)

    def result(self, op: str | OperationHandle) -> dict[str, Any] | Frame:
        """A finished operation's result; a frame comes back as a ``Frame``."""
        result, buffers = self.request("result", {"operation": _op_id(op)})
        if isinstance(result, dict) and "image" in result:
            return decode_frame(result, buffers)
        return result

    # ------------------------------------------------------------------ settings

    def set_beam(self, beam: BeamName, changes: BeamChanges | None = None, *, key: str | None = None, **values: Any) -> dict[str, Any]:
        """Change beam settings (``BeamChanges`` or keyword values); returns the beam as the instrument reports it."""
        args = _without_none(dataclasses.asdict(changes)) if changes is not None else {}
        args.update(_without_none(values))
        return self.request("set_beam", {"beam": beam, **args}, key=key)[0]

    def set_detector(self, beam: BeamName, detector: str, *, brightness: float | None = None, contrast: float | None = None,
                     key: str | None = None) -> dict[str, Any]:
        args = _without_none({"beam": beam, "detector": detector, "brightness": brightness, "contrast": contrast})
        return self.request("set_detector", args, key=key)[0]

    def cancel(self, op: str | OperationHandle, *, key: str | None = None) -> dict[str, Any]:
        """Ask the instrument to stop an operation; it then ends ``cancelled`` (or ``done`` if it finished first)."""
        return self.request("cancel", {"operation": _op_id(op)}, key=key)[0]

    def set_fault(self, fault: str, on: bool = True, *, key: str | None = None, **options: Any) -> dict[str, Any]:
        """Switch a simulator fault (``unsupported`` on a real instrument)."""
        return self.request("set_fault", {"fault": fault, "on": bool(on), "options": _wire(options)}, key=key)[0]

    # ------------------------------------------------------------------ long operations

    def start(self, command: str, args: Mapping[str, Any], *, key: str | None = None) -> OperationHandle:
        """Start a long operation; returns at once with its handle (a replayed key gives the same operation)."""
        if command not in LONG:
            raise ValueError(f"{command!r} is not a long operation ({sorted(LONG)})")
        key = key or self.new_key(command)
        epoch = self._link.epoch
        body = self.request(command, args, key=key)[0]
        handle = OperationHandle(operation=str(body["operation"]), command=command, key=key,
                                 expected_s=float(body.get("expected_s") or 0.0), timeout_s=float(body.get("timeout_s") or 0.0),
                                 replayed=bool(body.get("replayed")), state=str(body.get("state", "running")), epoch=epoch)
        if "command" in body:  # the start reply is the OPERATION itself: a replayed one may have ended already
            self._link.note_operation({k: v for k, v in body.items() if k != "replayed"})
        with self._handles_lock:
            self._handles[handle.operation] = handle
        return handle

    def wait(self, op: str | OperationHandle, timeout: float | None = None, progress: Progress | None = None,
             poll_s: float = 1.0) -> Operation:
        """Wait for an operation to end, on ``operation`` events and a poll about once a second.

        Returns the final ``Operation`` when done; raises its ``BridgeError``
        when it failed, was cancelled or was cut off by a server restart
        (``interrupted``); ``BridgeUnavailable`` if the server goes silent;
        ``BridgeTimeout`` after ``timeout`` (default: the operation's own
        timeout + 60 s; the operation may still be running).
        ``progress(operation)`` is called in this thread on each change.
        """
        handle = self._handle(op)
        limit = timeout if timeout is not None else (handle.timeout_s or 3600.0) + 60.0
        deadline = time.monotonic() + limit
        epoch, last_poll, last_seen = handle.epoch, -float("inf"), None
        while True:
            if self._link.epoch != epoch:  # the server restarted since we last heard of this operation
                epoch = self._link.epoch
                status: Operation | None = self._recover(handle)
            else:
                poll = time.monotonic() - last_poll >= poll_s
                last_poll = time.monotonic() if poll else last_poll
                status = self._status(handle, poll=poll)
            if status is not None:
                if progress is not None and (status.state, status.progress, status.message) != last_seen:
                    last_seen = (status.state, status.progress, status.message)
                    progress(status)
                if status.finished:
                    with self._handles_lock:
                        self._handles.pop(handle.operation, None)
                    status.raise_for_state()
                    return status
            left = deadline - time.monotonic()
            if left <= 0:
                raise BridgeTimeout(self.address, f"operation {handle.operation} still running after {limit:g} s",
                                    command=handle.command, key=handle.key)
            with self._link.changed:
                self._link.changed.wait(min(left, poll_s, 0.25))

    def run(self, command: str, args: Mapping[str, Any], *, key: str | None = None, progress: Progress | None = None,
            timeout: float | None = None) -> dict[str, Any] | Frame:
        """Start a long operation, wait for it, and return its result."""
        handle = self.start(command, args, key=key)
        self.wait(handle, timeout=timeout, progress=progress)
        return self.result(handle)

    def grab_frame(self, request: FrameRequest | None = None, *, key: str | None = None, progress: Progress | None = None,
                   timeout: float | None = None, **fields: Any) -> Frame:
        """Grab a frame (``FrameRequest`` or its fields as keywords); pixels and the instrument's metadata."""
        request = request if request is not None else FrameRequest(**fields)
        frame = self.run("grab_frame", _wire(request), key=key, progress=progress, timeout=timeout)
        assert isinstance(frame, Frame)
        return frame

    def mill(self, patterns: Iterable[MillPattern | Mapping[str, Any]], current_a: float, voltage_v: float | None = None, *,
             key: str | None = None, progress: Progress | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Mill patterns (ion image frame, metres) at ``current_a``; what the instrument reports it did."""
        args = {"patterns": [_wire(p) for p in patterns], "current_a": current_a, "voltage_v": voltage_v}
        return self._run_dict("mill", args, key, progress, timeout)

    def move_stage(self, move: StageMove | None = None, *, key: str | None = None, progress: Progress | None = None,
                   timeout: float | None = None, **axes: float | None) -> dict[str, Any]:
        """Absolute stage move (``StageMove`` or x_m= ... t_deg=); axes left out stay where they are."""
        args = _without_none(dataclasses.asdict(move)) if move is not None else {}
        args.update(_without_none(axes))
        return self._run_dict("move_stage", args, key, progress, timeout)

    def autofocus(self, beam: BeamName = "electron", *, key: str | None = None, progress: Progress | None = None,
                  timeout: float | None = None) -> dict[str, Any]:
        return self._run_dict("autofocus", {"beam": beam}, key, progress, timeout)

    def autostigmation(self, beam: BeamName = "electron", *, key: str | None = None, progress: Progress | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        return self._run_dict("autostigmation", {"beam": beam}, key, progress, timeout)

    def auto_contrast(self, beam: BeamName = "electron", *, key: str | None = None, progress: Progress | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        return self._run_dict("auto_contrast", {"beam": beam}, key, progress, timeout)

    # ------------------------------------------------------------------ internals

    def _run_dict(self, command: str, args: dict[str, Any], key: str | None, progress: Progress | None,
                  timeout: float | None) -> dict[str, Any]:
        result = self.run(command, args, key=key, progress=progress, timeout=timeout)
        assert isinstance(result, dict)
        return result

    def _handle(self, op: str | OperationHandle) -> OperationHandle:
        if isinstance(op, OperationHandle):
            return op
        with self._handles_lock:
            known = self._handles.get(op)
        if known is not None:
            return known
        status = self.operation(op)
        return OperationHandle(operation=op, command=status.command, key=status.key or "", expected_s=status.expected_s or 0.0,
                               timeout_s=status.timeout_s or 0.0, state=status.state, epoch=self._link.epoch)

    def _status(self, handle: OperationHandle, *, poll: bool) -> Operation | None:
        """The latest word on an operation: its events, else (every poll_s) a poll."""
        body = self._link.operation_state(handle.operation)
        known = Operation.from_wire(body) if body is not None else None
        if (known is not None and known.finished) or not poll:
            return known
        try:
            return self.operation(handle.operation)
        except BridgeError as error:
            if error.name == "unknown_operation" and handle.key:
                return self._recover(handle)
            raise

    def _recover(self, handle: OperationHandle) -> Operation:
        """After a server restart: what happened to an operation, from the server's record of its key."""
        entry = self.record(handle.key)
        if entry.state in ("interrupted", "started"):
            error = (entry.reply or {}).get("error") or {
                "code": 450, "name": "interrupted", "retry_safe": False,
                "message": f"the bridge server restarted while {handle.command} {handle.operation} ran; its outcome is unknown: "
                           "check the instrument before repeating it"}
            status = Operation(operation=handle.operation, command=handle.command, key=handle.key, state="interrupted", error=error)
        elif entry.state == "unknown":
            status = Operation(operation=handle.operation, command=handle.command, key=handle.key, state="failed", error={
                "code": 406, "name": "unknown_operation", "retry_safe": True,
                "message": f"the restarted server has no record of key {handle.key!r}: the request was not executed"})
        else:
            try:
                return self.operation(entry.operation or handle.operation)
            except BridgeError:
                reply = entry.reply or {}
                status = Operation(operation=handle.operation, command=handle.command, key=handle.key,
                                   state="done" if entry.state == "done" else "failed", progress=1.0,
                                   error=reply.get("error") if entry.state != "done" else None)
        self._link.note_operation(dataclasses.asdict(status))
        return status

    def _after_restart(self, old: str, new: str) -> None:
        """Ask the record about every operation this client started and has not seen end (event thread)."""
        with self._handles_lock:
            open_handles = list(self._handles.values())
        for handle in open_handles:
            body = self._link.operation_state(handle.operation)
            if body is not None and Operation.from_wire(body).finished:
                continue
            try:
                entry = self.record(handle.key)
            except (BridgeError, BridgeUnavailable, BridgeTimeout) as error:
                log.warning("after the restart of %s, could not ask the record about %s: %s", self.address, handle.key, error)
                continue
            if entry.state in ("interrupted", "started"):
                self.interrupted.append(entry)
                log.warning("bridge server restart (%s -> %s) interrupted %s %s (key %s): outcome unknown",
                            old, new, handle.command, handle.operation, handle.key)
                self._recover(handle)


def _op_id(op: str | OperationHandle) -> str:
    return op.operation if isinstance(op, OperationHandle) else str(op)
