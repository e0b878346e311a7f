"""Scheduler timing error over the whole 48 h time course at a scaled clock of 1 h = 1 s.

Runs protocols/nanoparticle_uptake_timecourse.yaml (7 timepoints x 2 dishes,
stain prompts 30 min ahead, auto-confirmed) through the real runner, journal
and run folder, with a near-instant acquisition (it only notes the call).
Timing error = actual start - planned start, taken from the runner's journal
(`acquire started`: delay_s) and also from the acquire calls themselves; shown
in protocol seconds and in wall milliseconds (1 protocol s = 1/3600 wall s).

The second dish of each timepoint waits for the first by the rule of the
clash (protocol order of samples); its delay is the first dish's duration
and is reported apart. Issue 5 asks for median and maximum; there is no
numeric goal, the figures go in the closing note.

Run: python benchmarks/bench_scheduler.py [--scale 3600] [--protocol PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from clemflow.io.run_folder import RunFolder
from clemflow.protocol import load_protocol
from clemflow.schedule.clock import ScaledClock
from clemflow.schedule.runner import AcquisitionResult, run_protocol_schedule

REPO = Path(__file__).resolve().parents[1]


def _stats(label: str, values: list[float], scale: float) -> str:
    med, worst = statistics.median(values), max(values)
    return (f"{label:<34} n={len(values):2d}  median {med:7.3f} s ({med / scale * 1e3:6.3f} ms wall)  "
            f"max {worst:7.3f} s ({worst / scale * 1e3:6.3f} ms wall)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=3600.0, help="protocol seconds per wall second (3600: 1 h = 1 s)")
    parser.add_argument("--protocol", type=Path, default=REPO / "protocols" / "nanoparticle_uptake_timecourse.yaml")
    args = parser.parse_args()
    protocol = load_protocol(args.protocol)
    calls: list[tuple[str, float, float]] = []

    with tempfile.TemporaryDirectory() as tmp:
        clock = ScaledClock(args.scale)
        folder = RunFolder.open(Path(tmp) / "run", protocol, args.protocol.read_text(), clock)
        t0 = clock.now()

        def acquire(entry, attempt):
            calls.append((entry.sample, entry.at_s, clock.now() - t0))
            return AcquisitionResult("done", (), {})

        span = max(protocol.timepoints)
        print(f"{protocol.experiment.name}: {len(protocol.timepoints)} timepoints x {len(protocol.samples)} dishes, "
              f"{span / 3600:g} h at 1 h = {3600 / args.scale:g} s (about {span / args.scale:.0f} s)", flush=True)
        wall = time.perf_counter()
        summary = run_protocol_schedule(protocol, folder, acquire, clock, t0=t0)
        wall = time.perf_counter() - wall
        events = list(folder.journal.events())

    started = [e.data for e in events if e.step == "acquire" and e.outcome == "started"]
    first = protocol.samples[0].id
    on_time = [d["delay_s"] for d in started if d["sample"] == first]
    clashed = [d["delay_s"] for d in started if d["sample"] != first]
    everything = [d["delay_s"] for d in started]
    stains = [e.data["delay_s"] for e in events if e.step == "stain" and e.outcome == "prompted"]
    call_error = [actual - planned for _, planned, actual in calls]
    print(f"run {summary.state}: {len(summary.done)} acquisitions done in {wall:.2f} s wall")
    print(_stats("acquire start, first dish", on_time, args.scale))
    print(_stats("acquire start, second dish (clash)", clashed, args.scale))
    print(_stats("acquire start, all", everything, args.scale))
    print(_stats("acquire call (measured in acquire)", call_error, args.scale))
    print(_stats("stain prompt", stains, args.scale))
    return 0 if summary.state == "finished" and len(summary.done) == len(protocol.samples) * len(protocol.timepoints) else 1


if __name__ == "__main__":
    raise SystemExit(main())
