"""The steps before the first slice, each done once per run and journalled.

Order: move to the target, (beams are set by ``restore_imaging`` at every
start), ion image, trench, fiducial, view and template, first autofocus.
A step journalled ``done`` is skipped on a resume. Keyed steps that may have
been cut off are settled through the server's record
(``RunContext.record_verdict``): a stage move whose outcome is unknown is
checked against the stage position; a trench or fiducial mill whose outcome
is unknown is milled again with a new key, which is harmless: the trench ends
at the first face (it removes nothing beyond it) and the fiducial is the same
"+" at the same place.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from ..bridge.backend import FrameRequest
from .context import RunContext
from .fiducial import LowContrastError
from .safety import FaultInfo, PauseRun
from .plan import FIDUCIAL_ARM_M
from .preflight import fiducial_current
from .slices import check_frame, read_slice, write_tiff
from .tracking import Tracking
from .view import (MIN_ARM_PX, MIN_CHANGE_Z, ZOOMS_OUT, FiducialSighting, capture, change_peak, correction_to,
                   desired_fiducial_px, save_template, template_size_px)

__all__ = ["STAGE_TOLERANCE_M", "restore_imaging", "run_setup"]

STAGE_TOLERANCE_M = 1e-6
ION_IMAGE = (1024, 768)
ION_DWELL_S = 1e-6
SEARCH_PX = 40.0


def _done(ctx: RunContext, step: str, **data: Any) -> None:
    ctx.journal.append("setup", "done", name=step, **data)
    ctx.memory.setup_done[step] = dict(data, name=step)


def _keyed(ctx: RunContext, step: str, send: Any, look: Any) -> dict[str, Any]:
    """Run a destructive setup request under its fixed key, settling an earlier attempt first."""
    base = ctx.key("setup", step)
    started = ctx.memory.setup_started.get(step)
    key = base
    if started is not None:
        key = str(started.get("key", base))
        verdict, info = ctx.record_verdict(key)
        if verdict != "resend":
            decision = look() if verdict == "look" else False
            ctx.journal.append("setup", "checked", name=step, key=key, verdict=verdict, decision=decision, **info)
            if decision:
                return {"settled_by": "look", **info}
            attempt = int(started.get("attempt", 0)) + 1
            key = f"{base}-retry{attempt}"
            ctx.memory.setup_started[step] = {"key": key, "attempt": attempt}
    attempt = int((ctx.memory.setup_started.get(step) or {}).get("attempt", 0))
    ctx.journal.append("setup", "started", name=step, key=key, attempt=attempt)
    ctx.memory.setup_started[step] = {"key": key, "attempt": attempt}
    result = ctx.call(lambda: send(key))
    return dict(result, key=key)


def restore_imaging(ctx: RunContext, tracking: Tracking | None, index: int) -> dict[str, Any]:
    """Both beams unblanked, the SEM at the protocol's settings and the tracked shift/WD; the ion beam unshifted."""
    sem, fib = ctx.fibsem.sem, ctx.fibsem.fib
    electron: dict[str, Any] = {"voltage_v": sem.voltage, "current_a": sem.current, "blanked": False,
                                "horizontal_field_width_m": ctx.hfw_m}
    if tracking is not None:
        electron["working_distance_m"] = tracking.working_distance(index)
        electron["beam_shift_m"] = list(tracking.beam_shift(index))
        if tracking.stigmation is not None:
            electron["stigmation"] = list(tracking.stigmation)
    else:
        electron["working_distance_m"] = sem.working_distance
        electron["beam_shift_m"] = [0.0, 0.0]
    ion = ctx.call(lambda: ctx.bridge.set_beam("ion", key=ctx.fresh("restore", "ion"), voltage_v=fib.voltage,
                                               blanked=False, beam_shift_m=[0.0, 0.0]))
    reported = ctx.call(lambda: ctx.bridge.set_beam("electron", key=ctx.fresh("restore", "electron"), **electron))
    ctx.call(lambda: ctx.bridge.set_detector("electron", sem.detector, key=ctx.fresh("restore", "detector")))
    return {"electron": reported, "ion": ion}


def run_setup(ctx: RunContext) -> Tracking:
    """Every setup step not yet done; returns the tracking state the slices start from."""
    done = ctx.memory.setup_done
    if "move" not in done:
        _move(ctx)
    if "ion_image" not in done:
        _ion_image(ctx)
    if "trench" not in done:
        result = _keyed(ctx, "trench", lambda key: ctx.bridge.mill(ctx.plan.trench(), ctx.fibsem.trench.current,
                                                                   ctx.fibsem.fib.voltage, key=key),
                        look=lambda: False)
        _done(ctx, "trench", key=result.get("key"), result=_brief(result))
    if "before" not in done:
        _before_frames(ctx)
    if "fiducial" not in done:
        current = fiducial_current(ctx.fibsem, ctx.limits)
        result = _keyed(ctx, "fiducial", lambda key: ctx.bridge.mill(ctx.plan.fiducial(), current, ctx.fibsem.fib.voltage,
                                                                     key=key),
                        look=lambda: False)
        _done(ctx, "fiducial", key=result.get("key"), result=_brief(result))
    if ctx.memory.tracking is None or "view" not in done:
        tracking = _view(ctx)
    else:
        tracking = Tracking.from_json(ctx.memory.tracking)
    if "autofocus" not in done:
        restore_imaging(ctx, tracking, 0)
        result = ctx.call(lambda: ctx.bridge.autofocus("electron", key=ctx.fresh("setup", "autofocus")))
        wd = float(result.get("working_distance_m") or tracking.working_distance(0))
        tracking = replace(tracking, base_wd_m=wd, focus_m=0.0, last_autofocus=0)
        ctx.journal.append("tracking", "updated", **tracking.as_json())
        _done(ctx, "autofocus", working_distance_m=wd)
    return tracking


def _move(ctx: RunContext) -> None:
    x, y = ctx.target.x_m, ctx.target.y_m

    def at_target() -> bool:
        stage = ctx.call(lambda: ctx.bridge.state())["stage"]
        return abs(stage["x_m"] - x) <= STAGE_TOLERANCE_M and abs(stage["y_m"] - y) <= STAGE_TOLERANCE_M

    result = _keyed(ctx, "move", lambda key: ctx.bridge.move_stage(x_m=x, y_m=y, key=key), look=at_target)
    if not at_target():
        raise PauseRun(FaultInfo("stage_error", f"the stage is not at the target ({x * 1e6:.1f}, {y * 1e6:.1f}) µm after the move",
                                 phase="move to target"))
    _done(ctx, "move", key=result.get("key"), target=ctx.target.as_json(), result=_brief(result))


def _ion_image(ctx: RunContext) -> None:
    restore_imaging(ctx, None, 0)
    w, h = ION_IMAGE
    frame = ctx.call(lambda: ctx.bridge.grab_frame(FrameRequest("ion", w, h, ION_DWELL_S), key=ctx.fresh("setup", "ion-image")))
    path = write_tiff(ctx.run_dir / "ion_image.tif", np.asarray(frame.image),
                      {"instrument": frame.metadata, "clemflow": {"run_id": ctx.run_id, "what": "ion image"}})
    _done(ctx, "ion_image", path=path.name, metadata={k: v for k, v in frame.metadata.items() if k != "truth"})


def _search_request(ctx: RunContext, zoom: float) -> FrameRequest:
    """A quick wide frame to find the fiducial in: the protocol's frame, one line, field ``zoom`` x wider."""
    req = ctx.frame_request(zoom)
    return FrameRequest(req.beam, req.width_px, req.height_px, req.dwell_s, 1, req.detector, req.horizontal_field_width_m,
                        req.bit_depth)


def _zooms(ctx: RunContext) -> list[float]:
    """Fields to search: the protocol's and wider ones, within the SEM's field limit and while the '+' spans 8 px."""
    high = ((ctx.limits.get("electron") or {}).get("horizontal_field_width_m") or [0.0, math.inf])[1]
    return [z for z in ZOOMS_OUT if ctx.hfw_m * z <= high and FIDUCIAL_ARM_M / (ctx.pixel_size_m * z) >= MIN_ARM_PX]


def _before_frames(ctx: RunContext) -> None:
    """Frames of the area before the fiducial is milled, kept on disk: the fiducial is what changes."""
    restore_imaging(ctx, None, 0)
    (ctx.run_dir / "view").mkdir(exist_ok=True)
    frames = []
    for zoom in _zooms(ctx):
        req = _search_request(ctx, zoom)
        frame = ctx.call(lambda: ctx.bridge.grab_frame(req, key=ctx.fresh("setup", f"before-x{zoom:g}")))
        path = write_tiff(ctx.run_dir / "view" / f"before_x{zoom:g}.tif", np.asarray(frame.image),
                          {"instrument": frame.metadata, "clemflow": {"run_id": ctx.run_id, "what": "before the fiducial"}})
        frames.append([zoom, str(path.relative_to(ctx.run_dir))])
    _done(ctx, "before", frames=frames)


def _view(ctx: RunContext) -> Tracking:
    """Find the fiducial, shift the beam so it sits above the face, capture its template; the initial tracking."""
    plan, pixel = ctx.plan, ctx.pixel_size_m
    sem = ctx.fibsem.sem
    tracking = Tracking(rise_m=plan.rise_per_slice_m, wd_step_m=plan.wd_per_slice_m, pixel_size_m=pixel,
                        base_wd_m=float(sem.working_distance))
    restore_imaging(ctx, None, 0)
    sighting = None
    for zoom, path in ctx.memory.setup_done["before"]["frames"]:
        before, _ = read_slice(ctx.run_dir / path)
        req = _search_request(ctx, zoom)
        after = np.asarray(ctx.call(lambda: ctx.bridge.grab_frame(req, key=ctx.fresh("setup", f"after-x{zoom:g}"))).image)
        position, z = change_peak(before, after, pixel * zoom)
        ctx.journal.append("setup", "looked", name="view", zoom_out=zoom, position_px=list(position), change_z=z)
        if z >= MIN_CHANGE_Z:
            h_, w_ = after.shape
            offset = ((position[0] - (w_ - 1) / 2) * pixel * zoom, (position[1] - (h_ - 1) / 2) * pixel * zoom)
            sighting = FiducialSighting(position, offset, z, zoom)
            break
    if sighting is None:
        raise PauseRun(FaultInfo("fiducial_lost", "the milled fiducial was not seen in the electron image: nothing changed "
                                 f"between the frames before and after milling it (fields up to {ZOOMS_OUT[-1]:g}x the "
                                 "protocol's)", phase="view"))
    size = template_size_px(pixel, plan.tilt_deg, ctx.frame_size)
    edge_below_px = math.cos(math.radians(plan.tilt_deg)) * (plan.fiducial_xy_m[1] - plan.face_y_m(0)) / pixel
    desired = desired_fiducial_px(ctx.frame_size, edge_below_px, size[1], SEARCH_PX)
    w, h = ctx.frame_size
    here = ((w - 1) / 2 + sighting.offset_m[0] / pixel, (h - 1) / 2 + sighting.offset_m[1] / pixel)
    dx, dy = correction_to(here, desired, pixel)
    tracking = replace(tracking, base_shift_m=(dx, dy))
    restore_imaging(ctx, tracking, 0)
    req = ctx.frame_request()
    image = None
    for attempt in range(3):
        frame = ctx.call(lambda: ctx.bridge.grab_frame(req, key=ctx.fresh("setup", "template-frame")))
        if check_frame(np.asarray(frame.image), w, h, int(sem.bit_depth)) is None:
            image = np.asarray(frame.image)
            break
    if image is None:
        raise PauseRun(FaultInfo("frame_rejected", "no usable electron frame for the fiducial template", phase="view"))
    try:  # centred where the shift put it: a few pixels off at most, well inside the template's margin
        template = capture(image, desired, size, pixel)
    except (LowContrastError, ValueError) as exc:
        raise PauseRun(FaultInfo("fiducial_lost", f"the fiducial template could not be captured: {exc}", phase="view")) from None
    path = save_template(ctx.run_dir, template)
    write_tiff(ctx.run_dir / "fiducial_frame.tif", image, {"instrument": frame.metadata,
                                                          "clemflow": {"run_id": ctx.run_id, "what": "fiducial frame"}})
    edge_row = template.center_px[1] + edge_below_px
    data = {"path": path.name, "frame": "fiducial_frame.tif", "center_px": list(template.center_px),
            "size_px": list(template.size_px), "pixel_size_m": pixel, "index": 0, "edge_row": edge_row,
            "smooth_px": template.smooth_px, "background_px": template.background_px, "contrast": template.contrast,
            "fiducial_y_m": plan.fiducial_xy_m[1], "change_z": sighting.score, "zoom_out": sighting.zoom_out,
            "beam_shift_m": list(tracking.beam_shift(0)), "working_distance_m": tracking.working_distance(0)}
    ctx.journal.append("template", "captured", **data)
    ctx.memory.template = data
    ctx.journal.append("tracking", "updated", **tracking.as_json())
    ctx.memory.tracking = tracking.as_json()
    _done(ctx, "view", base_shift_m=list(tracking.base_shift_m), fiducial_px=list(template.center_px), edge_row=edge_row)
    return tracking


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """A mill or move report without bulky parts, for the journal."""
    return {k: v for k, v in result.items() if k not in ("truth", "patterns_detail", "record") and not isinstance(v, (bytes,))}
