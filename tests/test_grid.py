"""Grid finding and relocation, measured against the simulated specimen's truth and a real SEM image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clemflow.grid.find import GridNotFound, find_grid
from clemflow.grid.lattice import find_lattice
from clemflow.grid.registration import CameraGeometry, ImageView, register_grid
from clemflow.protocol.grid_scheme import MATTEK
from clemflow.simulators.specimen.lm import Objective
from clemflow.simulators.specimen.overview import Damage, DishPose, render_posed_overview
from clemflow.simulators.specimen.world import SpecimenParams, generate_world

# 10x with 2x2 camera binning: 1.3 µm pixels keep the renders fast.
BINNED_10X = Objective("10x Plan-Apo 0.3 air, bin 2", 10.0, 0.3, 1.0, camera_pixel_um=13.0)
PIXEL = BINNED_10X.pixel_um
SHAPE = (1024, 1024)


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(n_columns=4, n_rows=4, first_square=(2, 1), cells_per_square=3), seed=11)


def _view(world, pose, dish_xy, damage=Damage(), seed=0, pixel_true=PIXEL):
    """Image centred on a dish point; the camera's true pixel may differ from the nominal PIXEL."""
    stage = tuple(pose.dish_to_stage(np.array([dish_xy]))[0])
    image, truth = render_posed_overview(
        world, pose, stage, pixel_true, SHAPE, objective=BINNED_10X, damage=damage, rng=seed
    )
    return image, stage


def _true_dish(pose, view_stage, xy_px, pixel=PIXEL):
    h, w = SHAPE
    stage = np.asarray(view_stage) + (np.asarray(xy_px) - [(w - 1) / 2, (h - 1) / 2]) * pixel
    return pose.stage_to_dish(stage)


POSES = [
    DishPose(0.0, (0.0, 0.0), False, 1.0),
    DishPose(37.0, (1500.0, -800.0), True, 1.0),
    DishPose(123.5, (-400.0, 2500.0), False, 1.0),
    DishPose(290.0, (200.0, 300.0), True, 1.0),
]


@pytest.mark.parametrize("pose", POSES, ids=["upright", "rot37-mirror", "rot123", "rot290-mirror"])
def test_any_rotation_and_mirror(world, pose):
    image, stage = _view(world, pose, (1850.0, 1150.0), seed=1)
    finding = find_grid(image, PIXEL, MATTEK)
    assert finding.labelled
    assert finding.mirrored == pose.mirror
    # every reported crossing lies on bar centre lines of the true dish frame, within a micrometre
    for crossing in finding.crossings():
        dish = _true_dish(pose, stage, [crossing["x"], crossing["y"]])
        assert np.all(np.abs(dish - np.round(dish / 600.0) * 600.0) < 1.0), dish
    # every square is labelled with the square it really is
    squares = finding.squares()
    assert len(squares) >= 2
    for square in squares:
        dish = _true_dish(pose, stage, [square["x"], square["y"]])
        assert square["label"] == MATTEK.label(int(dish[0] // 600), int(dish[1] // 600))
    # the grid's x axis points where the pose put it
    expected = (pose.rotation_deg + (180.0 if pose.mirror else 0.0)) % 360.0
    assert abs((finding.angle_deg - expected + 180) % 360 - 180) < 0.2


def test_hidden_bars_and_unreadable_glyphs(world):
    pose = DishPose(211.0, (900.0, 100.0), False, 1.0)
    image, stage = _view(world, pose, (2150.0, 1450.0), damage=Damage(bar_fraction=0.2, glyphs_hidden=1, seed=5), seed=2)
    finding = find_grid(image, PIXEL, MATTEK)
    assert finding.labelled
    for square in finding.squares():
        dish = _true_dish(pose, stage, [square["x"], square["y"]])
        assert square["label"] == MATTEK.label(int(dish[0] // 600), int(dish[1] // 600))
    view = ImageView(SHAPE, stage, CameraGeometry(PIXEL))
    registration = register_grid([(image, view, finding)])
    centre = registration.to_grid(np.array(stage))
    assert np.linalg.norm(centre - np.array([2150.0, 1450.0])) < 1.5


def test_same_cell_found_after_dish_moved(world):
    """A cell picked at one timepoint is found again after the dish was taken out and put back."""
    cell = world.cells[5]
    target = np.array(cell.center_um, float)
    before = DishPose(12.0, (100.0, 50.0), False, 1.0)
    after = DishPose(97.0, (-350.0, 610.0), False, 1.0)  # rotated and shifted on the stage
    regs = []
    for pose, seed in ((before, 3), (after, 4)):
        image, stage = _view(world, pose, target + [120.0, -90.0], seed=seed)  # the view is not centred on the cell
        finding = find_grid(image, PIXEL, MATTEK)
        view = ImageView(SHAPE, stage, CameraGeometry(PIXEL))
        regs.append(register_grid([(image, view, finding)]))
    # at the first timepoint the cell is recorded by its stage position, then as square + offset
    position = regs[0].locate(before.dish_to_stage(target[None])[0])
    predicted_stage = regs[1].stage_of(position)
    true_stage = after.dish_to_stage(target[None])[0]
    error = np.linalg.norm(predicted_stage - true_stage)
    assert error < 2.0, error
    assert regs[1].predicted_error_um(predicted_stage) < 3.0


def test_lm_to_em_relocation_through_the_sem_overview(world):
    """A target from the confocal's grid coordinates is found on the SEM overview of the embedded block."""
    from clemflow.simulators.specimen.em_overview import render_sem_overview

    target = np.array(world.cells[3].center_um, float)
    block = world.to_em(np.array([[*target, 0.0]]))[0]
    centre = (float(block[0]) + 60.0, float(block[1]) - 40.0)  # overview roughly on the target
    pixel = 1.0  # a 2 mm field: several rows and columns of squares, so their labels decide the orientation
    image, _ = render_sem_overview(world, centre, pixel, (2048, 2048), dwell_s=4e-6, seed=3)
    finding = find_grid(image, pixel, MATTEK)
    assert finding.labelled and finding.mirrored  # the block face is seen from the glass side
    view = ImageView((2048, 2048), centre, CameraGeometry(pixel))
    registration = register_grid([(image, view, finding)])
    from clemflow.grid.registration import GridPosition

    em_stage = registration.stage_of(GridPosition.from_grid_um(MATTEK, target))
    assert np.linalg.norm(em_stage - block[:2]) < 1.5


@pytest.mark.parametrize("kind", ["blank", "noise", "cells"])
def test_no_grid_is_refused(world, kind, tmp_path, cli):
    import tifffile

    rng = np.random.default_rng(0)
    if kind == "blank":
        image = np.full((512, 512), 1000, np.uint16)
    elif kind == "noise":
        image = rng.poisson(1000, (768, 768)).astype(np.uint16)
    else:  # a field inside one square: cells, no bars
        from clemflow.simulators.specimen.lm import render_lm

        cell = world.cells[0]
        image = render_lm(world, cell.center_um[0], cell.center_um[1], 2.0, "63x", "TL", 0.02, (1024, 1024), rng=1)
    path = tmp_path / f"{kind}.tif"
    tifffile.imwrite(path, image)
    code, output = cli("grid", "find", path, "--pixel-size", "0.65", "--json")
    assert code == 3, output
    report = json.loads(output)
    assert report["found"] is False and report["reason"]


def test_real_cells_only_image_is_refused(shared_data):
    import tifffile

    hela = tifffile.imread(shared_data / "hela_lyso_mito_nuc.tif")
    for channel in range(hela.shape[-1]):
        with pytest.raises(GridNotFound):
            find_grid(hela[..., channel], 0.65, MATTEK)


def test_real_sem_grid_crossing(shared_data):
    """The crossing on the real Atlas SEM image, against an independent estimate of its four bar edges.

    The reference is Canny edges + a Hough transform (skimage), whose four strongest lines are the two
    edges of each bar (checked by eye on a zoomed overlay); the crossing of the two bar centre lines is
    the reference crossing. The pixel size was not recorded, so none is given.
    """
    import tifffile
    from skimage.feature import canny
    from skimage.transform import hough_line, hough_line_peaks

    image = tifffile.imread(shared_data / "sem_mattek_grid_surface.tif").astype(float)
    lattice = find_lattice(image, None, None)
    idx, xy = lattice.crossings()
    assert len(xy) == 1

    accumulator, angles, distances = hough_line(canny(image, sigma=2.5), np.deg2rad(np.arange(-90, 90, 0.25)))
    _, peak_angles, peak_distances = hough_line_peaks(accumulator, angles, distances, num_peaks=4, min_distance=8, min_angle=2)
    by_direction: dict[int, list[tuple[float, float]]] = {}
    for angle, distance in zip(peak_angles, peak_distances):
        by_direction.setdefault(int(np.round(np.rad2deg(angle) / 10)), []).append((angle, distance))
    assert len(by_direction) == 2 and all(len(v) == 2 for v in by_direction.values())
    normals, offsets = [], []
    for edges in by_direction.values():
        angle = float(np.mean([a for a, _ in edges]))
        normals.append([np.cos(angle), np.sin(angle)])
        offsets.append(float(np.mean([d for _, d in edges])))
    reference = np.linalg.solve(np.array(normals), np.array(offsets))
    assert np.linalg.norm(xy[0] - reference) < 2.0, (xy[0], reference)
    found = sorted(f.angle_deg % 180 for f in lattice.families)
    expected = sorted(float(np.rad2deg(np.arctan2(n[1], n[0]))) % 180 for n in normals)
    assert np.allclose(found, expected, atol=1.0)


def test_cli_json_shape(world, tmp_path, cli):
    import tifffile

    pose = DishPose(20.0, (0.0, 0.0), False, 1.0)
    image, _ = _view(world, pose, (1850.0, 1150.0), seed=7)
    path = tmp_path / "overview.tif"
    tifffile.imwrite(path, image)
    code, output = cli("grid", "find", path, "--pixel-size", str(PIXEL), "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["found"] is True and isinstance(report["mirrored"], bool)
    assert {"angle_deg", "pitch_px", "crossings", "squares"} <= set(report)
    assert abs(report["pitch_px"] - 600.0 / PIXEL) < 2.0
    assert all({"x", "y"} <= set(c) for c in report["crossings"])
    assert all({"label", "x", "y", "confidence"} <= set(s) for s in report["squares"])


def test_cli_relocate_between_two_sessions(world, tmp_path, cli):
    """`clemflow grid relocate` carries a clicked point to the image taken after the dish was moved."""
    import tifffile

    target = np.array(world.cells[7].center_um, float)
    before = DishPose(5.0, (0.0, 0.0), False, 1.0)
    after = DishPose(-70.0, (300.0, -200.0), False, 1.0)
    paths, stages = [], []
    for pose, seed in ((before, 8), (after, 9)):
        image, stage = _view(world, pose, target + [90.0, 60.0], seed=seed)
        path = tmp_path / f"view{seed}.tif"
        tifffile.imwrite(path, image)
        paths.append(path)
        stages.append(stage)
    h, w = SHAPE
    click = (before.dish_to_stage(target[None])[0] - stages[0]) / PIXEL + [(w - 1) / 2, (h - 1) / 2]
    code, output = cli(
        "grid", "relocate", paths[0], paths[1], "--source-pixel-size", str(PIXEL), "--destination-pixel-size", str(PIXEL),
        "--point", f"{click[0]},{click[1]}", "--source-stage", f"{stages[0][0]},{stages[0][1]}",
        "--destination-stage", f"{stages[1][0]},{stages[1][1]}", "--json",
    )
    assert code == 0, output
    (point,) = json.loads(output)["points"]
    truth = after.dish_to_stage(target[None])[0]
    assert np.linalg.norm(np.array(point["destination_stage_um"]) - truth) < 2.0
    assert point["predicted_error_um"] < 3.0


def test_targets_file_round_trip(tmp_path):
    from clemflow.grid.targets import Target, TargetsFile, read_targets, write_targets

    targets = TargetsFile(targets=[Target(name="c1", sample="D1", label="3C", offset_um=(12.5, -4.0), lm_stage_um=(1.0, 2.0))])
    write_targets(tmp_path / "targets.json", targets)
    assert read_targets(tmp_path / "targets.json") == targets
    assert not (tmp_path / "targets.json.tmp").exists()
