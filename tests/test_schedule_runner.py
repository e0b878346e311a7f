"""The schedule runner: order and times of steps, clashes, late policy, retries, resume, pause/abort."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest
from rich.console import Console

from clemflow.io.run_folder import RunFolder
from clemflow.protocol import load_protocol
from clemflow.schedule.clock import ScaledClock, VirtualClock
from clemflow.schedule.control import RunControl
from clemflow.schedule.resume import read_schedule_state, resume_clock
from clemflow.schedule.runner import AcquisitionResult, Runner, run_protocol_schedule
from clemflow.schedule.terminal import TerminalSession, format_countdown

from conftest import PROTOCOLS

TIMECOURSE = PROTOCOLS / "nanoparticle_uptake_timecourse.yaml"
T0 = 1_700_000_000.0
HOURS = [1, 2, 4, 6, 14, 24, 48]


def _protocol(**confocal):
    protocol = load_protocol(TIMECOURSE)
    if confocal:
        protocol = protocol.model_copy(update={"confocal": protocol.confocal.model_copy(update=confocal)})
    return protocol


def _folder(path, protocol, clock):
    return RunFolder.open(path, protocol, TIMECOURSE.read_text(), clock)


class FakeScope:
    """An acquire callable that takes `minutes` of virtual time and records every call."""

    def __init__(self, clock: VirtualClock, minutes: float = 10.0, script=None):
        self.clock, self.minutes, self.calls = clock, minutes, []
        self.script = script or {}  # (sample, timepoint index, attempt) -> status or callable

    def __call__(self, entry, attempt):
        tp = HOURS.index(int(entry.timepoint_s // 3600))
        self.calls.append((entry.sample, tp, attempt, self.clock.now()))
        self.clock.advance(self.minutes * 60)
        action = self.script.get((entry.sample, tp, attempt), "done")
        if callable(action):
            return action()
        return AcquisitionResult(action, (f"confocal/{entry.sample}_t{tp}_a{attempt}.ome.tif",))


def _events(folder, step=None):
    return [e for e in folder.journal.events() if step is None or e.step == step]


def test_order_and_times_of_the_example_time_course(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol()
    folder = _folder(tmp_path / "run", protocol, clock)
    scope = FakeScope(clock, minutes=10)
    summary = run_protocol_schedule(protocol, folder, scope, clock)

    assert summary.state == "finished" and summary.t0 == T0
    assert summary.done == [(s, i) for s in ("D1", "D2") for i in range(7)]
    # each acquisition exactly once, attempt 1; D1 at the planned time, D2 when D1 is done (10 min later)
    assert [(s, tp, a, t - T0) for s, tp, a, t in scope.calls] == [
        (s, i, 1, h * 3600.0 + (600.0 if s == "D2" else 0.0)) for i, h in enumerate(HOURS) for s in ("D1", "D2")
    ]
    steps = [(e.step, e.outcome, e.data.get("sample"), e.data.get("timepoint"), round(e.time - T0))
             for e in _events(folder) if e.step in ("stain", "acquire")]
    expected = []
    for i, h in enumerate(HOURS):
        t = h * 3600
        expected += [("stain", "prompted", "D1", i, t - 1800), ("stain", "confirmed", "D1", i, t - 1800),
                     ("stain", "prompted", "D2", i, t - 1800), ("stain", "confirmed", "D2", i, t - 1800),
                     ("acquire", "started", "D1", i, t), ("acquire", "done", "D1", i, t + 600),
                     ("acquire", "delayed", "D2", i, t + 600),
                     ("acquire", "started", "D2", i, t + 600), ("acquire", "done", "D2", i, t + 1200)]
    assert steps == expected
    started = [e.data for e in _events(folder, "acquire") if e.outcome == "started"]
    assert all(d["stain_confirmed"] for d in started)
    assert [d["delay_s"] for d in started if d["sample"] == "D1"] == [0.0] * 7
    prompts = [e.data for e in _events(folder, "stain") if e.outcome == "prompted"]
    assert prompts[1]["message"].startswith("add LysoTracker Blue DND-22 (endolysosomes), MitoTracker Green FM")
    assert "dish D2 now (for the 1 h timepoint)" in prompts[1]["message"]
    assert prompts[0]["deadline_s"] == 3600.0  # the stain must be in before the acquisition it serves
    schedule = [(e.outcome, e.data.get("t0_source")) for e in _events(folder, "schedule")]
    assert schedule == [("started", "confirmed"), ("finished", None)]


def test_clash_delays_are_journalled_in_planned_seconds(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol()
    folder = _folder(tmp_path / "run", protocol, clock)
    summary = run_protocol_schedule(protocol, folder, FakeScope(clock, minutes=25), clock, t0=T0)
    delayed = [e.data for e in _events(folder, "acquire") if e.outcome == "delayed"]
    assert [(d["sample"], d["timepoint"], d["clash_s"], d["delay_s"], d["reason"]) for d in delayed] == [
        ("D2", i, 1500.0, 1500.0, "clash") for i in range(7)
    ]
    assert all(d["after"] == {"sample": "D1", "timepoint": d["timepoint"]} for d in delayed)
    # 25 min is beyond the 15 min tolerance, but waiting for the instrument is not lateness
    assert summary.late == [] and not any(e.outcome in ("late", "skipped") for e in _events(folder, "acquire"))
    assert summary.clash_delays_s == {("D2", i): 1500.0 for i in range(7)}


def test_clash_chain_of_three_dishes_in_protocol_order(tmp_path):
    protocol = _protocol()
    extra = protocol.samples[1].model_copy(update={"id": "D0"})  # listed last, sorts first by name
    protocol = protocol.model_copy(update={"samples": [*protocol.samples, extra], "timepoints": [3600.0, 7200.0]})
    clock = VirtualClock(T0)
    folder = _folder(tmp_path / "run", protocol, clock)
    scope = FakeScope(clock, minutes=20)
    run_protocol_schedule(protocol, folder, scope, clock, t0=T0)
    assert [(s, tp, t - T0) for s, tp, _, t in scope.calls] == [
        ("D1", 0, 3600.0), ("D2", 0, 4800.0), ("D0", 0, 6000.0), ("D1", 1, 7200.0), ("D2", 1, 8400.0), ("D0", 1, 9600.0)
    ]
    delayed = [(e.data["sample"], e.data["clash_s"]) for e in _events(folder, "acquire") if e.outcome == "delayed"]
    assert delayed == [("D2", 1200.0), ("D0", 2400.0)] * 2
    assert not any(e.outcome == "late" for e in _events(folder, "acquire"))


@pytest.mark.parametrize("policy", ["run_late", "skip"])
def test_late_policy(tmp_path, policy):
    """The run starts 5 h after treatment: the 1, 2 and 4 h windows have passed."""
    clock = VirtualClock(T0 + 5 * 3600)
    protocol = _protocol(late_policy=policy)
    folder = _folder(tmp_path / "run", protocol, clock)
    scope = FakeScope(clock, minutes=10)
    summary = run_protocol_schedule(protocol, folder, scope, clock, t0=T0)
    acq = [(e.outcome, e.data["sample"], e.data["timepoint"], e.data.get("delay_s")) for e in _events(folder, "acquire")
           if e.outcome in ("late", "skipped")]
    if policy == "run_late":
        assert acq == [("late", "D1", 0, 4 * 3600.0), ("late", "D2", 0, 4 * 3600.0 + 600),
                       ("late", "D1", 1, 3 * 3600.0 + 1200), ("late", "D2", 1, 3 * 3600.0 + 1800),
                       ("late", "D1", 2, 3600.0 + 2400), ("late", "D2", 2, 3600.0 + 3000)]
        assert summary.done == [(s, i) for s in ("D1", "D2") for i in range(7)]
        assert sorted(summary.late) == [(s, i) for s in ("D1", "D2") for i in range(3)]
        # the late stains were still asked for, with their delay
        stains = [e.data for e in _events(folder, "stain") if e.outcome == "prompted"]
        assert stains[0]["delay_s"] == 5 * 3600.0 - 1800
        # the 6 h timepoint (stain at 5.5 h) is back on time
        start6 = [e.data for e in _events(folder, "acquire") if e.outcome == "started" and e.data["timepoint"] == 3]
        assert [d["delay_s"] for d in start6] == [0.0, 600.0]
    else:
        assert acq == [("skipped", s, i, 5 * 3600.0 - h * 3600.0) for i, h in enumerate(HOURS[:3]) for s in ("D1", "D2")]
        assert summary.skipped == [(s, i) for s in ("D1", "D2") for i in range(3)]
        assert summary.done == [(s, i) for s in ("D1", "D2") for i in range(3, 7)]
        assert [(s, tp) for s, tp, _, _ in scope.calls] == [(s, i) for i in range(3, 7) for s in ("D1", "D2")]
        skipped_stains = [e.data["timepoint"] for e in _events(folder, "stain") if e.outcome == "skipped"]
        assert skipped_stains == [0, 0, 1, 1, 2, 2]


class Crash(BaseException):
    """Stands for the process dying in the middle of an acquisition."""


def test_resume_after_a_crash_repeats_nothing_done(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol()
    folder = _folder(tmp_path / "run", protocol, clock)

    def crash():
        raise Crash

    first = FakeScope(clock, script={("D2", 2, 1): crash})
    with pytest.raises(Crash):
        run_protocol_schedule(protocol, folder, first, clock)
    assert [(s, tp) for s, tp, _, _ in first.calls][-1] == ("D2", 2)

    clock.advance(2 * 3600)  # down for two hours from 4 h 20 min: the 4 h and 6 h windows have passed
    folder = _folder(tmp_path / "run", protocol, clock)
    repaired = []
    second = FakeScope(clock)
    runner = Runner(protocol, folder, second, clock, on_cut_off=lambda c: repaired.append(c) or {"repaired": True})
    assert [(c.sample, c.timepoint, c.attempt) for c in runner.cut_off] == [("D2", 2, 1)]
    assert repaired == runner.cut_off
    summary = runner.run()
    assert summary.state == "finished" and summary.t0 == T0  # t0 kept from the journal
    calls = [(s, tp, a) for s, tp, a, _ in second.calls]
    assert calls[0] == ("D2", 2, 2)  # re-acquired as a new attempt
    assert len(calls) == 14 - 5  # D1 and D2 at 1 and 2 h, D1 at 4 h were done and are not repeated
    acquire = _events(folder, "acquire")
    closed = [e.data for e in acquire if e.outcome == "incomplete"]
    assert closed == [{"sample": "D2", "timepoint": 2, "timepoint_s": 14400.0, "attempt": 1, "reason": "cut off",
                       "final": False, "started": closed[0]["started"], "repaired": True}]
    done = [(e.data["sample"], e.data["timepoint"]) for e in acquire if e.outcome == "done"]
    assert sorted(done) == [(s, i) for s in ("D1", "D2") for i in range(7)]
    late = [(e.data["sample"], e.data["timepoint"]) for e in acquire if e.outcome == "late"]
    assert late == [("D2", 2), ("D1", 3), ("D2", 3)]  # run late per policy (tolerance 15 min)
    delays = {(e.data["sample"], e.data["timepoint"]): e.data["delay_s"] for e in acquire if e.outcome == "late"}
    assert delays == {("D2", 2): 2 * 3600.0 + 1200, ("D1", 3): 1800.0, ("D2", 3): 2400.0}
    resumed = [e.data for e in _events(folder, "schedule") if e.outcome == "resumed"]
    assert resumed[0]["ended"] == 5 and resumed[0]["cut_off"] == [["D2", 2, 1]]
    # a third start finds nothing to do
    third = FakeScope(clock)
    assert run_protocol_schedule(protocol, _folder(tmp_path / "run", protocol, clock), third, clock).state == "finished"
    assert third.calls == []


def test_stain_prompt_cut_off_is_asked_again(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol(late_tolerance=3600.0)
    folder = _folder(tmp_path / "run", protocol, clock)
    asked = []

    def dying_prompt(message, deadline):
        asked.append(message)
        if len(asked) == 3:  # D1's stain for 2 h
            raise Crash
        return True

    with pytest.raises(Crash):
        run_protocol_schedule(protocol, folder, FakeScope(clock), clock, dying_prompt, t0=T0)
    assert "dish D1 now (for the 2 h timepoint)" in asked[2]
    folder = _folder(tmp_path / "run", protocol, clock)
    again = []
    run_protocol_schedule(protocol, folder, FakeScope(clock), clock, lambda m, d: again.append(m) or True)
    assert again[0] == asked[2] and len(asked) - 1 + len(again) == 14


def test_retry_then_give_up_and_fatal(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol()
    folder = _folder(tmp_path / "run", protocol, clock)
    fatal = lambda: AcquisitionResult("failed", (), {"error": "disk full"}, fatal=True)  # noqa: E731
    script = {("D1", 0, 1): "failed", ("D1", 0, 2): "incomplete", ("D2", 0, 1): "failed", ("D2", 0, 2): "failed",
              ("D2", 0, 3): "failed", ("D1", 1, 1): fatal}
    scope = FakeScope(clock, script=script)
    summary = run_protocol_schedule(protocol, folder, scope, clock, max_attempts=3)
    assert summary.state == "stopped"
    ends = [(e.outcome, e.data["sample"], e.data["timepoint"], e.data["attempt"], e.data["final"])
            for e in _events(folder, "acquire") if e.outcome in ("done", "failed", "incomplete")]
    assert ends == [("failed", "D1", 0, 1, False), ("incomplete", "D1", 0, 2, False), ("done", "D1", 0, 3, True),
                    ("failed", "D2", 0, 1, False), ("failed", "D2", 0, 2, False), ("failed", "D2", 0, 3, True),
                    ("failed", "D1", 1, 1, False)]
    assert summary.statuses[("D2", 0)] == "failed" and summary.statuses[("D1", 1)] == "pending"
    # after the disk is cleared, a resume retries the fatal one but not the one given up
    folder = _folder(tmp_path / "run", protocol, clock)
    scope = FakeScope(clock)
    summary = run_protocol_schedule(protocol, folder, scope, clock)
    assert summary.state == "finished" and scope.calls[0][:3] == ("D1", 1, 2)
    assert ("D2", 0) not in [(s, tp) for s, tp, _, _ in scope.calls] and summary.failed == [("D2", 0)]


def test_acquire_exception_stops_the_run_and_is_journalled(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol()
    folder = _folder(tmp_path / "run", protocol, clock)

    def broken():
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError):
        run_protocol_schedule(protocol, folder, FakeScope(clock, script={("D1", 0, 1): broken}), clock)
    last = list(folder.journal.events())[-2:]
    assert [(e.step, e.outcome) for e in last] == [("acquire", "failed"), ("schedule", "stopped")]
    assert last[0].data["error"] == "RuntimeError: camera unplugged" and last[0].data["final"] is False


def test_pause_and_abort_at_checkpoints(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol()
    folder = _folder(tmp_path / "run", protocol, clock)
    control = RunControl()

    def pause_then_resume():
        control.pause()
        threading.Timer(0.2, control.resume).start()
        return AcquisitionResult("done")

    def abort():
        control.abort("test")
        return AcquisitionResult("done")

    scope = FakeScope(clock, script={("D1", 1, 1): pause_then_resume, ("D1", 3, 1): abort})
    wall = time.monotonic()
    summary = run_protocol_schedule(protocol, folder, scope, clock, control=control)
    assert time.monotonic() - wall >= 0.2
    assert summary.state == "aborted" and summary.reason == "test"
    assert summary.done == [("D1", 0), ("D1", 1), ("D1", 2), ("D1", 3), ("D2", 0), ("D2", 1), ("D2", 2)]
    outcomes = [(e.step, e.outcome) for e in _events(folder) if e.step in ("control", "schedule")]
    assert outcomes == [("schedule", "started"), ("control", "paused"), ("control", "continued"), ("schedule", "aborted")]
    # paused right after D1 at 2 h: D2 waits for the resume, in the same step order
    assert [(s, tp) for s, tp, _, _ in scope.calls][2:4] == [("D1", 1), ("D2", 1)]
    # the aborted run resumes where it stopped
    folder = _folder(tmp_path / "run", protocol, clock)
    scope = FakeScope(clock)
    summary = run_protocol_schedule(protocol, folder, scope, clock)
    assert summary.state == "finished" and [(s, tp) for s, tp, _, _ in scope.calls][0] == ("D2", 3)


def test_abort_while_waiting_under_a_scaled_clock(tmp_path):
    clock = ScaledClock(3600.0, start=T0)  # 1 h = 1 s
    protocol = _protocol()
    folder = _folder(tmp_path / "run", protocol, clock)
    control = RunControl()
    threading.Timer(0.3, control.abort).start()
    wall = time.monotonic()
    summary = run_protocol_schedule(protocol, folder, lambda e, a: AcquisitionResult("done"), clock, control=control, t0=T0)
    assert time.monotonic() - wall < 0.6  # the first acquisition is 1 s away: abort is seen while waiting
    assert summary.state == "aborted" and summary.done == []


def test_terminal_session_commands_and_prompt():
    clock = VirtualClock(T0)
    control = RunControl()
    read, write = os.pipe()
    out = io.StringIO()
    session = TerminalSession(control, clock, Console(file=out, width=100), os.fdopen(read), refresh_s=0.01).start()
    feed = os.fdopen(write, "w", buffering=1)
    feed.write("p\n")
    deadline = time.monotonic() + 2
    while not control.paused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert control.paused
    feed.write("r\n")
    threading.Timer(0.1, lambda: feed.write("\n")).start()
    assert session.prompt("add LysoTracker to dish D2 now", T0 + 1800) is True
    assert not control.paused
    threading.Timer(0.1, lambda: feed.write("n\n")).start()
    assert session.prompt("add BODIPY to dish D1 now", T0 + 1800) is False
    threading.Timer(0.05, lambda: clock.advance(3600)).start()
    assert session.prompt("too late", T0 + 1800) is False
    feed.write("a\n")
    feed.close()
    session._thread.join(2)
    assert control.aborted
    text = out.getvalue()
    assert "Add LysoTracker to dish D2 now" in text and "✓ confirmed" in text and "not confirmed in time" in text
    countdown = Console(file=io.StringIO(), width=100)
    countdown.print(session._panel("add BODIPY to dish D1 now", clock.now() + 1800))
    assert "0:30:00 left" in countdown.file.getvalue()
    assert format_countdown(5400.4) == "1:30:00"


def test_resume_clock_carries_planned_time_on(tmp_path):
    protocol = _protocol()
    clock = ScaledClock(3600.0, start=T0)
    folder = _folder(tmp_path / "run", protocol, clock)
    runner = Runner(protocol, folder, lambda e, a: AcquisitionResult("done"), clock, control=RunControl(), t0=T0)
    threading.Timer(0.1, runner.control.abort).start()
    assert runner.run().state == "aborted"  # journals 'schedule started' with the wall-clock anchor, then aborts
    time.sleep(0.1)
    again = resume_clock(tmp_path / "run", 3600.0)
    assert isinstance(again, ScaledClock) and 0.2 * 3600 <= again.now() - T0 < 0.5 * 3600  # downtime counted
    frozen = resume_clock(tmp_path / "run", 3600.0, count_downtime=False)
    last = list(folder.journal.events())[-1].time
    assert 0 <= frozen.now() - last < 0.05 * 3600
    state = read_schedule_state(folder.journal.events())
    assert state.t0 == T0 and state.t0_source == "given" and state.sessions == 1


def test_a_clock_behind_the_journal_is_refused(tmp_path):
    clock = VirtualClock(T0)
    protocol = _protocol()
    run_protocol_schedule(protocol, _folder(tmp_path / "run", protocol, clock), FakeScope(clock), clock)
    fresh = VirtualClock(T0 + 3600)  # e.g. a new ScaledClock instead of resume_clock(...)
    with pytest.raises(ValueError, match="behind the run's journal"):
        Runner(protocol, _folder(tmp_path / "run", protocol, fresh), FakeScope(fresh), fresh)


def test_operator_thread_prompts_on_time_while_the_instrument_works(tmp_path):
    """Acquisitions of 1.2 h each: the 2 h stain (due at 1.5 h) comes during the 1 h acquisitions."""
    protocol = _protocol()
    protocol = protocol.model_copy(update={"timepoints": [3600.0, 7200.0]})
    clock = ScaledClock(36_000.0, start=T0)  # 1 h = 0.1 s
    folder = _folder(tmp_path / "run", protocol, clock)

    def slow(entry, attempt):
        time.sleep(0.12)
        return AcquisitionResult("done")

    summary = run_protocol_schedule(protocol, folder, slow, clock, t0=T0, operator_thread=True)
    assert summary.state == "finished" and len(summary.done) == 4
    events = _events(folder)
    prompts = [e for e in events if e.step == "stain" and e.outcome == "prompted" and e.data["timepoint"] == 1]
    assert [e.data["sample"] for e in prompts] == ["D1", "D2"]
    # within half an hour of protocol time (50 ms of wall time at this scale, so a busy machine does not
    # fail it); without the operator thread the prompt would wait for the 1.2 h acquisitions.
    assert all(abs(e.data["delay_s"]) < 1800 for e in prompts)
    first_d2 = next(e for e in events if e.step == "acquire" and e.outcome == "done" and e.data["sample"] == "D2")
    assert prompts[-1].seq < first_d2.seq  # asked while D2 was being imaged at 1 h
    answers = [e.outcome for e in events if e.step == "stain" and e.outcome != "prompted"]
    assert answers == ["confirmed"] * 4
    with pytest.raises(ValueError, match="virtual clock"):
        Runner(protocol, folder, slow, VirtualClock(T0), operator_thread=True)
