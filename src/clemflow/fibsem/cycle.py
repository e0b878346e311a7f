"""One slice: mill it (once, whatever crashed), image the face, check, save, journal, publish, track.

Milling slice ``i``:

1. no earlier attempt in the journal: journal ``mill started`` with the key
   ``{run}/slice-i/mill``, then send it; journal ``mill done`` when it ends.
2. an earlier attempt (a crash, a fault): ask the server's record of its key
   (``RunContext.record_verdict``). Never received, running or done: send
   the same key again (executed once, attached to, or answered from the
   record). Failed before doing anything: a new key. Cut off or failed
   part-way: **look before deciding** (``facecheck``): grab a frame with the
   settings of the last saved slice and measure whether the face rose by a
   slice relative to the fiducial; journal the evidence; only if it did not,
   mill again with a new key (``.../mill-retry1``): the pattern ends at the
   slice's absolute far edge, so it can only finish slice ``i``.

Imaging slice ``i``: autofocus / autostigmation when due, beam shift and
working distance from the tracking state, then up to 3 frames (imaging is
safe to repeat) until one passes ``check_frame``; the fiducial is located
when drift correction is due (a second frame if the similarity is low); the
TIFF is written, ``slice saved`` journalled, the stream told, and only then
the drift correction for the next slice applied.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from numpy.typing import NDArray

from ..bridge.backend import Frame
from ..bridge.client_types import BridgeError
from .context import RunContext, slice_key
from .facecheck import FaceEvidence, measure_face_rise
from .fiducial import FiducialMatch, FiducialTemplate, locate_fiducial
from .focus import FocusWatch, sharpness
from .safety import FaultInfo, PauseRun
from .slices import SliceWriter, check_frame, read_slice
from .stream import SliceStream
from .tracking import Tracking

__all__ = ["FRAME_ATTEMPTS", "SliceCycle", "SliceTimes"]

FRAME_ATTEMPTS = 3
SEARCH_RADIUS_PX = 60.0
FACE_MARGIN_PX = 6
LOOK_RADIUS_PX = 150.0  # the check frame may come long after the last slice: search wider


@dataclass
class SliceTimes:
    """Where one slice's time went (wall seconds unless named instrument_*), for the dashboard and the benchmark."""

    mill_s: float = 0.0  # the mill request, sent to done
    image_s: float = 0.0  # frame requests, sent to pixels received
    total_s: float = 0.0  # mill start to the slice saved and published
    server_mill_s: float = 0.0  # the mill's own start to end, as the instrument reported it
    server_frame_s: float = 0.0  # the frames' own start to end (at zero delay: rendering)
    instrument_mill_s: float = 0.0  # instrument time the mill took (milled_s)
    instrument_frame_s: float = 0.0  # instrument time of the frames (frame_time_s)
    save_s: float = 0.0  # writing the TIFF
    track_s: float = 0.0  # locating the fiducial, focus measure

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.total_s - self.mill_s - self.image_s)


@dataclass
class SliceCycle:
    ctx: RunContext
    tracking: Tracking
    template: FiducialTemplate
    writer: SliceWriter
    stream: SliceStream
    focus_watch: FocusWatch = field(default_factory=FocusWatch)
    on_tracking: Callable[[Tracking], None] | None = None
    autofocus_due: bool = False
    last: SliceTimes = field(default_factory=SliceTimes)

    # ------------------------------------------------------------------ milling

    def mill(self, index: int) -> None:
        """Mill slice ``index`` exactly once (see the module docstring)."""
        ctx, memory = self.ctx, self.ctx.memory.slice(index)
        t0 = time.monotonic()
        self.last = SliceTimes()
        key = slice_key(ctx.run_id, index, "mill")
        if memory.mill_keys:
            key = memory.mill_keys[-1]
            verdict, info = ctx.record_verdict(key)
            if verdict == "look":
                evidence = self.look(index)
                decision = "milled" if evidence.milled else "not milled"
                ctx.journal.append("slice", "mill checked", index=index, key=key, verdict=verdict, decision=decision,
                                   evidence=evidence.as_json(), **info)
                memory.decision = decision
                if evidence.milled:
                    ctx.journal.append("slice", "mill done", index=index, key=key, by="evidence")
                    memory.mill_done = True
                    return
            if verdict in ("look", "retry"):
                key = slice_key(ctx.run_id, index, f"mill-retry{len(memory.mill_keys)}")
                if verdict == "retry":
                    ctx.journal.append("slice", "mill checked", index=index, key=memory.mill_keys[-1], verdict=verdict,
                                       decision="not milled", **info)
        ctx.journal.append("slice", "mill started", index=index, key=key)
        if key not in memory.mill_keys:
            memory.mill_keys.append(key)
        fib = ctx.fibsem.fib
        patterns = ctx.plan.slice_patterns(index)
        result = ctx.call(lambda: ctx.bridge.mill(patterns, fib.current, fib.voltage, key=key))
        ctx.journal.append("slice", "mill done", index=index, key=key, result=_brief(result))
        memory.mill_done = True
        self.last = SliceTimes(mill_s=time.monotonic() - t0, instrument_mill_s=float(result.get("milled_s") or 0.0),
                               server_mill_s=_span(result))
        self._mill_report = result

    def look(self, index: int) -> FaceEvidence:
        """Grab a frame with the last saved slice's settings and measure the face's rise against it."""
        ctx = self.ctx
        previous, meta, fid_px = self._reference(index - 1)
        inst = meta.get("instrument") or {}
        shift = inst.get("beam_shift_m") or list(self.tracking.beam_shift(index - 1))
        wd = inst.get("working_distance_m") or self.tracking.working_distance(index - 1)
        ctx.call(lambda: ctx.bridge.set_beam("electron", key=ctx.fresh(f"slice-{index:06d}", "look-beam"),
                                             beam_shift_m=list(shift), working_distance_m=float(wd), blanked=False))
        frame = self._grab(index, "look")
        template = self.template
        face_top = int(math.ceil(self._edge_row(index - 1) + FACE_MARGIN_PX))
        evidence = measure_face_rise(previous, np.asarray(frame.image), template, fid_px, face_top,
                                     ctx.plan.rise_per_slice_m / ctx.pixel_size_m, LOOK_RADIUS_PX)
        if evidence.fiducial_similarity < ctx.fibsem.cadence.min_fiducial_similarity:
            ctx.journal.append("slice", "mill undecided", index=index, evidence=evidence.as_json())
            raise PauseRun(FaultInfo("fiducial_lost", f"cannot tell whether slice {index} was milled: the fiducial is not "
                                     f"found near where it was in slice {index - 1} (similarity {evidence.fiducial_similarity:.2f}): "
                                     "check for a stage move or a large drift, then resume", slice=index, phase="look before deciding"))
        return evidence

    def _reference(self, index: int) -> tuple[NDArray[Any], dict[str, Any], tuple[float, float]]:
        """The image, metadata and fiducial position of saved slice ``index`` (0: the template's frame)."""
        ctx = self.ctx
        template = ctx.memory.template or {}
        if index <= 0 or int(template.get("index", 0)) == index:  # the template's frame came after this slice's
            image, meta = read_slice(ctx.run_dir / str(template.get("frame", "fiducial_frame.tif")))
            return image, meta, self.template.center_px
        saved = ctx.memory.slice(index).saved or {}
        image, meta = read_slice(ctx.run_dir / str(saved.get("path", f"slices/slice_{index:06d}.tif")))
        fid = (saved.get("fiducial") or {}).get("position_px")
        expected = self.expected_fiducial(index)
        return image, meta, (float(fid[0]), float(fid[1])) if fid else expected

    # ------------------------------------------------------------------ imaging

    def expected_fiducial(self, index: int) -> tuple[float, float]:
        data = self.ctx.memory.template or {}
        return self.tracking.fiducial_expected_px(self.template.center_px, int(data.get("index", 0)), index)

    def _edge_row(self, index: int) -> float:
        """Row of the face edge in the frame of slice ``index`` (constant while Y tracking follows the face)."""
        data = self.ctx.memory.template or {}
        return float(data.get("edge_row", self.ctx.frame_size[1] * 0.4))

    def image(self, index: int) -> dict[str, Any]:
        """Image slice ``index`` (milled), save and publish it; returns its saved record."""
        ctx, cadence = self.ctx, self.ctx.fibsem.cadence
        t0 = time.monotonic()
        self.last.image_s = 0.0
        if (cadence.autofocus_every and index % cadence.autofocus_every == 0) or self.autofocus_due:
            self._autofocus(index)
        if cadence.autostigmation_every and index % cadence.autostigmation_every == 0:
            self._autostigmation(index)
        tracking = self.tracking
        stigmation = list(tracking.stigmation) if tracking.stigmation is not None else None
        ctx.call(lambda: ctx.bridge.set_beam("electron", key=ctx.fresh(f"slice-{index:06d}", "beam"),
                                             beam_shift_m=list(tracking.beam_shift(index)),
                                             working_distance_m=tracking.working_distance(index), stigmation=stigmation))
        frame, image = self._good_frame(index)
        match: FiducialMatch | None = None
        correct = bool(cadence.drift_correction_every) and index % cadence.drift_correction_every == 0
        t_track = time.monotonic()
        if correct:
            match = self._locate(image, index)
            if not match.ok(cadence.min_fiducial_similarity):
                ctx.alerts.send(f"slice {index}: fiducial similarity {match.similarity:.2f} below "
                                f"{cadence.min_fiducial_similarity:.2f}; rescanning", "warning", slice=index)
                frame, image = self._good_frame(index)
                match = self._locate(image, index)
        focus = float(sharpness(image))
        self.autofocus_due = self.focus_watch.needs_autofocus(focus)
        self.last.track_s = time.monotonic() - t_track
        record = self._save(index, frame, image, match, focus, t0)
        if match is not None:
            if not match.ok(cadence.min_fiducial_similarity):
                raise PauseRun(FaultInfo("fiducial_lost", f"the fiducial was not found after slice {index} "
                                         f"(similarity {match.similarity:.2f} < {cadence.min_fiducial_similarity:.2f}, "
                                         f"at edge: {match.at_edge}); slice {index} is saved", slice=index,
                                         phase="drift correction"))
            self.tracking = self.tracking.corrected(self._offset(match, index), match.similarity, index)
            self._tracking_changed()
        return record

    def _good_frame(self, index: int) -> tuple[Frame, NDArray[Any]]:
        """A frame that passes the checks, in at most FRAME_ATTEMPTS grabs."""
        ctx, sem = self.ctx, self.ctx.fibsem.sem
        w, h = ctx.frame_size
        problems: list[str] = []
        for attempt in range(1, FRAME_ATTEMPTS + 1):
            t = time.monotonic()
            try:
                frame = self._grab(index, "frame")
            except BridgeError as error:
                if not error.retry_safe:
                    raise
                problems.append(f"{error.name}: {error.message}")
                ctx.journal.append("slice", "frame retry", index=index, attempt=attempt, problem=error.name,
                                   message=error.message, code=error.code)
                continue
            finally:
                self.last.image_s += time.monotonic() - t
            image = np.asarray(frame.image)
            problem = check_frame(image, w, h, int(sem.bit_depth))
            if problem is None:
                self.last.instrument_frame_s += float(frame.metadata.get("frame_time_s") or 0.0)
                self.last.server_frame_s += _span(frame.metadata)
                return frame, image
            problems.append(f"{problem.kind}: {problem.message}")
            ctx.journal.append("slice", "frame retry", index=index, attempt=attempt, problem=problem.kind,
                               message=problem.message)
        raise PauseRun(FaultInfo(_fault_name(problems), f"no usable frame of slice {index} in {FRAME_ATTEMPTS} grabs: "
                                 + "; ".join(problems), slice=index, phase="imaging", retry_safe=True))

    def _grab(self, index: int, what: str) -> Frame:
        ctx = self.ctx
        request = ctx.frame_request()
        return ctx.call(lambda: ctx.bridge.grab_frame(request, key=ctx.fresh(f"slice-{index:06d}", what)))

    def _locate(self, image: NDArray[Any], index: int) -> FiducialMatch:
        return locate_fiducial(self.template, image, self.expected_fiducial(index), SEARCH_RADIUS_PX)

    def _offset(self, match: FiducialMatch, index: int) -> tuple[float, float]:
        ex, ey = self.expected_fiducial(index)
        return (match.position_px[0] - ex, match.position_px[1] - ey)

    def _autofocus(self, index: int) -> None:
        ctx = self.ctx
        tracking = self.tracking
        ctx.call(lambda: ctx.bridge.set_beam("electron", key=ctx.fresh(f"slice-{index:06d}", "af-beam"),
                                             beam_shift_m=list(tracking.beam_shift(index)),
                                             working_distance_m=tracking.working_distance(index)))
        result = self._autofunction(index, "autofocus")
        wd = float(result.get("working_distance_m") or tracking.working_distance(index))
        self.tracking = tracking.focused(index, wd)
        self.focus_watch.autofocused()
        self.autofocus_due = False
        self._tracking_changed()

    def _autostigmation(self, index: int) -> None:
        result = self._autofunction(index, "autostigmation")
        stig = result.get("stigmation")
        if isinstance(stig, (list, tuple)) and len(stig) == 2:
            self.tracking = self.tracking.stigmated(index, (float(stig[0]), float(stig[1])))
            self._tracking_changed()

    def _autofunction(self, index: int, kind: str) -> dict[str, Any]:
        """Run an autofunction; once more if it diverges (the instrument restored the settings), then a fault."""
        ctx = self.ctx
        call = getattr(ctx.bridge, kind)
        for attempt in (1, 2):
            try:
                return ctx.call(lambda: call("electron", key=ctx.fresh(f"slice-{index:06d}", kind)))
            except BridgeError as error:
                if error.name != "autofunction_diverged" or attempt == 2:
                    raise
                ctx.journal.append("slice", f"{kind} retry", index=index, message=error.message)
        raise AssertionError("unreachable")

    def _save(self, index: int, frame: Frame, image: NDArray[Any], match: FiducialMatch | None, focus: float,
              t0: float) -> dict[str, Any]:
        ctx = self.ctx
        plan = ctx.plan
        memory = ctx.memory.slice(index)
        fiducial = None
        if match is not None:
            fiducial = {"position_px": list(match.position_px), "offset_px": list(self._offset(match, index)),
                        "similarity": match.similarity, "peak_ratio": match.peak_ratio, "at_edge": match.at_edge}
        path = self.writer.path(index)
        instrument = {k: v for k, v in frame.metadata.items() if k != "truth"}
        clemflow = {"run_id": ctx.run_id, "slice_index": index, "nominal_depth_m": plan.depth_after(index),
                    "slice_thickness_m": plan.thickness_m, "mill_keys": list(memory.mill_keys),
                    "mill": _brief(getattr(self, "_mill_report", None) or {}), "tracking": self.tracking.as_json(),
                    "fiducial": fiducial, "focus": {"sharpness": focus}, "saved_time": time.time()}
        t_save = time.monotonic()
        try:
            self.writer.write(index, image, {"instrument": instrument, "clemflow": clemflow})
        except OSError as error:
            raise PauseRun(FaultInfo("disk_error", f"slice {index} could not be written to {path}: {error}", slice=index,
                                     phase="save", retry_safe=True)) from error
        self.last.save_s = time.monotonic() - t_save
        record = {"index": index, "path": str(path.relative_to(ctx.run_dir)), "depth_m": plan.depth_after(index),
                  "thickness_m": plan.thickness_m, "pixel_size_m": instrument.get("pixel_size_m"),
                  "start_time": instrument.get("start_time"), "end_time": instrument.get("end_time"),
                  "tracking": self.tracking.as_json(), "fiducial": fiducial, "focus": focus,
                  "face_top_px": int(math.ceil(self._edge_row(index) + FACE_MARGIN_PX))}  # rows above: block surface
        ctx.journal.append("slice", "saved", **record)
        memory.saved = record
        self.stream.publish(record)
        self.last.total_s = self.last.mill_s + (time.monotonic() - t0)
        self._mill_report = None
        return record

    def _tracking_changed(self) -> None:
        self.ctx.journal.append("tracking", "updated", **self.tracking.as_json())
        self.ctx.memory.tracking = self.tracking.as_json()
        if self.on_tracking is not None:
            self.on_tracking(self.tracking)


def _fault_name(problems: list[str]) -> str:
    names = {p.split(":", 1)[0] for p in problems}
    if len(names) == 1:
        only = names.pop()
        if only in ("frame_timeout", "beam_trip", "vacuum_interlock", "link_lost", "interlock"):
            return only
    return "frame_rejected"


def _span(report: dict[str, Any]) -> float:
    """End minus start time of an operation as the instrument reported them (0 when it did not)."""
    try:
        return max(0.0, float(report["end_time"]) - float(report["start_time"]))
    except (KeyError, TypeError, ValueError):
        return 0.0


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("truth", "record")}

