"""The FIB-SEM estimate in the demo matches a hand calculation."""

from __future__ import annotations

import math

from clemflow.fibsem.estimate import RESIN_SPUTTER_YIELD_UM3_PER_NC, estimate_slice_and_view
from clemflow.protocol import load_protocol

from conftest import PROTOCOLS


def test_clem_protocol_estimate_by_hand():
    fibsem = load_protocol(PROTOCOLS / "clem_2h_6h_24h.yaml").fibsem
    estimate = estimate_slice_and_view(fibsem)
    # 4096 x 3072 pixels, 2 µs dwell, 5 lines averaged: 125.83 s per frame.
    assert math.isclose(estimate.frame_time_s, 4096 * 3072 * 2e-6 * 5)
    assert math.isclose(estimate.frame_time_s, 125.82912)
    # 10 µm deep in 15 nm slices: 666.7, so 667 slices.
    assert estimate.slices == 667 and estimate.limited_by == "depth"
    # Slice volume 30 µm wide x 15 µm deep x 0.015 µm thick, at 0.7 nA.
    mill = 30 * 15 * 0.015 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * 0.7)
    assert math.isclose(estimate.mill_time_s, mill)
    assert math.isclose(estimate.duration_s, 667 * (125.82912 + mill))
    # 8-bit frames: 12.58 MB per slice, 8.39 GB in all.
    assert estimate.bytes_per_slice == 4096 * 3072
    assert estimate.total_bytes == 667 * 4096 * 3072


def test_demo_prints_the_estimate(cli, tmp_path):
    code, output = cli("demo", "--out", tmp_path)
    assert code == 0, output
    assert "667" in output and "125.8 s" in output and "8.39 GB" in output
    # the bridge stage: a mill sent twice under one key is milled once, and the pictures are written
    assert "the simulator's mill log has 1 mill" in " ".join(output.split()), output
    (run,) = tmp_path.glob("run-*")
    assert (run / "fibsem" / "sem_face.png").stat().st_size > 10_000
    assert (run / "fibsem" / "ion_trench.png").stat().st_size > 10_000
    # slice-and-view: every slice aligned and QC'd as it arrived (across the stop and resume), pictures drawn
    import csv

    aligned = run / "slice-and-view" / "run" / "aligned"
    rows = list(csv.DictReader((aligned / "transforms.csv").open()))
    assert [int(r["slice"]) for r in rows] == list(range(1, 41))
    assert len(list(csv.DictReader((aligned / "qc.csv").open()))) == 40
    for name in ("reslice_xz.png", "reslice_yz.png", "drift.png", "qc.png"):
        assert (aligned / name).stat().st_size > 10_000, name
    # correlation: the survey run is confirmed online on the chosen cell, and the whole volume registers to the
    # confocal stack (the transform maps the cell's droplets: checked against the specimen in test_correlate_*)
    flat = " ".join(output.split())
    assert "online: confirmed on the chosen cell" in flat, output
    import json

    result = json.loads((run / "correlation" / "correlation" / "transform.json").read_text())
    assert result["inliers"] >= 8 and result["tre_estimate_um"] < 0.5
    assert len(list((run / "correlation" / "correlation").glob("overlay_*.png"))) >= 3


def test_duration_limit_stops_first():
    protocol = load_protocol(PROTOCOLS / "fibsem_slice_and_view.yaml")
    fibsem = protocol.fibsem.model_copy(update={"stop": protocol.fibsem.stop.model_copy(update={"duration": 3600.0})})
    estimate = estimate_slice_and_view(fibsem)
    assert estimate.limited_by == "duration"
    assert estimate.slices == math.floor(3600.0 / estimate.slice_time_s)
