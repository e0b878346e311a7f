"""Fiducial tracking holds a steady drift of several µm, measured against the simulator's truth per frame.

The server drifts the image by (100, 50) nm per mill, nothing random: 3.0 x
1.5 µm over a 30-slice run, 220 px at 15 nm. The simulator's
``frame_log.jsonl`` says where a sample-fixed point appeared in each frame
(``sample_offset_px``); with Y tracking it should move down by exactly
cos(54) t / p per slice and nothing else. With fiducial tracking the rest
stays within a few pixels; without it (``drift_correction_every: 0``, same
instrument) it does not.
"""

from __future__ import annotations

import json
import math

import numpy as np

from clemflow.fibsem.slices import read_slice
from clemflow.simulators.fibsem.frame_log import read_frame_log
from test_fibsem_engine_support import (PIXEL_NM, THICKNESS_NM, BridgeServer, assert_run_complete, run_engine,
                                        write_inputs)

SLICES = 30
OTHER_CELL_UM = (-2135.736, 465.986)  # another cell of the small world, a site of its own


def held_offsets(run_dir, state_dir, n, thickness_nm=THICKNESS_NM):
    """Per slice: the sample offset of its frame minus what Y tracking alone explains, relative to the frame the
    fiducial template was cut from (px)."""
    frames = read_frame_log(state_dir)
    rise_px = math.cos(math.radians(54.0)) * thickness_nm / PIXEL_NM
    out = []
    for i in range(0, n + 1):
        name = "fiducial_frame.tif" if i == 0 else f"slices/slice_{i:06d}.tif"
        _, meta = read_slice(run_dir / name)
        shift = meta["instrument"]["beam_shift_m"]
        record = [f for f in frames if np.allclose(f["beam_shift_m"], shift, atol=1e-12, rtol=0)][-1]
        x, y = record["sample_offset_px"]
        out.append((x, y - i * rise_px))
    first = out[0]
    return [(x - first[0], y - first[1]) for x, y in out[1:]]


def test_fiducial_tracking_holds_several_microns_of_drift_within_a_few_pixels(tmp_path):
    drift = ["--sim-drift-nm-per-slice", "100,50", "--sim-drift-step-nm", "0", "--sim-drift-jump-probability", "0"]
    with BridgeServer(tmp_path / "bridge", extra=drift) as server:
        protocol, targets = write_inputs(tmp_path / "tracked", server.address, slices=SLICES)
        tracked = tmp_path / "tracked" / "run"
        outcome, text = run_engine(protocol, targets, tracked, server.address)
        assert outcome.state == "done", text
        protocol, targets = write_inputs(tmp_path / "free", server.address, slices=SLICES, drift_every=0,
                                         target_um=OTHER_CELL_UM)
        free = tmp_path / "free" / "run"
        outcome, text = run_engine(protocol, targets, free, server.address)
        assert outcome.state == "done", text
    assert_run_complete(tracked, server.state_dir, SLICES)
    frames = read_frame_log(server.state_dir)
    drift_um = np.subtract(frames[-1]["drift_nm"], frames[0]["drift_nm"]) / 1e3
    assert drift_um[0] > 3.0 and drift_um[1] > 1.5  # several µm over the runs (3 x 1.5 µm during the tracked one)

    held = [math.hypot(x, y) for x, y in held_offsets(tracked, server.state_dir, SLICES)]
    step = math.hypot(100, 50) / PIXEL_NM  # 7.5 px of drift per slice
    assert max(held) < step + 1, held  # never more than one slice's drift (the first, before its rate is known)
    assert max(held[5:]) < 2.0 and np.mean(held[10:]) < 1.0, held  # then the learnt drift rate meets it

    loose = held_offsets(free, server.state_dir, SLICES)
    assert math.hypot(*loose[-1]) > 150, loose[-1]  # untracked, the sample walks 220 px: out of the frame


def test_a_new_fiducial_is_milled_before_the_face_reaches_the_old_one_and_tracking_carries_on(tmp_path):
    """100 nm slices: the face reaches the first "+" (3 µm ahead) after ~20 slices; a second one is milled 3 µm
    ahead of the face before that, found the same way, and tracked from there."""
    with BridgeServer(tmp_path / "bridge") as server:  # the simulator's default drift: random walk and jumps
        protocol, targets = write_inputs(tmp_path, server.address, slices=30, thickness_nm=100.0)
        out = tmp_path / "run"
        outcome, text = run_engine(protocol, targets, out, server.address)
        assert outcome.state == "done", text
    assert_run_complete(out, server.state_dir, 30, thickness_nm=100.0, fiducials=2)
    events = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    renewed = [e for e in events if e["step"] == "template" and e["outcome"] == "captured" and e.get("renewal")]
    assert [(e["renewal"], e["index"]) for e in renewed] == [(1, 20)]
    assert abs(renewed[0]["fiducial_y_m"] - (-6e-6 + 20 * 100e-9 + 3e-6)) < 1e-12
    similarities = [e["fiducial"]["similarity"] for e in events if e["outcome"] == "saved"]
    assert min(similarities) > 0.8, similarities
    held = [math.hypot(x, y) for x, y in held_offsets(out, server.state_dir, 30, thickness_nm=100.0)]
    assert max(held[16:]) < 1.5, held  # across the change of fiducial (slice 20 -> 21) and after it
    assert np.median(held) < 0.5, held  # (slice 8 shows one of the simulator's random drift jumps, then corrected)
