"""The event channel: one thread owns the PUB socket, publishes what others queue, and beats.

ZeroMQ sockets belong to one thread; the command loop, the operation worker
and the backend all publish through ``EventPublisher.publish``, which only
queues. Heartbeats go out every ``heartbeat_s`` whether or not anything else
happens, so a client can tell a quiet server from a dead one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import wire

__all__ = ["EventPublisher"]

log = logging.getLogger(__name__)

_STOP = object()


class EventPublisher:
    """Publishes ``[topic, json]`` on a bound PUB socket from its own thread."""

    def __init__(self, socket: zmq.Socket, *, server_id: str, heartbeat_s: float, busy: Callable[[], str | None]) -> None:
        self._socket = socket
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self.server_id = server_id
        self.heartbeat_s = heartbeat_s
        self._busy = busy
        self._started = time.monotonic()
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="bridge-events", daemon=True)
        self.dropped = 0

    def start(self) -> None:
        self._thread.start()

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        """Queue an event; never blocks the caller (a full queue drops it: events may be lost by design)."""
        try:
            self._queue.put_nowait((topic, body))
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then stop the thread; the socket is closed by its owner's thread here."""
        if self._thread.is_alive():
            try:
                self._queue.put((_STOP, None), timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)

    def heartbeat(self) -> dict[str, Any]:
        return {"server_id": self.server_id, "seq": self._seq, "time": time.time(), "busy": self._busy(),
                "uptime_s": round(time.monotonic() - self._started, 3)}

    def _run(self) -> None:
        next_beat = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    self._send("heartbeat", self.heartbeat())
                    self._seq += 1
                    next_beat = max(next_beat + self.heartbeat_s, now)
                try:
                    topic, body = self._queue.get(timeout=max(0.0, next_beat - time.monotonic()))
                except queue.Empty:
                    continue
                if topic is _STOP:
                    return
                self._send(topic, body)
        finally:
            self._socket.close(linger=0)

    def _send(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self._socket.send_multipart(wire.encode_event(topic, body), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        except Exception:  # an event must never take the server down
            log.exception("could not publish %s event", topic)
