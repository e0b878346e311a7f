"""Lipid-droplet detection against the specimen's truth, in the confocal stack and in the EM volume.

One correlative pair (the middle half of the target cell milled) serves every test but the real image.
Recall counts the cell's droplets of 0.4 µm and more inside the volume; precision counts detections
within 0.3 µm of any droplet of the world (a neighbour's droplets are droplets too); centre errors are
split into lateral (x, y) and axial (z), in µm of each volume's own frame.
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
    # one grid square of three cells: the target cell's pair renders in a third of the time of a full region
    world = generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=3), seed=1)
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


def _part_truth(pair, box: tuple[slice, slice, slice], step: tuple[int, int, int] = (1, 1, 1)) -> Truth:
    """EM truth in the frame of a part of the volume (``box`` along z, y, x; sampled every ``step``)."""
    t = _em_truth(pair)
    z, y, x = pair.em_voxel_um
    origin = np.array([box[2].start * x, 0.0, box[0].start * z])
    shape = np.array([box[2].stop - box[2].start, pair.em.shape[1], box[0].stop - box[0].start])
    extent = (shape - np.array(step[::-1])) * [x, y, z]  # to the centre of the last voxel sampled
    centre = t.center - origin
    inside = np.all((centre >= 0) & (centre <= extent), axis=1)
    return Truth(centre, t.radius, inside, t.every - origin)


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


@pytest.fixture(scope="module")
def part_box(pair) -> tuple[slice, slice, slice]:
    """110 slices x 240 columns of the EM volume (11 x 12 µm) holding the most whole big droplets."""
    t = _em_truth(pair)
    z, _, x = pair.em_voxel_um
    big = t.radius >= 0.2
    c, r = t.center[big], t.radius[big]
    nz, _, nx = pair.em.shape

    def whole(k0: int, i0: int) -> int:
        lo = np.array([i0 * x, 0.0, k0 * z]) + r[:, None]
        hi = np.array([(i0 + 239) * x, np.inf, (k0 + 109) * z]) - r[:, None]
        return int(np.all((c >= lo) & (c <= hi), axis=1).sum())

    starts = [(k, i) for k in range(0, nz - 110, 10) for i in range(0, nx - 240, 20)]
    k0, i0 = max(starts, key=lambda ki: whole(*ki))
    return slice(k0, k0 + 110), slice(0, pair.em.shape[1]), slice(i0, i0 + 240)


@pytest.fixture(scope="module")
def em_part(pair, part_box) -> tuple[np.ndarray, Blobs]:
    """That part of the EM volume and its droplets: for variants of the volume."""
    part = pair.em[part_box]
    return part, detect_em_droplets(part, pair.em_voxel_um)


# -- light ------------------------------------------------------------------------------------------------


def test_lm_droplets_against_truth(pair, lm_found):
    """Measured: recall 26/26, precision 1.0, centre error median 0.5 nm lateral / 1.6 nm axial (the
    simulated stack has Gaussian blobs and no aberration; real data would be tens of nm), radii within 3 %."""
    s = _score(lm_found, _lm_truth(pair))
    assert s.n_big >= 20
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


def test_lm_any_scaling(pair):
    """Counts rescaled (a normalised float export) give the same droplets: no level is assumed."""
    crop = pair.lm[BODIPY, :, 100:300, 100:300]
    a = detect_lm_droplets(crop, pair.lm_voxel_um)
    b = detect_lm_droplets(crop / 65535.0, pair.lm_voxel_um)
    assert len(a) >= 20 and len(b) == len(a)
    np.testing.assert_allclose(b.center_um, a.center_um, atol=1e-4)  # float32 rounding in the fits


def test_lm_sees_nothing_in_noise():
    """Shot and read noise of an empty field: the threshold comes from the stack's own noise model."""
    rng = np.random.default_rng(3)
    shape = (24, 160, 160)
    stack = np.rint(rng.poisson(40.0, shape) / 0.5 + 100 + rng.normal(0, 3.2, shape)).astype(np.uint16)
    assert len(detect_lm_droplets(stack, (0.25, 0.103, 0.103))) == 0
    assert len(detect_lm_droplets(np.full((5, 40, 40), 128, np.uint16), (0.25, 0.1, 0.1))) == 0


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
    """Measured: recall 19/19, precision 1.0, centre error median 3 nm lateral / 3 nm axial, radii 3 %
    under the truth (which shrank 3 % in embedding). On the full-region world (seed 1): 29/29, 0.95."""
    s = _score(em_found, _em_truth(pair))
    assert s.n_big >= 15
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
    droplets = _em_truth(pair).every
    clear = np.linalg.norm(centres[inside][:, None] - droplets[None], axis=2).min(axis=1) > 0.5
    assert clear.sum() >= 10
    d = np.linalg.norm(centres[inside][:, None] - em_found.center_um[None], axis=2).min(axis=1)
    assert np.mean(d[clear] < MATCH_UM) <= 0.05


def test_em_anisotropic_voxels(pair, em_part, part_box):
    """Every other slice (0.2 µm) or every other column (0.1 µm along x): the same droplets, in µm."""
    z, y, x = pair.em_voxel_um
    part = em_part[0]
    for step, voxel in (((2, 1, 1), (2 * z, y, x)), ((1, 1, 2), (z, y, 2 * x))):
        volume = part[:: step[0], :: step[1], :: step[2]]
        s = _score(detect_em_droplets(volume, voxel), _part_truth(pair, part_box, step))
        assert s.n_big >= 6
        assert s.recall >= 0.9
        assert s.precision >= 0.85
        assert np.median(s.lateral) < 0.03
        assert np.median(s.axial) < 0.05


def test_em_binning_keeps_the_frame(pair, em_part):
    """A volume at 25 nm pixels is binned by 2 to the working voxel: centres stay in the fine frame.

    Each pixel repeated 2 x 2 is the volume sampled at 25 nm with its content shifted by a quarter of a
    50 nm pixel, so the droplets must come out at the original positions plus 12.5 nm in x and y.
    """
    z, y, x = pair.em_voxel_um
    part, coarse = em_part
    fine = detect_em_droplets(np.repeat(np.repeat(part, 2, axis=1), 2, axis=2), (z, y / 2, x / 2))
    assert len(coarse) >= 5 and len(fine) == len(coarse)
    np.testing.assert_allclose(fine.center_um, coarse.center_um + [x / 4, y / 4, 0.0], atol=1e-6)
    np.testing.assert_allclose(fine.radius_um, coarse.radius_um, rtol=1e-6)


def test_em_any_scaling_or_polarity(pair, em_part):
    """Grey levels as floats 0-1, or raw backscatter (dense bright): the same droplets."""
    part, a = em_part
    b = detect_em_droplets(part.astype(np.float32) / 255, pair.em_voxel_um)
    c = detect_em_droplets(255 - part, pair.em_voxel_um, dense_is_dark=False)
    assert len(b) == len(a) == len(c)
    np.testing.assert_allclose(b.center_um, a.center_um, atol=1e-6)
    np.testing.assert_allclose(c.center_um, a.center_um, atol=1e-6)


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
    assert len(detect_em_droplets(pair.em[:, -30:, :60], pair.em_voxel_um)) == 0
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
    """The cell's droplets (truth, EM frame) merged at the default LM resolution.

    Volume is kept, nothing is left to merge, and every droplet lies in a merged one. Against the LM
    detections: the simulated confocal renders a droplet as a Gaussian narrower than the ball, so it can
    still separate droplets whose surfaces are 0.1-0.25 µm apart; measured, every big merged droplet of
    this cell has an LM blob at its centre, but on the full-region world's target cell (seed 1) 2 of 26 do
    not (unmerged: all do).
    """
    truth = _em_truth(pair)
    em = Blobs(truth.center, truth.radius, np.arange(len(truth.radius), dtype=float))
    merged = merge_touching(em)
    assert len(em) - len(merged) >= 3
    assert np.sum(merged.radius_um**3) == pytest.approx(np.sum(em.radius_um**3))
    assert len(merge_touching(merged)) == len(merged)
    d = np.linalg.norm(em.center_um[:, None] - merged.center_um[None], axis=2)
    assert np.all((d <= merged.radius_um[None] + em.radius_um[:, None] + 0.6).any(axis=1))
    # against the light, where the EM volume is
    lm_in_em = apply(pair.lm_to_em, lm_found.center_um)
    big = (2 * merged.radius_um >= 0.4) & pair.in_em(merged.center_um)
    assert big.sum() >= 15
    near = np.linalg.norm(merged.center_um[big][:, None] - lm_in_em[None], axis=2).min(axis=1) < 0.15
    assert near.mean() >= 0.85
