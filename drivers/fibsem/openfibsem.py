"""The bridge backend over OpenFIBSEM's ``FibsemMicroscope`` (package ``fibsem``).

OpenFIBSEM already speaks to Thermo, Tescan and (partly) Zeiss instruments and
ships a headless Demo microscope; wrapping it lets clemflow drive anything it
supports. ``fibsem`` is an optional dependency (``pip install fibsem==0.5.3``):
it is imported only when a backend is built, so clemflow works without it.

OpenFIBSEM's conventions differ from the wire's in two places, converted here:
stage rotation and tilt, and scan rotation, are in radians. Its blocking calls
(frame, mill, stage move) run on a worker thread while this backend polls, so
progress is reported and a cancel reaches the instrument (``stop_milling``).
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clemflow.bridge.backend import (
    BeamChanges,
    BeamLimits,
    BeamName,
    Description,
    Frame,
    FrameRequest,
    InstrumentFault,
    InstrumentLimits,
    Job,
    MillRequest,
    Range,
    StageMove,
    Unsupported,
)

from ._common import (
    Context,
    LongOperations,
    beam_report,
    fault,
    long_operation,
    match_current,
    optics_metadata,
    stage_report,
    to_bit_depth,
    wait_for,
)

__all__ = ["OpenFIBSEMBackend"]

_INSTALL_HINT = "the openfibsem backend needs the fibsem package: pip install fibsem==0.5.3"

_SCAN_DIRECTIONS = {
    "top_to_bottom": "TopToBottom",
    "bottom_to_top": "BottomToTop",
    "left_to_right": "LeftToRight",
    "right_to_left": "RightToLeft",
}

# OpenFIBSEM does not report these ranges; values of a Thermo/Zeiss dual-beam column.
_WD_M = Range(1.0e-3, 50.0e-3, "m")
_HFW_M = Range(100e-9, 2.5e-3, "m")
_STIGMATION = Range(-1.0, 1.0)
_BEAM_SHIFT_M = Range(-50e-6, 50e-6, "m")
_FALLBACK_STAGE = {"x": (-50e-3, 50e-3), "y": (-50e-3, 50e-3), "z": (0.0, 40e-3), "r": (-360.0, 360.0), "t": (-10.0, 90.0)}


def _fibsem(module: str = "fibsem.structures") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc


class OpenFIBSEMBackend:
    """A ``clemflow.bridge.backend.Backend`` over an OpenFIBSEM ``FibsemMicroscope``."""

    def __init__(
        self,
        microscope: Any,
        settings: Any = None,
        *,
        poll_s: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        margin_s: float = 60.0,
    ) -> None:
        self._m = microscope
        self._settings = settings
        self._fs = _fibsem()
        self._poll_s = poll_s
        self._sleep = sleep
        self._margin_s = margin_s
        self._long = LongOperations()
        self._detectors: dict[str, str] = {}

    @classmethod
    def connect(cls, manufacturer: str = "Demo", ip_address: str = "localhost", *, session_path: Path | None = None) -> OpenFIBSEMBackend:
        """Open an OpenFIBSEM session (``fibsem.utils.setup_session``) and wrap its microscope."""
        utils = _fibsem("fibsem.utils")
        kwargs: dict[str, Any] = {"manufacturer": manufacturer, "ip_address": ip_address, "setup_logging": False}
        if session_path is not None:
            Path(session_path).mkdir(parents=True, exist_ok=True)
            kwargs["session_path"] = str(session_path)
        microscope, settings = utils.setup_session(**kwargs)
        return cls(microscope, settings)

    # -- helpers --------------------------------------------------------

    def _beam_type(self, beam: BeamName) -> Any:
        return self._fs.BeamType.ELECTRON if beam == "electron" else self._fs.BeamType.ION

    def _call(self, context: Context, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call OpenFIBSEM; its exceptions become wire errors for ``context``."""
        try:
            return fn(*args, **kwargs)
        except (InstrumentFault, Unsupported):
            raise
        except (ConnectionError, TimeoutError) as exc:
            raise fault("link_lost", f"{what}: {exc}", context, exception=type(exc).__name__) from exc
        except Exception as exc:
            raise fault("vendor_error", f"{what}: {exc}", context, exception=type(exc).__name__) from exc

    def _values(self, key: str, beam: BeamName) -> list[Any]:
        try:
            return list(self._m.get_available_values(key, self._beam_type(beam)) or [])
        except Exception:
            return []

    def _in_background(self, fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
        """Run a blocking OpenFIBSEM call on a worker thread; its result or error lands in the dict."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed back to the polling thread
                box["error"] = exc

        thread = threading.Thread(target=run, name="openfibsem-call", daemon=True)
        thread.start()
        return thread, box

    def _finish(self, box: dict[str, Any], context: Context, what: str, name: str = "vendor_error") -> Any:
        error = box.get("error")
        if error is None:
            return box.get("result")
        if isinstance(error, InstrumentFault):
            raise error
        raise fault(name, f"{what}: {error}", context, exception=type(error).__name__) from error

    def _match_current(self, beam: BeamName, current_a: float, field: str) -> float:
        """The column's own current value equal (within 1 %) to the request; refuse otherwise."""
        return match_current([float(v) for v in self._values("current", beam)], current_a, field, f"{beam} current")

    # -- Backend --------------------------------------------------------

    def describe(self) -> Description:
        info = self._m.system.info
        beams = {beam: self._beam_limits(beam) for beam in ("electron", "ion")}
        try:
            axes = {k: (float(v.min), float(v.max)) for k, v in self._m._get_axis_limits().items()}
        except Exception:
            axes = {}
        axes = {**_FALLBACK_STAGE, **axes}
        stage = {
            "x_m": Range(*axes["x"], "m"),
            "y_m": Range(*axes["y"], "m"),
            "z_m": Range(*axes["z"], "m"),
            "r_deg": Range(*axes["r"], "deg"),
            "t_deg": Range(*axes["t"], "deg"),
        }
        limits = InstrumentLimits(
            electron=beams["electron"],
            ion=beams["ion"],
            stage=stage,
            dwell_s=Range(25e-9, 1e-3, "s"),
            frame_width_px=Range(64, 6144, "px"),
            frame_height_px=Range(64, 4096, "px"),
            line_averaging=Range(1, 255),
            mill_depth_m=Range(1e-9, 50e-6, "m"),
            pattern_size_m=Range(1e-9, 500e-6, "m"),
            max_patterns=16,
        )
        for beam in ("electron", "ion"):  # learn the detectors now, while nothing runs
            self._detector(beam)
        return Description(
            vendor=f"OpenFIBSEM ({info.manufacturer})",
            model=str(info.model),
            serial=str(info.serial_number),
            backend="openfibsem",
            limits=limits,
            supports_faults=False,
        )

    def _beam_limits(self, beam: BeamName) -> BeamLimits:
        volts = [float(v) for v in self._values("voltage", beam)] or ([1e3, 30e3] if beam == "electron" else [500.0, 30e3])
        amps = [float(v) for v in self._values("current", beam)] or [1e-12, 100e-9]
        return BeamLimits(
            voltage_v=Range(min(volts), max(volts), "V"),
            current_a=Range(min(amps), max(amps), "A"),
            working_distance_m=_WD_M,
            horizontal_field_width_m=_HFW_M,
            stigmation=_STIGMATION,
            beam_shift_m=_BEAM_SHIFT_M,
            detectors=tuple(str(d) for d in self._values("detector_type", beam)),
            currents_a=tuple(sorted(amps)) if self._values("current", beam) else (),
        )

    def _beam(self, beam: BeamName, context: Context = "query") -> dict[str, Any]:
        m, bt = self._m, self._beam_type(beam)

        def read() -> dict[str, Any]:
            stig, shift = m.get_stigmation(bt), m.get_beam_shift(bt)
            return beam_report(
                on=m.is_on(bt),
                blanked=m.is_blanked(bt),
                voltage_v=m.get_beam_voltage(bt),
                current_a=m.get_beam_current(bt),
                working_distance_m=m.get_working_distance(bt),
                horizontal_field_width_m=m.get_field_of_view(bt),
                stigmation=(stig.x, stig.y),
                beam_shift_m=(shift.x, shift.y),
                scan_rotation_deg=math.degrees(m.get_scan_rotation(bt) or 0.0),
                detector=self._detector(beam),
                detectors=self._values("detector_type", beam),
            )

        return self._call(context, f"reading the {beam} beam", read)

    def _detector(self, beam: BeamName) -> str:
        """On Thermo, OpenFIBSEM reads a detector by switching the imaging channel: never beneath a long operation."""
        if not self._long.running or beam not in self._detectors:
            self._detectors[beam] = str(self._m.get_detector_type(self._beam_type(beam)))
        return self._detectors[beam]

    def _stage(self, context: Context = "query") -> dict[str, float]:
        p = self._call(context, "reading the stage", self._m.get_stage_position)
        return stage_report(p.x or 0.0, p.y or 0.0, p.z or 0.0, math.degrees(p.r or 0.0), math.degrees(p.t or 0.0))

    def state(self) -> dict[str, Any]:
        chamber = str(self._call("query", "reading the vacuum", self._m.get, "chamber_state"))
        pressure = self._call("query", "reading the vacuum", self._m.get, "chamber_pressure")
        ready = chamber.lower() == "pumped"
        return {
            "vacuum": {"ready": ready, "chamber_pa": float(pressure) if pressure is not None else float("nan"), "status": chamber},
            "beams": {"electron": self._beam("electron"), "ion": self._beam("ion")},
            "stage": self._stage(),
            "interlocks": [] if ready else ["vacuum_not_ready"],
        }

    def set_beam(self, beam: BeamName, changes: BeamChanges) -> dict[str, Any]:
        m, bt, fs = self._m, self._beam_type(beam), self._fs
        if changes.current_a is not None:
            current = self._match_current(beam, changes.current_a, "current_a")
        steps: list[tuple[str, Callable[[], Any]]] = []
        if changes.voltage_v is not None:
            steps.append(("voltage", lambda: m.set_beam_voltage(changes.voltage_v, bt)))
        if changes.current_a is not None:
            steps.append(("current", lambda: m.set_beam_current(current, bt)))
        if changes.working_distance_m is not None:
            steps.append(("working distance", lambda: m.set_working_distance(changes.working_distance_m, bt)))
        if changes.horizontal_field_width_m is not None:
            steps.append(("field width", lambda: m.set_field_of_view(changes.horizontal_field_width_m, bt)))
        if changes.stigmation is not None:
            steps.append(("stigmation", lambda: m.set_stigmation(fs.Point(*changes.stigmation), bt)))
        if changes.beam_shift_m is not None:
            steps.append(("beam shift", lambda: m.set_beam_shift(fs.Point(*changes.beam_shift_m), bt)))
        if changes.scan_rotation_deg is not None:
            steps.append(("scan rotation", lambda: m.set_scan_rotation(math.radians(changes.scan_rotation_deg), bt)))
        if changes.blanked is not None:
            steps.append(("blanking", lambda: m.blank(bt) if changes.blanked else m.unblank(bt)))
        for what, step in steps:
            self._call("set", f"setting the {beam} {what}", step)
        return self._beam(beam, "set")

    def set_detector(self, beam: BeamName, detector: str, brightness: float | None, contrast: float | None) -> dict[str, Any]:
        m, bt = self._m, self._beam_type(beam)
        self._call("set", f"choosing the {beam} detector", m.set_detector_type, detector, bt)
        if brightness is not None:
            self._call("set", "setting brightness", m.set_detector_brightness, brightness, bt)
        if contrast is not None:
            self._call("set", "setting contrast", m.set_detector_contrast, contrast, bt)
        self._detectors[beam] = str(self._call("set", "reading the detector", m.get_detector_type, bt))
        return {
            "detector": self._detectors[beam],
            "brightness": float(self._call("set", "reading brightness", m.get_detector_brightness, bt)),
            "contrast": float(self._call("set", "reading contrast", m.get_detector_contrast, bt)),
        }

    @long_operation
    def grab_frame(self, request: FrameRequest, job: Job) -> Frame:
        m, bt, fs = self._m, self._beam_type(request.beam), self._fs
        if request.detector is not None:  # chosen and read back before the scan, so metadata can name it
            self._call("image", "choosing the detector", m.set_detector_type, request.detector, bt)
            self._detectors[request.beam] = str(self._call("image", "reading the detector", m.get_detector_type, bt))
        hfw = request.horizontal_field_width_m or self._call("image", "reading the field width", m.get_field_of_view, bt)
        settings = fs.ImageSettings(
            resolution=(request.width_px, request.height_px),
            dwell_time=request.dwell_s,
            hfw=hfw,
            beam_type=bt,
            line_integration=request.line_averaging if request.line_averaging > 1 else None,
            autocontrast=False,
            save=False,
        )
        expected = request.width_px * request.height_px * request.dwell_s * request.line_averaging
        start = time.time()
        thread, box = self._in_background(lambda: m.acquire_image(image_settings=settings))
        wait_for(
            lambda: not thread.is_alive(),
            job,
            what=f"{request.beam} frame",
            context="image",
            timeout_s=2 * expected + self._margin_s,
            stop=lambda: m.stop_acquisition(),
            progress=lambda t: t / expected if expected > 0 else None,
            poll_s=self._poll_s,
            sleep=self._sleep,
            timeout_name="frame_timeout",
        )
        image = self._finish(box, "image", "grabbing a frame")
        end = time.time()
        data = to_bit_depth(np.asarray(image.data), request.bit_depth)
        native = np.asarray(image.data).dtype.itemsize * 8
        md = image.metadata
        taken = md.image_settings
        pixel = md.pixel_size
        beam = self._beam(request.beam, "image")
        metadata = {
            "beam": request.beam,
            "detector": beam["detector"],
            "width_px": int(data.shape[1]),
            "height_px": int(data.shape[0]),
            "pixel_size_m": [float(pixel.x), float(pixel.y)],
            "horizontal_field_width_m": float(taken.hfw),
            "dwell_s": float(taken.dwell_time),
            "line_averaging": int(taken.line_integration or 1),
            "bit_depth": request.bit_depth,
            "native_bit_depth": native,
            **optics_metadata(beam),
            "stage": self._stage("image"),
            "start_time": start,
            "end_time": end,
            "frame_time_s": expected,
        }
        return Frame(image=data, metadata=metadata)

    @long_operation
    def mill(self, request: MillRequest, job: Job) -> dict[str, Any]:
        m, fs, ion = self._m, self._fs, self._fs.BeamType.ION
        current = self._match_current("ion", request.current_a, "current_a")
        imaging_current = self._call("mill", "reading the ion current", m.get_beam_current, ion)
        imaging_voltage = self._call("mill", "reading the ion voltage", m.get_beam_voltage, ion)
        voltage = request.voltage_v if request.voltage_v is not None else imaging_voltage
        hfw = self._call("mill", "reading the ion field width", m.get_field_of_view, ion)
        settings = fs.FibsemMillingSettings(
            milling_current=current, milling_voltage=voltage, hfw=hfw, milling_channel=ion, patterning_mode="Serial"
        )
        self._call("mill", "setting up milling", m.setup_milling, settings)
        for p in request.patterns:
            ccs = p.kind == "cleaning_cross_section"
            shape = fs.FibsemRectangleSettings(
                width=p.width_m,
                height=p.height_m,
                depth=p.depth_m,
                centre_x=p.center_m[0],
                centre_y=p.center_m[1],
                cleaning_cross_section=ccs,
                scan_direction=_SCAN_DIRECTIONS[p.scan_direction],
                cross_section=fs.CrossSectionPattern.CleaningCrossSection if ccs else fs.CrossSectionPattern.Rectangle,
            )
            self._call("mill", "drawing a pattern", m.draw_rectangle, shape)
        estimate = float(self._call("mill", "estimating the milling time", m.estimate_milling_time) or 0.0)
        milling = {
            "current_a": float(self._call("mill", "reading the ion current", m.get_beam_current, ion)),
            "voltage_v": float(self._call("mill", "reading the ion voltage", m.get_beam_voltage, ion)),
        }
        start = time.time()
        thread, box = self._in_background(lambda: m.run_milling(current, voltage))
        try:
            milled = wait_for(
                lambda: not thread.is_alive(),
                job,
                what="milling",
                context="mill",
                timeout_s=2 * estimate + self._margin_s,
                stop=m.stop_milling,
                progress=lambda t: t / estimate if estimate > 0 else None,
                poll_s=self._poll_s,
                sleep=self._sleep,
            )
            self._finish(box, "mill", "milling")
        finally:
            try:
                m.finish_milling(imaging_current, imaging_voltage)
            except Exception:
                pass  # the milling outcome is what matters; the current is read back on the next state()
        return {
            "patterns": len(request.patterns),
            "milled_s": milled,
            "estimated_s": estimate,
            **milling,
            "start_time": start,
            "end_time": time.time(),
        }

    @long_operation
    def move_stage(self, move: StageMove, job: Job) -> dict[str, Any]:
        m, fs = self._m, self._fs
        target = fs.FibsemStagePosition(
            x=move.x_m,
            y=move.y_m,
            z=move.z_m,
            r=None if move.r_deg is None else math.radians(move.r_deg),
            t=None if move.t_deg is None else math.radians(move.t_deg),
            coordinate_system="RAW",
        )
        thread, box = self._in_background(lambda: m.move_stage_absolute(target))
        wait_for(
            lambda: not thread.is_alive(),
            job,
            what="stage move",
            context="move",
            timeout_s=180.0,
            stop=self._stop_stage,
            poll_s=self._poll_s,
            sleep=self._sleep,
        )
        self._finish(box, "move", "moving the stage", name="stage_error")
        return self._stage("move")

    def _stop_stage(self) -> None:
        """OpenFIBSEM has no stage stop; on Thermo its AutoScript connection has one."""
        stage = getattr(getattr(getattr(self._m, "connection", None), "specimen", None), "stage", None)
        if stage is not None and hasattr(stage, "stop"):
            stage.stop()

    @long_operation
    def autofunction(self, kind: str, beam: BeamName, job: Job) -> dict[str, Any]:
        m, bt = self._m, self._beam_type(beam)
        if kind == "autostigmation":
            raise Unsupported("OpenFIBSEM has no autostigmation")
        if kind == "auto_contrast":
            self._run_autofunction(lambda: m.autocontrast(bt), job, "auto contrast")
            return {
                "brightness": float(self._call("autofunction", "reading brightness", m.get_detector_brightness, bt)),
                "contrast": float(self._call("autofunction", "reading contrast", m.get_detector_contrast, bt)),
            }
        before = self._beam(beam, "autofunction")
        try:
            self._run_autofunction(lambda: m.auto_focus(bt), job, "autofocus")
            after = self._beam(beam, "autofunction")
            if after["working_distance_m"] not in _WD_M:
                raise fault("autofunction_diverged", f"autofocus went to {after['working_distance_m']:.4g} m", "autofunction")
        except InstrumentFault as exc:
            self._restore_focus(bt, before)
            if exc.name not in ("vendor_error", "autofunction_diverged"):  # cancelled, link lost: say so
                raise
            raise fault("autofunction_diverged", f"autofocus failed ({exc.message}); working distance and stigmation restored",
                        "autofunction", restored_working_distance_m=before["working_distance_m"]) from exc
        return {"working_distance_m": after["working_distance_m"], "before_m": before["working_distance_m"],
                "stigmation": after["stigmation"]}

    def _run_autofunction(self, fn: Callable[[], Any], job: Job, what: str) -> None:
        thread, box = self._in_background(fn)
        wait_for(lambda: not thread.is_alive(), job, what=what, context="autofunction", timeout_s=300.0,
                 poll_s=self._poll_s, sleep=self._sleep)
        self._finish(box, "autofunction", what)

    def _restore_focus(self, bt: Any, before: dict[str, Any]) -> None:
        self._call("autofunction", "restoring the working distance", self._m.set_working_distance, before["working_distance_m"], bt)
        self._call("autofunction", "restoring stigmation", self._m.set_stigmation, self._fs.Point(*before["stigmation"]), bt)

    def set_fault(self, name: str, on: bool, options: dict[str, Any]) -> dict[str, Any]:
        raise Unsupported("the openfibsem backend drives a real (or OpenFIBSEM's own demo) microscope: no fault switches")

    def close(self) -> None:
        try:
            self._m.disconnect()
        except Exception:
            pass

