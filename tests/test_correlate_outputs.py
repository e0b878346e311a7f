"""Correlation inputs and outputs against the specimen's truth: readers, transform.json, landmarks, LM on the EM grid,
overlays.

One small correlative pair (a quarter of the cell milled, EM at 100 nm voxels) and its exact LM -> EM matrix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import tifffile
import zarr

from clemflow.align.outputs import ALIGNED, AlignedStores
from clemflow.confocal.writer import StackWriter
from clemflow.correlate.blobs import Blobs
from clemflow.correlate.inputs import ElectronVolume, LightStack, read_em, read_lm
from clemflow.correlate.outputs import (
    LANDMARK_COLUMNS,
    read_transform,
    resample_to_em,
    write_landmarks,
    write_lm_on_em,
    write_transform,
)
from clemflow.correlate.overlays import write_overlays
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.clem_pair import LM_CHANNELS, apply, make_clem_pair
from clemflow.simulators.specimen.preview import pick_cell


@pytest.fixture(scope="module")
def pair():
    world = generate_world(SpecimenParams(n_columns=1, n_rows=1, cells_per_square=3), seed=3)
    return make_clem_pair(world, pick_cell(world), em_fraction=(0.35, 0.6), em_pixel_nm=100, em_slice_nm=100)


@pytest.fixture(scope="module")
def on_em(pair):
    """All three LM channels resampled onto the EM grid with the true matrix."""
    return {ch: resample_to_em(pair.lm[c], pair.lm_voxel_um, pair.lm_to_em, pair.em.shape, pair.em_voxel_um)
            for c, ch in enumerate(LM_CHANNELS)}


@pytest.fixture(scope="module")
def droplets(pair):
    """Truth droplets inside the EM volume (0.3 µm in from its faces) and at least 0.15 µm in radius."""
    d = pair.objects("lipid_droplets")
    keep = pair.in_em(d["em"], 0.3) & (d["radius_um"] >= 0.15)
    assert keep.sum() >= 5
    return {k: v[keep] for k, v in d.items()}


def _voxel_index(points_um, voxel_um):
    return np.rint(np.asarray(points_um)[:, ::-1] / np.asarray(voxel_um)).astype(int)


@dataclass
class FakeRegistration:
    """The fields of clemflow.correlate.register.Registration that the writers read."""

    matrix: np.ndarray
    pairs: np.ndarray
    residuals_um: np.ndarray
    loo_tre_um: np.ndarray
    tre_estimate_um: float
    model: str = "similarity_z"
    mirrored: bool = True
    scale: float = 0.97
    z_scale: float = 1.1
    candidates: int = 12
    models_tried: dict = field(default_factory=lambda: {"similarity": 0.2, "similarity_z": 0.12})


# -- LM on the EM grid -----------------------------------------------------------------------------------------------

def test_resampled_bodipy_lies_on_the_em_droplets(pair, on_em, droplets):
    resampled = on_em["488"]
    assert resampled.dtype == np.float32 and resampled.shape == pair.em.shape
    background = np.median(resampled[resampled > 0])
    at_droplets = resampled[tuple(_voxel_index(droplets["em"], pair.em_voxel_um).T)]
    assert np.median(at_droplets) > 10 * background
    # the same channel through a wrong (mirrored) matrix does not land on them: the check can fail
    cx = (pair.lm_shape[2] - 1) * pair.lm_voxel_um[2]
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    mirror[0, 3] = cx
    wrong = resample_to_em(pair.lm[1], pair.lm_voxel_um, pair.lm_to_em @ mirror, pair.em.shape, pair.em_voxel_um)
    assert np.median(wrong[tuple(_voxel_index(droplets["em"], pair.em_voxel_um).T)]) < 3 * background


def test_isolated_droplet_peaks_at_its_em_centre(pair, on_em, droplets):
    resampled = on_em["488"]
    everyone = pair.objects("lipid_droplets")["em"]
    checked = 0
    for centre in droplets["em"]:
        gaps = np.linalg.norm(everyone - centre, axis=1)
        if np.sort(gaps)[1] < 1.5:
            continue
        idx = _voxel_index(centre[None], pair.em_voxel_um)[0]
        box = tuple(slice(max(i - 6, 0), i + 7) for i in idx)
        local = resampled[box]
        peak = np.array(np.unravel_index(np.argmax(local), local.shape)) + [s.start for s in box]
        assert np.all(np.abs(peak - idx) <= 1), (centre, peak, idx)
        checked += 1
    assert checked >= 2


def test_resample_into_an_integer_array_and_onto_a_coarser_grid(pair, on_em):
    planes = (20, *pair.em.shape[1:])
    out = np.zeros(planes, np.uint16)
    done = []
    resample_to_em(pair.lm[1], pair.lm_voxel_um, pair.lm_to_em, planes, pair.em_voxel_um, out=out,
                   progress=lambda k, n: done.append((k, n)))
    assert done[-1] == (20, 20)
    expected = np.clip(np.rint(on_em["488"][:20]), 0, 65535)
    assert np.array_equal(out, expected.astype(np.uint16))
    # a 2x coarser grid starting one plane in samples the same physical points as every other voxel of the full one
    ez, ey, ex = pair.em_voxel_um
    coarse_shape = (10, (pair.em.shape[1] + 1) // 2, (pair.em.shape[2] + 1) // 2)
    coarse = resample_to_em(pair.lm[1], pair.lm_voxel_um, pair.lm_to_em, coarse_shape, (2 * ez, 2 * ey, 2 * ex),
                            em_origin_um=(ez, 0.0, 0.0))
    np.testing.assert_allclose(coarse, on_em["488"][1:21:2, ::2, ::2], rtol=1e-4, atol=1e-2)


def test_lm_on_em_file_opens_as_a_stack_on_the_em_grid(tmp_path, pair, on_em):
    lm = LightStack(pair.lm, list(LM_CHANNELS), pair.lm_voxel_um, selected="488")
    shape = (12, *pair.em.shape[1:])
    path = write_lm_on_em(tmp_path / "lm_on_em.ome.tif", lm, pair.lm_to_em, shape, pair.em_voxel_um)
    back = read_lm(path)
    assert back.channels == list(LM_CHANNELS)
    np.testing.assert_allclose(back.voxel_um, pair.em_voxel_um)
    assert back.data.shape == (3, *shape) and back.data.dtype == np.uint16
    for ch in LM_CHANNELS:
        assert np.array_equal(back.channel(ch), np.clip(np.rint(on_em[ch][:12]), 0, 65535).astype(np.uint16))


# -- transform.json and the landmark table ---------------------------------------------------------------------------

def _registration(pair, n):
    residuals = np.linspace(0.02, 0.2, n)
    return FakeRegistration(matrix=pair.lm_to_em, pairs=np.stack([np.arange(n), (np.arange(n) * 7) % n], axis=1),
                            residuals_um=residuals, loo_tre_um=residuals * 1.3, tre_estimate_um=0.15)


def test_transform_json_round_trips_and_maps_droplets(tmp_path, pair, droplets):
    lm = LightStack(pair.lm, list(LM_CHANNELS), pair.lm_voxel_um, path=tmp_path / "lm.ome.tif", selected="488")
    em = ElectronVolume(pair.em, pair.em_voxel_um, path=tmp_path / "em")
    reg = _registration(pair, 11)
    path = write_transform(tmp_path / "out" / "transform.json", reg, lm=lm, em=em, extra={"command": "correlate"})
    matrix = read_transform(path)
    assert matrix.shape == (4, 4)
    mapped = droplets["lm"] @ matrix[:3, :3].T + matrix[:3, 3]
    assert np.abs(mapped - droplets["em"]).max() < 1e-6
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["model"] == "similarity_z" and doc["mirrored"] is True and doc["inliers"] == 11
    assert doc["lm"]["channel"] == "488" and doc["lm"]["voxel_um"] == list(pair.lm_voxel_um)
    assert doc["em"]["voxel_um"] == list(pair.em_voxel_um) and doc["command"] == "correlate"
    assert doc["residuals_um"]["median"] == pytest.approx(np.median(reg.residuals_um))
    assert doc["loo_tre_um"]["max"] == pytest.approx(reg.loo_tre_um.max())
    assert np.allclose(np.asarray(doc["inverse"]) @ matrix, np.eye(4))
    assert "centre of voxel" in doc["convention"]
    with pytest.raises(ValueError, match="model"):
        write_transform(tmp_path / "t2.json", reg, lm=lm, em=em, extra={"model": "mine"})
    other = write_transform(tmp_path / "t3.json", reg, lm=lm, em=em, channel=2)
    assert json.loads(other.read_text(encoding="utf-8"))["lm"]["channel"] == "639"


def test_read_transform_refuses_a_broken_file(tmp_path):
    bad = tmp_path / "transform.json"
    bad.write_text(json.dumps({"matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}))
    with pytest.raises(ValueError, match=str(bad.name)):
        read_transform(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_transform(bad)


def test_landmark_table_rows(tmp_path, pair, droplets):
    n = len(droplets["lm"])
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    lm_blobs = Blobs(droplets["lm"], droplets["radius_um"], np.ones(n))
    em_blobs = Blobs(droplets["em"][order] + rng.normal(0, 0.05, (n, 3)), droplets["radius_um"][order], np.ones(n))
    pairs = np.stack([order, np.arange(n)], axis=1)  # em blob k is lm droplet order[k]
    reg = FakeRegistration(matrix=pair.lm_to_em, pairs=pairs, residuals_um=None, loo_tre_um=np.full(n, 0.1),
                           tre_estimate_um=0.1)
    path = write_landmarks(tmp_path / "landmarks.csv", lm_blobs, em_blobs, reg)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == LANDMARK_COLUMNS and len(rows) == n
    for row in rows:
        i, j = int(row["lm_index"]), int(row["em_index"])
        mapped = np.array([float(row[f"mapped_{a}_um"]) for a in "xyz"])
        em = np.array([float(row[f"em_{a}_um"]) for a in "xyz"])
        np.testing.assert_allclose(mapped, apply(pair.lm_to_em, droplets["lm"][i])[0], atol=1e-4)
        np.testing.assert_allclose(em, em_blobs.center_um[j], atol=1e-4)
        assert float(row["residual_um"]) == pytest.approx(np.linalg.norm(mapped - em), abs=2e-4)
        assert float(row["loo_error_um"]) == pytest.approx(0.1)


# -- readers ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_lm(pair):
    return np.ascontiguousarray(pair.lm[:, 4:12, 100:164, 120:184])


def test_read_lm_of_the_confocal_writer(tmp_path, pair, small_lm):
    path = tmp_path / "cell_a1.ome.tif"
    c, z, y, x = small_lm.shape
    writer = StackWriter(path, list(LM_CHANNELS), z, (y, x), pair.lm_voxel_um[2], pair.lm_voxel_um[0], {"k": 1})
    for k in range(z):
        for ch in range(c):
            writer.write(ch, k, small_lm[ch, k], {"z_um": k})
    writer.close(True)
    stack = read_lm(path, channel="BODIPY")
    assert stack.channels == list(LM_CHANNELS) and stack.selected == "488"
    assert np.array_equal(stack.data, small_lm)
    np.testing.assert_allclose(stack.voxel_um, pair.lm_voxel_um)
    assert np.array_equal(stack.channel("639"), small_lm[2]) and np.array_equal(stack.channel(1), small_lm[1])
    assert read_lm(path).selected == "488"  # the droplet channel is found without being asked for
    assert read_lm(path, channel="0").selected == "405"


def test_read_lm_other_layouts(tmp_path, small_lm):
    voxel = (0.3, 0.1, 0.1)
    ome = {"PhysicalSizeX": 100, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 100, "PhysicalSizeYUnit": "nm",
           "PhysicalSizeZ": 0.3, "Channel": {"Name": ["LysoTracker", "BODIPY 493/503", "Dye 639"]}}
    tifffile.imwrite(tmp_path / "zcyx.ome.tif", small_lm.transpose(1, 0, 2, 3), ome=True,
                     metadata={"axes": "ZCYX", **ome})
    stack = read_lm(tmp_path / "zcyx.ome.tif", channel="488")
    assert np.array_equal(stack.data, small_lm) and stack.selected == "BODIPY 493/503"
    np.testing.assert_allclose(stack.voxel_um, voxel)
    assert np.array_equal(stack.channel("particle"), small_lm[2])

    tifffile.imwrite(tmp_path / "zyx.ome.tif", small_lm[1], ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1, "PhysicalSizeZ": 0.3})
    single = read_lm(tmp_path / "zyx.ome.tif")
    assert single.data.shape == (1, *small_lm.shape[1:]) and single.selected == single.channels[0]
    np.testing.assert_allclose(single.voxel_um, voxel)

    tifffile.imwrite(tmp_path / "hyper.tif", small_lm.transpose(1, 0, 2, 3), imagej=True, resolution=(10.0, 10.0),
                     metadata={"axes": "ZCYX", "spacing": 0.3, "unit": "micron"})
    hyper = read_lm(tmp_path / "hyper.tif", channel=2)
    assert np.array_equal(hyper.data, small_lm) and hyper.selected == hyper.channels[2]
    np.testing.assert_allclose(hyper.voxel_um, voxel)


def test_read_lm_errors_name_the_file_and_the_fix(tmp_path, small_lm, pair):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, small_lm, ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1, "PhysicalSizeZ": 0.3,
        "Channel": {"Name": list(LM_CHANNELS)}})
    with pytest.raises(ValueError, match="GFP") as err:
        read_lm(path, channel="GFP")
    assert str(path) in str(err.value) and "'639'" in str(err.value)
    with pytest.raises(ValueError, match="channel 7"):
        read_lm(path).channel(7)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, small_lm[1])
    with pytest.raises(ValueError, match="--lm-voxel-um") as err:
        read_lm(bare)
    assert str(bare) in str(err.value)
    assert read_lm(bare, voxel_um=(0.3, 0.1, 0.1)).voxel_um == (0.3, 0.1, 0.1)


def test_read_em_of_an_alignment_folder(tmp_path, pair):
    em = pair.em[:8].astype(np.uint16) * 3  # the aligned store keeps the detector's type
    out = tmp_path / "run" / "aligned"
    stores = AlignedStores(out, em.shape[1:], em.dtype, pair.em_voxel_um[1] * 1e3, pair.em_voxel_um[0] * 1e3)
    for k, image in enumerate(em):
        stores.write(k, image)
    for where in (out, out.parent, out / ALIGNED):
        volume = read_em(where)
        assert volume.shape == em.shape and volume.dense_is_dark
        assert np.array_equal(np.asarray(volume.data[:]), em)  # the aligned store, not the display copy
        np.testing.assert_allclose(volume.voxel_um, pair.em_voxel_um)
    bare = tmp_path / "pixels"
    AlignedVolumeWriter = type(stores.aligned)
    AlignedVolumeWriter(bare / ALIGNED, em.shape[1:], em.dtype, None, None).write(0, em[0])
    with pytest.raises(ValueError, match="--em-voxel-um") as err:
        read_em(bare)
    assert str(bare) in str(err.value)
    assert read_em(bare, voxel_um=(0.1, 0.05, 0.05)).voxel_um == (0.1, 0.05, 0.05)
    with pytest.raises(FileNotFoundError, match="alignment folder"):
        read_em(tmp_path)


def test_read_em_tiff_and_other_zarr(tmp_path, pair):
    em = pair.em[:6]
    tifffile.imwrite(tmp_path / "em.ome.tif", em, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 100, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 100,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.1})
    volume = read_em(tmp_path / "em.ome.tif")
    assert np.array_equal(np.asarray(volume.data), em)
    np.testing.assert_allclose(volume.voxel_um, (0.1, 0.1, 0.1))
    tifffile.imwrite(tmp_path / "em_ij.tif", em, imagej=True, resolution=(20.0, 20.0),
                     metadata={"axes": "ZYX", "spacing": 0.01, "unit": "um"})
    np.testing.assert_allclose(read_em(tmp_path / "em_ij.tif").voxel_um, (0.01, 0.05, 0.05))
    tifffile.imwrite(tmp_path / "bare.tif", em)
    with pytest.raises(ValueError, match="--em-voxel-um"):
        read_em(tmp_path / "bare.tif")
    # an OME-Zarr 0.4 (zarr v2) from another tool, with singleton t and c axes
    store = tmp_path / "other.ome.zarr"
    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.create_array("0", shape=(1, 1, *em.shape), dtype=em.dtype, chunks=(1, 1, 1, 64, 64))[:] = em[None, None]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
        *({"name": a, "type": "space", "unit": "nanometer"} for a in "zyx")],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 100, 50, 50]}]}]}]
    other = read_em(store)
    assert other.shape == em.shape and np.array_equal(np.asarray(other.data[2]), em[2])
    np.testing.assert_allclose(other.voxel_um, (0.1, 0.05, 0.05))


# -- overlays --------------------------------------------------------------------------------------------------------

def test_overlays_show_the_signals_on_the_em(tmp_path, pair, on_em):
    from matplotlib.image import imread

    d = pair.objects("lipid_droplets")
    inside = pair.in_em(d["em"])
    em_droplets = Blobs(d["em"][inside], d["radius_um"][inside], np.ones(inside.sum()))
    paths = write_overlays(tmp_path / "overlays", pair.em, pair.em_voxel_um, on_em, droplets_em=em_droplets,
                           mapped_lm_droplets=apply(pair.lm_to_em, d["lm"]), clusters=pair.objects("clusters")["em"],
                           n=3)
    assert len(paths) == 4 and all(p.suffix == ".png" for p in paths)
    assert [p.name.startswith("overlay_xy") for p in paths] == [True, True, True, False]
    green = 0
    for p in paths:
        image = imread(p)[..., :3]
        assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0.05
        plot = image[:, : int(0.75 * image.shape[1])]  # left of the legend
        green += int(np.sum((plot[..., 1] > 0.7) & (plot[..., 0] < 0.4) & (plot[..., 2] < 0.4)))
    assert green > 50  # the BODIPY contours are drawn
    with pytest.raises(ValueError, match="outside"):
        write_overlays(tmp_path / "o2", pair.em, pair.em_voxel_um, None, planes=[pair.em.shape[0]])
