"""Slice-and-view survives crashes: the orchestrator SIGKILLed at random moments, the bridge server killed mid-mill.

Each run is `clemflow fibsem run` against `clemflow bridge serve --backend
sim-smartsem` (small world, instrument time x300); the verdict comes from the
simulator's own mill log: every slice position milled exactly once, the
trench and the fiducial once, and exactly the slice TIFFs 1..N on disk.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time

from test_fibsem_engine_support import (BridgeServer, assert_run_complete, cli_command, run_cli, run_engine, sigkill,
                                        site_mills, write_inputs)

SLICES = 60


def journal_lines(run_dir) -> int:
    path = run_dir / "journal.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_sigkill_of_the_orchestrator_at_ten_random_moments_mills_each_slice_once(tmp_path):
    """Each kill lands a seeded random number of journal events (1-30) plus 0-30 ms into a session: in setup,
    between `mill started` and `mill done`, between the TIFF and `slice saved`, ..."""
    rng = random.Random(7)
    with BridgeServer(tmp_path / "bridge") as server:
        protocol, targets = write_inputs(tmp_path, server.address, slices=SLICES)
        out = tmp_path / "run"
        command = cli_command(protocol, targets, out, server.address)
        kills = 0
        while kills < 10:
            base = journal_lines(out)
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = base + rng.randint(3, 30)
            deadline = time.monotonic() + 60
            while proc.poll() is None and journal_lines(out) < target and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))
            if proc.poll() is not None:
                break  # finished before this kill
            sigkill(proc)
            kills += 1
        code, output = run_cli(protocol, targets, out, server.address)
        assert code == 0, output
    assert kills == 10
    assert_run_complete(out, server.state_dir, SLICES)
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines() if line.endswith("}")]
    assert sum(e["step"] == "fibsem" and e["outcome"] == "started" for e in journal) == kills + 1


def test_bridge_server_killed_during_a_mill_then_server_crash_fault_resume_without_a_second_mill(tmp_path):
    """SIGKILL of the server mid-mill (record: interrupted, nothing milled) and the simulator's server_crash after a
    mill was logged (record: interrupted, milled): both settled by looking at the face, none milled twice.
    (The engine runs in this process here: it is the server that dies.)"""
    from clemflow.bridge.client import BridgeClient

    server = BridgeServer(tmp_path / "bridge")
    server.start()
    try:  # milling at 50 pA: a slice takes ~150 ms here, so a kill 20 ms after it started lands inside it
        protocol, targets = write_inputs(tmp_path, server.address, slices=16, fib_current="50 pA")
        out = tmp_path / "run"
        result: list = []
        session = threading.Thread(target=lambda: result.append(run_engine(protocol, targets, out, server.address)))
        session.start()
        # wait until the server has recorded slice 8's mill as started (so it runs), then kill it inside the mill
        record = server.root / "record" / "record.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if record.exists() and b"slice-000008/mill" in record.read_bytes():
                break
            time.sleep(0.002)
        time.sleep(0.02)
        mills_before = len(site_mills(server.state_dir))
        server.kill()
        session.join(60)
        outcome, text = result[0]
        assert outcome.state == "paused" and outcome.fault.name == "bridge_unavailable", text
        assert outcome.fault.slice == 8 and "NOT done" in text  # nothing could be blanked, and it says so
        assert len(site_mills(server.state_dir)) == mills_before  # the cut-off mill left nothing in the log
        server.start()

        # the crash fault: after the next slice's mill is logged the server process exits
        with BridgeClient(server.address) as side:
            side.set_fault("server_crash", True, when="after")
        outcome, text = run_engine(protocol, targets, out, server.address)
        assert outcome.state == "paused", text
        assert server.wait_exit() == 70
        server.start()
        code, output = run_cli(protocol, targets, out, server.address)  # the command line resumes it too
        assert code == 0, output
    finally:
        server.kill()
    slices = assert_run_complete(out, server.state_dir, 16)
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines() if line.endswith("}")]
    checked = [e for e in journal if e["outcome"] == "mill checked"]
    # slice 8: first "not milled" (the server died inside its mill), then, after the crash fault, "milled"
    assert [(e["index"], e["decision"], e["record"]) for e in checked] == [(8, "not milled", "interrupted"),
                                                                            (8, "milled", "interrupted")]
    for e in checked:  # the evidence: rise near one slice when milled, near zero when not
        fraction = e["evidence"]["fraction"]
        assert (0.6 < fraction < 1.4) if e["decision"] == "milled" else (-0.4 < fraction < 0.4), e
    assert all(len(records) == 1 for records in slices.values())
