"""`clemflow specimen preview` writes viewable PNGs and the truth beside them."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from clemflow.cli.app import app
from clemflow.cli.app import _register


def _read_png(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_preview_command_writes_pngs_and_truth(tmp_path):
    _register()
    out = tmp_path / "preview"
    result = CliRunner().invoke(app, ["specimen", "preview", "--seed", "2", "--out", str(out), "--cells", "4", "--hours", "6"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.glob("*.png")}
    expected = {
        "lm_10x_tl_overview.png",
        "lm_10x_tl_overview_truth.png",
        "lm_63x_mip_composite.png",
        "lm_63x_mip_composite_truth.png",
        "em_slice.png",
        "em_slice_truth.png",
        "em_reslice_su.png",
    }
    assert expected <= names
    for name in expected:
        img = _read_png(out / name)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert np.std(img[..., :3]) > 0.02, f"{name} is blank"
    # the composite uses colour: blue (405), green (488) and magenta (639) all present
    rgb = _read_png(out / "lm_63x_mip_composite.png")[..., :3]
    assert rgb[..., 2].max() > 0.5 and rgb[..., 1].max() > 0.5 and rgb[..., 0].max() > 0.5
    truth = json.loads((out / "truth" / "truth.json").read_text())
    assert truth["seed"] == 2 and len(truth["cells"]) == 4
    assert str(out / "em_slice.png") in result.output
