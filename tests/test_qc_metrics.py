"""Live QC measures respond to the fault each is meant for, and not to the others, on the real FIB-SEM stack
and on the simulated specimen; the QC log resumes without duplicating rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from clemflow.align.transforms import CoarseShift
from clemflow.qc import metrics as m
from clemflow.qc.monitor import QCAlert, QCMonitor, SliceQC
from clemflow.qc.qclog import QCLog, read_alerts, read_qc
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.em import EMImperfections, render_em_slice
from clemflow.simulators.specimen.em_faults import pick_field


@pytest.fixture
def stack(shared_data) -> np.ndarray:
    return tifffile.imread(shared_data / "fibsem_medulla_10nm_250.tif")


def _noisy(img: np.ndarray, sd: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sd, img.shape), 0, 255).astype(np.uint8)


def test_real_stack_clean_values(stack):
    """On the registered real stack: neighbours similar, no curtains read into its vertical membranes."""
    preps = [m.prepare(s) for s in stack[:60]]
    stripes = [m.stripe_energy(p) for p in preps]
    assert max(stripes) < 0.06  # the threshold is 0.2
    ncc = [m.neighbour_ncc(a, b, 0.0, 0.0) for a, b in zip(preps, preps[1:])]
    assert min(ncc) > 0.9


def test_sharpness_falls_with_blur_not_with_gain(stack):
    img = stack[100]
    s0 = m.sharpness(img)
    rng = np.random.default_rng(0)
    # blur, then fresh scan noise (defocus blurs the signal, not the noise); this stack is already smooth at 10 nm
    blurred = [m.sharpness(ndimage.gaussian_filter(img.astype(float), s) + rng.normal(0, 8, img.shape))
               for s in (0.7, 1.5, 3.0)]
    assert s0 > blurred[0] > blurred[1] > blurred[2]
    assert blurred[1] < 0.85 * s0 and blurred[2] < 0.6 * s0
    assert m.sharpness(img + rng.normal(0, 8, img.shape)) == pytest.approx(s0, rel=0.03)  # noise is not blur
    gained = np.clip(img * 0.7 + 30, 0, 255)
    assert m.sharpness(gained) == pytest.approx(s0, rel=0.05)


def test_stripes_seen_above_real_membranes(stack):
    img = stack[40].astype(float)
    rng = np.random.default_rng(1)
    profile = ndimage.gaussian_filter1d(rng.normal(0, 1, img.shape[1]), 2.0)
    profile *= 0.8 * img.std() / profile.std()
    base = m.stripe_energy(m.prepare(img))
    striped = m.stripe_energy(m.prepare(img + profile[None, :]))
    assert base < 0.05 and striped > 0.25
    # horizontal stripes (charging streaks along the scan lines) are not curtaining
    across = m.stripe_energy(m.prepare(img + profile[:, None]))
    assert across < 0.05


def test_brightness_contrast_snr_and_change_under_gain_and_noise(stack):
    a, b = stack[120], stack[121]
    pa, pb = m.prepare(a), m.prepare(b)
    dark = m.prepare(np.clip(b * 0.6 + 10, 0, 255))
    assert m.brightness(dark) == pytest.approx(0.6 * m.brightness(pb) + 10, rel=0.01)
    assert m.contrast(dark) == pytest.approx(0.6 * m.contrast(pb), rel=0.03)
    # a gain change is not a change of content
    assert m.similarity(pa, dark, 0, 0) == pytest.approx(m.similarity(pa, pb, 0, 0), abs=0.005)
    noisy = m.prepare(_noisy(b, 25.0, 3))
    assert m.snr(noisy) < 0.5 * m.snr(pb)
    # noise lowers the NCC but not the noise-free similarity
    assert m.neighbour_ncc(pa, noisy, 0, 0) < m.neighbour_ncc(pa, pb, 0, 0) - 0.02
    assert m.similarity(pa, noisy, 0, 0) == pytest.approx(m.similarity(pa, pb, 0, 0), abs=0.02)


def test_change_tells_duplicate_and_skipped_slices(stack):
    """The same slice imaged twice (fresh noise) reads as no change; a skipped depth as about twice the usual."""
    usual = np.median([1 - m.similarity(m.prepare(stack[i - 1]), m.prepare(stack[i]), 0, 0) for i in range(141, 161)])
    again = 1 - m.similarity(m.prepare(_noisy(stack[150], 8, 1)), m.prepare(_noisy(stack[150], 8, 2)), 0, 0)
    skipped = 1 - m.similarity(m.prepare(stack[149]), m.prepare(stack[151]), 0, 0)
    assert 0.015 < usual < 0.06
    assert abs(again) < 0.2 * usual
    assert skipped > 2.2 * usual


def test_shifted_neighbour_measured_after_its_shift(stack):
    """NCC and change are taken where the slices overlap after the measured step (integer + sub-pixel)."""
    a, b = stack[60].astype(float), stack[61].astype(float)
    moved = ndimage.shift(b, (-7.4, 12.6), order=3, mode="nearest")  # content moved by dx +12.6, dy -7.4
    pa, pb, pm = m.prepare(a), m.prepare(b), m.prepare(moved)
    ref_ncc, ref_change = m.neighbour_ncc(pa, pb, 0, 0), 1 - m.similarity(pa, pb, 0, 0)
    assert m.neighbour_ncc(pa, pm, 12.6, -7.4) == pytest.approx(ref_ncc, abs=0.02)
    assert 1 - m.similarity(pa, pm, 12.6, -7.4) == pytest.approx(ref_change, abs=0.01)
    assert m.neighbour_ncc(pa, pm, 0, 0) < ref_ncc - 0.3
    assert np.isnan(m.neighbour_ncc(pa, pm, 400, 0))  # no overlap left


def test_specimen_defocus_lowers_sharpness_not_contrast():
    world = generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=3), seed=3)
    face, centre = pick_field(world, 0)

    def render(**imp):
        img, _ = render_em_slice(world, 0.05, centre, 10.0, (256, 256), face=face, seed=1,
                                 imperfections=EMImperfections(**imp))
        return m.prepare(img)

    sharp = [render(focus_error_um=e).sharpness for e in (0.0, 4.0, 8.0, 12.0)]
    assert sharp[0] > sharp[1] > sharp[2] > sharp[3]
    assert sharp[2] < 0.6 * sharp[0]  # 8 µm (20 nm blur at 10 nm pixels): below the protocol's alarm ratio
    clean = render()
    blurred = render(focus_error_um=8.0)
    assert m.contrast(blurred) == pytest.approx(m.contrast(clean), rel=0.15)  # defocus is not charging


def test_bad_input_named():
    with pytest.raises(ValueError, match="2-D"):
        m.prepare(np.zeros((4, 64, 64)))
    with pytest.raises(ValueError, match="too small"):
        m.prepare(np.zeros((16, 16)))
    mon = QCMonitor()
    mon.add(0, np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="frame size"):
        mon.add(1, np.zeros((128, 64), np.uint8))
    with pytest.raises(ValueError, match="acquisition order"):
        mon.add(0, np.zeros((64, 64), np.uint8))


def test_qclog_resume_without_duplicates(tmp_path):
    def qc(i: int, kinds: tuple[str, ...] = ()) -> SliceQC:
        alerts = [QCAlert(i, k, "warning", f"slice {i}: {k}", 0.5, 0.6) for k in kinds]
        return SliceQC(i, {"ncc": 0.9 + i / 100, "sharpness": 0.2, "change": float("nan")}, alerts)

    log = QCLog(tmp_path)
    assert log.append(qc(0)) and log.append(qc(1, ("defocus", "charging")))
    # the run stops while writing slice 2: a torn line at the end of both files
    with open(tmp_path / "qc.csv", "a") as f:
        f.write("2,0.92,")
    with open(tmp_path / "alerts.jsonl", "a") as f:
        f.write('{"slice": 2, "ki')
    assert [a.kind for a in read_alerts(tmp_path)] == ["defocus", "charging"]
    log = QCLog(tmp_path)  # resume
    assert not log.append(qc(1, ("defocus", "charging")))  # re-fed after the restart: nothing written twice
    assert log.append(qc(2, ("missing",)))
    rows = read_qc(tmp_path)
    assert [r["slice"] for r in rows] == [0, 1, 2]
    assert rows[1]["alerts"] == ["defocus", "charging"] and rows[2]["alerts"] == ["missing"]
    assert rows[2]["ncc"] == pytest.approx(0.92) and np.isnan(rows[0]["change"])
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["defocus", "charging", "missing"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "qc.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a QC table"):
        QCLog(tmp_path / "other")


def test_gap_in_slice_numbers_is_missing(stack):
    mon = QCMonitor()
    kinds = []
    for i in [*range(0, 12), *range(13, 16)]:
        kinds.append(mon.add(i, stack[i], CoarseShift(i, 0, 0, 0, 0, 50.0)).kinds)
    assert kinds[12] == ["missing"] and not any(kinds[:12]) and not any(kinds[13:])
