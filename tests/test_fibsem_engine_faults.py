"""Every switchable fault of the simulator during a slice-and-view run: a safe pause, then a clean resume.

One engine (in this process) runs against a bridge server process; a second
client on the side switches a fault on right after a chosen slice is saved
(the engine's slice listener), so the fault always meets the same step. Each
pause must end the session as ``paused`` with the beams blanked where the
instrument still answers, and a journalled ``fault`` naming the fault and the
slice; switching the fault off and running again must finish the run with no
slice missing and none milled twice (by the simulator's mill log).
"""

from __future__ import annotations

import io
import json

from rich.console import Console

from clemflow.bridge.client import BridgeClient
from clemflow.fibsem.engine import SliceAndViewEngine
from clemflow.fibsem.plan import SlicePlan
from clemflow.fibsem.target import choose_target
from clemflow.io.run_folder import RunFolder
from clemflow.protocol import load_protocol
from test_fibsem_engine_support import TARGET_UM, BridgeServer, assert_run_complete, write_inputs

SLICES = 26

# after slice k is saved: (fault, options, the error the pause must name, the slice that pauses)
SCHEDULE = {
    3: ("beam_trip", {"beam": "ion"}, "beam_trip", 4),  # trips slice 4's mill half-way
    6: ("vacuum_interlock", {}, "vacuum_interlock", 7),
    9: ("beam_trip", {"beam": "electron"}, "beam_trip", 10),  # slice 10 milled, its frames fail: imaged on resume
    14: ("autofocus_diverges", {}, "autofunction_diverged", 15),  # autofocus every 5 slices
    19: ("network_drop", {"duration_s": None}, "link_lost", 20),
}


def journal(run_dir):
    return [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines() if line.endswith("}")]


def engine_session(protocol, targets, out, address, side, armed):
    """One engine session; the side client arms the scheduled fault after its slice is saved."""
    spec = load_protocol(protocol)
    folder = RunFolder.open(out, spec, protocol.read_text())

    def on_slice(record):
        index = record["index"]
        if index in SCHEDULE and index not in armed:
            fault, options, _, _ = SCHEDULE[index]
            side.set_fault(fault, True, **options)
            armed[index] = fault

    text = io.StringIO()
    with BridgeClient(address, heartbeat_s=0.5) as client:
        engine = SliceAndViewEngine(client, spec.fibsem, folder, SlicePlan.from_protocol(spec.fibsem),
                                    choose_target(spec.fibsem, targets), console=Console(file=text, width=200),
                                    on_slice=on_slice)
        return engine.run(), text.getvalue()


def test_each_fault_pauses_safely_and_the_run_resumes_to_the_end(tmp_path):
    with BridgeServer(tmp_path / "bridge") as server, BridgeClient(server.address) as side:
        protocol, targets = write_inputs(tmp_path, server.address, slices=SLICES, autofocus=5)
        out = tmp_path / "run"
        armed: dict[int, str] = {}
        pauses = []
        for _ in range(len(SCHEDULE) + 1):
            outcome, text = engine_session(protocol, targets, out, server.address, side, armed)
            if outcome.state == "done":
                break
            assert outcome.state == "paused", text
            k = max(armed)
            fault, _, error, at_slice = SCHEDULE[k]
            assert outcome.fault.name == error and outcome.fault.slice == at_slice, (outcome, text)
            event = [e for e in journal(out) if e["step"] == "fault"][-1]
            assert event["name"] == error and event["slice"] == at_slice
            alert = [e for e in journal(out) if e["step"] == "alert" and e["outcome"] == "error"][-1]["message"]
            assert f"fault {error}" in alert and f"at slice {at_slice}" in alert, alert
            if fault == "network_drop":  # the vendor software is unreachable: nothing could be blanked, and it says so
                assert "NOT done" in alert
            else:
                beams = side.state()["beams"]
                assert beams["ion"]["blanked"] and beams["electron"]["blanked"], beams
            side.set_fault(fault, False)
            pauses.append((fault, at_slice, outcome.fault.retry_safe))
        assert outcome.state == "done", text
        assert [p[0] for p in pauses] == [SCHEDULE[k][0] for k in sorted(SCHEDULE)]
        beams = side.state()["beams"]
        assert not beams["ion"]["blanked"] and not beams["electron"]["blanked"]
    slices = assert_run_complete(out, server.state_dir, SLICES, partial_ok=True)
    assert [r["status"] for r in slices[4]] == ["partial", "completed"]  # the tripped mill, then the rest of slice 4
    assert all(len(slices[i]) == 1 for i in slices if i != 4)
    events = journal(out)
    resumed = [e for e in events if e["step"] == "fibsem" and e["outcome"] == "resumed after fault"]
    assert [e["fault"] for e in resumed] == [SCHEDULE[k][2] for k in sorted(SCHEDULE)]
    checked = [(e["index"], e["decision"]) for e in events if e["outcome"] == "mill checked"]
    assert (4, "not milled") in checked  # half a slice is not a slice: milled again to the same far edge
    af = [e for e in events if e["outcome"] == "autofocus retry"]
    assert af and af[0]["index"] == 15


def test_frame_timeout_is_absorbed_by_grabbing_again(tmp_path):
    """The simulator's frame_timeout is one-shot: the re-grab succeeds, so no pause, but the retry is journalled."""
    with BridgeServer(tmp_path / "bridge") as server, BridgeClient(server.address) as side:
        protocol, targets = write_inputs(tmp_path, server.address, slices=6)
        out = tmp_path / "run"
        spec = load_protocol(protocol)
        folder = RunFolder.open(out, spec, protocol.read_text())
        armed = []

        def on_slice(record):
            if record["index"] == 2 and not armed:
                armed.append(side.set_fault("frame_timeout", True, beam="electron"))

        with BridgeClient(server.address, heartbeat_s=0.5) as client:
            outcome = SliceAndViewEngine(client, spec.fibsem, folder, SlicePlan.from_protocol(spec.fibsem),
                                         choose_target(spec.fibsem, targets), console=Console(file=io.StringIO()),
                                         on_slice=on_slice).run()
        assert outcome.state == "done"
    retries = [e for e in journal(out) if e["outcome"] == "frame retry"]
    assert [(e["index"], e["problem"]) for e in retries] == [(3, "frame_timeout")]
    assert_run_complete(out, server.state_dir, 6)


def test_stage_error_on_the_move_to_the_target_pauses_then_the_move_is_checked_and_repeated(tmp_path):
    target = (TARGET_UM[0] + 300.0, TARGET_UM[1])  # a fresh site
    with BridgeServer(tmp_path / "bridge") as server, BridgeClient(server.address) as side:
        protocol, targets = write_inputs(tmp_path, server.address, slices=3, target_um=target)
        out = tmp_path / "run"
        side.set_fault("stage_error", True)
        outcome, text = engine_session(protocol, targets, out, server.address, side, {})
        assert outcome.state == "paused" and outcome.fault.name == "stage_error", text
        assert not outcome.fault.retry_safe
        stage = side.state()["stage"]
        assert abs(stage["x_m"] * 1e6 - target[0]) > 1  # stopped half-way
        side.set_fault("stage_error", False)
        outcome, text = engine_session(protocol, targets, out, server.address, side, {})
        assert outcome.state == "done", text
    events = journal(out)
    checked = [e for e in events if e["step"] == "setup" and e["outcome"] == "checked"]
    assert [(e["name"], e["verdict"], e["decision"]) for e in checked] == [("move", "look", False)]
    assert_run_complete(out, server.state_dir, 3, target_um=target)


def test_operator_pause_resume_abort_and_an_interactive_fault_resumed_in_the_same_session(tmp_path):
    """p / r / a reach the engine through RunControl (as the terminal's keys do): a pause holds between slices with
    the beams blanked, an abort stops after the slice in progress; with --interactive a fault waits for 'r'."""
    import threading
    import time

    from clemflow.schedule.control import RunControl

    with BridgeServer(tmp_path / "bridge") as server, BridgeClient(server.address) as side:
        protocol, targets = write_inputs(tmp_path, server.address, slices=8)
        out = tmp_path / "run"
        spec = load_protocol(protocol)
        control = RunControl()
        seen = {}

        def operator(record):
            index = record["index"]
            if index == 2:
                control.pause()

                def later():
                    time.sleep(0.3)
                    seen["blanked"] = side.state()["beams"]["electron"]["blanked"]
                    control.resume()

                threading.Thread(target=later).start()
            elif index == 4:
                control.abort("operator")

        def session(on_slice, control, interactive=False):
            folder = RunFolder.open(out, spec, protocol.read_text())
            with BridgeClient(server.address, heartbeat_s=0.5) as client:
                return SliceAndViewEngine(client, spec.fibsem, folder, SlicePlan.from_protocol(spec.fibsem),
                                          choose_target(spec.fibsem, targets), console=Console(file=io.StringIO()),
                                          control=control, interactive=interactive, on_slice=on_slice).run()

        outcome = session(operator, control)
        assert outcome.state == "aborted" and outcome.slices_saved == 4
        assert seen["blanked"] is True
        assert side.state()["beams"]["ion"]["blanked"]

        control = RunControl()

        def fault_then_fix(record):
            if record["index"] == 6:
                side.set_fault("vacuum_interlock", True)

                def fix():
                    deadline = time.monotonic() + 30
                    while not (control.paused and any(e["step"] == "fault" for e in journal(out))):
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    side.set_fault("vacuum_interlock", False)
                    control.resume()

                threading.Thread(target=fix).start()

        outcome = session(fault_then_fix, control, interactive=True)
        assert outcome.state == "done"
    events = journal(out)
    steps = [(e["step"], e["outcome"]) for e in events if e["step"] in ("fibsem", "fault")]
    assert ("fibsem", "paused") in steps and ("fibsem", "resumed") in steps and ("fibsem", "aborted") in steps
    i = steps.index(("fault", "paused"))
    assert steps[i + 1:i + 3] == [("fibsem", "resume requested"), ("fibsem", "resumed after fault")]
    assert sum(s == ("fibsem", "started") for s in steps) == 2  # the fault was resumed in the same session
    assert_run_complete(out, server.state_dir, 8)
