"""A new fiducial before the face reaches the old one: long runs keep their reference.

The fiducial sits ``FIDUCIAL_AHEAD_M`` ahead of the first face; the face
advances one slice thickness per slice, so after a few µm it reaches the
mark and mills it away. Before that (``RENEW_MARGIN_M`` before the face
touches the "+"), the engine mills a new "+" the same distance ahead of the
current face. With Y tracking the face edge stays put in the image, so the
new mark appears where the first one was at the start: in view, and found
the same way (the frame before the mill against the frame after it). Its
template replaces the old one from that slice on.

Each renewal is journalled (``fiducial`` ``before`` / ``mill started`` /
``mill done``, then ``template`` ``captured`` with ``renewal``) and its mill
has the key ``{run}/fiducial-{k}/mill``; a renewal cut off by a crash is
finished on the next start before any slice is milled (milling the same "+"
again, if its outcome is unknown, only deepens it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .plan import FIDUCIAL_AHEAD_M, FIDUCIAL_ARM_M
from .preflight import fiducial_current
from .safety import FaultInfo, PauseRun
from .slices import read_slice, write_tiff
from .view import MIN_CHANGE_Z, capture, change_peak, save_template, template_size_px

if TYPE_CHECKING:
    from .cycle import SliceCycle

__all__ = ["RENEW_MARGIN_M", "renewal_due", "renew_fiducial"]

RENEW_MARGIN_M = 0.3e-6


def renewal_due(cycle: SliceCycle, index: int) -> bool:
    """After ``index`` slices, will the next slices reach the current fiducial (or is a renewal unfinished)?"""
    memory = cycle.ctx.memory
    if memory.renewal_pending is not None:
        return True
    y = float((memory.template or {}).get("fiducial_y_m", cycle.ctx.plan.fiducial_xy_m[1]))
    return cycle.ctx.plan.face_y_m(index) + RENEW_MARGIN_M >= y - FIDUCIAL_ARM_M / 2


def renew_fiducial(cycle: SliceCycle, index: int) -> None:
    """Mill a new fiducial ahead of the face after slice ``index`` and make it the tracking template."""
    ctx = cycle.ctx
    memory = ctx.memory
    pending = memory.renewal_pending or {}
    k = int(pending.get("renewal") or memory.renewals + 1)
    x = ctx.plan.fiducial_xy_m[0]
    y = float(pending.get("y_m") or ctx.plan.face_y_m(index) + FIDUCIAL_AHEAD_M)
    patterns = [p for p in ctx.plan.fiducial()]
    patterns = [type(p)(p.kind, (x, y), p.width_m, p.height_m, p.depth_m, p.scan_direction) for p in patterns]
    tracking = cycle.tracking
    shift, wd = tracking.beam_shift(index), tracking.working_distance(index)
    ctx.call(lambda: ctx.bridge.set_beam("electron", key=ctx.fresh(f"fiducial-{k}", "beam"), beam_shift_m=list(shift),
                                         working_distance_m=wd, blanked=False))
    before_path = ctx.run_dir / "view" / f"renew{k}_before.tif"
    if not pending.get("before"):
        (ctx.run_dir / "view").mkdir(exist_ok=True)
        frame = cycle._grab(index, f"renew{k}-before")
        write_tiff(before_path, np.asarray(frame.image), {"instrument": frame.metadata,
                                                          "clemflow": {"run_id": ctx.run_id, "what": f"before fiducial {k}"}})
        ctx.journal.append("fiducial", "before", renewal=k, index=index, y_m=y, path=str(before_path.relative_to(ctx.run_dir)))
    before, _ = read_slice(before_path)
    key = f"{ctx.run_id}/fiducial-{k}/mill"
    if pending.get("key"):
        verdict, info = ctx.record_verdict(str(pending["key"]))
        key = str(pending["key"]) if verdict == "resend" else f"{key}-retry{int(pending.get('attempt', 0)) + 1}"
        ctx.journal.append("fiducial", "checked", renewal=k, verdict=verdict, **info)
    if not pending.get("milled"):
        ctx.journal.append("fiducial", "mill started", renewal=k, index=index, y_m=y, key=key)
        current = fiducial_current(ctx.fibsem, ctx.limits)
        ctx.call(lambda: ctx.bridge.mill(patterns, current, ctx.fibsem.fib.voltage, key=key))
        ctx.journal.append("fiducial", "mill done", renewal=k, index=index, key=key)
    frame = cycle._grab(index, f"renew{k}-after")
    after = np.asarray(frame.image)
    position, z = change_peak(before, after, ctx.pixel_size_m)
    if z < MIN_CHANGE_Z:
        raise PauseRun(FaultInfo("fiducial_lost", f"the new fiducial {k} milled after slice {index} was not seen "
                                 f"(change {z:.1f} sigma)", slice=index, phase="fiducial renewal"))
    size = template_size_px(ctx.pixel_size_m, ctx.plan.tilt_deg, ctx.frame_size)
    w, h = ctx.frame_size
    center = (min(max(position[0], size[0] / 2 + 1), w - size[0] / 2 - 2), min(max(position[1], size[1] / 2 + 1),
                                                                              h - size[1] / 2 - 2))
    template = capture(after, center, size, ctx.pixel_size_m)
    path = save_template(ctx.run_dir, template, name=f"fiducial_template_{k}")
    frame_name = f"fiducial_frame_{k}.tif"
    write_tiff(ctx.run_dir / frame_name, after, {"instrument": frame.metadata,
                                                 "clemflow": {"run_id": ctx.run_id, "what": f"fiducial {k} frame"}})
    old = memory.template or {}
    data: dict[str, Any] = {**old, "path": path.name, "frame": frame_name, "center_px": list(template.center_px),
                            "size_px": list(template.size_px), "index": index, "renewal": k, "fiducial_y_m": y,
                            "change_z": z, "contrast": template.contrast, "beam_shift_m": list(shift),
                            "working_distance_m": wd}
    ctx.journal.append("template", "captured", **data)
    memory.template = data
    memory.renewals = k
    memory.renewal_pending = None
    cycle.template = template
    ctx.alerts.send(f"new fiducial {k} milled {FIDUCIAL_AHEAD_M * 1e6:g} µm ahead of the face after slice {index}", "info")
