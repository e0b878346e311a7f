"""AutoScript look-alike parts: settings (``.value`` / ``.limits`` / ``.available_values``), beams, patterning."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .autoscript_types import ApplicationServerException, BeamType, ErrorCode, Limits, PatterningState, Point
from .errors import InstrumentError
from .milling import normalise_patterns
from .smartsem_params import FIB_PROBES
from .state import LIMITS

if TYPE_CHECKING:
    from .autoscript import SdbMicroscopeClient

__all__ = ["ION_CURRENTS", "Beam", "Patterning", "Setting"]

ION_CURRENTS: list[float] = sorted(c for _, c in FIB_PROBES.values())
SCAN_DIRECTIONS = {"TopToBottom": "top_to_bottom", "BottomToTop": "bottom_to_top", "LeftToRight": "left_to_right",
                   "RightToLeft": "right_to_left"}


def _invalid(message: str) -> ApplicationServerException:
    return ApplicationServerException(message, ErrorCode.INVALID_VALUE)


class Setting:
    """One microscope setting: ``.value`` (get/set), ``.limits`` (Limits or None), ``.available_values``."""

    def __init__(self, m: "SdbMicroscopeClient", path: str, get: Callable[[], Any], put: Callable[[Any], None] | None,
                 *, limits: Limits | None = None, available: Callable[[], list[Any]] | None = None) -> None:
        self._m, self._path, self._get, self._put = m, path, get, put
        self._limits, self._available = limits, available

    @property
    def value(self) -> Any:
        self._m.enter(f"{self._path}.value")
        return self._m.run(self._get)

    @value.setter
    def value(self, v: Any) -> None:
        self._m.enter(f"{self._path}.value=", v)
        if self._put is None:
            raise ApplicationServerException(f"{self._path} is read only", ErrorCode.INVALID_STATE)
        if self._limits is not None:
            for c in (v.x, v.y) if isinstance(v, Point) else (v,):
                if isinstance(c, bool) or not isinstance(c, (int, float)) or c not in self._limits:
                    raise _invalid(f"{self._path}: {v!r} outside {self._limits.min:g}..{self._limits.max:g}")
        if self._available is not None:
            options = self._available()
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            ok = any(v == o or (numeric and isinstance(o, float) and math.isclose(v, o, rel_tol=1e-6)) for o in options)
            if not ok:
                raise _invalid(f"{self._path}: {v!r} is not one of the available values {options}")
        self._m.run(lambda: self._put(v))

    @property
    def limits(self) -> Limits | None:
        self._m.enter(f"{self._path}.limits")
        return self._limits

    @property
    def available_values(self) -> list[Any] | None:
        self._m.enter(f"{self._path}.available_values")
        return None if self._available is None else list(self._available())


class Beam:
    """``beams.electron_beam`` / ``beams.ion_beam``."""

    def __init__(self, m: "SdbMicroscopeClient", name: str) -> None:
        self._m, self._name = m, name
        inst, lim, path = m.instrument, LIMITS[name], f"beams.{name}_beam"

        def get(key: str) -> Callable[[], Any]:
            return lambda: inst.beam_report(name)[key]

        def put(key: str) -> Callable[[Any], None]:
            return lambda v: inst.set_beam(name, **{key: v})

        def point(key: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
            return (lambda: Point(*inst.beam_report(name)[key]), lambda v: inst.set_beam(name, **{key: (v.x, v.y)}))

        def setting(attr: str, key: str, lim_key: str, **kw: Any) -> Setting:
            return Setting(m, f"{path}.{attr}", get(key), put(key), limits=Limits(*lim[lim_key]), **kw)

        self.high_voltage = setting("high_voltage", "voltage_v", "voltage_v")
        self.beam_current = setting("beam_current", "current_a", "current_a",
                                    available=(lambda: list(ION_CURRENTS)) if name == "ion" else None)
        self.working_distance = setting("working_distance", "working_distance_m", "working_distance_m")
        self.horizontal_field_width = setting("horizontal_field_width", "horizontal_field_width_m", "hfw_m")
        self.stigmator = Setting(m, f"{path}.stigmator", *point("stigmation"), limits=Limits(*lim["stigmation"]))
        self.beam_shift = Setting(m, f"{path}.beam_shift", *point("beam_shift_m"), limits=Limits(*lim["beam_shift_m"]))
        scan = {"resolution": "1536x1024", "dwell_time": 1e-6}

        def put_resolution(v: Any) -> None:
            try:
                w, h = (int(x) for x in str(v).lower().split("x"))
            except ValueError as e:
                raise _invalid(f"resolution {v!r} is not 'WxH'") from e
            if not (LIMITS["width_px"][0] <= w <= LIMITS["width_px"][1]
                    and LIMITS["height_px"][0] <= h <= LIMITS["height_px"][1]):
                raise _invalid(f"resolution {v!r} outside the frame limits")
            scan["resolution"] = f"{w}x{h}"

        self.scanning = SimpleNamespace(
            rotation=Setting(m, f"{path}.scanning.rotation",
                             lambda: math.radians(inst.beam_report(name)["scan_rotation_deg"]),
                             lambda v: inst.set_beam(name, scan_rotation_deg=math.degrees(v)),
                             limits=Limits(-2 * math.pi, 2 * math.pi)),
            resolution=Setting(m, f"{path}.scanning.resolution", lambda: scan["resolution"], put_resolution),
            dwell_time=Setting(m, f"{path}.scanning.dwell_time", lambda: scan["dwell_time"],
                               lambda v: scan.__setitem__("dwell_time", float(v)), limits=Limits(*LIMITS["dwell_s"])),
        )

    def _call(self, what: str, **change: Any) -> None:
        self._m.enter(f"beams.{self._name}_beam.{what}")
        self._m.run(lambda: self._m.instrument.set_beam(self._name, **change))

    @property
    def is_blanked(self) -> bool:
        self._m.enter(f"beams.{self._name}_beam.is_blanked")
        return bool(self._m.instrument.beam_report(self._name)["blanked"])

    def blank(self) -> None:
        self._call("blank", blanked=True)

    def unblank(self) -> None:
        self._call("unblank", blanked=False)

    @property
    def is_on(self) -> bool:
        self._m.enter(f"beams.{self._name}_beam.is_on")
        return bool(self._m.instrument.beam_on(self._name))

    def turn_on(self) -> None:
        self._call("turn_on", on=True)

    def turn_off(self) -> None:
        self._call("turn_off", on=False)


class _Pattern:
    def __init__(self, p: "Patterning", kind: str, cx: float, cy: float, w: float, h: float, d: float) -> None:
        self._p, self.kind = p, kind
        self.center_x, self.center_y, self.width, self.height, self.depth = cx, cy, w, h, d
        self._scan = "TopToBottom"
        self.application_file = p.application_file

    @property
    def scan_direction(self) -> str:
        return self._scan

    @scan_direction.setter
    def scan_direction(self, v: str) -> None:
        if v not in SCAN_DIRECTIONS:
            raise _invalid(f"scan direction {v!r}; one of {list(SCAN_DIRECTIONS)}")
        self._scan = v

    def as_instrument(self) -> dict[str, Any]:
        return {"kind": self.kind, "center_m": [self.center_x, self.center_y], "width_m": self.width,
                "height_m": self.height, "depth_m": self.depth, "scan_direction": SCAN_DIRECTIONS[self._scan]}

    @property
    def time(self) -> float:
        """Estimated milling time (s) at the ion beam's current."""
        return float(self._p._m.instrument.estimate_mill([self.as_instrument()])["expected_s"])


class Patterning:
    """``patterning``: ion-beam patterns in the ion image frame (m, field centre = 0, +y up)."""

    def __init__(self, m: "SdbMicroscopeClient") -> None:
        self._m = m
        self._patterns: list[_Pattern] = []
        self._running = False
        self._pending_error: ApplicationServerException | None = None
        self.last_error: ApplicationServerException | None = None  # look-alike extra
        self.progress = 0.0  # look-alike extra: 0..1 of the running / last job
        self.application_file = "Si"

    def set_default_beam_type(self, beam_type: int) -> None:
        self._m.enter("patterning.set_default_beam_type", beam_type)
        if beam_type != BeamType.ION:
            raise _invalid("only ion-beam patterning is simulated")

    def set_default_application_file(self, name: str) -> None:
        self._m.enter("patterning.set_default_application_file", name)
        self.application_file = str(name)

    def _create(self, kind: str, *args: float) -> _Pattern:
        self._m.enter(f"patterning.create_{kind}", *args)
        p = _Pattern(self, kind, *args)
        hfw = self._m.instrument.beam_report("ion")["horizontal_field_width_m"]
        try:
            normalise_patterns([p.as_instrument()], hfw)
        except InstrumentError as e:
            from .autoscript import translate

            raise translate(e) from e
        self._patterns.append(p)
        return p

    def create_rectangle(self, center_x: float, center_y: float, width: float, height: float, depth: float) -> _Pattern:
        return self._create("rectangle", center_x, center_y, width, height, depth)

    def create_cleaning_cross_section(self, center_x: float, center_y: float, width: float, height: float,
                                      depth: float) -> _Pattern:
        return self._create("cleaning_cross_section", center_x, center_y, width, height, depth)

    def clear_patterns(self) -> None:
        self._m.enter("patterning.clear_patterns")
        if self._running:
            raise ApplicationServerException("patterning is running", ErrorCode.INVALID_STATE)
        self._patterns = []

    def get_patterns(self) -> list[_Pattern]:
        self._m.enter("patterning.get_patterns")
        return list(self._patterns)

    def _job(self, on_start: Callable[[], None] | None, asynchronous: bool) -> dict[str, Any]:
        if self._running:
            raise ApplicationServerException("patterning is already running", ErrorCode.INVALID_STATE)
        if not self._patterns:
            raise ApplicationServerException("no patterns to run", ErrorCode.INVALID_STATE)
        pats = [p.as_instrument() for p in self._patterns]
        began: list[bool] = []

        def started() -> None:
            self._running, self._pending_error, self.progress = True, None, 0.0
            began.append(True)
            if on_start is not None:
                on_start()

        def progress(f: float) -> None:
            self.progress = f

        try:
            return self._m.run(lambda: self._m.instrument.mill(pats, on_start=started, progress=progress))
        except ApplicationServerException as e:
            self.last_error = e
            if asynchronous and began and e.code != ErrorCode.ABORTED:
                self._pending_error = e  # before "Running" ends, so a poller cannot miss it
            raise
        finally:
            self._running = False

    def run(self) -> None:
        """Mill the patterns; returns when done."""
        self._m.enter("patterning.run")
        self._job(None, asynchronous=False)

    def start(self) -> None:
        """Start milling the patterns and return at once (refusals raise here)."""
        self._m.enter("patterning.start")
        began = threading.Event()
        box: dict[str, Any] = {}

        def on_start() -> None:
            box["began"] = True
            began.set()

        def work() -> None:
            try:
                self._job(on_start, asynchronous=True)
            except ApplicationServerException as e:
                box.setdefault("error", e)
            finally:
                began.set()

        threading.Thread(target=work, name="autoscript-patterning", daemon=True).start()
        began.wait()
        if not box.get("began") and "error" in box:
            raise box["error"]

    def stop(self) -> None:
        self._m.enter("patterning.stop")
        self._m.instrument.abort("mill")

    @property
    def state(self) -> str:
        """``"Running"`` or ``"Idle"``; the first read after a failed ``start()`` raises that failure
        (a run ended by ``stop()`` is no failure)."""
        self._m.enter("patterning.state")
        if self._running:
            return PatterningState.RUNNING
        err, self._pending_error = self._pending_error, None
        if err is not None:
            raise err
        return PatterningState.IDLE
