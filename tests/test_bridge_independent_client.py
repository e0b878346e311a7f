"""An independent bridge client written from docs/bridge-protocol.md alone.

The client code in this file uses only pyzmq, json, numpy (to look at pixels)
and the standard library: no clemflow import. It proves the document is
enough to drive the server: connect, read `hello` and `state`, grab an
electron frame (multipart reply), run a mill and watch it finish on the
`operation` event topic and by polling.

The server runs as a subprocess (`python -m clemflow bridge serve ...`) on
each backend; the `openfibsem` backend needs a Python with the `fibsem`
package (this interpreter, or `$CLEMFLOW_FIBSEM_PYTHON`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq

from clemflow.bridge.local import free_port_pair, wait_listening  # starting the server, not talking to it

STARTUP_S = 90.0  # the openfibsem backend imports a large package
REPLY_S = 10.0


# ----------------------------------------------------------------------------- the client


class ProtocolError(AssertionError):
    """The server broke the protocol as the document describes it."""


class RawBridgeClient:
    """DEALER for commands, SUB for events; replies matched to requests by id (section 1)."""

    def __init__(self, commands: str, events: str) -> None:
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(commands)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")  # every topic
        self.sub.connect(events)
        self.events: list[tuple[str, dict]] = []
        self._early: dict[str, list[zmq.Frame]] = {}
        self._n = 0

    def close(self) -> None:
        self.dealer.close(0)
        self.sub.close(0)
        self.ctx.term()

    def send(self, command: str, args: dict | None = None, key: str | None = None, *, delimiter: bool = False) -> str:
        self._n += 1
        rid = f"ind-{self._n}"
        envelope: dict = {"v": 1, "id": rid, "command": command, "args": args or {}}
        if key is not None:
            envelope["key"] = key
        body = json.dumps(envelope).encode("utf-8")
        self.dealer.send_multipart([b"", body] if delimiter else [body])
        return rid

    def receive(self, rid: str, timeout_s: float = REPLY_S, *, delimiter: bool = False) -> tuple[dict, list[zmq.Frame]]:
        """The reply whose id is `rid`; other replies are kept for their own callers (out of order)."""
        deadline = time.monotonic() + timeout_s
        while rid not in self._early:
            left = deadline - time.monotonic()
            if left <= 0 or not self.dealer.poll(int(left * 1000) + 1):
                raise TimeoutError(f"no reply to request {rid} within {timeout_s} s")
            frames = self.dealer.recv_multipart(copy=False)
            if frames and frames[0].bytes == b"":
                frames = frames[1:]
            reply = json.loads(frames[0].bytes.decode("utf-8"))
            self._early[str(reply.get("id"))] = frames
        frames = self._early.pop(rid)
        reply = json.loads(frames[0].bytes.decode("utf-8"))
        if reply.get("v") != 1 or reply.get("id") != rid or not isinstance(reply.get("ok"), bool):
            raise ProtocolError(f"bad reply envelope: {reply}")
        return reply, frames[1:]

    def call(self, command: str, args: dict | None = None, key: str | None = None, *, delimiter: bool = False) -> tuple[dict, list[zmq.Frame]]:
        return self.receive(self.send(command, args, key, delimiter=delimiter), delimiter=delimiter)

    def ok(self, command: str, args: dict | None = None, key: str | None = None) -> tuple[dict, list[zmq.Frame]]:
        reply, buffers = self.call(command, args, key)
        if not reply["ok"]:
            raise ProtocolError(f"{command} failed: {reply['error']}")
        return reply["result"], buffers

    def pump_events(self, timeout_s: float) -> None:
        """Wait up to timeout_s for event messages `[topic, body]` (section 7), then read all queued."""
        if not self.sub.poll(int(timeout_s * 1000)):
            return
        while self.sub.poll(0):
            topic, body = self.sub.recv_multipart()
            self.events.append((topic.decode("ascii"), json.loads(body.decode("utf-8"))))

    def wait_heartbeat(self, timeout_s: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump_events(0.2)
            beats = [body for topic, body in self.events if topic == "heartbeat"]
            if beats:
                return beats[-1]
        raise TimeoutError("no heartbeat on the event channel")

    def run_operation(self, command: str, args: dict, key: str, timeout_s: float = 120.0) -> tuple[dict, dict, list[zmq.Frame]]:
        """Start a long operation, wait on events + polling about once a second, fetch its result."""
        started, _ = self.ok(command, args, key)
        op = started["operation"]
        if started["state"] != "running" and not started.get("replayed"):
            raise ProtocolError(f"a long operation answers state 'running' at once: {started}")
        deadline = time.monotonic() + timeout_s
        last_poll = 0.0
        while True:
            finished = [body for topic, body in self.events if topic == "operation" and body["operation"] == op and body["state"] != "running"]
            if finished:
                final = finished[-1]
                break
            if time.monotonic() - last_poll >= 1.0:
                last_poll = time.monotonic()
                polled, _ = self.ok("operation", {"operation": op})
                if polled["state"] != "running":
                    final = polled
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command} {op} still running after {timeout_s} s")
            self.pump_events(0.1)
        if final["state"] != "done":
            raise ProtocolError(f"{command} ended {final['state']}: {final.get('error')}")
        result, buffers = self.ok("result", {"operation": op})
        return final, result, buffers


# ----------------------------------------------------------------------------- the server


def _python_for(backend: str) -> str:
    if backend != "openfibsem":
        return sys.executable
    if importlib.util.find_spec("fibsem") is not None:
        return sys.executable
    other = os.environ.get("CLEMFLOW_FIBSEM_PYTHON")
    if other and Path(other).exists():
        return other
    pytest.skip("openfibsem backend: the `fibsem` package is not importable here and $CLEMFLOW_FIBSEM_PYTHON "
                "does not name a Python that has it (pip install fibsem==0.5.3, plus clemflow, in that Python)")


@pytest.fixture(params=["sim-smartsem", "sim-autoscript", "openfibsem"])
def server(request, tmp_path):
    """A bridge server subprocess; yields (commands, events, listening line)."""
    backend = request.param
    python = _python_for(backend)
    port = free_port_pair()
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ, FIBSEM_SIM_NO_DELAY="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [python, "-m", "clemflow", "bridge", "serve", "--backend", backend,
         "--bind", f"tcp://127.0.0.1:{port}", "--sim-time-scale", "0", "--sim-world", "small",
         "--record", str(tmp_path / "record"), "--sim-state", str(tmp_path / "instrument")],
        stdout=subprocess.PIPE, stderr=log, env=env, text=True,
    )
    try:
        listening = wait_listening(proc, STARTUP_S)
        if listening is None:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"server {backend} did not start (exit {proc.returncode}):\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        assert listening["event"] == "listening" and listening["backend"] == backend
        yield listening["commands"], listening["events"], listening
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


# ----------------------------------------------------------------------------- the test


def _within(value: float, bounds: list[float]) -> float:
    return float(min(max(value, bounds[0]), bounds[1]))


def test_independent_client_drives_a_backend(server):
    commands, events, listening = server
    client = RawBridgeClient(commands, events)
    try:
        hello, _ = client.ok("hello")
        assert hello["protocol"] == 1
        assert hello["server_id"] == listening["server_id"]
        assert hello["events_port"] == int(events.rsplit(":", 1)[1])
        for name in ("query", "set", "long_start"):
            assert hello["timeouts_s"][name] > 0
        limits = hello["limits"]
        for command in ("hello", "ping", "state", "operation", "result", "record", "grab_frame", "mill"):
            assert command in hello["commands"]
        beat = client.wait_heartbeat()
        assert beat["server_id"] == hello["server_id"] and beat["seq"] >= 0

        state, _ = client.ok("state")
        assert isinstance(state["vacuum"]["ready"], bool) and state["vacuum"]["chamber_pa"] >= 0
        assert set(state["stage"]) >= {"x_m", "y_m", "z_m", "r_deg", "t_deg"}
        for beam in ("electron", "ion"):
            assert state["beams"][beam]["detector"] in state["beams"][beam]["detectors"]
            assert state["beams"][beam]["voltage_v"] > 0
        assert state["busy"] is None

        # REQ-style framing: an empty delimiter first, answered in the same shape.
        reply, _ = client.call("ping", delimiter=True)
        assert reply["ok"] and reply["result"]["time"] > 0

        # An unknown command is an error reply, not silence.
        reply, _ = client.call("make_coffee")
        assert not reply["ok"] and reply["error"]["code"] == 402 and reply["error"]["name"] == "unknown_command"

        # An electron frame: 512 x 384 at 2 us, 16 bit; pixels as a raw buffer after the JSON.
        width = int(_within(512, limits["frame_width_px"]))
        height = int(_within(384, limits["frame_height_px"]))
        dwell = _within(2e-6, limits["dwell_s"])
        run = uuid.uuid4().hex[:8]
        final, result, buffers = client.run_operation(
            "grab_frame",
            {"beam": "electron", "width_px": width, "height_px": height, "dwell_s": dwell, "bit_depth": 16},
            key=f"independent-{run}/frame-1",
        )
        image = result["image"]
        assert image["dtype"] == "uint16" and image["byte_order"] == "little" and image["order"] == "C"
        assert image["shape"] == [height, width]
        pixels = buffers[image["buffer"] - 1]
        assert len(pixels.bytes) == height * width * 2
        array = np.frombuffer(pixels.bytes, dtype="<u2").reshape(image["shape"])
        assert array.std() > 0 and np.unique(array).size > 16, "a blank frame"
        assert result["metadata"]["beam"] == "electron"
        pixel_size = result["metadata"]["pixel_size_m"]
        assert len(pixel_size) == 2 and 0 < pixel_size[0] < 1e-5

        # A mill at the ion beam's present current (a value the instrument surely offers).
        ion_current = state["beams"]["ion"]["current_a"]
        pattern = {
            "kind": "rectangle", "center_m": [0.0, 0.0],
            "width_m": _within(10e-6, limits["pattern_size_m"]),
            "height_m": _within(1e-6, limits["pattern_size_m"]),
            "depth_m": _within(2e-6, limits["mill_depth_m"]),
        }
        key = f"independent-{run}/mill-1"
        final, result, _ = client.run_operation("mill", {"patterns": [pattern], "current_a": ion_current}, key=key)
        assert final["command"] == "mill" and final["key"] == key and final["progress"] == pytest.approx(1.0)
        assert final["ended"] is not None and final["ended"] >= final["started"]
        assert result["patterns"] == 1 and result["milled_s"] >= 0
        seen = [body["state"] for topic, body in client.events if topic == "operation" and body["operation"] == final["operation"]]
        assert "done" in seen or seen == [], seen  # events may be lost (section 1); the poll is authoritative

        # The record knows the key; the same key again is answered from it, not milled again.
        record, _ = client.ok("record", {"key": key})
        assert record["state"] == "done" and record["operation"] == final["operation"]
        again, _ = client.call("mill", {"patterns": [pattern], "current_a": ion_current}, key=key)
        assert again["ok"] and again.get("replayed") is True and again["result"]["operation"] == final["operation"]
        unknown, _ = client.ok("record", {"key": f"independent-{run}/never-sent"})
        assert unknown["state"] == "unknown"
    finally:
        client.close()
