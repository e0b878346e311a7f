"""Lipid-droplet detection against the specimen's truth, in the confocal stack and in the EM volume.

One correlative pair (the middle half of the target cell milled) serves every test. Recall counts the
cell's droplets of 0.4 µm and more inside the volume; precision counts detections within 0.3 µm of any
droplet of the world (a neighbour's droplets are droplets too); centre errors are split into lateral (x, y)
and axial (z), in µm of each volume's own frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from clemflow.correlate.blobs import Blobs
from clemflow.correlate.detect_em import detect_em_droplets
from clemflow.correlate.detect_lm import detect_lm_droplets
from clemflow.correlate.merge import merge_touching
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.clem_pair import LM_CHANNELS, apply, make_clem_pair
from clemflow.simulators.specimen.preview import pick_cell

BODIPY = LM_CHANNELS.index("488")
MATCH_UM = 0.3


@pytest.fixture(scope="module")
def pair():
    world = generate_world(SpecimenParams(), seed=1)
    return make_clem_pair(world, pick_cell(world), em_fraction=(0.25, 0.75))


@dataclass
class Truth:
    center: np.ndarray  # (N, 3) x y z µm in the volume's frame: this cell's droplets
    radius: np.ndarray  # µm, in that frame
    inside: np.ndarray  # (N,) bool
    every: np.ndarray  # (M, 3) every droplet of the world, same frame


def _lm_truth(pair) -> Truth:
    t = pair.objects("lipid_droplets")
    every = apply(pair.dish_to_lm, pair.world.lipid_droplets.center_um)
    return Truth(t["lm"], t["radius_um"], pair.in_lm(t["lm"]), every)


def _em_truth(pair) -> Truth:
    t = pair.objects("lipid_droplets")
    scale = abs(np.linalg.det(pair.dish_to_em[:3, :3])) ** (1 / 3)  # the block shrank in embedding
    every = apply(pair.dish_to_em, pair.world.lipid_droplets.center_um)
    return Truth(t["em"], t["radius_um"] * scale, pair.in_em(t["em"]), every)


@dataclass
class Score:
    recall: float  # of droplets >= 0.4 µm inside
    n_big: int
    precision: float
    lateral: np.ndarray  # |error| of matched detections, µm
    axial: np.ndarray
    radius_ratio: np.ndarray  # found / true, matched


def _score(found: Blobs, truth: Truth) -> Score:
    d = np.linalg.norm(found.center_um[:, None] - truth.center[None], axis=2)
    big = truth.inside & (2 * truth.radius >= 0.4)
    hit = d.min(axis=0) <= MATCH_UM if len(found) else np.zeros(len(truth.radius), bool)
    near_any = np.linalg.norm(found.center_um[:, None] - truth.every[None], axis=2).min(axis=1) <= MATCH_UM
    j = d.argmin(axis=1)
    mine = d[np.arange(len(found)), j] <= MATCH_UM
    err = found.center_um[mine] - truth.center[j[mine]]
    return Score(recall=float(hit[big].mean()), n_big=int(big.sum()), precision=float(near_any.mean()),
                 lateral=np.hypot(err[:, 0], err[:, 1]), axial=np.abs(err[:, 2]),
                 radius_ratio=found.radius_um[mine] / truth.radius[j[mine]])


@pytest.fixture(scope="module")
def lm_found(pair) -> Blobs:
    return detect_lm_droplets(pair.lm[BODIPY], pair.lm_voxel_um)


@pytest.fixture(scope="module")
def em_found(pair) -> Blobs:
    return detect_em_droplets(pair.em, pair.em_voxel_um)


# -- light ------------------------------------------------------------------------------------------------


def test_lm_droplets_against_truth(pair, lm_found):
    """Measured: recall 41/41, precision 1.0, centre error median 1 nm lateral / 2 nm axial (the simulated
    stack has Gaussian blobs and no aberration; real data would be tens of nm), radii within 3 %."""
    s = _score(lm_found, _lm_truth(pair))
    assert s.n_big >= 30
    assert s.recall >= 0.95
    assert s.precision >= 0.95
    assert np.median(s.lateral) < 0.02 and np.percentile(s.lateral, 90) < 0.05
    assert np.median(s.axial) < 0.05 and np.percentile(s.axial, 90) < 0.1
    assert 0.9 < np.median(s.radius_ratio) < 1.1


def test_lm_coarse_z_step(pair):
    """Every other plane (0.5 µm, twice the axial PSF sigma): centres still come out in µm."""
    z, y, x = pair.lm_voxel_um
    found = detect_lm_droplets(pair.lm[BODIPY, ::2], (2 * z, y, x))
    s = _score(found, _lm_truth(pair))
    assert s.recall >= 0.9
    assert s.precision >= 0.9
    assert np.median(s.axial) < 0.08
    assert np.median(s.lateral) < 0.03


def test_lm_ball_images():
    """Droplets imaged as they are, uniform balls blurred by the PSF (flat-topped, not the simulator's
    Gaussians), with shot noise: centres within 10 nm, radii within 15 % (measured: under 4 nm; the
    Gaussian fit reads a flat top 6-10 % wide)."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    vox, ss = np.array([0.25, 0.103, 0.103]), np.array([5, 3, 3])  # voxel (z, y, x) and supersampling
    shape = np.array([16, 72, 72])
    fv = vox / ss
    fine = np.zeros(shape * ss, np.float32)
    radii = np.array([0.15, 0.25, 0.35, 0.45, 0.55])
    centres = np.array([[1.9, 1.6, 1.6], [1.6, 1.6, 5.6], [2.1, 5.6, 1.7], [1.7, 5.5, 5.5], [2.0, 3.6, 3.6]])
    for r, c in zip(radii, centres):  # zyx µm; fine voxel i has its centre at (i - (ss - 1) / 2) * fv
        g = np.ogrid[tuple(slice(0, n) for n in fine.shape)]
        fine += sum(((gi - (k - 1) / 2) * f - ci) ** 2 for gi, k, f, ci in zip(g, ss, fv, c)) <= r * r
    fine = ndimage.gaussian_filter(fine, np.array([0.27, 0.08, 0.08]) / fv)
    image = fine.reshape(shape[0], ss[0], shape[1], ss[1], shape[2], ss[2]).mean(axis=(1, 3, 5))
    counts = (rng.poisson(image * 3000 + 30) + 100).astype(np.uint16)
    found = detect_lm_droplets(counts, tuple(vox))
    assert len(found) == len(radii)
    truth = centres[:, ::-1]
    d = np.linalg.norm(found.center_um[:, None] - truth[None], axis=2)
    j = d.argmin(axis=0)
    assert np.all(d[j, np.arange(len(radii))] < 0.01)
    np.testing.assert_allclose(found.radius_um[j], radii, rtol=0.15)


def test_lm_sees_nothing_in_noise():
    """Shot and read noise of an empty field: the threshold comes from the stack's own noise model."""
    rng = np.random.default_rng(3)
    shape = (24, 160, 160)
    stack = np.rint(rng.poisson(40.0, shape) / 0.5 + 100 + rng.normal(0, 3.2, shape)).astype(np.uint16)
    assert len(detect_lm_droplets(stack, (0.25, 0.103, 0.103))) == 0


def test_lm_input_errors():
    with pytest.raises(ValueError, match="one channel"):
        detect_lm_droplets(np.zeros((3, 4, 20, 20)), (0.25, 0.1, 0.1))
    with pytest.raises(ValueError, match="voxel_um"):
        detect_lm_droplets(np.zeros((4, 20, 20)), (0.25, 0.0, 0.1))
    with pytest.raises(ValueError, match="diameter_um"):
        detect_lm_droplets(np.zeros((4, 20, 20)), (0.25, 0.1, 0.1), diameter_um=(1.0, 0.5))


def test_lm_real_widefield_mirror(shared_data):
    """A real widefield image (HeLa lysosome puncta, one plane): mirrored input, mirrored centres.

    No truth here, so the check is that detection has no handedness or axis mix-up on real noise and
    structure: the puncta found in the image and in its mirror image coincide after mirroring back.
    """
    import tifffile

    path = shared_data / "hela_lyso_mito_nuc.tif"
    if not path.exists():
        pytest.skip(f"{path} not found")
    img = tifffile.imread(path)[..., 0][None]  # (1, Y, X): lysosome channel
    voxel = (1.0, 0.0515, 0.0515)
    kw = dict(diameter_um=(0.2, 1.2), psf_sigma_um=(1.0, 0.1))
    a = detect_lm_droplets(img, voxel, **kw)
    b = detect_lm_droplets(img[:, :, ::-1], voxel, **kw)
    assert len(a) > 50
    back = b.center_um.copy()
    back[:, 0] = (img.shape[2] - 1) * voxel[2] - back[:, 0]
    d = np.linalg.norm(a.center_um[:, None, :2] - back[None, :, :2], axis=2)
    assert np.mean(d.min(axis=1) < 0.005) > 0.9
    assert len(b) == pytest.approx(len(a), rel=0.1)


# -- electron ---------------------------------------------------------------------------------------------


def test_em_droplets_against_truth(pair, em_found):
    """Measured: recall 29/29, precision 0.95 (2 small dense bodies of 38), centre error median 2 nm, radii
    within 2 % of the truth (which shrank 3 % in embedding)."""
    s = _score(em_found, _em_truth(pair))
    assert s.n_big >= 20
    assert s.recall >= 0.93
    assert s.precision >= 0.88
    assert np.median(s.lateral) < 0.02 and np.percentile(s.lateral, 90) < 0.04
    assert np.median(s.axial) < 0.03 and np.percentile(s.axial, 90) < 0.05
    assert 0.9 < np.median(s.radius_ratio) < 1.05


def test_em_rejects_lookalikes(pair, em_found):
    """Endolysosomes with particle clusters (dense, round, mottled) are not droplets."""
    lyso = pair.objects("endolysosomes")
    scale = abs(np.linalg.det(pair.dish_to_em[:3, :3])) ** (1 / 3)
    cl = pair.objects("clusters")
    loaded = np.unique(pair.world.clusters.lysosome_index[cl["index"]][cl["in_lysosome"]])
    rows = np.flatnonzero(np.isin(lyso["index"], loaded))
    centres = lyso["em"][rows]
    inside = pair.in_em(centres, 0.3) & (2 * lyso["radius_um"][rows] * scale >= 0.3)
    assert inside.sum() >= 10
    droplets = _em_truth(pair).every
    d = np.linalg.norm(centres[inside][:, None] - em_found.center_um[None], axis=2).min(axis=1)
    clear = np.linalg.norm(centres[inside][:, None] - droplets[None], axis=2).min(axis=1) > 0.5
    assert clear.sum() >= 10
    assert np.mean(d[clear] < MATCH_UM) <= 0.05


def test_em_anisotropic_voxels(pair, em_found):
    """Every other slice (0.2 µm) or every other column (0.1 µm along x): the same droplets, in µm."""
    z, y, x = pair.em_voxel_um
    truth = _em_truth(pair)
    for volume, voxel in ((pair.em[::2], (2 * z, y, x)), (pair.em[:, :, ::2], (z, y, 2 * x))):
        s = _score(detect_em_droplets(volume, voxel), truth)
        assert s.recall >= 0.9
        assert s.precision >= 0.85
        assert np.median(s.lateral) < 0.03
        assert np.median(s.axial) < 0.05


def test_em_binning_keeps_the_frame(pair):
    """A volume at 25 nm pixels is binned by 2 to the working voxel: centres stay in the fine frame.

    Each pixel of a crop repeated 2 x 2 is the crop sampled at 25 nm with its content shifted by a quarter
    of a 50 nm pixel, so the droplets must come out at the crop's positions plus 12.5 nm in x and y.
    """
    z, y, x = pair.em_voxel_um
    crop = pair.em[:, :, :240]
    coarse = detect_em_droplets(crop, (z, y, x))
    fine = detect_em_droplets(np.repeat(np.repeat(crop, 2, axis=1), 2, axis=2), (z, y / 2, x / 2))
    assert len(coarse) >= 3 and len(fine) == len(coarse)
    order_c = np.lexsort(coarse.center_um.T)
    order_f = np.lexsort(fine.center_um.T)
    shift = np.array([x / 4, y / 4, 0.0])
    np.testing.assert_allclose(fine.center_um[order_f], coarse.center_um[order_c] + shift, atol=1e-6)
    np.testing.assert_allclose(fine.radius_um[order_f], coarse.radius_um[order_c], rtol=1e-6)


def test_em_cut_by_faces(pair):
    """Droplets cut by the first or last slice: kept when the centre is inside, with that centre."""
    z = pair.em_voxel_um[0]
    truth = _em_truth(pair)
    big = truth.inside & (2 * truth.radius >= 0.4)

    def cuts(k: int) -> int:  # big droplets that a face at plane k cuts well off their centre
        off = np.abs(truth.center[big, 2] - k * z)
        return int(np.sum((off > 0.05) & (off < truth.radius[big] - 0.05)))

    n = pair.em.shape[0]
    k0 = max(range(5, n // 2), key=cuts)
    k1 = max(range(k0 + 20, n - 5), key=cuts) + 1  # the slab's last plane is k1 - 1
    found = detect_em_droplets(pair.em[k0:k1], pair.em_voxel_um)
    centre = truth.center - np.array([0, 0, k0 * z])
    depth = (k1 - k0 - 1) * z
    cut = big & (np.minimum(np.abs(centre[:, 2]), np.abs(depth - centre[:, 2])) < truth.radius - 0.05)
    inside = cut & (centre[:, 2] > 0.05) & (centre[:, 2] < depth - 0.05)
    outside = cut & ((centre[:, 2] < -0.05) | (centre[:, 2] > depth + 0.05))
    assert inside.sum() >= 2 and outside.sum() >= 2
    d = np.linalg.norm(found.center_um[:, None] - centre[None], axis=2)
    assert np.all(d[:, inside].min(axis=0) < 0.06)  # found, centre within 60 nm
    # a droplet whose centre lies beyond a face is not reported at all (nor as a cap at the face)
    for c, r in zip(centre[outside], truth.radius[outside]):
        assert not np.any(np.linalg.norm(found.center_um[:, :2] - c[:2], axis=1) < r)


def test_em_nothing_in_resin_or_noise(pair):
    """Resin only (a corner of the block), a flat volume, white noise: no droplets."""
    assert len(detect_em_droplets(pair.em[:, 90:, :60], pair.em_voxel_um)) == 0
    assert len(detect_em_droplets(np.full((5, 40, 40), 128, np.uint8), (0.1, 0.05, 0.05))) == 0
    noise = np.random.default_rng(0).integers(0, 255, (20, 80, 80)).astype(np.uint8)
    assert len(detect_em_droplets(noise, (0.1, 0.05, 0.05))) == 0


def test_em_input_errors():
    with pytest.raises(ValueError, match="Z, Y, X"):
        detect_em_droplets(np.zeros((20, 20)), (0.1, 0.05, 0.05))
    with pytest.raises(ValueError, match="voxel_um"):
        detect_em_droplets(np.zeros((4, 20, 20)), (0.1, -0.05, 0.05))


# -- merging ------------------------------------------------------------------------------------------------


def test_merge_touching_constructed():
    r = 0.3
    c = np.array([
        [0.0, 0.0, 0.0], [0.8, 0.0, 0.0],  # lateral gap 0.2 <= 0.25: one
        [10.0, 0.0, 0.0], [10.9, 0.0, 0.0],  # lateral gap 0.3: two
        [0.0, 10.0, 0.0], [0.0, 10.0, 1.1],  # axial gap 0.5 <= 0.6: one
        [10.0, 10.0, 0.0], [10.0, 10.0, 1.3],  # axial gap 0.7: two
        [20.0, 0.0, 0.0], [20.8, 0.0, 0.0], [21.6, 0.0, 0.0],  # a chain: one
    ])
    b = Blobs(c, np.full(len(c), r), np.arange(len(c), dtype=float))
    m = merge_touching(b, (0.25, 0.6))
    assert len(m) == 7
    # the chain: centre of mass of equal volumes, combined volume, best score
    k = np.argmin(np.linalg.norm(m.center_um - [20.8, 0.0, 0.0], axis=1))
    np.testing.assert_allclose(m.center_um[k], [20.8, 0.0, 0.0], atol=1e-12)
    assert m.radius_um[k] == pytest.approx(r * 3 ** (1 / 3))
    assert m.score[k] == 10.0
    # unequal volumes: the bigger one pulls the centre
    m2 = merge_touching(Blobs([[0, 0, 0], [0.7, 0, 0]], [0.4, 0.2], [1.0, 1.0]))
    assert m2.center_um[0, 0] == pytest.approx(0.7 * 0.2**3 / (0.4**3 + 0.2**3))
    assert m2.radius_um[0] == pytest.approx((0.4**3 + 0.2**3) ** (1 / 3))
    # along a diagonal the reach is between the lateral and the axial resolution
    u = np.array([1.0, 0.0, 1.0]) / np.sqrt(2)
    reach = 1 / np.sqrt(0.5 / 0.25**2 + 0.5 / 0.6**2)
    for gap, n in ((reach - 0.01, 1), (reach + 0.01, 2)):
        assert len(merge_touching(Blobs([[0, 0, 0], u * (2 * r + gap)], [r, r], [0, 0]))) == n
    assert len(merge_touching(Blobs.empty())) == 0


def test_merge_touching_on_truth(pair, lm_found):
    """The cell's EM droplets (truth) merged at the default LM resolution.

    Volume is kept, nothing is left to merge, and every droplet lies in a merged one. Against the LM
    detections: the simulated confocal renders a droplet as a Gaussian narrower than the ball, so it still
    separates droplets whose surfaces are 0.1-0.25 µm apart, and merging at (0.25, 0.6) µm leaves 2 of 26
    big merged droplets without an LM blob at their centre (measured 0.92; unmerged 1.0).
    """
    truth = _em_truth(pair)
    em = Blobs(truth.center[truth.inside], truth.radius[truth.inside], np.arange(int(truth.inside.sum()), dtype=float))
    merged = merge_touching(em)
    assert len(em) - len(merged) >= 3
    assert np.sum(merged.radius_um**3) == pytest.approx(np.sum(em.radius_um**3))
    again = merge_touching(merged)
    assert len(again) == len(merged)
    # each droplet belongs to one merged droplet: the one carrying its score, close enough to hold it
    owner = {s: k for k, s in enumerate(merged.score)}
    singles = [k for k, s in enumerate(em.score) if s in owner]
    assert len(singles) >= len(merged) - 5
    d = np.linalg.norm(em.center_um[:, None] - merged.center_um[None], axis=2)
    reach = merged.radius_um[None] + em.radius_um[:, None] + 0.6
    assert np.all((d <= reach).any(axis=1))
    # against the light: big merged droplets with an LM blob at their centre
    lm_in_em = apply(pair.lm_to_em, lm_found.center_um)
    big = 2 * merged.radius_um >= 0.4
    near = np.linalg.norm(merged.center_um[big][:, None] - lm_in_em[None], axis=2).min(axis=1) < 0.15
    assert near.mean() >= 0.85
