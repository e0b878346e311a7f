"""The client's connection to a bridge server: one I/O thread owns every socket.

ZeroMQ sockets are not thread-safe, so callers never touch them: a request is
queued with its envelope already encoded, the I/O thread sends it on the
DEALER, matches the reply by id, and wakes the caller. The same thread reads
the SUB channel, watches heartbeats, pings the server, re-sends timed-out
requests on a fresh DEALER with their same bytes (so the same idempotency
key), and fails pending requests with ``BridgeUnavailable`` when the server
has been silent for 3 x heartbeat_s (docs/bridge-protocol.md section 8).
Event callbacks run on a separate dispatcher thread so they may call the
client themselves.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from . import wire
from .client_types import BridgeTimeout, BridgeUnavailable

__all__ = ["CurveKeys", "Link", "Pending", "events_address"]

log = logging.getLogger("clemflow.bridge.client")

EVENT_TOPICS = (b"heartbeat", b"operation", b"alarm", b"log")
DEFAULT_TIMEOUTS = {"query": 5.0, "set": 15.0, "long_start": 10.0}
_KEEP_OPERATIONS = 512  # latest OPERATION bodies remembered from events and polls


@dataclass(frozen=True)
class CurveKeys:
    """Z85 keys for CURVE: the server's public key and this client's pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


@dataclass(eq=False)
class Pending:
    """One request in flight; the caller waits on ``done``."""

    rid: str
    command: str
    key: str | None
    cls: str
    body: bytes
    first_sent: float
    deadline: float
    attempts: int = 1
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    buffers: list[memoryview] = field(default_factory=list)
    failure: BaseException | None = None


def events_address(commands: str, port: int | None = None) -> str:
    """The event channel beside a command address: same host, ``port`` or command port + 1."""
    head, _, tail = commands.rpartition(":")
    if not head or not tail.isdigit():
        raise ValueError(f"cannot derive the event address from {commands!r}; give events= explicitly")
    return f"{head}:{port if port is not None else int(tail) + 1}"


class Link:
    """Sockets, pending requests, heartbeats and reconnection for one server address."""

    def __init__(self, address: str, *, events: str | None = None, curve: CurveKeys | None = None,
                 heartbeat_s: float | None = None, timeouts: dict[str, float] | None = None, retries: int = 2,
                 name: str = "clemflow") -> None:
        self.address = address
        self.events = events or (events_address(address) if address.startswith("tcp://") else "")
        self._events_fixed = events is not None
        self.curve = curve
        self._heartbeat_fixed = heartbeat_s
        self.heartbeat_s = float(heartbeat_s or 1.0)
        self._timeouts_fixed = dict(timeouts or {})
        self.timeouts = {**DEFAULT_TIMEOUTS, **self._timeouts_fixed}
        self.retries = int(retries)
        self._prefix = f"{name}-{uuid.uuid4().hex[:6]}"
        self._ids = itertools.count(1)

        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified on operation updates and life changes
        self._pending: dict[str, Pending] = {}
        self._outbox: collections.deque[Pending] = collections.deque()
        self._unsent: collections.deque[Pending] = collections.deque()  # no connection took them yet (I/O thread only)
        self._want_hello = True  # the I/O thread asks hello at start and after a restart, until answered
        self._hello_sent = -float("inf")
        self.operations: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.hello: dict[str, Any] | None = None
        self.hello_ready = threading.Event()
        self.server_id: str | None = None
        self.epoch = 0  # restarts seen
        self.resent = 0  # requests sent again after a reply timeout
        self.reconnects = 0  # new DEALER/SUB pairs opened after the first
        self.last_heard = time.monotonic()
        self.alive = True
        self._closing = False
        self._stopped = False  # the I/O thread has ended: nothing more can be sent

        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.on_restart: Callable[[str, str], None] | None = None
        self._dispatch: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()

        self._ctx = zmq.Context()
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.setsockopt(zmq.LINGER, 0)
        wake_address = f"inproc://wake-{self._prefix}"
        self._wake_rx.bind(wake_address)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_address)
        self._wake_lock = threading.Lock()
        self._dealer: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None

        self._io = threading.Thread(target=self._run, name=f"bridge-io {address}", daemon=True)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name=f"bridge-events {address}", daemon=True)
        self._io.start()
        self._dispatcher.start()

    # ------------------------------------------------------------------ caller side

    def next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def submit(self, command: str, args: dict[str, Any], key: str | None, cls: str) -> Pending:
        """Queue a request for the I/O thread; the caller then waits on ``pending.done``."""
        rid = self.next_id()
        body = wire.encode_request(rid, command, args, key)  # refuses NaN/Infinity before anything is sent
        now = time.monotonic()
        pending = Pending(rid, command, key, cls, body, first_sent=now, deadline=now + self.timeouts.get(cls, DEFAULT_TIMEOUTS["query"]))
        with self._lock:
            if self._closing or self._stopped:
                reason = "the client is closed" if self._closing else "the client's I/O thread failed (see the log)"
                raise BridgeUnavailable(self.address, reason, command=command, key=key)
            self._pending[rid] = pending
            self._outbox.append(pending)
        self._wake()
        return pending

    def add_listener(self, callback: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def operation_state(self, op: str) -> dict[str, Any] | None:
        with self._lock:
            return self.operations.get(op)

    def note_operation(self, body: dict[str, Any]) -> None:
        """Remember an OPERATION (from a poll or a recovery) and wake waiters."""
        with self.changed:
            self._remember(body)
            self.changed.notify_all()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake()
        self._io.join(10)
        self._dispatch.put(None)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(10)
        with self._wake_lock:
            self._wake_tx.close(0)
        self._ctx.term()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._closing and self._wake_tx.closed:
                return
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake is already queued

    # ------------------------------------------------------------------ I/O thread

    def _open(self) -> None:
        """(Re)create DEALER and SUB: a fresh connection carries no state (section 8)."""
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(0)
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._sub = self._ctx.socket(zmq.SUB)
        for sock in (self._dealer, self._sub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            if self.curve is not None:
                self.curve.apply(sock)
        # Requests go only to an established connection: nothing waits in a queue to reach a server that
        # comes back after its caller was told "unavailable" (and perhaps did something else meanwhile).
        self._dealer.setsockopt(zmq.IMMEDIATE, 1)
        for topic in EVENT_TOPICS:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._dealer.connect(self.address)
        if self.events:  # for ipc the event endpoint is known from hello
            self._sub.connect(self.events)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_rx, zmq.POLLIN)
        self._poller.register(self._dealer, zmq.POLLIN)
        self._poller.register(self._sub, zmq.POLLIN)

    def _send(self, body: bytes) -> bool:
        """Send now if a connection is up; False if not (nothing is queued for later)."""
        try:
            self._dealer.send(body, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _send_pending(self, pending: Pending) -> None:
        if not pending.done.is_set() and not self._send(pending.body):
            self._unsent.append(pending)

    def _retry_unsent(self) -> None:
        for _ in range(len(self._unsent)):
            pending = self._unsent.popleft()
            self._send_pending(pending)
            if self._unsent and self._unsent[-1] is pending:
                return  # still no connection: try the rest on a later turn

    def _run(self) -> None:
        self._open()
        next_ping = time.monotonic() + self.heartbeat_s
        try:
            while not self._closing:
                events = dict(self._poller.poll(5 if self._unsent else 50))
                if self._wake_rx in events:
                    while True:
                        try:
                            self._wake_rx.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                self._retry_unsent()
                self._flush_outbox()
                if self._dealer in events:
                    self._read_replies()
                if self._sub in events:
                    self._read_events()
                now = time.monotonic()
                if self._want_hello and now - self._hello_sent > 0.5 and self._send_internal("hello"):
                    self._hello_sent = now
                if now >= next_ping:
                    self._send_internal("ping")
                    next_ping = now + self.heartbeat_s
                self._check_times(now)
        except Exception:  # a bug here must not leave callers hanging
            log.exception("bridge client I/O thread failed")
        finally:
            with self._lock:
                self._stopped = True
            reason = "the client is closed" if self._closing else "the client's I/O thread failed (see the log)"
            self._fail_all(lambda p: BridgeUnavailable(self.address, reason, command=p.command, key=p.key))
            for sock in (self._dealer, self._sub, self._wake_rx):
                if sock is not None:
                    sock.close(0)

    def _send_internal(self, command: str) -> bool:
        return self._send(wire.encode_request(f"{command}:{self.next_id()}", command))

    def _flush_outbox(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    return
                pending = self._outbox.popleft()
            self._send_pending(pending)

    def _read_replies(self) -> None:
        while True:
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._heard()
            if frames and len(frames[0]) == 0:
                frames = frames[1:]
            try:
                reply, buffers = wire.split_reply([frames[0].bytes, *(f.buffer for f in frames[1:])])
                rid = str(reply.get("id"))
            except (ValueError, UnicodeDecodeError, IndexError):
                log.warning("unreadable reply from %s dropped", self.address)
                continue
            if rid.startswith("hello:") and reply.get("ok"):
                self._take_hello(reply["result"])
                continue
            if rid.startswith("ping:"):
                continue
            with self._lock:
                pending = self._pending.pop(rid, None)
            if pending is None:
                log.debug("late or duplicate reply %s dropped", rid)
                continue
            pending.reply, pending.buffers = reply, buffers
            pending.done.set()

    def _read_events(self) -> None:
        while True:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                name, message = wire.decode_event(frames)
            except (ValueError, UnicodeDecodeError):
                log.warning("unreadable event dropped")
                continue
            if self.hello is None:
                continue  # until hello names the event endpoint, these may be another server's events
            self._heard()
            if name == "heartbeat":
                self._see_server(str(message.get("server_id")))
            elif name == "operation" and "operation" in message:
                with self.changed:
                    self._remember(message)
                    self.changed.notify_all()
            elif name == "alarm":
                log.warning("instrument alarm %s: %s", message.get("name"), message.get("message"))
            if self._listeners:
                self._dispatch.put((name, message))

    def _take_hello(self, hello: dict[str, Any]) -> None:
        self.hello, self._want_hello = hello, False
        if self._heartbeat_fixed is None and hello.get("heartbeat_s"):
            self.heartbeat_s = float(hello["heartbeat_s"])
        self.timeouts = {**DEFAULT_TIMEOUTS, **{k: float(v) for k, v in (hello.get("timeouts_s") or {}).items()}, **self._timeouts_fixed}
        if not self._events_fixed and (hello.get("events_port") or hello.get("events")):
            # tcp: same host as the commands, the port the server names; ipc and others: its endpoint as bound
            port = hello.get("events_port")
            wanted = events_address(self.address, int(port)) if port else str(hello["events"])
            if wanted != self.events:
                self.events = wanted
                self._reconnect()  # both sockets, on the advertised event port
        self._see_server(str(hello.get("server_id")))
        self.hello_ready.set()

    def _see_server(self, server_id: str) -> None:
        if self.server_id is None:
            self.server_id = server_id
            return
        if server_id == self.server_id:
            return
        old, self.server_id = self.server_id, server_id
        with self.changed:
            self.epoch += 1
            self.changed.notify_all()
        log.warning("bridge server at %s restarted (%s -> %s); re-sending %d pending request(s)", self.address, old, server_id, len(self._pending))
        self._resend_all()
        self._want_hello, self._hello_sent = True, -float("inf")
        self._dispatch.put(("_restart", {"old_server_id": old, "server_id": server_id}))

    def _heard(self) -> None:
        now = time.monotonic()
        if now - self.last_heard > 1.5 * self.heartbeat_s:
            self._want_hello = True  # after a silence, learn at once whether this is a new server
        self.last_heard = now
        if not self.alive:
            self.alive = True
            log.info("bridge server at %s answering again", self.address)
            with self.changed:
                self.changed.notify_all()

    def _remember(self, body: dict[str, Any]) -> None:
        op = str(body["operation"])
        self.operations[op] = body
        self.operations.move_to_end(op)
        while len(self.operations) > _KEEP_OPERATIONS:
            self.operations.popitem(last=False)

    def _check_times(self, now: float) -> None:
        silent_for = now - self.last_heard
        limit = 3.0 * self.heartbeat_s
        if silent_for > limit and self.alive:
            self.alive = False
            log.warning("no heartbeat from %s for %.1f s: server unavailable; reconnecting", self.address, silent_for)
            self._reconnect()
            with self.changed:
                self.changed.notify_all()
        expired, resend = [], False
        with self._lock:
            for pending in list(self._pending.values()):
                if now - max(self.last_heard, pending.first_sent) > limit:
                    expired.append((pending, BridgeUnavailable(
                        self.address, f"no heartbeat or reply for {now - max(self.last_heard, pending.first_sent):.1f} s "
                        f"(limit 3 x {self.heartbeat_s:g} s)", command=pending.command, key=pending.key)))
                elif now > pending.deadline:
                    if pending.attempts > self.retries:
                        expired.append((pending, BridgeTimeout(
                            self.address, f"no reply after {pending.attempts} sends, {self.timeouts.get(pending.cls, 0):g} s each",
                            command=pending.command, key=pending.key)))
                    else:
                        pending.attempts += 1
                        self.resent += 1
                        pending.deadline = now + self.timeouts.get(pending.cls, DEFAULT_TIMEOUTS["query"])
                        resend = True
                        log.warning("no reply to %s (key %s) within %.1f s; re-sending on a new connection (attempt %d)",
                                    pending.command, pending.key, self.timeouts.get(pending.cls, 0), pending.attempts)
            for pending, _ in expired:
                self._pending.pop(pending.rid, None)
        for pending, failure in expired:
            pending.failure = failure
            pending.done.set()
        if expired or resend:
            # Fresh sockets: whatever of a failed request is still queued is dropped with the old DEALER,
            # so the server cannot act on it later; the requests still pending are sent again.
            self._reconnect()

    def _reconnect(self) -> None:
        """New sockets; whatever was queued on the old ones is sent again with the same bytes."""
        self.reconnects += 1
        self._open()
        self._resend_all()
        self._hello_sent = -float("inf")

    def _resend_all(self) -> None:
        with self._lock:
            waiting = [p for p in self._pending.values() if not p.done.is_set()]
        self._unsent.clear()
        for pending in waiting:
            self._send_pending(pending)

    def _fail_all(self, make: Callable[[Pending], BaseException]) -> None:
        with self._lock:
            waiting, self._pending = list(self._pending.values()), {}
        for pending in waiting:
            pending.failure = make(pending)
            pending.done.set()

    # ------------------------------------------------------------------ dispatcher thread

    def _dispatch_loop(self) -> None:
        while True:
            item = self._dispatch.get()
            if item is None:
                return
            name, body = item
            if name == "_restart":
                if self.on_restart is not None:
                    try:
                        self.on_restart(body["old_server_id"], body["server_id"])
                    except Exception:
                        log.exception("restart handler failed")
                name = "restart"
            with self._lock:
                listeners = list(self._listeners)
            for callback in listeners:
                try:
                    callback(name, body)
                except Exception:
                    log.exception("bridge event callback failed on %s", name)
