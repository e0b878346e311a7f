"""Harness for the slice-and-view engine tests (no tests here): a bridge server process, small protocols, checks.

The checks read the simulator's own records: ``read_mill_log`` says what was
milled (so "milled once" is the instrument's word, not the engine's) and
``read_frame_log`` what each electron frame really showed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import tifffile

from clemflow.bridge.local import free_port_pair, serve_bridge
from clemflow.simulators.fibsem import read_mill_log

TARGET_UM = (-2690.657, 610.085)  # a cell of the small simulated world (SimulatedFibSem.small: cell_stage_xy_m(0))
FRAME = (384, 288)
PIXEL_NM = 15.0
THICKNESS_NM = 25.0

PROTOCOL = """clemflow_protocol: 1
experiment: {{name: engine-test, operator: pytest}}
samples:
  - {{id: B1, cell_line: HeLa, grid: {{pitch: 600 um, bar_width: 40 um}}}}
fibsem:
  bridge: {{address: {address}, backend: sim-smartsem}}
  target: {{source: square, sample: B1, square: 0A, offset: [0 um, 0 um]}}
  trench: {{width: 8 um, height: 4 um, depth: 3 um, current: 15 nA}}
  slice_thickness: {thickness} nm
  sem: {{voltage: 1.5 kV, current: 1000 pA, detector: EsB, pixel_size: {pixel} nm, frame: [{w}, {h}], dwell: 1 us,
        line_averaging: 1, working_distance: 5 mm}}
  fib: {{voltage: 30 kV, current: {fib_current}}}
  cadence: {{autofocus_every: {autofocus}, autostigmation_every: {autostig}, drift_correction_every: {drift_every},
            min_fiducial_similarity: 0.6}}
  stop: {{slices: {slices}}}
"""




class BridgeServer:
    """`clemflow bridge serve --backend sim-smartsem` on a fixed port, restartable on the same record and state."""

    def __init__(self, root: Path, time_scale: float = 300.0, extra: list[str] | None = None) -> None:
        self.root, self.time_scale, self.extra = Path(root), time_scale, list(extra or [])
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port_pair()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.state_dir = self.root / "instrument"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc, _ = serve_bridge(
            ["--backend", "sim-smartsem", "--bind", self.address, "--sim-time-scale", str(self.time_scale), "--sim-world",
             "small", "--heartbeat", "0.5", "--record", str(self.root / "record"), "--sim-state", str(self.state_dir),
             *self.extra], self.root / f"server-{self.starts}.log")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait_exit(self, timeout: float = 30.0) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> BridgeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def write_inputs(root: Path, address: str, *, slices: int = 60, target_um: tuple[float, float] = TARGET_UM,
                 thickness_nm: float = THICKNESS_NM, pixel_nm: float = PIXEL_NM, frame: tuple[int, int] = FRAME,
                 fib_current: str = "700 pA", autofocus: int = 0, autostig: int = 0, drift_every: int = 1,
                 name: str = "proto") -> tuple[Path, Path]:
    """A protocol and a targets.json in ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    protocol = root / f"{name}.yaml"
    protocol.write_text(PROTOCOL.format(address=address, thickness=thickness_nm, pixel=pixel_nm, w=frame[0], h=frame[1],
                                        fib_current=fib_current, autofocus=autofocus, autostig=autostig,
                                        drift_every=drift_every, slices=slices))
    targets = root / f"{name}-targets.json"
    targets.write_text(json.dumps({"version": 1, "targets": [
        {"name": "cell", "sample": "B1", "label": "0A", "offset_um": [0, 0], "em_stage_um": list(target_um)}]}))
    return protocol, targets


def cli_command(protocol: Path, targets: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clemflow", "fibsem", "run", str(protocol), "--bridge", address, "--out", str(out),
            "--targets", str(targets), *extra]


def run_cli(protocol: Path, targets: Path, out: Path, address: str, *extra: str, timeout: float = 120.0) -> tuple[int, str]:
    done = subprocess.run(cli_command(protocol, targets, out, address, *extra), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    return done.returncode, done.stdout + done.stderr


def run_engine(protocol: Path, targets: Path, out: Path, address: str, slices: int | None = None) -> tuple[Any, str]:
    """The engine in this process (no CLI start-up); returns (outcome, console text)."""
    from rich.console import Console

    from clemflow.bridge.client import BridgeClient
    from clemflow.fibsem.engine import SliceAndViewEngine
    from clemflow.fibsem.plan import SlicePlan
    from clemflow.fibsem.target import choose_target
    from clemflow.io.run_folder import RunFolder
    from clemflow.protocol import load_protocol

    spec = load_protocol(protocol)
    assert spec.fibsem is not None
    folder = RunFolder.open(out, spec, protocol.read_text())
    text = io.StringIO()
    with BridgeClient(address, heartbeat_s=0.5) as client:
        engine = SliceAndViewEngine(client, spec.fibsem, folder, SlicePlan.from_protocol(spec.fibsem, slices),
                                    choose_target(spec.fibsem, targets), console=Console(file=text, width=200))
        outcome = engine.run()
    return outcome, text.getvalue()


def sigkill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


# ---------------------------------------------------------------------------------------------- checks


def site_mills(state_dir: Path, target_um: tuple[float, float] = TARGET_UM) -> list[dict[str, Any]]:
    """The mill log's records at the site of this target."""
    return [r for r in read_mill_log(state_dir)
            if abs(r["site_origin_um"][0] - target_um[0]) < 1 and abs(r["site_origin_um"][1] - target_um[1]) < 1]


def classify_mills(records: list[dict[str, Any]], thickness_nm: float = THICKNESS_NM,
                   first_face_um: float = -6.0) -> tuple[int, int, dict[int, list[dict[str, Any]]]]:
    """(trench mills, fiducial mills, {slice index: its mill records}) from pattern geometry alone."""
    trench = fiducial = 0
    slices: dict[int, list[dict[str, Any]]] = defaultdict(list)
    t = thickness_nm * 1e-9
    for r in records:
        p = r["patterns"]
        if len(p) == 2:
            fiducial += 1
        elif abs(p[0]["height_m"] - t) < 1e-12:
            far = p[0]["center_m"][1] + t / 2
            index = round((far - first_face_um * 1e-6) / t)
            slices[index].append(r)
        else:
            trench += 1
    return trench, fiducial, dict(slices)


def assert_run_complete(run_dir: Path, state_dir: Path, n: int, *, partial_ok: bool = False,
                        target_um: tuple[float, float] = TARGET_UM, thickness_nm: float = THICKNESS_NM,
                        fiducials: int = 1) -> dict[int, list[dict[str, Any]]]:
    """Exactly slices 1..n on disk, each milled exactly once (a partial mill may precede a completing one if allowed)."""
    files = sorted((run_dir / "slices").glob("slice_*.tif"))
    assert [int(p.stem.split("_")[1]) for p in files] == list(range(1, n + 1))
    for p in (files[0], files[-1]):
        meta = json.loads(tifffile.TiffFile(p).pages[0].description)
        assert meta["clemflow"]["slice_index"] == int(p.stem.split("_")[1])
        assert meta["instrument"]["pixel_size_m"][0] > 0 and meta["instrument"]["working_distance_m"] > 0
    trench, fiducial, slices = classify_mills(site_mills(state_dir, target_um), thickness_nm)
    assert (trench, fiducial) == (1, fiducials)
    assert sorted(slices) == list(range(1, n + 1)), f"slices milled: {sorted(slices)}"
    for index, records in slices.items():
        completed = [r for r in records if r["status"] == "completed"]
        assert len(completed) == 1, f"slice {index} milled {len(completed)} times to completion: {records}"
        assert records[-1] is completed[0], f"slice {index}: a mill after the completing one: {records}"
        if not partial_ok:
            assert len(records) == 1, f"slice {index} milled {len(records)} times"
        removed = sum(r["removed_um"] for r in records)
        assert abs(removed - thickness_nm * 1e-3) < 1e-6, f"slice {index} removed {removed} µm"
    stream = [json.loads(line) for line in (run_dir / "slices.jsonl").read_text().splitlines()]
    assert [r["index"] for r in stream] == list(range(1, n + 1))
    return slices
