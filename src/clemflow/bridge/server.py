"""The bridge server: a ROUTER for commands and a PUB for events, over one backend.

Threads, and what each owns:

- the **loop** (``serve_forever`` or the thread ``start`` makes) owns the ROUTER:
  it reads every request, answers what it can at once (envelope errors,
  record replays, ``hello``, ``operation``, ``result``...), and sends the
  replies other threads post back to it;
- the **backend thread** makes the short backend calls (``state``, ``set_*``)
  one at a time, so a slow vendor call never stalls the loop;
- one **operation thread** at a time runs a long operation;
- the **event thread** owns the PUB socket (``events.EventPublisher``).

Nothing a client sends reaches the backend before it passed the envelope,
the record lookup and the argument and limit checks; every message is
handled inside a catch-all, so a bad one costs one error reply, never the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import wire
from .backend import Backend, Description, Frame, InstrumentFault, Unsupported
from .commands import CHANGES_INSTRUMENT, COMMANDS, LONG, QUERY, LongCall, plan_long, plan_set
from .errors import BridgeError
from .events import EventPublisher
from .operations import FrameStore, Operation, OperationJob, Timeouts
from .record import Record, RecordEntry
from .security import ServerAuth, apply_server_curve, check_bind, load_server_keys

__all__ = ["BridgeServer", "default_events_endpoint", "describe_json"]

log = logging.getLogger("clemflow.bridge.server")

SERVER_VERSION = "clemflow-bridge 0.1"
ALARM_NAMES = ("beam_trip", "vacuum_interlock", "stage_error", "link_lost", "interlock")
ENVELOPE_FIELDS = ("v", "id", "key", "command", "args")
RECEIVE_BATCH = 2000  # requests read per loop turn before replies from other threads are sent


def default_events_endpoint(commands: str) -> str:
    """Section 1: the command port + 1 (port 0 stays 0: both random); ``ipc://PATH`` -> ``ipc://PATH.events``."""
    if commands.startswith("tcp://"):
        host, _, port = commands.rpartition(":")
        if port.isdigit() and int(port) != 0:
            return f"{host}:{int(port) + 1}"
        return f"{host}:{port}"
    return f"{commands}.events"


def describe_json(description: Description) -> dict[str, Any]:
    """``limits`` of ``hello``: every range as [low, high]."""
    lim = description.limits

    def beam(bl: Any) -> dict[str, Any]:
        return {"voltage_v": bl.voltage_v.as_json(), "current_a": bl.current_a.as_json(),
                "working_distance_m": bl.working_distance_m.as_json(),
                "horizontal_field_width_m": bl.horizontal_field_width_m.as_json(),
                "stigmation": bl.stigmation.as_json(), "beam_shift_m": bl.beam_shift_m.as_json(),
                "detectors": list(bl.detectors), "currents_a": list(bl.currents_a)}

    return {"electron": beam(lim.electron), "ion": beam(lim.ion),
            "stage": {name: rng.as_json() for name, rng in lim.stage.items()},
            "dwell_s": lim.dwell_s.as_json(), "frame_width_px": lim.frame_width_px.as_json(),
            "frame_height_px": lim.frame_height_px.as_json(), "line_averaging": lim.line_averaging.as_json(),
            "mill_depth_m": lim.mill_depth_m.as_json(), "pattern_size_m": lim.pattern_size_m.as_json(),
            "max_patterns": lim.max_patterns}


@dataclass
class _Request:
    """Where to send the reply, and the envelope once it has been read."""

    peer: bytes
    delimited: bool  # came as ["", request]: reply the same way
    id: str | None = None
    command: str = ""
    key: str | None = None
    args: Any = None


class _Refusals:
    """Logs refused requests, at most ``per_second`` a second, so a flood of garbage cannot flood the log."""

    def __init__(self, publish: Callable[[str, dict[str, Any]], None], per_second: int = 20) -> None:
        self._publish = publish
        self._per_second = per_second
        self._window = 0.0
        self._count = 0
        self.suppressed = 0
        self.total = 0

    def __call__(self, level: int, message: str) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self.suppressed:
                log.warning("%d more refused requests in the last second were not logged one by one", self.suppressed)
            self._window, self._count, self.suppressed = now, 0, 0
        self._count += 1
        if self._count > self._per_second:
            self.suppressed += 1
            return
        log.log(level, message)
        self._publish("log", {"level": logging.getLevelName(level).lower(), "message": message, "time": time.time()})


class BridgeServer:
    """Serve one backend on a command endpoint and an event endpoint.

    ``bind``/``events`` may use port 0; the bound addresses are in
    ``commands_endpoint``/``events_endpoint`` after ``start()``. Without
    ``keys`` only loopback addresses are accepted (``InsecureBind`` otherwise).
    The backend is not closed by the server: whoever opened it closes it.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bind: str = "tcp://127.0.0.1:5555",
        events: str | None = None,
        record_dir: str | Path,
        keys: str | Path | None = None,
        heartbeat_s: float = 1.0,
        backend_name: str | None = None,
        frames_kept: int = 4,
        timeouts: Timeouts = Timeouts(),
        context: zmq.Context | None = None,
    ) -> None:
        events = events or default_events_endpoint(bind)
        check_bind(bind, have_keys=keys is not None)
        check_bind(events, have_keys=keys is not None)
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        self.backend = backend
        self.bind, self.events_bind = bind, events
        self.keys = Path(keys) if keys is not None else None
        self.heartbeat_s = float(heartbeat_s)
        self.timeouts = timeouts
        self.server_id = uuid.uuid4().hex
        self.description = backend.describe()
        self.backend_name = backend_name or self.description.backend
        self.limits_json = describe_json(self.description)
        self.record = Record(record_dir)
        self.frames = FrameStore(frames_kept)
        self.commands_endpoint = ""
        self.events_endpoint = ""

        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._lock = threading.Lock()  # operations, the current job, set waiters
        self._ops: dict[str, Operation] = {}
        self._results: dict[str, Any] = {}
        self._current: tuple[Operation, OperationJob, threading.Thread] | None = None
        self._waiters: dict[str, list[_Request]] = {}
        self._outbox: queue.Queue[tuple[_Request, dict[str, Any], list[Any]]] = queue.Queue()
        self._peers: dict[bytes, float] = {}
        self._stopping = threading.Event()
        self._loop_started = threading.Event()
        self._loop_done = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._backend_worker = _Worker("bridge-backend")
        self._instrument = threading.Lock()  # held by calls that change the instrument: set_beam/set_detector, long operations
        self._auth: ServerAuth | None = None
        self._router: zmq.Socket | None = None
        self._wake_pull: zmq.Socket | None = None
        self._wake_push: zmq.Socket | None = None
        self._wake_lock = threading.Lock()
        self._events: EventPublisher | None = None
        self._refused = _Refusals(self._publish)
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> BridgeServer:
        """Bind and serve from a background thread; returns at once with the endpoints known."""
        self._bind()
        self._loop_thread = threading.Thread(target=self._loop, name="bridge-loop", daemon=True)
        self._loop_thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind (unless ``start`` did) and serve from this thread until ``close()`` is called."""
        if self._router is None:
            self._bind()
        self._loop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop()`` is called (from a signal handler, say); True if it was."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def stop(self) -> None:
        """Ask the loop to end; safe from a signal handler or any thread. ``close()`` cleans up."""
        self._stopping.set()

    def close(self, wait_s: float = 5.0) -> None:
        """Stop serving; a running operation gets ``wait_s`` to end and be recorded (else: interrupted at next start)."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._loop_thread is not None:
            self._loop_thread.join(wait_s)
        elif self._router is not None and self._loop_started.is_set():
            self._loop_done.wait(wait_s)
        current = self._current
        if current is not None:
            log.warning("closing while %s %s runs; waiting up to %.0f s for it to end", current[0].command, current[0].operation, wait_s)
            current[2].join(wait_s)
        self._backend_worker.close(wait_s)
        if self._events is not None:
            self._events.close()
        if self._auth is not None:
            self._auth.stop()
        if self._current is None:
            self.record.close()
        if self._router is not None and not self._loop_started.is_set():  # bound but never served
            self._close_loop_sockets()
        if self._own_context:
            self._ctx.destroy(linger=0)  # every socket is closed by now, unless a thread failed to end: then close it
        log.info("bridge %s stopped", self.server_id)

    def __enter__(self) -> BridgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def busy(self) -> str | None:
        current = self._current
        return current[0].operation if current is not None else None

    def _bind(self) -> None:
        curve: tuple[bytes, bytes] | None = None
        if self.keys is not None:
            public, secret, allowed = load_server_keys(self.keys)
            self._auth = ServerAuth(self._ctx, allowed)
            if self._auth.count == 0:
                log.warning("no client keys in %s: no client can connect", allowed)
            curve = (public, secret)
        router = self._ctx.socket(zmq.ROUTER)
        pub = self._ctx.socket(zmq.PUB)
        for sock, endpoint in ((router, self.bind), (pub, self.events_bind)):
            sock.linger = 0
            if "[" in endpoint or endpoint.count(":") > 2:
                sock.ipv6 = True
            if curve is not None:
                apply_server_curve(sock, *curve)
        router.maxmsgsize = wire.SOCKET_MAX_MESSAGE_BYTES
        router.rcvhwm = router.sndhwm = 10_000
        pub.sndhwm = 10_000
        try:
            router.bind(self.bind)
            pub.bind(self.events_bind)
        except zmq.ZMQError:
            router.close(0)
            pub.close(0)
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            raise
        self.commands_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.events_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        wake = f"inproc://bridge-wake-{self.server_id}"
        self._wake_pull = self._ctx.socket(zmq.PULL)
        self._wake_pull.bind(wake)
        self._wake_push = self._ctx.socket(zmq.PUSH)
        self._wake_push.linger = 0
        self._wake_push.connect(wake)
        self._router = router
        self._events = EventPublisher(pub, server_id=self.server_id, heartbeat_s=self.heartbeat_s, busy=lambda: self.busy)
        self._events.start()
        for key in self.record.interrupted_at_load:
            self._publish("log", {"level": "warning", "time": time.time(),
                                  "message": f"key {key!r} was running when the server stopped: interrupted, not re-run"})
        log.info("bridge %s serving %s on %s (events %s)", self.server_id, self.backend_name, self.commands_endpoint, self.events_endpoint)

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._router is not None and self._wake_pull is not None
        self._loop_started.set()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        next_chores = 0.0
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(100))
                if self._router in ready:
                    for _ in range(RECEIVE_BATCH):
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        try:
                            self._handle(frames)
                        except Exception:  # _handle answers everything; this guards the loop against a bug in answering
                            log.exception("request handling failed")
                if self._wake_pull in ready:
                    while True:
                        try:
                            self._wake_pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                try:
                    self._send_posted()
                    now = time.monotonic()
                    if now >= next_chores:
                        next_chores = now + 0.2
                        self._chores()
                except Exception:
                    log.exception("bridge loop chores failed")
        finally:
            self._close_loop_sockets()
            self._loop_done.set()

    def _close_loop_sockets(self) -> None:
        with self._wake_lock:
            if self._wake_push is not None:
                self._wake_push.close(0)
                self._wake_push = None
        for sock in (self._wake_pull, self._router):
            if sock is not None:
                sock.close(0)

    def _handle(self, frames: list[bytes]) -> None:
        """One incoming message, start to end; whatever goes wrong ends in a reply, not in the loop."""
        peer, body = frames[0], frames[1:]
        self._peers[peer] = time.monotonic()
        delimited = len(body) >= 1 and len(body[0]) == 0 and len(body) != 1
        req = _Request(peer=peer, delimited=delimited)
        try:
            self._dispatch(req, body)
        except BridgeError as exc:
            self._refuse(req, exc)
        except Exception as exc:
            log.error("internal error on %s %r:\n%s", req.command or "request", req.id, traceback.format_exc())
            self._reply(req, wire.failure(req.id, BridgeError(
                "internal", f"internal server error ({type(exc).__name__}: {exc}); see the server log").as_json()))

    def _refuse(self, req: _Request, exc: BridgeError) -> None:
        level = logging.WARNING if exc.code in (400, 401, 402, 403, 404) else logging.INFO
        if exc.code in (405, 410):
            level = logging.WARNING
        self._refused(level, f"refused {req.command or 'request'} id={req.id!r} from {req.peer.hex()}: {exc}")
        self._reply(req, wire.failure(req.id, exc.as_json()))

    # -- envelope -----------------------------------------------------------------------------

    def _dispatch(self, req: _Request, body: list[bytes]) -> None:
        if len(body) == 2 and len(body[0]) == 0:
            raw = body[1]
        elif len(body) == 1:
            raw = body[0]
        else:
            raise BridgeError("bad_message", f"a request is one frame, or an empty frame and one frame; got {len(body)} frames")
        if len(raw) > wire.MAX_REQUEST_BYTES:
            req.id = wire.sniff_id(raw)
            raise BridgeError("too_large", f"request of {len(raw)} bytes is over the {wire.MAX_REQUEST_BYTES}-byte limit",
                              details={"bytes": len(raw), "limit": wire.MAX_REQUEST_BYTES})
        try:
            envelope = wire.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BridgeError("bad_message", f"not a UTF-8 JSON object: {str(exc)[:200]}") from None
        self._read_envelope(req, envelope)
        kind = COMMANDS[req.command]
        if kind == QUERY:
            self._query(req)
        else:
            self._keyed(req, kind)

    def _read_envelope(self, req: _Request, envelope: Any) -> None:
        if not isinstance(envelope, dict):
            raise BridgeError("bad_message", f"the request is a JSON {type(envelope).__name__}, not an object")
        rid = envelope.get("id")
        if isinstance(rid, str) and 1 <= len(rid) <= 128:
            req.id = rid
        version = envelope.get("v")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BridgeError("bad_message", "field v (protocol version, an integer) is missing or not an integer", details={"field": "v"})
        if version != wire.PROTOCOL_VERSION:
            raise BridgeError("unsupported_version", f"protocol version {version} is not supported; this server speaks {wire.PROTOCOL_VERSION}",
                              details={"supported": [wire.PROTOCOL_VERSION]})
        extra = sorted(set(envelope) - set(ENVELOPE_FIELDS))
        if extra:
            raise BridgeError("bad_message", f"unknown envelope field {extra[0][:64]!r}", details={"field": extra[0][:64]})
        if req.id is None:
            raise BridgeError("bad_message", "field id (a string of 1-128 characters) is missing or malformed", details={"field": "id"})
        command = envelope.get("command")
        if not isinstance(command, str):
            raise BridgeError("bad_message", "field command (a string) is missing or not a string", details={"field": "command"})
        key = envelope.get("key")
        if key is not None and not (isinstance(key, str) and 1 <= len(key) <= 256):
            raise BridgeError("bad_message", "field key must be a string of 1-256 characters or null", details={"field": "key"})
        if "args" not in envelope or not isinstance(envelope["args"], dict):
            raise BridgeError("bad_message", "field args (an object, {} when none) is missing or not an object", details={"field": "args"})
        if command not in COMMANDS:
            raise BridgeError("unknown_command", f"unknown command {command[:64]!r}", details={"commands": list(COMMANDS)})
        req.command, req.key, req.args = command, key, envelope["args"]
        if COMMANDS[command] != QUERY and key is None:
            raise BridgeError("bad_message", f"{command} changes the instrument and needs an idempotency key (field key)",
                              details={"field": "key"})

    # -- queries ------------------------------------------------------------------------------

    def _query(self, req: _Request) -> None:
        command, args = req.command, req.args
        if command == "hello":
            _no_args(args)
            self._reply(req, wire.ok(req.id, self._hello()))
        elif command == "ping":
            _no_args(args)
            self._reply(req, wire.ok(req.id, {"time": time.time()}))
        elif command == "state":
            _no_args(args)
            self._call_backend(req, self._state, record=False)
        elif command == "operation":
            self._reply(req, wire.ok(req.id, self._operation_json(_text_arg(args, "operation"))))
        elif command == "result":
            self._result(req, _text_arg(args, "operation"))
        elif command == "record":
            self._reply(req, wire.ok(req.id, self._record_json(_text_arg(args, "key"))))

    def _hello(self) -> dict[str, Any]:
        d = self.description
        port = self.events_endpoint.rpartition(":")[2]
        return {"protocol": wire.PROTOCOL_VERSION, "server": SERVER_VERSION, "server_id": self.server_id,
                "backend": self.backend_name, "vendor": d.vendor, "model": d.model, "serial": d.serial,
                "events_port": int(port) if port.isdigit() else None, "events": self.events_endpoint,
                "heartbeat_s": self.heartbeat_s, "timeouts_s": self.timeouts.as_json(), "limits": self.limits_json,
                "supports_faults": d.supports_faults, "commands": list(COMMANDS)}

    def _state(self, backend: Backend) -> dict[str, Any]:
        state = dict(backend.state())
        state["busy"] = self.busy
        state["time"] = time.time()
        return state

    def _find_operation(self, op_id: str) -> tuple[Operation | None, RecordEntry | None]:
        with self._lock:
            op = self._ops.get(op_id)
        if op is not None:
            return op, None
        entry = self.record.by_operation(op_id)
        if entry is None:
            raise BridgeError("unknown_operation", f"no operation {op_id[:140]!r} on this server or in its record",
                              details={"operation": op_id[:140]})
        return None, entry

    def _operation_json(self, op_id: str) -> dict[str, Any]:
        op, entry = self._find_operation(op_id)
        if op is not None:
            with self._lock:
                return op.as_json()
        assert entry is not None
        return _recorded_operation(entry)

    def _result(self, req: _Request, op_id: str) -> None:
        op, entry = self._find_operation(op_id)
        if op is not None:
            with self._lock:
                state, error, command = op.state, op.error, op.command
            if state == "running":
                raise BridgeError("not_done", f"operation {op_id} is still running", details={"operation": op_id})
            if error is not None:
                self._reply(req, wire.failure(req.id, error))
                return
            if command == "grab_frame":
                self._send_frame(req, op_id)
                return
            self._reply(req, wire.ok(req.id, self._results.get(op_id)))
            return
        assert entry is not None
        final = _recorded_operation(entry)
        if final["error"] is not None:
            self._reply(req, wire.failure(req.id, final["error"]))
        elif entry.command == "grab_frame":
            self._send_frame(req, op_id)
        else:
            self._reply(req, wire.ok(req.id, entry.result))

    def _send_frame(self, req: _Request, op_id: str) -> None:
        kept = self.frames.get(op_id)
        if kept is None:
            raise BridgeError("result_gone", f"the pixels of frame {op_id} are no longer held (the server keeps the last {self.frames.keep}); grab it again",
                              details={"operation": op_id})
        image, metadata = kept
        result = {"operation": op_id, "image": wire.image_header(image, 1), "metadata": metadata}
        self._reply(req, wire.ok(req.id, result), [wire.image_buffer(image)])

    def _record_json(self, key: str) -> dict[str, Any]:
        entry = self.record.get(key)
        if entry is None:
            return {"key": key, "command": None, "state": "unknown", "operation": None, "reply": None}
        return {"key": key, "command": entry.command, "state": entry.state, "operation": entry.operation,
                "reply": self._replay_body(entry)}

    # -- keyed commands -----------------------------------------------------------------------

    def _keyed(self, req: _Request, kind: str) -> None:
        assert req.key is not None
        canonical = wire.canonical(req.args)
        entry = self.record.get(req.key)
        if entry is not None:
            if not entry.same_request(req.command, canonical):
                raise BridgeError("key_conflict", f"key {req.key!r} was used before for a different request ({entry.command} with other arguments); "
                                  "a new action needs a new key", details={"key": req.key, "recorded_command": entry.command})
            self._replay(req, entry)
            return
        limits = self.description.limits
        if kind == LONG:
            call = plan_long(req.command, req.args, limits, self.timeouts)
            self._start_long(req, call, canonical)
        elif req.command == "cancel":
            self._cancel(req, _text_arg(req.args, "operation"), canonical)
        else:
            fn = plan_set(req.command, req.args, limits)
            if req.command == "set_fault" and not self.description.supports_faults:
                raise BridgeError("unsupported", f"{self.backend_name} is a real instrument: faults cannot be switched")
            if req.command in CHANGES_INSTRUMENT and self.busy is not None:
                raise BridgeError("busy", f"{self.busy} is running; {req.command} waits until it ends", details={"operation": self.busy})
            self._begin(req, canonical)
            self._call_backend(req, fn, record=True)

    def _replay(self, req: _Request, entry: RecordEntry) -> None:
        if entry.state == "started" and entry.operation is None:  # a set call still in flight: answer when it is
            with self._lock:
                if entry.state == "started":
                    self._waiters.setdefault(entry.key, []).append(req)
                    return
        body = self._replay_body(entry)
        self._reply(req, {"v": wire.PROTOCOL_VERSION, "id": req.id, **body, "replayed": True})

    def _replay_body(self, entry: RecordEntry) -> dict[str, Any] | None:
        """What a replay of ``entry`` answers: ok/error of a set, the operation of a long one."""
        if entry.operation is not None:
            with self._lock:
                op = self._ops.get(entry.operation)
                operation = op.as_json() if op is not None else None
            return {"ok": True, "result": operation or _recorded_operation(entry)}
        if entry.state == "interrupted":
            return {"ok": False, "error": _interrupted(entry).as_json()}
        if entry.reply is None:
            return None
        return {k: v for k, v in entry.reply.items() if k in ("ok", "result", "error")}

    def _cancel(self, req: _Request, op_id: str, canonical: str) -> None:
        op, entry = self._find_operation(op_id)
        self._begin(req, canonical)
        if op is not None:
            with self._lock:
                current = self._current
                if current is not None and current[0] is op:
                    current[1].cancel("cancel")
                result = {"operation": op_id, "state": op.state, "cancel_requested": op.state == "running"}
        else:
            assert entry is not None
            result = {"operation": op_id, "state": _recorded_operation(entry)["state"], "cancel_requested": False}
        reply = wire.ok(req.id, result)
        self.record.finish(req.key, "done", reply=reply)
        self._reply(req, reply)
        if op is not None and result["cancel_requested"]:
            log.info("cancel of %s %s requested", op.command, op_id)

    def _begin(self, req: _Request, canonical: str, operation: str | None = None) -> None:
        """Record ``started`` (fsynced) before anything is sent; if that fails, nothing is sent."""
        assert req.key is not None
        try:
            self.record.begin(req.key, req.command, canonical, operation)
        except OSError as exc:
            log.error("the record could not be written: %s", exc)
            raise BridgeError("internal", f"the idempotency record could not be written ({exc}); nothing was sent to the instrument",
                              retry_safe=True) from None

    def _call_backend(self, req: _Request, fn: Callable[[Backend], Any], *, record: bool) -> None:
        """Run a short backend call on the backend thread; the reply (and record end) follow from there."""

        def run() -> None:
            try:
                if req.command in CHANGES_INSTRUMENT:
                    with self._instrument:
                        value = fn(self.backend)
                else:
                    value = fn(self.backend)
                reply = wire.ok(req.id, wire.jsonable(value))
            except BaseException as exc:  # noqa: BLE001 - every failure must become a reply
                reply = wire.failure(req.id, self._backend_error(exc, req.command).as_json())
            if record and req.key is not None:
                try:
                    self.record.finish(req.key, "done" if reply["ok"] else "failed", reply=reply)
                except Exception:
                    log.exception("could not record the end of %r", req.key)
                with self._lock:
                    waiters = self._waiters.pop(req.key, [])
                for waiter in waiters:
                    self._post(waiter, {**reply, "id": waiter.id, "replayed": True})
            self._post(req, reply)

        self._backend_worker.submit(run)

    def _backend_error(self, exc: BaseException, command: str) -> BridgeError:
        if isinstance(exc, BridgeError):
            return exc
        if isinstance(exc, InstrumentFault):
            if exc.name in ALARM_NAMES:
                self._publish("alarm", {"name": exc.name, "message": exc.message, "time": time.time(), "command": command})
            return BridgeError(exc.name, exc.message, retry_safe=exc.retry_safe, details=wire.jsonable(exc.details))
        if isinstance(exc, Unsupported):
            return BridgeError("unsupported", str(exc) or f"{self.backend_name} cannot do {command}")
        log.error("backend raised during %s:\n%s", command, "".join(traceback.format_exception(exc)))
        return BridgeError("internal", f"the backend failed unexpectedly during {command} ({type(exc).__name__}: {exc}); see the server log")

    # -- long operations ----------------------------------------------------------------------

    def _start_long(self, req: _Request, call: LongCall, canonical: str) -> None:
        assert req.key is not None
        with self._lock:
            if self._current is not None:
                busy = self._current[0]
                raise BridgeError("busy", f"{busy.command} {busy.operation} is running; one long operation at a time",
                                  details={"operation": busy.operation})
            op = Operation(command=req.command, key=req.key, expected_s=round(call.expected_s, 6), timeout_s=round(call.timeout_s, 6))
            self._begin(req, canonical, op.operation)
            job = OperationJob(op, self._publish_operation, self._lock)
            thread = threading.Thread(target=self._run_operation, args=(op, job, call), name=f"bridge-{req.command}", daemon=True)
            self._ops[op.operation] = op
            self._current = (op, job, thread)
            started = op.as_json()
        self._publish("operation", started)  # queued before the worker can publish progress
        thread.start()
        self._reply(req, wire.ok(req.id, started))
        log.info("%s %s started (key %r, expected %.1f s, timeout %.0f s)", op.command, op.operation, op.key, op.expected_s, op.timeout_s)

    def _run_operation(self, op: Operation, job: OperationJob, call: LongCall) -> None:
        result: Any = None
        error: BridgeError | None = None
        try:
            with self._instrument:
                value = call.run(self.backend, job)
            if call.frame:
                image, metadata = _frame_parts(value)
                self.frames.put(op.operation, image, metadata)
                result = {"operation": op.operation, "metadata": metadata, "shape": list(image.shape), "dtype": str(image.dtype)}
            else:
                result = wire.jsonable(value)
        except BaseException as exc:  # noqa: BLE001
            error = self._backend_error(exc, op.command)
        state = "done" if error is None else ("cancelled" if error.name == "cancelled" else "failed")
        if job.cancel_reason == "timeout" and error is not None:
            cause = error.as_json()
            error = BridgeError("timeout", f"{op.command} ran past its timeout of {op.timeout_s:g} s and was stopped",
                                retry_safe=op.command not in ("mill", "move_stage"),
                                details={"timeout_s": op.timeout_s, "stopped_with": cause})
            state = "failed"
        final = {**op.as_json(), "state": state, "ended": time.time(), "error": error.as_json() if error else None,
                 "progress": 1.0 if state == "done" else op.progress}
        recorded = result
        if result is not None and call.frame:  # the record keeps a frame's metadata, never its pixels
            recorded = {"operation": op.operation, "metadata": result["metadata"]}
        try:
            self.record.finish(op.key, "done" if state == "done" else "failed", final=final, result=recorded)
        except Exception:
            log.exception("could not record the end of %s %s (key %r)", op.command, op.operation, op.key)
        with self._lock:
            op.state, op.ended, op.error, op.progress = state, final["ended"], final["error"], final["progress"]
            if result is not None and op.command != "grab_frame":
                self._results[op.operation] = result
            self._current = None
        self._publish("operation", final)
        log.info("%s %s %s%s", op.command, op.operation, state, f": {error}" if error else "")

    def _publish_operation(self, op: Operation) -> None:
        with self._lock:
            body = op.as_json()
        self._publish("operation", body)

    # -- chores, replies, events --------------------------------------------------------------

    def _chores(self) -> None:
        current = self._current
        if current is not None:
            op, job, _ = current
            if not job.cancelled and time.time() - op.started > op.timeout_s:
                log.warning("%s %s passed its timeout of %g s: asking the instrument to stop", op.command, op.operation, op.timeout_s)
                job.cancel("timeout")
                with self._lock:
                    op.message = f"timed out after {op.timeout_s:g} s; stopping"
                self._publish_operation(op)
        silent_after = 5 * self.heartbeat_s
        now = time.monotonic()
        for peer, seen in list(self._peers.items()):
            if now - seen > silent_after:
                del self._peers[peer]
                log.info("client %s silent for %.1f s: treated as gone (a running operation continues)", peer.hex(), now - seen)

    def _reply(self, req: _Request, reply: dict[str, Any], buffers: list[Any] | None = None) -> None:
        """Send from the loop thread (the only one that touches the ROUTER)."""
        assert self._router is not None
        try:
            payload = wire.dumps(reply)
        except (TypeError, ValueError) as exc:
            log.error("reply to %r could not be encoded: %s", req.id, exc)
            payload = wire.dumps(wire.failure(req.id, BridgeError("internal", f"reply could not be encoded ({exc})").as_json()))
            buffers = None
        frames: list[Any] = [req.peer] + ([b""] if req.delimited else []) + [payload] + list(buffers or [])
        try:
            self._router.send_multipart(frames, copy=not buffers)  # pixels go out without a copy
        except zmq.ZMQError as exc:
            log.warning("reply to %r not sent: %s", req.id, exc)

    def _post(self, req: _Request, reply: dict[str, Any], buffers: list[Any] | None = None) -> None:
        """Hand a reply to the loop from another thread."""
        self._outbox.put((req, reply, list(buffers or [])))
        with self._wake_lock:
            if self._wake_push is not None:
                try:
                    self._wake_push.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def _send_posted(self) -> None:
        while True:
            try:
                req, reply, buffers = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._reply(req, reply, buffers)

    def _publish(self, topic: str, body: dict[str, Any]) -> None:
        if self._events is not None:
            self._events.publish(topic, wire.jsonable(body))


class _Worker:
    """One thread running submitted calls in order: the backend's short calls, one at a time."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def close(self, wait_s: float) -> None:
        self._queue.put(None)
        self._thread.join(wait_s)

    def _run(self) -> None:
        while (fn := self._queue.get()) is not None:
            try:
                fn()
            except Exception:  # run() turns failures into replies; this is a last guard for the thread
                log.exception("backend worker")


def _no_args(args: Any) -> None:
    if args:
        name = sorted(args)[0]
        raise BridgeError("invalid_arguments", f"args.{name[:64]}: this command takes no arguments", details={"field": f"args.{name[:64]}"})


def _text_arg(args: Any, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise BridgeError("invalid_arguments", f"args.{name}: a string is required", details={"field": f"args.{name}"})
    extra = sorted(set(args) - {name})
    if extra:
        raise BridgeError("invalid_arguments", f"args.{extra[0][:64]}: unknown argument", details={"field": f"args.{extra[0][:64]}"})
    return value


def _interrupted(entry: RecordEntry) -> BridgeError:
    return BridgeError("interrupted", f"the server stopped while {entry.command} (key {entry.key!r}) ran; its outcome is unknown: "
                       "read the instrument's state before deciding to send it again (with a new key)",
                       details={"key": entry.key, "started": entry.started})


def _recorded_operation(entry: RecordEntry) -> dict[str, Any]:
    """The OPERATION of a long request known only from the record (an earlier server life)."""
    if entry.final is not None:
        return entry.final
    return {"operation": entry.operation, "command": entry.command, "key": entry.key, "state": "interrupted",
            "progress": 0.0, "message": "the server stopped while this operation ran", "started": entry.started,
            "ended": entry.ended, "expected_s": None, "timeout_s": None, "error": _interrupted(entry).as_json()}


def _frame_parts(value: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Check what a backend returned for a frame before anyone is told it is done."""
    if not isinstance(value, Frame):
        raise TypeError(f"grab_frame returned {type(value).__name__}, not a Frame")
    image = np.asarray(value.image)
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"grab_frame returned a {image.ndim}-D {image.dtype} image; a frame is 2-D uint8 or uint16")
    return np.ascontiguousarray(image), wire.jsonable(dict(value.metadata))
