"""SmartSEM look-alike: the ``AP_*`` / ``DP_*`` parameter table (units as SmartSEM: m, V, A, deg, %).

``Get`` of an ``AP_*`` returns a float, of a ``DP_*`` a string. A setter
raises :class:`ValueError` for a malformed or out-of-range value (-> 1003) and
may raise instrument errors (mapped by :mod:`.smartsem`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import OutOfRange
from .state import DETECTORS, LIMITS

if TYPE_CHECKING:
    from .smartsem import SmartSEMApi

__all__ = ["FIB_PROBES", "SCANRATE_DWELL_S", "build_table"]

# FIB probe table: name -> (voltage V, current A)
FIB_PROBES: dict[str, tuple[float, float]] = {
    "30kV:1pA": (30_000.0, 1e-12),
    "30kV:10pA": (30_000.0, 10e-12),
    "30kV:50pA": (30_000.0, 50e-12),
    "30kV:100pA": (30_000.0, 100e-12),
    "30kV:300pA": (30_000.0, 300e-12),
    "30kV:700pA": (30_000.0, 700e-12),
    "30kV:1.5nA": (30_000.0, 1.5e-9),
    "30kV:3nA": (30_000.0, 3e-9),
    "30kV:7nA": (30_000.0, 7e-9),
    "30kV:15nA": (30_000.0, 15e-9),
    "30kV:30nA": (30_000.0, 30e-9),
}
# DP_SCANRATE n -> dwell per pixel: 50 ns x 2^n, n = 0..13
SCANRATE_DWELL_S: tuple[float, ...] = tuple(50e-9 * 2**n for n in range(14))
NOISE_REDUCTION = ("Line Avg", "Pixel Avg", "Frame Avg")
FIB_MODES = ("SEM", "FIB", "Mill + SEM")
_STORE = re.compile(r"^\s*(\d+)\s*\*\s*(\d+)\s*$")

Getter = Callable[[], Any]
Setter = Callable[[Any], None] | None


def _num(value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    v = float(value)
    if not lo <= v <= hi:
        raise ValueError(f"{v} outside {lo}..{hi}")
    return v


def _choice(value: Any, options: tuple[str, ...]) -> str:
    if str(value) not in options:
        raise ValueError(f"{value!r} not one of {options}")
    return str(value)


def parse_store(value: Any) -> tuple[int, int]:
    m = _STORE.match(str(value))
    if not m:
        raise ValueError(f"image store {value!r} is not 'W * H'")
    w, h = int(m.group(1)), int(m.group(2))
    _num(w, *LIMITS["width_px"])
    _num(h, *LIMITS["height_px"])
    return w, h


def build_table(api: "SmartSEMApi") -> dict[str, tuple[Getter, Setter]]:
    """name -> (getter, setter or None for read-only)."""
    inst = api.instrument

    def beam(b: str, key: str) -> Getter:
        return lambda: float(inst.beam_report(b)[key])

    def set_beam(b: str, key: str) -> Setter:
        def s(v: Any) -> None:
            try:
                inst.set_beam(b, **{key: float(v) if not isinstance(v, bool) else v})
            except OutOfRange as e:
                raise ValueError(str(e)) from e
        return s

    def pair(b: str, key: str, i: int, scale: float) -> tuple[Getter, Setter]:
        def g() -> float:
            return float(inst.beam_report(b)[key][i]) * scale

        def s(v: Any) -> None:
            cur = list(inst.beam_report(b)[key])
            cur[i] = _num(v, -1e30, 1e30) / scale
            try:
                inst.set_beam(b, **{key: tuple(cur)})
            except OutOfRange as e:
                raise ValueError(str(e)) from e
        return g, s

    def yes_no(b: str) -> tuple[Getter, Setter]:
        return (lambda: "Yes" if inst.beam_report(b)["blanked"] else "No",
                lambda v: inst.set_beam(b, blanked=_choice(v, ("Yes", "No")) == "Yes"))

    def active_pct(key: str) -> tuple[Getter, Setter]:
        return (lambda: float(inst.beam_report(api.active_beam())[key]) * 100.0,
                lambda v: inst.set_beam(api.active_beam(), **{key: _num(v, 0.0, 100.0) / 100.0}))

    def set_detector(v: Any) -> None:
        b = api.active_beam()
        inst.set_beam(b, detector=_choice(v, DETECTORS[b]))

    def set_probe(which: str) -> Setter:
        def s(v: Any) -> None:
            name = _choice(v, tuple(FIB_PROBES))
            if which == "image":
                kv, cur = FIB_PROBES[name]
                inst.set_beam("ion", voltage_v=kv, current_a=cur)
            setattr(api, f"{which}_probe", name)
        return s

    def set_scanrate(v: Any) -> None:
        n = int(_num(v, 0, len(SCANRATE_DWELL_S) - 1))
        if n != float(v):
            raise ValueError("scan rate must be an integer")
        api.scanrate = n

    def set_store(v: Any) -> None:
        api.store = parse_store(v)

    def set_coeff(v: Any) -> None:
        n = _num(v, *LIMITS["line_averaging"])
        if n != int(n):
            raise ValueError("AP_NR_COEFF must be an integer")
        api.nr_coeff = int(n)

    def set_fib_mode(v: Any) -> None:
        if api.job_running("mill"):
            raise PermissionError("cannot change DP_FIB_MODE while milling")
        api.fib_mode = _choice(v, FIB_MODES)

    def goto(axis: str, scale: float) -> tuple[Getter, Setter]:
        lim = LIMITS["stage"][axis]
        return (lambda: float(api.stage_targets.get(axis, inst.stage_report()[axis])) / scale,
                lambda v: api.stage_goto(axis, _num(float(v) * scale, *lim)))

    def frozen() -> str:
        job = api.jobs["grab"]
        return "Live" if job.running or (job.code and not job.reported) else "Frozen"

    def vac_status() -> str:
        return "Ready" if inst.vacuum()["ready"] else "Pumping"

    t: dict[str, tuple[Getter, Setter]] = {
        # SEM
        "AP_MANUALKV": (beam("electron", "voltage_v"), set_beam("electron", "voltage_v")),
        "AP_ACTUALKV": (lambda: float(inst.beam_report("electron")["voltage_v"]) if inst.beam_on("electron") else 0.0,
                        None),
        "AP_IPROBE": (beam("electron", "current_a"), set_beam("electron", "current_a")),
        "AP_WD": (beam("electron", "working_distance_m"), set_beam("electron", "working_distance_m")),
        "AP_STIG_X": pair("electron", "stigmation", 0, 100.0),
        "AP_STIG_Y": pair("electron", "stigmation", 1, 100.0),
        "AP_BEAMSHIFT_X": pair("electron", "beam_shift_m", 0, 1.0),
        "AP_BEAMSHIFT_Y": pair("electron", "beam_shift_m", 1, 1.0),
        "AP_SCANROTATION": (beam("electron", "scan_rotation_deg"), set_beam("electron", "scan_rotation_deg")),
        "AP_WIDTH": (beam("electron", "horizontal_field_width_m"), set_beam("electron", "horizontal_field_width_m")),
        "AP_PIXEL_SIZE": (lambda: float(inst.beam_report(api.active_beam())["horizontal_field_width_m"]) / api.store[0],
                          None),
        "AP_BRIGHTNESS": active_pct("brightness"),
        "AP_CONTRAST": active_pct("contrast"),
        "DP_DETECTOR_TYPE": (lambda: inst.beam_report(api.active_beam())["detector"], set_detector),
        "DP_BEAM_BLANKED": yes_no("electron"),
        "DP_RUNUPSTATE": (lambda: "Beam On" if inst.beam_on("electron") else "Beam Off", None),
        # scanning (shared by both beams)
        "DP_SCANRATE": (lambda: str(api.scanrate), set_scanrate),
        "AP_DWELL_TIME": (lambda: SCANRATE_DWELL_S[api.scanrate], None),
        "AP_FRAME_TIME": (lambda: api.frame_time_s(), None),
        "DP_IMAGE_STORE": (lambda: f"{api.store[0]} * {api.store[1]}", set_store),
        "DP_NOISE_REDUCTION": (lambda: api.nr_mode, lambda v: setattr(api, "nr_mode", _choice(v, NOISE_REDUCTION))),
        "AP_NR_COEFF": (lambda: float(api.nr_coeff), set_coeff),
        "DP_FREEZE_ON": (lambda: "End Frame", lambda v: _choice(v, ("End Frame",)) and None),
        "DP_IMAGE_BIT_DEPTH": (lambda: f"{api.bit_depth} Bit",
                               lambda v: setattr(api, "bit_depth", int(_choice(v, ("8 Bit", "16 Bit")).split()[0]))),
        # FIB
        "AP_FIB_KV": (beam("ion", "voltage_v"), None),
        "AP_FIB_IPROBE": (beam("ion", "current_a"), None),
        "DP_FIB_IMAGE_PROBE": (lambda: api.image_probe, set_probe("image")),
        "DP_FIB_MILL_PROBE": (lambda: api.mill_probe, set_probe("mill")),
        "AP_FIB_WD": (beam("ion", "working_distance_m"), set_beam("ion", "working_distance_m")),
        "AP_FIB_WIDTH": (beam("ion", "horizontal_field_width_m"), set_beam("ion", "horizontal_field_width_m")),
        "AP_FIB_STIG_X": pair("ion", "stigmation", 0, 100.0),
        "AP_FIB_STIG_Y": pair("ion", "stigmation", 1, 100.0),
        "AP_FIB_BEAMSHIFT_X": pair("ion", "beam_shift_m", 0, 1.0),
        "AP_FIB_BEAMSHIFT_Y": pair("ion", "beam_shift_m", 1, 1.0),
        "AP_FIB_SCANROTATION": (beam("ion", "scan_rotation_deg"), set_beam("ion", "scan_rotation_deg")),
        "DP_FIB_BLANKED": yes_no("ion"),
        "DP_FIB_GUN_STATE": (lambda: "On" if inst.beam_on("ion") else "Off", None),
        "DP_FIB_MODE": (lambda: "Milling" if api.job_running("mill") else api.fib_mode, set_fib_mode),
        "DP_SMARTFIB_ELY_PATH": (lambda: api.ely_path or "", lambda v: setattr(api, "ely_path", str(v))),
        "AP_FIB_MILL_PROGRESS": (lambda: float(api.jobs["mill"].progress), None),
        "AP_FIB_MILL_TIME": (lambda: float(api.mill_time_s()), None),
        # stage
        "AP_STAGE_AT_X": (lambda: inst.stage_report()["x_m"], None),
        "AP_STAGE_AT_Y": (lambda: inst.stage_report()["y_m"], None),
        "AP_STAGE_AT_Z": (lambda: inst.stage_report()["z_m"], None),
        "AP_STAGE_AT_R": (lambda: inst.stage_report()["r_deg"], None),
        "AP_STAGE_AT_T": (lambda: inst.stage_report()["t_deg"], None),
        "AP_STAGE_GOTO_X": goto("x_m", 1.0),
        "AP_STAGE_GOTO_Y": goto("y_m", 1.0),
        "AP_STAGE_GOTO_Z": goto("z_m", 1.0),
        "AP_STAGE_GOTO_R": goto("r_deg", 1.0),
        "AP_STAGE_GOTO_T": goto("t_deg", 1.0),
        "DP_STAGE_IS": (lambda: "Busy" if api.job_running("stage") else "Idle", None),
        # vacuum
        "DP_VAC_STATUS": (vac_status, None),
        "AP_SYSTEMVAC": (lambda: float(inst.vacuum()["chamber_pa"]), None),
        # autofunctions
        "DP_AUTO_FUNCTION": (lambda: "Busy" if api.job_running("auto") else "Idle", None),
        "DP_AUTO_FN_STATUS": (lambda: "Failed" if api.jobs["auto"].code else "OK", None),
        "DP_FROZEN": (frozen, None),
    }
    return t
