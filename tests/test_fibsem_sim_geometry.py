"""The simulated FIB-SEM's electron image is sample-fixed: a fiducial milled on the block surface stays put
while the face content rises cos(54) x the milled depth; drift and beam shift move both as logged in
frame_log.jsonl; the working distance recedes 0.8 x the milled depth; the bridge's --sim-drift-* options."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from skimage.feature import match_template
from skimage.registration import phase_cross_correlation
from typer.testing import CliRunner

from clemflow.simulators.fibsem import FACE_RISE_PER_S, SimulatedFibSem, read_frame_log
from clemflow.simulators.fibsem.state import S0_UM, V_CENTER_UM
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.em import EMImperfections, FaceGeometry, render_em_slice

SLICE_UM = 0.015


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=5), seed=0)


def instrument(path: Path, world, **kw) -> SimulatedFibSem:
    """At the first cell, no waiting; no drift unless asked for."""
    kw.setdefault("drift_step_nm", 0.0)
    kw.setdefault("drift_jump_probability", 0.0)
    inst = SimulatedFibSem(path, world=world, time_scale=0, **kw)
    x, y = inst.cell_stage_xy_m(0)
    inst.move_stage(x_m=x, y_m=y)
    return inst


def plus(s_um: float, x_um: float = 0.0, arm_um: float = 1.5, width_um: float = 0.3) -> list[dict]:
    """A "+" fiducial centred at ion-frame (x, s) (stage at the site origin): two rectangles."""
    c = [x_um * 1e-6, s_um * 1e-6]
    return [{"kind": "rectangle", "center_m": c, "width_m": arm_um * 1e-6, "height_m": width_um * 1e-6,
             "depth_m": 0.8e-6},
            {"kind": "rectangle", "center_m": c, "width_m": width_um * 1e-6, "height_m": arm_um * 1e-6,
             "depth_m": 0.8e-6}]


def mill_slice(inst: SimulatedFibSem, t_um: float = SLICE_UM) -> None:
    face = (inst.site() or {"face_s_um": S0_UM})["face_s_um"]  # no site yet: a new one starts at S0
    inst.mill([{"kind": "rectangle", "center_m": [0.0, (face + t_um / 2) * 1e-6], "width_m": 20e-6,
                "height_m": t_um * 1e-6, "depth_m": 5e-6}], current_a=700e-12)


def view(inst: SimulatedFibSem, width: int, height: int, pixel_um: float, shift_um=(0.0, 0.0)) -> None:
    inst.set_beam("electron", horizontal_field_width_m=width * pixel_um * 1e-6,
                  beam_shift_m=(shift_um[0] * 1e-6, shift_um[1] * 1e-6))


def edge_shift_for(row: float, height: int, pixel_um: float) -> float:
    """Electron beam shift y (µm) that puts the edge of the face at S0 on ``row``."""
    return V_CENTER_UM + (row - (height - 1) / 2) * pixel_um


def grab(inst: SimulatedFibSem, width: int, height: int) -> tuple[np.ndarray, dict]:
    img, meta = inst.grab("electron", width, height, 4e-6, 2)
    return img.astype(np.float32), meta


def locate(frame: np.ndarray, template: np.ndarray) -> np.ndarray:
    """(x, y) of the template's best match in the frame, sub-pixel (parabola through the NCC peak)."""
    ncc = match_template(frame, template)
    r, c = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    assert ncc[r, c] > 0.8 and 0 < r < ncc.shape[0] - 1 and 0 < c < ncc.shape[1] - 1

    def vertex(a: float, b: float, d: float) -> float:
        return 0.5 * (a - d) / (a - 2 * b + d)

    return np.array([c + vertex(ncc[r, c - 1], ncc[r, c], ncc[r, c + 1]),
                     r + vertex(ncc[r - 1, c], ncc[r, c], ncc[r + 1, c])])


# -- the sample-fixed frame ----------------------------------------------------------------------


def test_fiducial_stays_put_while_the_face_rises(tmp_path, world):
    """5 nm pixels, no drift, no beam shift change: 20 slices of 15 nm."""
    w = h = 512
    p = 0.005
    inst = instrument(tmp_path / "sim", world)
    shift_y = edge_shift_for(330, h, p)
    view(inst, w, h, p, (0.0, shift_y))
    inst.mill(plus(S0_UM + 1.2), current_a=50e-12)  # 1.2 µm ahead of the face, centred in x
    frames, metas = [], []
    for k in range(21):
        if k:
            mill_slice(inst)
        img, meta = grab(inst, w, h)
        frames.append(img)
        metas.append(meta)
    log = read_frame_log(inst.state_dir)
    assert [e["frame"] for e in log] == [m["frame_number"] for m in metas]
    rise_px = FACE_RISE_PER_S * 20 * SLICE_UM / p  # 35.3 px
    assert log[-1]["face_s_um"] - log[0]["face_s_um"] == pytest.approx(20 * SLICE_UM)

    # the fiducial: where the documented projection puts it, and not moving (window above the edge)
    row = (h - 1) / 2 + (-FACE_RISE_PER_S * 1.2 - V_CENTER_UM + shift_y) / p
    assert row == pytest.approx(188.9, abs=0.1)
    win = (slice(80, 290), slice(80, 430))
    dark = frames[0][win] < np.percentile(frames[0][win], 10)
    ys, xs = np.nonzero(dark)
    assert abs(ys.mean() + 80 - row) < 2 and abs(xs.mean() + 80 - (w - 1) / 2) < 2
    for k in (10, 20):
        shift, _, _ = phase_cross_correlation(frames[0][win], frames[k][win], upsample_factor=50, normalization=None)
        assert np.all(np.abs(shift) < 0.2), (k, shift)
        assert log[k]["sample_offset_px"] == pytest.approx(log[0]["sample_offset_px"], abs=1e-9)

    # the face: rows below the edge, against the specimen's truth rendered without the rise
    site = inst.site()
    for k in (0, 20):
        truth, _ = render_em_slice(world, log[k]["face_s_um"], (0.0, V_CENTER_UM - shift_y), pixel_size_nm=5.0,
                                   shape=(w, h), dwell_s=1e-4, line_averaging=50, seed=99,
                                   face=FaceGeometry(tuple(site["origin_um"]), 0.0))
        e_obs = int(np.ceil(log[k]["face_edge_row"])) + 10
        e_truth = int(np.ceil((h - 1) / 2 - (V_CENTER_UM - shift_y) / p)) + 10
        n = h - max(e_obs, e_truth) - 4
        shift, _, _ = phase_cross_correlation(truth[e_truth:e_truth + n].astype(np.float32),
                                              frames[k][e_obs:e_obs + n], upsample_factor=50, normalization=None)
        measured = (e_truth - e_obs) + shift[0]  # content displacement upwards, px
        expected = FACE_RISE_PER_S * (log[k]["face_s_um"] - S0_UM) / p
        assert abs(measured - expected) < 0.5, (k, measured, expected)
        assert abs(shift[1]) < 0.3
    assert FACE_RISE_PER_S * (log[20]["face_s_um"] - S0_UM) / p == pytest.approx(rise_px)
    assert log[20]["face_offset_px"][1] - log[20]["sample_offset_px"][1] == pytest.approx(-rise_px)
    assert log[0]["face_edge_row"] - log[20]["face_edge_row"] == pytest.approx(rise_px)


def test_steady_drift_moves_the_fiducial_as_logged(tmp_path, world):
    """40 nm right and 25 nm up per mill at 10 nm pixels: located fiducial vs frame_log sample_offset_px."""
    w, h, p = 384, 288, 0.010
    inst = instrument(tmp_path / "sim", world, drift_nm_per_slice=(40.0, -25.0))
    view(inst, w, h, p, (0.0, edge_shift_for(200, h, p)))
    inst.mill(plus(S0_UM + 2.0, x_um=0.5), current_a=50e-12)
    first, _ = grab(inst, w, h)
    log0 = read_frame_log(inst.state_dir)[-1]
    assert log0["drift_nm"] == pytest.approx([40.0, -25.0])  # one mill so far: the fiducial's
    fid = np.array([(w - 1) / 2 - 0.5 / p, (h - 1) / 2 + (-FACE_RISE_PER_S * 2.0 - V_CENTER_UM
                                                          + edge_shift_for(200, h, p)) / p])
    fid -= np.array(log0["drift_nm"]) * 1e-3 / p  # the content moves against the beam's drift
    x0, y0 = (fid - 70).astype(int)
    template = first[y0:y0 + 140, x0:x0 + 140]
    start = locate(first, template)
    for k in range(1, 13):
        mill_slice(inst)
        if k % 4:
            continue
        img, _ = grab(inst, w, h)
        e = read_frame_log(inst.state_dir)[-1]
        assert e["mill"] == k + 1 and e["drift_nm"] == pytest.approx([40.0 * (k + 1), -25.0 * (k + 1)])
        moved = locate(img, template) - start
        logged = np.subtract(e["sample_offset_px"], log0["sample_offset_px"])
        assert logged == pytest.approx([-4.0 * k, 2.5 * k])  # content moves against the beam's drift
        assert np.all(np.abs(moved - logged) < 1.0), (k, moved, logged)


def test_beam_shift_moves_the_view_with_the_documented_sign(tmp_path, world):
    w, h, p = 384, 288, 0.010
    inst = instrument(tmp_path / "sim", world)
    base = edge_shift_for(200, h, p)
    view(inst, w, h, p, (0.0, base))
    inst.mill(plus(S0_UM + 2.0), current_a=50e-12)
    ref, _ = grab(inst, w, h)
    r = int(round((h - 1) / 2 + (-FACE_RISE_PER_S * 2.0 - V_CENTER_UM + base) / p))
    template = ref[r - 60:r + 60, w // 2 - 90:w // 2 + 90]
    start = locate(ref, template)
    view(inst, w, h, p, (0.3, base - 0.2))  # +0.3 µm in x, 0.2 µm down the sample
    img, _ = grab(inst, w, h)
    moved = locate(img, template) - start
    assert np.all(np.abs(moved - [-30.0, -20.0]) < 0.5), moved  # content: left 30 px, up 20 px
    e0, e1 = read_frame_log(inst.state_dir)[-2:]
    assert np.subtract(e1["sample_offset_px"], e0["sample_offset_px"]) == pytest.approx([-30.0, -20.0])
    assert e1["beam_shift_m"] == pytest.approx([0.3e-6, (base - 0.2) * 1e-6])


def test_scan_rotation_turns_the_view_and_the_log_follows(tmp_path, world):
    w, h, p = 384, 288, 0.010
    inst = instrument(tmp_path / "sim", world)
    base = edge_shift_for(200, h, p)
    view(inst, w, h, p, (0.0, base))
    inst.mill(plus(S0_UM + 2.0), current_a=50e-12)
    inst.set_beam("electron", scan_rotation_deg=20.0)
    ref, _ = grab(inst, w, h)
    r = int(round((h - 1) / 2 + (-FACE_RISE_PER_S * 2.0 - V_CENTER_UM + base) / p))  # turned about the centre
    template = ref[r - 50:r + 50, w // 2 - 80:w // 2 + 80]
    start = locate(ref, template)
    view(inst, w, h, p, (0.2, base - 0.15))
    img, _ = grab(inst, w, h)
    e0, e1 = read_frame_log(inst.state_dir)[-2:]
    logged = np.subtract(e1["sample_offset_px"], e0["sample_offset_px"])
    a = np.radians(20.0)  # (-20, -15) px on the face, turned into the frame
    assert logged == pytest.approx([-20 * np.cos(a) - 15 * np.sin(a), 20 * np.sin(a) - 15 * np.cos(a)])
    assert np.all(np.abs(locate(img, template) - start - logged) < 0.5)


def test_fiducial_is_clear_in_small_and_large_frames_and_goes_when_milled_through(tmp_path, world):
    inst = instrument(tmp_path / "sim", world)
    inst.mill(plus(S0_UM + 2.0, x_um=1.0), current_a=50e-12)
    for w, h, p in ((512, 384, 0.020), (2048, 1536, 0.005)):
        shift = edge_shift_for(0.6 * h, h, p)
        view(inst, w, h, p, (0.0, shift))
        img, meta = grab(inst, w, h)
        rows = meta["truth"]["surface"]["rows"]
        assert rows[0] == 0 and rows[1] == pytest.approx(0.6 * h, abs=2)
        # dark pixels of the band = the "+": where the projection puts it, the size of its arms
        band = img[: int(0.6 * h) - 5]
        smooth = band.reshape(band.shape[0] // 4, 4, w // 4, 4).mean(axis=(1, 3)) if p < 0.01 else band
        f = 4 if p < 0.01 else 1
        mark = smooth < (np.median(smooth) + np.min(smooth)) / 2
        ys, xs = np.nonzero(mark)
        assert (xs.max() - xs.min() + 1) * f == pytest.approx(1.5 / p, rel=0.15)
        assert (ys.max() - ys.min() + 1) * f == pytest.approx(1.5 * FACE_RISE_PER_S / p, rel=0.2)
        row = (h - 1) / 2 + (-FACE_RISE_PER_S * 2.0 - V_CENTER_UM + shift) / p
        assert ys.mean() * f == pytest.approx(row, abs=3 * f) and xs.mean() * f == pytest.approx((w - 1) / 2 - 1.0 / p,
                                                                                              abs=3 * f)
        inside = img[int(row) - 2:int(row) + 3, int((w - 1) / 2 - 1.0 / p) - 2:int((w - 1) / 2 - 1.0 / p) + 3]
        surface = img[int(row) - 2:int(row) + 3, 10:10 + int(0.3 / p)]  # the cap, left of the "+"
        assert surface.mean() - inside.mean() > 50  # dark mark, grey levels
    # mill 2.5 µm: the face passes the fiducial's centre; what remains ahead is only the far half of the
    # vertical arm, then nothing
    w, h, p = 512, 384, 0.020
    for depth_um, expect in ((2.5, "part"), (1.0, "gone")):
        mill_slice(inst, depth_um)
        face = inst.site()["face_s_um"]
        view(inst, w, h, p, (0.0, edge_shift_for(0.6 * h, h, p) + FACE_RISE_PER_S * (face - S0_UM)))
        img, meta = grab(inst, w, h)
        pits = meta["truth"]["surface"]["pits_uv_um"]
        edge = meta["truth"]["surface"]["face_edge_row"]
        assert edge == pytest.approx(0.6 * h, abs=0.01)  # the beam shift held the edge
        col = int(round((w - 1) / 2 - 1.0 / p))
        notch = img[int(edge) - 5:int(edge), col - 4:col + 5]  # 0.25 µm of the vertical arm: 7 px above the edge
        rest = img[:int(edge) - 12]
        cap = float(np.median(rest))
        assert (rest < cap - 60).sum() < 20  # no other dark mark: the horizontal arm is behind the face
        if expect == "part":
            assert len(pits) == 1 and pits[0][3] == pytest.approx(S0_UM + 2.75)
            assert notch.mean() < cap - 40
        else:
            assert pits == [] and abs(notch.mean() - cap) < 15


def test_working_distance_recedes_0p8_per_um_milled(tmp_path, world):
    inst = instrument(tmp_path / "sim", world)
    before = inst.autofunction("autofocus")["after"]["working_distance_m"]
    mill_slice(inst, 5.0)
    after = inst.autofunction("autofocus")["after"]["working_distance_m"]
    assert (after - before) * 1e6 == pytest.approx(0.8 * 5.0, abs=1.2)  # each autofocus lands within ~0.2 µm


# -- the truth log -------------------------------------------------------------------------------


def test_frame_log_one_line_per_electron_frame_across_restarts(tmp_path, world):
    inst = instrument(tmp_path / "sim", world)
    inst.grab("electron", 64, 48, 1e-6)
    inst.grab("ion", 64, 64, 1e-6)
    inst.set_beam("electron", blanked=True)
    inst.grab("electron", 64, 48, 1e-6)
    again = SimulatedFibSem(inst.state_dir, world=world, time_scale=0)
    again.set_beam("electron", blanked=False)
    again.grab("electron", 64, 48, 1e-6)
    with open(inst.state_dir / "frame_log.jsonl", "a") as f:
        f.write('{"frame": 9, "cut off')  # a crash mid-line
    log = read_frame_log(inst.state_dir)
    assert [e["frame"] for e in log] == [1, 3, 4] and [e["blanked"] for e in log] == [False, True, False]
    assert set(log[0]) >= {"frame", "mill", "face_s_um", "drift_nm", "beam_shift_m", "pixel_size_m", "shape",
                           "sample_offset_px", "face_offset_px", "face_edge_row", "time"}
    assert log[0]["shape"] == [64, 48] and log[0]["pixel_size_m"] == pytest.approx(10.24e-6 / 64)
    # the default drift is the renderer's random walk (seeded; mill counter 0 = none yet)
    assert log[-1]["drift_nm"] == [0.0, 0.0]


def test_drift_options_default_to_the_renderers(tmp_path, world):
    plain = SimulatedFibSem(tmp_path / "a", world=world, time_scale=0)
    assert plain.em_imperfections == EMImperfections(drift=True)
    linear = SimulatedFibSem(tmp_path / "b", world=world, time_scale=0, drift_nm_per_slice=(50.0, 30.0),
                             em_imperfections=EMImperfections())
    assert linear.drift_model.offset_nm(60) == pytest.approx((3000.0, 1800.0))  # walk and jumps off: exactly linear
    walk = SimulatedFibSem(tmp_path / "c", world=world, time_scale=0, drift_step_nm=10.0, drift_jump_probability=0.0)
    steps = np.diff([walk.drift_model.offset_nm(i) for i in range(400)], axis=0)
    assert np.std(steps) == pytest.approx(10.0, rel=0.15)


# -- through the bridge -------------------------------------------------------------------------


def test_bridge_serve_sim_drift_options(tmp_path):
    """`clemflow bridge serve --sim-drift-nm-per-slice 50,30`: 60 mills drift the image by 3 and 1.8 µm."""
    from clemflow.bridge.backend import FrameRequest, MillPattern
    from clemflow.bridge.client import BridgeClient

    state = tmp_path / "instrument"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clemflow", "bridge", "serve", "--backend", "sim-smartsem", "--bind",
         "tcp://127.0.0.1:0", "--sim-world", "small", "--sim-time-scale", "0", "--record", str(tmp_path / "record"),
         "--sim-state", str(state), "--sim-drift-nm-per-slice", "50,30", "--sim-drift-step-nm", "0",
         "--sim-drift-jump-probability", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        listening = None
        while listening is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                listening = json.loads(line)
        assert listening is not None, "the server did not start"
        with BridgeClient(listening["commands"]) as client:
            for i in range(60):
                face = -6e-6 + i * 15e-9
                client.mill([MillPattern("rectangle", (0.0, face + 7.5e-9), 20e-6, 15e-9, 5e-6)], 700e-12)
            frame = client.grab_frame(FrameRequest("electron", 256, 192, 1e-6))
        assert frame.image.shape == (192, 256)
        e = read_frame_log(state)[-1]
        assert e["mill"] == 60
        assert e["drift_nm"] == pytest.approx([3000.0, 1800.0])
        p_nm = e["pixel_size_m"] * 1e9
        assert e["sample_offset_px"] == pytest.approx([-3000.0 / p_nm, -1800.0 / p_nm])
        assert e["face_s_um"] == pytest.approx(-6.0 + 60 * 0.015)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def test_bridge_serve_refuses_a_malformed_drift():
    from clemflow.cli.app import app

    importlib.import_module("clemflow.cli.bridge")  # registers `bridge serve`

    result = CliRunner().invoke(app, ["bridge", "serve", "--backend", "sim-smartsem", "--sim-drift-nm-per-slice", "50"])
    assert result.exit_code == 2 and "X,Y" in result.output
