"""The simulated FIB-SEM's physical state, its limits and its file on disk.

Everything here is plain data: units are SI (m, V, A, Pa) and degrees for
angles; stigmation is in normalised units (-1..1), brightness and contrast
are fractions (0..1). The look-alikes convert to their vendor's units.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BEAMS",
    "BeamState",
    "DETECTORS",
    "InstrumentState",
    "LIMITS",
    "S0_UM",
    "SITE_RADIUS_UM",
    "Site",
    "StageState",
    "V_CENTER_UM",
    "WD_REF_M",
    "Z_REF_M",
    "load_state",
    "save_state",
]

BEAMS: tuple[str, ...] = ("electron", "ion")

# Instrument-native detector names (Zeiss-like). SE2 on the electron beam images like InLens.
DETECTORS: dict[str, tuple[str, ...]] = {"electron": ("InLens", "SE2", "EsB"), "ion": ("SE2", "SESI")}

# Crossbeam-like ranges; the look-alikes refuse anything outside them (SmartSEM 1003, AutoScript exception).
LIMITS: dict[str, Any] = {
    "electron": {
        "voltage_v": (20.0, 30_000.0),
        "current_a": (1e-12, 100e-9),
        "working_distance_m": (1e-3, 50e-3),
        "hfw_m": (0.5e-6, 3e-3),
        "stigmation": (-1.0, 1.0),
        "beam_shift_m": (-20e-6, 20e-6),
    },
    "ion": {
        "voltage_v": (500.0, 30_000.0),
        "current_a": (1e-12, 100e-9),
        "working_distance_m": (1e-3, 50e-3),
        "hfw_m": (0.5e-6, 1e-3),
        "stigmation": (-1.0, 1.0),
        "beam_shift_m": (-50e-6, 50e-6),
    },
    "stage": {"x_m": (-50e-3, 50e-3), "y_m": (-50e-3, 50e-3), "z_m": (0.0, 50e-3), "r_deg": (-360.0, 360.0),
              "t_deg": (-4.0, 70.0)},
    "dwell_s": (25e-9, 1e-3),
    "dwell_quantum_s": 25e-9,
    "width_px": (16, 32768),
    "height_px": (16, 24576),
    "line_averaging": (1, 255),
    "bit_depth": (8, 16),
    "pattern_size_m": (1e-9, 1e-3),
    "mill_depth_m": (1e-9, 100e-6),
}

WD_REF_M = 5.0e-3  # electron working distance in focus at the coincidence point (stage z = Z_REF_M)
Z_REF_M = 25.0e-3  # stage height at which the block surface is at the coincidence point
S0_UM = -6.0  # where a new site's face starts along the milling axis (µm from the site origin)
SITE_RADIUS_UM = 50.0  # a stage position within this of a site's origin images/mills that site
V_CENTER_UM = 3.5  # depth below the block surface (µm) at the centre of an unshifted electron image of the face at S0


@dataclass
class BeamState:
    on: bool = True
    blanked: bool = False
    voltage_v: float = 1500.0
    current_a: float = 1e-9
    working_distance_m: float = WD_REF_M
    hfw_m: float = 10.24e-6
    stigmation: tuple[float, float] = (0.0, 0.0)
    beam_shift_m: tuple[float, float] = (0.0, 0.0)
    scan_rotation_deg: float = 0.0
    detector: str = "EsB"
    brightness: float = 0.5
    contrast: float = 0.5


@dataclass
class StageState:
    x_m: float = 0.0
    y_m: float = 0.0
    z_m: float = Z_REF_M
    r_deg: float = 0.0
    t_deg: float = 54.0


@dataclass
class Site:
    """A place on the block where faces are milled: ``FaceGeometry(origin_um, 0)``."""

    origin_um: tuple[float, float]
    face_s_um: float = S0_UM
    mills: int = 0
    pits: list[list[float]] = field(default_factory=list)  # milled areas, block frame (x0, y0, x1, y1) µm


@dataclass
class InstrumentState:
    vacuum_ready: bool = True
    chamber_pa: float = 2.0e-4
    electron: BeamState = field(default_factory=BeamState)
    ion: BeamState = field(
        default_factory=lambda: BeamState(voltage_v=30_000.0, current_a=50e-12, hfw_m=100e-6, detector="SE2")
    )
    stage: StageState = field(default_factory=StageState)
    sites: list[Site] = field(default_factory=list)
    mill_count: int = 0
    frame_count: int = 0
    autofunction_count: int = 0

    def beam(self, name: str) -> BeamState:
        if name not in BEAMS:
            raise ValueError(f"unknown beam {name!r}: use 'electron' or 'ion'")
        return self.electron if name == "electron" else self.ion

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "InstrumentState":
        def beam(b: dict[str, Any]) -> BeamState:
            b = dict(b)
            b["stigmation"] = tuple(b["stigmation"])
            b["beam_shift_m"] = tuple(b["beam_shift_m"])
            return BeamState(**b)

        sites = [Site(tuple(s["origin_um"]), s["face_s_um"], s["mills"], [list(p) for p in s["pits"]])
                 for s in d["sites"]]
        return cls(
            vacuum_ready=d["vacuum_ready"],
            chamber_pa=d["chamber_pa"],
            electron=beam(d["electron"]),
            ion=beam(d["ion"]),
            stage=StageState(**d["stage"]),
            sites=sites,
            mill_count=d["mill_count"],
            frame_count=d.get("frame_count", 0),
            autofunction_count=d.get("autofunction_count", 0),
        )


def save_state(path: Path, state: InstrumentState) -> None:
    """Write atomically: a temporary file, fsync, then ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state.as_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> InstrumentState:
    if not path.exists():
        return InstrumentState()
    with open(path, encoding="utf-8") as f:
        return InstrumentState.from_json(json.load(f))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log, oldest first (a line cut off by a crash is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
