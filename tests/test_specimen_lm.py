"""Light-microscope renderer: determinism, noise model, droplets where the truth puts them, readable labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.glyphs import glyph_bitmap, label_text
from clemflow.simulators.specimen.lm import (
    OBJECTIVES,
    Camera,
    expected_lm,
    field_coordinates,
    psf_sigmas,
    render_lm,
    render_lm_stack,
)


@pytest.fixture(scope="module")
def world():
    params = SpecimenParams(n_cells=6, n_columns=2, n_rows=1, hours_since_treatment=6.0)
    return generate_world(params, seed=21)


@pytest.fixture(scope="module")
def bodipy_world():
    params = SpecimenParams(n_cells=3, n_columns=1, n_rows=1, hours_since_treatment=None, stains=("bodipy",))
    return generate_world(params, seed=7)


def test_same_seed_same_frame_other_seed_differs(world):
    cell = world.cells[0]
    a = render_lm(world, *cell.center_um, 2.0, "63x", "639", 0.1, (256, 256), rng=3)
    b = render_lm(generate_world(world.params, 21), *cell.center_um, 2.0, "63x", "639", 0.1, (256, 256), rng=3)
    c = render_lm(world, *cell.center_um, 2.0, "63x", "639", 0.1, (256, 256), rng=4)
    assert a.dtype == np.uint16 and a.shape == (256, 256)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pixel_geometry_centre_is_stage():
    xs, ys = field_coordinates(100.0, 200.0, (4, 6), 0.5)
    assert xs.mean() == pytest.approx(100.0) and ys.mean() == pytest.approx(200.0)
    assert xs[1] - xs[0] == pytest.approx(0.5) and ys[-1] > ys[0]
    assert OBJECTIVES["63x"].pixel_um == pytest.approx(0.103, abs=0.001)
    assert OBJECTIVES["10x"].pixel_um == pytest.approx(0.65)
    lat, ax = psf_sigmas(OBJECTIVES["63x"], "488")
    assert lat == pytest.approx(0.21 * 0.52 / 1.4) and ax == pytest.approx(0.66 * 0.52 * 1.518 / 1.4**2)


def test_background_noise_is_poisson_plus_read_noise(world):
    cam = Camera()
    x, y = world.grid.square_center_um("0A")  # far outside the cell region: background only
    exposure = 0.2
    img = render_lm(world, x, y, 2.0, "63x", "639", exposure, (384, 384), rng=5, camera=cam).astype(float)
    electrons = cam.background_e_per_s["639"] * exposure
    mean_adu = cam.offset_adu + electrons / cam.gain_e_per_adu
    var_adu = (electrons + cam.read_noise_e**2) / cam.gain_e_per_adu**2
    assert img.mean() == pytest.approx(mean_adu, rel=0.01)
    assert img.var() == pytest.approx(var_adu, rel=0.04)
    # and the mean signal scales with exposure
    mean1 = expected_lm(world, *world.cells[0].center_um, 2.0, "63x", "488", 0.1, (128, 128))
    mean2 = expected_lm(world, *world.cells[0].center_um, 2.0, "63x", "488", 0.3, (128, 128))
    np.testing.assert_allclose(mean2, 3 * mean1, rtol=1e-12)


def test_stains_decide_what_fluoresces(world, bodipy_world):
    cell = bodipy_world.cells[0]
    # only BODIPY applied: the 405 and 639 channels see background alone
    for ch in ("405", "639"):
        mean = expected_lm(bodipy_world, *cell.center_um, 1.5, "63x", ch, 0.1, (128, 128))
        assert np.ptp(mean) < 1e-9
    mean = expected_lm(bodipy_world, *cell.center_um, 1.5, "63x", "488", 0.1, (256, 256))
    assert np.ptp(mean) > 50
    # particles light up the 639 channel where the clusters are
    c = world.cells[0]
    mean = expected_lm(world, *c.center_um, 2.0, "63x", "639", 0.1, (256, 256))
    assert mean.max() > 10 * Camera().background_e_per_s["639"] * 0.1


def _parabola_offset(a_minus, a0, a_plus):
    la, l0, lp = np.log(np.maximum([a_minus, a0, a_plus], 1e-3))
    den = la - 2 * l0 + lp
    return np.where(den < 0, 0.5 * (la - lp) / den, 0.0)


def test_droplets_found_at_their_true_positions(bodipy_world):
    world = bodipy_world
    cell = world.cells[0]
    obj = OBJECTIVES["63x"]
    cam = Camera()
    size = int(np.ceil(2 * cell.max_radius_um / obj.pixel_um / 32 + 0.5) * 32)
    dz = 0.15
    z = np.arange(0.0, cell.height_um + 0.5, dz)
    stack = render_lm_stack(world, *cell.center_um, z, obj, "488", 0.1, (size, size), rng=1, camera=cam)
    e = (stack.astype(float) - cam.offset_adu) * cam.gain_e_per_adu
    # remove the smooth cytoplasm and background, keep the puncta
    smooth = ndimage.gaussian_filter(e, (0.6, 1.0, 1.0))
    local_bg = ndimage.uniform_filter(ndimage.grey_opening(smooth, size=(1, 9, 9)), size=(1, 9, 9))
    sig = smooth - local_bg
    peaks = (sig == ndimage.maximum_filter(sig, size=(3, 5, 5))) & (sig > 60)
    pk = np.argwhere(peaks)
    k, i, j = pk.T
    ok = (k > 0) & (k < len(z) - 1) & (i > 0) & (i < size - 1) & (j > 0) & (j < size - 1)
    k, i, j = k[ok], i[ok], j[ok]
    fz = _parabola_offset(sig[k - 1, i, j], sig[k, i, j], sig[k + 1, i, j])
    fy = _parabola_offset(sig[k, i - 1, j], sig[k, i, j], sig[k, i + 1, j])
    fx = _parabola_offset(sig[k, i, j - 1], sig[k, i, j], sig[k, i, j + 1])
    xs, ys = field_coordinates(*cell.center_um, (size, size), obj.pixel_um)
    found = np.column_stack([xs[0] + (j + fx) * obj.pixel_um, ys[0] + (i + fy) * obj.pixel_um, z[0] + (k + fz) * dz])

    ld = world.lipid_droplets
    mine = ld.cell_id == cell.id
    truth = ld.center_um[mine]
    # judge droplets with no neighbour within the resolution (they merge in any light microscope)
    nn = cKDTree(truth).query(truth, k=2)[0][:, 1] if len(truth) > 1 else np.full(len(truth), np.inf)
    lateral_nn = cKDTree(truth[:, :2]).query(truth[:, :2], k=2)[0][:, 1]
    isolated = (nn > 1.0) & (lateral_nn > 0.5)
    assert isolated.sum() >= 10
    tree = cKDTree(found * [1, 1, 0.4])  # axial distances count less: the PSF is longer in z
    dist, idx = tree.query(truth[isolated] * [1, 1, 0.4], distance_upper_bound=0.35)
    hit = np.isfinite(dist)
    assert hit.mean() >= 0.85
    err = found[idx[hit]] - truth[isolated][hit]
    lateral = np.hypot(err[:, 0], err[:, 1])
    axial = np.abs(err[:, 2])
    print(f"{hit.sum()} of {isolated.sum()} droplets; median error lateral {np.median(lateral) * 1e3:.0f} nm, axial {np.median(axial) * 1e3:.0f} nm")
    assert np.median(lateral) < 0.10
    assert np.median(axial) < 0.30
    # few spurious detections: almost every detection is a droplet
    d_any, _ = cKDTree(truth).query(found)
    assert np.mean(d_any < 0.6) >= 0.85


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_transmitted_light_shows_bars_and_readable_labels(world):
    obj = OBJECTIVES["10x"]
    col, row = world.params.first_square
    label = world.grid.label(col, row)
    cx, cy = world.grid.square_center_um(label)
    img = render_lm(world, cx, cy, 0.0, obj, "TL", 0.02, (1024, 1024), rng=2).astype(float)
    xs, ys = field_coordinates(cx, cy, img.shape, obj.pixel_um)
    pitch = world.grid.pitch_um
    bar_col = np.argmin(np.abs(xs - col * pitch))
    clear_col = np.argmin(np.abs(xs - (col * pitch + 100)))
    rows = slice(700, 800)  # below the label
    assert img[rows, bar_col].mean() < 0.7 * img[rows, clear_col].mean()
    # the label reads back by template matching against its neighbours' labels
    height_px = world.params.label_height_um / obj.pixel_um
    scores = {}
    for dc in (-1, 0, 1):
        for dr in (-1, 0, 1):
            text = label_text(world, col + dc, row + dr)
            bmp = glyph_bitmap(text)
            tpl = ndimage.zoom(bmp, height_px / (bmp.shape[0] - 4), order=1)
            th, tw = tpl.shape
            r0, c0 = 512 - th // 2, 512 - tw // 2
            patch = -img[r0 : r0 + th, c0 : c0 + tw]
            scores[text] = _ncc(patch, tpl)
    best = max(scores, key=scores.get)
    assert best == label_text(world, col, row)
    assert scores[best] > 0.8
