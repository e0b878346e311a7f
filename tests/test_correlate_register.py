"""Registration with no initial guess (issue 9, part 2), against the specimen's truth.

Trials come from clemflow.correlate.trials: a cell's lipid droplets in its
confocal frame (turned by any angle about the optical axis, mirrored or not,
scale 0.95-1.05, z-scale +-15 %) and in an EM volume covering half the cell,
with realistic localisation noise, droplets missed, spurious ones, and the
droplets below the light resolution absent. TRE is measured on endolysosome
and particle-cluster centres, which registration never sees.
"""

from __future__ import annotations

import numpy as np
import pytest

from clemflow.correlate.cpd import rigid_cpd
from clemflow.correlate.models import MODELS, apply, describe, fit_model
from clemflow.correlate.register import CorrelationRefused, register_points
from clemflow.correlate.trials import TrialSettings, cell_truth, make_trial, make_trials

NOISE_FREE = TrialSettings(em_coverage=1.0, missing=(0.0, 0.0), spurious=(0.0, 0.0), lm_noise_lateral_um=(0.0, 0.0),
                           lm_noise_axial_um=(0.0, 0.0), em_noise_um=(0.0, 0.0), lm_min_diameter_um=0.0)


@pytest.fixture(scope="module")
def goal_runs():
    """The issue's goal setting: 40 trials, each registered once."""
    runs = []
    for trial in make_trials(40, seed=0):
        try:
            runs.append((trial, register_points(trial.lm_um, trial.em_um)))
        except CorrelationRefused:
            runs.append((trial, None))
    return runs


# ----------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("model", MODELS)
def test_models_recover_their_own_transform_exactly(model):
    rng = np.random.default_rng(3)
    src = rng.normal(0, 5, (12, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q[:, 0] *= -1 if np.linalg.det(q) > 0 else 1  # a mirror: improper rotations must be reachable
    lin = {"similarity": 1.07 * q, "similarity_z": 0.93 * q @ np.diag([1, 1, 0.82]),
           "affine": q @ np.array([[1.1, 0.05, 0.0], [0.02, 0.9, 0.1], [0.0, -0.04, 0.8]])}[model]
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = lin, [4.0, -7.0, 2.5]
    got = fit_model(model, src, apply(m, src))
    np.testing.assert_allclose(got, m, atol=1e-9)
    if model != "affine":
        d = describe(got)
        assert d["mirrored"] and d["z_scale"] == pytest.approx(0.82 if model == "similarity_z" else 1.0)


def test_models_refuse_degenerate_points_with_a_reason():
    flat = np.c_[np.random.default_rng(0).normal(size=(10, 2)), np.zeros(10)]
    with pytest.raises(ValueError, match="one z plane"):
        fit_model("similarity_z", flat, flat)
    with pytest.raises(ValueError, match="one plane"):
        fit_model("affine", flat, flat)
    with pytest.raises(ValueError, match="unknown model"):
        fit_model("rigid", flat, flat)


# ----------------------------------------------------------------------------------------- goals


def test_goal_success_rate_with_mirrors_and_half_coverage(goal_runs):
    trials = [t for t, _ in goal_runs]
    assert any(t.mirrored for t in trials) and not all(t.mirrored for t in trials)
    assert {np.sign(t.angle_deg) for t in trials} == {-1.0, 1.0} and max(abs(t.angle_deg) for t in trials) > 120
    ok = [r is not None and t.tre_um(r.matrix) < 0.5 for t, r in goal_runs]
    assert sum(ok) >= 39, f"success {sum(ok)}/40 (goal: 97 %)"
    # the mirror is found, never guessed: the registration's handedness is the truth's
    for t, r in goal_runs:
        if r is not None:
            assert r.mirrored == (np.linalg.det(t.lm_to_em[:3, :3]) < 0)


def test_goal_median_tre_within_15_percent_of_the_true_pair_floor(goal_runs):
    tre = [t.tre_um(r.matrix) for t, r in goal_runs if r is not None]
    floor = [t.floor_um(r.model) for t, r in goal_runs if r is not None]
    assert np.median(tre) <= 1.15 * np.median(floor), (np.median(tre), np.median(floor))
    assert np.median(tre) < 0.15  # and in absolute terms, where the field notes put real data (100-200 nm)


def test_pairs_are_true_pairs_and_the_tre_estimate_is_honest(goal_runs):
    right = wrong = 0
    for t, r in goal_runs:
        if r is None:
            continue
        truth = set(map(tuple, t.pairs))
        found = set(map(tuple, r.pairs))
        right += len(found & truth)
        wrong += len(found - truth)
        assert len(r.residuals_um) == len(r.loo_tre_um) == len(r.pairs) >= 8
        assert np.all(r.residuals_um <= 0.5 + 1e-9)
    assert wrong <= 0.02 * right, (right, wrong)
    # the leave-one-out estimate neither hides a bad result nor cries wolf: within a factor 3 of the TRE
    ratio = [r.tre_estimate_um / t.tre_um(r.matrix) for t, r in goal_runs if r is not None]
    assert 1 / 3 < np.median(ratio) < 3


# ----------------------------------------------------------------------------------------- special cases


def test_noise_free_points_are_registered_exactly():
    trial = make_trials(1, seed=5, settings=NOISE_FREE)[0]
    reg = register_points(trial.lm_um, trial.em_um)
    # the specimen's block transform has anisotropic shrinkage and shear: only the affine model is exact
    assert reg.model == "affine"
    np.testing.assert_allclose(reg.matrix, trial.lm_to_em, atol=1e-8)
    assert len(reg.pairs) == len(trial.pairs)


def test_model_selection_picks_similarity_z_when_the_depth_scale_is_off():
    trials = make_trials(6, seed=3, settings=TrialSettings(z_scale=(0.8, 0.8)))
    models = [register_points(t.lm_um, t.em_um).model for t in trials]
    assert models.count("similarity_z") >= 5, models


def test_unrelated_droplet_sets_are_refused():
    """Droplets of another cell (other worlds too) must not be confirmed: the dangerous failure."""
    lm_side = make_trials(6, seed=20)
    em_side = make_trials(6, seed=21)
    for a, b in zip(lm_side, em_side[1:] + em_side[:1]):
        assert a.label != b.label
        with pytest.raises(CorrelationRefused, match="droplets agree") as refused:
            register_points(a.lm_um, b.em_um)
        assert refused.value.best_inliers < 8


def test_too_few_agreeing_droplets_are_refused_with_the_count():
    trial = make_trials(1, seed=7)[0]
    keep_em = np.ones(len(trial.em_um), bool)
    keep_em[trial.pairs[6:, 1]] = False  # only 6 droplets left in common
    with pytest.raises(CorrelationRefused, match=r"only \d droplets agree \(8 needed\)") as refused:
        register_points(trial.lm_um, trial.em_um[keep_em])
    assert refused.value.best_inliers <= 6
    with pytest.raises(CorrelationRefused, match="fewer than 8 droplets detected in the EM volume"):
        register_points(trial.lm_um, trial.em_um[:5])


def test_deterministic_and_validates_its_input():
    trial = make_trials(1, seed=9)[0]
    a = register_points(trial.lm_um, trial.em_um, seed=4)
    b = register_points(trial.lm_um, trial.em_um, seed=4)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    with pytest.raises(ValueError, match="unknown model"):
        register_points(trial.lm_um, trial.em_um, model="rigid")
    with pytest.raises(ValueError, match="finite"):
        register_points(np.full((10, 3), np.nan), trial.em_um)


def test_trials_accept_detected_droplets_and_pair_them_with_the_truth():
    from clemflow.simulators.specimen import SpecimenParams, generate_world

    world = generate_world(SpecimenParams(n_columns=1, n_rows=1), seed=0)
    truth = cell_truth(world, 2)
    rng = np.random.default_rng(0)
    big = truth.droplet_radius_um > 0.15
    lm_det = np.concatenate([truth.droplets_lm[big] + rng.normal(0, 0.05, (big.sum(), 3)), rng.uniform(0, 30, (5, 3))])
    em_det = np.concatenate([truth.droplets_em + rng.normal(0, 0.03, truth.droplets_em.shape),
                             rng.uniform(0, 30, (5, 3))])
    trial = make_trial(truth, 1, lm_detected=lm_det, em_detected=em_det)
    assert len(trial.pairs) >= 10
    err = np.linalg.norm(apply(trial.lm_to_em, trial.lm_um[trial.pairs[:, 0]]) - trial.em_um[trial.pairs[:, 1]], axis=1)
    assert err.max() < 0.4
    reg = register_points(trial.lm_um, trial.em_um)
    assert trial.tre_um(reg.matrix) < 0.2


# ----------------------------------------------------------------------------------------- baseline


def test_rigid_cpd_converges_from_a_small_rotation_but_not_a_mirror():
    rng = np.random.default_rng(1)
    src = rng.normal(0, 5, (40, 3))
    a = np.radians(15)
    m = np.eye(4)
    m[:3, :3] = 1.04 * np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m[:3, 3] = [5.0, -3.0, 1.0]
    dst = apply(m, src)[rng.permutation(40)]
    np.testing.assert_allclose(rigid_cpd(src, dst), m, atol=1e-6)
    mirrored = m @ np.diag([1.0, -1.0, 1.0, 1.0])
    got = rigid_cpd(src, apply(mirrored, src))
    assert np.linalg.det(got[:3, :3]) > 0  # a proper rotation only: the mirror is out of its reach
    assert np.median(np.linalg.norm(apply(got, src) - apply(mirrored, src), axis=1)) > 1.0
