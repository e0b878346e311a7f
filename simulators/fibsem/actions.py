"""The simulated instrument's long actions: grab a frame, mill, move the stage, run an autofunction.

Each is blocking, takes instrument time (see :mod:`.timing`), and accepts
``progress(fraction)``, ``on_start()`` (called once the action passed its
checks and holds the hardware, before any time passes: the look-alikes use it
to answer "started" at once) and ``stop`` (a ``threading.Event``; ``abort()``
does the same). Refusals raise before ``on_start`` and change nothing.

Exclusivity: a stage move needs everything idle; a mill needs the ion beam
(no ion imaging, no ion autofunction) and a still stage; an electron grab can
run during a mill (Zeiss "Mill + SEM"), not during a stage move.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import (Aborted, AutofunctionFailed, BeamOff, BeamTrip, Busy, FrameTimeout, Interlock, OutOfRange,
                     StageError)
from .frame_log import append_frame_log, frame_record
from .imaging import blank_frame, electron_view_now, render_electron, render_ion, wd_true_m
from .milling import add_pit, append_mill_log, normalise_patterns, plan_mill
from .state import LIMITS, WD_REF_M, Z_REF_M
from .timing import AUTOFUNCTION_S, frame_time_s, stage_time_s
from .view import ElectronView

if TYPE_CHECKING:
    from .instrument import SimulatedFibSem

__all__ = ["Actions", "quantise_dwell"]

Progress = Callable[[float], None] | None
Hook = Callable[[], None] | None


def quantise_dwell(dwell_s: float) -> float:
    q = LIMITS["dwell_quantum_s"]
    return max(q, round(float(dwell_s) / q) * q)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


class Actions:
    """Mixin of :class:`~.instrument.SimulatedFibSem`: the actions that take time."""

    # -- bookkeeping -------------------------------------------------------------------------

    @contextmanager
    def _hold(self: "SimulatedFibSem", token: str, conflicts: set[str], stop: threading.Event | None,
              on_start: Hook) -> Iterator[threading.Event]:
        with self._lock:
            clash = {b for b in self._busy if b in conflicts or b.split(":")[0] in conflicts}
            if clash:
                raise Busy(f"cannot start {token}: busy with {', '.join(sorted(clash))}", busy=sorted(clash))
            self._busy.add(token)
            ev = threading.Event()
            self._aborts[token] = ev
        relay = None
        if stop is not None:  # one event to wait on: relay the caller's stop into ours
            def _relay() -> None:
                while not ev.is_set() and token in self._busy:
                    if stop.wait(0.02):
                        ev.set()
            relay = threading.Thread(target=_relay, daemon=True)
            relay.start()
        try:
            if on_start is not None:
                on_start()
            yield ev
        finally:
            with self._lock:
                self._busy.discard(token)
                self._aborts.pop(token, None)

    def _ready(self: "SimulatedFibSem", beam: str, what: str) -> None:
        if not self.vacuum()["ready"]:
            raise Interlock(f"vacuum not ready: {what} refused")
        if not self.beam_on(beam):
            why = "tripped" if self.faults.tripped(beam) else "off"
            raise BeamOff(f"{beam} beam is {why}: {what} refused", beam=beam)

    # -- frames ------------------------------------------------------------------------------

    def grab(self: "SimulatedFibSem", beam: str, width: int, height: int, dwell_s: float, line_averaging: int = 1,
             bit_depth: int = 8, *, detector: str | None = None, progress: Progress = None, on_start: Hook = None,
             stop: threading.Event | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Scan one frame with ``beam``; returns (image (H, W), what the instrument did).

        Dwell is quantised to 25 ns; the frame takes W x H x dwell x line averaging.
        """
        from .instrument import check_range

        w = int(check_range("width_px", width, LIMITS["width_px"]))
        h = int(check_range("height_px", height, LIMITS["height_px"]))
        n = int(check_range("line_averaging", line_averaging, LIMITS["line_averaging"]))
        check_range("dwell_s", dwell_s, LIMITS["dwell_s"])
        if bit_depth not in (8, 16):
            raise OutOfRange(f"bit_depth {bit_depth!r} not 8 or 16", field="bit_depth", limits=(8, 16))
        self._ready(beam, "grab")
        if detector is not None:
            self.set_beam(beam, detector=detector)
        dwell = quantise_dwell(dwell_s)
        duration = frame_time_s(w, h, dwell, n)
        conflicts = {f"scan:{beam}", "stage", f"auto:{beam}"} | ({"mill"} if beam == "ion" else set())
        with self._hold(f"scan:{beam}", conflicts, stop, on_start) as ev:
            t0 = time.time()
            timeout = self.faults.take("frame_timeout", beam)
            if timeout is not None:
                limit = timeout["timeout_s"] if timeout["timeout_s"] is not None else 2 * duration + 10.0
                self.waiter.wait(limit, ev)
                if ev.is_set():
                    raise Aborted("frame aborted", beam=beam)
                raise FrameTimeout(f"{beam} frame did not complete within {limit:g} s", beam=beam, timeout_s=limit)
            trip = self.faults.take("beam_trip", beam)
            until = trip["at_fraction"] if trip else 1.0
            done = self.waiter.wait(duration, ev, progress, until=until)
            if ev.is_set():
                raise Aborted("frame aborted", beam=beam, fraction=done)
            if trip:
                raise BeamTrip(f"{beam} beam tripped during the frame", beam=beam, fraction=done)
            with self._lock:
                self._state.frame_count += 1
                number = self._state.frame_count
                snap = self._snapshot()
                site = self._current_site() if beam == "electron" else None
                site_snap = None if site is None else type(site)(site.origin_um, site.face_s_um, site.mills,
                                                                 [list(p) for p in site.pits])
                self._save()
            img, truth, view = self._render(beam, snap, site_snap, w, h, dwell, n, bit_depth, number)
            t1 = time.time()
            if view is not None:
                append_frame_log(self.state_dir, frame_record(
                    view, frame=number, mill=snap.mill_count, time_s=t1, site_origin_um=site_snap.origin_um,
                    blanked=snap.electron.blanked))
        b = snap.beam(beam)
        meta = {
            "beam": beam, "detector": b.detector, "width_px": w, "height_px": h, "dwell_s": dwell,
            "dwell_requested_s": float(dwell_s), "line_averaging": n, "bit_depth": bit_depth,
            "pixel_size_m": [b.hfw_m / w, b.hfw_m / w], "horizontal_field_width_m": b.hfw_m,
            "voltage_v": b.voltage_v, "current_a": b.current_a, "working_distance_m": b.working_distance_m,
            "stigmation": list(b.stigmation), "beam_shift_m": list(b.beam_shift_m),
            "scan_rotation_deg": b.scan_rotation_deg, "brightness": b.brightness, "contrast": b.contrast,
            "blanked": b.blanked, "stage": {"x_m": snap.stage.x_m, "y_m": snap.stage.y_m, "z_m": snap.stage.z_m,
                                            "r_deg": snap.stage.r_deg, "t_deg": snap.stage.t_deg},
            "frame_time_s": duration, "duration_s": duration, "frame_number": number,
            "slice_index": snap.mill_count, "start_time": t0, "end_time": t1,
            "start_time_iso": _iso(t0), "end_time_iso": _iso(t1),
            "face_s_um": None if site_snap is None else site_snap.face_s_um,
            "site_origin_um": None if site_snap is None else list(site_snap.origin_um),
            "truth": truth,
        }
        return img, meta

    def _snapshot(self: "SimulatedFibSem") -> Any:
        import copy

        return copy.deepcopy(self._state)

    def _render(self: "SimulatedFibSem", beam: str, snap: Any, site: Any, w: int, h: int, dwell: float, n: int,
                bit_depth: int, number: int) -> tuple[np.ndarray, dict[str, Any], ElectronView | None]:
        """The frame, the renderer's truth and, for electron frames, the view's geometry."""
        noise_seed = (self.seed * 1_000_003 + number) % (2**63)
        drift = self.drift_model if self.em_imperfections.drift else None
        if snap.beam(beam).blanked:
            view = None if beam != "electron" else electron_view_now(self.world, snap, site, width=w, height=h,
                                                                       drift_model=drift)
            return blank_frame(w, h, bit_depth, noise_seed), {"blanked": True}, view
        if beam == "electron":
            return render_electron(self.world, snap, site, width=w, height=h, dwell_s=dwell, line_averaging=n,
                                   bit_depth=bit_depth, imperfections=self.em_imperfections, drift_model=drift,
                                   noise_seed=noise_seed, stig_true=self.stig_true["electron"],
                                   grain_seed=self.seed)
        img, truth = render_ion(self.world, snap, width=w, height=h, dwell_s=dwell, line_averaging=n,
                                bit_depth=bit_depth, noise_seed=noise_seed)
        return img, truth, None

    # -- milling -----------------------------------------------------------------------------

    def mill(self: "SimulatedFibSem", patterns: Any, current_a: float | None = None, voltage_v: float | None = None,
             *, progress: Progress = None, on_start: Hook = None,
             stop: threading.Event | None = None) -> dict[str, Any]:
        """Mill ``patterns`` (ion image frame, m; see :mod:`.milling`) at ``current_a`` (default: the ion
        beam's); every executed mill is counted, saved and logged. Raises :class:`BeamTrip` /
        :class:`Aborted` (with ``details['record']``) when it stopped part-way."""
        from .instrument import check_range

        ion = self._state.ion
        cur = check_range("current_a", ion.current_a if current_a is None else current_a, LIMITS["ion"]["current_a"])
        kv = check_range("voltage_v", ion.voltage_v if voltage_v is None else voltage_v, LIMITS["ion"]["voltage_v"])
        pats = normalise_patterns(patterns, ion.hfw_m)
        self._ready("ion", "mill")
        with self._hold("mill", {"mill", "scan:ion", "stage", "auto:ion"}, stop, on_start) as ev:
            crash = self.faults.options("server_crash")
            if crash.get("when") == "before" and self.faults.take("server_crash"):
                os._exit(int(crash["exit_code"]))
            with self._lock:
                if voltage_v is not None:
                    ion.voltage_v = kv
                site = self._current_site()
                st = self._state.stage
                center = (st.x_m * 1e6 + ion.beam_shift_m[0] * 1e6, st.y_m * 1e6 + ion.beam_shift_m[1] * 1e6)
                plan = plan_mill(site, pats, center, cur, kv)
                self._save()
            t0 = time.time()
            trip = self.faults.take("beam_trip", "ion")
            until = trip["at_fraction"] if trip else 1.0
            frac = self.waiter.wait(plan.duration_s, ev, progress, until=until)
            stopped = ev.is_set()
            if not stopped and not trip:
                frac = 1.0
            complete = frac >= 1.0 and not stopped and not trip
            with self._lock:
                face_after = plan.face_before_um + frac * plan.removed_um
                self._state.mill_count += 1
                record = {
                    "index": self._state.mill_count, "start_time": t0, "end_time": time.time(),
                    "duration_s": frac * plan.duration_s, "expected_s": plan.duration_s,
                    "patterns": pats, "roles": plan.roles, "current_a": cur, "voltage_v": kv,
                    "removed_um": face_after - plan.face_before_um, "face_before_um": plan.face_before_um,
                    "face_after_um": face_after, "site_origin_um": list(site.origin_um),
                    "completed": complete, "status": "completed" if complete else "partial",
                    "reason": None if complete else ("beam_trip" if trip else "stopped"), "fraction": frac,
                }
                append_mill_log(self.state_dir, record)
                site.face_s_um = face_after
                site.mills += 1
                for rect in plan.rects_um:
                    add_pit(site, rect)
                self._save()
            if crash.get("when") == "after" and self.faults.take("server_crash"):
                os._exit(int(crash["exit_code"]))
        if trip:
            raise BeamTrip("ion beam tripped during the mill", beam="ion", fraction=frac, record=record)
        if stopped:
            raise Aborted("mill stopped", fraction=frac, record=record)
        return {**record, "patterns_n": len(pats), "milled_s": record["duration_s"]}

    # -- stage -------------------------------------------------------------------------------

    def move_stage(self: "SimulatedFibSem", x_m: float | None = None, y_m: float | None = None,
                   z_m: float | None = None, r_deg: float | None = None, t_deg: float | None = None, *,
                   progress: Progress = None, on_start: Hook = None,
                   stop: threading.Event | None = None) -> dict[str, float]:
        """Absolute move (None keeps an axis); returns the stage position reported after the move."""
        from .instrument import check_range

        target = {k: v for k, v in (("x_m", x_m), ("y_m", y_m), ("z_m", z_m), ("r_deg", r_deg), ("t_deg", t_deg))
                  if v is not None}
        for k, v in target.items():
            target[k] = check_range(k, v, LIMITS["stage"][k])
        with self._hold("stage", {"stage", "mill", "scan", "auto"}, stop, on_start) as ev:
            start = self.stage_report()
            end = {**start, **target}
            dist = float(np.sqrt(sum((end[k] - start[k]) ** 2 for k in ("x_m", "y_m", "z_m"))))
            angle = max(abs(end["r_deg"] - start["r_deg"]), abs(end["t_deg"] - start["t_deg"]))
            duration = stage_time_s(dist, angle)
            fault = self.faults.take("stage_error")

            def where(f: float) -> None:
                with self._lock:
                    for k in start:
                        setattr(self._state.stage, k, start[k] + f * (end[k] - start[k]))
                if progress is not None:
                    progress(f)

            frac = self.waiter.wait(duration, ev, where, until=fault["at_fraction"] if fault else 1.0)
            where(frac if (fault or ev.is_set()) else 1.0)
            self._save()
        pos = self.stage_report()
        if fault:
            raise StageError("stage error: the move stopped part-way", position=pos, fraction=frac)
        if ev.is_set():
            raise Aborted("stage move stopped", position=pos, fraction=frac)
        return pos

    # -- autofunctions -----------------------------------------------------------------------

    def autofunction(self: "SimulatedFibSem", kind: str, beam: str = "electron", *, progress: Progress = None,
                     on_start: Hook = None, stop: threading.Event | None = None) -> dict[str, Any]:
        """``autofocus`` (sets the working distance), ``autostigmation`` (stigmators) or ``auto_contrast``
        (brightness and contrast back to 0.5); raises :class:`AutofunctionFailed` while
        ``autofocus_diverges`` is on (the settings are left where it wandered)."""
        if kind not in AUTOFUNCTION_S:
            raise ValueError(f"unknown autofunction {kind!r}; known: {sorted(AUTOFUNCTION_S)}")
        self._ready(beam, kind)
        conflicts = {f"scan:{beam}", "stage", "auto"} | ({"mill"} if beam == "ion" else set())
        with self._hold(f"auto:{beam}", conflicts, stop, on_start) as ev:
            t0 = time.time()
            self.waiter.wait(AUTOFUNCTION_S[kind], ev, progress)
            if ev.is_set():
                raise Aborted(f"{kind} stopped", beam=beam)
            diverges = kind != "auto_contrast" and self.faults.take("autofocus_diverges") is not None
            with self._lock:
                self._state.autofunction_count += 1
                rng = np.random.default_rng([self.seed, 4441, self._state.autofunction_count])
                b = self._state.beam(beam)
                before = self.beam_report(beam)
                lim = LIMITS[beam]
                if kind == "autofocus":
                    true = wd_true_m(self._state, self._current_site(create=False)) if beam == "electron" else (
                        WD_REF_M + Z_REF_M - self._state.stage.z_m)
                    err = float(rng.choice([-1, 1])) * 2e-4 if diverges else float(rng.normal(0, 0.2e-6))
                    b.working_distance_m = float(np.clip(true + err, *lim["working_distance_m"]))
                    key = "working_distance_m"
                elif kind == "autostigmation":
                    off = rng.choice([-1, 1], 2) * 0.3 if diverges else rng.normal(0, 0.005, 2)
                    t = self.stig_true[beam]
                    b.stigmation = tuple(float(np.clip(t[i] + off[i], *lim["stigmation"])) for i in range(2))
                    key = "stigmation"
                else:
                    b.brightness, b.contrast = 0.5, 0.5
                    key = "brightness"
                self._save()
                after = self.beam_report(beam)
        report = {"kind": kind, "beam": beam, "before": before, "after": after, "duration_s": AUTOFUNCTION_S[kind],
                  "start_time": t0, "end_time": time.time(), "changed": key}
        if diverges:
            raise AutofunctionFailed(f"{kind} diverged", **report)
        return report
