"""A simulated spinning-disk confocal made of pymmcore-plus Python devices.

    from clemflow.simulators.confocal import build_simulated_core, microscope_of
    core = build_simulated_core(world, pose, clock, faults)   # a UniMMCore, loaded from simulated_confocal.cfg
    ctx = microscope_of(core)                                 # truth, faults, counters (tests and demos only)

Device labels: Camera, XYStage, ZDrive (focus), Objective (10x, 63x), Channel (TL, 405, 488, 639),
Shutter. Config groups: "Channel" (TL/405/488/639, the channel group) and "Objective" (10x/63x).
See :mod:`.context` for the shared state and :mod:`.render` for how frames are drawn.
"""

from .context import (
    CHANNEL_LABELS,
    OBJECTIVE_LABELS,
    CameraTimeout,
    ConfocalFaults,
    FrameDropped,
    NoSimulationInstalled,
    OpticsParams,
    PlacedDish,
    SimulatedMicroscope,
    StageError,
    StageLimitError,
    install,
    pixel_size_for,
)
from .core import PIXEL_CONFIG, SIMULATED_CFG, build_simulated_core, follow_objective_pixel_size, microscope_of

__all__ = [
    "CHANNEL_LABELS",
    "OBJECTIVE_LABELS",
    "PIXEL_CONFIG",
    "SIMULATED_CFG",
    "CameraTimeout",
    "ConfocalFaults",
    "FrameDropped",
    "NoSimulationInstalled",
    "OpticsParams",
    "PlacedDish",
    "SimulatedMicroscope",
    "StageError",
    "StageLimitError",
    "build_simulated_core",
    "follow_objective_pixel_size",
    "install",
    "microscope_of",
    "pixel_size_for",
]
