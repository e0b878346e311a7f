"""Physical quantities written as strings ("15 nm", "2 us", "700 pA", "1.5 kV").

Protocol files are read by people at the microscope, so every physical value
carries its unit. Each quantity is parsed into SI (metres, seconds, amperes,
volts, ...) and stored as a float. A bare number is refused: "15" could be nm
or µm, and guessing wrong mills a sample away.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "Current",
    "Duration",
    "Length",
    "Power",
    "Voltage",
    "format_quantity",
    "parse_quantity",
]

_PREFIXES = {
    "p": 1e-12,
    "n": 1e-9,
    "u": 1e-6,
    "µ": 1e-6,
    "μ": 1e-6,
    "m": 1e-3,
    "": 1.0,
    "k": 1e3,
    "M": 1e6,
}

# dimension -> {unit symbol: factor to SI}
_UNITS: dict[str, dict[str, float]] = {
    "length": {
        **{f"{p}m": f for p, f in _PREFIXES.items() if p not in ("k", "M")},
        "mm": 1e-3,
        "cm": 1e-2,
    },
    "duration": {
        "ps": 1e-12,
        "ns": 1e-9,
        "us": 1e-6,
        "µs": 1e-6,
        "μs": 1e-6,
        "ms": 1e-3,
        "s": 1.0,
        "sec": 1.0,
        "min": 60.0,
        "h": 3600.0,
        "hr": 3600.0,
        "d": 86400.0,
        "day": 86400.0,
    },
    "current": {f"{p}A": f for p, f in _PREFIXES.items() if p != "M"},
    "voltage": {f"{p}V": f for p, f in _PREFIXES.items() if p != "M"},
    "power": {f"{p}W": f for p, f in _PREFIXES.items() if p != "M"},
}

_EXAMPLES = {
    "length": "'15 nm', '5 um', '600 um'",
    "duration": "'2 us', '30 min', '1 h'",
    "current": "'700 pA', '1 nA'",
    "voltage": "'1.5 kV', '30 kV'",
    "power": "'1 mW', '5 mW'",
}

_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s].*?)?\s*$")


def _dimension_of(unit: str) -> str | None:
    for dimension, units in _UNITS.items():
        if unit in units:
            return dimension
    return None


def parse_quantity(value: object, dimension: str) -> float:
    """Parse a quantity string into its SI value, or raise ValueError saying what would be accepted."""
    examples = _EXAMPLES[dimension]
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a {dimension} with a unit, such as {examples}")
    if isinstance(value, (int, float)):
        raise ValueError(
            f"{value!r} has no unit; write the {dimension} with its unit, such as {examples}"
        )
    if not isinstance(value, str):
        raise ValueError(f"expected a {dimension} string with a unit, such as {examples}")
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a {dimension}; write a number and a unit, such as {examples}")
    number, unit = float(match.group(1)), (match.group(2) or "").strip()
    if not unit:
        raise ValueError(f"{value!r} has no unit; write the {dimension} with its unit, such as {examples}")
    factor = _UNITS[dimension].get(unit)
    if factor is None:
        other = _dimension_of(unit)
        if other:
            raise ValueError(f"{value!r} is a {other}, but a {dimension} is needed here, such as {examples}")
        raise ValueError(f"unknown unit {unit!r} in {value!r}; a {dimension} is needed here, such as {examples}")
    return number * factor


_DISPLAY = {
    "length": [(1e-3, "mm"), (1e-6, "µm"), (1e-9, "nm"), (1e-12, "pm")],
    "duration": [(86400.0, "d"), (3600.0, "h"), (60.0, "min"), (1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")],
    "current": [(1.0, "A"), (1e-3, "mA"), (1e-6, "µA"), (1e-9, "nA"), (1e-12, "pA")],
    "voltage": [(1e3, "kV"), (1.0, "V"), (1e-3, "mV")],
    "power": [(1.0, "W"), (1e-3, "mW"), (1e-6, "µW")],
}


def format_quantity(value: float, dimension: str) -> str:
    """Format an SI value with the largest unit that keeps the number at or above 1."""
    for factor, unit in _DISPLAY[dimension]:
        if unit == "d" and abs(value) < 3 * 86400:
            continue  # "48 h" reads better than "2 d" in a time course
        if abs(value) >= factor * 0.999999:
            return f"{value / factor:.4g} {unit}"
    factor, unit = _DISPLAY[dimension][-1]
    return f"{value / factor:.4g} {unit}"


def _serializer(dimension: str) -> PlainSerializer:
    return PlainSerializer(lambda v: format_quantity(v, dimension), return_type=str, when_used="json")


def _quantity_type(dimension: str) -> object:
    units = sorted(_UNITS[dimension], key=len, reverse=True)
    pattern = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*(" + "|".join(re.escape(u) for u in units) + r")\s*$"
    return Annotated[
        float,
        BeforeValidator(lambda v: parse_quantity(v, dimension)),
        _serializer(dimension),
        WithJsonSchema(
            {"type": "string", "pattern": pattern, "description": f"a {dimension} with its unit, e.g. {_EXAMPLES[dimension]}"}
        ),
    ]


Length = _quantity_type("length")
"""A length in metres, written with a unit ("15 nm", "600 um")."""
Duration = _quantity_type("duration")
"""A duration in seconds, written with a unit ("2 us", "30 min", "1 h")."""
Current = _quantity_type("current")
"""A current in amperes, written with a unit ("700 pA")."""
Voltage = _quantity_type("voltage")
"""A voltage in volts, written with a unit ("1.5 kV")."""
Power = _quantity_type("power")
"""An optical power in watts, written with a unit ("1 mW")."""
