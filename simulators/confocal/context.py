"""The shared state of the simulated confocal: world, dish placement, clock, faults, hardware.

Micro-Manager builds devices with zero-argument constructors (that is what a
``#py pyDevice,<label>,<module>,<class>`` line in a .cfg does), so the devices
cannot be handed the specimen or the clock. They find them here instead:

    from clemflow.simulators.confocal import context
    ctx = context.install(world, pose, clock, faults)   # before loading the .cfg
    core = UniMMCore(); core.loadSystemConfiguration(SIMULATED_CFG)

``install`` makes a new :class:`SimulatedMicroscope` the *current* one. Every
device binds the microscope that is current when it is **constructed**, so a
core built after another ``install`` gets fresh state while cores built before
keep theirs (tests can build several cores in one process). A device built with
no microscope installed raises :class:`NoSimulationInstalled`.

One microscope holds:

- the dishes on the stage (``dishes``: name -> :class:`PlacedDish` = world + pose
  + glass height); ``install`` puts one dish named ``"D1"``, ``place_dish`` adds,
  moves (take out and put back rotated/shifted) or swaps dishes;
- the clock every move, exposure and timeout is charged to (never time.time());
- :class:`ConfocalFaults`, mutable at any time (``ctx.faults.drop_frames.add(ctx.snap_count + 3)``);
- :class:`HardwareState`: the one true position of every axis, the turret,
  the channel and the shutter; the devices are views of it, the camera renders
  from it;
- counters (``snap_count``, ``xy_move_count``, ``z_move_count``) that fault
  indices refer to, and the optical constants (:class:`OpticsParams`).

Coordinates. Stage µm are what the XY stage reports. A dish's pose maps dish µm
(the specimen's frame) to stage µm: ``stage = pose.dish_to_stage(dish)``. The
camera's columns run along +stage x and rows along +stage y, and the image
centre is the stage position. The focus drive reports drive µm; the focal plane
sits ``focus_height_um(z_drive, objective)`` above the glass:

    height = z_drive - glass_z_um - parfocal_offset_um[objective] - tilt . stage_xy / 1000
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..specimen.lm import OBJECTIVES, Camera
from ..specimen.overview import DishPose

if TYPE_CHECKING:
    from ..specimen.world import World

__all__ = [
    "CHANNEL_LABELS",
    "OBJECTIVE_LABELS",
    "CameraTimeout",
    "ConfocalFaults",
    "FrameDropped",
    "HardwareState",
    "NoSimulationInstalled",
    "OpticsParams",
    "PlacedDish",
    "SimulatedMicroscope",
    "StageError",
    "StageLimitError",
    "current",
    "install",
    "pixel_size_for",
    "uninstall",
]

OBJECTIVE_LABELS: tuple[str, ...] = ("10x", "63x")
CHANNEL_LABELS: tuple[str, ...] = ("TL", "405", "488", "639")


# -- errors a real device would raise ------------------------------------------------------


class NoSimulationInstalled(RuntimeError):
    """A simulated device was built before ``context.install(...)``."""


class FrameDropped(RuntimeError):
    """The camera delivered no frame for this snap (injected fault)."""


class CameraTimeout(TimeoutError):
    """The camera did not answer within its timeout (injected fault)."""


class StageError(RuntimeError):
    """The stage controller reported an error; the stage did not move (injected fault)."""


class StageLimitError(ValueError):
    """A move target lies outside the travel of an axis; refused before anything moved."""


# -- parameters ----------------------------------------------------------------------------


@dataclass
class ConfocalFaults:
    """Faults to inject; indices are 0-based counts kept by the microscope (see ``SimulatedMicroscope``).

    ``drop_frames``: snap indices whose frame never arrives (``snap`` raises :class:`FrameDropped`
    after the exposure was spent). ``camera_timeouts``: snap indices that hang for ``timeout_s``
    (charged to the clock) and raise :class:`CameraTimeout`. ``xy_stage_errors`` /
    ``z_stage_errors``: move indices that fail with :class:`StageError` (the axis stays where it
    was). A retry is a new index, so it succeeds unless that index is listed too.
    """

    drop_frames: set[int] = field(default_factory=set)
    camera_timeouts: set[int] = field(default_factory=set)
    timeout_s: float = 5.0
    xy_stage_errors: set[int] = field(default_factory=set)
    z_stage_errors: set[int] = field(default_factory=set)


@dataclass
class OpticsParams:
    """Mechanics and optics of the simulated stand (Ti2-like stage, sCMOS camera)."""

    xy_limits_um: tuple[float, float, float, float] = (-55_000.0, 55_000.0, -37_500.0, 37_500.0)
    """(x_min, x_max, y_min, y_max) stage travel."""
    xy_speed_um_s: float = 10_000.0
    xy_accel_um_s2: float = 100_000.0
    xy_settle_s: float = 0.03
    z_limits_um: tuple[float, float] = (0.0, 10_000.0)
    z_speed_um_s: float = 1_000.0
    z_settle_s: float = 0.005
    turret_s: float = 1.5
    channel_switch_s: float = 0.01
    shutter_s: float = 0.0
    parfocal_offset_um: dict[str, float] = field(default_factory=lambda: {"63x": 0.0, "10x": -8.0})
    """Drive offset of each objective's focal plane relative to the 63x (reference) objective."""
    camera_pixel_um: float = 6.5
    sensor_shape: tuple[int, int] = (512, 512)
    readout_s_per_row: float = 10e-3 / 2048
    camera: Camera = field(default_factory=Camera)
    """Noise model (gain, offset, read noise, backgrounds) shared with the specimen renderer."""
    dark_when_shutter_closed: bool = False
    """UniMMCore's autoshutter does not drive Python shutters, so by default frames are lit
    whatever the shutter says (the state is recorded in the frame metadata)."""


def pixel_size_for(objective_label: str, binning: int = 1, camera_pixel_um: float = 6.5) -> float:
    """Object-side pixel size (µm) of the simulated camera behind an objective ("10x", "63x")."""
    try:
        obj = OBJECTIVES[objective_label]
    except KeyError:
        raise KeyError(f"unknown objective {objective_label!r}; known: {list(OBJECTIVE_LABELS)}") from None
    return camera_pixel_um * binning / obj.magnification


@dataclass
class PlacedDish:
    """A dish on the stage: its specimen, where it sits (dish µm -> stage µm) and the glass height.

    ``glass_z_um`` is the focus-drive position (63x) at which the glass top surface is in focus
    at stage (0, 0); ``tilt_um_per_mm`` adds (tx * x_mm + ty * y_mm) across the stage.
    ``radius_um``: glass area around the grid centre in which this dish is seen.
    """

    world: "World"
    pose: DishPose = DishPose()
    glass_z_um: float = 2000.0
    tilt_um_per_mm: tuple[float, float] = (0.0, 0.0)
    radius_um: float = 10_000.0

    def grid_centre_dish(self) -> np.ndarray:
        ncol, nrow = self.world.grid.shape
        pitch = self.world.grid.pitch_um
        return np.array([ncol * pitch / 2, nrow * pitch / 2])

    def contains_stage(self, x: float, y: float) -> bool:
        d = self.pose.stage_to_dish(np.array([x, y]))
        return bool(np.hypot(*(d - self.grid_centre_dish())) <= self.radius_um)

    def glass_drive_z(self, x: float, y: float) -> float:
        tx, ty = self.tilt_um_per_mm
        return self.glass_z_um + tx * x / 1000.0 + ty * y / 1000.0


@dataclass
class HardwareState:
    """The one true state of the simulated stand; devices read and write it."""

    x_um: float = 0.0
    y_um: float = 0.0
    z_um: float = 2000.0
    objective: str = "10x"
    channel: str = "TL"
    shutter_open: bool = False


# -- the microscope ------------------------------------------------------------------------


class _StandaloneClock:
    """Virtual time for a microscope built without a clock (simulators import no orchestrator code)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._now += seconds

    advance = sleep



class SimulatedMicroscope:
    """World(s) on the stage, clock, faults, hardware state and counters of one simulated stand."""

    def __init__(
        self,
        world: "World | None" = None,
        pose: DishPose | None = None,
        clock: Any = None,
        faults: ConfocalFaults | None = None,
        optics: OpticsParams | None = None,
        *,
        glass_z_um: float = 2000.0,
        seed: int = 0,
    ) -> None:
        self.clock = clock if clock is not None else _StandaloneClock()
        self.faults = faults if faults is not None else ConfocalFaults()
        self.optics = optics if optics is not None else OpticsParams()
        self.seed = seed
        self.dishes: dict[str, PlacedDish] = {}
        self.hw = HardwareState(z_um=glass_z_um)
        self.snap_count = 0
        self.xy_move_count = 0
        self.z_move_count = 0
        self.lock = threading.RLock()
        if world is not None:
            self.place_dish("D1", world, pose or DishPose(), glass_z_um=glass_z_um)

    # -- dishes --------------------------------------------------------------------------

    def place_dish(
        self,
        name: str,
        world: "World | None" = None,
        pose: DishPose | None = None,
        *,
        glass_z_um: float | None = None,
        tilt_um_per_mm: tuple[float, float] | None = None,
    ) -> PlacedDish:
        """Put a dish on the stage, or move one already there (omitted arguments keep their value)."""
        with self.lock:
            old = self.dishes.get(name)
            if world is None:
                if old is None:
                    raise KeyError(f"dish {name!r} is not on the stage; give its world")
                world = old.world
            dish = PlacedDish(
                world=world,
                pose=pose if pose is not None else (old.pose if old else DishPose()),
                glass_z_um=glass_z_um if glass_z_um is not None else (old.glass_z_um if old else 2000.0),
                tilt_um_per_mm=tilt_um_per_mm if tilt_um_per_mm is not None else (old.tilt_um_per_mm if old else (0.0, 0.0)),
            )
            self.dishes[name] = dish
            return dish

    def remove_dish(self, name: str) -> None:
        with self.lock:
            self.dishes.pop(name, None)

    def dish_at(self, x_um: float, y_um: float) -> tuple[str, PlacedDish] | None:
        """The dish whose glass lies under the stage point, if any."""
        for name, dish in self.dishes.items():
            if dish.contains_stage(x_um, y_um):
                return name, dish
        return None

    def _one_dish(self, name: str | None) -> PlacedDish:
        if name is not None:
            return self.dishes[name]
        if len(self.dishes) != 1:
            raise ValueError(f"name the dish: {sorted(self.dishes)} are on the stage")
        return next(iter(self.dishes.values()))

    # -- truth-side conversions (tests, demos; a controller never calls these) -----------

    def dish_to_stage(self, dish_xy, dish: str | None = None) -> np.ndarray:
        return self._one_dish(dish).pose.dish_to_stage(np.asarray(dish_xy, float))

    def stage_to_dish(self, stage_xy, dish: str | None = None) -> np.ndarray:
        return self._one_dish(dish).pose.stage_to_dish(np.asarray(stage_xy, float))

    def focus_height_um(self, z_drive_um: float, objective: str | None = None, stage_xy=None, dish: str | None = None) -> float:
        """Height above the glass of the focal plane at drive position ``z_drive_um``."""
        objective = objective or self.hw.objective
        x, y = stage_xy if stage_xy is not None else (self.hw.x_um, self.hw.y_um)
        glass = self._glass_drive_z(x, y, dish)
        return z_drive_um - glass - self.optics.parfocal_offset_um.get(objective, 0.0)

    def z_drive_for(self, height_um: float, objective: str | None = None, stage_xy=None, dish: str | None = None) -> float:
        """Drive position that puts the focal plane ``height_um`` above the glass."""
        objective = objective or self.hw.objective
        x, y = stage_xy if stage_xy is not None else (self.hw.x_um, self.hw.y_um)
        return height_um + self._glass_drive_z(x, y, dish) + self.optics.parfocal_offset_um.get(objective, 0.0)

    def _glass_drive_z(self, x: float, y: float, dish: str | None) -> float:
        if dish is not None:
            return self.dishes[dish].glass_drive_z(x, y)
        hit = self.dish_at(x, y)
        if hit is None:
            hit = ("", self._one_dish(None)) if len(self.dishes) == 1 else None
        if hit is None:
            raise ValueError(f"no dish under stage ({x:.1f}, {y:.1f}) µm")
        return hit[1].glass_drive_z(x, y)

    def pixel_size_um(self, binning: int = 1) -> float:
        return pixel_size_for(self.hw.objective, binning, self.optics.camera_pixel_um)

    # -- time ------------------------------------------------------------------------------

    def charge(self, seconds: float) -> None:
        """Spend ``seconds`` of (planned) time on the clock: a move, an exposure, a timeout."""
        if seconds > 0:
            self.clock.sleep(seconds)

    def xy_move_time(self, dx: float, dy: float) -> float:
        """Trapezoidal profile per axis (axes move together), plus settling; 0 for no move."""
        d = max(abs(dx), abs(dy))
        if d == 0:
            return 0.0
        v, a = self.optics.xy_speed_um_s, self.optics.xy_accel_um_s2
        ramp = v * v / a
        t = d / v + v / a if d >= ramp else 2.0 * np.sqrt(d / a)
        return float(t) + self.optics.xy_settle_s

    def z_move_time(self, dz: float) -> float:
        if dz == 0:
            return 0.0
        return abs(dz) / self.optics.z_speed_um_s + self.optics.z_settle_s


# -- the current microscope ----------------------------------------------------------------

_current: SimulatedMicroscope | None = None
_current_lock = threading.Lock()


def install(
    world: "World | None" = None,
    pose: DishPose | None = None,
    clock: Any = None,
    faults: ConfocalFaults | None = None,
    optics: OpticsParams | None = None,
    *,
    glass_z_um: float = 2000.0,
    seed: int = 0,
) -> SimulatedMicroscope:
    """Make a new simulated microscope current (devices constructed from now on bind it); return it."""
    global _current
    ctx = SimulatedMicroscope(world, pose, clock, faults, optics, glass_z_um=glass_z_um, seed=seed)
    with _current_lock:
        _current = ctx
    return ctx


def uninstall() -> None:
    global _current
    with _current_lock:
        _current = None


def current() -> SimulatedMicroscope:
    """The microscope that devices constructed now will bind; raises if none was installed."""
    with _current_lock:
        ctx = _current
    if ctx is None:
        raise NoSimulationInstalled(
            "no simulated microscope installed: call clemflow.simulators.confocal.context.install(world, pose, clock, faults) "
            "before loading the simulated devices (or use build_simulated_core)"
        )
    return ctx
