"""Zeiss SmartSEM (CZEMApi remote API) look-alike over :class:`~.instrument.SimulatedFibSem`.

Every method returns a numeric error code (0 = success); ``Get`` returns
``(code, value)``. Long commands (``CMD_UNFREEZE_ALL``, ``CMD_FIB_START_MILLING``,
stage ``AP_STAGE_GOTO_*``, ``CMD_AUTO_*``) check what they can at once (a
refusal returns its code and starts nothing), then run on a background thread
and return 0; their state parameter reports progress and, once it failed, the
failure: the first ``Get`` of ``DP_FROZEN`` (frames), ``DP_FIB_MODE``
(milling), ``DP_STAGE_IS`` (stage) or ``DP_AUTO_FUNCTION`` (autofunctions)
after an operation of that kind failed returns the failure's code (once; later
reads return 0). ``Grab`` after a failed frame returns the code until the next
frame starts. See README.md.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InstrumentError
from .smartsem_codes import ERRORS, Refused, error_code
from .smartsem_params import FIB_PROBES, SCANRATE_DWELL_S, build_table

__all__ = ["ERRORS", "FIB_PROBES", "TIFF_HEADER", "SmartSEMApi"]

TIFF_HEADER = "SmartSEM look-alike frame; instrument report (JSON) follows\n"
_STICKY = {"DP_FROZEN": "grab", "DP_FIB_MODE": "mill", "DP_STAGE_IS": "stage", "DP_AUTO_FUNCTION": "auto"}
_AUTO = {"CMD_AUTO_FOCUS_FINE": "autofocus", "CMD_AUTO_STIG": "autostigmation", "CMD_AUTO_BC": "auto_contrast"}


class _Job:
    def __init__(self) -> None:
        self.running = False
        self.code = 0
        self.message = ""
        self.progress = 0.0
        self.result: Any = None
        self.reported = False  # the failure code was answered once on the state parameter


class SmartSEMApi:
    """CZEMApi-shaped remote control of the simulated instrument. ``calls`` logs every call received."""

    def __init__(self, instrument: Any) -> None:
        self.instrument = instrument
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._lock = threading.RLock()
        self._initialised = False
        self.store = (1024, 768)
        self.scanrate = 5
        self.nr_mode = "Line Avg"
        self.nr_coeff = 1
        self.bit_depth = 8
        self.fib_mode = "SEM"
        cur = instrument.beam_report("ion")["current_a"]
        self.image_probe = min(FIB_PROBES, key=lambda n: abs(FIB_PROBES[n][1] - cur))
        self.mill_probe = "30kV:700pA"
        self.ely_path: str | None = None
        self.loaded: list[dict[str, Any]] | None = None
        self.jobs = {k: _Job() for k in ("grab", "mill", "stage", "auto")}
        self.stage_targets: dict[str, float] = {}
        self._last_frame: tuple[np.ndarray, dict[str, Any]] | None = None
        self._table = build_table(self)

    # -- plumbing ----------------------------------------------------------------------------

    def _enter(self, method: str, *args: Any) -> int:
        with self._lock:
            self.calls.append((method, args))
        if self.instrument.faults.link_lost():
            return 1032
        if not self._initialised and method != "InitialiseRemoting":
            return 1000
        return 0

    def active_beam(self) -> str:
        return "ion" if self.fib_mode == "FIB" else "electron"

    def job_running(self, kind: str) -> bool:
        return self.jobs[kind].running

    def frame_time_s(self) -> float:
        return self.store[0] * self.store[1] * SCANRATE_DWELL_S[self.scanrate] * self.nr_coeff

    def mill_time_s(self) -> float:
        if not self.loaded:
            return 0.0
        _, cur = FIB_PROBES[self.mill_probe]
        try:
            return float(self.instrument.estimate_mill(self.loaded, cur)["expected_s"])
        except InstrumentError:
            return 0.0

    def _launch(self, kind: str, work: Callable[[Callable[[], None], Callable[[float], None]], Any]) -> int:
        """Run ``work(on_start, progress)`` on a thread; 0 once it started, else its refusal code."""
        job = _Job()
        started = threading.Event()
        began: list[bool] = []

        def on_start() -> None:
            job.running = True
            began.append(True)
            started.set()

        def progress(f: float) -> None:
            job.progress = float(f)

        def run() -> None:
            try:
                job.result = work(on_start, progress)
                job.progress = 1.0
            except Exception as e:  # noqa: BLE001 - every failure becomes a vendor code
                job.code, job.message = error_code(e, kind), str(e)
            finally:
                job.running = False
                started.set()

        previous = self.jobs[kind]
        self.jobs[kind] = job
        threading.Thread(target=run, name=f"smartsem-{kind}", daemon=True).start()
        started.wait()
        if not began:
            self.jobs[kind] = previous
            return job.code or 1008
        return 0

    # -- the API -----------------------------------------------------------------------------

    def InitialiseRemoting(self) -> int:  # noqa: N802 - vendor names
        code = self._enter("InitialiseRemoting")
        if code:
            return code
        self._initialised = True
        return 0

    def ClosingControl(self) -> int:  # noqa: N802
        code = self._enter("ClosingControl")
        if code:
            return code
        self._initialised = False
        return 0

    def Get(self, name: str) -> tuple[int, Any]:  # noqa: N802
        code = self._enter("Get", name)
        if code:
            return code, None
        entry = self._table.get(name)
        if entry is None:
            return 1002, None
        try:
            value = entry[0]()
        except InstrumentError as e:
            return error_code(e), None
        job = self.jobs[_STICKY[name]] if name in _STICKY else None
        if job is not None and not job.running and job.code and not job.reported:
            job.reported = True
            return job.code, value
        return 0, value

    def Set(self, name: str, value: Any) -> int:  # noqa: N802
        code = self._enter("Set", name, value)
        if code:
            return code
        entry = self._table.get(name)
        if entry is None:
            return 1002
        if entry[1] is None:
            return 1005
        try:
            entry[1](value)
        except (InstrumentError, ValueError, TypeError, PermissionError, Refused) as e:
            return 1003 if isinstance(e, TypeError) else error_code(e, "set")
        return 0

    def Execute(self, command: str) -> int:  # noqa: N802
        code = self._enter("Execute", command)
        if code:
            return code
        inst = self.instrument
        if command == "CMD_UNFREEZE_ALL":
            return self._start_grab()
        if command == "CMD_FREEZE_ALL":
            inst.abort("scan")
            return 0
        if command == "CMD_SMARTFIB_LOAD_ELY":
            return self._load_ely()
        if command == "CMD_FIB_START_MILLING":
            if self.loaded is None:
                return 1010
            kv, cur = FIB_PROBES[self.mill_probe]
            pats = self.loaded
            return self._launch("mill", lambda s, p: inst.mill(pats, cur, kv, on_start=s, progress=p))
        if command == "CMD_FIB_STOP_MILLING":
            inst.abort("mill")
            return 0
        if command == "CMD_STAGE_ABORT":
            with self._lock:
                self.stage_targets.clear()
            inst.abort("stage")
            return 0
        if command in _AUTO:
            beam = self.active_beam()
            return self._launch("auto", lambda s, p: inst.autofunction(_AUTO[command], beam, on_start=s, progress=p))
        if command == "CMD_ABORT_AUTO":
            inst.abort("auto")
            return 0
        if command in ("CMD_EHT_ON", "CMD_EHT_OFF", "CMD_FIB_GUN_ON", "CMD_FIB_GUN_OFF"):
            beam = "electron" if "EHT" in command else "ion"
            try:
                inst.set_beam(beam, on=command.endswith("_ON"))
            except InstrumentError as e:
                return error_code(e)
            return 0
        return 1002

    def Grab(self, x: int, y: int, width: int, height: int, reduction: int, path: str) -> int:  # noqa: N802
        """Write the last frozen frame (region x, y, width, height in full-frame pixels, every
        2^reduction-th pixel) as a TIFF; the ImageDescription is ``TIFF_HEADER`` + the instrument's report as JSON."""
        code = self._enter("Grab", x, y, width, height, reduction, path)
        if code:
            return code
        job = self.jobs["grab"]
        if job.running:
            return 1010
        if job.code:
            return job.code
        if self._last_frame is None:
            return 1010
        img, meta = self._last_frame
        h_full, w_full = img.shape
        x, y, width, height, reduction = (int(v) for v in (x, y, width, height, reduction))
        if not (0 <= x and 0 <= y and width > 0 and height > 0 and x + width <= w_full and y + height <= h_full):
            return 1003
        if not 0 <= reduction <= 4:
            return 1003
        step = 2**reduction
        out = img[y : y + height : step, x : x + width : step]
        meta = {**meta, "grab_region": [x, y, width, height], "reduction": reduction}
        try:
            import tifffile

            text = TIFF_HEADER + json.dumps(meta, default=_jsonable)  # not starting with "{": tifffile would read it
            tifffile.imwrite(path, np.ascontiguousarray(out), description=text, metadata=None)  # as its own shape
        except OSError:
            return 1008
        return 0

    # -- helpers -----------------------------------------------------------------------------

    def last_metadata(self) -> dict[str, Any] | None:
        """The instrument's account of the last frame (look-alike extra; also in the TIFF description)."""
        return None if self._last_frame is None else dict(self._last_frame[1])

    def _start_grab(self) -> int:
        beam = self.active_beam()
        if beam == "ion" and self.job_running("mill"):
            return 1010
        if beam == "electron" and self.job_running("mill") and self.fib_mode != "Mill + SEM":
            return 1010
        w, h = self.store
        dwell, n, depth = SCANRATE_DWELL_S[self.scanrate], self.nr_coeff, self.bit_depth

        def work(on_start: Callable[[], None], progress: Callable[[float], None]) -> None:
            def started() -> None:
                self._last_frame = None
                on_start()

            frame = self.instrument.grab(beam, w, h, dwell, n, depth, on_start=started, progress=progress)
            self._last_frame = frame

        return self._launch("grab", work)

    def _load_ely(self) -> int:
        if self.job_running("mill"):
            return 1010
        try:
            data = json.loads(Path(self.ely_path or "").read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = data.get("patterns")
            from .milling import normalise_patterns

            pats = normalise_patterns(data, self.instrument.beam_report("ion")["horizontal_field_width_m"])
        except (OSError, ValueError, TypeError, InstrumentError):
            self.loaded = None
            return 2030
        self.loaded = pats
        return 0

    def stage_goto(self, axis: str, value: float) -> None:
        """Set a stage target; starts a move, or joins the one running (raises to refuse)."""
        with self._lock:
            self.stage_targets[axis] = value
            if self.jobs["stage"].running:
                return

        def work(on_start: Callable[[], None], progress: Callable[[float], None]) -> None:
            first = True
            while True:
                with self._lock:
                    targets, self.stage_targets = dict(self.stage_targets), {}
                    if not targets:
                        self.jobs["stage"].running = False
                        return
                self.instrument.move_stage(**targets, on_start=on_start if first else None, progress=progress)
                first = False

        code = self._launch("stage", work)
        if code:
            with self._lock:
                self.stage_targets.clear()
            raise Refused(code)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
