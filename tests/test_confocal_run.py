"""Confocal time courses end to end on the simulated confocal: files, relocation, gaps, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from clemflow.confocal.controller import ConfocalController
from clemflow.confocal.session import ConfocalSession
from clemflow.confocal.writer import read_frame_records
from clemflow.io.run_folder import RunFolder
from clemflow.protocol import parse_protocol
from clemflow.schedule.clock import VirtualClock
from clemflow.schedule.runner import run_protocol_schedule
from clemflow.simulators.confocal.core import build_simulated_core, microscope_of
from clemflow.simulators.confocal.dishes import SimulatedDishHandler

PROTOCOL = """\
clemflow_protocol: 1
experiment: {name: mini-timecourse}
samples:
  - {id: D1, grid: {pitch: 600 um, bar_width: 40 um}}
  - {id: C1, role: control, grid: {pitch: 600 um, bar_width: 40 um}}
treatment: {particle: SiO2-Cy5, concentration: 50 ug/mL}
stains:
  - {name: LysoTracker, marks: endolysosomes, channel: "405", lead_time: 30 min}
timepoints: [1 h, 2 h, 4 h]
confocal:
  config: simulator
  targets:
    items:
      - {sample: D1, square: 4D, offset: [40 um, -30 um], name: cell-a}
      - {sample: C1, square: 4C, name: ctrl-a}
  zstack:
    objective: 63x
    channels:
      - {channel: "405", exposure: 50 ms}
      - {channel: "639", exposure: 50 ms}
    range: 3 um
    step: 1 um
"""


def _session(tmp_path, faults=None):
    protocol = parse_protocol(PROTOCOL, tmp_path / "mini.yaml")
    clock = VirtualClock()
    folder = RunFolder.open(tmp_path / "run", protocol, PROTOCOL, clock=clock)
    core = build_simulated_core(None, clock=clock, faults=faults)
    samples = {"D1": (11, True), "C1": (12, False)}
    dishes = SimulatedDishHandler(microscope_of(core), samples, list(protocol.timepoints), seed=3)
    session = ConfocalSession(ConfocalController(core, protocol.confocal), protocol, folder.path, dishes)
    return protocol, folder, clock, session, dishes


def test_time_course_files_and_same_cells_after_the_dish_moved(tmp_path):
    protocol, folder, clock, session, dishes = _session(tmp_path)
    summary = run_protocol_schedule(protocol, folder, session.acquire, clock=clock)
    assert summary.state == "finished" and len(summary.done) == 6
    scheme = protocol.samples[0].grid
    expected_dish = {"cell-a": np.add(scheme.square_center_um("4D"), [40.0, -30.0]),
                     "ctrl-a": np.array(scheme.square_center_um("4C"))}
    stacks = sorted(folder.path.glob("confocal/*/*/*.ome.tif"))
    assert len(stacks) == 6
    for path in stacks:
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            series = tif.series[0]
            assert series.axes == "CZYX" and series.shape == (2, 4, 512, 512)
            ome = tif.ome_metadata
            assert 'Name="405"' in ome and 'Name="639"' in ome
            assert 'PhysicalSizeX="0.103' in ome and 'PhysicalSizeZ="1.0"' in ome
            description = json.loads(tifffile.xml2dict(ome)["OME"]["Image"]["Description"])
        sample, timepoint = path.parent.parent.name, int(path.parent.name[1:3])
        records = [r for r in read_frame_records(path) if r["status"] == "ok"]
        assert len(records) == 8
        # The stage position the instrument reported maps, through where the dish really was at that
        # timepoint, onto the same place in the dish at every timepoint.
        pose = dishes.poses[(sample, timepoint)]
        stage = np.array([records[0]["x_um"], records[0]["y_um"]])
        dish_point = pose.stage_to_dish(stage[None])[0]
        assert np.linalg.norm(dish_point - expected_dish[description["target"]]) < 2.0
    rotations = {round(p.rotation_deg, 3) for p in dishes.poses.values()}
    assert len(rotations) == 6  # the dishes really were put back differently each time


def test_dropped_frame_is_a_recorded_gap_at_its_index(tmp_path):
    from clemflow.simulators.confocal.context import ConfocalFaults

    faults = ConfocalFaults()
    protocol, folder, clock, session, dishes = _session(tmp_path, faults)
    controller = session.controller
    microscope = microscope_of(controller.core)
    dishes.place("D1", 0, None)
    controller.use_objective("63x")
    start = microscope.snap_count
    # frame 3 of the stack (c=1, z=1 with axis order z then c) fails twice: the retry fails too
    faults.drop_frames.update({start + 3, start + 4})
    result = controller.zstack(folder.path / "stack.ome.tif", (3000.0, 2200.0), 2003.0, {"test": True})
    assert len(result.gaps) == 1 and (result.gaps[0]["c"], result.gaps[0]["z"]) == (1, 1)
    records = read_frame_records(folder.path / "stack.ome.tif")
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 7 and not any((r["c"], r["z"]) == (1, 1) for r in ok)
    planned = {z: 2003.0 + (z - 1.5) * 1.0 for z in range(4)}
    for r in ok:  # every frame carries the focus of its own plane: no index moved
        assert abs(r["z_um"] - planned[r["z"]]) < 0.01, r
    data = tifffile.imread(folder.path / "stack.ome.tif")
    assert data[1, 1].max() == 0 and data[1, 2].max() > 0
    assert records[-1]["status"] == "closed" and records[-1]["complete"] is False


@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_then_resume(tmp_path):
    """The whole run is killed several times and restarted: every acquisition ends up done exactly once."""
    protocol_path = tmp_path / "mini.yaml"
    protocol_path.write_text(PROTOCOL)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "clemflow", "run", str(protocol_path), "--out", str(out), "--time-scale", "7200"]
    rng = np.random.default_rng(7)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    for _ in range(12):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if kills < 4:
            time.sleep(float(rng.uniform(2.0, 9.0)))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                continue
        assert process.wait(timeout=200) == 0
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 3
    events = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines() if line.strip()]
    done = [(e["sample"], e["timepoint"]) for e in events if e["step"] == "acquire" and e["outcome"] == "done"]
    assert sorted(done) == sorted({(s, t) for s in ("D1", "C1") for t in range(3)})  # each exactly once
    for event in events:
        if event["step"] == "acquire" and event["outcome"] == "done":
            for name in event.get("files", []):
                assert tifffile.imread(out / name).shape == (2, 4, 512, 512)


def test_target_outside_travel_refused_before_anything_moves(tmp_path, cli):
    text = PROTOCOL.replace("      - {sample: C1, square: 4C, name: ctrl-a}",
                            "      - {sample: C1, position: {x: 90 mm, y: 0 mm}, name: far-away}")
    path = tmp_path / "unsafe.yaml"
    path.write_text(text)
    code, output = cli("run", path, "--out", tmp_path / "run", "--time-scale", "3600")
    assert code == 3, output
    flat = " ".join(output.split())  # the console wraps long paths wherever the width falls
    assert "outside the stage travel" in flat and "far-away" in flat
    journal = (tmp_path / "run" / "journal.jsonl").read_text()
    assert '"step":"confocal","outcome":"refused"' in journal and '"step":"acquire"' not in journal


def test_z_range_beyond_a_short_focus_drive_is_refused(tmp_path):
    from clemflow.confocal.controller import ConfocalRefused, StageTravel

    protocol = parse_protocol(PROTOCOL.replace("    range: 3 um", "    range: 300 um"), tmp_path / "p.yaml")
    core = build_simulated_core(None, clock=VirtualClock())
    controller = ConfocalController(core, protocol.confocal, travel=StageTravel(z=(0.0, 200.0)))  # a piezo stage
    with pytest.raises(ConfocalRefused, match="exceeds the focus drive"):
        controller.preflight(protocol.confocal.targets.items, tmp_path, stacks=6)
    assert core.getPosition() == 2000.0  # nothing moved
