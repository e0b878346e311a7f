"""The simulated confocal: Python devices loaded from a .cfg image the specimen where the dish pose says."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import useq
from scipy import ndimage as ndi

from clemflow.schedule.clock import VirtualClock
from clemflow.simulators.confocal import (
    SIMULATED_CFG,
    CameraTimeout,
    ConfocalFaults,
    FrameDropped,
    NoSimulationInstalled,
    StageError,
    build_simulated_core,
    microscope_of,
    pixel_size_for,
)
from clemflow.simulators.confocal import context as sim_context
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.overview import DishPose


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=4), seed=3)


def _snap(core) -> np.ndarray:
    core.snapImage()
    return np.asarray(core.getImage(), dtype=float)


def test_core_loads_from_cfg_with_roles_groups_and_pixel_size(world):
    assert SIMULATED_CFG.is_file()
    core = build_simulated_core(world, DishPose(), VirtualClock())
    assert set(core.getLoadedDevices()) >= {"Camera", "XYStage", "ZDrive", "Objective", "Channel", "Shutter"}
    assert core.getCameraDevice() == "Camera" and core.getXYStageDevice() == "XYStage"
    assert core.getFocusDevice() == "ZDrive" and core.getShutterDevice() == "Shutter"
    assert set(core.getAvailableConfigs("Channel")) == {"TL", "405", "488", "639"}
    assert set(core.getAvailableConfigs("Objective")) == {"10x", "63x"}
    assert core.getChannelGroup() == "Channel"
    assert core.getPixelSizeUm() == pytest.approx(0.65)
    assert (core.getImageHeight(), core.getImageWidth()) == (512, 512)


def test_device_needs_an_installed_microscope():
    from clemflow.simulators.confocal.devices import SimCamera

    sim_context.uninstall()
    with pytest.raises(NoSimulationInstalled, match="install"):
        SimCamera()


def _bar_centre(img, point, along, across, half=80.0):
    """Offset (px, along ``across``) of the dark bar's centre line near ``point`` (averaged profiles)."""
    t = np.arange(-half, half + 0.01, 0.25)
    profiles = []
    for s in np.arange(-10, 10.1, 2.0):
        p = point[None, :] + s * along[None, :] + t[:, None] * across[None, :]  # (N, 2) as (col, row)
        profiles.append(ndi.map_coordinates(img, [p[:, 1], p[:, 0]], order=1))
    prof = np.mean(profiles, axis=0)
    glass = np.median(np.r_[prof[:40], prof[-40:]])
    floor = prof.min()
    dark = prof < (glass + floor) / 2
    return float(t[dark].mean())


def test_tl_10x_shows_the_grid_crossing_where_the_pose_puts_it(world):
    pose = DishPose(rotation_deg=17.0, shift_um=(-2500.0, 1500.0))
    core = build_simulated_core(world, pose, VirtualClock())
    ctx = microscope_of(core)
    pitch = world.grid.pitch_um
    c0, r0 = world.params.first_square
    crossing_stage = ctx.dish_to_stage([c0 * pitch, r0 * pitch])
    p = core.getPixelSizeUm()
    offset_px = np.array([40.0, -25.0])  # where the crossing should land, relative to the image centre
    stage = crossing_stage - offset_px * p
    core.setXYPosition(*stage)
    core.setPosition(ctx.z_drive_for(0.0, "10x"))
    core.setConfig("Channel", "TL")
    img = _snap(core)
    h, w = img.shape
    predicted = np.array([(w - 1) / 2, (h - 1) / 2]) + offset_px  # (col, row)
    m = pose.matrix()
    u, v = m[:, 0], m[:, 1]  # dish x and y axes in camera (col, row) directions
    # the bar along dish x (constant dish y): centre measured across it (along v), 120 px either side
    pts_h = [predicted + s * u + _bar_centre(img, predicted + s * u, u, v) * v for s in (-120, 120)]
    pts_v = [predicted + s * v + _bar_centre(img, predicted + s * v, v, u) * u for s in (-120, 120)]
    (a1, a2), (b1, b2) = pts_h, pts_v
    # intersect the two measured centre lines
    mat = np.column_stack([a2 - a1, -(b2 - b1)])
    k = np.linalg.solve(mat, b1 - a1)
    measured = a1 + k[0] * (a2 - a1)
    assert np.hypot(*(measured - predicted)) < 2.0, (measured, predicted)


@pytest.mark.parametrize(
    "pose",
    [DishPose(rotation_deg=30.0, shift_um=(1500.0, -800.0)), DishPose(rotation_deg=90.0, shift_um=(-3000.0, 2000.0), mirror=True)],
    ids=["rotated-30", "rotated-90-mirrored"],
)
def test_63x_488_stack_finds_a_lipid_droplet_at_its_true_position(world, pose):
    ld = world.lipid_droplets
    c = ld.center_um
    # an isolated, large droplet
    d = np.hypot(c[:, None, 0] - c[None, :, 0], c[:, None, 1] - c[None, :, 1])
    d[np.abs(c[:, None, 2] - c[None, :, 2]) > 2.5] = np.inf
    np.fill_diagonal(d, np.inf)
    ok = np.flatnonzero((d.min(1) > 1.5) & (ld.radius_um > 0.2))
    i = ok[np.argmax(ld.radius_um[ok])]
    target = c[i]

    core = build_simulated_core(world, pose, VirtualClock())
    ctx = microscope_of(core)
    core.setConfig("Objective", "63x")
    core.setConfig("Channel", "488")
    core.setExposure(50.0)
    p = core.getPixelSizeUm()
    assert p == pytest.approx(pixel_size_for("63x"))
    drop_stage = ctx.dish_to_stage(target[:2])
    stage = drop_stage + np.array([2.0, -1.5])
    core.setXYPosition(*stage)
    heights = target[2] + np.arange(-2.0, 2.01, 0.25)
    stack = []
    for hz in heights:
        core.setPosition(ctx.z_drive_for(float(hz), "63x", stage_xy=stage))
        stack.append(_snap(core))
    stack = np.array(stack)
    h, w = stack.shape[1:]
    pred = np.array([(w - 1) / 2, (h - 1) / 2]) + (drop_stage - stage) / p  # (col, row)
    smooth = ndi.gaussian_filter(stack, (0, 1.0, 1.0))
    r0, c0 = int(round(pred[1])), int(round(pred[0]))
    win = smooth[:, r0 - 6 : r0 + 7, c0 - 6 : c0 + 7]
    k, rr, cc = np.unravel_index(np.argmax(win), win.shape)
    assert abs(heights[k] - target[2]) <= 0.3
    plane = stack[k]
    rr, cc = rr + r0 - 6, cc + c0 - 6
    patch = plane[rr - 3 : rr + 4, cc - 3 : cc + 4]
    patch = np.clip(patch - np.median(plane), 0, None)
    yy, xx = np.mgrid[-3:4, -3:4]
    found = np.array([cc + (patch * xx).sum() / patch.sum(), rr + (patch * yy).sum() / patch.sum()])
    assert np.hypot(*(found - pred)) < 1.5, (found, pred)


def test_moves_outside_travel_are_refused_before_moving(world):
    clock = VirtualClock()
    core = build_simulated_core(world, DishPose(), clock)
    core.setXYPosition(1000.0, 2000.0)
    core.setPosition(2000.0)
    t0 = clock.now()
    with pytest.raises(Exception, match="outside the stage travel"):
        core.setXYPosition(60_000.0, 0.0)
    with pytest.raises(Exception, match="outside the focus travel"):
        core.setPosition(12_000.0)
    with pytest.raises(Exception, match="not a finite number"):
        core.setXYPosition(float("nan"), 0.0)
    assert core.getXYPosition() == pytest.approx((1000.0, 2000.0))
    assert core.getPosition() == pytest.approx(2000.0)
    assert clock.now() == t0
    assert float(core.getProperty("XYStage", "LimitXMax_um")) == 55_000.0
    assert float(core.getProperty("ZDrive", "LimitMax_um")) == 10_000.0


def test_move_and_exposure_time_go_to_the_clock(world):
    clock = VirtualClock()
    core = build_simulated_core(world, DishPose(), clock)
    core.setXYPosition(0.0, 0.0)
    t0 = clock.now()
    core.setXYPosition(10_000.0, 0.0)  # 10 mm at 10 mm/s, 0.1 s of ramps, 30 ms settling
    assert clock.now() - t0 == pytest.approx(1.0 + 0.1 + 0.03, abs=1e-5)
    t0 = clock.now()
    core.setXYPosition(10_050.0, 0.0)  # short move: triangular profile
    assert clock.now() - t0 == pytest.approx(2 * np.sqrt(50 / 100_000) + 0.03, abs=1e-5)
    t0 = clock.now()
    core.setPosition(core.getPosition() + 10.0)
    assert clock.now() - t0 == pytest.approx(0.01 + 0.005, abs=1e-5)
    core.setExposure(100.0)
    t0 = clock.now()
    core.snapImage()
    assert clock.now() - t0 == pytest.approx(0.1 + 512 * 10e-3 / 2048, abs=1e-5)


def test_objective_change_updates_pixel_size(world):
    core = build_simulated_core(world, DishPose(), VirtualClock())
    assert core.getPixelSizeUm() == pytest.approx(0.65)
    core.setConfig("Objective", "63x")
    assert core.getPixelSizeUm() == pytest.approx(6.5 / 63)
    core.setState("Objective", 0)
    assert core.getPixelSizeUm() == pytest.approx(0.65)
    core.setProperty("Camera", "Binning", "2")
    assert core.getPixelSizeUm() == pytest.approx(1.3)
    assert core.getImageWidth() == 256


def test_injected_faults_raise_like_a_failing_device(world):
    clock = VirtualClock()
    faults = ConfocalFaults()
    core = build_simulated_core(world, DishPose(), clock, faults)
    ctx = microscope_of(core)
    start = ctx.snap_count
    faults.drop_frames.add(start + 2)
    faults.camera_timeouts.add(start + 4)
    core.snapImage()
    core.snapImage()
    with pytest.raises(FrameDropped, match=f"#{start + 2}"):
        core.snapImage()
    core.snapImage()  # the retry is a new snap and arrives
    t0 = clock.now()
    with pytest.raises(CameraTimeout):
        core.snapImage()
    assert clock.now() - t0 == pytest.approx(faults.timeout_s, abs=1e-5)
    assert ctx.snap_count == start + 5
    before = core.getXYPosition()
    faults.xy_stage_errors.add(ctx.xy_move_count)
    with pytest.raises(StageError):
        core.setXYPosition(500.0, 500.0)
    assert core.getXYPosition() == pytest.approx(before)
    core.setXYPosition(500.0, 500.0)
    assert core.getXYPosition() == pytest.approx((500.0, 500.0))


def test_off_the_dish_the_camera_sees_blank_glass(world):
    core = build_simulated_core(world, DishPose(), VirtualClock())
    core.setXYPosition(-40_000.0, 30_000.0)
    img = _snap(core)
    assert img.std() < 0.05 * img.mean()


def test_useq_sequence_runs_on_the_simulated_core(world):
    core = build_simulated_core(world, DishPose(), VirtualClock())
    ctx = microscope_of(core)
    cell = world.cells[0]
    core.setConfig("Objective", "63x")
    x, y = ctx.dish_to_stage(cell.center_um)
    z = ctx.z_drive_for(3.0, "63x", stage_xy=(x, y))
    seq = useq.MDASequence(  # built right before it runs (useq caches iteration)
        stage_positions=[(float(x), float(y), float(z))],
        channels=[{"config": "488", "exposure": 20}, {"config": "405", "exposure": 20}],
        z_plan={"range": 2.0, "step": 0.5},
        axis_order="pzc",
    )
    frames = []
    core.mda.events.frameReady.connect(lambda img, ev, meta: frames.append((img.shape, dict(ev.index), ev.z_pos)))
    thread = core.run_mda(seq)
    thread.join(timeout=60)
    if thread.is_alive():
        core.mda.cancel()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(frames) == 10
    assert {f[1]["c"] for f in frames} == {0, 1} and {f[1]["z"] for f in frames} == set(range(5))
    assert all(f[0] == (512, 512) for f in frames)
    assert sorted({round(f[2], 3) for f in frames}) == pytest.approx(z + np.arange(-1.0, 1.01, 0.5))
    assert not [t for t in threading.enumerate() if t is thread]


def test_tl_frame_agrees_with_the_specimen_posed_overview(world):
    """Same pose, same stage point: the camera and render_posed_overview draw the same dish."""
    from clemflow.simulators.specimen.overview import render_posed_overview

    pose = DishPose(rotation_deg=-23.0, shift_um=(400.0, -900.0))
    core = build_simulated_core(world, pose, VirtualClock())
    ctx = microscope_of(core)
    pitch = world.grid.pitch_um
    c0, r0 = world.params.first_square
    stage = ctx.dish_to_stage([(c0 + 0.3) * pitch, (r0 + 0.1) * pitch])
    core.setXYPosition(*stage)
    core.setPosition(ctx.z_drive_for(0.0, "10x"))
    core.setExposure(20.0)
    ours = _snap(core)
    theirs, _ = render_posed_overview(world, pose, tuple(stage), 0.65, ours.shape, objective="10x", exposure_s=0.02)
    theirs = theirs.astype(float)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.98
    assert abs(ours.mean() - theirs.mean()) < 0.01 * theirs.mean()


def test_example_cfg_for_a_real_confocal_is_well_formed():
    """The real-instrument template cannot load here (no C++ adapters); check its commands and what clemflow needs."""
    from pathlib import Path

    from pymmcore_plus import CFGCommand

    path = Path(__file__).resolve().parents[1] / "drivers" / "confocal_example.cfg"
    arity = {"Device": 3, "Property": (2, 3), "Parent": 2, "Delay": 2, "FocusDirection": 2, "Label": 3,
             "ConfigGroup": (1, 4, 5), "ConfigPixelSize": 4, "PixelSize_um": 2, "PixelSizeAffine": 7}
    presets: dict[str, set[str]] = {}
    roles, pixel_configs, devices = {}, set(), set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cmd, *args = line.split(",")
        CFGCommand(cmd)  # a known Micro-Manager command
        want = arity[cmd]
        assert len(args) in (want if isinstance(want, tuple) else (want,)), line
        if cmd == "Device":
            devices.add(args[0])
        elif cmd == "ConfigGroup" and len(args) >= 4:
            presets.setdefault(args[0], set()).add(args[1])
            assert args[2] in devices | {"Core"}, line
        elif cmd == "Property" and args[0] == "Core":
            roles[args[1]] = args[2] if len(args) > 2 else ""
        elif cmd == "ConfigPixelSize":
            pixel_configs.add(args[0])
    assert presets["Channel"] == {"TL", "405", "488", "639"}
    assert presets["Objective"] == {"10x", "63x"}
    assert {"Camera", "XYStage", "Focus", "Shutter"} <= set(roles) and roles["ChannelGroup"] == "Channel"
    assert all(roles[r] in devices for r in ("Camera", "XYStage", "Focus", "Shutter"))
    assert len(pixel_configs) == 2


def test_a_dropped_frame_in_a_bare_mda_is_missing_not_shifted(world):
    """What the controller has to handle: pymmcore-plus logs the failed snap and goes on."""
    faults = ConfocalFaults()
    core = build_simulated_core(world, DishPose(), VirtualClock(), faults)
    ctx = microscope_of(core)
    core.setConfig("Objective", "63x")
    x, y = ctx.dish_to_stage(world.cells[0].center_um)
    z = ctx.z_drive_for(3.0, "63x", stage_xy=(x, y))
    seq = useq.MDASequence(stage_positions=[(float(x), float(y), float(z))], channels=["488"], z_plan={"range": 2.0, "step": 0.5}, axis_order="pzc")
    faults.drop_frames.add(ctx.snap_count + 2)
    seen = []
    core.mda.events.frameReady.connect(lambda img, ev, meta: seen.append(ev.index["z"]))
    core.mda.run(seq)
    assert seen == [0, 1, 3, 4]
