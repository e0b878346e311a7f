"""The command table (docs/bridge-protocol.md, section 4): each command's class and what it calls.

Queries read; ``set`` commands change a setting and answer when done; ``long``
commands start an operation and answer at once. Set and long commands carry
an idempotency key. Parsing here happens before the record is written and
before the backend is called, so a refused request leaves no trace on the
instrument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backend import Backend, InstrumentLimits, Job
from .operations import Timeouts, expected_frame_s, expected_mill_s
from .validate import (
    parse_autofunction,
    parse_fault,
    parse_frame,
    parse_mill,
    parse_set_beam,
    parse_set_detector,
    parse_stage_move,
)

__all__ = ["COMMANDS", "LongCall", "plan_long", "plan_set"]

QUERY, SET, LONG = "query", "set", "long"

COMMANDS: dict[str, str] = {
    "hello": QUERY,
    "ping": QUERY,
    "state": QUERY,
    "operation": QUERY,
    "result": QUERY,
    "record": QUERY,
    "set_beam": SET,
    "set_detector": SET,
    "cancel": SET,
    "set_fault": SET,
    "grab_frame": LONG,
    "mill": LONG,
    "move_stage": LONG,
    "autofocus": LONG,
    "autostigmation": LONG,
    "auto_contrast": LONG,
}

CHANGES_INSTRUMENT = ("set_beam", "set_detector")
"""Set commands refused ``busy`` while a long operation runs: nothing changes the instrument under a mill or a scan."""

STAGE_EXPECTED_S = 10.0
AUTOFUNCTION_EXPECTED_S = 20.0


@dataclass(frozen=True)
class LongCall:
    """A validated long operation, ready to run on the worker thread."""

    run: Callable[[Backend, Job], Any]
    expected_s: float
    timeout_s: float
    frame: bool = False  # the result is a Frame whose pixels are kept for ``result``


def plan_set(command: str, args: Any, limits: InstrumentLimits) -> Callable[[Backend], Any]:
    """Validate a backend-calling set command; returns the call to make."""
    if command == "set_beam":
        beam, changes = parse_set_beam(args, limits)
        return lambda backend: backend.set_beam(beam, changes)  # type: ignore[arg-type]
    if command == "set_detector":
        beam, detector, brightness, contrast = parse_set_detector(args, limits)
        return lambda backend: backend.set_detector(beam, detector, brightness, contrast)  # type: ignore[arg-type]
    if command == "set_fault":
        name, on, options = parse_fault(args)
        return lambda backend: backend.set_fault(name, on, options)
    raise KeyError(command)


def plan_long(command: str, args: Any, limits: InstrumentLimits, timeouts: Timeouts = Timeouts()) -> LongCall:
    """Validate a long command against the limits; returns the call with its expected time and timeout."""
    operation_timeout_s = timeouts.operation
    if command == "grab_frame":
        frame = parse_frame(args, limits)
        expected = expected_frame_s(frame)
        return LongCall(lambda b, job: b.grab_frame(frame, job), expected, operation_timeout_s(command, expected), frame=True)
    if command == "mill":
        mill = parse_mill(args, limits)
        expected = expected_mill_s(mill)
        return LongCall(lambda b, job: b.mill(mill, job), expected, operation_timeout_s(command, expected))
    if command == "move_stage":
        move = parse_stage_move(args, limits)
        return LongCall(lambda b, job: b.move_stage(move, job), STAGE_EXPECTED_S, operation_timeout_s(command, STAGE_EXPECTED_S))
    if command in ("autofocus", "autostigmation", "auto_contrast"):
        beam = parse_autofunction(args, limits)
        return LongCall(lambda b, job: b.autofunction(command, beam, job),  # type: ignore[arg-type]
                        AUTOFUNCTION_EXPECTED_S, operation_timeout_s(command, AUTOFUNCTION_EXPECTED_S))
    raise KeyError(command)
