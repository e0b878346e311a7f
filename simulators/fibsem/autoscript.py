"""Thermo AutoScript (``autoscript_sdb_microscope_client``) look-alike over :class:`~.instrument.SimulatedFibSem`.

    from clemflow.simulators.fibsem import autoscript as lookalike
    microscope = lookalike.SdbMicroscopeClient(instrument); microscope.connect("localhost")
    microscope.beams.ion_beam.beam_current.value = 700e-12        # one of .available_values
    microscope.imaging.set_active_view(1)
    image = microscope.imaging.grab_frame(lookalike.GrabFrameSettings(resolution="1024x768", dwell_time=1e-6))

SI units, angles in radians, brightness/contrast 0..1. Blocking calls (a frame,
``patterning.run``, a stage move, autofunctions) return when done; ``stop()`` /
``stop_acquisition()`` from another thread ends them with ``ABORTED``.
``patterning.start()`` returns at once; ``patterning.state`` reads ``"Running"``
until done, and after a failed asynchronous run the next read of
``patterning.state`` raises that failure once. Every failure raises
:class:`ApplicationServerException` (codes: :class:`ErrorCode`); ``calls`` logs
every call received. Detector names are Thermo's: electron ``ETD`` (renders as
SE2), ``TLD`` (InLens), ``T1`` (EsB, backscatter); ion ``ETD`` (SE2), ``ICE`` (SESI).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from .autoscript_types import (AdornedImage, ApplicationServerException, BeamType, ErrorCode, GrabFrameSettings,
                               ImagingDevice, Limits, PatterningState, Point, StagePosition, adorn)
from .autoscript_parts import Beam, Patterning, Setting
from .errors import (Aborted, AutofunctionFailed, BeamOff, BeamTrip, Busy, FrameTimeout, InstrumentError, Interlock,
                     InvalidPattern, OutOfRange, StageError)

__all__ = [
    "AdornedImage",
    "ApplicationServerException",
    "BeamType",
    "ErrorCode",
    "GrabFrameSettings",
    "ImagingDevice",
    "Limits",
    "PatterningState",
    "Point",
    "SdbMicroscopeClient",
    "StagePosition",
]

DETECTORS = {"electron": {"ETD": "SE2", "TLD": "InLens", "T1": "EsB"}, "ion": {"ETD": "SE2", "ICE": "SESI"}}
_CODES: list[tuple[type, int]] = [
    (Interlock, ErrorCode.VACUUM_NOT_READY), (BeamTrip, ErrorCode.BEAM_TRIPPED), (BeamOff, ErrorCode.BEAM_OFF),
    (FrameTimeout, ErrorCode.ACQUISITION_TIMEOUT), (AutofunctionFailed, ErrorCode.AUTOFUNCTION_FAILED),
    (StageError, ErrorCode.STAGE_ERROR), (OutOfRange, ErrorCode.INVALID_VALUE),
    (InvalidPattern, ErrorCode.PATTERNING_FAILED), (Busy, ErrorCode.INVALID_STATE), (Aborted, ErrorCode.ABORTED),
]


def translate(e: InstrumentError) -> ApplicationServerException:
    for cls, code in _CODES:
        if isinstance(e, cls):
            return ApplicationServerException(e.message, code)
    return ApplicationServerException(e.message, ErrorCode.PATTERNING_FAILED)


class SdbMicroscopeClient:
    """The microscope as AutoScript shows it; built over a simulated instrument instead of a host."""

    def __init__(self, instrument: Any) -> None:
        self.instrument = instrument
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._connected = False
        self._view = 1
        self.beams = SimpleNamespace(electron_beam=Beam(self, "electron"), ion_beam=Beam(self, "ion"))
        self.detector = _Detector(self)
        self.imaging = _Imaging(self)
        self.patterning = Patterning(self)
        self.auto_functions = _AutoFunctions(self)
        self.specimen = SimpleNamespace(stage=_Stage(self))
        self.vacuum = _Vacuum(self)
        self.service = SimpleNamespace(system=SimpleNamespace(name="Simulated DualBeam (AutoScript look-alike)",
                                                              serial_number=f"sim-{instrument.seed}"))

    # -- plumbing ----------------------------------------------------------------------------

    def enter(self, path: str, *args: Any) -> None:
        """Log the call; raise if the link is down or the client is not connected."""
        with self._lock:
            self.calls.append((path, args))
        if self.instrument.faults.link_lost():
            raise ApplicationServerException("Communication with the microscope server lost",
                                             ErrorCode.COMMUNICATION_LOST)
        if not self._connected and path != "connect":
            raise ApplicationServerException("Not connected: call connect() first", ErrorCode.NOT_CONNECTED)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call the instrument; its errors become ApplicationServerException; a link that dropped meanwhile
        loses the answer."""
        try:
            result = fn()
        except InstrumentError as e:
            raise translate(e) from e
        if self.instrument.faults.link_lost():
            raise ApplicationServerException("Communication with the microscope server lost",
                                             ErrorCode.COMMUNICATION_LOST)
        return result

    def active_beam(self) -> str:
        return "electron" if self._view == 1 else "ion"

    def connect(self, host: str = "localhost", port: int | None = None) -> None:
        self.enter("connect", host, port)
        self._connected = True

    def disconnect(self) -> None:
        with self._lock:
            self.calls.append(("disconnect", ()))
        self._connected = False


class _Detector:
    def __init__(self, m: SdbMicroscopeClient) -> None:
        inst = m.instrument

        def get_type() -> str:
            native = inst.beam_report(m.active_beam())["detector"]
            names = DETECTORS[m.active_beam()]
            return next((k for k, v in names.items() if v == native), next(iter(names)))

        def set_type(v: Any) -> None:
            names = DETECTORS[m.active_beam()]
            if v not in names:
                raise ApplicationServerException(f"detector {v!r} not available; one of {list(names)}",
                                                 ErrorCode.INVALID_VALUE)
            m.run(lambda: inst.set_beam(m.active_beam(), detector=names[v]))

        self.type = Setting(m, "detector.type", get_type, set_type,
                            available=lambda: list(DETECTORS[m.active_beam()]))
        for key in ("brightness", "contrast"):
            setattr(self, key, Setting(m, f"detector.{key}", lambda k=key: inst.beam_report(m.active_beam())[k],
                                       lambda v, k=key: m.run(lambda: inst.set_beam(m.active_beam(), **{k: v})),
                                       limits=Limits(0.0, 1.0)))


class _Imaging:
    def __init__(self, m: SdbMicroscopeClient) -> None:
        self._m = m
        self._last: dict[int, AdornedImage] = {}

    def set_active_view(self, view: int) -> None:
        self._m.enter("imaging.set_active_view", view)
        if view not in (1, 2):
            raise ApplicationServerException(f"view {view!r}: use 1 (electron) or 2 (ion)", ErrorCode.INVALID_VALUE)
        self._m._view = int(view)

    def get_active_view(self) -> int:
        self._m.enter("imaging.get_active_view")
        return self._m._view

    def grab_frame(self, settings: GrabFrameSettings | None = None) -> AdornedImage:
        """Scan one frame on the active view's beam (blocking)."""
        m = self._m
        m.enter("imaging.grab_frame", settings)
        beam = m.active_beam()
        b = getattr(m.beams, f"{beam}_beam")
        if settings is None:
            settings = GrabFrameSettings(resolution=b.scanning.resolution.value, dwell_time=b.scanning.dwell_time.value)
        try:
            w, h = (int(v) for v in str(settings.resolution).lower().split("x"))
            dwell = float(settings.dwell_time)
            lines = int(settings.line_integration or 1)
            depth = int(settings.bit_depth or 8)
        except (TypeError, ValueError) as e:
            raise ApplicationServerException(f"invalid grab settings: {e}", ErrorCode.INVALID_VALUE) from e
        img, meta = m.run(lambda: m.instrument.grab(beam, w, h, dwell, lines, depth))
        detector = m.detector.type.value
        image = adorn(img, meta, detector)
        self._last[m._view] = image
        return image

    def get_image(self) -> AdornedImage:
        self._m.enter("imaging.get_image")
        if self._m._view not in self._last:
            raise ApplicationServerException("no image in the active view yet", ErrorCode.INVALID_STATE)
        return self._last[self._m._view]

    def stop_acquisition(self) -> None:
        self._m.enter("imaging.stop_acquisition")
        self._m.instrument.abort("scan")


class _AutoFunctions:
    def __init__(self, m: SdbMicroscopeClient) -> None:
        self._m = m

    def _run(self, name: str, kind: str) -> None:
        m = self._m
        m.enter(f"auto_functions.{name}")
        beam = m.active_beam()
        m.run(lambda: m.instrument.autofunction(kind, beam))

    def run_auto_focus(self, settings: Any = None) -> None:
        self._run("run_auto_focus", "autofocus")

    def run_auto_stigma(self, settings: Any = None) -> None:
        self._run("run_auto_stigma", "autostigmation")

    def run_auto_cb(self, settings: Any = None) -> None:
        self._run("run_auto_cb", "auto_contrast")


class _Stage:
    def __init__(self, m: SdbMicroscopeClient) -> None:
        self._m = m

    @property
    def current_position(self) -> StagePosition:
        self._m.enter("specimen.stage.current_position")
        import math

        s = self._m.instrument.stage_report()
        return StagePosition(s["x_m"], s["y_m"], s["z_m"], math.radians(s["r_deg"]), math.radians(s["t_deg"]))

    def absolute_move(self, position: StagePosition, settings: Any = None) -> None:
        """Move to ``position`` (None fields keep their axis); blocking."""
        import math

        m = self._m
        m.enter("specimen.stage.absolute_move", position)
        kw = {"x_m": position.x, "y_m": position.y, "z_m": position.z,
              "r_deg": None if position.r is None else math.degrees(position.r),
              "t_deg": None if position.t is None else math.degrees(position.t)}
        m.run(lambda: m.instrument.move_stage(**kw))

    def relative_move(self, position: StagePosition, settings: Any = None) -> None:
        m = self._m
        m.enter("specimen.stage.relative_move", position)
        cur = self.current_position
        target = StagePosition(*(None if getattr(position, a) is None else getattr(cur, a) + getattr(position, a)
                                 for a in ("x", "y", "z", "r", "t")))
        self.absolute_move(target)

    def stop(self) -> None:
        self._m.enter("specimen.stage.stop")
        self._m.instrument.abort("stage")

    @property
    def is_homed(self) -> bool:
        self._m.enter("specimen.stage.is_homed")
        return True


class _Vacuum:
    def __init__(self, m: SdbMicroscopeClient) -> None:
        self._m = m
        self.chamber_pressure = Setting(m, "vacuum.chamber_pressure", lambda: m.instrument.vacuum()["chamber_pa"], None)

    @property
    def chamber_state(self) -> str:
        self._m.enter("vacuum.chamber_state")
        return "Pumped" if self._m.instrument.vacuum()["ready"] else "Pumping"
