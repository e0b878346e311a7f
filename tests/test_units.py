"""Quantity strings parse into SI and refuse what is ambiguous."""

from __future__ import annotations

import math

import pytest

from clemflow.protocol.units import format_quantity, parse_quantity


@pytest.mark.parametrize(
    "text,dimension,si",
    [
        ("15 nm", "length", 15e-9),
        ("0.3 um", "length", 0.3e-6),
        ("0.3 µm", "length", 0.3e-6),
        ("5mm", "length", 5e-3),
        ("2 us", "duration", 2e-6),
        ("90 min", "duration", 5400.0),
        ("1 h", "duration", 3600.0),
        ("700 pA", "current", 700e-12),
        ("1.5 kV", "voltage", 1500.0),
        ("1e3 nm", "length", 1e-6),
    ],
)
def test_parse(text, dimension, si):
    assert math.isclose(parse_quantity(text, dimension), si, rel_tol=1e-12)


@pytest.mark.parametrize(
    "value,dimension,words",
    [
        (15, "length", "has no unit"),
        ("15", "length", "has no unit"),
        ("700 kV", "current", "is a voltage"),
        ("15 furlongs", "length", "unknown unit"),
        ("fast", "duration", "is not a duration"),
        (None, "length", "with a unit"),
    ],
)
def test_refuse(value, dimension, words):
    with pytest.raises(ValueError, match=words):
        parse_quantity(value, dimension)


@pytest.mark.parametrize("si,dimension", [(15e-9, "length"), (2e-6, "duration"), (700e-12, "current"), (1500.0, "voltage"), (86400.0, "duration")])
def test_format_round_trips(si, dimension):
    assert math.isclose(parse_quantity(format_quantity(si, dimension).replace("µ", "u"), dimension), si, rel_tol=1e-3)
