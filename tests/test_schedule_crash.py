"""A real crash test: the runner's process is SIGKILLed at random moments and restarted on the same folder.

The child process (this file run as a script) runs the 7-timepoint x 2-dish
time course with a scaled clock (1 h = 0.1 s) and a fake acquisition that
writes a file of frames per attempt, fsyncing each frame, slowly enough that a
kill can land in the middle of it. The parent kills it (SIGKILL) at random
moments, at least five times, restarting it each time; the last child runs to
the end. The finished run must hold every planned acquisition exactly once as
'done', nothing duplicated, nothing silently missing: each attempt cut off by a
kill is journalled 'incomplete' (reason 'cut off') and its file left as it was.

Set CLEMFLOW_CRASH_SEED to replay a sequence of kill moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMECOURSE = REPO / "protocols" / "nanoparticle_uptake_timecourse.yaml"
SCALE = 36_000.0  # 1 h of protocol time = 0.1 s
FRAMES = 10
FRAME_S = 0.015  # wall seconds per frame: one acquisition takes ~0.15 s (1.5 h of protocol time)


# --------------------------------------------------------------------------- the child process


def child(run_dir: Path) -> int:
    from clemflow.io.run_folder import RunFolder
    from clemflow.protocol import load_protocol
    from clemflow.schedule.resume import resume_clock
    from clemflow.schedule.runner import AcquisitionResult, run_protocol_schedule

    protocol = load_protocol(TIMECOURSE)
    # downtime not counted: protocol time carries on from the last journalled event, so the
    # schedule (and its waits) survives a restart and kills land in every phase of it
    clock = resume_clock(run_dir, SCALE, count_downtime=False)
    folder = RunFolder.open(run_dir, protocol, TIMECOURSE.read_text(), clock)
    data = run_dir / "data"
    data.mkdir(exist_ok=True)

    def name(sample: str, timepoint_s: float, attempt: int) -> str:
        return f"data/{sample}_t{protocol.timepoints.index(timepoint_s)}_a{attempt}.frames"

    def acquire(entry, attempt):
        rel = name(entry.sample, entry.timepoint_s, attempt)
        fd = os.open(run_dir / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # never overwrite an attempt
        try:
            for i in range(FRAMES):
                os.write(fd, f"frame {i}\n".encode())
                os.fsync(fd)
                time.sleep(FRAME_S)
            os.write(fd, b"end\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return AcquisitionResult("done", (rel,), {"frames": FRAMES})

    def close_cut_off(cut):
        rel = name(cut.sample, cut.timepoint_s, cut.attempt)
        path = run_dir / rel
        lines = path.read_text().splitlines() if path.exists() else []
        return {"file": rel if path.exists() else None, "frames_on_disk": sum(1 for x in lines if x.startswith("frame")),
                "file_complete": lines[-1:] == ["end"]}

    summary = run_protocol_schedule(protocol, folder, acquire, clock, on_cut_off=close_cut_off)
    return 0 if summary.state == "finished" else 1


# --------------------------------------------------------------------------- the parent (the test)


def _lines(journal: Path) -> list[dict]:
    if not journal.exists():
        return []
    out = []
    for raw in journal.read_bytes().split(b"\n")[:-1]:
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError:
            pass
    return out


def _sessions(journal: Path) -> int:
    return sum(1 for r in _lines(journal) if r.get("step") == "schedule" and r.get("outcome") in ("started", "resumed"))


def _wait(predicate, proc, limit=10.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.002)
    return False


def _mid_acquisition(journal: Path) -> bool:
    lines = _lines(journal)
    return bool(lines) and lines[-1].get("step") == "acquire" and lines[-1].get("outcome") == "started"


def test_sigkill_at_random_moments_then_resume(tmp_path):
    from clemflow.io.journal import Journal
    from clemflow.io.run_folder import RunFolder
    from clemflow.protocol import load_protocol

    seed = int(os.environ.get("CLEMFLOW_CRASH_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    protocol = load_protocol(TIMECOURSE)
    RunFolder.open(run_dir, protocol, TIMECOURSE.read_text())  # the folder exists before the first child starts
    journal = run_dir / "journal.jsonl"
    kinds = ["startup", "anywhere", "mid", "anywhere", "mid", "anywhere", "mid"]
    kills: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    wall = time.monotonic()
    while True:
        sessions = _sessions(journal)
        proc = subprocess.Popen([sys.executable, __file__, str(run_dir)], env=env)
        if len(kills) < len(kinds):
            kind = kinds[len(kills)]
            if kind == "startup":
                ready = _wait(lambda: False, proc, rng.uniform(0.05, 0.4)) or proc.poll() is None
            elif kind == "anywhere":
                ready = _wait(lambda: _sessions(journal) > sessions, proc) and not _wait(lambda: False, proc, rng.uniform(0.0, 0.4))
            else:
                ready = _wait(lambda: _sessions(journal) > sessions, proc) and _wait(lambda: _mid_acquisition(journal), proc)
                ready = ready and not _wait(lambda: False, proc, rng.uniform(0.0, FRAMES * FRAME_S * 0.8))
            if ready and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append(kind)
                continue
        assert proc.wait(timeout=60) == 0, f"seed {seed}: the last run did not finish"
        break
    elapsed = time.monotonic() - wall
    assert len(kills) >= 5, f"seed {seed}: only {len(kills)} kills landed ({kills})"

    events = list(Journal(journal).events())
    acquire = [e for e in events if e.step == "acquire"]
    keys = [(s.id, i) for s in protocol.samples for i in range(len(protocol.timepoints))]
    done = Counter((e.data["sample"], e.data["timepoint"]) for e in acquire if e.outcome == "done")
    assert done == Counter(keys), f"seed {seed}: every planned acquisition exactly once as done"
    started = Counter((e.data["sample"], e.data["timepoint"], e.data["attempt"]) for e in acquire if e.outcome == "started")
    ends = Counter((e.data["sample"], e.data["timepoint"], e.data["attempt"]) for e in acquire
                   if e.outcome in ("done", "incomplete", "failed"))
    assert max(started.values()) == 1, f"seed {seed}: an attempt number was used twice"
    assert ends == started, f"seed {seed}: every attempt started has exactly one end"
    cut = [e.data for e in acquire if e.outcome == "incomplete"]
    assert all(d["reason"] == "cut off" for d in cut)
    assert not [e for e in acquire if e.outcome in ("failed", "skipped")]
    # the files: one per attempt that got as far as creating it, never overwritten; the done ones whole
    files = {p.name for p in (run_dir / "data").iterdir()}
    for e in acquire:
        if e.outcome == "done":
            (rel,) = e.data["files"]
            assert (run_dir / rel).read_text().splitlines()[-1] == "end" and Path(rel).name in files
    assert files <= {f"{s}_t{tp}_a{a}.frames" for s, tp, a in started}
    incomplete_files = {Path(d["file"]).name for d in cut if d.get("file")}
    done_files = {Path(e.data["files"][0]).name for e in acquire if e.outcome == "done"}
    assert files == done_files | incomplete_files, f"seed {seed}: a file no journal event accounts for"
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    sessions = [e for e in events if e.step == "schedule" and e.outcome in ("started", "resumed")]
    assert len({e.data["t0"] for e in sessions}) == 1, "t0 kept across restarts"
    print(f"seed {seed}: {len(kills)} kills ({', '.join(kills)}), {len(cut)} attempts cut off, "
          f"{sum(started.values())} attempts for {len(keys)} acquisitions, {elapsed:.1f} s")


if __name__ == "__main__":
    sys.exit(child(Path(sys.argv[1])))
