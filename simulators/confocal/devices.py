"""Simulated confocal devices: pymmcore-plus Python devices over one :class:`SimulatedMicroscope`.

Every class has a zero-argument constructor (a ``#py pyDevice,<label>,
clemflow.simulators.confocal.devices,<Class>`` line builds it) and binds the
microscope current at construction (see :mod:`.context`). Devices behave as
blocking hardware: a move returns when the axis has arrived and settled, and
the time it took is charged to the microscope's clock (never time.sleep).

- :class:`SimCamera` renders the dish under the objective (stage -> dish through the pose),
  at the focal height the focus drive and the objective give, in the current channel;
  it raises :class:`FrameDropped` / :class:`CameraTimeout` at the snap indices the faults list.
- :class:`SimXYStage`, :class:`SimFocusDrive`: travel limits (a target outside raises
  :class:`StageLimitError` before anything moves), trapezoidal/linear move time, settling,
  software origin, injected :class:`StageError`.
- :class:`SimObjectiveTurret` (positions 0 = "10x", 1 = "63x"), :class:`SimChannel`
  (0 = "TL" lamp, 1..3 = 405/488/639 lasers) and :class:`SimShutter`.

The physical meaning of a turret or channel position is fixed by its index; labels
given in a .cfg (``Label,Objective,1,...``) rename positions without changing optics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pymmcore_plus.core._constants import FocusDirection, Keyword
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

from . import context
from .context import CHANNEL_LABELS, OBJECTIVE_LABELS, CameraTimeout, FrameDropped, StageError, StageLimitError
from .render import render_view

__all__ = ["SimCamera", "SimChannel", "SimFocusDrive", "SimObjectiveTurret", "SimShutter", "SimXYStage"]


def _finite(*values: float) -> None:
    for v in values:
        if not math.isfinite(v):
            raise StageLimitError(f"stage target {v!r} is not a finite number; nothing moved")


class SimCamera(SimpleCameraDevice):
    """Simulated sCMOS camera (6.5 µm pixels) that images the simulated specimen."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = context.current()
        self._exposure_ms = 10.0
        self._binning = 1
        # limits, not allowed values: a .cfg passes "1" (a string), which allowed values [1, 2, 4] reject
        self.set_property_limits(Keyword.Binning, (1, 4))
        self.register_property("SnapCount", getter=lambda dev: dev.ctx.snap_count, property_type=int, is_read_only=True)

    # -- mandatory -------------------------------------------------------------------------

    def sensor_shape(self) -> tuple[int, int]:
        h, w = self.ctx.optics.sensor_shape
        return (h // self._binning, w // self._binning)

    def dtype(self) -> Any:
        return np.uint16

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        exposure = float(exposure)
        if not (0.0 < exposure <= 60_000.0):
            raise ValueError(f"exposure {exposure} ms out of range (0, 60000]")
        self._exposure_ms = exposure

    def get_binning(self) -> int:
        return self._binning

    def set_binning(self, value: int) -> None:
        value = int(float(value))
        if value not in (1, 2, 4):
            raise ValueError(f"binning {value} not supported; use 1, 2 or 4")
        self._binning = value
        self.clear_roi()

    def get_camera_name(self) -> str:
        return "clemflow simulated sCMOS"

    def snap(self, buffer: np.ndarray) -> dict[str, str]:
        ctx = self.ctx
        with ctx.lock:
            index = ctx.snap_count
            ctx.snap_count += 1
            hw = ctx.hw
            x, y, z = hw.x_um, hw.y_um, hw.z_um
            objective, channel, shutter = hw.objective, hw.channel, hw.shutter_open
            faults = ctx.faults
            timeout = index in faults.camera_timeouts
            dropped = index in faults.drop_frames
        if timeout:
            ctx.charge(faults.timeout_s)
            raise CameraTimeout(f"simulated camera: no frame within {faults.timeout_s:g} s (snap #{index})")
        t_start = ctx.clock.now()
        exposure_s = self._exposure_ms / 1000.0
        hit = ctx.dish_at(x, y)
        height = z - (hit[1].glass_drive_z(x, y) if hit else 0.0) - ctx.optics.parfocal_offset_um.get(objective, 0.0)
        shape = buffer.shape[:2]
        pixel = context.pixel_size_for(objective, self._binning, ctx.optics.camera_pixel_um)
        rng = np.random.default_rng([ctx.seed, index])
        frame = render_view(
            hit[1] if hit else None,
            (x, y),
            height,
            objective,
            channel,
            exposure_s,
            shape,
            pixel,
            rng,
            ctx.optics.camera,
            dark=ctx.optics.dark_when_shutter_closed and not shutter,
        )
        ctx.charge(exposure_s + ctx.optics.readout_s_per_row * shape[0] * self._binning)
        if dropped:
            raise FrameDropped(f"simulated camera: frame of snap #{index} never arrived")
        buffer[:] = frame
        return {
            "SimSnapIndex": str(index),
            "SimClockStart_s": f"{t_start:.6f}",
            "SimStage_um": f"{x:.3f},{y:.3f}",
            "SimFocus_um": f"{z:.3f}",
            "SimObjective": objective,
            "SimChannel": channel,
            "SimShutterOpen": str(int(shutter)),
        }


class SimXYStage(XYStageDevice):
    """Motorised XY stage (Ti2-like: 110 x 75 mm travel, 10 mm/s) over the simulated stand."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = context.current()
        self._origin = (0.0, 0.0)
        x0, x1, y0, y1 = self.ctx.optics.xy_limits_um
        for name, value in (("LimitXMin_um", x0), ("LimitXMax_um", x1), ("LimitYMin_um", y0), ("LimitYMax_um", y1)):
            self.register_property(name, default_value=float(value), is_read_only=True)
        self.register_property("Speed_um_s", default_value=float(self.ctx.optics.xy_speed_um_s), is_read_only=True)

    def travel_um(self) -> tuple[float, float, float, float]:
        """(x_min, x_max, y_min, y_max) in reported (origin-shifted) coordinates."""
        x0, x1, y0, y1 = self.ctx.optics.xy_limits_um
        ox, oy = self._origin
        return (x0 - ox, x1 - ox, y0 - oy, y1 - oy)

    def set_position_um(self, x: float, y: float) -> None:
        x, y = float(x), float(y)
        _finite(x, y)
        mx, my = x + self._origin[0], y + self._origin[1]
        ctx = self.ctx
        x0, x1, y0, y1 = ctx.optics.xy_limits_um
        if not (x0 <= mx <= x1 and y0 <= my <= y1):
            lo_x, hi_x, lo_y, hi_y = self.travel_um()
            raise StageLimitError(
                f"XY target ({x:.1f}, {y:.1f}) µm is outside the stage travel "
                f"x [{lo_x:.0f}, {hi_x:.0f}], y [{lo_y:.0f}, {hi_y:.0f}] µm; the stage did not move"
            )
        with ctx.lock:
            index = ctx.xy_move_count
            ctx.xy_move_count += 1
            failed = index in ctx.faults.xy_stage_errors
            dt = ctx.xy_move_time(mx - ctx.hw.x_um, my - ctx.hw.y_um)
        if failed:
            ctx.charge(ctx.optics.xy_settle_s)
            raise StageError(f"simulated XY stage: controller error on move #{index}; the stage did not move")
        ctx.charge(dt)
        with ctx.lock:
            ctx.hw.x_um, ctx.hw.y_um = mx, my
        self._emit(x, y)

    def _emit(self, x: float, y: float) -> None:
        try:
            self.core.events.XYStagePositionChanged.emit(self.get_label(), x, y)
        except AttributeError:  # not loaded into a core
            pass

    def get_position_um(self) -> tuple[float, float]:
        return (self.ctx.hw.x_um - self._origin[0], self.ctx.hw.y_um - self._origin[1])

    def set_origin_x(self) -> None:
        self._origin = (self.ctx.hw.x_um, self._origin[1])

    def set_origin_y(self) -> None:
        self._origin = (self._origin[0], self.ctx.hw.y_um)

    def home(self) -> None:
        """Move to the mechanical centre (0, 0) and clear any software origin."""
        self._origin = (0.0, 0.0)
        self.set_position_um(0.0, 0.0)

    def stop(self) -> None:
        """Moves are blocking and complete before control returns: nothing to stop."""


class SimFocusDrive(StageDevice):
    """Motorised focus drive (nosepiece Z): 0-10 mm travel, 1 mm/s plus settling."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = context.current()
        self._origin = 0.0
        lo, hi = self.ctx.optics.z_limits_um
        self.register_property("LimitMin_um", default_value=float(lo), is_read_only=True)
        self.register_property("LimitMax_um", default_value=float(hi), is_read_only=True)

    def travel_um(self) -> tuple[float, float]:
        lo, hi = self.ctx.optics.z_limits_um
        return (lo - self._origin, hi - self._origin)

    def set_position_um(self, val: float) -> None:
        z = float(val)
        _finite(z)
        mz = z + self._origin
        ctx = self.ctx
        lo, hi = ctx.optics.z_limits_um
        if not lo <= mz <= hi:
            tlo, thi = self.travel_um()
            raise StageLimitError(f"focus target {z:.2f} µm is outside the focus travel [{tlo:.0f}, {thi:.0f}] µm; focus did not move")
        with ctx.lock:
            index = ctx.z_move_count
            ctx.z_move_count += 1
            failed = index in ctx.faults.z_stage_errors
            dt = ctx.z_move_time(mz - ctx.hw.z_um)
        if failed:
            ctx.charge(ctx.optics.z_settle_s)
            raise StageError(f"simulated focus drive: controller error on move #{index}; focus did not move")
        ctx.charge(dt)
        with ctx.lock:
            ctx.hw.z_um = mz
        try:
            self.core.events.stagePositionChanged.emit(self.get_label(), z)
        except AttributeError:
            pass

    def get_position_um(self) -> float:
        return self.ctx.hw.z_um - self._origin

    def set_origin(self) -> None:
        self._origin = self.ctx.hw.z_um

    def home(self) -> None:
        """Move to the lower end of travel and clear any software origin."""
        self._origin = 0.0
        self.set_position_um(self.ctx.optics.z_limits_um[0])

    def stop(self) -> None:
        """Moves are blocking: nothing to stop."""

    def get_focus_direction(self) -> FocusDirection:
        return FocusDirection.TowardSample


class SimObjectiveTurret(StateDevice):
    """Nosepiece: position 0 = 10x/0.3 air, 1 = 63x/1.4 oil (1.5 s to change, no parfocal compensation)."""

    def __init__(self) -> None:
        super().__init__(dict(enumerate(OBJECTIVE_LABELS)))
        self.ctx = context.current()

    def get_state(self) -> int:
        return OBJECTIVE_LABELS.index(self.ctx.hw.objective)

    def set_state(self, position: int) -> None:
        position = int(position)
        if not 0 <= position < len(OBJECTIVE_LABELS):
            raise ValueError(f"turret position {position} does not exist; positions 0..{len(OBJECTIVE_LABELS) - 1}")
        target = OBJECTIVE_LABELS[position]
        if target != self.ctx.hw.objective:
            self.ctx.charge(self.ctx.optics.turret_s)
            self.ctx.hw.objective = target


class SimChannel(StateDevice):
    """Light source / filter selection: 0 = TL lamp, 1 = 405, 2 = 488, 3 = 639 nm laser lines."""

    def __init__(self) -> None:
        super().__init__(dict(enumerate(CHANNEL_LABELS)))
        self.ctx = context.current()

    def get_state(self) -> int:
        return CHANNEL_LABELS.index(self.ctx.hw.channel)

    def set_state(self, position: int) -> None:
        position = int(position)
        if not 0 <= position < len(CHANNEL_LABELS):
            raise ValueError(f"channel position {position} does not exist; positions 0..{len(CHANNEL_LABELS) - 1}")
        target = CHANNEL_LABELS[position]
        if target != self.ctx.hw.channel:
            self.ctx.charge(self.ctx.optics.channel_switch_s)
            self.ctx.hw.channel = target


class SimShutter(ShutterDevice):
    """Illumination shutter (laser blanking / lamp shutter)."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = context.current()

    def get_open(self) -> bool:
        return self.ctx.hw.shutter_open

    def set_open(self, open: bool) -> None:
        open = bool(open)
        if open != self.ctx.hw.shutter_open:
            self.ctx.charge(self.ctx.optics.shutter_s)
            self.ctx.hw.shutter_open = open
