"""Every switchable instrument fault, switched on through the bridge, reaches the client as a clear error.

The look-alike simulators (`sim-smartsem`, `sim-autoscript`) fail the way the
vendor software would; the drivers map that to the wire's error table; the
client raises `BridgeError` with the documented code, name and retry-safety
(docs/bridge-protocol.md section 3), and after the fault is switched off the
same server answers and the action works. `server_crash` kills the server
process (exit 70) mid-mill: the client raises `BridgeUnavailable`, and a
restarted server reports the mill `interrupted` without running it again.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from clemflow.bridge.backend import FAULT_NAMES, FrameRequest, MillPattern
from clemflow.bridge.client import BridgeClient, BridgeError, BridgeUnavailable
from clemflow.bridge.errors import ERRORS
from clemflow.bridge.local import free_port_pair, serve_bridge
from clemflow.bridge.server import BridgeServer
from clemflow.cli.bridge_backends import BackendOptions, open_backend
from clemflow.simulators.fibsem import read_mill_log

BACKENDS = ["sim-smartsem", "sim-autoscript"]
FRAME = FrameRequest("electron", 256, 192, 1e-6, bit_depth=8)
PATTERN = MillPattern("rectangle", (0.0, 0.0), 10e-6, 1e-6, 2e-6)


class Bench:
    """An in-process server over one simulated backend, and a client to it."""

    def __init__(self, backend_name: str, root: Path) -> None:
        self.state_dir = root / "instrument"
        self.backend = open_backend(backend_name, BackendOptions(sim_state=self.state_dir, sim_time_scale=0.0, sim_world="small"))
        self.server = BridgeServer(self.backend, bind="tcp://127.0.0.1:0", events="tcp://127.0.0.1:0", record_dir=root / "record",
                                   backend_name=backend_name).start()
        self.client = BridgeClient(self.server.commands_endpoint, events=self.server.events_endpoint)
        self.keys = 0

    def key(self, what: str) -> str:
        self.keys += 1
        return f"faults/{self.keys:04d}/{what}"

    def current(self) -> float:
        return self.client.state()["beams"]["ion"]["current_a"]

    def mill(self, current: float) -> dict:
        return self.client.mill([PATTERN], current, key=self.key("mill"))

    def grab(self, beam: str = "electron"):
        return self.client.grab_frame(FrameRequest(beam, FRAME.width_px, FRAME.height_px, FRAME.dwell_s, bit_depth=8),
                                      key=self.key("frame"))

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.backend.close()


@pytest.fixture(scope="module", params=BACKENDS)
def bench(request, tmp_path_factory):
    bench = Bench(request.param, tmp_path_factory.mktemp(request.param))
    try:
        yield bench
    finally:
        bench.close()


def expect(error: BridgeError, name: str, retry_safe: bool) -> None:
    """The error is the table's row for ``name``, with the retry-safety the doc gives for this action."""
    assert (error.name, error.code) == (name, ERRORS[name].code), error
    assert error.retry_safe is retry_safe, error
    assert error.message, error


def fault(bench: Bench, name: str, on: bool, **options) -> None:
    reply = bench.client.set_fault(name, on, key=bench.key(f"fault-{name}-{'on' if on else 'off'}"), **options)
    assert reply["fault"] == name and reply["on"] is on


def answers_again(bench: Bench) -> None:
    """After the fault is off, the same server answers and the instrument works."""
    state = bench.client.state()
    assert state["busy"] is None and state["vacuum"]["ready"]
    frame = bench.grab()
    assert frame.image.shape == (FRAME.height_px, FRAME.width_px) and frame.image.std() > 0


def test_every_fault_name_is_covered():
    covered = {"beam_trip", "vacuum_interlock", "frame_timeout", "autofocus_diverges", "stage_error", "network_drop", "server_crash"}
    assert covered == set(FAULT_NAMES)


def test_beam_trip(bench):
    current = bench.current()
    fault(bench, "beam_trip", True, beam="electron")
    try:
        with pytest.raises(BridgeError) as caught:
            bench.grab()
        expect(caught.value, "beam_trip", retry_safe=True)  # imaging: safe to repeat
        assert caught.value.command == "grab_frame" and caught.value.operation
        assert not bench.client.state()["beams"]["electron"]["on"]
    finally:
        fault(bench, "beam_trip", False)
    answers_again(bench)

    milled = len(read_mill_log(bench.state_dir))
    fault(bench, "beam_trip", True, beam="ion")
    try:
        with pytest.raises(BridgeError) as caught:
            bench.mill(current)
        expect(caught.value, "beam_trip", retry_safe=False)  # the mill partly ran
        log = read_mill_log(bench.state_dir)
        assert len(log) == milled + 1 and not log[-1]["completed"]
    finally:
        fault(bench, "beam_trip", False)
    assert bench.mill(current)["patterns"] == 1
    answers_again(bench)


def test_vacuum_interlock(bench):
    current = bench.current()
    milled = len(read_mill_log(bench.state_dir))
    fault(bench, "vacuum_interlock", True)
    try:
        state = bench.client.state()
        assert not state["vacuum"]["ready"]
        with pytest.raises(BridgeError) as caught:
            bench.grab()
        expect(caught.value, "vacuum_interlock", retry_safe=True)
        with pytest.raises(BridgeError) as caught:
            bench.mill(current)
        assert caught.value.name == "vacuum_interlock"
        assert len(read_mill_log(bench.state_dir)) == milled, "nothing milled without vacuum"
    finally:
        fault(bench, "vacuum_interlock", False)
    answers_again(bench)


def test_frame_timeout(bench):
    fault(bench, "frame_timeout", True)
    try:
        with pytest.raises(BridgeError) as caught:
            bench.grab()
        expect(caught.value, "frame_timeout", retry_safe=True)
    finally:
        fault(bench, "frame_timeout", False)
    answers_again(bench)


def test_autofocus_diverges(bench):
    before = bench.client.state()["beams"]["electron"]
    fault(bench, "autofocus_diverges", True)
    try:
        with pytest.raises(BridgeError) as caught:
            bench.client.autofocus("electron", key=bench.key("autofocus"))
        expect(caught.value, "autofunction_diverged", retry_safe=True)
        after = bench.client.state()["beams"]["electron"]
        assert after["working_distance_m"] == pytest.approx(before["working_distance_m"], abs=1e-9)  # restored
        assert after["stigmation"] == pytest.approx(before["stigmation"], abs=1e-6)
    finally:
        fault(bench, "autofocus_diverges", False)
    assert "working_distance_m" in bench.client.autofocus("electron", key=bench.key("autofocus"))
    answers_again(bench)


def test_stage_error(bench):
    start = bench.client.state()["stage"]
    target = start["x_m"] + 200e-6
    fault(bench, "stage_error", True)
    try:
        with pytest.raises(BridgeError) as caught:
            bench.client.move_stage(x_m=target, key=bench.key("move"))
        expect(caught.value, "stage_error", retry_safe=False)
        stopped = bench.client.state()["stage"]["x_m"]
        assert start["x_m"] < stopped < target  # it stopped part-way: the engine must look before moving again
    finally:
        fault(bench, "stage_error", False)
    assert bench.client.move_stage(x_m=start["x_m"], key=bench.key("move"))["x_m"] == pytest.approx(start["x_m"], abs=1e-7)
    answers_again(bench)


def test_network_drop(bench):
    current = bench.current()
    milled = len(read_mill_log(bench.state_dir))
    fault(bench, "network_drop", True, duration_s=30.0)
    try:
        with pytest.raises(BridgeError) as caught:
            bench.client.state()
        expect(caught.value, "link_lost", retry_safe=True)  # a query
        with pytest.raises(BridgeError) as caught:
            bench.grab()
        expect(caught.value, "link_lost", retry_safe=True)  # imaging
        with pytest.raises(BridgeError) as caught:
            bench.mill(current)
        expect(caught.value, "link_lost", retry_safe=False)  # a mill: it may have started
        assert bench.client.ping() > 0  # the bridge itself is alive: only the vendor link is down
    finally:
        fault(bench, "network_drop", False)
    assert len(read_mill_log(bench.state_dir)) == milled
    answers_again(bench)


# ----------------------------------------------------------------------------- server_crash (a real process)




def _serve(backend: str, address: str, root: Path) -> subprocess.Popen:
    proc, _ = serve_bridge(["--backend", backend, "--bind", address, "--sim-time-scale", "0", "--sim-world", "small",
                            "--heartbeat", "0.5", "--record", str(root / "record"), "--sim-state", str(root / "instrument")],
                           root / "server.log")
    return proc


@pytest.mark.parametrize("backend", ["sim-smartsem"])  # the crash is the instrument's, shared by both look-alikes
def test_server_crash_mid_mill_is_reported_interrupted_after_restart(backend, tmp_path):
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    procs = [_serve(backend, address, tmp_path)]
    try:
        with BridgeClient(address) as client:
            current = client.state()["beams"]["ion"]["current_a"]
            client.set_fault("server_crash", True, key="crash/fault-on")
            key = "crash/slice-000001/mill"
            with pytest.raises(BridgeUnavailable) as caught:
                client.mill([PATTERN], current, key=key)
            assert address in str(caught.value)
            assert procs[0].wait(10) == 70
            assert len(read_mill_log(tmp_path / "instrument")) == 1  # it milled, then died

            procs.append(_serve(backend, address, tmp_path))
            deadline = time.monotonic() + 10
            while not client.interrupted and time.monotonic() < deadline:  # the client asks the record after a restart
                time.sleep(0.05)
            entry = client.record(key)
            assert entry.state == "interrupted" and entry.executed is None
            assert [e.key for e in client.interrupted] in ([key], [])  # [] only if the start reply never came back
            with pytest.raises(BridgeError) as again:
                client.mill([PATTERN], current, key=key)  # the same key: answered from the record, not milled
            expect(again.value, "interrupted", retry_safe=False)
            assert len(read_mill_log(tmp_path / "instrument")) == 1
            assert client.state()["busy"] is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
