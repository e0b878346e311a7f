"""Shared base for protocol models: strict, immutable, documented."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
