"""Per-image uptake quantification (issue 10, parts 1-2) against the simulated specimen's truth, and on real HeLa.

The treated field (768 x 768 px at 63x, 23 planes 0.4 µm apart) was chosen in
a dense square so that three whole cells and one cut by the border fall in it;
the test checks that precondition from the truth itself (a third cell's rim
grazes the border, 12 µm² of it in view: too thin to see). Tolerances are what
the method meets honestly on this field (see each assertion); the systematic
biases behind them are the microscope's, not tuned away:

- cell area and volume ~5-10 % low: the half-maximum edge of the cytoplasm
  misses the cell's last few hundred nanometres, thinner than the axial PSF;
- particle area ~1.0-1.1x: each object is sized by its own width (its
  variance less a point source's, read as a ball's r²/5), so neither a
  cluster's dim wings nor a lone 50 nm particle's diffraction spot count;
- the share of particles in endolysosomes is estimated from particle signal
  (proportional to particle number, as the truth counts); the area share the
  issue defines is reported too and is lower, because the many free particles
  are small but not nothing next to a loaded endolysosome.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clemflow.protocol.analysis import Quantification
from clemflow.quantify import ChannelRoles, ImageQuant, quantify_stack, write_overlay
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.lm import OBJECTIVES, field_coordinates, render_lm_stack
from clemflow.simulators.specimen.truth import cell_metrics

STAINS = ("lysotracker", "mitotracker", "particle_dye")
CHANNELS = [("405", 0.1), ("488", 0.05), ("639", 0.1)]  # exposures of the example time-course protocol
PIXEL = OBJECTIVES["63x"].pixel_um
Z = -0.5 + 0.4 * np.arange(23)


def _field(hours, n_cells, seed, centre, size):
    world = generate_world(SpecimenParams(stains=STAINS, hours_since_treatment=hours, n_columns=1, n_rows=1,
                                          n_cells=n_cells), seed)
    if centre is None:  # the middle of the first cell
        centre = world.cells[0].center_um
    stack = np.stack([render_lm_stack(world, centre[0], centre[1], Z, "63x", ch, exposure, (size, size), rng=k)
                      for k, (ch, exposure) in enumerate(CHANNELS)])
    xs, ys = field_coordinates(centre[0], centre[1], (size, size), PIXEL)
    truth_ids = world.cell_id_at(xs[None, :], ys[:, None])
    q = quantify_stack(stack, [c for c, _ in CHANNELS], (0.4, PIXEL, PIXEL), Quantification())
    return q, truth_ids, cell_metrics(world)


@pytest.fixture(scope="module")
def treated():
    return _field(24.0, 100, 1, (2246.0, 1364.0), 768)


@pytest.fixture(scope="module")
def control():
    return _field(None, 12, 3, None, 512)


def _truth_sets(ids: np.ndarray, least_um2: float = 40.0) -> tuple[set[int], set[int]]:
    """Truth cells wholly in the field, and those the border cuts with at least ``least_um2`` in view (a sliver of
    a cell's rim, thinner than the axial PSF, is invisible)."""
    edge = set(np.unique(np.concatenate([ids[0], ids[-1], ids[:, 0], ids[:, -1]]))) - {-1}
    inside = set(np.unique(ids)) - {-1} - edge
    return inside, {e for e in edge if np.count_nonzero(ids == e) * PIXEL**2 >= least_um2}


def _matched(q: ImageQuant, ids: np.ndarray):
    """(measured cell, truth id, IoU) for every cell the border does not cut."""
    out = []
    for c in q.measured:
        mask = q.labels == c.label
        tid = int(np.bincount(ids[mask] + 1).argmax()) - 1
        iou = (mask & (ids == tid)).sum() / (mask | (ids == tid)).sum()
        out.append((c, tid, iou))
    return out


def test_cells_found_and_border_cells_counted(treated):
    q, ids, _ = treated
    inside, edge = _truth_sets(ids)
    assert len(inside) == 3 and len(edge) == 1  # the field is what the docstring says
    matched = _matched(q, ids)
    assert sorted(t for _, t, _ in matched) == sorted(inside)
    assert all(iou > 0.84 for _, _, iou in matched), [round(i, 3) for *_, i in matched]  # 0.88-0.94 seen
    assert q.excluded_at_border == len(edge)
    assert len(q.cells) == len(inside) + len(edge)


def test_per_cell_metrics_against_truth(treated):
    q, ids, truth = treated
    for c, t, _ in _matched(q, ids):
        assert 0.84 < c.area_um2 / truth["area_um2"][t] < 1.02  # 0.88-0.95 seen
        assert 0.82 < c.volume_um3 / truth["volume_um3"][t] < 1.02  # 0.87-0.88 seen
        assert c.has_particles == bool(truth["has_particles"][t])
        assert 0.85 < c.particle_area_fraction / truth["particle_area_fraction"][t] < 1.2  # 0.97-1.10 seen
        # by signal, as the truth counts particles: +0.07 to +0.10 seen (faint free particles go undetected)
        assert abs(c.particle_signal_in_endolysosome_fraction - truth["fraction_particles_in_endolysosomes"][t]) < 0.15
        assert 0.4 < c.particle_in_endolysosome_fraction < c.particle_signal_in_endolysosome_fraction  # 0.58-0.69
        assert 0.75 < c.endolysosomal_volume_fraction / truth["endolysosomal_volume_fraction"][t] < 1.1  # 0.91 seen
        assert c.endolysosomal_volume_um3 < c.volume_um3


def test_untreated_control_reports_no_particles(control):
    q, ids, truth = control
    assert not truth["has_particles"].any()
    assert q.measured, "the control field should hold a whole cell"
    assert not q.particles.any()
    for c in q.cells:
        assert not c.has_particles and c.particle_area_um2 == 0.0
        assert math.isnan(c.particle_in_endolysosome_fraction)
        assert c.endolysosomal_volume_fraction > 0


def test_missing_channel_is_named():
    stack = np.zeros((2, 3, 64, 64), np.uint16)
    with pytest.raises(ValueError, match="'639'.*particles"):
        quantify_stack(stack, ["405", "488"], (0.3, 0.1, 0.1))
    with pytest.raises(ValueError, match="2 channel names"):
        quantify_stack(np.zeros((3, 3, 64, 64), np.uint16), ["405", "488"], (0.3, 0.1, 0.1))


def test_bare_glass_has_no_cells():
    """Noise alone splits into two Otsu classes; a field without cells must still report none."""
    rng = np.random.default_rng(0)
    q = quantify_stack(rng.poisson(150, (3, 6, 256, 256)).astype(np.uint16), ["405", "488", "639"], (0.3, 0.1, 0.1))
    assert q.cells == [] and q.excluded_at_border == 0
    assert not q.endolysosomes.any() and not q.particles.any()


def test_hela_widefield_runs_and_overlay(shared_data, tmp_path):
    import tifffile

    image = tifffile.imread(shared_data / "hela_lyso_mito_nuc.tif")  # (Y, X, C): lysosomes, mitochondria, nuclei
    stack = np.moveaxis(image, -1, 0)
    roles = ChannelRoles(endolysosomes="lysosomes", mitochondria="mitochondria", particles=None, nuclei="nuclei")
    # the file's 0.0515 µm/px is marked "not accurate"; 0.1 µm/px makes its nuclei 12-15 µm, as HeLa nuclei are
    q = quantify_stack(stack, ["lysosomes", "mitochondria", "nuclei"], (1.0, 0.1, 0.1), roles=roles)
    # four nuclei, four cells; one reaches the top edge
    assert len(q.cells) == 4 and q.excluded_at_border == 1
    assert all(200 < c.area_um2 < 700 for c in q.cells)
    assert all(math.isnan(c.volume_um3) and math.isnan(c.particle_area_fraction) for c in q.cells)
    lyso = [np.count_nonzero(q.endolysosomes & (q.labels == c.label)) for c in q.cells]
    assert all(n > 100 for n in lyso)  # every cell holds lysosome puncta
    assert q.endolysosomes.mean() < 0.05
    path = write_overlay(tmp_path / "hela.png", q, title="HeLa")
    assert path.stat().st_size > 10_000


def test_overlay_of_simulated_field(treated, tmp_path):
    q, _, _ = treated
    path = write_overlay(tmp_path / "field.png", q)
    import matplotlib.image

    rgb = matplotlib.image.imread(path)
    assert rgb.shape[1] == q.labels.shape[1]


def test_plane_significance_is_calibrated_on_noise():
    """Noise alone stays under the false-alarm threshold; a faint spot in one plane scores its true SNR."""
    from scipy import ndimage as ndi

    from clemflow.quantify import segment as seg

    rng = np.random.default_rng(7)
    stack = rng.poisson(30.0, (8, 256, 256)).astype(np.float32)
    sigma = 1.0
    mip = ndi.gaussian_filter(stack.max(0), sigma)
    peaks = np.argwhere((mip == ndi.maximum_filter(mip, 3)) & (mip > np.percentile(mip, 99.5)))
    peaks = peaks[(peaks > 12).all(1) & (peaks < 244).all(1)]
    tries = stack.size / (4 * np.pi * sigma**2)
    assert seg.plane_significance(stack, peaks, sigma).max() < seg.significance_threshold(tries, 0.01)
    # a Gaussian spot (SD 1 px, amplitude a) after smoothing by SD 1 px: peak a/2 over noise sqrt(30) * sum(g²)
    yy, xx = np.mgrid[:256, :256]
    spot = 12.0 * np.exp(-((yy - 128) ** 2 + (xx - 100) ** 2) / 2.0)
    g = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    g /= g.sum()
    expected = 6.0 / (np.sqrt(30.0) * np.sum(g * g))
    stack[5] += spot
    got = seg.plane_significance(stack, np.array([[128, 100]]), sigma)[0]
    assert abs(got - expected) < 0.35 * expected, (got, expected)
