"""The simulated FIB-SEM and its vendor look-alikes (SmartSEM, AutoScript): milling, persistence,
images of the truth, instrument time, faults as each vendor reports them, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tifffile

from clemflow.bridge.backend import FAULT_NAMES as BRIDGE_FAULT_NAMES
from clemflow.fibsem.estimate import RESIN_SPUTTER_YIELD_UM3_PER_NC
from clemflow.simulators.fibsem import FAULT_NAMES, SimulatedFibSem, SmartSEMApi, read_mill_log
from clemflow.simulators.fibsem import autoscript as AS
from clemflow.simulators.fibsem import milling as milling_mod
from clemflow.simulators.fibsem.state import S0_UM
from clemflow.simulators.fibsem.timing import RESIN_SPUTTER_YIELD_UM3_PER_NC as SIM_YIELD
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.em import DriftModel, EMImperfections, FaceGeometry, render_em_slice

SLICE = 15e-9


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=5), seed=0)


@pytest.fixture
def inst(tmp_path, world):
    i = SimulatedFibSem(tmp_path / "sim", world=world, time_scale=0)
    x, y = i.cell_stage_xy_m(0)
    i.move_stage(x_m=x, y_m=y)
    return i


def slab(face_um: float, thickness_m: float = SLICE, width_m: float = 20e-6, depth_m: float = 8e-6) -> dict:
    """A pattern from the face to face + thickness (ion frame, stage at the site origin)."""
    return {"kind": "rectangle", "center_m": [0.0, face_um * 1e-6 + thickness_m / 2], "width_m": width_m,
            "height_m": thickness_m, "depth_m": depth_m}


def until(fn, timeout=10.0):
    t0 = time.monotonic()
    while not fn():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


@pytest.fixture
def api(inst):
    a = SmartSEMApi(inst)
    assert a.InitialiseRemoting() == 0
    return a


@pytest.fixture
def scope(inst):
    m = AS.SdbMicroscopeClient(inst)
    m.connect("localhost")
    return m


def smartsem_mill(api, tmp_path, patterns) -> tuple[int, int]:
    path = tmp_path / "patterns.json"
    path.write_text(json.dumps(patterns))
    assert api.Set("DP_SMARTFIB_ELY_PATH", str(path)) == 0
    assert api.Execute("CMD_SMARTFIB_LOAD_ELY") == 0
    start = api.Execute("CMD_FIB_START_MILLING")
    if start:
        return start, start
    return start, poll(api, "DP_FIB_MODE", "Milling")[0]


def poll(api, name: str, busy: str) -> tuple[int, str]:
    """Get ``name`` until it no longer reads ``busy``; the answer that ended the wait."""
    t0 = time.monotonic()
    while True:
        code, value = api.Get(name)
        if value != busy:
            return code, value
        assert time.monotonic() - t0 < 10
        time.sleep(0.002)


# -- shared constants --------------------------------------------------------------------------


def test_fault_names_and_yield_match_the_orchestrator():
    assert FAULT_NAMES == BRIDGE_FAULT_NAMES
    assert SIM_YIELD == RESIN_SPUTTER_YIELD_UM3_PER_NC


def test_world_is_generated_lazily(tmp_path):
    i = SimulatedFibSem.small(tmp_path, time_scale=0)
    assert i._world is None and i.world_build_s is None
    assert len(i.world.cells) == 5 and i.world_build_s is not None


# -- milling and the log -----------------------------------------------------------------------


def test_mill_advances_face_and_logs_once_with_fsync(inst, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(milling_mod.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))

    def log_syncs() -> int:
        return synced.count((inst.state_dir / "mill_log.jsonl").stat().st_ino)

    r = inst.mill([slab(S0_UM)], current_a=700e-12)
    assert r["face_before_um"] == pytest.approx(S0_UM)
    assert r["removed_um"] == pytest.approx(0.015) and r["completed"] and r["roles"] == ["cut"]
    assert inst.site()["face_s_um"] == pytest.approx(S0_UM + 0.015)
    assert log_syncs() == 1
    log = read_mill_log(inst.state_dir)
    assert len(log) == 1 and log[0]["index"] == 1 and log[0]["status"] == "completed"
    assert log[0]["current_a"] == 700e-12 and log[0]["voltage_v"] == 30_000.0
    # a trench behind the face removes nothing from it; a pit beyond the face leaves it alone
    behind = {"kind": "rectangle", "center_m": [0, -20e-6], "width_m": 20e-6, "height_m": 10e-6, "depth_m": 5e-6}
    beyond = {"kind": "rectangle", "center_m": [0, 10e-6], "width_m": 2e-6, "height_m": 2e-6, "depth_m": 1e-6}
    r2 = inst.mill([behind, beyond], current_a=3e-9)
    assert r2["removed_um"] == 0.0 and r2["roles"] == ["behind_face", "beyond_face"]
    assert r2["duration_s"] == pytest.approx((20 * 10 * 5 + 2 * 2 * 1) / (RESIN_SPUTTER_YIELD_UM3_PER_NC * 3))
    # two contiguous slabs in one mill chain
    face = inst.site()["face_s_um"]
    r3 = inst.mill([slab(face + 0.015), slab(face)], current_a=700e-12)
    assert r3["removed_um"] == pytest.approx(0.030)
    assert [e["index"] for e in read_mill_log(inst.state_dir)] == [1, 2, 3]
    assert log_syncs() == 3


def test_state_persists_across_restarts(inst, world):
    inst.set_beam("electron", working_distance_m=5.2e-3, stigmation=(0.1, -0.2), detector="InLens")
    inst.set_beam("ion", current_a=3e-9)
    inst.mill([slab(S0_UM, 0.5e-6)], current_a=3e-9)
    before = inst.state()
    again = SimulatedFibSem(inst.state_dir, world=world, time_scale=0)
    after = again.state()
    for key in ("beams", "stage", "site", "mill_count"):
        assert after[key] == before[key]
    assert after["site"]["face_s_um"] == pytest.approx(S0_UM + 0.5)
    assert not list(inst.state_dir.glob("*.tmp"))
    json.loads((inst.state_dir / "instrument.json").read_text())


def test_log_wins_over_a_state_file_saved_before_the_crash(inst, world):
    saved = (inst.state_dir / "instrument.json").read_text()
    inst.mill([slab(S0_UM, 0.1e-6)], current_a=700e-12)
    (inst.state_dir / "instrument.json").write_text(saved)  # as if the process died between log and state
    again = SimulatedFibSem(inst.state_dir, world=world, time_scale=0)
    assert again.state()["mill_count"] == 1
    assert again.site()["face_s_um"] == pytest.approx(S0_UM + 0.1)


# -- images ------------------------------------------------------------------------------------


def test_electron_frames_show_the_truth_at_the_face(inst, world):
    a, ma = inst.grab("electron", 256, 192, 1e-6, 2)
    inst.mill([slab(S0_UM, 1e-6)], current_a=3e-9)
    b, mb = inst.grab("electron", 256, 192, 1e-6, 2)
    assert mb["face_s_um"] - ma["face_s_um"] == pytest.approx(1.0)
    assert np.mean(np.abs(a.astype(float) - b.astype(float))) > 5
    for img, meta in ((a, ma), (b, mb)):
        args = dict(meta["truth"]["render"])
        imp = EMImperfections(**args.pop("imperfections"))
        face = FaceGeometry(tuple(args.pop("face_origin_um")), 0.0)
        args["center_um"] = tuple(args["center_um"])
        args["shape"] = tuple(args["shape"])
        drift = DriftModel.from_config(inst.seed, imp)
        truth, _ = render_em_slice(world, imperfections=imp, face=face, drift_model=drift, **args)
        # the face is rendered below the rows that see the block surface only; rows past the band are the face
        row0, band = meta["truth"]["surface"]["face_row0"], meta["truth"]["surface"]["rows"]
        below = band[1] if band else row0
        assert truth.shape == (img.shape[0] - row0, img.shape[1])
        assert np.array_equal(img[below:], truth[below - row0:])
        assert args["depth_um"] == pytest.approx(meta["face_s_um"])
        assert args["slice_index"] == meta["slice_index"]
    assert mb["slice_index"] == ma["slice_index"] + 1
    assert ma["pixel_size_m"][0] == pytest.approx(inst.beam_report("electron")["horizontal_field_width_m"] / 256)


def test_defocus_blurs_and_autofocus_restores(inst):
    sharp, _ = inst.grab("electron", 256, 192, 2e-6, 4)
    inst.set_beam("electron", working_distance_m=5.0e-3 + 20e-6)
    blurred, meta = inst.grab("electron", 256, 192, 2e-6, 4)
    assert meta["truth"]["blur"]["sigma_major_nm"] > 20
    assert np.std(np.diff(blurred.astype(float), axis=1)) < 0.8 * np.std(np.diff(sharp.astype(float), axis=1))
    r = inst.autofunction("autofocus")
    assert abs(r["after"]["working_distance_m"] - 5.0e-3) < 2e-6


def test_ion_image_shows_the_milled_trench(inst):
    inst.set_beam("ion", horizontal_field_width_m=60e-6)
    before, _ = inst.grab("ion", 256, 256, 1e-6)
    inst.mill([{"kind": "rectangle", "center_m": [0, -15e-6], "width_m": 20e-6, "height_m": 15e-6, "depth_m": 5e-6}],
              current_a=15e-9)
    after, meta = inst.grab("ion", 256, 256, 1e-6)
    # trench: x in +-10 µm, y in -22.5..-7.5 µm -> rows below the centre (+y is up the image)
    rows = slice(128 + int(9 / 60 * 256), 128 + int(21 / 60 * 256))
    cols = slice(128 - int(8 / 60 * 256), 128 + int(8 / 60 * 256))
    assert after[rows, cols].mean() < before[rows, cols].mean() - 30
    assert meta["truth"]["milled"]


# -- time --------------------------------------------------------------------------------------


def test_reported_durations_are_instrument_time(tmp_path, world):
    i = SimulatedFibSem(tmp_path, world=world, time_scale=1000.0)
    x, y = i.cell_stage_xy_m(0)
    r = i.move_stage(x_m=x, y_m=y)
    t0 = time.monotonic()
    _, meta = i.grab("electron", 1024, 768, 1e-6, 5)
    wall = time.monotonic() - t0
    assert meta["duration_s"] == pytest.approx(1024 * 768 * 1e-6 * 5)
    assert wall >= meta["duration_s"] / 1000 * 0.9
    assert meta["dwell_s"] == 1e-6
    _, meta = i.grab("electron", 64, 64, 1.01e-6, 1)
    assert meta["dwell_s"] == pytest.approx(1.0e-6) and meta["dwell_requested_s"] == 1.01e-6
    rep = i.mill([slab(S0_UM)], current_a=700e-12)
    assert rep["duration_s"] == pytest.approx(20 * 0.015 * 8 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * 0.7))
    assert r["x_m"] == pytest.approx(x)


def test_smartsem_commands_run_in_the_background(api, inst, tmp_path):
    inst.time_scale = 100.0  # a 12.7 s slice takes 0.13 s
    path = tmp_path / "p.json"
    path.write_text(json.dumps([slab(S0_UM)]))
    api.Set("DP_SMARTFIB_ELY_PATH", str(path))
    assert api.Execute("CMD_SMARTFIB_LOAD_ELY") == 0
    assert api.Get("AP_FIB_MILL_TIME")[1] == pytest.approx(12.7, rel=0.01)
    t0 = time.monotonic()
    assert api.Execute("CMD_FIB_START_MILLING") == 0
    assert time.monotonic() - t0 < 0.05
    assert api.Get("DP_FIB_MODE") == (0, "Milling")
    until(lambda: api.Get("AP_FIB_MILL_PROGRESS")[1] > 0.3)
    assert api.Execute("CMD_FIB_STOP_MILLING") == 0
    assert poll(api, "DP_FIB_MODE", "Milling") == (2031, "SEM")
    assert api.Get("DP_FIB_MODE") == (0, "SEM")  # a failure is answered once
    last = read_mill_log(inst.state_dir)[-1]
    assert last["status"] == "partial" and last["reason"] == "stopped" and 0 < last["removed_um"] < 0.015


def test_smartsem_frame_to_tiff(api, inst, tmp_path):
    assert api.Set("DP_IMAGE_STORE", "512 * 384") == 0
    assert api.Set("DP_SCANRATE", 5) == 0
    assert api.Set("AP_NR_COEFF", 3) == 0
    assert api.Execute("CMD_UNFREEZE_ALL") == 0
    until(lambda: api.Get("DP_FROZEN") == (0, "Frozen"))
    path = tmp_path / "frame.tif"
    assert api.Grab(0, 0, 512, 384, 0, str(path)) == 0
    img = tifffile.imread(path)
    with tifffile.TiffFile(path) as t:
        meta = json.loads(t.pages[0].description.split("\n", 1)[1])
    assert img.shape == (384, 512) and img.dtype == np.uint8
    assert meta["dwell_s"] == pytest.approx(1.6e-6) and meta["line_averaging"] == 3
    assert meta["duration_s"] == pytest.approx(512 * 384 * 1.6e-6 * 3)
    assert api.Get("AP_PIXEL_SIZE")[1] == pytest.approx(meta["pixel_size_m"][0])


# -- faults ------------------------------------------------------------------------------------


def test_beam_trip(api, scope, inst, tmp_path):
    inst.faults.set("beam_trip", True, beam="ion", at_fraction=0.4)
    assert smartsem_mill(api, tmp_path, [slab(S0_UM)]) == (0, 2028)
    last = read_mill_log(inst.state_dir)[-1]
    assert last["status"] == "partial" and last["reason"] == "beam_trip"
    assert last["removed_um"] == pytest.approx(0.4 * 0.015)
    assert inst.site()["face_s_um"] == pytest.approx(S0_UM + 0.006)
    assert api.Get("DP_FIB_GUN_STATE") == (0, "Off")
    assert api.Execute("CMD_FIB_START_MILLING") == 2027  # refused while tripped
    assert scope.beams.ion_beam.is_on is False
    inst.faults.set("beam_trip", False)
    assert smartsem_mill(api, tmp_path, [slab(inst.site()["face_s_um"])]) == (0, 0)
    inst.faults.set("beam_trip", True, beam="electron")
    scope.imaging.set_active_view(1)
    with pytest.raises(AS.ApplicationServerException) as e:
        scope.imaging.grab_frame(AS.GrabFrameSettings(resolution="64x64", dwell_time=1e-6))
    assert e.value.code == AS.ErrorCode.BEAM_TRIPPED
    assert api.Get("DP_RUNUPSTATE") == (0, "Beam Off")


def test_vacuum_interlock_refuses_without_touching_state(api, scope, inst, tmp_path):
    inst.faults.set("vacuum_interlock", True)
    saved = (inst.state_dir / "instrument.json").read_text()
    assert api.Get("DP_VAC_STATUS") == (0, "Pumping")
    assert api.Execute("CMD_UNFREEZE_ALL") == 1014
    assert smartsem_mill(api, tmp_path, [slab(S0_UM)]) == (1014, 1014)
    assert api.Execute("CMD_AUTO_FOCUS_FINE") == 1014
    with pytest.raises(AS.ApplicationServerException) as e:
        scope.imaging.grab_frame(AS.GrabFrameSettings(resolution="64x64", dwell_time=1e-6))
    assert e.value.code == AS.ErrorCode.VACUUM_NOT_READY
    assert scope.vacuum.chamber_state == "Pumping"
    assert (inst.state_dir / "instrument.json").read_text() == saved
    assert read_mill_log(inst.state_dir) == []
    inst.faults.set("vacuum_interlock", False)
    assert api.Execute("CMD_UNFREEZE_ALL") == 0


def test_frame_timeout(api, scope, inst, tmp_path):
    inst.faults.set("frame_timeout", True)
    assert api.Execute("CMD_UNFREEZE_ALL") == 0
    until(lambda: not api.job_running("grab"))
    assert api.Get("DP_FROZEN") == (1021, "Live")  # the failure, answered once
    assert api.Get("DP_FROZEN") == (0, "Frozen")
    assert api.Grab(0, 0, 64, 64, 0, str(tmp_path / "x.tif")) == 1021
    assert not (tmp_path / "x.tif").exists()
    inst.faults.set("frame_timeout", True, timeout_s=30.0)
    with pytest.raises(AS.ApplicationServerException) as e:
        scope.imaging.grab_frame(AS.GrabFrameSettings(resolution="64x64", dwell_time=1e-6))
    assert e.value.code == AS.ErrorCode.ACQUISITION_TIMEOUT
    assert scope.imaging.grab_frame(AS.GrabFrameSettings(resolution="64x64", dwell_time=1e-6)).width == 64


def test_autofocus_diverges_and_nothing_is_restored(api, scope, inst):
    inst.faults.set("autofocus_diverges", True)
    assert api.Execute("CMD_AUTO_FOCUS_FINE") == 0
    assert poll(api, "DP_AUTO_FUNCTION", "Busy") == (1008, "Idle")
    assert api.Get("DP_AUTO_FN_STATUS") == (0, "Failed")
    assert abs(api.Get("AP_WD")[1] - 5.0e-3) == pytest.approx(2e-4, rel=0.01)
    with pytest.raises(AS.ApplicationServerException) as e:
        scope.auto_functions.run_auto_stigma()
    assert e.value.code == AS.ErrorCode.AUTOFUNCTION_FAILED
    assert max(abs(v) for v in (scope.beams.electron_beam.stigmator.value.x,
                                scope.beams.electron_beam.stigmator.value.y)) > 0.2
    inst.faults.set("autofocus_diverges", False)
    scope.auto_functions.run_auto_focus()
    assert abs(scope.beams.electron_beam.working_distance.value - 5.0e-3) < 2e-6


def test_stage_error_stops_part_way(api, scope, inst):
    x0 = inst.stage_report()["x_m"]
    inst.faults.set("stage_error", True, at_fraction=0.5)
    assert api.Set("AP_STAGE_GOTO_X", x0 + 1e-3) == 0
    assert poll(api, "DP_STAGE_IS", "Busy") == (1025, "Idle")
    assert api.Get("DP_STAGE_IS") == (0, "Idle")
    assert api.Get("AP_STAGE_AT_X")[1] == pytest.approx(x0 + 0.5e-3)
    inst.faults.set("stage_error", True)
    with pytest.raises(AS.ApplicationServerException) as e:
        scope.specimen.stage.absolute_move(AS.StagePosition(x=x0))
    assert e.value.code == AS.ErrorCode.STAGE_ERROR
    assert scope.specimen.stage.current_position.x == pytest.approx(x0 + 0.25e-3)


def test_network_drop(api, scope, inst):
    inst.faults.set("network_drop", True, duration_s=0.3)
    assert api.Get("AP_WD") == (1032, None)
    assert api.Set("AP_WD", 5.1e-3) == 1032
    assert api.Execute("CMD_UNFREEZE_ALL") == 1032
    with pytest.raises(AS.ApplicationServerException) as e:
        _ = scope.beams.electron_beam.working_distance.value
    assert e.value.code == AS.ErrorCode.COMMUNICATION_LOST
    time.sleep(0.35)
    assert api.Get("AP_WD") == (0, 5.0e-3)
    assert scope.beams.electron_beam.working_distance.value == 5.0e-3


CRASH = textwrap.dedent(
    """
    import sys
    from clemflow.simulators.fibsem import SimulatedFibSem
    inst = SimulatedFibSem.small(sys.argv[1], time_scale=0)
    inst.faults.set("server_crash", True, when=sys.argv[2])
    inst.mill([{"kind": "rectangle", "center_m": [0, -6e-6 + 7.5e-9], "width_m": 20e-6, "height_m": 15e-9,
                "depth_m": 8e-6}], current_a=700e-12)
    print("survived")
    """
)


@pytest.mark.parametrize("when", ["after", "before"])
def test_server_crash_exits_70(tmp_path, when):
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), when], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 70, proc.stderr
    assert "survived" not in proc.stdout
    log = read_mill_log(tmp_path)
    again = SimulatedFibSem.small(tmp_path, time_scale=0)
    if when == "after":
        assert len(log) == 1 and log[0]["status"] == "completed"
        assert again.state()["mill_count"] == 1
        assert again.site()["face_s_um"] == pytest.approx(S0_UM + 0.015)
    else:
        assert log == [] and again.state()["mill_count"] == 0


# -- refusals ----------------------------------------------------------------------------------


def test_smartsem_refuses_out_of_range_and_logs_every_call(api, inst):
    before = inst.state()
    assert api.Set("AP_WD", 1.0) == 1003
    assert api.Set("AP_STAGE_GOTO_X", 1.0) == 1003
    assert api.Set("DP_FIB_MILL_PROBE", "30kV:123pA") == 1003
    assert api.Set("AP_IPROBE", 1.0) == 1003
    assert api.Set("DP_IMAGE_STORE", "99999 * 10") == 1003
    assert api.Set("AP_FIB_KV", 5000.0) == 1005
    assert api.Get("AP_NO_SUCH") == (1002, None)
    after = inst.state()
    assert after["beams"] == before["beams"] and after["stage"] == before["stage"]
    assert api.calls[1:] == [("Set", ("AP_WD", 1.0)), ("Set", ("AP_STAGE_GOTO_X", 1.0)),
                             ("Set", ("DP_FIB_MILL_PROBE", "30kV:123pA")), ("Set", ("AP_IPROBE", 1.0)),
                             ("Set", ("DP_IMAGE_STORE", "99999 * 10")), ("Set", ("AP_FIB_KV", 5000.0)),
                             ("Get", ("AP_NO_SUCH",))]
    fresh = SmartSEMApi(inst)
    assert fresh.Get("AP_WD") == (1000, None)


def test_autoscript_refuses_out_of_range(scope, inst):
    before = inst.state()
    for setting, value in ((scope.beams.electron_beam.working_distance, 1.0),
                           (scope.beams.ion_beam.beam_current, 123e-12),
                           (scope.beams.electron_beam.stigmator, AS.Point(2.0, 0.0)),
                           (scope.detector.type, "NoSuchDetector")):
        with pytest.raises(AS.ApplicationServerException) as e:
            setting.value = value
        assert e.value.code == AS.ErrorCode.INVALID_VALUE
    with pytest.raises(AS.ApplicationServerException) as e:
        scope.specimen.stage.absolute_move(AS.StagePosition(x=1.0))
    assert e.value.code == AS.ErrorCode.INVALID_VALUE
    after = inst.state()
    assert after["beams"] == before["beams"] and after["stage"] == before["stage"]
    assert ("beams.ion_beam.beam_current.value=", (123e-12,)) in scope.calls
    scope.beams.ion_beam.beam_current.value = 700e-12
    assert scope.beams.ion_beam.beam_current.value == 700e-12


def test_autoscript_patterning_and_frames(scope, inst):
    ion = scope.beams.ion_beam
    ion.beam_current.value = 700e-12
    scope.patterning.set_default_beam_type(AS.BeamType.ION)
    p = scope.patterning.create_cleaning_cross_section(0.0, S0_UM * 1e-6 + 0.25e-6, 20e-6, 0.5e-6, 8e-6)
    p.scan_direction = "BottomToTop"
    assert p.time == pytest.approx(20 * 0.5 * 8 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * 0.7))
    scope.patterning.run()
    assert inst.site()["face_s_um"] == pytest.approx(S0_UM + 0.5)
    log = read_mill_log(inst.state_dir)[-1]
    assert log["patterns"][0]["scan_direction"] == "bottom_to_top" and log["current_a"] == 700e-12
    inst.time_scale = 1000.0  # 423 s of milling in 0.42 s
    scope.patterning.clear_patterns()
    scope.patterning.create_rectangle(0.0, (S0_UM + 0.5) * 1e-6 + 0.25e-6, 20e-6, 0.5e-6, 8e-6)
    scope.patterning.start()
    assert scope.patterning.state == "Running"
    scope.patterning.stop()
    until(lambda: scope.patterning.state != "Running")  # a stopped run is no failure: Idle, nothing raised
    assert read_mill_log(inst.state_dir)[-1]["status"] == "partial"
    assert scope.patterning.last_error.code == AS.ErrorCode.ABORTED
    inst.faults.set("beam_trip", True, beam="ion")
    scope.patterning.start()
    with pytest.raises(AS.ApplicationServerException) as e:
        until(lambda: scope.patterning.state != "Running")
    assert e.value.code == AS.ErrorCode.BEAM_TRIPPED
    assert scope.patterning.state == "Idle"
    inst.faults.set("beam_trip", False)
    inst.time_scale = 0
    scope.imaging.set_active_view(2)
    img = scope.imaging.grab_frame(AS.GrabFrameSettings(resolution="128x96", dwell_time=0.1e-6, bit_depth=16))
    assert img.data.shape == (96, 128) and img.data.dtype == np.uint16 and img.bit_depth == 16
    assert img.metadata.optics.beam_type == "Ion"
    assert img.metadata.binary_result.pixel_size.x == pytest.approx(ion.horizontal_field_width.value / 128)
    assert scope.detector.type.value in scope.detector.type.available_values
