"""Slice-and-view engine overhead per slice, against the simulated FIB-SEM with zero instrument delay.

A bridge server (`clemflow bridge serve --backend sim-smartsem --sim-time-scale
0`, small specimen) runs as its own process; the engine runs here on a
2048 x 1536 frame at 5 nm, exactly as `clemflow fibsem run` would (mill at an
absolute position, Y/WD tracking, frame checks, fiducial located every slice,
focus measure, TIFF written and fsynced, journal fsynced, slice stream). With
no instrument delay, what is left of each slice is

- the server's own time: rendering the frame (the simulator draws the face;
  a real instrument scans instead) and the mill's bookkeeping, from the
  start/end times the instrument reports;
- the engine's overhead: everything else (round trips and frame transfer,
  the settings request, fiducial location and focus measure, TIFF write,
  journal writes, stream).

Printed: slices per second, the per-slice split (medians over the measured
slices; the first slices, which build the simulator's face scene, are
skipped), and the engine overhead as a share of a realistic slice: milling
one 15 nm slice of a 30 um x 15 um face at 700 pA (the estimate of
``clemflow.fibsem.estimate``: 35.7 s) plus a 2048 x 1536 frame at 10 us dwell
(31.5 s).

Run: python benchmarks/bench_fibsem_engine.py [--slices N]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console

from clemflow.bridge.client import BridgeClient
from clemflow.bridge.local import free_port_pair, serve_bridge
from clemflow.fibsem import cycle as cycle_module
from clemflow.fibsem.engine import SliceAndViewEngine
from clemflow.fibsem.estimate import RESIN_SPUTTER_YIELD_UM3_PER_NC
from clemflow.fibsem.plan import SlicePlan
from clemflow.fibsem.target import choose_target
from clemflow.io.run_folder import RunFolder
from clemflow.protocol import load_protocol

WIDTH, HEIGHT = 2048, 1536
SKIP = 3
REAL_DWELL_S = 10e-6
REAL_MILL_S = 30.0 * 0.015 * 15.0 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * 0.7)  # um^3 / (um^3/nC x nA)
REAL_FRAME_S = WIDTH * HEIGHT * REAL_DWELL_S

PROTOCOL = """clemflow_protocol: 1
experiment: {{name: bench-engine, operator: benchmark}}
samples:
  - {{id: B1, cell_line: HeLa, grid: {{pitch: 600 um, bar_width: 40 um}}}}
fibsem:
  bridge: {{address: {address}, backend: sim-smartsem}}
  target: {{source: square, sample: B1, square: 0A, offset: [0 um, 0 um]}}
  trench: {{width: 30 um, height: 25 um, depth: 15 um, current: 15 nA}}
  slice_thickness: 15 nm
  sem: {{voltage: 1.5 kV, current: 1000 pA, detector: EsB, pixel_size: 5 nm, frame: [{w}, {h}], dwell: 10 us,
        line_averaging: 1, working_distance: 5 mm}}
  fib: {{voltage: 30 kV, current: 700 pA}}
  cadence: {{autofocus_every: 0, autostigmation_every: 0, drift_correction_every: 1, min_fiducial_similarity: 0.6}}
  stop: {{slices: {slices}}}
"""
TARGETS = {"version": 1, "targets": [{"name": "cell", "sample": "B1", "label": "0A", "offset_um": [0, 0],
                                      "em_stage_um": [-2690.657, 610.085]}]}


def start_bridge(tmp: Path) -> tuple[subprocess.Popen, str]:
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    proc, _ = serve_bridge(["--backend", "sim-smartsem", "--bind", address, "--sim-time-scale", "0", "--sim-world", "small",
                            "--record", str(tmp / "record"), "--sim-state", str(tmp / "instrument")], tmp / "bridge.log",
                           timeout_s=120)
    return proc, address


def run(slices: int) -> list[dict[str, float]]:
    """One run of ``slices`` slices; per slice its time split (seconds)."""
    records: list[dict[str, float]] = []
    journal_s = [0.0]
    original_image = cycle_module.SliceCycle.image

    def timed_image(self, index):  # type: ignore[no-untyped-def]
        journal_s[0] = 0.0
        out = original_image(self, index)
        last = self.last
        records.append({"index": index, "total": last.total_s, "mill": last.mill_s, "image": last.image_s,
                        "server_mill": last.server_mill_s, "server_frame": last.server_frame_s,
                        "save": last.save_s, "track": last.track_s, "journal": journal_s[0]})
        return out

    with tempfile.TemporaryDirectory(prefix="bench-fibsem-engine-") as name:
        tmp = Path(name)
        proc, address = start_bridge(tmp)
        try:
            protocol = tmp / "protocol.yaml"
            protocol.write_text(PROTOCOL.format(address=address, w=WIDTH, h=HEIGHT, slices=slices))
            targets = tmp / "targets.json"
            targets.write_text(json.dumps(TARGETS))
            spec = load_protocol(protocol)
            folder = RunFolder.open(tmp / "run", spec, protocol.read_text())
            append = folder.journal.append

            def timed_append(*args, **kwargs):  # type: ignore[no-untyped-def]
                t = time.perf_counter()
                try:
                    return append(*args, **kwargs)
                finally:
                    journal_s[0] += time.perf_counter() - t

            folder.journal.append = timed_append  # type: ignore[method-assign]
            cycle_module.SliceCycle.image = timed_image  # type: ignore[method-assign]
            with BridgeClient(address) as client:
                engine = SliceAndViewEngine(client, spec.fibsem, folder, SlicePlan.from_protocol(spec.fibsem),
                                            choose_target(spec.fibsem, targets), console=Console(file=io.StringIO()))
                outcome = engine.run()
            if outcome.state != "done":
                raise RuntimeError(f"the run did not finish: {outcome}")
        finally:
            cycle_module.SliceCycle.image = original_image  # type: ignore[method-assign]
            proc.terminate()
            proc.wait(30)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=40, help="slices in the run (the first %d are not counted)" % SKIP)
    args = parser.parse_args(argv)
    records = run(args.slices)[SKIP:]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in records)

    total = med("total")
    server = statistics.median(r["server_mill"] + r["server_frame"] for r in records)
    overhead = statistics.median(r["total"] - r["server_mill"] - r["server_frame"] for r in records)
    trips = statistics.median(r["mill"] + r["image"] - r["server_mill"] - r["server_frame"] for r in records)
    other = statistics.median(r["total"] - r["mill"] - r["image"] - r["save"] - r["track"] - r["journal"] for r in records)
    ms = 1e3
    print(f"engine against sim-smartsem at time scale 0, {WIDTH}x{HEIGHT} uint8 at 5 nm, {len(records)} slices measured")
    print(f"slices per second: {1 / total:.2f} (median slice {total * ms:.0f} ms)")
    print(f"  server side (instrument's own start..end): {server * ms:.0f} ms "
          f"(frame rendering {med('server_frame') * ms:.0f} ms, mill {med('server_mill') * ms:.1f} ms)")
    print(f"  engine overhead: {overhead * ms:.0f} ms per slice")
    print(f"    round trips + frame transfer (mill and frame requests beyond the server's own time): {trips * ms:.0f} ms")
    print(f"    fiducial location + focus measure: {med('track') * ms:.0f} ms")
    print(f"    TIFF write (fsync): {med('save') * ms:.0f} ms")
    print(f"    journal (fsync'd lines): {med('journal') * ms:.1f} ms")
    print(f"    rest (settings request, stream, bookkeeping): {other * ms:.0f} ms")
    real = REAL_MILL_S + REAL_FRAME_S
    print(f"realistic slice: mill {REAL_MILL_S:.1f} s (15 nm x 30 um x 15 um at 700 pA) + frame {REAL_FRAME_S:.1f} s "
          f"({WIDTH}x{HEIGHT} x 10 us) = {real:.1f} s")
    print(f"  engine overhead share: {overhead / (real + overhead) * 100:.2f} % of a slice "
          f"({overhead:.2f} s of {real + overhead:.1f} s)")


if __name__ == "__main__":
    main()
