"""The bridge backend over Thermo Fisher AutoScript (``autoscript_sdb_microscope_client``).

AutoScript is an object API in SI units with angles in radians: beams carry
settings with ``.value`` and ``.limits``, frames are grabbed with a
``GrabFrameSettings`` whose resolution is a ``"WxH"`` string, ion currents
can only be one of ``beam_current.available_values``, and patterns are drawn
with ``create_rectangle`` / ``create_cleaning_cross_section`` and run with
``patterning.start()``, then watched through ``patterning.state`` so that a
cancel can ``stop()`` them. Blocking calls (a frame, a stage move, an
autofunction) run on a worker thread while this backend polls, so progress is
reported and a cancel reaches the instrument.

``AutoScriptBackend.connect(host)`` imports Thermo's package on the support
PC; the same class runs over ``clemflow.simulators.fibsem.autoscript``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

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
from clemflow.fibsem.estimate import RESIN_SPUTTER_YIELD_UM3_PER_NC

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
from .autoscript_codes import wire_name

__all__ = ["AutoScriptBackend"]

FaultSwitch = Callable[[str, bool, dict[str, Any]], Any]

_VIEW = {"electron": 1, "ion": 2}
_SCAN_DIRECTIONS = {
    "top_to_bottom": "TopToBottom",
    "bottom_to_top": "BottomToTop",
    "left_to_right": "LeftToRight",
    "right_to_left": "RightToLeft",
}


def _real_structures() -> Any:
    try:
        from autoscript_sdb_microscope_client.enumerations import BeamType  # type: ignore[import-not-found]
        from autoscript_sdb_microscope_client.structures import (  # type: ignore[import-not-found]
            GrabFrameSettings,
            Point,
            StagePosition,
        )
    except ImportError as exc:
        raise ImportError(
            "the autoscript backend runs beside Thermo's xT server and needs AutoScript "
            "(autoscript_sdb_microscope_client), installed with the instrument's AutoScript licence"
        ) from exc
    return SimpleNamespace(GrabFrameSettings=GrabFrameSettings, Point=Point, StagePosition=StagePosition, BeamType=BeamType)


class AutoScriptBackend:
    """A ``clemflow.bridge.backend.Backend`` over an ``SdbMicroscopeClient``-shaped object.

    ``structures`` supplies ``GrabFrameSettings``, ``Point``, ``StagePosition``
    and ``BeamType`` (AutoScript's own when omitted).
    """

    def __init__(
        self,
        microscope: Any,
        *,
        fault_switch: FaultSwitch | None = None,
        structures: Any = None,
        poll_s: float = 0.02,
        sleep: Callable[[float], None] = time.sleep,
        margin_s: float = 60.0,
    ) -> None:
        self._m = microscope
        self._fault_switch = fault_switch
        self._s = structures if structures is not None else _real_structures()
        self._poll_s = poll_s
        self._sleep = sleep
        self._margin_s = margin_s
        self._long = LongOperations()
        self._active_view: int | None = None
        self._detectors: dict[str, tuple[str, list[str]]] = {}

    @classmethod
    def connect(cls, host: str = "localhost", **kwargs: Any) -> AutoScriptBackend:
        """Connect to the xT server at ``host`` (the microscope PC)."""
        structures = _real_structures()
        from autoscript_sdb_microscope_client import SdbMicroscopeClient  # type: ignore[import-not-found]

        microscope = SdbMicroscopeClient()
        microscope.connect(host)
        return cls(microscope, structures=structures, **kwargs)

    # -- helpers ---------------------------------------------------------

    def _call(self, context: Context, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call AutoScript; its exceptions become wire errors for ``context``."""
        try:
            return fn(*args, **kwargs)
        except (InstrumentFault, Unsupported):
            raise
        except Exception as exc:
            raise self._translate(exc, what, context) from exc

    def _translate(self, exc: BaseException, what: str, context: Context) -> InstrumentFault:
        if isinstance(exc, InstrumentFault):
            return exc
        code = getattr(exc, "code", None)
        if isinstance(code, int):
            name, meaning = wire_name(code)
            message = getattr(exc, "message", None) or str(exc)
            return fault(name, f"AutoScript {what}: {message} ({meaning}, code {code})", context, vendor_code=code)
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return fault("link_lost", f"AutoScript {what}: {exc}", context, exception=type(exc).__name__)
        return fault("vendor_error", f"AutoScript {what}: {exc}", context, exception=type(exc).__name__)

    def _beam_obj(self, beam: BeamName) -> Any:
        return self._m.beams.electron_beam if beam == "electron" else self._m.beams.ion_beam

    def _view(self, beam: BeamName, context: Context) -> None:
        """Detector settings and grabs act on the active view: make it this beam's."""
        self._call(context, "choosing the view", self._m.imaging.set_active_view, _VIEW[beam])
        self._active_view = _VIEW[beam]

    def _detector(self, beam: BeamName, context: Context) -> tuple[str, list[str]]:
        """The beam's detector and the ones it offers; read through its view, except beneath a long operation
        on the other view, when the last reading stands."""
        if self._long.running:
            if self._active_view != _VIEW[beam]:
                return self._detectors.get(beam, ("unknown", []))
        else:
            self._view(beam, context)
        d = self._m.detector.type
        found = (str(d.value), [str(v) for v in (d.available_values or [])])
        self._detectors[beam] = found
        return found

    def _background(self, fn: Callable[[], Any], job: Job, *, what: str, context: Context, timeout_s: float,
                    stop: Callable[[], None] | None, progress: Callable[[float], float | None] | None = None,
                    timeout_name: str = "timeout") -> tuple[Any, float]:
        """Run a blocking AutoScript call on a worker thread and poll it; returns (result, seconds)."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed back to the polling thread
                box["error"] = exc

        thread = threading.Thread(target=run, name="autoscript-call", daemon=True)
        thread.start()
        took = wait_for(lambda: not thread.is_alive(), job, what=what, context=context, timeout_s=timeout_s, stop=stop,
                        progress=progress, poll_s=self._poll_s, sleep=self._sleep, timeout_name=timeout_name)
        if "error" in box:
            raise self._translate(box["error"], what, context) from box["error"]
        return box.get("result"), took

    def _match_current(self, beam_obj: Any, current_a: float, field: str, context: Context) -> float:
        return match_current([float(v) for v in self._offered(beam_obj.beam_current, context)], current_a, field, "ion current")

    # -- description and state -------------------------------------------

    def describe(self) -> Description:
        limits = InstrumentLimits(
            electron=self._beam_limits("electron"),
            ion=self._beam_limits("ion"),
            stage=self._stage_limits(),
            dwell_s=Range(25e-9, 1e-3, "s"),
            frame_width_px=Range(16, 32768, "px"),
            frame_height_px=Range(16, 24576, "px"),
            line_averaging=Range(1, 255),
            mill_depth_m=Range(1e-9, 100e-6, "m"),
            pattern_size_m=Range(1e-9, 1e-3, "m"),
            max_patterns=32,
        )
        info = getattr(self._m, "service", None)
        system = getattr(info, "system", None)
        return Description(
            vendor="Thermo Fisher Scientific",
            model=str(getattr(system, "name", "DualBeam (AutoScript)")),
            serial=str(getattr(system, "serial_number", "")),
            backend="autoscript",
            limits=limits,
            supports_faults=self._fault_switch is not None,
        )

    def _range(self, setting: Any, unit: str, fallback: tuple[float, float]) -> Range:
        limits = self._call("query", "reading limits", lambda: getattr(setting, "limits", None))
        if limits is None:
            return Range(*fallback, unit)
        return Range(float(limits.min), float(limits.max), unit)

    def _offered(self, setting: Any, context: Context) -> list[Any]:
        return list(self._call(context, "reading available values", lambda: getattr(setting, "available_values", None)) or [])

    def _beam_limits(self, beam: BeamName) -> BeamLimits:
        b = self._beam_obj(beam)
        offered = [float(v) for v in self._offered(b.beam_current, "query")]
        current = Range(min(offered), max(offered), "A") if offered else self._range(b.beam_current, "A", (1e-12, 100e-9))
        detectors = tuple(self._detector(beam, "query")[1])
        return BeamLimits(
            voltage_v=self._range(b.high_voltage, "V", (200.0, 30e3)),
            current_a=current,
            working_distance_m=self._range(b.working_distance, "m", (1e-3, 50e-3)),
            horizontal_field_width_m=self._range(b.horizontal_field_width, "m", (0.5e-6, 3e-3)),
            stigmation=self._range(b.stigmator, "", (-1.0, 1.0)),
            beam_shift_m=self._range(b.beam_shift, "m", (-20e-6, 20e-6)),
            detectors=detectors,
            currents_a=tuple(sorted(offered)),
        )

    def _stage_limits(self) -> dict[str, Range]:
        return {
            "x_m": Range(-50e-3, 50e-3, "m"),
            "y_m": Range(-50e-3, 50e-3, "m"),
            "z_m": Range(0.0, 50e-3, "m"),
            "r_deg": Range(-360.0, 360.0, "deg"),
            "t_deg": Range(-4.0, 70.0, "deg"),
        }

    def _beam(self, beam: BeamName, context: Context = "query") -> dict[str, Any]:
        b = self._beam_obj(beam)

        def read() -> dict[str, Any]:
            detector, detectors = self._detector(beam, context)
            stig, shift = b.stigmator.value, b.beam_shift.value
            return beam_report(
                on=b.is_on,
                blanked=b.is_blanked,
                voltage_v=b.high_voltage.value,
                current_a=b.beam_current.value,
                working_distance_m=b.working_distance.value,
                horizontal_field_width_m=b.horizontal_field_width.value,
                stigmation=(stig.x, stig.y),
                beam_shift_m=(shift.x, shift.y),
                scan_rotation_deg=math.degrees(b.scanning.rotation.value),
                detector=detector,
                detectors=detectors,
            )

        return self._call(context, f"reading the {beam} beam", read)

    def _stage(self, context: Context = "query") -> dict[str, float]:
        p = self._call(context, "reading the stage", lambda: self._m.specimen.stage.current_position)
        return stage_report(p.x, p.y, p.z, math.degrees(p.r), math.degrees(p.t))

    def state(self) -> dict[str, Any]:
        vacuum = self._m.vacuum
        status = str(self._call("query", "reading the vacuum", lambda: vacuum.chamber_state))
        pressure = float(self._call("query", "reading the vacuum", lambda: vacuum.chamber_pressure.value))
        ready = status == "Pumped"
        electron, ion = self._beam("electron"), self._beam("ion")
        interlocks = [] if ready else ["vacuum_not_ready"]
        interlocks += [f"{name}_beam_off" for name, b in (("electron", electron), ("ion", ion)) if not b["on"]]
        return {
            "vacuum": {"ready": ready, "chamber_pa": pressure, "status": status},
            "beams": {"electron": electron, "ion": ion},
            "stage": self._stage(),
            "interlocks": interlocks,
        }

    # -- settings --------------------------------------------------------

    def set_beam(self, beam: BeamName, changes: BeamChanges) -> dict[str, Any]:
        b, point = self._beam_obj(beam), self._s.Point
        current = None
        if changes.current_a is not None:
            current = self._match_current(b, changes.current_a, "current_a", "set") if beam == "ion" else changes.current_a

        def assign(setting: Any, value: Any) -> Callable[[], None]:
            return lambda: setattr(setting, "value", value)

        steps: list[tuple[str, Callable[[], Any]]] = []
        if changes.voltage_v is not None:
            steps.append(("voltage", assign(b.high_voltage, changes.voltage_v)))
        if current is not None:
            steps.append(("current", assign(b.beam_current, current)))
        if changes.working_distance_m is not None:
            steps.append(("working distance", assign(b.working_distance, changes.working_distance_m)))
        if changes.horizontal_field_width_m is not None:
            steps.append(("field width", assign(b.horizontal_field_width, changes.horizontal_field_width_m)))
        if changes.stigmation is not None:
            steps.append(("stigmation", assign(b.stigmator, point(*changes.stigmation))))
        if changes.beam_shift_m is not None:
            steps.append(("beam shift", assign(b.beam_shift, point(*changes.beam_shift_m))))
        if changes.scan_rotation_deg is not None:
            steps.append(("scan rotation", assign(b.scanning.rotation, math.radians(changes.scan_rotation_deg))))
        if changes.blanked is not None:
            steps.append(("blanking", b.blank if changes.blanked else b.unblank))
        for what, step in steps:
            self._call("set", f"setting the {beam} {what}", step)
        return self._beam(beam, "set")

    def set_detector(self, beam: BeamName, detector: str, brightness: float | None, contrast: float | None) -> dict[str, Any]:
        d = self._m.detector
        self._view(beam, "set")
        self._call("set", "choosing the detector", setattr, d.type, "value", detector)
        if brightness is not None:
            self._call("set", "setting brightness", setattr, d.brightness, "value", brightness)
        if contrast is not None:
            self._call("set", "setting contrast", setattr, d.contrast, "value", contrast)
        return {"detector": str(d.type.value), "brightness": float(d.brightness.value), "contrast": float(d.contrast.value)}

    # -- frames ------------------------------------------------------------

    @long_operation
    def grab_frame(self, request: FrameRequest, job: Job) -> Frame:
        b = self._beam_obj(request.beam)
        self._view(request.beam, "image")
        if request.detector is not None:
            self._call("image", "choosing the detector", setattr, self._m.detector.type, "value", request.detector)
        if request.horizontal_field_width_m is not None:
            self._call("image", "setting the field width", setattr, b.horizontal_field_width, "value",
                       request.horizontal_field_width_m)
        settings = self._s.GrabFrameSettings(
            resolution=f"{request.width_px}x{request.height_px}",
            dwell_time=request.dwell_s,
            line_integration=request.line_averaging if request.line_averaging > 1 else None,
            bit_depth=request.bit_depth,
        )
        expected = request.width_px * request.height_px * request.dwell_s * request.line_averaging
        start = time.time()
        image, _ = self._background(
            lambda: self._m.imaging.grab_frame(settings),
            job,
            what=f"{request.beam} frame",
            context="image",
            timeout_s=2 * expected + self._margin_s,
            stop=self._m.imaging.stop_acquisition if hasattr(self._m.imaging, "stop_acquisition") else None,
            progress=lambda t: t / expected if expected > 0 else None,
            timeout_name="frame_timeout",
        )
        end = time.time()
        native = image.data.dtype.itemsize * 8
        data = to_bit_depth(image.data, request.bit_depth)
        return Frame(image=data, metadata=self._frame_metadata(request, image, data, native, start, end))

    def _frame_metadata(self, request: FrameRequest, image: Any, data: Any, native: int, start: float, end: float) -> dict[str, Any]:
        """The adorned image's own metadata first; the beam as it reads after the grab for the rest."""
        md = getattr(image, "metadata", None)
        pixel = getattr(getattr(md, "binary_result", None), "pixel_size", None)
        scan = getattr(md, "scan_settings", None)
        beam = self._beam(request.beam, "image")
        dwell = float(getattr(scan, "dwell_time", None) or request.dwell_s)
        lines = int(getattr(scan, "line_integration", None) or request.line_averaging)
        pixel_m = [float(pixel.x), float(pixel.y)] if pixel is not None else [beam["horizontal_field_width_m"] / data.shape[1]] * 2
        return {
            "beam": request.beam,
            "detector": beam["detector"],
            "width_px": int(data.shape[1]),
            "height_px": int(data.shape[0]),
            "pixel_size_m": pixel_m,
            "horizontal_field_width_m": beam["horizontal_field_width_m"],
            "dwell_s": dwell,
            "line_averaging": lines,
            "bit_depth": request.bit_depth,
            "native_bit_depth": native,
            **optics_metadata(beam),
            "stage": self._stage("image"),
            "frame_time_s": data.shape[0] * data.shape[1] * dwell * lines,
            "start_time": start,
            "end_time": end,
        }

    # -- milling -------------------------------------------------------------

    @long_operation
    def mill(self, request: MillRequest, job: Job) -> dict[str, Any]:
        ion, pat = self._m.beams.ion_beam, self._m.patterning
        current = self._match_current(ion, request.current_a, "current_a", "mill")
        imaging_current = self._call("mill", "reading the ion current", lambda: ion.beam_current.value)
        try:
            self._view("ion", "mill")
            if request.voltage_v is not None:
                self._call("mill", "setting the ion voltage", setattr, ion.high_voltage, "value", request.voltage_v)
            self._call("mill", "setting the milling current", setattr, ion.beam_current, "value", current)
            self._call("mill", "choosing the ion beam", pat.set_default_beam_type, self._s.BeamType.ION)
            self._call("mill", "clearing patterns", pat.clear_patterns)
            shapes = []
            for p in request.patterns:
                create = pat.create_cleaning_cross_section if p.kind == "cleaning_cross_section" else pat.create_rectangle
                shape = self._call("mill", "drawing a pattern", create, p.center_m[0], p.center_m[1], p.width_m, p.height_m, p.depth_m)
                self._call("mill", "setting the scan direction", setattr, shape, "scan_direction", _SCAN_DIRECTIONS[p.scan_direction])
                shapes.append(shape)
            milling = {
                "current_a": float(self._call("mill", "reading the ion current", lambda: ion.beam_current.value)),
                "voltage_v": float(self._call("mill", "reading the ion voltage", lambda: ion.high_voltage.value)),
            }
            expected = self._expected_mill_s(shapes, request, current)
            start = time.time()
            self._call("mill", "starting the patterns", pat.start)
            milled = wait_for(
                lambda: self._patterning_idle(),
                job,
                what="milling",
                context="mill",
                timeout_s=2 * expected + self._margin_s,
                stop=lambda: self._call("mill", "stopping the patterns", pat.stop),
                progress=lambda t: self._mill_progress(t, expected),
                poll_s=self._poll_s,
                sleep=self._sleep,
            )
        finally:
            try:
                ion.beam_current.value = imaging_current
            except Exception:
                pass  # the mill's outcome is what the caller must hear; the current reads back on state()
        return {"patterns": len(request.patterns), "milled_s": milled, "estimated_s": expected, **milling,
                "start_time": start, "end_time": time.time()}

    def _expected_mill_s(self, shapes: list[Any], request: MillRequest, current_a: float) -> float:
        """The patterns' own time estimates (``pattern.time``); a sputter-yield estimate where there are none."""
        try:
            return float(sum(float(shape.time) for shape in shapes))
        except Exception:
            volume_um3 = sum(p.width_m * p.height_m * p.depth_m for p in request.patterns) * 1e18
            return volume_um3 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * current_a * 1e9)

    def _mill_progress(self, elapsed_s: float, expected_s: float) -> float | None:
        reported = getattr(self._m.patterning, "progress", None)  # not every AutoScript version reports it
        if isinstance(reported, (int, float)):
            return float(reported)
        return elapsed_s / expected_s if expected_s > 0 else None

    def _patterning_idle(self) -> bool:
        state = str(self._call("mill", "reading the patterning state", lambda: self._m.patterning.state))
        return state != "Running"

    # -- stage ---------------------------------------------------------------

    @long_operation
    def move_stage(self, move: StageMove, job: Job) -> dict[str, Any]:
        stage = self._m.specimen.stage
        target = self._s.StagePosition(
            x=move.x_m,
            y=move.y_m,
            z=move.z_m,
            r=None if move.r_deg is None else math.radians(move.r_deg),
            t=None if move.t_deg is None else math.radians(move.t_deg),
        )
        self._background(lambda: stage.absolute_move(target), job, what="stage move", context="move", timeout_s=180.0,
                         stop=stage.stop)
        return self._stage("move")

    # -- autofunctions -------------------------------------------------------

    @long_operation
    def autofunction(self, kind: str, beam: BeamName, job: Job) -> dict[str, Any]:
        b, af = self._beam_obj(beam), self._m.auto_functions
        run = {"autofocus": af.run_auto_focus, "autostigmation": af.run_auto_stigma, "auto_contrast": af.run_auto_cb}[kind]
        self._view(beam, "autofunction")
        before = self._beam(beam, "autofunction")
        try:
            self._background(run, job, what=kind.replace("_", " "), context="autofunction", timeout_s=300.0, stop=None)
        except InstrumentFault as exc:
            if kind != "auto_contrast":
                self._restore_optics(b, before)
            if exc.name != "autofunction_diverged":
                raise
            raise fault("autofunction_diverged", f"AutoScript {kind} failed ({exc.message}); previous settings restored",
                        "autofunction", restored_working_distance_m=before["working_distance_m"],
                        restored_stigmation=before["stigmation"], **exc.details) from exc
        after = self._beam(beam, "autofunction")
        if kind == "autofocus":
            return {"working_distance_m": after["working_distance_m"], "before_m": before["working_distance_m"]}
        if kind == "autostigmation":
            return {"stigmation": after["stigmation"], "before": before["stigmation"]}
        d = self._m.detector
        return {"brightness": float(d.brightness.value), "contrast": float(d.contrast.value)}

    def _restore_optics(self, b: Any, before: dict[str, Any]) -> None:
        for setting, value in ((b.working_distance, before["working_distance_m"]), (b.stigmator, self._s.Point(*before["stigmation"]))):
            try:
                setting.value = value
            except Exception:
                pass  # report the autofunction's failure; the next state() shows what stuck

    # -- faults and teardown ---------------------------------------------------

    def set_fault(self, name: str, on: bool, options: dict[str, Any]) -> dict[str, Any]:
        if self._fault_switch is None:
            raise Unsupported("fault switches exist only on a simulated instrument")
        result = self._fault_switch(name, on, dict(options))
        return result if isinstance(result, dict) else {"fault": name, "on": on}

    def close(self) -> None:
        try:
            self._m.disconnect()
        except Exception:
            pass
