"""`clemflow qc report`: the PNGs of a small alignment of the simulated specimen and the numbers it prints.

The alignment folder is made by the real writers (OME-Zarr volume, transforms.csv) from slices of the
ground-truth specimen with drift, aligned by the coarse stage and checked by the QC monitor (qc.csv and
alerts.jsonl by QCLog); the volume is created deeper than what is written, as during a live run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

N_SLICES, DEPTH, SIZE = 40, 56, 160  # slices written, z extent created up front, slice side (px)
DUPLICATE = 30  # this slice repeats the one before
PIXEL_NM, THICKNESS_NM = 40.0, 100.0  # depth 40 x 100 nm = 4 µm against a width of 160 x 40 nm = 6.4 µm


@pytest.fixture(scope="module")
def aligned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clemflow.align.coarse import CoarseAligner
    from clemflow.align.csvio import TransformsCsv
    from clemflow.align.transforms import SliceTransform
    from clemflow.align.volume import AlignedVolumeWriter
    from clemflow.align.warp import warp_slice
    from clemflow.qc.monitor import QCMonitor
    from clemflow.qc.qclog import QCLog
    from clemflow.simulators.specimen import SpecimenParams, generate_world
    from clemflow.simulators.specimen.em import DriftModel, EMImperfections, face_through, render_em_slice

    out = tmp_path_factory.mktemp("report") / "aligned"
    world = generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=3), seed=4)
    face = face_through(world, world.cells[0].nucleus_center_um)
    imp = EMImperfections(drift=True)
    drift = DriftModel(seed=4, step_nm=50.0, jump_probability=0.0)
    aligner, monitor = CoarseAligner(), QCMonitor()
    writer = AlignedVolumeWriter(out / "aligned.ome.zarr", (SIZE, SIZE), np.uint8, PIXEL_NM, THICKNESS_NM,
                                 chunks=(1, 128, 128), depth=DEPTH)
    transforms = TransformsCsv(out / "transforms.csv")
    log = QCLog(out)
    image = None
    for i in range(N_SLICES):
        if i != DUPLICATE:  # slice DUPLICATE shows the face of the slice before: a fault the report must count
            image, _ = render_em_slice(world, -2.0 + i * THICKNESS_NM / 1000, (0.0, 3.5), PIXEL_NM, (SIZE, SIZE),
                                       imperfections=imp, seed=4, face=face, slice_index=i, drift_model=drift)
        shift = aligner.add(i, image)
        qc = monitor.add(i, image, shift)
        transform = SliceTransform(i, shift.dx, shift.dy, confidence=min(shift.confidence, 1e6),
                                   coarse_dx=shift.dx, coarse_dy=shift.dy, fine_model="none")
        transforms.write(transform)
        writer.write(i, warp_slice(image, transform))
        log.append(qc)
        MONITOR_SAID.append(qc)
    return out


MONITOR_SAID: list = []  # what the QC monitor answered for each slice, filled by the fixture


def _image_area(png: Path) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (top, bottom, left, right) of the drawn images in a PNG, largest first.

    An image is a large non-white region; rows and columns count only where they cross most of it, so
    the axis frame's ticks and the labels do not widen the box.
    """
    from PIL import Image
    from skimage.measure import label, regionprops

    grey = np.asarray(Image.open(png).convert("L"))
    boxes = []
    for region in sorted(regionprops(label(grey < 250)), key=lambda r: -r.area)[:2]:
        if region.area < 0.02 * grey.size:
            continue
        mask = region.image
        rows = np.flatnonzero(mask.sum(axis=1) > 0.5 * mask.shape[1])
        cols = np.flatnonzero(mask.sum(axis=0) > 0.5 * mask.shape[0])
        r0, c0 = region.bbox[:2]
        boxes.append((r0 + rows[0], r0 + rows[-1] + 1, c0 + cols[0], c0 + cols[-1] + 1))
    return boxes


def test_report_draws_reslices_to_scale_and_summarises(aligned_dir: Path) -> None:
    from clemflow.align.csvio import read_transforms
    from clemflow.qc.report import write_report

    summary = write_report(aligned_dir.parent)  # a run folder: the outputs are found in aligned/
    assert summary.out_dir == aligned_dir
    names = sorted(p.name for p in summary.pngs)
    assert names == ["drift.png", "qc.png", "reslice_xz.png", "reslice_yz.png"]
    for png in summary.pngs:
        assert png.stat().st_size > 10_000

    # only the 40 written slices are drawn, to scale: 4 µm deep against 6.4 µm wide
    for name in ("reslice_xz.png", "reslice_yz.png"):
        boxes = _image_area(aligned_dir / name)
        assert len(boxes) == 1
        top, bottom, left, right = boxes[0]
        assert (bottom - top) / (right - left) == pytest.approx(N_SLICES * THICKNESS_NM / (SIZE * PIXEL_NM), rel=0.04)
        from PIL import Image
        section = np.asarray(Image.open(aligned_dir / name).convert("L"))[top + 2:bottom - 2, left + 2:right - 2]
        assert section.std() > 10  # tissue, not a blank

    transforms = read_transforms(aligned_dir / "transforms.csv")
    dx, dy = [t.dx for t in transforms], [t.dy for t in transforms]
    assert summary.slices == N_SLICES and summary.qc_slices == N_SLICES
    assert summary.dx_range == (min(dx), max(dx)) and summary.dy_range == (min(dy), max(dy))
    assert max(dx) - min(dx) > 2.0  # 50 nm per slice of drift moved the stack by pixels
    ncc = [qc.metrics["ncc"] for qc in MONITOR_SAID]
    assert summary.median_ncc == pytest.approx(np.nanmedian(ncc), abs=1e-5)  # qc.csv keeps 6 digits
    kinds: dict[str, int] = {}
    for qc in MONITOR_SAID:
        for k in qc.kinds:
            kinds[k] = kinds.get(k, 0) + 1
    assert "duplicate" in kinds  # the repeated slice was seen, and is counted below
    assert summary.alerts_by_kind == kinds


def test_reslice_beside_unaligned_input(aligned_dir: Path, tmp_path: Path) -> None:
    from clemflow.align.volume import read_volume
    from clemflow.qc.plots import write_reslices

    volume = read_volume(aligned_dir / "aligned.ome.zarr")
    raw = np.asarray(volume[:N_SLICES])[:, ::-1, :]  # a stand-in for the input, same shape
    xz, _ = write_reslices(aligned_dir, raw=raw)
    boxes = _image_area(xz)
    assert len(boxes) == 2  # unaligned and aligned, side by side, the same size
    (t1, b1, l1, r1), (t2, b2, l2, r2) = boxes
    assert abs((b1 - t1) - (b2 - t2)) <= 2 and abs((r1 - l1) - (r2 - l2)) <= 2
    with pytest.raises(ValueError, match="shape"):
        write_reslices(aligned_dir, raw=raw[:, :10])


def test_cli_report_prints_the_summary(aligned_dir: Path, cli) -> None:
    code, out = cli("qc", "report", aligned_dir)
    assert code == 0, out
    assert "slices aligned" in out and f" {N_SLICES}" in out
    assert "median neighbour NCC" in out
    for name in ("reslice_xz.png", "reslice_yz.png", "drift.png", "qc.png"):
        assert name in out


def test_cli_report_refuses_a_folder_without_outputs(tmp_path: Path, cli) -> None:
    code, out = cli("qc", "report", tmp_path)
    assert code == 2
    assert str(tmp_path) in out and "transforms.csv" in out and "clemflow align" in out
    code, out = cli("qc", "report", tmp_path / "absent")
    assert code == 2 and "no such folder" in out
