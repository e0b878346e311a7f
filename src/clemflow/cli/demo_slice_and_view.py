"""Demo stage: a short slice-and-view run through the bridge, cut off half way and resumed.

The engine mills and images the relocated target on the Zeiss look-alike
exactly as it would a Crossbeam (bridge client -> ZeroMQ -> server -> SmartSEM
driver). The run is stopped half way, as a crash or an operator would, and the
same run folder is resumed: the simulator's own mill log then shows every
slice milled once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..bridge.client import BridgeClient
from ..bridge.server import BridgeServer
from ..io.run_folder import RunFolder
from ..protocol import load_protocol
from .bridge_backends import BackendOptions, open_backend
from .console import console

__all__ = ["slice_and_view_stage"]

SLICES = 40
HALF = 20


def slice_and_view_stage(folder: Path, targets_path: Path, protocol_path: Path, seed: int) -> dict[str, Any]:
    """Run ``HALF`` slices, stop, resume to ``SLICES``; write a montage, a reslice and the drift plot."""
    from clemflow.simulators.fibsem import read_frame_log, read_mill_log

    folder.mkdir(parents=True, exist_ok=True)
    demo_protocol = folder / "demo_slice_and_view.yaml"
    demo_protocol.write_text(_demo_protocol_text(protocol_path, targets_path), encoding="utf-8")
    protocol = load_protocol(demo_protocol)
    assert protocol.fibsem is not None
    state_dir = folder / "instrument"
    options = BackendOptions(sim_state=state_dir, sim_time_scale=0.0, sim_seed=seed, sim_world="full",
                             sim_drift_nm_per_slice=(12.0, -8.0))
    backend = open_backend("sim-smartsem", options)
    server = BridgeServer(backend, bind="tcp://127.0.0.1:0", events="tcp://127.0.0.1:0", record_dir=folder / "record",
                          backend_name="sim-smartsem").start()
    run_dir = folder / "run"
    try:
        for slices in (HALF, SLICES):
            outcome = _run_engine(server, protocol, demo_protocol, run_dir, targets_path, slices)
            if outcome.state != "done":
                raise RuntimeError(f"slice-and-view stopped: {outcome.message}")
            if slices == HALF:
                console.print(f"  stopped after {HALF} slices (as a crash or the operator would); "
                              "the same command resumes the same folder:")
    finally:
        server.close()
    mills = read_mill_log(state_dir)
    cuts = [i for i, m in enumerate(mills) if m.get("removed_um", 0) > 0]  # mills that advanced the face: the slices
    # once slicing began, a mill sent twice would find its slice gone: it would cut nothing, and not be a
    # fiducial ahead of the face
    repeated = sum(1 for m in mills[cuts[0]:] if m.get("removed_um", 0) <= 0 and "beyond_face" not in m.get("roles", [])) if cuts else 0
    first_slice_mill = mills[cuts[0]]["index"] if cuts else 0
    frames = [f for f in read_frame_log(state_dir) if not f.get("blanked") and f.get("mill", 0) >= first_slice_mill]
    stack = np.stack([tifffile.imread(p) for p in sorted((run_dir / "slices").glob("slice_*.tif"))])
    pictures = _pictures(folder, stack, frames)
    console.print(f"  {len(stack)} slices on disk; the simulator's mill log: {len(mills)} mills in all, "
                  f"(trench, fiducials, slices), {len(cuts)} of them cutting a slice off the face, {repeated} repeated")
    for picture in pictures:
        console.print(f"  [green]✓[/green] {picture}")
    return {"slices": int(len(stack)), "mills_logged": len(mills), "face_cuts": len(cuts), "repeated_cuts": repeated,
            "pictures": [p.name for p in pictures]}


def _run_engine(server: BridgeServer, protocol: Any, protocol_path: Path, run_dir: Path, targets_path: Path, slices: int,
                correlation: Any = None) -> Any:
    from ..fibsem.analysis import LiveAnalysis
    from ..fibsem.dashboard import SliceDashboard
    from ..fibsem.engine import SliceAndViewEngine
    from ..fibsem.plan import SlicePlan
    from ..fibsem.target import choose_target
    from ..schedule.control import RunControl

    fibsem = protocol.fibsem
    folder = RunFolder.open(run_dir, protocol, protocol_path.read_text(encoding="utf-8"))
    target = choose_target(fibsem, targets_path)
    plan = SlicePlan.from_protocol(fibsem, slices)
    with BridgeClient(server.commands_endpoint, events=server.events_endpoint, name="demo-fibsem") as client, \
            SliceDashboard(console, log_every=10) as dashboard:
        analysis = LiveAnalysis(run_dir, protocol.alignment, protocol.qc, status=dashboard.analysis,
                                correlation=correlation)
        engine = SliceAndViewEngine(client, fibsem, folder, plan, target, console=console, control=RunControl(),
                                    interactive=False, dashboard=dashboard, on_slice=analysis)
        analysis.alert = engine.alerts.send
        try:
            return engine.run()
        finally:
            analysis.close()


def _demo_protocol_text(source: Path, targets_path: Path) -> str:
    """The example slice-and-view protocol aimed at the relocated cell, with frames small enough for a demo."""
    from ..grid.targets import read_targets

    target = read_targets(targets_path).targets[0]
    ox, oy = target.offset_um
    text = source.read_text(encoding="utf-8")
    edits = {
        "{id: B1, cell_line: HeLa,": f"{{id: {target.sample}, cell_line: HeLa,",
        "target: {source: square, sample: B1, square: 3C, offset: [15 um, -5 um]}":
            f"target: {{source: square, sample: {target.sample}, square: {target.label}, offset: [{ox:.2f} um, {oy:.2f} um]}}",
        "pixel_size: 5 nm, frame: [2048, 1536],": "pixel_size: 10 nm, frame: [1024, 768],",
        "dwell: 2 us, line_averaging: 5,": "dwell: 1 us, line_averaging: 1,",
    }
    for old, new in edits.items():
        if old not in text:
            raise ValueError(f"{source} no longer has {old!r}; update demo_slice_and_view._demo_protocol_text")
        text = text.replace(old, new)
    return "# Written by `clemflow demo`: protocols/fibsem_slice_and_view.yaml aimed at the relocated cell, small frames.\n" + text


def _pictures(folder: Path, stack: np.ndarray, frames: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(stack)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, i in zip(axes, (0, n // 2, n - 1)):
        ax.imshow(stack[i], cmap="gray")
        ax.set_title(f"slice {i + 1} of {n}")
        ax.axis("off")
    fig.tight_layout()
    montage = folder / "slices_montage.png"
    fig.savefig(montage, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    row, x0 = (3 * stack.shape[1]) // 4, stack.shape[2] // 2 - 96
    ax.imshow(stack[:, row, x0:x0 + 192], cmap="gray", aspect=1.5)  # 15 nm slices vs 10 nm pixels
    ax.set_title("xz reslice, 192 px of one row through the cell (as acquired, before alignment)")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("slice")
    fig.tight_layout()
    reslice = folder / "reslice_xz.png"
    fig.savefig(reslice, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    if frames:
        drift = np.array([f["drift_nm"] for f in frames], float)
        face = np.array([f["face_offset_px"] for f in frames], float) * np.array([f["pixel_size_m"] for f in frames], float)[:, None] * 1e9
        ax.plot(np.hypot(*drift.T), label="drift injected by the simulator")
        ax.plot(np.hypot(*(face - face[0]).T), label="where the face is in the frame, vs the first")
        ax.set_ylabel("nm")
        ax.set_xlabel("electron frame since slicing began")
        ax.legend()
    ax.set_title("Drift held by fiducial tracking (simulator truth)")
    fig.tight_layout()
    drift_path = folder / "drift.png"
    fig.savefig(drift_path, dpi=90)
    plt.close(fig)
    return [montage, reslice, drift_path]
