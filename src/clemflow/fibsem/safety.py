"""Faults: what went wrong, making the instrument safe, and checking it before going on.

On a fault the engine stops milling (cancels the running operation), blanks
both beams and pauses. Each of those is attempted on its own: when the link
to the instrument is what failed, the later steps may fail too, and the alert
says which ones did. Before a run resumes, ``instrument_problems`` reads the
instrument's state: the vacuum ready, both beams on, no interlock, nothing
running.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..bridge.client import BridgeClient
from ..bridge.client_types import BridgeError, BridgeTimeout, BridgeUnavailable

__all__ = ["FaultInfo", "PauseRun", "instrument_problems", "make_safe", "what_to_check"]

LINK_ERRORS = (BridgeUnavailable, BridgeTimeout, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class FaultInfo:
    """A fault as journalled and shown: the error's code, name and retry safety, and where in the run it happened."""

    name: str
    message: str
    code: int | None = None
    retry_safe: bool | None = None
    slice: int | None = None
    phase: str = ""
    key: str | None = None

    @classmethod
    def from_exception(cls, error: BaseException, *, slice: int | None, phase: str) -> FaultInfo:
        if isinstance(error, BridgeError):
            return cls(error.name, str(error), error.code, error.retry_safe, slice, phase, error.key)
        if isinstance(error, (BridgeUnavailable, BridgeTimeout)):
            return cls("bridge_unavailable" if isinstance(error, BridgeUnavailable) else "bridge_timeout", str(error), None,
                       None, slice, phase, getattr(error, "key", None))
        if isinstance(error, OSError):
            return cls("disk_error" if error.errno is not None else "os_error", f"{type(error).__name__}: {error}", None, True,
                       slice, phase)
        return cls(type(error).__name__, str(error), None, None, slice, phase)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def headline(self) -> str:
        where = f" at slice {self.slice}" if self.slice else ""
        code = f" ({self.code})" if self.code is not None else ""
        return f"fault {self.name}{code}{where} during {self.phase or 'the run'}"


class PauseRun(Exception):
    """Raised inside the engine to stop at a fault; carries what to journal and show."""

    def __init__(self, fault: FaultInfo) -> None:
        super().__init__(fault.headline())
        self.fault = fault


def what_to_check(fault: FaultInfo) -> str:
    """A line of advice for the operator, by fault."""
    advice = {
        "beam_trip": "the beam tripped: check the gun / ion source and switch the beam back on",
        "vacuum_interlock": "the vacuum is not ready: wait until the chamber is pumped",
        "interlock": "an interlock refused the request: check vacuum and beams",
        "frame_timeout": "frames do not complete: check the scan generator and detector",
        "autofunction_diverged": "autofocus/autostigmation failed: check the image (charging, contamination) and focus by hand",
        "stage_error": "the stage reported an error: check its position and that nothing blocks it",
        "link_lost": "the bridge cannot reach the vendor software: check that it runs and answers",
        "bridge_unavailable": "the bridge server does not answer: check that `clemflow bridge serve` runs and the network",
        "bridge_timeout": "the bridge server is slow to answer: check its log and the network",
        "fiducial_lost": "the fiducial was not found: check the image (drift, charging, focus) and the field of view",
        "frame_rejected": "frames keep failing the checks (blank, truncated, wrong size): check the detector and scan",
        "disk_error": "the slice could not be written: free disk space or fix the output folder",
        "cancelled": "the operation was cancelled on the instrument",
        "interrupted": "the bridge server restarted during an operation",
    }
    return advice.get(fault.name, "check the instrument and the bridge log")


def make_safe(bridge: BridgeClient, key_prefix: str, running: str | None = None) -> dict[str, Any]:
    """Stop the running operation and blank both beams; returns what was done and what failed (never raises)."""
    done: dict[str, Any] = {"cancelled": None, "blanked": [], "failed": []}
    if not bridge.available:  # silent server: each request would only wait out the heartbeat limit
        done["failed"].append("the bridge server does not answer: nothing could be stopped or blanked from here")
        return done
    try:
        state = bridge.state()
        running = running or state.get("busy")
    except Exception as exc:  # noqa: BLE001 - whatever failed, try the rest
        done["failed"].append(f"state: {exc}")
    if running:
        try:
            reply = bridge.cancel(running, key=f"{key_prefix}/cancel")
            done["cancelled"] = {"operation": running, "state": reply.get("state"), "requested": reply.get("cancel_requested")}
        except Exception as exc:  # noqa: BLE001
            done["failed"].append(f"cancel {running}: {exc}")
    for beam in ("ion", "electron"):
        try:
            bridge.set_beam(beam, blanked=True, key=f"{key_prefix}/blank-{beam}")  # type: ignore[arg-type]
            done["blanked"].append(beam)
        except BridgeError as exc:
            if exc.name == "busy":  # the cancelled operation is still winding down: once more after it
                try:
                    _wait_idle(bridge)
                    bridge.set_beam(beam, blanked=True, key=f"{key_prefix}/blank-{beam}-2")  # type: ignore[arg-type]
                    done["blanked"].append(beam)
                    continue
                except Exception as again:  # noqa: BLE001
                    exc = again  # type: ignore[assignment]
            done["failed"].append(f"blank {beam}: {exc}")
        except Exception as exc:  # noqa: BLE001
            done["failed"].append(f"blank {beam}: {exc}")
    return done


def _wait_idle(bridge: BridgeClient, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not bridge.state().get("busy"):
            return
        time.sleep(0.1)


def instrument_problems(state: dict[str, Any]) -> list[str]:
    """What stops a run from going on, read from a ``state`` reply; empty when it may."""
    problems: list[str] = []
    vacuum = state.get("vacuum") or {}
    if not vacuum.get("ready", False):
        problems.append(f"vacuum not ready ({vacuum.get('chamber_pa')} Pa)")
    for name, beam in (state.get("beams") or {}).items():
        if not beam.get("on", False):
            problems.append(f"{name} beam is off")
        if beam.get("tripped"):
            problems.append(f"{name} beam tripped")
    for interlock in state.get("interlocks") or []:
        problems.append(f"interlock: {interlock}")
    return problems
