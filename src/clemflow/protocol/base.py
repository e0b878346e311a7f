"""Shared base for protocol models: strict, immutable, documented."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class ProtocolModel(BaseModel):
    """Every protocol section forbids unknown keys: a misspelled field is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def check_range(value: float, low: float, high: float, what: str, fmt: str) -> float:
    """Refuse a physical value outside its plausible range, naming the range in readable units."""
    from .units import format_quantity

    if not low <= value <= high:
        raise ValueError(
            f"{what} {format_quantity(value, fmt)} is out of range; "
            f"it must lie between {format_quantity(low, fmt)} and {format_quantity(high, fmt)}"
        )
    return value


def in_range(*fields: str, low: float, high: float, what: str, dimension: str) -> Any:
    """A field validator refusing values of `fields` outside [low, high]; empty (None) values pass.

    Declared in a model body as ``_dwell = in_range("dwell", low=10e-9, high=1e-3, what="dwell time",
    dimension="duration")``.
    """

    def check(cls: type, value: float | None) -> float | None:
        return None if value is None else check_range(value, low, high, what, dimension)

    return field_validator(*fields)(check)
