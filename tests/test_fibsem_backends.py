"""The FIB-SEM backends against the vendor look-alikes (and OpenFIBSEM's Demo microscope when installed).

Every check goes through ``open_backend``, the same door the bridge server
uses, and reads the simulator's own records (its mill log, its state) to see
what really happened on the instrument.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clemflow.bridge.backend import (
    Backend,
    BeamChanges,
    FrameRequest,
    InstrumentFault,
    MillPattern,
    MillRequest,
    StageMove,
    Unsupported,
)
from clemflow.cli.bridge_backends import BackendOptions, UnknownBackend, open_backend

SIM_BACKENDS = ("sim-smartsem", "sim-autoscript")


class Job:
    """A long operation's handle as the server gives it: records progress, can be cancelled."""

    def __init__(self, cancel_after_s: float | None = None) -> None:
        self.fractions: list[float] = []
        self._cancelled = threading.Event()
        if cancel_after_s is not None:
            timer = threading.Timer(cancel_after_s, self._cancelled.set)
            timer.daemon = True
            timer.start()

    def progress(self, fraction: float, message: str = "") -> None:
        self.fractions.append(fraction)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def _open(name: str, state: Path, time_scale: float = 0.0) -> Backend:
    return open_backend(name, BackendOptions(sim_state=state, sim_time_scale=time_scale, sim_world="small"))


def _mill_log(state: Path) -> list[dict]:
    from clemflow.simulators.fibsem import read_mill_log

    return read_mill_log(state)


def _cut(face_um: float, thickness_um: float, depth_m: float = 2e-6) -> MillPattern:
    """A rectangle whose near edge is the face: it advances the face by ``thickness_um``."""
    centre_y = (face_um + thickness_um / 2) * 1e-6
    return MillPattern("rectangle", (0.0, centre_y), 10e-6, thickness_um * 1e-6, depth_m)


@pytest.fixture(params=SIM_BACKENDS)
def sim(request, tmp_path):
    backend = _open(request.param, tmp_path / "instrument")
    try:
        yield request.param, backend, tmp_path / "instrument"
    finally:
        backend.close()


def test_unknown_backend_is_refused_by_name(tmp_path):
    with pytest.raises(UnknownBackend, match="sim-smartsem"):
        open_backend("zeiss-magic", BackendOptions(sim_state=tmp_path))


@pytest.mark.parametrize("name, package", [("smartsem", "pywin32"), ("autoscript", "autoscript_sdb_microscope_client")])
def test_a_real_backend_without_its_vendor_package_says_what_it_needs(name, package, tmp_path):
    if importlib.util.find_spec("win32com" if name == "smartsem" else package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ImportError, match=package):
        open_backend(name, BackendOptions(sim_state=tmp_path, vendor_host="192.0.2.1"))


def test_com_calls_all_run_on_the_thread_that_built_the_object():
    from clemflow.drivers.fibsem._onethread import OneThread

    class Control:
        def __init__(self) -> None:
            self.home = threading.get_ident()

        def Get(self, name: str) -> tuple[int, bool]:  # noqa: N802
            return 0, threading.get_ident() == self.home

    api = OneThread(Control)
    try:
        answers = []
        workers = [threading.Thread(target=lambda: answers.append(api.Get("AP_WD"))) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert answers == [(0, True)] * 4 and api.Get("AP_WD") == (0, True)
    finally:
        api.close()


def test_openfibsem_without_the_package_says_what_to_install(tmp_path):
    if importlib.util.find_spec("fibsem") is not None:
        pytest.skip("fibsem is installed here")
    with pytest.raises(ImportError, match="pip install fibsem"):
        open_backend("openfibsem", BackendOptions(sim_state=tmp_path))



def _instrument_file(state: Path) -> dict:
    """The simulated instrument's own saved state: what it really did, not what the driver says."""
    import json

    return json.loads((state / "instrument.json").read_text())


def test_describe_gives_limits_the_instrument_is_inside(sim):
    name, backend, _ = sim
    d = backend.describe()
    limits = d.limits
    assert d.supports_faults and d.backend == name.removeprefix("sim-")
    state = backend.state()
    for axis, where in state["stage"].items():
        assert where in limits.stage[axis], axis
    for beam in ("electron", "ion"):
        bl, now = limits.beam(beam), state["beams"][beam]
        for key in ("voltage_v", "current_a", "working_distance_m", "horizontal_field_width_m"):
            rng = getattr(bl, key)
            assert rng.low < rng.high or key == "voltage_v", (beam, key)
            assert now[key] in rng, (beam, key, now[key], rng)
        assert set(now["detectors"]) == set(bl.detectors) and now["detector"] in bl.detectors
    assert limits.ion.current_a.low <= 50e-12 and limits.ion.current_a.high >= 15e-9
    assert limits.dwell_s.low <= 100e-9 and limits.dwell_s.high >= 100e-6
    assert state["vacuum"]["ready"] and state["interlocks"] == []


def test_set_beam_reports_what_the_instrument_holds(sim):
    _, backend, state_dir = sim
    reported = backend.set_beam("electron", BeamChanges(working_distance_m=5.2e-3, horizontal_field_width_m=20e-6,
                                                        stigmation=(0.01, -0.02), beam_shift_m=(1e-6, -2e-6),
                                                        scan_rotation_deg=5.0))
    held = _instrument_file(state_dir)["electron"]
    assert reported["working_distance_m"] == pytest.approx(5.2e-3) and held["working_distance_m"] == pytest.approx(5.2e-3)
    assert reported["horizontal_field_width_m"] == pytest.approx(20e-6) and held["hfw_m"] == pytest.approx(20e-6)
    assert reported["stigmation"] == pytest.approx([0.01, -0.02]) and held["stigmation"] == pytest.approx([0.01, -0.02])
    assert reported["beam_shift_m"] == pytest.approx([1e-6, -2e-6])
    assert reported["scan_rotation_deg"] == pytest.approx(5.0)
    ion = backend.set_beam("ion", BeamChanges(current_a=700e-12))
    assert ion["current_a"] == pytest.approx(700e-12)
    assert _instrument_file(state_dir)["ion"]["current_a"] == pytest.approx(700e-12)
    with pytest.raises(InstrumentFault) as refused:  # not a current the column offers
        backend.set_beam("ion", BeamChanges(current_a=123e-12))
    assert refused.value.name == "out_of_range" and refused.value.details["field"] == "current_a"
    assert _instrument_file(state_dir)["ion"]["current_a"] == pytest.approx(700e-12)


def test_frame_has_the_requested_size_and_the_instrument_s_dwell_and_pixel_size(sim):
    _, backend, _ = sim
    job = Job()
    frame = backend.grab_frame(FrameRequest("electron", 256, 192, 1e-6, line_averaging=2,
                                            horizontal_field_width_m=20e-6, bit_depth=16), job)
    md = frame.metadata
    assert frame.image.shape == (192, 256) and frame.image.dtype == np.uint16
    assert frame.image.std() > 0
    assert md["pixel_size_m"][0] == pytest.approx(20e-6 / 256)
    assert md["line_averaging"] == 2
    assert 1e-6 / 1.5 <= md["dwell_s"] <= 1e-6 * 1.5  # the instrument's own dwell near the request
    assert md["frame_time_s"] == pytest.approx(256 * 192 * md["dwell_s"] * 2)
    assert md["working_distance_m"] > 0 and md["voltage_v"] > 0 and md["stage"]["z_m"] > 0
    assert job.fractions and job.fractions[-1] <= 1.0
    ion = backend.grab_frame(FrameRequest("ion", 128, 96, 2e-7, bit_depth=8), Job())
    assert ion.image.shape == (96, 128) and ion.image.dtype == np.uint8
    assert ion.metadata["pixel_size_m"][0] == pytest.approx(backend.state()["beams"]["ion"]["horizontal_field_width_m"] / 128)


def test_mill_advances_the_face_and_is_logged_once(sim):
    _, backend, state_dir = sim
    done = backend.mill(MillRequest((_cut(-6.0, 1.0),), current_a=700e-12), Job())
    assert done["patterns"] == 1 and done["current_a"] == pytest.approx(700e-12)
    log = _mill_log(state_dir)
    assert len(log) == 1 and log[0]["completed"]
    assert log[0]["face_before_um"] == pytest.approx(-6.0) and log[0]["face_after_um"] == pytest.approx(-5.0)
    backend.mill(MillRequest((_cut(-5.0, 0.25),), current_a=1.5e-9), Job())
    log = _mill_log(state_dir)
    assert len(log) == 2 and log[1]["face_after_um"] == pytest.approx(-4.75)
    assert log[1]["current_a"] == pytest.approx(1.5e-9)


@pytest.mark.parametrize("name", SIM_BACKENDS)
def test_cancel_stops_a_long_mill_part_way(name, tmp_path):
    state_dir = tmp_path / "instrument"
    backend = _open(name, state_dir, time_scale=1.0)  # this cut takes about 100 s of instrument time
    try:
        job = Job(cancel_after_s=0.3)
        with pytest.raises(InstrumentFault) as cancelled:
            backend.mill(MillRequest((_cut(-6.0, 1.0),), current_a=700e-12), job)
        assert cancelled.value.name == "cancelled" and cancelled.value.retry_safe is False
        log = _mill_log(state_dir)
        assert len(log) == 1 and not log[0]["completed"]
        assert 0.0 < log[0]["removed_um"] < 0.5
        assert job.fractions and max(job.fractions) < 0.5
        assert backend.state()["beams"]["ion"]["on"]  # a stop is not a fault: the next mill may run
    finally:
        backend.close()



def _grab(backend: Backend) -> object:
    return backend.grab_frame(FrameRequest("electron", 64, 48, 1e-7), Job())


def _mill(backend: Backend) -> object:
    return backend.mill(MillRequest((_cut(-6.0, 1.0),), current_a=700e-12), Job())


def _state(backend: Backend) -> object:
    return backend.state()


def _move(backend: Backend) -> object:
    return backend.move_stage(StageMove(x_m=2e-3, y_m=1e-3), Job())


# (fault, its options, what is tried, the wire error expected, its retry safety)
FAULT_CASES = [
    ("beam_trip", {"beam": "electron"}, _grab, "beam_trip", True),
    ("beam_trip", {"beam": "ion"}, _mill, "beam_trip", False),
    ("vacuum_interlock", {}, _grab, "vacuum_interlock", True),
    ("vacuum_interlock", {}, _mill, "vacuum_interlock", False),
    ("frame_timeout", {}, _grab, "frame_timeout", True),
    ("stage_error", {}, _move, "stage_error", False),
    ("network_drop", {"duration_s": None}, _state, "link_lost", True),
    ("network_drop", {"duration_s": None}, _grab, "link_lost", True),
    ("network_drop", {"duration_s": None}, _mill, "link_lost", False),
    ("network_drop", {"duration_s": None}, _move, "link_lost", False),
]


@pytest.mark.parametrize("fault, options, action, expected, retry_safe", FAULT_CASES,
                         ids=[f"{c[0]}-{c[2].__name__.strip('_')}" for c in FAULT_CASES])
def test_each_fault_comes_back_as_its_wire_error(sim, fault, options, action, expected, retry_safe):
    _, backend, state_dir = sim
    backend.set_fault(fault, True, options)
    try:
        with pytest.raises(InstrumentFault) as failed:
            action(backend)
    finally:
        backend.set_fault(fault, False, {})
    assert failed.value.name == expected, failed.value.message
    assert failed.value.retry_safe is retry_safe
    assert failed.value.message
    log = _mill_log(state_dir)
    if action is _mill and fault == "beam_trip":  # the beam tripped part-way: the log says how far it got
        assert len(log) == 1 and not log[0]["completed"] and 0 < log[0]["removed_um"] < 1.0
    elif action is _mill:
        assert log == []  # refused before anything was milled
    if action is _move and fault == "stage_error":
        stage = backend.state()["stage"]
        assert 0 < stage["x_m"] < 2e-3  # stopped part-way, and the state says where
    # the fault is off again: the same request now works
    action(backend)


def test_autofocus_that_diverges_puts_the_focus_back(sim):
    _, backend, state_dir = sim
    before = backend.set_beam("electron", BeamChanges(working_distance_m=5.05e-3, stigmation=(0.02, -0.01)))
    backend.set_fault("autofocus_diverges", True, {})
    for kind in ("autofocus", "autostigmation"):
        with pytest.raises(InstrumentFault) as diverged:
            backend.autofunction(kind, "electron", Job())
        assert diverged.value.name == "autofunction_diverged" and diverged.value.retry_safe is True
        held = _instrument_file(state_dir)["electron"]
        assert held["working_distance_m"] == pytest.approx(before["working_distance_m"])
        assert held["stigmation"] == pytest.approx(before["stigmation"])
    backend.set_fault("autofocus_diverges", False, {})
    focused = backend.autofunction("autofocus", "electron", Job())
    assert focused["before_m"] == pytest.approx(5.05e-3)
    assert focused["working_distance_m"] == pytest.approx(backend.state()["beams"]["electron"]["working_distance_m"])
    assert focused["working_distance_m"] != pytest.approx(5.05e-3, abs=1e-7)


def test_a_fault_name_the_simulator_does_not_know_is_refused(sim):
    _, backend, _ = sim
    with pytest.raises(InstrumentFault) as refused:
        backend.set_fault("gremlins", True, {})
    assert refused.value.name == "invalid_arguments"



@pytest.mark.parametrize("name", SIM_BACKENDS)
def test_state_during_a_mill_never_reaims_the_instrument(name, tmp_path):
    """Detectors are reported per view/mode; reading the other beam's must not switch it under a running mill."""
    backend = _open(name, tmp_path / "instrument", time_scale=1.0)
    lookalike = backend._api if name == "sim-smartsem" else backend._m  # its call log: what reached the instrument
    switches = {("Set", "DP_FIB_MODE"), ("imaging.set_active_view", None)}
    try:
        backend.describe()
        job = Job()
        failure: list[BaseException] = []

        def mill() -> None:
            try:
                backend.mill(MillRequest((_cut(-6.0, 1.0),), current_a=700e-12), job)
            except BaseException as exc:  # the cancel below ends it
                failure.append(exc)

        worker = threading.Thread(target=mill)
        worker.start()
        while not job.fractions and worker.is_alive():
            time.sleep(0.01)
        seen = len(lookalike.calls)
        states = [backend.state() for _ in range(3)]
        during = lookalike.calls[seen:]
        job._cancelled.set()
        worker.join(10)
        assert not worker.is_alive() and failure and failure[0].name == "cancelled"
        assert not [c for c in during if (c[0], c[1][0] if c[0] == "Set" else None) in switches]
        for st in states:
            assert st["beams"]["electron"]["detector"] in st["beams"]["electron"]["detectors"]
            assert st["beams"]["ion"]["detector"] in st["beams"]["ion"]["detectors"]
    finally:
        backend.close()


# -- OpenFIBSEM (its own Demo microscope) ---------------------------------------------

needs_fibsem = pytest.mark.skipif(
    importlib.util.find_spec("fibsem") is None,
    reason="the openfibsem backend needs the optional fibsem package (pip install fibsem==0.5.3)",
)


@pytest.fixture
def demo(tmp_path, monkeypatch):
    monkeypatch.setenv("FIBSEM_SIM_NO_DELAY", "1")
    backend = open_backend("openfibsem", BackendOptions(sim_state=tmp_path, openfibsem_manufacturer="Demo"))
    try:
        yield backend
    finally:
        backend.close()


@needs_fibsem
def test_openfibsem_limits_are_the_stage_travel_not_whatever_the_demo_accepts(demo):
    d = demo.describe()
    assert d.backend == "openfibsem" and not d.supports_faults
    x = d.limits.stage["x_m"]
    assert x.low < 0 < x.high <= 0.1  # the demo itself would move to x = 1 m
    assert 1.0 not in x
    assert d.limits.ion.current_a.low < 1e-9 < d.limits.ion.current_a.high
    assert d.limits.electron.detectors


@needs_fibsem
def test_openfibsem_settings_are_read_back_in_wire_units(demo):
    ion = demo.set_beam("ion", BeamChanges(current_a=2e-10, scan_rotation_deg=10.0, working_distance_m=16e-3))
    assert ion["current_a"] == pytest.approx(2e-10)
    assert ion["scan_rotation_deg"] == pytest.approx(10.0)  # OpenFIBSEM holds radians
    assert demo.state()["beams"]["ion"]["working_distance_m"] == pytest.approx(16e-3)
    with pytest.raises(InstrumentFault) as refused:
        demo.set_beam("ion", BeamChanges(current_a=3e-10))
    assert refused.value.name == "out_of_range" and refused.value.details["field"] == "current_a"
    moved = demo.move_stage(StageMove(x_m=1e-3, t_deg=20.0), Job())
    assert moved["x_m"] == pytest.approx(1e-3) and moved["t_deg"] == pytest.approx(20.0)


@needs_fibsem
def test_openfibsem_frame_has_the_requested_size_and_reported_pixel_size(demo):
    frame = demo.grab_frame(FrameRequest("electron", 128, 96, 1e-7, line_averaging=2, detector="TLD",
                                         horizontal_field_width_m=20e-6, bit_depth=16), Job())
    assert frame.metadata["detector"] == "TLD" == demo.state()["beams"]["electron"]["detector"]
    assert frame.image.shape == (96, 128) and frame.image.dtype == np.uint16
    assert frame.metadata["pixel_size_m"][0] == pytest.approx(20e-6 / 128)
    assert frame.metadata["dwell_s"] == pytest.approx(1e-7) and frame.metadata["line_averaging"] == 2
    assert frame.image.std() > 0


@needs_fibsem
def test_openfibsem_mill_runs_and_restores_the_imaging_current(demo):
    before = demo.state()["beams"]["ion"]["current_a"]
    done = demo.mill(MillRequest((_cut(-6.0, 1.0), _cut(-5.0, 0.5)), current_a=2e-9), Job())
    assert done["patterns"] == 2 and done["current_a"] == pytest.approx(2e-9)
    assert demo.state()["beams"]["ion"]["current_a"] == pytest.approx(before)
    with pytest.raises(Unsupported):
        demo.autofunction("autostigmation", "electron", Job())
    focus = demo.autofunction("autofocus", "electron", Job())
    assert focus["before_m"] != focus["working_distance_m"]


@needs_fibsem
def test_openfibsem_cancel_stops_the_demo_mill(demo, monkeypatch):
    monkeypatch.setenv("FIBSEM_SIM_NO_DELAY", "0")  # the demo mills 5 s per pattern
    start = time.monotonic()
    with pytest.raises(InstrumentFault) as cancelled:
        demo.mill(MillRequest((_cut(-6.0, 1.0),), current_a=2e-9), Job(cancel_after_s=0.2))
    assert cancelled.value.name == "cancelled" and cancelled.value.retry_safe is False
    assert time.monotonic() - start < 4.0
