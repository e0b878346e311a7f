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


def test_openfibsem_without_the_package_says_what_to_install(tmp_path):
    if importlib.util.find_spec("fibsem") is not None:
        pytest.skip("fibsem is installed here")
    with pytest.raises(ImportError, match="pip install fibsem"):
        open_backend("openfibsem", BackendOptions(sim_state=tmp_path))


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
    frame = demo.grab_frame(FrameRequest("electron", 128, 96, 1e-7, line_averaging=2, horizontal_field_width_m=20e-6, bit_depth=16), Job())
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
