"""The clemflow bridge client against a real server process: restarts, a dead server, timeouts.

Each test runs `python -m clemflow bridge serve --backend sim-smartsem` as a
subprocess (it must be stoppable with SIGSTOP and restartable on the same
port with the same record and instrument state) and checks the simulator's own
mill log, so "executed once" is the instrument's word, not the client's.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from clemflow.bridge.backend import MillPattern
from clemflow.bridge.client import BridgeClient, BridgeError, BridgeUnavailable
from clemflow.bridge.local import free_port_pair, serve_bridge
from clemflow.simulators.fibsem import read_mill_log

PATTERN = MillPattern("rectangle", (0.0, 0.0), 10e-6, 1e-6, 2e-6)




class ServerProcess:
    """`clemflow bridge serve` on a fixed port, restartable with the same record and instrument state."""

    def __init__(self, root: Path, backend: str = "sim-smartsem", heartbeat_s: float = 1.0, time_scale: float = 0.0) -> None:
        self.root, self.backend, self.heartbeat_s, self.time_scale = root, backend, heartbeat_s, time_scale
        self.port = free_port_pair()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.state_dir = root / "instrument"
        self.proc: subprocess.Popen | None = None
        self.listening: dict = {}
        self.starts = 0

    def start(self) -> dict:
        self.starts += 1
        self.proc, self.listening = serve_bridge(
            ["--backend", self.backend, "--bind", self.address, "--sim-time-scale", str(self.time_scale), "--sim-world",
             "small", "--heartbeat", str(self.heartbeat_s), "--record", str(self.root / "record"), "--sim-state",
             str(self.state_dir)], self.root / f"server-{self.starts}.log")
        return self.listening

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def server(tmp_path, request):
    """A server process; `request.param` may set its heartbeat (default 1 s, as `clemflow bridge serve`)."""
    proc = ServerProcess(tmp_path, heartbeat_s=getattr(request, "param", 1.0))
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


def until(call, timeout_s: float = 30.0):
    """``call()`` once the server answers again (a restart takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except BridgeUnavailable:
            if time.monotonic() > deadline:
                raise


@pytest.mark.parametrize("server", [0.5], indirect=True)  # a quicker "unavailable" while it is down
def test_reconnects_after_restart_and_a_resent_key_is_milled_once(server):
    with BridgeClient(server.address) as client:
        first_id = client.hello().server_id
        current = client.state()["beams"]["ion"]["current_a"]
        done = client.mill([PATTERN], current, key="run-r/slice-000001/mill")
        assert done["patterns"] == 1
        assert len(read_mill_log(server.state_dir)) == 1

        assert server.stop() == 0
        with pytest.raises(BridgeUnavailable):  # nobody there: this mill must not run when a server comes back
            client.mill([PATTERN], current, key="run-r/slice-000002/mill-while-down")
        server.start()  # same port, same record, same instrument
        state = until(client.state)
        assert state["busy"] is None
        deadline = time.monotonic() + 5
        while client.restarts == 0 and time.monotonic() < deadline:  # told by the next heartbeat (or hello)
            time.sleep(0.05)
        assert client.server_id == server.listening["server_id"] != first_id
        assert client.restarts == 1

        # The engine, unsure whether its mill ran, sends it again with the same key: answered from the record.
        handle = client.start("mill", {"patterns": [asdict(PATTERN)], "current_a": current, "voltage_v": None},
                              key="run-r/slice-000001/mill")
        assert handle.replayed and handle.state == "done"
        assert client.wait(handle).state == "done"
        again = client.mill([PATTERN], current, key="run-r/slice-000001/mill")
        assert again["patterns"] == 1 and again.get("end_time") == done.get("end_time")
        assert len(read_mill_log(server.state_dir)) == 1, "a replayed key milled again"

        client.mill([PATTERN], current, key="run-r/slice-000002/mill")
        assert len(read_mill_log(server.state_dir)) == 2
        assert client.record("run-r/slice-000002/mill").state == "done"
        assert client.record("run-r/slice-000003/mill").state == "unknown"
        assert client.record("run-r/slice-000002/mill-while-down").state == "unknown"  # never delivered late


def test_a_stopped_server_is_noticed_by_heartbeat_within_seconds(server):
    with BridgeClient(server.address) as client:
        assert client.hello().heartbeat_s == 1.0
        client.state()
        server.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BridgeUnavailable) as caught:
                client.state()
            noticed = time.monotonic() - started
            assert 2.0 <= noticed <= 5.0, noticed  # three missed 1 s heartbeats, not the 5 s query timeout x retries
            assert server.address in str(caught.value) and caught.value.command == "state"
            assert not client.available
        finally:
            server.signal(signal.SIGCONT)
        assert until(client.state)["busy"] is None
        assert client.available and client.restarts == 0  # the same server came back


def test_a_timed_out_request_is_resent_with_its_key_and_executed_once(server):
    with BridgeClient(server.address, timeouts={"long_start": 0.3}, retries=10) as client:
        current = client.state()["beams"]["ion"]["current_a"]
        server.signal(signal.SIGSTOP)
        resume = threading.Timer(1.0, server.signal, (signal.SIGCONT,))  # shorter than 3 heartbeats: not "unavailable"
        resume.start()
        try:
            handle = client.start("mill", {"patterns": [asdict(PATTERN)], "current_a": current, "voltage_v": None},
                                  key="run-t/slice-000001/mill")
        finally:
            resume.join()
            server.signal(signal.SIGCONT)
        assert client.resends >= 2  # 0.3 s timeouts during a 1 s stop
        assert client.wait(handle).state == "done"
        assert len(read_mill_log(server.state_dir)) == 1
        entry = client.record("run-t/slice-000001/mill")
        assert entry.state == "done" and entry.operation == handle.operation


# ----------------------------------------------------------------------------- in-process server


@pytest.fixture
def inproc(tmp_path, request):
    """A server in this process over sim-smartsem; `request.param` may set `time_scale` (default 0) and `curve`."""
    from clemflow.bridge.security import create_keys
    from clemflow.bridge.server import BridgeServer
    from clemflow.cli.bridge_backends import BackendOptions, open_backend

    options = getattr(request, "param", {})
    keys = create_keys(tmp_path / "keys", "engine") if options.get("curve") else None
    backend = open_backend("sim-smartsem", BackendOptions(sim_state=tmp_path / "instrument", sim_world="small",
                                                          sim_time_scale=options.get("time_scale", 0.0)))
    server = BridgeServer(backend, bind="tcp://127.0.0.1:0", events="tcp://127.0.0.1:0", record_dir=tmp_path / "record",
                          keys=tmp_path / "keys" if keys else None).start()
    try:
        yield server, keys, tmp_path / "instrument"
    finally:
        server.close()
        backend.close()


@pytest.mark.parametrize("inproc", [{"curve": True}], indirect=True)
def test_curve_client_gets_replies_frames_and_events(inproc):
    server, keys, _ = inproc
    heartbeats: list[dict] = []
    with BridgeClient(server.commands_endpoint, events=server.events_endpoint, server_key=keys.server_public,
                      client_keys=keys.client_secret) as client:
        client.subscribe(lambda topic, body: heartbeats.append(body) if topic == "heartbeat" else None)
        assert client.hello().server_id == server.server_id
        frame = client.grab_frame(beam="electron", width_px=128, height_px=96, dwell_s=1e-6, bit_depth=16, key="curve/frame-1")
        assert frame.image.shape == (96, 128) and frame.image.dtype == "uint16" and frame.image.std() > 0
        deadline = time.monotonic() + 5
        while not heartbeats and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heartbeats and heartbeats[-1]["server_id"] == server.server_id  # the SUB talks CURVE too


@pytest.mark.parametrize("inproc", [{"time_scale": 100.0}], indirect=True)
def test_wait_reports_progress_and_a_cancelled_mill_ends_cancelled(inproc):
    server, _, state_dir = inproc
    with BridgeClient(server.commands_endpoint, events=server.events_endpoint) as client:
        current = client.state()["beams"]["ion"]["current_a"]
        handle = client.start("mill", {"patterns": [asdict(PATTERN)], "current_a": current, "voltage_v": None}, key="cancel/mill-1")
        assert handle.expected_s / 100.0 > 2.0, "the mill should run long enough to be cancelled"
        seen: list = []

        def progress(op) -> None:
            seen.append(op.progress)
            if op.progress > 0.002 and len(seen) < 100:
                client.cancel(handle, key="cancel/mill-1/cancel")

        with pytest.raises(BridgeError) as caught:
            client.wait(handle, progress=progress, poll_s=0.2)
        assert caught.value.name == "cancelled" and caught.value.code == 430 and caught.value.retry_safe is False
        assert caught.value.key == "cancel/mill-1" and caught.value.operation == handle.operation
        assert 0.002 < max(seen) < 0.9
        log = read_mill_log(state_dir)
        assert len(log) == 1 and not log[0]["completed"]
        assert client.operation(handle).state == "cancelled"
        assert client.state()["busy"] is None
