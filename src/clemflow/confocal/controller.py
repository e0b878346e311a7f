"""The confocal controller: overview, grid, autofocus and z-stacks, on any CMMCorePlus.

It never knows whether the hardware is simulated: the simulator and a real
Micro-Manager configuration both arrive as a CMMCorePlus with a "Channel"
and an "Objective" configuration group. Every position is checked against the
stage's travel before anything moves.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import useq
from numpy.typing import NDArray
from pymmcore_plus import CMMCorePlus

from ..grid.find import GridNotFound, find_grid
from ..grid.registration import CameraGeometry, GridRegistration, ImageView, register_grid
from ..protocol.confocal import ChannelExposure, Confocal, Objective
from ..protocol.grid_scheme import GridScheme
from .engine import GapRecordingEngine
from .writer import StackWriter

__all__ = ["ConfocalController", "ConfocalRefused", "StackResult", "StageTravel"]


class ConfocalRefused(Exception):
    """A request that would drive the instrument somewhere unsafe or impossible; nothing moved."""


@dataclass(frozen=True)
class StageTravel:
    """Safe travel of the XY stage and the focus drive, µm."""

    x: tuple[float, float] = (-50_000.0, 50_000.0)
    y: tuple[float, float] = (-35_000.0, 35_000.0)
    z: tuple[float, float] = (-500.0, 10_000.0)

    def check(self, x: float | None = None, y: float | None = None, z: float | None = None, what: str = "") -> None:
        for name, value, (lo, hi) in (("x", x, self.x), ("y", y, self.y), ("z", z, self.z)):
            if value is not None and not lo <= value <= hi:
                raise ConfocalRefused(
                    f"{what or 'position'}: {name} = {value:.1f} µm is outside the stage travel "
                    f"[{lo:.0f}, {hi:.0f}] µm; nothing was moved"
                )


@dataclass
class StackResult:
    path: Path
    frames: int
    gaps: list[dict[str, Any]] = field(default_factory=list)
    focus_um: float = 0.0
    stage_um: tuple[float, float] = (0.0, 0.0)


class ConfocalController:
    """Drives one confocal through its CMMCorePlus according to the protocol's confocal section."""

    def __init__(self, core: CMMCorePlus, settings: Confocal, travel: StageTravel | None = None, retries: int = 1) -> None:
        self.core = core
        self.settings = settings
        self.travel = travel or StageTravel()
        self.retries = retries
        self._objectives = {o.name: o for o in settings.objectives}
        self._channels = {c.name: c for c in settings.channels}
        self.check_configuration()

    # -- configuration ----------------------------------------------------------

    def check_configuration(self) -> None:
        """Every channel and objective the protocol names must exist as a preset; refused otherwise."""
        core = self.core
        for group, names in ((self.settings.channel_group, [c.preset or c.name for c in self.settings.channels]),
                             (self.settings.objective_group, [o.preset or o.name for o in self.settings.objectives])):
            if not core.isGroupDefined(group):
                raise ConfocalRefused(f"the microscope has no configuration group {group!r}; define it in the .cfg")
            presets = set(core.getAvailableConfigs(group))
            missing = [n for n in names if n not in presets]
            if missing:
                raise ConfocalRefused(
                    f"configuration group {group!r} has no preset {', '.join(map(repr, missing))}; "
                    f"it has {', '.join(map(repr, sorted(presets)))}"
                )

    def preflight(self, targets: list, out_dir: Path, stacks: int) -> None:
        """Refuse, before anything moves, what cannot be done: explicit target positions outside the
        travel, a z range larger than the focus drive, or too little disk for the planned stacks."""
        for target in targets:
            if target.position is not None:
                x, y = target.position.x * 1e6, target.position.y * 1e6
                z = None if target.position.z is None else target.position.z * 1e6
                self.travel.check(x=x, y=y, z=z, what=f"target {target.name or target.sample} (protocol)")
        z_lo, z_hi = self.travel.z
        for what, span in (("z-stack range", self.settings.zstack.range), ("autofocus range", self.settings.autofocus.range)):
            if span * 1e6 > z_hi - z_lo:
                raise ConfocalRefused(f"{what} {span * 1e6:.0f} µm exceeds the focus drive's travel {z_hi - z_lo:.0f} µm")
        frame_bytes = 2 * self.core.getImageWidth() * self.core.getImageHeight()
        needed = stacks * len(self.settings.zstack.channels) * self.settings.zstack.planes * frame_bytes
        free = shutil.disk_usage(out_dir).free
        if needed > free:
            raise ConfocalRefused(
                f"the run needs about {needed / 1e9:.1f} GB for its z-stacks but {out_dir} has {free / 1e9:.1f} GB free"
            )

    def use_objective(self, name: str) -> Objective:
        objective = self._objectives[name]
        self.core.setConfig(self.settings.objective_group, objective.preset or objective.name)
        self.core.waitForConfig(self.settings.objective_group, objective.preset or objective.name)
        # Pixel-size configurations cannot refer to Python devices: set it from the protocol.
        self.core.setPixelSizeUm(self.core.getCurrentPixelSizeConfig(), objective.pixel_size * 1e6)
        return objective

    def focus_offset(self, objective: str) -> float:
        """Parfocal offset of an objective, µm (from the protocol)."""
        return self._objectives[objective].focus_offset * 1e6

    def use_channel(self, channel: ChannelExposure) -> None:
        preset = self._channels[channel.channel].preset or channel.channel
        self.core.setConfig(self.settings.channel_group, preset)
        self.core.setExposure(channel.exposure * 1e3)

    def camera(self) -> CameraGeometry:
        return CameraGeometry(self.core.getPixelSizeUm())

    def move_xy(self, x: float, y: float, what: str = "") -> None:
        self.travel.check(x=x, y=y, what=what)
        self.core.setXYPosition(x, y)
        self.core.waitForDevice(self.core.getXYStageDevice())

    def move_z(self, z: float, what: str = "") -> None:
        self.travel.check(z=z, what=what)
        self.core.setPosition(z)
        self.core.waitForDevice(self.core.getFocusDevice())

    # -- overview and grid --------------------------------------------------------

    def overview(
        self, centre_xy: tuple[float, float], span_um: float, focus_z: float | None = None,
        channel: ChannelExposure | None = None,
    ) -> tuple[NDArray, ImageView]:
        """Tile scan covering at least `span_um` around `centre_xy` with the overview objective,
        stitched by stage position (transmitted light unless another channel is given)."""
        self.use_objective(self.settings.overview.objective)
        self.use_channel(channel or self.settings.overview.channel)
        pixel = self.core.getPixelSizeUm()
        h, w = self.core.getImageHeight(), self.core.getImageWidth()
        overlap = self.settings.overview.overlap_percent / 100.0
        step_x, step_y = w * pixel * (1 - overlap), h * pixel * (1 - overlap)
        tiles = max(1, int(math.ceil((span_um - w * pixel) / min(step_x, step_y))) + 1)
        offsets = [(i - (tiles - 1) / 2, j - (tiles - 1) / 2) for j in range(tiles) for i in range(tiles)]
        positions = [(centre_xy[0] + i * step_x, centre_xy[1] + j * step_y) for i, j in offsets]
        for k, (x, y) in enumerate(positions):
            self.travel.check(x=x, y=y, what=f"overview tile {k}")
        z = self.core.getPosition() if focus_z is None else focus_z
        self.travel.check(z=z, what="overview focus")
        sequence = useq.MDASequence(stage_positions=[useq.Position(x=x, y=y, z=z) for x, y in positions])
        frames: dict[int, tuple[NDArray, float, float]] = {}

        def keep(image: NDArray, event: useq.MDAEvent, meta: dict) -> None:
            position = meta.get("position", {}) if isinstance(meta, dict) else {}
            frames[event.index.get("p", 0)] = (image, position.get("x", event.x_pos), position.get("y", event.y_pos))

        self._run(sequence, keep)
        span_x = step_x * (tiles - 1) + w * pixel
        span_y = step_y * (tiles - 1) + h * pixel
        mosaic_shape = (int(math.ceil(span_y / pixel)), int(math.ceil(span_x / pixel)))
        mosaic = np.zeros(mosaic_shape, np.float32)
        weight = np.zeros(mosaic_shape, np.float32)
        view = ImageView(mosaic_shape, centre_xy, CameraGeometry(pixel))
        for image, x, y in frames.values():
            top_left = view.stage_to_pixel(np.array([[x, y]]))[0] - [(w - 1) / 2, (h - 1) / 2]
            c0, r0 = int(round(top_left[0])), int(round(top_left[1]))
            r1, c1 = min(mosaic_shape[0], r0 + h), min(mosaic_shape[1], c0 + w)
            r0c, c0c = max(0, r0), max(0, c0)
            mosaic[r0c:r1, c0c:c1] += image[r0c - r0 : r1 - r0, c0c - c0 : c1 - c0]
            weight[r0c:r1, c0c:c1] += 1
        filled = weight > 0
        mosaic[filled] /= weight[filled]
        mosaic[~filled] = float(np.median(mosaic[filled])) if filled.any() else 0.0
        return mosaic, view

    def register(self, mosaic: NDArray, view: ImageView, scheme: GridScheme) -> GridRegistration:
        """Grid in the overview -> stage <-> grid registration; refused when the labels are not trusted."""
        finding = find_grid(mosaic, view.camera.pixel_size_um, scheme)
        if not finding.labelled:
            raise GridNotFound("the grid was found but its labels could not be read with confidence")
        return register_grid([(mosaic, view, finding)])

    # -- focus and stacks ----------------------------------------------------------

    def find_glass(self, xy: tuple[float, float], z_guess: float, search_um: float = 40.0) -> float:
        """Focus on the coverslip with the overview objective: the etched grid is sharpest on the glass."""
        self.use_objective(self.settings.overview.objective)
        self.use_channel(self.settings.overview.channel)
        self.move_xy(*xy, what="finding the glass")
        z = z_guess
        for half, step in ((search_um / 2, search_um / 10), (search_um / 10, search_um / 50)):
            z = self._sweep(z, half, step)
        return z

    def _sweep(self, centre: float, half: float, step: float) -> float:
        zs = np.arange(centre - half, centre + half + step / 2, step)
        self.travel.check(z=float(zs.min()), what="focus sweep")
        self.travel.check(z=float(zs.max()), what="focus sweep")
        scores = []
        for z in zs:
            self.move_z(float(z))
            self.core.snapImage()
            scores.append(_sharpness(self.core.getImage()))
        i = int(np.argmax(scores))
        best = float(zs[i])
        if 0 < i < len(zs) - 1:
            a, b, c = scores[i - 1 : i + 2]
            denom = a - 2 * b + c
            if denom < 0:
                best += step * float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
        return best

    def autofocus(self, xy: tuple[float, float], z_guess: float) -> float:
        """Software autofocus: the z of highest transmitted-light sharpness in a sweep, refined by a parabola."""
        settings = self.settings.autofocus
        self.use_objective(self.settings.zstack.objective)  # focus with the objective that takes the stack
        self.use_channel(ChannelExposure(channel=settings.channel, exposure="10 ms"))
        self.move_xy(*xy, what="autofocus")
        return self._sweep(z_guess, settings.range * 1e6 / 2, settings.step * 1e6)

    def zstack(self, path: Path, xy: tuple[float, float], z_centre: float, metadata: dict[str, Any]) -> StackResult:
        """A multi-channel z-stack around z_centre, one OME-TIFF, gaps recorded at their own index."""
        stack = self.settings.zstack
        self.use_objective(stack.objective)
        planes = stack.planes
        step = stack.step * 1e6
        zs = z_centre + (np.arange(planes) - (planes - 1) / 2) * step
        self.travel.check(x=xy[0], y=xy[1], z=float(zs.min()), what=f"z-stack {path.name}")
        self.travel.check(z=float(zs.max()), what=f"z-stack {path.name}")
        names = [c.channel for c in stack.channels]
        writer = StackWriter(
            path, names, planes, (self.core.getImageHeight(), self.core.getImageWidth()),
            self.core.getPixelSizeUm(), step,
            {**metadata, "objective": stack.objective, "channels": [c.model_dump(mode="json") for c in stack.channels]},
        )
        channels = [
            useq.Channel(config=self._channels[c.channel].preset or c.channel, group=self.settings.channel_group,
                         exposure=c.exposure * 1e3)
            for c in stack.channels
        ]
        sequence = useq.MDASequence(
            stage_positions=[useq.Position(x=xy[0], y=xy[1], z=z_centre)],
            z_plan=useq.ZRangeAround(range=(planes - 1) * step, step=step),
            channels=channels,
            axis_order="pzc",
        )

        def keep(image: NDArray, event: useq.MDAEvent, meta: dict) -> None:
            position = meta.get("position", {}) if isinstance(meta, dict) else {}
            writer.write(event.index.get("c", 0), event.index.get("z", 0), image, {
                "x_um": position.get("x"), "y_um": position.get("y"), "z_um": position.get("z"),
                "exposure_ms": meta.get("exposure_ms") if isinstance(meta, dict) else None,
                "time": meta.get("runner_time_ms") if isinstance(meta, dict) else None,
            })

        def gap(event: useq.MDAEvent, reason: str) -> None:
            writer.gap(event.index.get("c", 0), event.index.get("z", 0), reason)

        complete = False
        try:
            self._run(sequence, keep, gap)
            complete = not writer.gaps
        finally:
            writer.close(complete)
        return StackResult(path, writer.frames, writer.gaps, z_centre, xy)

    def _run(self, sequence: useq.MDASequence, on_frame, on_gap=None) -> None:
        engine = GapRecordingEngine(self.core, retries=self.retries, on_gap=on_gap)
        self.core.mda.set_engine(engine)
        self.core.mda.events.frameReady.connect(on_frame)
        try:
            self.core.mda.run(sequence)
        finally:
            self.core.mda.events.frameReady.disconnect(on_frame)


def _sharpness(image: NDArray) -> float:
    """Focus measure robust to shot noise: energy of the Laplacian of a lightly smoothed image,
    relative to its mean brightness squared (raw pixel differences would follow brightness, not focus)."""
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(image.astype(np.float32), 2.0)
    return float(np.var(ndi.laplace(smooth)) / (float(smooth.mean()) ** 2 + 1e-9))

