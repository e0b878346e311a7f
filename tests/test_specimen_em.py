"""The FIB-SEM renderer of the ground-truth specimen: determinism, physics of the noise,
continuity between slices, drift truth, and organelles where the world says they are."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.registration import phase_cross_correlation

from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.em import (
    DriftModel,
    EMImperfections,
    FaceGeometry,
    face_coordinates,
    face_through,
    render_em_slice,
)
from clemflow.simulators.specimen.em_geometry import face_frame
from clemflow.simulators.specimen.em_overview import render_ion_image, render_sem_overview


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=3), seed=3)


@pytest.fixture(scope="module")
def nucleus_face(world):
    """A face through the first cell's nucleus centre; image centre on the nucleus edge region."""
    c = world.cells[0]
    return face_through(world, c.nucleus_center_um)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(float) - a.mean()
    b = b.astype(float) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_face_frame_round_trip(world):
    frame = face_frame(world.lm_to_em, FaceGeometry((10.0, -5.0), 33.0))
    p = np.random.default_rng(0).normal(0, 20, (10, 3))
    assert np.allclose(frame.face_to_block(frame.block_to_face(p)), p)
    # dish -> face through the block agrees with the direct dish map
    d = world.to_lm(p)
    assert np.allclose(frame.face_to_dish(frame.block_to_face(p)), d)
    # depth v grows into the resin, i.e. with height above the glass
    c = world.cells[0]
    top, base = np.array([[*c.center_um, 5.0]]), np.array([[*c.center_um, 0.0]])
    face = face_through(world, base[0])
    assert face_coordinates(world, top, face)[0, 2] > face_coordinates(world, base, face)[0, 2] + 4.0


def test_same_seed_bit_identical(world, nucleus_face):
    kw = dict(pixel_size_nm=10.0, shape=(256, 192), face=nucleus_face, seed=7)
    a, ma = render_em_slice(world, 0.2, (0.0, 2.0), **kw)
    b, mb = render_em_slice(world, 0.2, (0.0, 2.0), **kw)
    c, _ = render_em_slice(world, 0.2, (0.0, 2.0), **{**kw, "seed": 8})
    assert a.dtype == np.uint8 and a.shape == (192, 256)
    assert np.array_equal(a, b) and ma == mb
    assert not np.array_equal(a, c)


def test_neighbouring_slices_more_alike_than_distant(world, nucleus_face):
    kw = dict(pixel_size_nm=5.0, shape=(256, 256), face=nucleus_face, dwell_s=20e-6, seed=1)
    ref, _ = render_em_slice(world, 0.0, (1.0, 2.6), **kw)
    near, _ = render_em_slice(world, 0.015, (1.0, 2.6), **{**kw, "seed": 2})
    far, _ = render_em_slice(world, 0.150, (1.0, 2.6), **{**kw, "seed": 3})
    assert _ncc(ref, near) > _ncc(ref, far) + 0.1


def test_noise_sd_scales_with_inverse_sqrt_dose(world, nucleus_face):
    def sd(dwell: float, lines: int) -> float:
        kw = dict(pixel_size_nm=10.0, shape=(256, 256), face=nucleus_face, dwell_s=dwell, line_averaging=lines,
                  dtype="uint16")
        a, _ = render_em_slice(world, 0.1, (0.0, 2.0), seed=11, **kw)
        b, _ = render_em_slice(world, 0.1, (0.0, 2.0), seed=12, **kw)
        return float(np.std(a.astype(float) - b.astype(float)) / np.sqrt(2))

    base = sd(0.2e-6, 1)
    assert sd(0.8e-6, 1) == pytest.approx(base / 2, rel=0.1)
    assert sd(0.4e-6, 2) == pytest.approx(base / 2, rel=0.1)
    assert sd(0.2e-6, 9) == pytest.approx(base / 3, rel=0.1)


def test_drift_moves_image_by_recorded_amount(world, nucleus_face):
    imp = EMImperfections(drift=True, drift_step_nm=25.0, drift_jump_probability=0.0)
    model = DriftModel.from_config(5, imp)
    kw = dict(pixel_size_nm=10.0, shape=(256, 256), face=nucleus_face, dwell_s=50e-6, seed=4)
    still, _ = render_em_slice(world, 0.3, (2.0, 2.0), **kw)
    moved, meta = render_em_slice(world, 0.3, (2.0, 2.0), imperfections=imp, drift_model=model, slice_index=6, **kw)
    expected = np.array(meta["drift"]["image_shift_px"])
    assert np.hypot(*expected) > 3  # a real shift, not a trivial one
    # phase_cross_correlation returns the shift that registers `moved` onto `still`: minus the displacement
    shift, _, _ = phase_cross_correlation(still.astype(float), moved.astype(float), upsample_factor=100)
    assert np.allclose(-shift, expected, atol=0.1)
    # the same as rendering the face at the drifted centre: the drift is exactly the recorded beam offset
    bx, by = meta["drift"]["beam_offset_nm"]
    offset, _ = render_em_slice(world, 0.3, (2.0 + bx * 1e-3, 2.0 + by * 1e-3), slice_index=6, **kw)
    assert np.abs(offset.astype(int) - moved.astype(int)).max() <= 1
    # deterministic and order-independent
    assert DriftModel.from_config(5, imp).offset_nm(6) == model.offset_nm(6)


def test_lipid_droplets_found_where_the_world_puts_them(world):
    ld = world.lipid_droplets
    # a droplet of a decent size as the target, the stack around it
    k = int(np.argmax(np.where(ld.cell_id == ld.cell_id[0], ld.radius_um, 0)))
    face = face_through(world, ld.center_um[k])
    s_c, u_c, v_c = face_coordinates(world, ld.center_um[k : k + 1], face)[0]
    pix, step, n, shape = 0.02, 0.05, 40, (300, 200)
    depths = s_c + (np.arange(n) - n / 2) * step
    stack = np.stack(
        [render_em_slice(world, s, (u_c, v_c), pixel_size_nm=20.0, shape=shape, face=face, seed=i)[0]
         for i, s in enumerate(depths)]
    )
    smooth = ndimage.gaussian_filter(stack.astype(float), (0.5, 1.0, 1.0))
    labels, count = ndimage.label(smooth < 90)
    sizes = ndimage.sum(np.ones_like(smooth), labels, np.arange(1, count + 1))
    big = np.flatnonzero(sizes > 150) + 1
    cents = np.array(ndimage.center_of_mass(smooth < 90, labels, big))  # (slice, row, col)
    found_s = depths[0] + cents[:, 0] * step
    found_u = u_c + (cents[:, 2] - (shape[0] - 1) / 2) * pix
    found_v = v_c + (cents[:, 1] - (shape[1] - 1) / 2) * pix
    # truth: every droplet whose sphere lies wholly inside the imaged volume
    suv = face_coordinates(world, ld.center_um, face)
    r = ld.radius_um * 0.97
    half_u, half_v = shape[0] / 2 * pix, shape[1] / 2 * pix
    inside = (
        (suv[:, 0] - r > depths[0]) & (suv[:, 0] + r < depths[-1])
        & (np.abs(suv[:, 1] - u_c) + r < half_u) & (np.abs(suv[:, 2] - v_c) + r < half_v)
    )
    assert inside.sum() >= 1
    for s, u, v in suv[inside]:
        d_plane = np.hypot(found_u - u, found_v - v)
        j = int(np.argmin(d_plane + np.abs(found_s - s)))
        assert d_plane[j] < 2 * pix, f"droplet at {(s, u, v)} found {d_plane[j] / pix:.2f} px off"
        assert abs(found_s[j] - s) < 2 * step


def test_particles_are_the_densest_features(world):
    cl = world.clusters
    assert len(cl.particles_um) > 0
    p = cl.particles_um[0]
    face = face_through(world, p)
    s, u, v = face_coordinates(world, p[None], face)[0]
    img, _ = render_em_slice(world, s, (u, v), pixel_size_nm=5.0, shape=(400, 400), face=face, dwell_s=20e-6, seed=2)
    c = 199.5
    yy, xx = np.mgrid[:400, :400]
    r2 = (yy - c) ** 2 + (xx - c) ** 2
    particle = img[r2 < 9].mean()
    # the rest of the block below the surface (rows with v > 0.1 µm), away from any particle
    rows_v = v + (np.arange(400) - c) * 0.005
    block = img[rows_v > 0.1]
    assert particle <= np.percentile(block, 1)
    assert particle < 40  # near black in the inverted display
    # denser than a lipid droplet, the densest organelle
    ld = world.lipid_droplets
    k = int(np.argmax(ld.radius_um))
    lface = face_through(world, ld.center_um[k])
    ls, lu, lv = face_coordinates(world, ld.center_um[k : k + 1], lface)[0]
    limg, _ = render_em_slice(world, ls, (lu, lv), pixel_size_nm=5.0, shape=(64, 64), face=lface, dwell_s=20e-6, seed=2)
    assert particle < limg[24:40, 24:40].mean() - 20


def test_imperfections_recorded_and_visible(world, nucleus_face):
    kw = dict(pixel_size_nm=10.0, shape=(256, 256), face=nucleus_face, dwell_s=20e-6, seed=3)
    clean, _ = render_em_slice(world, 0.1, (0.0, 2.0), **kw)
    imp = EMImperfections(charging=True, curtaining=True, focus_error_um=4.0, stigmator_error_um=(1.0, 0.5))
    dirty, meta = render_em_slice(world, 0.1, (0.0, 2.0), imperfections=imp, **kw)
    assert {"charging", "curtaining", "blur"} <= meta.keys()
    assert meta["blur"]["sigma_major_nm"] > meta["blur"]["sigma_minor_nm"] > 0
    assert not np.array_equal(clean, dirty)
    # defocus removes fine detail: less high-frequency power with the same dose
    def lap(im: np.ndarray) -> float:
        return float(ndimage.laplace(im.astype(float)).std())

    blurred, _ = render_em_slice(world, 0.1, (0.0, 2.0), imperfections=EMImperfections(focus_error_um=8.0),
                                 **{**kw, "dwell_s": 2e-3})
    sharp, _ = render_em_slice(world, 0.1, (0.0, 2.0), **{**kw, "dwell_s": 2e-3})
    assert lap(blurred) < 0.8 * lap(sharp)


def test_overview_and_ion_images(world):
    x0 = world.grid.pitch_um * world.params.first_square[0]
    y0 = world.grid.pitch_um * world.params.first_square[1]
    b = world.to_em(np.array([[x0, y0, 0.0]]))[0]  # a bar crossing
    img, meta = render_sem_overview(world, (b[0], b[1]), 2.0, (256, 256), dwell_s=1e-4, seed=1)
    img2, _ = render_sem_overview(world, (b[0], b[1]), 2.0, (256, 256), dwell_s=1e-4, seed=1)
    assert img.dtype == np.uint8 and img.shape == (256, 256) and np.array_equal(img, img2)
    # the bars show as edges: more gradient energy near the crossing than in a square's interior
    far, _ = render_sem_overview(world, (b[0] + 250.0, b[1] + 250.0), 2.0, (64, 64), dwell_s=1e-4, seed=1)
    assert ndimage.sobel(img.astype(float)).std() > ndimage.sobel(far.astype(float)).std()
    ion, m = render_ion_image(world, (b[0], b[1]), 0.1, (128, 96), incidence_deg=54.0, milled=[(-1e9, -1e9, -1e9, -1e9)])
    assert ion.shape == (96, 128) and m["row_pitch_um"] > m["pixel_size_um"]
