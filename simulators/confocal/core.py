"""Build a UniMMCore with the simulated confocal loaded (from its Micro-Manager .cfg by default)."""

from __future__ import annotations

import logging

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pymmcore_plus.experimental.unicore import UniMMCore

from . import context
from .context import ConfocalFaults, OpticsParams, SimulatedMicroscope, pixel_size_for

if TYPE_CHECKING:
    from ..specimen.overview import DishPose
    from ..specimen.world import World

__all__ = [
    "OBJECTIVE_DEVICE",
    "PIXEL_CONFIG",
    "SIMULATED_CFG",
    "build_simulated_core",
    "follow_objective_pixel_size",
    "microscope_of",
]

SIMULATED_CFG = Path(__file__).with_name("simulated_confocal.cfg")
PIXEL_CONFIG = "Sim"
OBJECTIVE_DEVICE = "Objective"


def follow_objective_pixel_size(
    core: UniMMCore, ctx: SimulatedMicroscope, objective_device: str = OBJECTIVE_DEVICE, config: str = PIXEL_CONFIG
) -> None:
    """Keep the core's pixel size equal to the current objective's (Python devices cannot drive pixel configs).

    Defines one empty pixel-size config ``config`` (it matches every state), sets it from the
    turret's current objective, and re-sets it whenever the turret's State or Label changes
    (setConfig("Objective", ...), setState and setProperty all emit propertyChanged). The
    objective is read from the microscope's hardware state, not through the core: the core
    holds the turret's lock while the event is emitted. The size is unbinned; UniMMCore
    multiplies by the camera binning itself.
    """
    if config not in core.getAvailablePixelSizeConfigs():
        core.definePixelSizeConfig(config)

    def update() -> None:
        core.setPixelSizeUm(config, pixel_size_for(ctx.hw.objective, 1, ctx.optics.camera_pixel_um))
        core.setPixelSizeConfig(config)

    def on_property(device: str, prop: str, _value: Any) -> None:
        if device == objective_device and prop in ("State", "Label"):
            update()

    core.events.propertyChanged.connect(on_property)
    update()


def build_simulated_core(
    world: "World | None",
    pose: "DishPose | None" = None,
    clock: Any = None,
    faults: ConfocalFaults | None = None,
    cfg: str | Path | None = None,
    *,
    optics: OpticsParams | None = None,
    glass_z_um: float = 2000.0,
    seed: int = 0,
) -> UniMMCore:
    """A UniMMCore with the simulated confocal: install the microscope, load ``cfg`` (default: the
    simulated .cfg), follow the objective's pixel size, cache the state.

    ``world``/``pose``: the dish "D1" on the stage (``None``: no dish yet; add dishes with
    ``microscope_of(core).place_dish``). ``clock``: any object with now()/sleep() (schedule.clock);
    default: a virtual clock. The microscope is reachable as ``microscope_of(core)``.
    """
    ctx = context.install(world, pose, clock, faults, optics, glass_z_um=glass_z_um, seed=seed)
    # The simulator needs no Micro-Manager C++ installation; silence pymmcore-plus's search for one.
    logger = logging.getLogger("pymmcore-plus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        core = UniMMCore()
    finally:
        logger.setLevel(level)
    core.loadSystemConfiguration(str(cfg or SIMULATED_CFG))
    follow_objective_pixel_size(core, ctx)
    core.updateSystemStateCache()
    core._clemflow_microscope = ctx  # type: ignore[attr-defined]
    return core


def microscope_of(core: UniMMCore) -> SimulatedMicroscope:
    """The simulated microscope behind a core built by :func:`build_simulated_core`."""
    ctx = getattr(core, "_clemflow_microscope", None)
    if ctx is None:
        raise ValueError("this core was not built by build_simulated_core")
    return ctx
