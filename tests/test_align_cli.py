"""`clemflow align`: the three input kinds, known shifts recovered, dask = in-process, resume, refusals.

Inputs are the first 30 slices of the real stack (shared/data), so that each alignment takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clemflow.align.csvio import read_transforms
from clemflow.align.equivariance import equivariance_error, inject_drift
from clemflow.align.transforms import SliceTransform
from clemflow.align.volume import read_scale, read_volume
from conftest import SHARED_DATA
from test_align_outputs import real_stack, write_run_folder, write_slice_folder, write_stack_tiff

N = 30


def applied(out: Path) -> np.ndarray:
    """(n, 2) translations dx, dy applied to each slice, in slice order."""
    return np.array([(t.dx, t.dy) for t in read_transforms(out / "transforms.csv")])


def assert_same_transforms(a: list[SliceTransform], b: list[SliceTransform]) -> None:
    """Equal to the last bit, NaN equal to NaN (a fine fit without residual writes nan)."""
    def fields(ts: list[SliceTransform]) -> list[tuple]:
        return [(t.index, t.dx, t.dy, t.linear, t.confidence, t.coarse_dx, t.coarse_dy, t.fine_model,
                 sorted(t.extra.items())) for t in ts]

    np.testing.assert_equal(fields(a), fields(b))


@pytest.fixture(scope="module")
def drift() -> dict:
    """The real stack cropped, and a copy whose content moves by known shifts (steps, a 25 px jump, jitter)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real microscope data not found at {SHARED_DATA}")
    base = real_stack(SHARED_DATA, N, 250)
    rng = np.random.default_rng(8)
    shifts = np.cumsum(rng.normal(0, 1.5, (N, 2)), axis=0) + rng.normal(0, 0.7, (N, 2))
    shifts[N // 2:] += (-25.0, 14.0)  # a jump: the stage slipped
    shifts -= (shifts.max(axis=0) + shifts.min(axis=0)) / 2
    stacks = inject_drift(base, shifts, margin=4)
    return {"moved": stacks.moved, "unmoved": stacks.unmoved, "shifts": stacks.shifts}


@pytest.fixture(scope="module")
def aligned_pair(drift: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Moved and unmoved stacks aligned once by the command line (shared by several tests)."""
    from typer.testing import CliRunner

    from clemflow.cli.app import _register, app

    _register()
    root = tmp_path_factory.mktemp("pair")
    outs = {}
    for name in ("moved", "unmoved"):
        tiff = write_stack_tiff(root / f"{name}.ome.tif", drift[name], 10.0, 15.0)
        result = CliRunner().invoke(app, ["align", str(tiff), "--out", str(root / name), "--no-report"])
        assert result.exit_code == 0, result.output
        outs[name], outs[f"{name}_input"] = root / name, tiff
    return outs


def test_known_shifts_are_recovered_in_the_csv_convention(drift: dict, aligned_pair: dict) -> None:
    moved, unmoved = applied(aligned_pair["moved"]), applied(aligned_pair["unmoved"])
    assert moved.shape == unmoved.shape == (N, 2)
    # content moved by +s needs -s more applied: dx_moved + s = dx_unmoved, up to one offset for the whole stack
    # (the original stack's own registration is not perfect, so the unmoved run is the reference, not zero)
    error = moved + drift["shifts"] - unmoved
    error -= error.mean(axis=0)
    per_slice = np.hypot(error[:, 0], error[:, 1])
    assert np.sqrt(np.mean(per_slice**2)) < 0.3 and per_slice.max() < 0.8, np.round(per_slice, 2)
    judged = equivariance_error(moved, unmoved, drift["shifts"])  # the measure: slow trend apart
    assert judged.fast_rms < 0.3 and judged.fast_max < 0.6, str(judged)
    jump = N // 2
    step = moved[jump] - moved[jump - 1]
    assert step[0] > 20 and step[1] < -9  # content jumped by (-25, +14): the applied shift jumps back


def test_outputs_are_readable_with_physical_sizes(drift: dict, aligned_pair: dict) -> None:
    out = aligned_pair["moved"]
    size = drift["moved"].shape[1]
    for name, dtype in (("aligned.ome.zarr", np.uint8), ("display.ome.zarr", np.uint8)):
        volume = read_volume(out / name)
        assert volume.shape == (N, size, size) and volume.dtype == dtype
        scale, units = read_scale(out / name)
        assert scale == pytest.approx((0.015, 0.010, 0.010)) and units == ("micrometer",) * 3
    header = (out / "transforms.csv").read_text().splitlines()[0]
    assert header.startswith("slice,dx,dy,confidence,coarse_dx,coarse_dy,fine_model,a11,a12,a21,a22")
    manifest = json.loads((out / "alignment.json").read_text())
    assert manifest["input"]["slices"] == N and manifest["pixel_size_nm"] == pytest.approx(10.0)


def test_the_volume_holds_the_aligned_slices(drift: dict, aligned_pair: dict) -> None:
    """Aligned moved slices show the aligned unmoved ones, displaced by the one offset between the two runs."""
    moved = read_volume(aligned_pair["moved"] / "aligned.ome.zarr")[:].astype(float)
    unmoved = read_volume(aligned_pair["unmoved"] / "aligned.ome.zarr")[:].astype(float)
    gx, gy = np.rint((applied(aligned_pair["moved"]) + drift["shifts"] - applied(aligned_pair["unmoved"])).mean(axis=0))
    gx, gy = int(gx), int(gy)
    m = 30 + max(abs(gx), abs(gy))
    h, w = moved.shape[1:]
    for z in (0, N // 2, N - 1):
        a = moved[z, m:h - m, m:w - m]
        b = unmoved[z, m - gy:h - m - gy, m - gx:w - m - gx]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9, z


def test_three_input_kinds_give_the_same_transforms(cli, drift: dict, aligned_pair: dict, tmp_path: Path) -> None:
    stack = drift["moved"]
    folder = write_slice_folder(tmp_path / "folder", stack, 10.0)
    run = write_run_folder(tmp_path / "run", stack, 10.0, 15.0)
    for source, out in ((folder, tmp_path / "a_folder"), (run, tmp_path / "a_run")):
        code, output = cli("align", source, "--out", out, "--no-report", "--no-display", "--slice-thickness", "15")
        assert code == 0, output
    reference = read_transforms(aligned_pair["moved"] / "transforms.csv")
    from_folder = read_transforms(tmp_path / "a_folder" / "transforms.csv")
    from_run = read_transforms(tmp_path / "a_run" / "transforms.csv")
    assert [t.index for t in from_folder] == list(range(N)) and [t.index for t in from_run] == list(range(1, N + 1))
    for a, b, c in zip(reference, from_folder, from_run):
        assert (a.dx, a.dy, a.linear) == (b.dx, b.dy, b.linear) == (c.dx, c.dy, c.linear)
    assert read_scale(tmp_path / "a_run" / "aligned.ome.zarr")[0] == pytest.approx((0.015, 0.010, 0.010))


def test_dask_scheduler_gives_the_in_process_answer(cli, drift: dict, aligned_pair: dict, tmp_path: Path) -> None:
    """--scheduler local: chunks pickled to a worker process, which reads the input and writes the zarr itself."""
    tiff = write_stack_tiff(tmp_path / "moved.ome.tif", drift["moved"], 10.0, 15.0)
    code, output = cli("align", tiff, "--out", tmp_path / "dask", "--scheduler", "local", "--workers", "1",
                       "--chunk", "7", "--no-report")
    assert code == 0, output
    assert f"{N} slices" in " ".join(output.split()) and f"{N} aligned now" in " ".join(output.split())
    reference = read_transforms(aligned_pair["moved"] / "transforms.csv")
    assert_same_transforms(read_transforms(tmp_path / "dask" / "transforms.csv"), reference)  # to the last bit
    for name in ("aligned.ome.zarr", "display.ome.zarr"):
        np.testing.assert_array_equal(read_volume(tmp_path / "dask" / name)[:],
                                      read_volume(aligned_pair["moved"] / name)[:])


def test_resume_aligns_only_what_is_missing_and_rewrites_nothing(cli, aligned_pair: dict, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(aligned_pair["moved"], out)  # a finished alignment of the same input ...
    lines = (out / "transforms.csv").read_text().splitlines()
    (out / "transforms.csv").write_text("\n".join(lines[:1 + 12]) + "\n")  # ... as if stopped after 12 slices
    chunks = out / "aligned.ome.zarr" / "0" / "c"
    kept = {p: p.stat().st_mtime_ns for p in chunks.glob("[0-9]/**/*") if p.is_file()}  # slices 0-9
    assert kept
    code, output = cli("align", aligned_pair["moved_input"], "--out", out, "--no-report", "--chunk", "8")
    assert code == 0, output
    flat = " ".join(output.split())  # the console wraps long paths wherever the width falls
    assert f"{N - 12} aligned now, 12 from before" in flat and "coarse.csv" in flat
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # slices done before were not written again
    assert_same_transforms(read_transforms(out / "transforms.csv"),
                           read_transforms(aligned_pair["moved"] / "transforms.csv"))
    code, output = cli("align", aligned_pair["moved_input"], "--out", out, "--no-report")
    assert code == 0 and "0 aligned now" in " ".join(output.split())


def test_another_alignment_or_a_foreign_folder_is_refused(cli, drift: dict, aligned_pair: dict, tmp_path: Path) -> None:
    other = write_stack_tiff(tmp_path / "other.ome.tif", drift["unmoved"][:10], 10.0, 15.0)
    before = (aligned_pair["moved"] / "transforms.csv").read_bytes()
    code, output = cli("align", other, "--out", aligned_pair["moved"])
    assert code == 3 and "holds another alignment" in " ".join(output.split()) and "slices was 30, now 10" in " ".join(output.split())
    assert (aligned_pair["moved"] / "transforms.csv").read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("keep me")
    code, output = cli("align", other, "--out", foreign)
    assert code == 3 and "not an alignment folder" in output and (foreign / "thesis.docx").exists()
    code, output = cli("align", tmp_path / "nothing.tif", "--out", tmp_path / "x")
    assert code == 2 and "nothing.tif" in output and "accepted inputs" in output


def test_protocol_sets_the_method(cli, drift: dict, protocols_dir: Path, tmp_path: Path) -> None:
    text = (protocols_dir / "fibsem_slice_and_view.yaml").read_text()
    text = text.replace("alignment: {long_range_every: 8, fine_model: affine, fine_radius: 7}",
                        "alignment: {coarse_binning: 1, long_range_every: 8, fine_model: translation, fine_radius: 2}")
    assert "fine_model: translation" in text
    protocol = tmp_path / "p.yaml"
    protocol.write_text(text)
    tiff = write_stack_tiff(tmp_path / "s.ome.tif", drift["moved"][:10], 10.0, 15.0)
    code, output = cli("align", tiff, "--out", tmp_path / "out", "--protocol", protocol, "--no-report",
                       "--no-display")
    assert code == 0, output
    assert {t.fine_model for t in read_transforms(tmp_path / "out" / "transforms.csv")} == {"translation"}
    settings = json.loads((tmp_path / "out" / "alignment.json").read_text())["settings"]
    assert settings["fine_radius"] == 2 and settings["coarse_binning"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("fine_radius: 2", "fine_radius: 0"))
    code, output = cli("align", tiff, "--out", tmp_path / "out2", "--protocol", bad)
    assert code == 2 and "fine_radius" in output
