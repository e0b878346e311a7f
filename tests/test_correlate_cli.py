"""`clemflow correlate` end to end on files, against the specimen's exact LM -> EM transform.

The confocal stack of a droplet-rich cell is written the way clemflow's confocal writes stacks (StackWriter, OME-TIFF
with channel names and voxel size); the EM volume, covering the second half of the cell as a run started at the
cell's middle would, as an OME-TIFF stack with physical sizes. The transform is judged on structures registration
never sees (endolysosomes and particle clusters), and the refusals on inputs that must be refused: another
specimen's EM, an EM slab with too few droplets, a file without voxel sizes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from clemflow.confocal.writer import StackWriter
from clemflow.correlate.inputs import read_em, read_lm
from clemflow.correlate.outputs import read_transform
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.clem_pair import LM_CHANNELS, apply, make_clem_pair



def droplet_rich_cell(world) -> int:
    """The cell the operator picks: in the middle square, the one with most droplets of 0.4 µm radius or more."""
    middle = world.square_of_cell(world.cells[len(world.cells) // 2])
    big = np.bincount(world.lipid_droplets.cell_id[world.lipid_droplets.radius_um >= 0.4], minlength=len(world.cells))
    return max((c.id for c in world.cells if world.square_of_cell(c) == middle), key=lambda i: big[i])


def write_lm(path: Path, pair) -> Path:
    """The confocal stack as the confocal session writes it: frame by frame through StackWriter."""
    nz, ny, nx = pair.lm_shape
    dz, dy, _ = pair.lm_voxel_um
    writer = StackWriter(path, list(LM_CHANNELS), nz, (ny, nx), dy, dz)
    for c in range(len(LM_CHANNELS)):
        for z in range(nz):
            writer.write(c, z, pair.lm[c, z], {"z_um": z * dz})
    writer.close(complete=True)
    return path


def write_em(path: Path, volume: np.ndarray, voxel_um: tuple[float, float, float] | None) -> Path:
    """An EM stack as OME-TIFF with its physical sizes, or (``voxel_um`` None) a bare TIFF without any."""
    if voxel_um is None:
        tifffile.imwrite(path, volume)
        return path
    z, y, x = voxel_um
    tifffile.imwrite(path, volume, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": x, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": y, "PhysicalSizeYUnit": "µm",
        "PhysicalSizeZ": z, "PhysicalSizeZUnit": "µm"})
    return path


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(hours_since_treatment=24.0), seed=0)


@pytest.fixture(scope="module")
def pair(world):
    return make_clem_pair(world, droplet_rich_cell(world), em_fraction=(0.5, 1.0))


@pytest.fixture(scope="module")
def files(pair, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("correlate_cli")
    return {"lm": write_lm(root / "cell.ome.tif", pair),
            "em": write_em(root / "em.ome.tif", pair.em, pair.em_voxel_um), "root": root}


@pytest.fixture(scope="module")
def run(files: dict[str, Path]) -> dict:
    """The command run once on the right pair (shared by the checks of its outputs)."""
    from typer.testing import CliRunner

    from clemflow.cli.app import _register, app

    _register()
    out = files["root"] / "out"
    result = CliRunner().invoke(app, ["correlate", "--lm", str(files["lm"]), "--em", str(files["em"]),
                                      "--out", str(out)], env={"COLUMNS": "200"})
    return {"code": result.exit_code, "output": result.output, "out": out}


def test_files_are_read_with_their_voxel_sizes(pair, files):
    lm = read_lm(files["lm"])
    assert lm.channels == list(LM_CHANNELS) and lm.selected == "488"
    np.testing.assert_allclose(lm.voxel_um, pair.lm_voxel_um, rtol=1e-6)
    em = read_em(files["em"])
    assert em.shape == pair.em.shape
    np.testing.assert_allclose(em.voxel_um, pair.em_voxel_um, rtol=1e-6)


def test_transform_maps_structures_not_used_for_registration(pair, run):
    assert run["code"] == 0, run["output"]
    matrix = read_transform(run["out"] / "transform.json")
    errors = []
    for kind in ("endolysosomes", "clusters"):
        truth = pair.objects(kind)
        inside = pair.in_em(truth["em"])
        assert inside.sum() >= 10, f"only {inside.sum()} {kind} in the EM volume"
        errors.append(np.linalg.norm(apply(matrix, truth["lm"][inside]) - truth["em"][inside], axis=1))
    median = float(np.median(np.concatenate(errors)))
    assert median < 0.5, f"median error {median:.3f} µm on endolysosomes and clusters"
    doc = json.loads((run["out"] / "transform.json").read_text(encoding="utf-8"))
    assert doc["inliers"] >= 8 and doc["tre_estimate_um"] < 0.5
    assert doc["mirrored"] == bool(np.linalg.det(pair.lm_to_em[:3, :3]) < 0)


def test_landmarks_and_droplet_tables(run):
    assert run["code"] == 0, run["output"]
    with open(run["out"] / "landmarks.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 8
    residuals = np.array([float(r["residual_um"]) for r in rows])
    assert np.all(residuals < 0.5)
    doc = json.loads((run["out"] / "transform.json").read_text(encoding="utf-8"))
    assert len(rows) == doc["inliers"]
    for name in ("lm_droplets.csv", "em_droplets.csv"):
        with open(run["out"] / name, newline="", encoding="utf-8") as fh:
            assert len(list(csv.DictReader(fh))) >= len(rows)


def test_light_channels_on_the_em_grid(pair, run):
    assert run["code"] == 0, run["output"]
    on_em = read_lm(run["out"] / "lm_on_em.ome.tif")
    assert on_em.channels == list(LM_CHANNELS)
    np.testing.assert_allclose(on_em.voxel_um, pair.em_voxel_um, rtol=1e-6)
    assert on_em.data.shape[1:] == pair.em.shape  # the droplet grid is the EM's own at 50 nm x 100 nm
    # the BODIPY signal on the EM grid is bright where the EM has its droplets
    droplets = pair.objects("lipid_droplets")
    inside = pair.in_em(droplets["em"], 0.3) & (droplets["radius_um"] >= 0.3)
    idx = np.rint(droplets["em"][inside][:, ::-1] / np.array(pair.em_voxel_um)).astype(int)
    bodipy = on_em.channel("488")
    at_droplets = bodipy[idx[:, 0], idx[:, 1], idx[:, 2]].astype(float)
    assert np.median(at_droplets) > 2 * np.median(bodipy[bodipy > 0])


def test_overlays_written(run):
    assert run["code"] == 0, run["output"]
    pngs = sorted(run["out"].glob("overlay_*.png"))
    assert pngs
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for png in pngs:
        assert str(png) in run["output"].replace("\n", "")


def test_particles_not_looked_for_at_50_nm_and_said_so(run):
    """50-60 nm particles are not resolved by 50 nm pixels: no cluster table, and the output says why."""
    assert run["code"] == 0, run["output"]
    assert "particle clusters not analysed" in run["output"] and "50 nm" in run["output"]
    assert not (run["out"] / "clusters.csv").exists()


def test_refused_on_the_em_of_another_specimen(cli, files, tmp_path):
    # a small world of another seed: four cells of one square, the EM through its most droplet-rich one
    other = generate_world(SpecimenParams(hours_since_treatment=24.0, n_columns=1, n_rows=1, cells_per_square=4), seed=1)
    count = np.bincount(other.lipid_droplets.cell_id, minlength=len(other.cells))
    em = make_clem_pair(other, int(np.argmax(count)), em_fraction=(0.5, 0.85))
    path = write_em(tmp_path / "other.ome.tif", em.em, em.em_voxel_um)
    code, output = cli("correlate", "--lm", files["lm"], "--em", path, "--out", tmp_path / "out")
    assert code == 3, output
    assert "refused" in output and "agree" in output
    refused = json.loads((tmp_path / "out" / "refused.json").read_text(encoding="utf-8"))
    assert "agree" in refused["reason"] and refused["em_droplets"] >= 8
    assert not (tmp_path / "out" / "transform.json").exists()


def test_refused_on_an_em_slab_with_few_droplets(cli, pair, files, tmp_path):
    planes = 25  # the first 2.5 µm milled from the cell's middle
    truth = pair.objects("lipid_droplets")
    z = truth["em"][:, 2]
    assert np.count_nonzero((z > 0) & (z < planes * pair.em_voxel_um[0])) < 8
    path = write_em(tmp_path / "slab.ome.tif", pair.em[:planes], pair.em_voxel_um)
    code, output = cli("correlate", "--lm", files["lm"], "--em", path, "--out", tmp_path / "out")
    assert code == 3, output
    refused = json.loads((tmp_path / "out" / "refused.json").read_text(encoding="utf-8"))
    assert refused["em_droplets"] < 8
    assert "droplets" in refused["reason"] and "refused" in output
    assert not (tmp_path / "out" / "transform.json").exists()


def test_missing_voxel_size_names_the_option(cli, pair, files, tmp_path):
    slab = pair.em[:25]
    bare = write_em(tmp_path / "bare.tif", slab, None)
    code, output = cli("correlate", "--lm", files["lm"], "--em", bare, "--out", tmp_path / "out")
    assert code == 2, output
    assert "voxel size" in output and "--em-voxel-um" in output
    assert not (tmp_path / "out" / "transform.json").exists()
    # the option named does fix it: the file is read and the slab judged (refused for its few droplets, not unreadable)
    z, y, x = pair.em_voxel_um
    code, output = cli("correlate", "--lm", files["lm"], "--em", bare, "--out", tmp_path / "out",
                       "--em-voxel-um", str(z), str(y), str(x))
    assert code == 3, output
