"""The bridge server on sim-smartsem: idempotency across restarts and crashes, busy, limits, frames, record file."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from clemflow.bridge import wire
from clemflow.bridge.operations import Timeouts
from clemflow.bridge.record import Record
from clemflow.bridge.server import BridgeServer
from clemflow.cli.bridge_backends import BackendOptions, open_backend
from clemflow.simulators.fibsem import read_mill_log

# One 15 nm slice off the face of a new site (the face starts 6 µm before the site origin, +y of the ion image).
SLICE = {"kind": "rectangle", "center_m": [0.0, -5.9925e-6], "width_m": 2e-5, "height_m": 1.5e-8, "depth_m": 5e-6}
MILL = {"patterns": [SLICE], "current_a": 7e-10}
# A trench-sized pattern in fresh resin: 20 x 1 x 5 µm at 0.7 nA is about 530 s of instrument time.
SLOW_MILL = {"patterns": [{**SLICE, "center_m": [0.0, 2e-5], "height_m": 1e-6}], "current_a": 7e-10}


class Client:
    """A bare DEALER that matches replies by id (replies may come out of order)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self._ids = itertools.count()

    def call(self, command: str, args: dict | None = None, key: str | None = None, timeout_s: float = 20.0) -> dict[str, Any]:
        rid = f"t{next(self._ids)}"
        self.sock.send(wire.encode_request(rid, command, args or {}, key))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000)), f"no reply to {command}"
            reply, buffers = wire.split_reply(self.sock.recv_multipart())
            if reply["id"] == rid:
                reply["buffers"] = buffers
                return reply

    def wait(self, op: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (status := self.call("operation", {"operation": op})["result"])["state"] == "running":
            assert time.monotonic() < deadline, f"{op} still running"
            time.sleep(0.01)
        return status


@pytest.fixture
def ctx():
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def _serve(tmp_path: Path, time_scale: float = 0, **kwargs: Any):
    backend = open_backend("sim-smartsem", BackendOptions(sim_state=tmp_path / "instrument", sim_time_scale=time_scale, sim_world="small"))
    server = BridgeServer(backend, bind="tcp://127.0.0.1:0", record_dir=tmp_path / "record", heartbeat_s=0.2,
                          backend_name="sim-smartsem", **kwargs)
    return backend, server.start()


@pytest.fixture
def served(tmp_path: Path):
    backend, server = _serve(tmp_path)
    try:
        yield server, backend
    finally:
        server.close()
        backend.close()


class ServerProcess:
    """``python -m clemflow bridge serve`` as a child process, for restarts and crashes."""

    def __init__(self, tmp_path: Path) -> None:
        self.record, self.state = tmp_path / "record", tmp_path / "instrument"
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "clemflow", "bridge", "serve", "--backend", "sim-smartsem", "--bind", "tcp://127.0.0.1:0",
               "--record", str(self.record), "--sim-state", str(self.state), "--sim-time-scale", "0", "--sim-world", "small",
               "--heartbeat", "0.2"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(60)
        assert lines and lines[0], f"server printed nothing: {self.proc.stderr.read() if self.proc.poll() is not None else ''}"  # type: ignore[union-attr]
        listening = json.loads(lines[0])
        assert listening["event"] == "listening" and listening["backend"] == "sim-smartsem"
        return listening

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        finally:
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc.stderr.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def server_process(tmp_path: Path):
    servers: list[ServerProcess] = []

    def make() -> ServerProcess:
        servers.append(ServerProcess(tmp_path))
        return servers[-1]

    try:
        yield make
    finally:
        for server in servers:
            server.kill()


def test_mill_replayed_before_and_after_restart_runs_once(server_process, ctx: zmq.Context, tmp_path: Path) -> None:
    first = server_process()
    listening = first.start()
    client = Client(ctx, listening["commands"])
    started = client.call("mill", MILL, key="run1/slice-000001/mill")
    assert started["ok"] and started["result"]["state"] == "running" and "replayed" not in started
    op = started["result"]["operation"]
    assert client.wait(op)["state"] == "done"
    reported = client.call("result", {"operation": op})["result"]
    again = client.call("mill", MILL, key="run1/slice-000001/mill")
    assert again["replayed"] is True and again["result"]["operation"] == op and again["result"]["state"] == "done"
    assert len(read_mill_log(first.state)) == 1
    assert first.stop() == 0  # SIGTERM: a clean stop

    second = server_process()
    relisten = second.start()
    assert relisten["server_id"] != listening["server_id"]
    client = Client(ctx, relisten["commands"])
    replay = client.call("mill", MILL, key="run1/slice-000001/mill")
    assert replay["ok"] and replay["replayed"] is True
    assert replay["result"]["operation"] == op and replay["result"]["state"] == "done"
    result = client.call("result", {"operation": op})
    assert result["ok"] and result["result"] == reported  # the instrument's report, from the record
    log = read_mill_log(second.state)
    assert len(log) == 1, "the replayed mill ran again"
    conflict = client.call("mill", {**MILL, "current_a": 3e-10}, key="run1/slice-000001/mill")
    assert conflict["error"]["code"] == 405 and conflict["error"]["name"] == "key_conflict" and not conflict["error"]["retry_safe"]
    unknown = client.call("record", {"key": "run1/slice-000002/mill"})
    assert unknown["result"]["state"] == "unknown" and unknown["result"]["reply"] is None
    known = client.call("record", {"key": "run1/slice-000001/mill"})
    assert known["result"]["state"] == "done" and known["result"]["operation"] == op
    assert len(read_mill_log(second.state)) == 1


def test_mill_cut_off_by_a_crash_is_interrupted_and_never_rerun(server_process, ctx: zmq.Context) -> None:
    first = server_process()
    client = Client(ctx, first.start()["commands"])
    crash = client.call("set_fault", {"fault": "server_crash", "on": True}, key="test/crash-on")
    assert crash["ok"], crash
    started = client.call("mill", MILL, key="run1/slice-000001/mill")
    assert started["ok"]
    op = started["result"]["operation"]
    assert first.wait() == 70  # the look-alike's crash: os._exit after the mill was logged
    assert len(read_mill_log(first.state)) == 1

    second = server_process()
    client = Client(ctx, second.start()["commands"])
    record = client.call("record", {"key": "run1/slice-000001/mill"})["result"]
    assert record["state"] == "interrupted" and record["operation"] == op
    replay = client.call("mill", MILL, key="run1/slice-000001/mill")
    assert replay["ok"] and replay["replayed"] is True
    status = replay["result"]
    assert status["operation"] == op and status["state"] == "interrupted"
    assert status["error"]["code"] == 450 and status["error"]["name"] == "interrupted" and status["error"]["retry_safe"] is False
    assert client.call("operation", {"operation": op})["result"]["state"] == "interrupted"
    result = client.call("result", {"operation": op})
    assert result["error"]["code"] == 450
    assert len(read_mill_log(second.state)) == 1, "the interrupted mill was run again"
    assert client.call("state")["result"]["busy"] is None


def test_one_long_operation_at_a_time(tmp_path: Path, ctx: zmq.Context) -> None:
    backend, server = _serve(tmp_path, time_scale=300)  # SLOW_MILL: about 1.8 s
    try:
        sub = ctx.socket(zmq.SUB)
        sub.subscribe(b"")
        sub.connect(server.events_endpoint)
        client = Client(ctx, server.commands_endpoint)
        assert client.call("hello")["result"]["events_port"] == int(server.events_endpoint.rsplit(":", 1)[1])
        slow = client.call("mill", SLOW_MILL, key="slow")["result"]
        assert slow["state"] == "running" and slow["expected_s"] > 100
        busy = client.call("mill", MILL, key="next")
        assert busy["error"]["code"] == 409 and busy["error"]["retry_safe"] is True
        assert busy["error"]["details"]["operation"] == slow["operation"]
        refused_beam = client.call("set_beam", {"beam": "ion", "current_a": 5e-11}, key="beam")
        assert refused_beam["error"]["name"] == "busy"
        assert client.call("state")["result"]["busy"] == slow["operation"]
        replay = client.call("mill", SLOW_MILL, key="slow")
        assert replay["replayed"] and replay["result"]["operation"] == slow["operation"]
        assert client.call("result", {"operation": slow["operation"]})["error"]["name"] == "not_done"
        time.sleep(0.3)
        cancel = client.call("cancel", {"operation": slow["operation"]}, key="slow/cancel")
        assert cancel["result"] == {"operation": slow["operation"], "state": "running", "cancel_requested": True}
        ended = client.wait(slow["operation"])
        assert ended["state"] == "cancelled" and ended["error"]["code"] == 430
        assert 0 < ended["progress"] < 1
        # the refusals were not recorded: the same keys now go through
        assert client.call("record", {"key": "next"})["result"]["state"] == "unknown"
        nxt = client.call("mill", MILL, key="next")["result"]
        assert client.wait(nxt["operation"])["state"] == "done"
        assert client.call("set_beam", {"beam": "ion", "current_a": 5e-11}, key="beam")["ok"]
        log = read_mill_log(tmp_path / "instrument")
        assert len(log) == 2

        events: list[tuple[str, dict]] = []
        while sub.poll(100) and len(events) < 10_000:  # what has arrived by now (heartbeats keep coming: stop at a gap)
            while sub.poll(0):
                events.append(wire.decode_event(sub.recv_multipart()))
            if events and events[-1][0] == "heartbeat" and any(t == "operation" and b["key"] == "next" and b["state"] == "done" for t, b in events):
                break
        beats = [body for topic, body in events if topic == "heartbeat"]
        assert len(beats) >= 2 and all(b["server_id"] == server.server_id for b in beats)
        assert [b["seq"] for b in beats] == sorted(b["seq"] for b in beats)
        assert any(b["busy"] == slow["operation"] for b in beats)
        slow_events = [body for topic, body in events if topic == "operation" and body["operation"] == slow["operation"]]
        assert slow_events[0]["state"] == "running" and slow_events[-1]["state"] == "cancelled"
        progress = [e["progress"] for e in slow_events if e["state"] == "running"]
        assert progress == sorted(progress) and len(progress) >= 3
        span = slow_events[-1]["ended"] - slow_events[0]["started"]
        assert len(slow_events) <= 10 * span + 3  # progress events throttled to 10 a second
        sub.close(0)
    finally:
        server.close()
        backend.close()


@pytest.mark.parametrize("command, args, field", [
    ("mill", {**MILL, "patterns": [{**SLICE, "depth_m": 2e-3}]}, "args.patterns[0].depth_m"),
    ("mill", {**MILL, "current_a": 1e-6}, "args.current_a"),
    ("mill", {**MILL, "patterns": [{**SLICE, "center_m": [1e-3, 0.0]}]}, "args.patterns[0].center_m[0]"),
    ("move_stage", {"x_m": 0.2}, "args.x_m"),
    ("move_stage", {"x_m": 0.0, "t_deg": 95.0}, "args.t_deg"),
    ("set_beam", {"beam": "ion", "current_a": 2e-7}, "args.current_a"),
    ("set_beam", {"beam": "ion", "current_a": 5e-10}, "args.current_a"),  # in range, but no such probe
    ("mill", {**MILL, "current_a": 6e-10}, "args.current_a"),  # ditto: refused before, so the key stays free
    ("set_beam", {"beam": "electron", "voltage_v": 5e4}, "args.voltage_v"),
    ("grab_frame", {"beam": "electron", "width_px": 10**6, "height_px": 768, "dwell_s": 1e-6}, "args.width_px"),
    ("grab_frame", {"beam": "electron", "width_px": 1024, "height_px": 768, "dwell_s": 1.0}, "args.dwell_s"),
    ("set_detector", {"beam": "electron", "detector": "ETD"}, "args.detector"),
])
def test_out_of_range_is_refused_before_the_instrument(served, command: str, args: dict, field: str, ctx: zmq.Context,
                                                       tmp_path: Path) -> None:
    server, backend = served
    api = backend._api  # the SmartSEM look-alike: every call it receives is in its log
    client = Client(ctx, server.commands_endpoint)
    calls_before = len(api.calls)
    reply = client.call(command, args, key=f"oor/{command}")
    assert reply["ok"] is False
    error = reply["error"]
    assert (error["code"], error["name"], error["retry_safe"]) == (410, "out_of_range", False)
    assert error["details"]["field"] == field
    assert len(api.calls) == calls_before, f"refused {command} reached the instrument: {api.calls[calls_before:]}"
    assert client.call("record", {"key": f"oor/{command}"})["result"]["state"] == "unknown"
    assert read_mill_log(tmp_path / "instrument") == []


@pytest.mark.parametrize("args, field", [
    ({"beam": "electron", "width_px": 64, "height_px": 48, "dwell_s": "1e-6"}, "args.dwell_s"),
    ({"beam": "electron", "width_px": 64.5, "height_px": 48, "dwell_s": 1e-6}, "args.width_px"),
    ({"beam": "electron", "width_px": True, "height_px": 48, "dwell_s": 1e-6}, "args.width_px"),
    ({"beam": "positron", "width_px": 64, "height_px": 48, "dwell_s": 1e-6}, "args.beam"),
    ({"beam": "electron", "height_px": 48, "dwell_s": 1e-6}, "args.width_px"),
    ({"beam": "electron", "width_px": 64, "height_px": 48, "dwell_s": 1e-6, "bit_depth": 12}, "args.bit_depth"),
    ({"beam": "electron", "width_px": 64, "height_px": 48, "dwell_s": 1e-6, "gain": 2}, "args.gain"),
])
def test_invalid_arguments_name_the_field(served, args: dict, field: str, ctx: zmq.Context) -> None:
    server, _ = served
    reply = Client(ctx, server.commands_endpoint).call("grab_frame", args, key="bad-args")
    assert reply["error"]["code"] == 403 and reply["error"]["details"]["field"] == field


def test_frames_multipart_and_kept_last_four(served, ctx: zmq.Context) -> None:
    server, _ = served
    client = Client(ctx, server.commands_endpoint)
    ops = []
    for i in range(5):
        width, height = 64 + 16 * i, 48
        start = client.call("grab_frame", {"beam": "electron", "width_px": width, "height_px": height, "dwell_s": 1e-6,
                                           "bit_depth": 16}, key=f"frame/{i}")["result"]
        assert client.wait(start["operation"])["state"] == "done"
        ops.append((start["operation"], width, height))
    gone = client.call("result", {"operation": ops[0][0]})
    assert gone["error"]["code"] == 460 and gone["error"]["retry_safe"] is True
    op, width, height = ops[-1]
    reply = client.call("result", {"operation": op})
    header = reply["result"]["image"]
    assert header == {"buffer": 1, "dtype": "uint16", "byte_order": "little", "shape": [height, width], "order": "C"}
    assert len(reply["buffers"]) == 1 and len(reply["buffers"][0]) == width * height * 2
    image = wire.decode_image(header, reply["buffers"])
    assert image.std() > 0 and reply["result"]["metadata"]
    # the REQ-style shape is answered in kind, pixels after the JSON
    client.sock.send_multipart([b"", wire.encode_request("req-style", "result", {"operation": op})])
    assert client.sock.poll(10_000)
    frames = client.sock.recv_multipart()
    assert frames[0] == b"" and len(frames) == 3 and json.loads(frames[1])["id"] == "req-style"
    assert np.array_equal(wire.decode_image(header, [frames[2]]), image)


def test_null_argument_replays_like_an_absent_one(served, ctx: zmq.Context, tmp_path: Path) -> None:
    server, _ = served
    client = Client(ctx, server.commands_endpoint)
    first = client.call("mill", {**MILL, "voltage_v": None}, key="null-1")
    assert first["ok"], first
    client.wait(first["result"]["operation"])
    again = client.call("mill", MILL, key="null-1")
    assert again["ok"] and again["replayed"] is True, again
    assert len(read_mill_log(tmp_path / "instrument")) == 1
    hello = client.call("hello")["result"]
    assert 7e-10 in hello["limits"]["ion"]["currents_a"]


def test_set_commands_replayed_and_conflicting(served, ctx: zmq.Context) -> None:
    server, backend = served
    client = Client(ctx, server.commands_endpoint)
    first = client.call("set_beam", {"beam": "electron", "working_distance_m": 4.5e-3}, key="wd-1")
    assert first["ok"] and abs(first["result"]["working_distance_m"] - 4.5e-3) < 1e-9
    set_calls = len([c for c in backend._api.calls if c[0] == "Set"])
    again = client.call("set_beam", {"working_distance_m": 4.5e-3, "beam": "electron"}, key="wd-1")  # same args, other order
    assert again["replayed"] is True and again["result"] == first["result"]
    assert len([c for c in backend._api.calls if c[0] == "Set"]) == set_calls
    conflict = client.call("set_beam", {"beam": "electron", "working_distance_m": 5e-3}, key="wd-1")
    assert conflict["error"]["name"] == "key_conflict"
    other = client.call("set_detector", {"beam": "electron", "detector": "InLens"}, key="wd-1")
    assert other["error"]["name"] == "key_conflict"
    missing = client.call("set_beam", {"beam": "electron"})
    assert missing["error"]["code"] == 400 and missing["error"]["details"]["field"] == "key"
    hello = client.call("hello")["result"]
    assert hello["protocol"] == 1 and hello["backend"] == "sim-smartsem" and hello["supports_faults"] is True
    assert hello["limits"]["stage"]["x_m"] == [-0.05, 0.05] and "mill" in hello["commands"]


def test_record_survives_torn_lines_and_marks_started_as_interrupted(tmp_path: Path) -> None:
    record = Record(tmp_path)
    record.begin("a", "set_beam", '{"beam":"ion"}')
    record.finish("a", "done", reply={"ok": True, "result": {"voltage_v": 3e4}})
    record.begin("b", "mill", "{}", operation="op-b")
    record.close()
    with (tmp_path / "record.jsonl").open("ab") as handle:  # a crash in the middle of writing the next line
        handle.write(b'{"kind":"started","key":"c","comm')

    reloaded = Record(tmp_path)
    assert reloaded.torn_lines == 1
    assert reloaded.get("a").state == "done" and reloaded.get("a").reply["result"] == {"voltage_v": 3e4}
    assert reloaded.get("b").state == "interrupted" and reloaded.by_operation("op-b").key == "b"
    assert reloaded.get("c") is None  # its started line never completed: it never reached the backend
    assert reloaded.interrupted_at_load == ["b"]
    reloaded.begin("d", "set_beam", "{}")
    reloaded.close()

    third = Record(tmp_path)  # the interrupted mark was written: it is not reported again as newly cut off
    assert third.interrupted_at_load == ["d"] and third.get("b").state == "interrupted"
    assert third.torn_lines == 1
    third.close()
    assert all(line.endswith(b"\n") for line in (tmp_path / "record.jsonl").read_bytes().splitlines(keepends=True))


def test_server_cli_prints_one_listening_line(server_process) -> None:
    server = server_process()
    listening = server.start()
    assert set(listening) >= {"event", "commands", "events", "server_id", "backend"}
    assert listening["commands"].startswith("tcp://127.0.0.1:") and listening["events"].startswith("tcp://127.0.0.1:")
    server.proc.send_signal(2)  # Ctrl-C
    assert server.wait() == 0
    assert server.proc.stdout.read() == ""  # nothing but the one line on stdout
    assert os.path.exists(server.record / "record.jsonl")


def test_operation_past_its_timeout_is_stopped_and_fails_with_timeout(tmp_path: Path, ctx: zmq.Context) -> None:
    backend, server = _serve(tmp_path, time_scale=300, timeouts=Timeouts(frame_mill_factor=0.0, frame_mill_extra_s=0.3))
    try:
        client = Client(ctx, server.commands_endpoint)
        assert client.call("hello")["result"]["timeouts_s"]["frame_mill_extra_s"] == 0.3
        start = client.call("mill", SLOW_MILL, key="mill/too-long")["result"]  # about 1.8 s; its timeout is 0.3 s
        assert start["timeout_s"] == pytest.approx(0.3)
        ended = client.wait(start["operation"], timeout_s=20)
        assert ended["state"] == "failed" and ended["ended"] - ended["started"] < 1.5
        error = ended["error"]
        assert (error["code"], error["name"], error["retry_safe"]) == (440, "timeout", False)  # a mill may have partly run
        assert error["details"]["timeout_s"] == pytest.approx(0.3) and error["details"]["stopped_with"]["name"] == "cancelled"
        assert server.busy is None and client.call("state")["result"]["busy"] is None
        assert client.call("record", {"key": "mill/too-long"})["result"]["state"] == "failed"
        log = read_mill_log(tmp_path / "instrument")
        assert len(log) == 1 and not log[0]["completed"]
    finally:
        server.close()
        backend.close()
