"""Reading request arguments: types first, then the instrument's limits, before any backend call.

Everything a client sends is checked here and turned into the dataclasses of
``backend.py``; a backend only ever sees values that passed. A refusal names
the offending field (``details.field``, e.g. ``args.patterns[0].depth_m``) so a
person can fix the request without reading server logs.
"""

from __future__ import annotations

import math
from typing import Any

from .backend import (
    FAULT_NAMES,
    BeamChanges,
    BeamLimits,
    FrameRequest,
    InstrumentLimits,
    MillPattern,
    MillRequest,
    Range,
    StageMove,
)
from .errors import BridgeError

__all__ = [
    "Fields",
    "check_range",
    "parse_autofunction",
    "parse_fault",
    "parse_frame",
    "parse_mill",
    "parse_set_beam",
    "parse_set_detector",
    "parse_stage_move",
]

BEAMS = ("electron", "ion")
PATTERN_KINDS = ("rectangle", "cleaning_cross_section")
SCAN_DIRECTIONS = ("top_to_bottom", "bottom_to_top", "left_to_right", "right_to_left")


def _invalid(field: str, message: str) -> BridgeError:
    return BridgeError("invalid_arguments", f"{field}: {message}", details={"field": field})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Fields:
    """One JSON object's fields, read by name; wrong types and unknown names are refused.

    ``null`` counts as absent for optional fields (the protocol's "keep").
    Call ``done()`` after reading every known field so unknown ones are refused.
    """

    def __init__(self, data: Any, path: str = "args") -> None:
        if not isinstance(data, dict):
            raise _invalid(path, f"must be a JSON object, not {type(data).__name__}")
        self.data = data
        self.path = path
        self._read: set[str] = set()

    def field(self, name: str) -> str:
        return f"{self.path}.{name}"

    def _get(self, name: str, required: bool) -> Any:
        self._read.add(name)
        value = self.data.get(name)
        if value is None and required:
            raise _invalid(self.field(name), "is required")
        return value

    def number(self, name: str, *, required: bool = False) -> float | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not _is_number(value):
            raise _invalid(self.field(name), f"must be a number, not {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise BridgeError("out_of_range", f"{self.field(name)} = {value} is too large for any instrument",
                              details={"field": self.field(name)}) from None
        if not math.isfinite(number):
            raise _invalid(self.field(name), "must be finite")
        return number

    def integer(self, name: str, *, required: bool = False, default: int | None = None) -> int | None:
        value = self._get(name, required)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid(self.field(name), f"must be an integer, not {_kind(value)}")
        return value

    def text(self, name: str, *, required: bool = False, choices: tuple[str, ...] | None = None, default: str | None = None) -> str | None:
        value = self._get(name, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise _invalid(self.field(name), f"must be a string, not {_kind(value)}")
        if choices is not None and value not in choices:
            raise _invalid(self.field(name), f"must be one of {', '.join(choices)}; got {value[:64]!r}")
        if len(value) > 256:
            raise _invalid(self.field(name), "is longer than 256 characters")
        return value

    def flag(self, name: str, *, required: bool = False) -> bool | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise _invalid(self.field(name), f"must be true or false, not {_kind(value)}")
        return value

    def pair(self, name: str, *, required: bool = False) -> tuple[float, float] | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 2:
            raise _invalid(self.field(name), "must be a list of two numbers [x, y]")
        out = []
        for i, item in enumerate(value):
            if not _is_number(item) or not _finite(item):
                raise _invalid(f"{self.field(name)}[{i}]", f"must be a finite number, not {_kind(item)}")
            out.append(float(item))
        return out[0], out[1]

    def objects(self, name: str, *, required: bool = False) -> list[Fields]:
        value = self._get(name, required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise _invalid(self.field(name), f"must be a list, not {_kind(value)}")
        return [Fields(item, f"{self.field(name)}[{i}]") for i, item in enumerate(value)]

    def mapping(self, name: str) -> dict[str, Any]:
        value = self._get(name, False)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _invalid(self.field(name), f"must be a JSON object, not {_kind(value)}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise _invalid(self.field(unknown[0]), f"unknown argument (known: {', '.join(sorted(self._read)) or 'none'})")


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_range(value: float | None, allowed: Range, field: str, what: str) -> None:
    """Refuse with ``out_of_range`` (nothing sent to the instrument) when ``value`` is outside ``allowed``."""
    if value is None or value in allowed:
        return
    unit = f" {allowed.unit}" if allowed.unit else ""
    raise BridgeError(
        "out_of_range",
        f"{what} {value:g}{unit} is outside the instrument's range {allowed.low:g}..{allowed.high:g}{unit}; nothing was sent to the instrument",
        details={"field": field, "value": value, "allowed": allowed.as_json()},
    )


CURRENT_MATCH = 1e-3  # relative: a requested current matches an offered one within 0.1 %


def check_current(value: float | None, bl: BeamLimits, field: str, what: str) -> None:
    """Refuse a current the column does not offer (probe table / apertures) before the instrument sees it."""
    if value is None or not bl.currents_a:
        return
    if any(abs(value - c) <= CURRENT_MATCH * c for c in bl.currents_a):
        return
    offered = ", ".join(f"{c:g}" for c in bl.currents_a)
    raise BridgeError("out_of_range", f"{what} {value:g} A is not one the column offers ({offered} A); nothing was sent to the instrument",
                      details={"field": field, "value": value, "allowed": list(bl.currents_a)})


def _check_choice(value: str | None, allowed: tuple[str, ...], field: str, what: str) -> None:
    if value is not None and value not in allowed:
        raise BridgeError("out_of_range", f"{what} {value!r} is not on this instrument (has: {', '.join(allowed)})",
                          details={"field": field, "value": value, "allowed": list(allowed)})


def _beam(args: Fields, limits: InstrumentLimits) -> tuple[str, BeamLimits]:
    beam = args.text("beam", required=True, choices=BEAMS)
    assert beam is not None
    return beam, limits.beam(beam)  # type: ignore[arg-type]


def parse_set_beam(data: Any, limits: InstrumentLimits) -> tuple[str, BeamChanges]:
    args = Fields(data)
    beam, bl = _beam(args, limits)
    changes = BeamChanges(
        voltage_v=args.number("voltage_v"),
        current_a=args.number("current_a"),
        working_distance_m=args.number("working_distance_m"),
        horizontal_field_width_m=args.number("horizontal_field_width_m"),
        stigmation=args.pair("stigmation"),
        beam_shift_m=args.pair("beam_shift_m"),
        scan_rotation_deg=args.number("scan_rotation_deg"),
        blanked=args.flag("blanked"),
    )
    args.done()
    check_range(changes.voltage_v, bl.voltage_v, args.field("voltage_v"), f"{beam} voltage")
    check_range(changes.current_a, bl.current_a, args.field("current_a"), f"{beam} current")
    check_current(changes.current_a, bl, args.field("current_a"), f"{beam} current")
    check_range(changes.working_distance_m, bl.working_distance_m, args.field("working_distance_m"), f"{beam} working distance")
    check_range(changes.horizontal_field_width_m, bl.horizontal_field_width_m, args.field("horizontal_field_width_m"), f"{beam} field width")
    for name, pair, allowed in (("stigmation", changes.stigmation, bl.stigmation), ("beam_shift_m", changes.beam_shift_m, bl.beam_shift_m)):
        for i, value in enumerate(pair or ()):
            check_range(value, allowed, f"{args.field(name)}[{i}]", f"{beam} {name.removesuffix('_m').replace('_', ' ')}")
    check_range(changes.scan_rotation_deg, Range(-360.0, 360.0, "deg"), args.field("scan_rotation_deg"), "scan rotation")
    return beam, changes


def parse_set_detector(data: Any, limits: InstrumentLimits) -> tuple[str, str, float | None, float | None]:
    args = Fields(data)
    beam, bl = _beam(args, limits)
    detector = args.text("detector", required=True)
    brightness = args.number("brightness")
    contrast = args.number("contrast")
    args.done()
    _check_choice(detector, bl.detectors, args.field("detector"), f"{beam} detector")
    unit = Range(0.0, 1.0)
    check_range(brightness, unit, args.field("brightness"), "brightness")
    check_range(contrast, unit, args.field("contrast"), "contrast")
    assert detector is not None
    return beam, detector, brightness, contrast


def parse_frame(data: Any, limits: InstrumentLimits) -> FrameRequest:
    args = Fields(data)
    beam, bl = _beam(args, limits)
    width = args.integer("width_px", required=True)
    height = args.integer("height_px", required=True)
    dwell = args.number("dwell_s", required=True)
    averaging = args.integer("line_averaging", default=1)
    detector = args.text("detector")
    hfw = args.number("horizontal_field_width_m")
    bit_depth = args.integer("bit_depth", default=8)
    args.done()
    if bit_depth not in (8, 16):
        raise _invalid(args.field("bit_depth"), f"must be 8 or 16, not {bit_depth}")
    check_range(width, limits.frame_width_px, args.field("width_px"), "frame width")
    check_range(height, limits.frame_height_px, args.field("height_px"), "frame height")
    check_range(dwell, limits.dwell_s, args.field("dwell_s"), "dwell time")
    check_range(averaging, limits.line_averaging, args.field("line_averaging"), "line averaging")
    check_range(hfw, bl.horizontal_field_width_m, args.field("horizontal_field_width_m"), f"{beam} field width")
    _check_choice(detector, bl.detectors, args.field("detector"), f"{beam} detector")
    assert width is not None and height is not None and dwell is not None and averaging is not None
    return FrameRequest(beam=beam, width_px=width, height_px=height, dwell_s=dwell, line_averaging=averaging,  # type: ignore[arg-type]
                        detector=detector, horizontal_field_width_m=hfw, bit_depth=bit_depth)  # type: ignore[arg-type]


def parse_mill(data: Any, limits: InstrumentLimits) -> MillRequest:
    """Patterns within the ion field of view, depths and sizes within limits, a current the column gives."""
    args = Fields(data)
    patterns = args.objects("patterns", required=True)
    current = args.number("current_a", required=True)
    voltage = args.number("voltage_v")
    args.done()
    if not patterns:
        raise _invalid(args.field("patterns"), "needs at least one pattern")
    if len(patterns) > limits.max_patterns:
        raise BridgeError("out_of_range", f"{len(patterns)} patterns; the instrument takes at most {limits.max_patterns} per mill",
                          details={"field": args.field("patterns"), "value": len(patterns), "allowed": [1, limits.max_patterns]})
    check_range(current, limits.ion.current_a, args.field("current_a"), "ion milling current")
    check_current(current, limits.ion, args.field("current_a"), "ion milling current")
    check_range(voltage, limits.ion.voltage_v, args.field("voltage_v"), "ion voltage")
    half_field = limits.ion.horizontal_field_width_m.high / 2
    out = []
    for pattern in patterns:
        kind = pattern.text("kind", required=True, choices=PATTERN_KINDS)
        center = pattern.pair("center_m", required=True)
        width = pattern.number("width_m", required=True)
        height = pattern.number("height_m", required=True)
        depth = pattern.number("depth_m", required=True)
        direction = pattern.text("scan_direction", choices=SCAN_DIRECTIONS, default="top_to_bottom")
        pattern.done()
        assert center is not None and width is not None and height is not None and depth is not None
        check_range(depth, limits.mill_depth_m, pattern.field("depth_m"), "mill depth")
        check_range(width, limits.pattern_size_m, pattern.field("width_m"), "pattern width")
        check_range(height, limits.pattern_size_m, pattern.field("height_m"), "pattern height")
        for i, (c, size) in enumerate(zip(center, (width, height))):
            reach = abs(c) + size / 2
            if reach > half_field:
                raise BridgeError("out_of_range",
                                  f"pattern reaches {reach:g} m from the centre of the ion field; the widest field is ±{half_field:g} m",
                                  details={"field": f"{pattern.field('center_m')}[{i}]", "value": c, "allowed": [-half_field, half_field]})
        out.append(MillPattern(kind=kind, center_m=center, width_m=width, height_m=height, depth_m=depth, scan_direction=direction))  # type: ignore[arg-type]
    assert current is not None
    return MillRequest(patterns=tuple(out), current_a=current, voltage_v=voltage)


def parse_stage_move(data: Any, limits: InstrumentLimits) -> StageMove:
    args = Fields(data)
    axes = {name: args.number(name) for name in ("x_m", "y_m", "z_m", "r_deg", "t_deg")}
    args.done()
    for name, value in axes.items():
        allowed = limits.stage.get(name)
        if allowed is None:
            if value is not None:
                raise _invalid(args.field(name), "this instrument's stage has no such axis")
            continue
        check_range(value, allowed, args.field(name), f"stage {name.split('_')[0]}")
    return StageMove(**axes)


def parse_autofunction(data: Any, limits: InstrumentLimits) -> str:
    args = Fields(data)
    beam, _ = _beam(args, limits)
    args.done()
    return beam


def parse_fault(data: Any) -> tuple[str, bool, dict[str, Any]]:
    args = Fields(data)
    name = args.text("fault", required=True, choices=FAULT_NAMES)
    on = args.flag("on", required=True)
    options = args.mapping("options")
    args.done()
    assert name is not None and on is not None
    return name, on, options
