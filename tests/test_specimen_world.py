"""The simulated specimen: determinism, geometry, and uptake truth that follows the study's kinetics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.kinetics import UptakeKinetics
from clemflow.simulators.specimen.truth import cell_metrics, save_truth, summary, union_disc_area


def _arrays(world):
    out = {}
    for name in ("lipid_droplets", "endolysosomes", "clusters", "mitochondria"):
        obj = getattr(world, name)
        for field, value in vars(obj).items():
            out[f"{name}.{field}"] = value
    for c in world.cells:
        for field, value in vars(c).items():
            out[f"cell{c.id}.{field}"] = np.asarray(value)
    out["lm_to_em"] = world.lm_to_em
    return out


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(n_columns=2, n_rows=2, n_cells=12, hours_since_treatment=24.0), seed=11)


def test_same_seed_gives_bit_identical_world(world):
    again = generate_world(world.params, seed=11)
    a, b = _arrays(world), _arrays(again)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert json.dumps(world.truth()) == json.dumps(again.truth())


def test_different_seed_differs(world):
    other = generate_world(world.params, seed=12)
    assert not np.allclose(world.cells[0].center_um, other.cells[0].center_um)
    assert len(world.clusters.particles_um) != len(other.clusters.particles_um)


def test_cells_avoid_bars_and_each_other(world):
    grid = world.grid
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    for cell in world.cells:
        r = cell.footprint_radius(theta)
        assert r.max() <= cell.max_radius_um + 1e-9
        xs = cell.center_um[0] + r * np.cos(theta)
        ys = cell.center_um[1] + r * np.sin(theta)
        assert not any(grid.on_bar(x, y) for x, y in zip(xs, ys)), f"cell {cell.id} touches a bar"
        assert world.square_of_cell(cell) in world.params.squares
        # the outline is where rho = 1
        np.testing.assert_allclose(cell.rho(xs, ys), 1.0, atol=1e-9)
    m = cell_metrics(world)
    assert np.all(m["distance_to_bar_um"] > 0) and not m["touches_bar"].any()
    # footprints do not overlap: a fine lattice sees at most one cell per point
    x = np.linspace(*world.params.grid.pitch_um * np.array([3, 5]), 1200)
    hits = np.zeros((1200, 1200), int)
    for cell in world.cells:
        hits += cell.rho(x[None, :], x[:, None]) < 1
    assert hits.max() <= 1


def test_height_profile_and_contains(world):
    cell = world.cells[0]
    x0, y0, x1, y1 = cell.bbox_um
    xs, ys = np.linspace(x0, x1, 301), np.linspace(y0, y1, 301)
    h = cell.height_at(xs[None, :], ys[:, None])
    assert h.shape == (301, 301)
    assert 0 < h.max() <= cell.height_um and h.min() == 0.0
    assert 5.0 <= cell.height_um <= 8.0
    inside = cell.contains(xs[None, :], ys[:, None], 0.5 * h)
    assert np.array_equal(inside, h > 0)
    assert not cell.contains(cell.center_um[0], cell.center_um[1], cell.height_um + 0.1)
    # numerical volume matches the analytic one
    cell_area = (xs[1] - xs[0]) * (ys[1] - ys[0])
    assert abs(h.sum() * cell_area / cell.volume_um3() - 1) < 0.01
    assert abs((h > 0).sum() * cell_area / cell.area_um2() - 1) < 0.01
    # the nucleus sits inside the cell
    nb, nt = cell.nucleus_span_at(xs[None, :], ys[:, None])
    present = nt > nb
    assert present.any() and np.all(nt[present] < h[present]) and np.all(nb[present] > 0)


def _check_spheres_in_cells(world, spheres, membrane=0.0):
    for cell in world.cells:
        sel = spheres.cell_id == cell.id
        c, r = spheres.center_um[sel], spheres.radius_um[sel]
        if len(r) == 0:
            continue
        top = cell.height_at(c[:, 0], c[:, 1])
        assert np.all(c[:, 2] - r >= membrane - 1e-9)
        assert np.all(c[:, 2] + r <= top + 1e-9)
        assert not cell.in_nucleus(c[:, 0], c[:, 1], c[:, 2]).any()


def test_objects_inside_their_cells(world):
    assert 20 * len(world.cells) <= len(world.lipid_droplets) <= 100 * len(world.cells)
    d = 2 * world.lipid_droplets.radius_um
    assert d.min() >= 0.1 - 1e-9 and d.max() <= 1.0 + 1e-9
    _check_spheres_in_cells(world, world.lipid_droplets, membrane=0.1)
    _check_spheres_in_cells(world, world.endolysosomes, membrane=0.1)
    mt = world.mitochondria
    for ends in (mt.p0_um, mt.p1_um):
        for cell in world.cells:
            sel = mt.cell_id == cell.id
            e = ends[sel]
            assert cell.contains(e[:, 0], e[:, 1], e[:, 2]).all()
            assert not cell.in_nucleus(e[:, 0], e[:, 1], e[:, 2]).any()


def test_organelles_do_not_overlap(world):
    from scipy.spatial import cKDTree

    c = np.concatenate([world.lipid_droplets.center_um, world.endolysosomes.center_um])
    r = np.concatenate([world.lipid_droplets.radius_um, world.endolysosomes.radius_um])
    pairs = cKDTree(c).query_pairs(2 * r.max(), output_type="ndarray")
    gap = np.linalg.norm(c[pairs[:, 0]] - c[pairs[:, 1]], axis=1) - r[pairs[:, 0]] - r[pairs[:, 1]]
    assert gap.min() >= 0


def test_particles_pack_inside_clusters_and_lysosomes(world):
    cl = world.clusters
    assert len(cl) > 0
    d_nm = 2000 * cl.particle_radius_um
    assert d_nm.min() >= 50 - 1e-6 and d_nm.max() <= 60 + 1e-6
    assert np.array_equal(np.bincount(cl.particle_cluster, minlength=len(cl)), cl.n_particles)
    # every particle inside its cluster's envelope
    reach = np.linalg.norm(cl.particles_um - cl.center_um[cl.particle_cluster], axis=1) + cl.particle_radius_um
    assert np.all(reach <= cl.radius_um[cl.particle_cluster] + 1e-9)
    # no two particles overlap
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(cl.particles_um).query(cl.particles_um, k=2)
    gap = dist[:, 1] - cl.particle_radius_um - cl.particle_radius_um[idx[:, 1]]
    assert gap.min() >= 0
    # clusters in endolysosomes lie within them; free ones in the cytoplasm
    lys = cl.lysosome_index
    inside = lys >= 0
    assert inside.any() and (~inside).any()
    e = world.endolysosomes
    off = np.linalg.norm(cl.center_um[inside] - e.center_um[lys[inside]], axis=1)
    assert np.all(off + cl.radius_um[inside] <= e.radius_um[lys[inside]] + 1e-9)
    assert np.array_equal(cl.cell_id[inside], e.cell_id[lys[inside]])
    idx = cl.particles_of(np.array([0, 3]))
    assert np.all(np.isin(cl.particle_cluster[idx], [0, 3])) and len(idx) == cl.n_particles[[0, 3]].sum()


def test_lm_em_transform_round_trip(world):
    pts = np.random.default_rng(0).uniform(0, 3000, (50, 3))
    np.testing.assert_allclose(world.to_lm(world.to_em(pts)), pts, atol=1e-9)
    lin = world.lm_to_em[:3, :3]
    assert np.linalg.det(lin) < 0  # the block is seen from the former glass side: mirrored
    scale = abs(np.linalg.det(lin[:2, :2])) ** 0.5
    assert 0.95 <= scale <= 1.0


def test_spatial_lookup(world):
    cell = world.cells[3]
    near = world.cells_near(*cell.bbox_um)
    assert cell in near
    ids = world.cell_id_at(np.array([cell.center_um[0], 0.0]), np.array([cell.center_um[1], 0.0]))
    assert list(ids) == [cell.id, -1]
    idx = world.lipid_droplets.in_box(*cell.bbox_um)
    assert set(np.flatnonzero(world.lipid_droplets.cell_id == cell.id)) <= set(idx)


def test_union_disc_area_is_exact_for_known_shapes():
    d, r = 0.5, 0.5
    lens = 2 * r * r * np.arccos(d / (2 * r)) - d / 2 * np.sqrt(4 * r * r - d * d)
    area = union_disc_area(np.array([0, 0, 1]), np.array([0, 0.5, 3]), np.zeros(3), np.array([r, r, 0.2]), 2)
    np.testing.assert_allclose(area, [2 * np.pi * r * r - lens, np.pi * 0.04], rtol=2e-3)


@pytest.mark.parametrize("hours", [1.0, 6.0, 24.0, 48.0])
def test_uptake_follows_kinetics(hours):
    params = SpecimenParams(n_cells=40, hours_since_treatment=hours)
    world = generate_world(params, seed=int(hours) + 100)
    s = summary(cell_metrics(world))
    target = UptakeKinetics().at(hours)
    assert s["n_cells"] == 40
    # the world gives exactly the curve's share of cells particles, to the nearest cell
    assert abs(s["fraction_cells_with_particles"] - target.fraction_cells_with_particles) <= 0.5 / 40 + 1e-12
    # cell-to-cell CV 0.3 over 30-40 cells: the mean is within about 10 %; allow 20 %
    carriers = s["fraction_cells_with_particles"] / target.fraction_cells_with_particles
    assert s["mean_particle_area_fraction"] == pytest.approx(target.particle_area_fraction * carriers, rel=0.2)
    assert s["mean_fraction_particles_in_endolysosomes"] == pytest.approx(target.fraction_particles_in_endolysosomes, abs=0.1)
    assert s["mean_endolysosomal_volume_fraction"] == pytest.approx(target.endolysosomal_volume_fraction, rel=0.15)


def test_kinetics_curve_shape():
    k = UptakeKinetics()
    assert k.at(6).particle_area_fraction == pytest.approx(0.026)
    assert k.at(24).particle_area_fraction == pytest.approx(0.061)
    assert k.at(48).particle_area_fraction == pytest.approx(0.061)
    assert k.at(1).particle_area_fraction < k.at(2).particle_area_fraction < k.at(4).particle_area_fraction < 0.026
    assert k.at(1).fraction_cells_with_particles == pytest.approx(0.8)
    assert k.at(4).fraction_cells_with_particles == 1.0
    lyso = [k.at(h).fraction_particles_in_endolysosomes for h in (1, 2, 4, 6, 14, 24, 48)]
    assert lyso == sorted(lyso)
    vol = {h: k.at(h).endolysosomal_volume_fraction for h in (0, 2, 4, 6, 14, 24, 48)}
    assert vol[6] > vol[2] and vol[4] > vol[2] and vol[24] == pytest.approx(vol[0])


def test_controls_have_no_particles(tmp_path):
    world = generate_world(SpecimenParams(n_cells=10, n_columns=2, n_rows=2, hours_since_treatment=None), seed=5)
    assert len(world.clusters) == 0 and len(world.clusters.particles_um) == 0
    m = cell_metrics(world)
    assert not m["has_particles"].any() and np.all(m["particle_area_fraction"] == 0)
    assert m["endolysosomal_volume_fraction"].mean() == pytest.approx(0.02, rel=0.15)
    save_truth(world, tmp_path)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["summary"]["fraction_cells_with_particles"] == 0.0
    assert truth["params"]["hours_since_treatment"] is None


def test_save_truth_files(world, tmp_path):
    import csv

    save_truth(world, tmp_path, particles=True)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["seed"] == 11 and len(truth["cells"]) == len(world.cells)
    np.testing.assert_allclose(np.array(truth["frames"]["lm_to_em"]), world.lm_to_em)
    with open(tmp_path / "objects.csv") as fh:
        rows = list(csv.DictReader(fh))
    n = len(world.lipid_droplets) + len(world.endolysosomes) + len(world.clusters)
    assert len(rows) == n
    row = next(r for r in rows if r["class"] == "lipid_droplet" and r["id"] == "0")
    c = world.lipid_droplets.center_um[0]
    assert float(row["x_um"]) == pytest.approx(c[0], abs=1e-6)
    np.testing.assert_allclose([float(row[k]) for k in ("x_em_um", "y_em_um", "z_em_um")], world.to_em(c[None])[0], atol=1e-5)
    with open(tmp_path / "cells.csv") as fh:
        cells = list(csv.DictReader(fh))
    assert len(cells) == len(world.cells)
    assert abs(float(cells[0]["particle_area_fraction"]) - truth["cells"][0]["particle_area_fraction"]) < 1e-5
    p = np.load(tmp_path / "particles.npz")
    assert p["position_um"].shape == world.clusters.particles_um.shape
