"""Demo stage: drive the Zeiss look-alike through the bridge, at the relocated target.

A bridge server runs in this process on a loopback port with the
``sim-smartsem`` backend (the SmartSEM driver over the SmartSEM look-alike),
and the demo talks to it only through ``BridgeClient``: the same wire, client
and driver a real Crossbeam would use. It shows what makes the bridge safe: a
mill sent twice with the same idempotency key is milled once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..bridge.backend import FrameRequest, MillPattern, StageMove
from ..bridge.client import BridgeClient
from ..bridge.server import BridgeServer
from ..grid.targets import read_targets
from .bridge_backends import BackendOptions, open_backend
from .console import console

__all__ = ["bridge_stage"]


def bridge_stage(folder: Path, targets_path: Path, seed: int) -> dict[str, Any]:
    """Move to the relocated target, image the block with the ion beam, mill a trench, image the face."""
    from clemflow.simulators.fibsem import read_mill_log

    folder.mkdir(parents=True, exist_ok=True)
    target = read_targets(targets_path).targets[0]
    if target.em_stage_um is None:
        raise ValueError(f"{targets_path}: target {target.name} has no EM stage position")
    state_dir = folder / "instrument"
    backend = open_backend("sim-smartsem", BackendOptions(sim_state=state_dir, sim_time_scale=0.0, sim_seed=seed, sim_world="full"))
    server = BridgeServer(backend, bind="tcp://127.0.0.1:0", events="tcp://127.0.0.1:0", record_dir=folder / "record",
                          backend_name="sim-smartsem").start()
    try:
        with BridgeClient(server.commands_endpoint, events=server.events_endpoint, name="demo") as bridge:
            info = bridge.hello()
            console.print(f"  bridge {server.commands_endpoint}: {info.vendor} {info.model} ({info.backend}), "
                          f"protocol {info.protocol}")
            x_um, y_um = target.em_stage_um
            bridge.move_stage(StageMove(x_m=x_um * 1e-6, y_m=y_um * 1e-6), key="demo/move-to-target")
            bridge.set_beam("ion", current_a=700e-12, horizontal_field_width_m=60e-6, key="demo/ion-beam")
            ion = bridge.grab_frame(FrameRequest("ion", 1024, 768, 0.5e-6), key="demo/ion-before")
            trench = MillPattern("rectangle", (0.0, -8e-6), 24e-6, 6e-6, 8e-6)
            key = "demo/trench"
            bridge.mill([trench], 15e-9, key=key)
            bridge.mill([trench], 15e-9, key=key)  # a re-send after a lost reply: answered from the record
            mills = len(read_mill_log(state_dir))
            ion_after = bridge.grab_frame(FrameRequest("ion", 1024, 768, 0.5e-6), key="demo/ion-after")
            bridge.set_beam("electron", voltage_v=1500.0, current_a=1e-9, horizontal_field_width_m=10.24e-6, key="demo/sem-beam")
            face = bridge.grab_frame(FrameRequest("electron", 2048, 1536, 2e-6, line_averaging=2), key="demo/face")
    finally:
        server.close()
    pictures = _pictures(folder, ion.image, ion_after.image, face.image)
    console.print(f"  moved to the target ({x_um:.1f}, {y_um:.1f}) µm; trench milled: the same key sent twice, "
                  f"the simulator's mill log has {mills} mill")
    console.print(f"  face imaged: {face.image.shape[1]}x{face.image.shape[0]} px at "
                  f"{face.metadata.get('pixel_size_m', [0])[0] * 1e9:.1f} nm, dwell {face.metadata.get('dwell_s', 0) * 1e6:.2f} µs "
                  "(as the instrument reported)")
    for picture in pictures:
        console.print(f"  [green]✓[/green] {picture}")
    return {"mills_logged": mills, "pictures": [p.name for p in pictures]}


def _pictures(folder: Path, ion_before: np.ndarray, ion_after: np.ndarray, face: np.ndarray) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, image, title in zip(axes, (ion_before, ion_after), ("ion beam: block surface at the target", "after the trench")):
        ax.imshow(image, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    ion_path = folder / "ion_trench.png"
    fig.savefig(ion_path, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.imshow(face, cmap="gray")
    ax.set_title("SEM: the milled face through the cell (EsB, inverted)")
    ax.axis("off")
    fig.tight_layout()
    face_path = folder / "sem_face.png"
    fig.savefig(face_path, dpi=100)
    plt.close(fig)
    return [ion_path, face_path]
