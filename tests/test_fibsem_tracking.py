"""Fiducial tracking, the focus measure, FocusWatch and the slice dashboard (clemflow.fibsem).

Synthetic frames are analytic (a "+" with soft edges and a bright rim on a
low-contrast surface texture, face content below an edge, Poisson noise), so
a sub-pixel shift is exact truth. Simulator frames come from
``clemflow.simulators.fibsem`` with a fiducial milled ahead of the face.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import pytest
from rich.console import Console
from scipy import ndimage
from scipy.special import erf

from clemflow.fibsem.dashboard import SliceDashboard, SliceStatus, sparkline
from clemflow.fibsem.fiducial import (
    FiducialTemplate,
    LowContrastError,
    capture_template,
    cross_template,
    find_fiducial_candidates,
    locate_fiducial,
    normalized_cross_correlation,
)
from clemflow.fibsem.focus import FocusWatch, sharpness

W, H = 640, 480
MARK = (320.0, 180.0)  # the "+" centre in the reference frame (x, y)
FACE_ROW = 360  # rows below show the face, whose content changes every slice


def _texture(x: np.ndarray, y: np.ndarray, seed: int, n: int, amp: float, kmax: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros_like(x)
    for _ in range(n):
        k, th, ph = rng.uniform(0.02, kmax), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        out += amp * np.cos(k * (x * np.cos(th) + y * np.sin(th)) + ph)
    return out


def scene(
    shift: tuple[float, float] = (0.0, 0.0),
    *,
    mark: bool = True,
    face_seed: int = 1,
    noise_seed: int = 0,
    photons: float = 20.0,
    gain: float = 1.0,
    offset: float = 0.0,
    blur_px: float = 0.0,
    ramp: float = 0.0,
    shape: tuple[int, int] = (W, H),
    center: tuple[float, float] = MARK,
    arm_px: float = 150.0,
    width_px: float = 30.0,
) -> np.ndarray:
    """A frame whose surface (and the mark on it) is moved by `shift` (x, y) px; face content below FACE_ROW."""
    w, h = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = xx - shift[0], yy - shift[1]
    img = 0.5 + _texture(x, y, 11, 24, 0.02, 0.15)
    if mark:
        cx, cy = center

        def bars(grow: float) -> np.ndarray:
            def bar(hx: float, hy: float) -> np.ndarray:
                return 0.25 * (1 + erf((hx - np.abs(x - cx)) / 1.5)) * (1 + erf((hy - np.abs(y - cy)) / 1.5))
            return np.maximum(bar(arm_px / 2 + grow, width_px / 2 + grow), bar(width_px / 2 + grow, arm_px / 2 + grow))

        inside = bars(0.0)
        img = img - 0.3 * inside + 0.15 * (bars(4.0) - inside)
    face = 0.4 + _texture(xx, yy, 1000 + face_seed, 24, 0.06, 0.4)
    img = np.where(yy > FACE_ROW, face, img)
    if blur_px > 0:
        img = ndimage.gaussian_filter(img, blur_px, mode="reflect")
    img = img + ramp * (xx / w + yy / h)  # charging: a slow brightness gradient
    counts = np.random.default_rng(noise_seed).poisson(np.clip(img, 0, None) * photons) / photons
    return (counts * gain + offset).astype(np.float32)


@pytest.fixture(scope="module")
def template() -> FiducialTemplate:
    return capture_template(scene(), MARK, 128, pixel_size_m=10e-9)


# -- fiducial: synthetic frames -----------------------------------------------------------------


@pytest.mark.parametrize(
    "shift",
    [(0.0, 0.0), (0.3, -0.7), (12.5, 3.25), (-40.2, 25.6), (80.0, -80.0), (-79.6, 79.4), (61.33, -17.8)],
)
def test_locate_recovers_shift_under_noise_brightness_change_and_new_face(template, shift):
    # 30 % brighter, offset, a charging gradient, other noise, and other face content below the edge
    frame = scene(shift, face_seed=7, noise_seed=3, gain=1.3, offset=0.05, ramp=0.3)
    m = locate_fiducial(template, frame, MARK, search_radius_px=100)
    assert abs(m.offset_px[0] - shift[0]) < 0.3 and abs(m.offset_px[1] - shift[1]) < 0.3, (m, shift)
    assert m.position_px == pytest.approx((template.center_px[0] + m.offset_px[0],
                                           template.center_px[1] + m.offset_px[1]))
    assert m.similarity > 0.75 and m.peak_ratio > 1.5 and not m.at_edge
    assert m.ok(0.75)


def test_locate_from_a_predicted_position_and_clipped_at_the_frame_border(template):
    # searching around a prediction: the offset is still relative to the capture position
    frame = scene((150.0, -20.0), noise_seed=4)
    m = locate_fiducial(template, frame, (MARK[0] + 140, MARK[1] - 25), search_radius_px=30)
    assert m.offset_px == pytest.approx((150.0, -20.0), abs=0.3)
    assert m.expected_px == (MARK[0] + 140, MARK[1] - 25)
    # the window runs off the right border: what is inside is searched
    frame = scene((200.0, 0.0), noise_seed=5)
    m = locate_fiducial(template, frame, (MARK[0] + 200, MARK[1]), search_radius_px=100)
    assert m.offset_px == pytest.approx((200.0, 0.0), abs=0.3) and m.similarity > 0.75
    # no room at all for the template: similarity 0, nothing trusted
    m = locate_fiducial(template, frame, (W + 200.0, MARK[1]), search_radius_px=50)
    assert m.similarity == 0.0 and m.at_edge and not m.ok(0.5)


def test_mark_beyond_the_search_radius_is_flagged_at_edge(template):
    # just beyond: the best placement is on the window's border, flagged
    m = locate_fiducial(template, scene((45.0, 0.0), noise_seed=6), MARK, search_radius_px=40)
    assert m.at_edge and not m.ok(0.0)
    assert m.offset_px[0] == pytest.approx(40.0, abs=0.5)
    # far beyond: whatever is found inside is a poor match
    m = locate_fiducial(template, scene((100.0, 0.0), noise_seed=6), MARK, search_radius_px=40)
    assert m.similarity < 0.5 and not m.ok(0.5)


def test_similarity_low_without_the_mark_or_with_a_blank_frame(template):
    absent = locate_fiducial(template, scene(mark=False, noise_seed=8), MARK, 100)
    assert absent.similarity < 0.5
    noise = np.random.default_rng(9).poisson(3.0, (H, W)).astype(np.float32)  # blanked beam: dark, noisy
    assert locate_fiducial(template, noise, MARK, 100).similarity < 0.5
    assert locate_fiducial(template, np.zeros((H, W), np.uint8), MARK, 100).similarity == 0.0


def test_pixel_size_must_match_the_template(template):
    frame = scene(noise_seed=10)
    assert locate_fiducial(template, frame, pixel_size_m=10.05e-9).similarity > 0.75
    with pytest.raises(ValueError, match="pixel size"):
        locate_fiducial(template, frame, pixel_size_m=20e-9)


def test_capture_template_shape_centre_and_normalisation():
    t = capture_template(scene(), (320.4, 179.6), (96, 64))
    assert t.image.dtype == np.float32 and t.image.shape == (64, 96) and t.size_px == (96, 64)
    # cut on whole pixels: the exact centre of the patch, within half a pixel of the request
    assert t.center_px == (320.5, 179.5)
    assert abs(float(t.image.mean())) < 1e-6 and float(np.sqrt((t.image.astype(np.float64) ** 2).sum())) == pytest.approx(1.0)
    assert t.contrast > 3


def test_capture_refuses_featureless_and_out_of_frame_patches():
    with pytest.raises(LowContrastError, match="too little contrast"):
        capture_template(np.random.default_rng(0).poisson(10.0, (H, W)), MARK, 128)
    with pytest.raises(LowContrastError):
        capture_template(np.full((H, W), 100, np.uint8), MARK, 128)
    with pytest.raises(ValueError, match="does not fit"):
        capture_template(scene(), (30.0, 30.0), 128)


def test_ncc_is_one_for_an_exact_copy_and_invariant_to_gain_and_offset():
    rng = np.random.default_rng(1)
    win = rng.normal(size=(50, 60))
    tpl = win[10:30, 20:45]
    ncc = normalized_cross_correlation(3.0 * win + 7.0, tpl)
    assert ncc.shape == (31, 36)
    r, c = np.unravel_index(np.argmax(ncc), ncc.shape)
    assert (r, c) == (10, 20) and ncc[r, c] == pytest.approx(1.0, abs=1e-9)
    assert normalized_cross_correlation(-win, tpl)[10, 20] == pytest.approx(-1.0, abs=1e-9)


def test_candidates_find_a_fresh_cross_without_a_template():
    frame = scene((23.4, -11.2), noise_seed=12)
    found = find_fiducial_candidates(frame, 150, 30, region_px=(0, 0, W, FACE_ROW))
    assert found and found[0].score > 0.6
    assert found[0].position_px == pytest.approx((MARK[0] + 23.4, MARK[1] - 11.2), abs=1.0)
    assert all(c.score < found[0].score for c in found[1:])
    assert find_fiducial_candidates(scene(mark=False, noise_seed=13), 150, 30, min_score=0.6,
                                    region_px=(0, 0, W, FACE_ROW)) == []
    # a bright cross is not a dark one, unless asked for either
    bright = 2 * float(np.median(frame)) - frame
    assert find_fiducial_candidates(bright, 150, 30, min_score=0.6, region_px=(0, 0, W, FACE_ROW)) == []
    either = find_fiducial_candidates(bright, 150, 30, polarity="any", region_px=(0, 0, W, FACE_ROW))
    assert either[0].position_px == pytest.approx(found[0].position_px, abs=1.0)


def test_cross_template_geometry():
    c = cross_template(21, 5, rim_px=2)
    side = c.shape[0]
    mid = (side - 1) // 2
    assert c.shape == (side, side) and side % 2 == 1
    assert c[mid, mid] == -1 and c[mid, mid + 10] == -1  # 21 px: the arm ends on a pixel edge
    assert c[mid, mid + 11] == 0.5 and c[mid, mid + 12] == 0.5 and c[mid, mid + 13] == 0  # 2 px of rim, then ground
    assert c[mid + 6, mid + 6] == 0
    even = cross_template(20, 5, rim_px=2)
    assert even[mid, mid + 10] == -0.5 + 0.5 * 0.5  # the end pixel: half arm, half rim
    assert (cross_template(21, 5, polarity="bright") == -cross_template(21, 5)).all()
    # foreshortened in y (the SEM's view of a surface "+"): bars 21 x 3 and 5 x 12.4 px; areas are exact
    f = cross_template((21, 12.4), (5, 3))
    assert f.shape == (17, 25)
    assert -f.sum() == pytest.approx(21 * 3 + 5 * 12.4 - 5 * 3, abs=1e-4)
    assert -f[:, 12].sum() == pytest.approx(12.4, abs=1e-5) and -f[8].sum() == pytest.approx(21, abs=1e-5)


# -- fiducial and focus: simulator frames -----------------------------------------------------

SIM_W, SIM_H, SIM_PX = 512, 384, 20e-9
ARM_M, BAR_M = 1.5e-6, 0.3e-6  # the engine's "+": two 1.5 x 0.3 µm rectangles
COS54 = math.cos(math.radians(54.0))  # the surface is foreshortened in y by this in the SEM image


@pytest.fixture
def sim(tmp_path):
    """The small simulated FIB-SEM at a cell, steady drift (40, -25) nm per mill, a "+" milled 3 µm ahead of
    the face and 2 µm to the side, the view shifted 3 µm up so the surface above the face edge is in frame."""
    from clemflow.simulators.fibsem import SimulatedFibSem

    inst = SimulatedFibSem.small(tmp_path, time_scale=0, seed=3, drift_nm_per_slice=(40.0, -25.0))
    inst.move_stage(*inst.cell_stage_xy_m(0))
    inst.set_beam("electron", horizontal_field_width_m=SIM_W * SIM_PX, beam_shift_m=[0.0, 3e-6])
    face_um = inst.state()["site"]["face_s_um"] if inst.state()["site"] else -6.0
    centre = [-2e-6, (face_um + 3.0) * 1e-6]
    inst.mill([dict(kind="rectangle", center_m=centre, width_m=ARM_M, height_m=BAR_M, depth_m=0.7e-6),
               dict(kind="rectangle", center_m=centre, width_m=BAR_M, height_m=ARM_M, depth_m=0.7e-6)])
    return inst


def _grab(inst) -> tuple[np.ndarray, dict]:
    from clemflow.simulators.fibsem.frame_log import read_frame_log

    img, _ = inst.grab("electron", SIM_W, SIM_H, 1e-6, 1)
    return img, read_frame_log(inst.state_dir)[-1]


def _sim_cross_px() -> tuple[tuple[float, float], tuple[float, float]]:
    arm, bar = ARM_M / SIM_PX, BAR_M / SIM_PX
    return (arm, arm * COS54), (bar, bar * COS54)


def _dark_centroid(img: np.ndarray, rows: int) -> tuple[float, float]:
    """Centre of the largest dark blob above `rows` (the pit), independently of any template."""
    smooth = ndimage.gaussian_filter(img[:rows].astype(np.float64), 2.0)
    med = float(np.median(smooth))
    spread = float(np.median(np.abs(smooth - med))) * 1.4826
    labels, n = ndimage.label(smooth < med - 5 * spread)
    sizes = ndimage.sum(np.ones_like(smooth), labels, range(1, n + 1))
    cy, cx = ndimage.center_of_mass(np.ones_like(smooth), labels, int(np.argmax(sizes)) + 1)
    return float(cx), float(cy)


def test_sim_fresh_fiducial_found_without_template(sim):
    img, truth = _grab(sim)
    edge = int(truth["face_edge_row"])
    arm, bar = _sim_cross_px()
    found = find_fiducial_candidates(img, arm, bar, rim_px=1.5, region_px=(0, 0, SIM_W, edge))
    assert found[0].score > 0.6 and all(c.score < 0.5 for c in found[1:])
    assert found[0].position_px == pytest.approx(_dark_centroid(img, edge), abs=1.0)


def test_sim_tracking_matches_the_simulator_truth_through_drift_beam_shift_and_brightness(sim):
    img, truth0 = _grab(sim)
    arm, bar = _sim_cross_px()
    best = find_fiducial_candidates(img, arm, bar, rim_px=1.5, region_px=(0, 0, SIM_W, int(truth0["face_edge_row"])))[0]
    template = capture_template(img, best.position_px, (112, 90), pixel_size_m=SIM_PX)
    ref = np.array(truth0["sample_offset_px"])
    # beam shift +x moves the view right (content left): move the mark towards the frame centre
    dx_m = 1.6e-6 if best.position_px[0] > SIM_W / 2 else -1.6e-6
    face = sim.state()["site"]["face_s_um"]
    for i in range(1, 9):
        t = 0.015
        sim.mill([dict(kind="rectangle", center_m=[0.0, (face + t / 2) * 1e-6], width_m=6e-6, height_m=t * 1e-6,
                       depth_m=3e-6)])
        face += t
        if i == 4:  # an 80 px jump in x and y at once, and charging-like brightness/contrast change
            sim.set_beam("electron", beam_shift_m=[dx_m, 4.6e-6], brightness=0.6, contrast=0.58)
        frame, truth = _grab(sim)
        want = np.array(truth["sample_offset_px"]) - ref
        m = locate_fiducial(template, frame, search_radius_px=100, pixel_size_m=SIM_PX)
        assert np.abs(np.array(m.offset_px) - want).max() < 0.3, (i, m, want)
        assert m.similarity > 0.8 and m.peak_ratio > 2 and m.ok(0.75)
    assert abs(want[0]) > 80 and abs(want[1]) > 80  # it really went that far
    # a blanked beam, and a view without the mark: nothing to trust
    sim.set_beam("electron", blanked=True)
    frame, _ = _grab(sim)
    assert locate_fiducial(template, frame, search_radius_px=100).similarity < 0.5
    sim.set_beam("electron", blanked=False, beam_shift_m=[-3 * dx_m, 3e-6])
    frame, _ = _grab(sim)
    assert locate_fiducial(template, frame, search_radius_px=100).similarity < 0.5


def test_sim_sharpness_falls_with_defocus_and_focuswatch_asks_for_autofocus(tmp_path):
    from clemflow.simulators.fibsem import SimulatedFibSem

    inst = SimulatedFibSem.small(tmp_path, time_scale=0, seed=5)
    inst.move_stage(*inst.cell_stage_xy_m(0))
    inst.set_beam("electron", horizontal_field_width_m=SIM_W * SIM_PX)
    wd = inst.state()["beams"]["electron"]["working_distance_m"]

    def measure(dwd_um: float, **beam: float) -> float:
        inst.set_beam("electron", working_distance_m=wd + dwd_um * 1e-6, **beam)
        return sharpness(inst.grab("electron", SIM_W, SIM_H, 1e-6, 1)[0])

    # about 2.5 nm of blur sigma per µm of WD error: 8 µm = 1 px at 20 nm
    values = [measure(d) for d in (0.0, 8.0, 16.0, 24.0, 32.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert measure(0.0, brightness=0.58, contrast=0.45) == pytest.approx(values[0], rel=0.05)
    assert measure(0.0, brightness=0.45, contrast=0.58) == pytest.approx(values[0], rel=0.05)
    inst.set_beam("electron", brightness=0.5, contrast=0.5)
    watch = FocusWatch(drop_fraction=0.15, window=5)
    assert not any(watch.needs_autofocus(measure(0.0)) for _ in range(6))
    assert not watch.needs_autofocus(measure(3.0))  # within the depth of field
    assert watch.needs_autofocus(measure(20.0))


# -- focus --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _organelles(w: int = 512, h: int = 384) -> np.ndarray:
    """A noise-free face: overlapping discs with sharp edges (a broad spectrum, like membranes)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full((h, w), 0.6)
    for _ in range(120):
        cx, cy, r, a = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 30), rng.uniform(-0.3, 0.3)
        img += a * 0.5 * (1 + np.tanh((r - np.hypot(xx - cx, yy - cy)) / 0.7))
    return np.clip(img, 0.05, None)


def _face(blur_px: float, *, noise_seed: int = 0, photons: float = 30.0, gain: float = 1.0,
          brightness: float = 0.0) -> np.ndarray:
    """The face blurred (defocus acts on the signal), scanned with shot noise, then as an 8-bit frame
    with the instrument's contrast (gain about mid-grey) and brightness (fraction of full scale)."""
    signal = ndimage.gaussian_filter(_organelles(), blur_px) if blur_px > 0 else _organelles()
    counts = np.random.default_rng(noise_seed).poisson(signal * photons) / photons
    grey = 128 + (counts * 160 - 128) * gain + brightness * 255
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def test_sharpness_falls_monotonically_with_blur_and_ignores_brightness_contrast():
    values = [sharpness(_face(s, noise_seed=i)) for i, s in enumerate([0.0, 1.0, 2.0, 3.0, 4.0])]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.6 * values[0]
    for s in (0.0, 2.0):
        ref = sharpness(_face(s, noise_seed=20))
        for gain, brightness in ((0.7, 0.1), (1.3, -0.05), (0.5, -0.2)):
            assert sharpness(_face(s, noise_seed=20, gain=gain, brightness=brightness)) == pytest.approx(ref, rel=0.05)


def test_sharpness_is_not_fooled_by_noise():
    # the same face with 10x fewer electrons: the measure stays where it was (a plain Tenengrad rises)
    assert sharpness(_face(0.0, photons=10.0, noise_seed=2)) == pytest.approx(sharpness(_face(0.0, photons=100.0)),
                                                                             rel=0.1)
    assert sharpness(np.random.default_rng(0).poisson(20.0, (384, 512))) == 0.0  # noise alone
    assert sharpness(np.zeros((384, 512))) == 0.0
    with pytest.raises(ValueError):
        sharpness(np.zeros((10, 10)))


def test_focuswatch_triggers_on_a_drop_and_not_on_noise():
    rng = np.random.default_rng(0)
    watch = FocusWatch(drop_fraction=0.15, window=5)
    steady = 1.0 + 0.03 * rng.standard_normal(300)
    assert not any(watch.needs_autofocus(float(v)) for v in steady)
    assert watch.reference == pytest.approx(1.0, abs=0.05) and watch.threshold == pytest.approx(0.85 * watch.reference)
    # focus drifts away: the first value below the threshold asks for autofocus
    fired = [watch.needs_autofocus(v) for v in (0.97, 0.93, 0.88, 0.82, 0.78)]
    assert fired == [False, False, False, True, True]
    # autofocus ran: the next values (a sparser region: lower) are the new reference
    watch.autofocused()
    assert watch.reference is None
    assert not any(watch.needs_autofocus(v) for v in (0.6, 0.61, 0.59, 0.6, 0.62, 0.58, 0.6))
    assert watch.reference == pytest.approx(0.6)
    assert watch.needs_autofocus(0.45)


def test_focuswatch_consecutive_and_journal_round_trip():
    watch = FocusWatch(drop_fraction=0.2, window=3, consecutive=2)
    for v in (1.0, 1.02, 0.98):
        watch.needs_autofocus(v)
    assert not watch.needs_autofocus(0.7)  # one low frame: maybe a glitch
    assert not watch.needs_autofocus(1.0)
    assert not watch.needs_autofocus(0.7)
    again = FocusWatch.from_dict(watch.to_dict())
    assert again == watch and again.needs_autofocus(0.7)  # the second in a row, after a resume
    with pytest.raises(ValueError):
        FocusWatch(drop_fraction=1.5)


# -- dashboard ----------------------------------------------------------------------------------


def _status(i: int, **kw: object) -> SliceStatus:
    base = dict(total_slices=60, depth_nm=15.0 * i, rate_per_h=42.5, end_estimate_s=1.9e9, mill_s=40.2, image_s=31.4,
                overhead_s=0.8, drift_px=(0.25 * i, -0.1 * i), similarity=0.93, beam_shift_um=(0.01 * i, 0.2),
                focus=0.123, wd_mm=5.0123, last_autofocus_slice=20, updated_s=1.9e9 - 3600)
    base.update(kw)
    return SliceStatus(i, **base)  # type: ignore[arg-type]


def test_dashboard_plain_console_logs_every_n_slices_and_alerts():
    console = Console(record=True, width=120, file=io.StringIO())
    with SliceDashboard(console, log_every=10) as dash:
        assert not dash.live
        for i in range(1, 61):
            dash.update(_status(i))
            if i == 33:
                dash.alert("fiducial similarity 0.61 below 0.75: rescanning", "warning")
        dash.update(_status(60, state="done"))
    text = console.export_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) <= 10, text  # slices 1, 10, ..., 60, the alert, done
    assert "slice 1/60" in text and "slice 30/60" in text and "slice 60/60 | done" in text
    assert "rate 42.5 slices/h" in text and "drift (+7.50, -3.00) px sim 0.93" in text
    assert "warning: fiducial similarity 0.61 below 0.75" in text
    assert len(dash.drift_history) == 40 and dash.drift_history[-1] == pytest.approx(math.hypot(15.0, 6.0))


def test_dashboard_live_panel_renders_status_sparkline_and_alerts():
    console = Console(record=True, width=110, file=io.StringIO(), force_terminal=True)
    dash = SliceDashboard(console)
    assert dash.live
    with dash:
        for i in range(1, 13):
            dash.update(_status(i))
        dash.alert("beam trip on the ion beam at slice 12", "error")
        dash.update(_status(12, state="fault"))
    out = Console(record=True, width=110, file=io.StringIO())
    out.print(dash.render())
    text = out.export_text()
    for needle in ("FAULT", "12 / 60 (20.0 %)", "depth 180 nm", "42.5 slices/h", "mill 40.2 s", "image 31.4 s",
                   "(+3.00, -1.20) px", "similarity 0.93", "WD 5.0123 mm", "last autofocus slice 20",
                   "error: beam trip on the ion beam at slice 12"):
        assert needle in text, (needle, text)
    assert sparkline(dash.drift_history) in text and "█" in text


def test_sparkline_scales_to_the_largest_value_with_a_floor():
    assert sparkline([]) == ""
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([0.1, 0.2]) == "▂▂"  # below the 1 px floor: small blocks, not a full scale of noise
    assert sparkline([0.0, 4.0, 8.0]) == "▁▅█"


def test_dashboard_shows_odd_values_instead_of_failing():
    console = Console(record=True, width=120, file=io.StringIO())
    dash = SliceDashboard(console, refresh_per_second=30)
    assert dash.refresh_per_second == 4.0  # never faster than 4 Hz
    empty = Console(record=True, width=120, file=io.StringIO())
    empty.print(dash.render())
    assert "waiting for the first slice" in empty.export_text()
    odd = SliceStatus(3, None, depth_nm=45.0, focus={"sharpness": 0.12}, drift_px="lost", wd_mm=None)  # type: ignore[arg-type]
    with dash:
        dash.update(odd)
        dash.update(SliceStatus(4, state="paused"))
    text = console.export_text()
    assert "slice 3 | running | depth 45 nm" in text and "drift lost px" in text and "{'sharpness': 0.12}" in text
    assert "slice 4 | paused" in text
    out = Console(record=True, width=120, file=io.StringIO())
    out.print(dash.render())
    assert "PAUSED" in out.export_text() and dash.drift_history == []
