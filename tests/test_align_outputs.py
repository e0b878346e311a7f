"""Alignment inputs and outputs: slice sources, the OME-Zarr volume, the display copy and transforms.csv.

The input builders here are also used by test_align_cli.py.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from clemflow.align.csvio import TransformsCsv, read_coarse, read_transforms, write_coarse
from clemflow.align.display import display_slice
from clemflow.align.sources import SourceError, open_source
from clemflow.align.transforms import CoarseShift, SliceTransform
from clemflow.align.volume import AlignedVolumeWriter, VolumeError, read_scale, read_volume

STACK = "fibsem_medulla_10nm_250.tif"


# ---------------------------------------------------------------- input builders (also for test_align_cli.py)


def real_stack(shared_data: Path, n: int, size: int = 128, first: int = 0) -> np.ndarray:
    """``n`` slices of the real stack from ``first``, cropped to ``size`` x ``size`` about the centre."""
    with tifffile.TiffFile(shared_data / STACK) as tif:
        pages = [tif.pages[first + i].asarray() for i in range(n)]
    stack = np.stack(pages)
    y0, x0 = (stack.shape[1] - size) // 2, (stack.shape[2] - size) // 2
    return np.ascontiguousarray(stack[:, y0:y0 + size, x0:x0 + size])


def write_stack_tiff(path: Path, stack: np.ndarray, pixel_nm: float = 10.0, thickness_nm: float = 10.0) -> Path:
    """A multi-page OME-TIFF with physical sizes in µm, as tifffile writes it."""
    tifffile.imwrite(path, stack, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": pixel_nm / 1000, "PhysicalSizeY": pixel_nm / 1000,
        "PhysicalSizeZ": thickness_nm / 1000})
    return path


def write_slice_folder(folder: Path, stack: np.ndarray, pixel_nm: float = 10.0) -> Path:
    """One TIFF per slice named without zero padding (img_2 before img_10 only in natural order), resolution in cm."""
    folder.mkdir(parents=True, exist_ok=True)
    per_cm = 1e7 / pixel_nm
    for i, image in enumerate(stack):
        tifffile.imwrite(folder / f"img_{i + 1}.tif", image, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return folder


def write_run_folder(run: Path, stack: np.ndarray, pixel_nm: float = 10.0, thickness_nm: float = 10.0,
                     skip: tuple[int, ...] = ()) -> Path:
    """A slice-and-view run folder as the engine leaves it: slices/slice_NNNNNN.tif (from 1) and slices.jsonl."""
    from clemflow.fibsem.slices import SliceWriter
    from clemflow.fibsem.stream import SliceStream

    writer, stream = SliceWriter(run), SliceStream(run)
    for i, image in enumerate(stack, start=1):
        if i in skip:
            continue
        meta = {"instrument": {"pixel_size_m": [pixel_nm * 1e-9, pixel_nm * 1e-9]},
                "clemflow": {"slice_index": i, "slice_thickness_m": thickness_nm * 1e-9}}
        path = writer.write(i, image, meta)
        stream.publish({"index": i, "path": str(path.relative_to(run)), "depth_m": i * thickness_nm * 1e-9,
                        "thickness_m": thickness_nm * 1e-9, "pixel_size_m": [pixel_nm * 1e-9, pixel_nm * 1e-9]})
    return run


# ---------------------------------------------------------------- sources


def test_three_input_kinds_give_the_same_slices_and_sizes(shared_data: Path, tmp_path: Path) -> None:
    stack = real_stack(shared_data, 12)
    tiff = open_source(write_stack_tiff(tmp_path / "stack.ome.tif", stack, 10.0, 20.0))
    folder = open_source(write_slice_folder(tmp_path / "folder", stack, 5.0))
    run = open_source(write_run_folder(tmp_path / "run", stack, 10.0, 30.0))
    assert (tiff.kind, folder.kind, run.kind) == ("tiff", "folder", "run")
    assert tiff.indices == tuple(range(12)) and folder.indices == tuple(range(12))
    assert run.indices == tuple(range(1, 13))  # the engine numbers slices from 1
    for source in (tiff, folder, run):
        assert len(source) == 12 and source.shape == (128, 128) and source.dtype == np.uint8
    got = [np.stack([img for _, img in source]) for source in (tiff, folder, run)]
    for g in got:
        np.testing.assert_array_equal(g, stack)  # folder: img_10 after img_9 (natural order)
    assert tiff.pixel_size_nm == pytest.approx(10.0) and tiff.slice_thickness_nm == pytest.approx(20.0)
    assert folder.pixel_size_nm == pytest.approx(5.0) and folder.slice_thickness_nm is None
    assert run.pixel_size_nm == pytest.approx(10.0) and run.slice_thickness_nm == pytest.approx(30.0)
    np.testing.assert_array_equal(run.subset([3, 4]).read(4), stack[3])
    with pytest.raises(IndexError, match="no slice 0"):
        run.read(0)


def test_run_folder_with_a_missing_slice_keeps_engine_numbers(shared_data: Path, tmp_path: Path) -> None:
    stack = real_stack(shared_data, 6, 64)
    run = open_source(write_run_folder(tmp_path / "run", stack, skip=(3,)))
    assert run.indices == (1, 2, 4, 5, 6) and 3 not in run
    np.testing.assert_array_equal(run.read(4), stack[3])


def test_imagej_stack_with_one_ifd_is_read_plane_by_plane(shared_data: Path, tmp_path: Path) -> None:
    """ImageJ saves stacks over 4 GB with a single IFD and the planes after it; all of them are slices."""
    stack = real_stack(shared_data, 5, 64)
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, stack, imagej=True, truncate=True, resolution=(100.0, 100.0),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": 0.03})
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1
    source = open_source(path)
    assert len(source) == 5 and source.pixel_size_nm == pytest.approx(10.0)
    assert source.slice_thickness_nm == pytest.approx(30.0)
    np.testing.assert_array_equal(np.stack([source.read(i) for i in (4, 0, 2, 1, 3)]), stack[[4, 0, 2, 1, 3]])


def test_the_real_stack_is_read_page_by_page_not_whole(shared_data: Path) -> None:
    tracemalloc.start()
    try:
        source = open_source(shared_data / STACK)
        image = source.read(200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert source.pixel_size_nm == pytest.approx(10.0) and source.slice_thickness_nm == pytest.approx(10.0)
    assert image.shape == (250, 250) and len(source) == 250
    assert peak < 250 * 250 * 250 / 10  # the whole stack would be 15.6 MB


@pytest.mark.parametrize("case", ["missing", "not_tiff", "empty_folder", "rgb", "mixed_sizes", "empty_stream"])
def test_unusable_inputs_are_refused_by_name(case: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    if case == "missing":
        path = tmp_path / "nowhere.tif"
    elif case == "not_tiff":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif case == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "rgb":
        path = tmp_path / "rgb.tif"
        tifffile.imwrite(path, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), photometric="rgb")
    elif case == "mixed_sizes":
        path = tmp_path / "mixed"
        path.mkdir()
        tifffile.imwrite(path / "a1.tif", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        tifffile.imwrite(path / "a2.tif", rng.integers(0, 255, (32, 40), dtype=np.uint8))
    else:
        path = tmp_path / "run"
        path.mkdir()
        (path / "slices.jsonl").write_text("")
    with pytest.raises(SourceError) as info:
        source = open_source(path)
        for _ in source:
            pass
    message = str(info.value)
    assert str(path) in message
    expected = {"missing": "accepted inputs", "not_tiff": "accepted inputs", "empty_folder": "no .tif",
                "rgb": "grey", "mixed_sizes": "same size", "empty_stream": "no saved slice"}[case]
    assert expected in message


# ---------------------------------------------------------------- volume


def test_volume_grows_resumes_and_carries_physical_sizes(tmp_path: Path) -> None:
    import yaozarrs

    path = tmp_path / "aligned.ome.zarr"
    rng = np.random.default_rng(2)
    slices = rng.integers(1, 255, (6, 70, 90), dtype=np.uint8)
    writer = AlignedVolumeWriter(path, (70, 90), np.uint8, 10.0, 25.0, chunks=(1, 32, 32))
    for z in (0, 1, 2):
        writer.write(z, slices[z])
    assert writer.depth == 3
    again = AlignedVolumeWriter(path, (70, 90), np.uint8, 10.0, 25.0, chunks=(1, 32, 32))  # resume
    again.write(5, slices[5])
    volume = read_volume(path)
    assert volume.shape == (6, 70, 90)
    np.testing.assert_array_equal(volume[:3], slices[:3])  # reopening erased nothing
    assert not volume[3:5].any()  # not yet written: the fill value
    np.testing.assert_array_equal(volume[5], slices[5])
    scale, units = read_scale(path)
    assert scale == pytest.approx((0.025, 0.010, 0.010)) and units == ("micrometer",) * 3
    assert read_scale(path, 1)[0] == pytest.approx((0.025, 0.020, 0.020))
    half = read_volume(path, 1)
    assert half.shape == (6, 35, 45)
    assert half[5, 3, 4] == round(slices[5, 6:8, 8:10].astype(float).mean())
    yaozarrs.validate_zarr_store(str(path))  # OME-Zarr 0.5 as the spec's models read it
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
    with pytest.raises(VolumeError, match="another output folder"):
        AlignedVolumeWriter(path, (64, 64), np.uint8, 10.0, 25.0)


def _write_some(args: tuple[str, list[int]]) -> None:
    path, zs = args
    writer = AlignedVolumeWriter(path, (40, 40), np.uint8, 10.0, 10.0, chunks=(1, 16, 16))
    for z in zs:
        writer.write(z, np.full((40, 40), z + 1, np.uint8))


def test_processes_write_distinct_slices_of_a_precreated_volume(tmp_path: Path) -> None:
    path = tmp_path / "v.ome.zarr"
    AlignedVolumeWriter(path, (40, 40), np.uint8, 10.0, 10.0, chunks=(1, 16, 16), depth=12)
    parts = [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.map(_write_some, [(str(path), p) for p in parts])
    volume = read_volume(path)[:]
    assert volume.shape == (12, 40, 40)
    assert [int(v) for v in volume[:, 20, 20]] == list(range(1, 13)) and (volume == volume[:, :1, :1]).all()


# ---------------------------------------------------------------- display copy


def test_display_copy_evens_out_shading_and_keeps_the_empty_border(shared_data: Path) -> None:
    from skimage import exposure

    image = real_stack(shared_data, 1, 240)[0].astype(np.float32)
    ramp = np.linspace(0.3, 1.0, image.shape[1], dtype=np.float32)[None, :]  # a charging-like left-right shading
    shaded = np.clip(image * ramp, 0, 255).astype(np.uint8)
    shaded[:, :12] = 0  # the empty field an alignment shift leaves
    out = display_slice(shaded)
    assert out.dtype == np.uint8 and out.shape == shaded.shape
    assert not out[:, :12].any()
    reference = exposure.equalize_adapthist(shaded, clip_limit=0.01) * 255

    def right_over_left(a: np.ndarray) -> float:
        return float(a[:, -60:].mean() / a[:, 20:80].mean())

    assert right_over_left(shaded) > 2.0
    assert right_over_left(out) < 0.8 * right_over_left(shaded)  # shading evened out ...
    assert right_over_left(out) == pytest.approx(right_over_left(reference), abs=0.1)  # ... as skimage's CLAHE does
    assert out[:, 20:80].std() > 1.8 * shaded[:, 20:80].std()  # local contrast raised where it was dim
    assert np.corrcoef(out[:, 12:].ravel(), reference[:, 12:].ravel())[0, 1] > 0.95


def test_display_copy_of_16_bit_slices(shared_data: Path) -> None:
    image = real_stack(shared_data, 1, 128)[0]
    wide = (20000 + 37 * image.astype(np.uint32)).astype(np.uint16)  # a detector using a narrow band of 16 bits
    out, reference = display_slice(wide), display_slice(image)
    assert out.dtype == np.uint8 and out.std() > 40
    assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.97


# ---------------------------------------------------------------- transforms.csv


def test_transforms_csv_writes_each_slice_once_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "transforms.csv"
    a = SliceTransform(3, 1.0 / 3.0, -2.5, (1.0001, 0.002, -0.002, 0.9999), 17.25, 1.25, -2.0, "affine",
                       {"residual_px": 0.125})
    b = SliceTransform(1, -0.1, 0.7, confidence=math.inf)
    table = TransformsCsv(path)
    assert table.write(a) and not table.write(SliceTransform(3, 99.0, 99.0))
    assert table.write_many([b, b]) == 1
    with path.open("a") as handle:
        handle.write("7,0.5,0.2")  # a crash in the middle of a row
    reopened = TransformsCsv(path)
    assert reopened.written == {1, 3}
    reopened.write(SliceTransform(7, 2.0, 2.0, extra={"fine_rejected": 1.0}))  # a key no row had: header widened
    reopened.write(SliceTransform(5, 0.0, 0.0, extra={"residual_px": 0.5}))
    reopened.sort()
    lines = path.read_text().splitlines()
    assert lines[0] == ("slice,dx,dy,confidence,coarse_dx,coarse_dy,fine_model,a11,a12,a21,a22,"
                        "fine_rejected,residual_px")
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "3", "5", "7"]
    rows = read_transforms(path)
    assert rows[1] == a  # exact floats, the extra column kept through the rewrite
    assert rows[0].confidence == math.inf and rows[0].extra == {}
    assert rows[3].dx == 2.0 and rows[3].extra == {"fine_rejected": 1.0} and rows[2].extra == {"residual_px": 0.5}


def test_coarse_csv_round_trip(tmp_path: Path) -> None:
    shifts = [CoarseShift(2, 0.1, -0.2, 0.3, 0.4, 9.5, "", True), CoarseShift(1, 0.0, 0.0, 0.0, 0.0, math.inf)]
    write_coarse(tmp_path / "coarse.csv", shifts)
    back = read_coarse(tmp_path / "coarse.csv")
    assert back == {1: shifts[1], 2: shifts[0]}
