"""`clemflow fibsem run` refuses, before anything moves, a run the instrument cannot do; and its input errors.

The preflight compares every value the run will send with the limits the
instrument reported in ``hello``: a FIB current the column does not offer, one
above its range, a target beyond stage travel. The simulator's mill log and
stage position prove that nothing was milled or moved.
"""

from __future__ import annotations

import json

from clemflow.bridge.client import BridgeClient
from clemflow.fibsem.plan import SlicePlan
from clemflow.fibsem.preflight import preflight
from clemflow.protocol import load_protocol
from clemflow.simulators.fibsem import read_mill_log
from test_fibsem_engine_support import BridgeServer, free_port_pair, write_inputs


def test_values_beyond_the_instrument_are_refused_with_exit_3_and_nothing_moves(tmp_path, cli):
    with BridgeServer(tmp_path / "bridge") as server:
        protocol, targets = write_inputs(tmp_path, server.address, fib_current="20 nA", target_um=(60_000.0, 0.0))
        text = protocol.read_text().replace("current: 15 nA", "current: 50 nA")  # the trench's
        protocol.write_text(text)
        out = tmp_path / "run"
        code, output = cli("fibsem", "run", protocol, "--bridge", server.address, "--out", out, "--targets", targets)
        assert code == 3, output
        for field in ("fibsem.fib.current", "fibsem.trench.current", "target"):
            assert field in output, output
        assert "nothing was moved or milled" in output
        with BridgeClient(server.address) as client:
            assert client.state()["stage"]["x_m"] == 0.0
    assert read_mill_log(server.state_dir) == []
    events = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["step"] == "fibsem" and e["outcome"] == "refused"]
    assert len(refused) == 1 and len(refused[0]["problems"]) == 3


def test_preflight_lists_each_problem_with_its_field_against_hello_limits(tmp_path):
    protocol, _ = write_inputs(tmp_path, "tcp://127.0.0.1:1")
    spec = load_protocol(protocol).fibsem
    limits = {"electron": {"voltage_v": [20.0, 30e3], "current_a": [1e-12, 1e-7], "working_distance_m": [1e-3, 5.003e-3],
                           "horizontal_field_width_m": [5e-7, 3e-3], "beam_shift_m": [-2e-6, 2e-6], "detectors": ["InLens"]},
              "ion": {"voltage_v": [30e3, 30e3], "current_a": [1e-12, 3e-8], "currents_a": [7e-10, 1.5e-8],
                      "horizontal_field_width_m": [5e-7, 1e-3]},
              "stage": {"x_m": [-0.05, 0.05], "y_m": [-0.05, 0.05]}, "dwell_s": [5e-8, 4e-4],
              "frame_width_px": [32, 32768], "frame_height_px": [24, 24576], "line_averaging": [1, 255],
              "mill_depth_m": [1e-9, 1e-4], "pattern_size_m": [1e-9, 1e-3], "max_patterns": 32}
    plan = SlicePlan.from_protocol(spec, 200)
    problems = {p.field: p for p in preflight(spec, plan, (0.0, 0.0), limits)}
    assert set(problems) == {"fibsem.sem.detector", "fibsem.sem.working_distance", "fibsem.stop"}
    # 200 slices x sin(54) x 25 nm = 4.0 µm more working distance; 200 x cos(54) x 25 nm = 2.9 µm of beam shift
    assert abs(problems["fibsem.sem.working_distance"].value - (5e-3 + 200 * 0.809017 * 25e-9)) < 1e-9
    assert abs(problems["fibsem.stop"].value - 200 * 0.587785 * 25e-9) < 1e-10
    assert problems["fibsem.sem.detector"].allowed == ["InLens"]
    assert preflight(spec, SlicePlan.from_protocol(spec, 100), (0.0, 0.0), limits)[0].field == "fibsem.sem.detector"


def test_input_errors_exit_2_and_an_absent_bridge_exits_4(tmp_path, cli):
    port = free_port_pair()
    protocol, targets = write_inputs(tmp_path, f"tcp://127.0.0.1:{port}")
    code, output = cli("fibsem", "run", protocol, "--out", tmp_path / "a", "--targets", tmp_path / "missing.json")
    assert code == 2 and "no targets file" in output
    code, output = cli("fibsem", "run", protocol, "--out", tmp_path / "b", "--targets", targets)
    assert code == 4 and "does not answer" in output, output
