"""The bridge backend over Zeiss SmartSEM's remote API (CZEMApi), e.g. a Crossbeam.

SmartSEM is driven through named parameters (``AP_*``, numbers in SI units
except where SmartSEM uses %), named states (``DP_*``, strings) and commands
(``CMD_*``); every call returns a numeric code, ``Get`` returns ``(code, value)``.
Actions are asynchronous: a command starts them and a state reports when they
end, so this driver starts, polls the state, reports progress, stops the
instrument on cancel and gives up after a timeout.

On the microscope PC ``SmartSEMBackend.connect()`` builds the COM object; here
the same class runs over ``clemflow.simulators.fibsem.SmartSEMApi``.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tifffile

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
    optics_metadata,
    stage_report,
    to_bit_depth,
    wait_for,
)
from .smartsem_codes import wire_name

__all__ = ["CROSSBEAM_PROBES", "SmartSEMBackend", "parse_probe"]

FaultSwitch = Callable[[str, bool, dict[str, Any]], Any]

CROSSBEAM_PROBES: tuple[str, ...] = (
    "30kV:1pA", "30kV:10pA", "30kV:50pA", "30kV:100pA", "30kV:300pA", "30kV:700pA",
    "30kV:1.5nA", "30kV:3nA", "30kV:7nA", "30kV:15nA", "30kV:30nA",
)
"""A Crossbeam's usual Ga probe table; a site's own table is passed to the backend."""

DETECTORS: dict[str, tuple[str, ...]] = {"electron": ("InLens", "SE2", "EsB"), "ion": ("SE2", "SESI")}
MODE = {"electron": "SEM", "ion": "FIB"}  # DP_FIB_MODE that makes a beam the active (scanned, detected) one
PARAMS: dict[str, dict[str, str]] = {
    "electron": {
        "wd": "AP_WD", "hfw": "AP_WIDTH", "stig_x": "AP_STIG_X", "stig_y": "AP_STIG_Y",
        "shift_x": "AP_BEAMSHIFT_X", "shift_y": "AP_BEAMSHIFT_Y", "rotation": "AP_SCANROTATION",
        "blanked": "DP_BEAM_BLANKED", "kv": "AP_ACTUALKV", "current": "AP_IPROBE",
    },
    "ion": {
        "wd": "AP_FIB_WD", "hfw": "AP_FIB_WIDTH", "stig_x": "AP_FIB_STIG_X", "stig_y": "AP_FIB_STIG_Y",
        "shift_x": "AP_FIB_BEAMSHIFT_X", "shift_y": "AP_FIB_BEAMSHIFT_Y", "rotation": "AP_FIB_SCANROTATION",
        "blanked": "DP_FIB_BLANKED", "kv": "AP_FIB_KV", "current": "AP_FIB_IPROBE",
    },
}
"""SmartSEM's name for each beam setting; stigmators are in % (wire: -1..1)."""
SCAN_RATE_BASE_S = 50e-9  # DP_SCANRATE n dwells 50 ns x 2^n
SCAN_RATES = range(14)
AUTOFUNCTION_SCAN_RATE = 2
STAGE_TOLERANCE = {"x_m": 2e-6, "y_m": 2e-6, "z_m": 2e-6, "r_deg": 0.05, "t_deg": 0.05}
"""How far from a target a finished move may end and still have arrived (a Crossbeam stage's repeatability)."""
_PROBE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*kV\s*:\s*(\d+(?:\.\d+)?)\s*(fA|pA|nA|uA|µA)\s*$")
_PREFIX = {"fA": 1e-15, "pA": 1e-12, "nA": 1e-9, "uA": 1e-6, "µA": 1e-6}
_SCAN_DIRECTIONS = {"top_to_bottom", "bottom_to_top", "left_to_right", "right_to_left"}


def parse_probe(name: str) -> tuple[float, float]:
    """``"30kV:700pA"`` -> ``(30000.0, 7e-10)``: a probe's voltage and current, from its name."""
    match = _PROBE.match(name)
    if match is None:
        raise ValueError(f"not a SmartSEM probe name: {name!r}")
    return float(match.group(1)) * 1e3, float(match.group(2)) * _PREFIX[match.group(3)]


def dwell_of(scan_rate: int) -> float:
    return SCAN_RATE_BASE_S * 2 ** int(scan_rate)


def scan_rate_for(dwell_s: float) -> int:
    """The scan rate whose dwell is nearest the request (in ratio: dwells double per step)."""
    return min(SCAN_RATES, key=lambda n: abs(math.log(dwell_of(n) / dwell_s)))


class SmartSEMBackend:
    """A ``clemflow.bridge.backend.Backend`` over a CZEMApi-shaped object."""

    def __init__(
        self,
        api: Any,
        *,
        fault_switch: FaultSwitch | None = None,
        frame_dir: Path | None = None,
        probes: Sequence[str] | None = None,
        poll_s: float = 0.02,
        sleep: Callable[[float], None] = time.sleep,
        margin_s: float = 60.0,
        serial: str = "",
    ) -> None:
        self._api = api
        self._fault_switch = fault_switch
        self._frame_dir = Path(frame_dir) if frame_dir is not None else Path(tempfile.gettempdir()) / "clemflow-smartsem"
        self._frame_dir.mkdir(parents=True, exist_ok=True)
        self._probes = {name: parse_probe(name) for name in (probes or CROSSBEAM_PROBES)}
        self._poll_s = poll_s
        self._sleep = sleep
        self._margin_s = margin_s
        self._serial = serial
        self._detectors: dict[str, str] = {}
        self._long = LongOperations()

    @classmethod
    def connect(cls, **kwargs: Any) -> SmartSEMBackend:
        """On the microscope PC: the SmartSEM COM control, initialised for remoting."""
        try:
            import pythoncom  # type: ignore[import-not-found]
            import win32com.client  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ImportError(
                "the smartsem backend runs on the SmartSEM PC and needs pywin32 (pip install pywin32) "
                "and SmartSEM's remote API (CZ.EMApiCtrl.1) registered"
            ) from exc
        from ._czemapi import CZEMApi
        from ._onethread import OneThread

        api = OneThread(lambda: CZEMApi(win32com.client.Dispatch("CZ.EMApiCtrl.1")), initializer=pythoncom.CoInitialize,
                        name="smartsem-com")
        code = api.InitialiseRemoting()
        if code != 0:
            _, meaning = wire_name(code)
            raise ConnectionError(f"SmartSEM InitialiseRemoting failed: {code} ({meaning})")
        return cls(api, **kwargs)

    # -- API calls -------------------------------------------------------

    def _error(self, code: int, call: str, context: Context) -> InstrumentFault:
        name, meaning = wire_name(code)
        return fault(name, f"SmartSEM {call}: {meaning} (code {code})", context, vendor_code=int(code))

    def _guard(self, call: str, context: Context, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except InstrumentFault:
            raise
        except Exception as exc:  # a COM error: SmartSEM (or the link to it) is gone
            raise fault("link_lost", f"SmartSEM {call}: {exc}", context, exception=type(exc).__name__) from exc

    def _get(self, name: str, context: Context = "query") -> Any:
        code, value = self._guard(f"Get({name})", context, lambda: self._api.Get(name))
        if code != 0:
            raise self._error(code, f"Get({name})", context)
        return value

    def _peek(self, name: str, context: Context = "query") -> Any:
        """A state's value even while it carries the last operation's failure code.

        SmartSEM's operation states (``DP_FIB_MODE``, ``DP_FROZEN``, ...) answer with the code
        of the last mill/grab until the next starts; the value is still the present state.
        """
        code, value = self._guard(f"Get({name})", context, lambda: self._api.Get(name))
        if code != 0 and value is None:
            raise self._error(code, f"Get({name})", context)
        return value

    def _set(self, name: str, value: Any, context: Context = "set") -> None:
        code = self._guard(f"Set({name})", context, lambda: self._api.Set(name, value))
        if code != 0:
            raise self._error(code, f"Set({name}, {value!r})", context)

    def _execute(self, command: str, context: Context) -> None:
        code = self._guard(command, context, lambda: self._api.Execute(command))
        if code != 0:
            raise self._error(code, f"Execute({command})", context)

    def _optional(self, name: str, context: Context) -> Any:
        """A parameter some SmartSEM versions lack: ``None`` where the API does not know it (1002)."""
        try:
            return self._get(name, context)
        except InstrumentFault as exc:
            if exc.details.get("vendor_code") == 1002:
                return None
            raise

    def _try(self, fn: Callable[[], Any]) -> None:
        """A best-effort call on the way out of a failure: the first error is the one to report."""
        try:
            fn()
        except InstrumentFault:
            pass

    # -- description and state -------------------------------------------

    def describe(self) -> Description:
        for beam in ("electron", "ion"):  # learn both detectors now, while nothing runs
            self._detector(beam, "query")
        kv = [v for v, _ in self._probes.values()]
        amps = [a for _, a in self._probes.values()]
        electron = BeamLimits(
            voltage_v=Range(20.0, 30e3, "V"),
            current_a=Range(1e-12, 100e-9, "A"),
            working_distance_m=Range(1e-3, 50e-3, "m"),
            horizontal_field_width_m=Range(0.5e-6, 3e-3, "m"),
            stigmation=Range(-1.0, 1.0),
            beam_shift_m=Range(-20e-6, 20e-6, "m"),
            detectors=DETECTORS["electron"],
        )
        ion = BeamLimits(
            voltage_v=Range(min(kv), max(kv), "V"),
            current_a=Range(min(amps), max(amps), "A"),
            working_distance_m=Range(1e-3, 50e-3, "m"),
            horizontal_field_width_m=Range(0.5e-6, 1e-3, "m"),
            stigmation=Range(-1.0, 1.0),
            beam_shift_m=Range(-50e-6, 50e-6, "m"),
            detectors=DETECTORS["ion"],
            currents_a=tuple(sorted(amps)),
        )
        return Description(
            vendor="Carl Zeiss",
            model="Crossbeam (SmartSEM remote API)",
            serial=self._serial,
            backend="smartsem",
            limits=InstrumentLimits(
                electron=electron,
                ion=ion,
                stage={
                    "x_m": Range(-50e-3, 50e-3, "m"),
                    "y_m": Range(-50e-3, 50e-3, "m"),
                    "z_m": Range(0.0, 50e-3, "m"),
                    "r_deg": Range(-360.0, 360.0, "deg"),
                    "t_deg": Range(-4.0, 70.0, "deg"),
                },
                dwell_s=Range(dwell_of(0), dwell_of(SCAN_RATES[-1]), "s"),
                frame_width_px=Range(32, 32768, "px"),
                frame_height_px=Range(24, 24576, "px"),
                line_averaging=Range(1, 255),
                mill_depth_m=Range(1e-9, 100e-6, "m"),
                pattern_size_m=Range(1e-9, 1e-3, "m"),
                max_patterns=32,
            ),
            supports_faults=self._fault_switch is not None,
        )

    def _mode(self, beam: BeamName, context: Context) -> str | None:
        """Make ``beam`` the active one (detector, brightness and scanning follow it); returns the mode it replaced."""
        mode = str(self._peek("DP_FIB_MODE", context))
        if mode == MODE[beam] or (beam == "electron" and mode == "Mill + SEM"):
            return None
        self._set("DP_FIB_MODE", MODE[beam], context)
        return mode

    def _detector(self, beam: BeamName, context: Context) -> str:
        """The beam's detector; SmartSEM reports only the active beam's, so others come from the last reading.

        The first time, the mode is switched to read it, but never while a frame or mill runs.
        """
        mode = str(self._peek("DP_FIB_MODE", context))
        active = "ion" if mode == "FIB" else "electron" if mode in ("SEM", "Mill + SEM") else None
        if active == beam:
            self._detectors[beam] = str(self._get("DP_DETECTOR_TYPE", context))
        elif beam not in self._detectors and active is not None and not self._long.running:
            self._set("DP_FIB_MODE", MODE[beam], context)
            try:
                self._detectors[beam] = str(self._get("DP_DETECTOR_TYPE", context))
            finally:
                self._set("DP_FIB_MODE", mode, context)
        return self._detectors.get(beam, "unknown")

    def _beam(self, beam: BeamName, context: Context = "query") -> dict[str, Any]:
        p = PARAMS[beam]
        g = lambda name: self._get(name, context)  # noqa: E731
        on = str(g("DP_RUNUPSTATE")) == "Beam On" if beam == "electron" else str(g("DP_FIB_GUN_STATE")) == "On"
        return beam_report(
            on=on,
            blanked=str(g(p["blanked"])) == "Yes",
            voltage_v=g(p["kv"]) if beam == "ion" or on else g("AP_MANUALKV"),
            current_a=g(p["current"]),
            working_distance_m=g(p["wd"]),
            horizontal_field_width_m=g(p["hfw"]),
            stigmation=(g(p["stig_x"]) / 100.0, g(p["stig_y"]) / 100.0),
            beam_shift_m=(g(p["shift_x"]), g(p["shift_y"])),
            scan_rotation_deg=g(p["rotation"]),
            detector=self._detector(beam, context),
            detectors=DETECTORS[beam],
        )

    def _stage(self, context: Context = "query") -> dict[str, float]:
        g = lambda name: float(self._get(name, context))  # noqa: E731
        return stage_report(g("AP_STAGE_AT_X"), g("AP_STAGE_AT_Y"), g("AP_STAGE_AT_Z"), g("AP_STAGE_AT_R"), g("AP_STAGE_AT_T"))

    def state(self) -> dict[str, Any]:
        status = str(self._get("DP_VAC_STATUS"))
        ready = status == "Ready"
        beams = {"electron": self._beam("electron"), "ion": self._beam("ion")}
        interlocks = [] if ready else ["vacuum_not_ready"]
        interlocks += [f"{name}_beam_off" for name, b in beams.items() if not b["on"]]
        return {
            "vacuum": {"ready": ready, "chamber_pa": float(self._get("AP_SYSTEMVAC")), "status": status},
            "beams": beams,
            "stage": self._stage(),
            "interlocks": interlocks,
        }

    # -- settings --------------------------------------------------------

    def _pick_probe(self, current_a: float | None, voltage_v: float | None, field: str, context: Context) -> str:
        """The probe whose current (and voltage) equals the request; SmartSEM has no other FIB currents."""
        now = str(self._get("DP_FIB_IMAGE_PROBE", context))
        now_v, now_a = self._probes.get(now, (float("nan"), float("nan")))
        want_v = voltage_v if voltage_v is not None else now_v
        want_a = current_a if current_a is not None else now_a
        same_kv = {name: a for name, (v, a) in self._probes.items() if math.isclose(v, want_v, rel_tol=1e-3)}
        if current_a is None and same_kv:  # a voltage change alone: the probe nearest the present current
            return min(same_kv, key=lambda n: abs(math.log(same_kv[n] / now_a)) if now_a > 0 else same_kv[n])
        match = [name for name, a in same_kv.items() if math.isclose(a, want_a, rel_tol=0.01)]
        if not match:
            offered = sorted(self._probes, key=lambda n: self._probes[n])
            raise InstrumentFault(
                "out_of_range",
                f"no FIB probe gives {want_a:.3g} A at {want_v:.0f} V; the probe table has {', '.join(offered)}",
                retry_safe=False,
                details={"field": field, "probes": offered},
            )
        return match[0]

    def set_beam(self, beam: BeamName, changes: BeamChanges) -> dict[str, Any]:
        p = PARAMS[beam]
        if beam == "ion" and (changes.current_a is not None or changes.voltage_v is not None):
            field = "current_a" if changes.current_a is not None else "voltage_v"
            self._set("DP_FIB_IMAGE_PROBE", self._pick_probe(changes.current_a, changes.voltage_v, field, "set"))
        if beam == "electron":
            if changes.voltage_v is not None:
                self._set("AP_MANUALKV", changes.voltage_v)
            if changes.current_a is not None:
                self._set("AP_IPROBE", changes.current_a)
        for value, name in (
            (changes.working_distance_m, p["wd"]),
            (changes.horizontal_field_width_m, p["hfw"]),
            (changes.scan_rotation_deg, p["rotation"]),
        ):
            if value is not None:
                self._set(name, value)
        if changes.stigmation is not None:
            self._set(p["stig_x"], changes.stigmation[0] * 100.0)
            self._set(p["stig_y"], changes.stigmation[1] * 100.0)
        if changes.beam_shift_m is not None:
            self._set(p["shift_x"], changes.beam_shift_m[0])
            self._set(p["shift_y"], changes.beam_shift_m[1])
        if changes.blanked is not None:
            self._set(p["blanked"], "Yes" if changes.blanked else "No")
        return self._beam(beam, "set")

    def set_detector(self, beam: BeamName, detector: str, brightness: float | None, contrast: float | None) -> dict[str, Any]:
        previous = self._mode(beam, "set")
        try:
            self._set("DP_DETECTOR_TYPE", detector)
            if brightness is not None:
                self._set("AP_BRIGHTNESS", brightness * 100.0)
            if contrast is not None:
                self._set("AP_CONTRAST", contrast * 100.0)
            reported = {
                "detector": str(self._get("DP_DETECTOR_TYPE", "set")),
                "brightness": float(self._get("AP_BRIGHTNESS", "set")) / 100.0,
                "contrast": float(self._get("AP_CONTRAST", "set")) / 100.0,
            }
        finally:
            if previous is not None:
                self._try(lambda: self._set("DP_FIB_MODE", previous))
        self._detectors[beam] = reported["detector"]
        return reported

    # -- frames ------------------------------------------------------------

    @long_operation
    def grab_frame(self, request: FrameRequest, job: Job) -> Frame:
        width, height, p = request.width_px, request.height_px, PARAMS[request.beam]
        self._set("DP_FIB_MODE", MODE[request.beam], "image")
        if request.detector is not None:
            self._set("DP_DETECTOR_TYPE", request.detector, "image")
        if request.horizontal_field_width_m is not None:
            self._set(p["hfw"], request.horizontal_field_width_m, "image")
        rate = scan_rate_for(request.dwell_s)
        self._set("DP_SCANRATE", rate, "image")
        self._set("DP_IMAGE_STORE", f"{width} * {height}", "image")
        self._set("DP_NOISE_REDUCTION", "Line Avg", "image")
        self._set("AP_NR_COEFF", request.line_averaging, "image")
        self._set_bit_depth(request.bit_depth)
        self._set("DP_FREEZE_ON", "End Frame", "image")
        expected = width * height * dwell_of(rate) * request.line_averaging
        start = time.time()
        self._execute("CMD_UNFREEZE_ALL", "image")
        wait_for(
            lambda: str(self._get("DP_FROZEN", "image")) == "Frozen",
            job,
            what=f"{request.beam} frame",
            context="image",
            timeout_s=2 * expected + self._margin_s,
            stop=lambda: self._execute("CMD_FREEZE_ALL", "image"),
            progress=lambda t: t / expected if expected > 0 else None,
            poll_s=self._poll_s,
            sleep=self._sleep,
            timeout_name="frame_timeout",
        )
        end = time.time()
        path = self._frame_dir / f"frame-{uuid.uuid4().hex}.tif"
        code = self._guard("Grab", "image", lambda: self._api.Grab(0, 0, width, height, 0, str(path)))
        if code != 0:
            raise self._error(code, "Grab", "image")
        try:
            with tifffile.TiffFile(path) as tif:  # the first page: SmartSEM's own tags can confuse series detection
                pixels = tif.pages[0].asarray()
        finally:
            path.unlink(missing_ok=True)
        native = pixels.dtype.itemsize * 8
        image = to_bit_depth(pixels, request.bit_depth)
        return Frame(image=image, metadata=self._frame_metadata(request, image, native, start, end))

    def _set_bit_depth(self, bit_depth: int) -> None:
        """16-bit grabs where the SmartSEM version offers them; otherwise the 8-bit frame is widened."""
        try:
            self._set("DP_IMAGE_BIT_DEPTH", f"{bit_depth} Bit", "image")
        except InstrumentFault as exc:
            if exc.details.get("vendor_code") != 1002:  # 1002: this SmartSEM has no such parameter
                raise

    def _frame_metadata(self, request: FrameRequest, image: Any, native: int, start: float, end: float) -> dict[str, Any]:
        """What SmartSEM reports after the grab: the dwell it used, its pixel size, the beam it imaged with."""
        g = lambda name: self._get(name, "image")  # noqa: E731
        beam = self._beam(request.beam, "image")
        rate = int(g("DP_SCANRATE"))
        dwell = dwell_of(rate)
        lines = int(g("AP_NR_COEFF"))
        pixel = float(g("AP_PIXEL_SIZE"))
        return {
            "beam": request.beam,
            "detector": beam["detector"],
            "width_px": int(image.shape[1]),
            "height_px": int(image.shape[0]),
            "pixel_size_m": [pixel, pixel],
            "horizontal_field_width_m": beam["horizontal_field_width_m"],
            "dwell_s": dwell,
            "dwell_requested_s": request.dwell_s,
            "scan_rate": rate,
            "line_averaging": lines,
            "bit_depth": request.bit_depth,
            "native_bit_depth": native,
            **optics_metadata(beam),
            "stage": self._stage("image"),
            "frame_time_s": image.shape[0] * image.shape[1] * dwell * lines,
            "start_time": start,
            "end_time": end,
        }

    # -- milling -------------------------------------------------------------

    @long_operation
    def mill(self, request: MillRequest, job: Job) -> dict[str, Any]:
        probe = self._pick_probe(request.current_a, request.voltage_v, "current_a", "mill")
        volts, amps = self._probes[probe]
        self._set("DP_FIB_MILL_PROBE", probe, "mill")
        path = self._frame_dir / f"patterns-{uuid.uuid4().hex}.json"
        path.write_text(json.dumps([_pattern_json(p) for p in request.patterns]))
        try:
            self._set("DP_SMARTFIB_ELY_PATH", str(path), "mill")
            self._execute("CMD_SMARTFIB_LOAD_ELY", "mill")
        finally:
            path.unlink(missing_ok=True)
        expected = self._optional("AP_FIB_MILL_TIME", "mill")  # SmartFIB's own estimate, where offered
        if expected is None:
            volume_um3 = sum(p.width_m * p.height_m * p.depth_m for p in request.patterns) * 1e18
            expected = volume_um3 / (RESIN_SPUTTER_YIELD_UM3_PER_NC * amps * 1e9)
        expected = float(expected)
        start = time.time()
        self._execute("CMD_FIB_START_MILLING", "mill")
        milled = wait_for(
            lambda: str(self._get("DP_FIB_MODE", "mill")) != "Milling",
            job,
            what="milling",
            context="mill",
            timeout_s=2 * expected + self._margin_s,
            stop=lambda: self._execute("CMD_FIB_STOP_MILLING", "mill"),
            progress=lambda _t: float(self._get("AP_FIB_MILL_PROGRESS", "mill")),
            poll_s=self._poll_s,
            sleep=self._sleep,
        )
        return {
            "patterns": len(request.patterns),
            "milled_s": milled,
            "estimated_s": expected,
            "probe": probe,
            "current_a": amps,
            "voltage_v": volts,
            "progress": float(self._get("AP_FIB_MILL_PROGRESS", "mill")),
            "start_time": start,
            "end_time": time.time(),
        }

    # -- stage ---------------------------------------------------------------

    @long_operation
    def move_stage(self, move: StageMove, job: Job) -> dict[str, Any]:
        here = self._stage("move")
        targets = {"X": move.x_m, "Y": move.y_m, "Z": move.z_m, "R": move.r_deg, "T": move.t_deg}
        if all(value is None for value in targets.values()):
            return here
        start_xyz = (here["x_m"], here["y_m"], here["z_m"])
        first = True
        for axis, value in targets.items():
            if value is None:
                continue
            if not first:  # each target joins the running move; one that already failed must not be hidden
                self._get("DP_STAGE_IS", "move")
            self._set(f"AP_STAGE_GOTO_{axis}", value, "move")
            first = False
        goal = tuple(v if v is not None else s for v, s in zip((move.x_m, move.y_m, move.z_m), start_xyz))
        distance = math.dist(start_xyz, goal)

        def progress(_t: float) -> float | None:
            if distance <= 0:
                return None
            now = self._stage("move")
            return 1.0 - math.dist((now["x_m"], now["y_m"], now["z_m"]), goal) / distance

        wait_for(
            lambda: str(self._get("DP_STAGE_IS", "move")) == "Idle",
            job,
            what="stage move",
            context="move",
            timeout_s=180.0,
            stop=lambda: self._execute("CMD_STAGE_ABORT", "move"),
            progress=progress,
            poll_s=self._poll_s,
            sleep=self._sleep,
        )
        return self._arrived(move)

    def _arrived(self, move: StageMove) -> dict[str, float]:
        """Where the stage is; a ``stage_error`` if it stopped short of any target axis (a move may end
        quietly after an axis failed, since SmartSEM starts one per ``AP_STAGE_GOTO_*``)."""
        at = self._stage("move")
        short = {
            axis: {"target": target, "at": at[axis]}
            for axis, target in (("x_m", move.x_m), ("y_m", move.y_m), ("z_m", move.z_m), ("r_deg", move.r_deg), ("t_deg", move.t_deg))
            if target is not None and abs(at[axis] - target) > STAGE_TOLERANCE[axis]
        }
        if short:
            raise fault("stage_error", f"the stage stopped short of its target: {short}", "move", position=at, short=short)
        return at

    # -- autofunctions -------------------------------------------------------

    @long_operation
    def autofunction(self, kind: str, beam: BeamName, job: Job) -> dict[str, Any]:
        command = {"autofocus": "CMD_AUTO_FOCUS_FINE", "autostigmation": "CMD_AUTO_STIG", "auto_contrast": "CMD_AUTO_BC"}[kind]
        p = PARAMS[beam]
        optics = (p["wd"], p["stig_x"], p["stig_y"])
        before = {name: float(self._get(name, "autofunction")) for name in optics}
        imaging = {"DP_FIB_MODE": str(self._peek("DP_FIB_MODE", "autofunction")), "DP_SCANRATE": self._get("DP_SCANRATE", "autofunction")}
        try:
            self._set("DP_FIB_MODE", MODE[beam], "autofunction")
            self._set("DP_SCANRATE", AUTOFUNCTION_SCAN_RATE, "autofunction")  # a fast live scan, as the operator would
            self._execute(command, "autofunction")
            wait_for(
                self._autofunction_idle,
                job,
                what=kind.replace("_", " "),
                context="autofunction",
                timeout_s=300.0,
                stop=lambda: self._execute("CMD_ABORT_AUTO", "autofunction"),
                poll_s=self._poll_s,
                sleep=self._sleep,
            )
            ok = str(self._get("DP_AUTO_FN_STATUS", "autofunction")) == "OK"
            if not ok and kind != "auto_contrast":
                self._restore(before)
        except InstrumentFault:
            if kind != "auto_contrast":
                self._restore(before)
            raise
        finally:
            for name, value in imaging.items():  # the imaging conditions this autofunction changed
                self._try(lambda name=name, value=value: self._set(name, value, "autofunction"))
        if not ok:
            restored = {"working_distance_m": before[p["wd"]], "stigmation": [before[p["stig_x"]] / 100, before[p["stig_y"]] / 100]}
            raise fault(
                "autofunction_diverged",
                f"SmartSEM {kind} on the {beam} beam failed; working distance and stigmation restored",
                "autofunction",
                vendor_code=1008,
                restored=restored if kind != "auto_contrast" else {},
            )
        if kind == "autofocus":
            return {"working_distance_m": float(self._get(p["wd"], "autofunction")), "before_m": before[p["wd"]]}
        if kind == "autostigmation":
            stig = [float(self._get(p["stig_x"], "autofunction")) / 100, float(self._get(p["stig_y"], "autofunction")) / 100]
            return {"stigmation": stig, "before": [before[p["stig_x"]] / 100, before[p["stig_y"]] / 100]}
        return self.set_detector(beam, self._detector(beam, "autofunction"), None, None)

    def _autofunction_idle(self) -> bool:
        """``DP_AUTO_FUNCTION`` is Idle; a finished-but-failed run (1008) is read from ``DP_AUTO_FN_STATUS``."""
        code, value = self._guard("Get(DP_AUTO_FUNCTION)", "autofunction", lambda: self._api.Get("DP_AUTO_FUNCTION"))
        if code == 1008:
            return True
        if code != 0:
            raise self._error(code, "Get(DP_AUTO_FUNCTION)", "autofunction")
        return str(value) == "Idle"

    def _restore(self, before: dict[str, Any]) -> None:
        """Put back what an autofunction may have moved; failures here must not hide the first one."""
        for name, value in before.items():
            self._try(lambda name=name, value=value: self._set(name, value, "autofunction"))

    # -- faults and teardown ---------------------------------------------------

    def set_fault(self, name: str, on: bool, options: dict[str, Any]) -> dict[str, Any]:
        if self._fault_switch is None:
            raise Unsupported("fault switches exist only on a simulated instrument")
        result = self._fault_switch(name, on, dict(options))
        return result if isinstance(result, dict) else {"fault": name, "on": on}

    def close(self) -> None:
        try:
            self._api.ClosingControl()
        except Exception:
            pass


def _pattern_json(pattern: Any) -> dict[str, Any]:
    if pattern.scan_direction not in _SCAN_DIRECTIONS:
        raise ValueError(f"unknown scan direction {pattern.scan_direction!r}")
    return {
        "kind": pattern.kind,
        "center_m": [float(pattern.center_m[0]), float(pattern.center_m[1])],
        "width_m": float(pattern.width_m),
        "height_m": float(pattern.height_m),
        "depth_m": float(pattern.depth_m),
        "scan_direction": pattern.scan_direction,
    }
