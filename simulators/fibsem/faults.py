"""The fault panel of the simulated FIB-SEM: ``instrument.faults.set(name, on, **options)``.

Names are exactly ``clemflow.bridge.backend.FAULT_NAMES`` (duplicated here,
because simulators import no orchestrator module; a test keeps them equal).

=====================  ======================================================================
fault                  what it does (options)
=====================  ======================================================================
beam_trip              the next grab or mill (on ``beam``, default either) fails at
                       ``at_fraction`` (0.5) of its time; that beam is then off (tripped)
                       and refused until the fault is switched off. A tripped mill is
                       logged ``partial`` with the thickness it removed.
vacuum_interlock       while on: vacuum not ready (chamber 30 Pa) and every grab, mill,
                       autofunction and beam-on/unblank is refused before anything
                       changes. Settings and stage moves still work.
frame_timeout          the next grab (on ``beam``, default either) never finishes: it fails
                       after ``timeout_s`` of instrument time (default 2 x frame time +
                       10 s, divided by ``time_scale`` like every duration). One-shot.
autofocus_diverges     while on: every autofocus / autostigmation wanders off (working
                       distance ~0.2 mm wrong, stigmators off by ~0.3) and reports failure;
                       nothing is restored (the driver must restore). Auto-contrast is
                       unaffected.
stage_error            the next stage move stops at ``at_fraction`` (0.5) of the way with
                       a stage error. One-shot.
server_crash           during the next mill the process exits, ``os._exit(exit_code)``
                       (70): ``when="after"`` (default) once the mill has run, been saved
                       and logged; ``when="before"``: before anything is milled. One-shot.
network_drop           for ``duration_s`` (5) seconds of *real* time (``None``: until
                       switched off) every look-alike call fails with the vendor's
                       "communication lost" error; the instrument itself carries on.
=====================  ======================================================================

Faults are not saved: a new instrument object starts with none on.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["FAULT_NAMES", "FaultPanel"]

FAULT_NAMES: tuple[str, ...] = (
    "beam_trip",
    "vacuum_interlock",
    "frame_timeout",
    "autofocus_diverges",
    "stage_error",
    "server_crash",
    "network_drop",
)

_OPTIONS: dict[str, dict[str, Any]] = {
    "beam_trip": {"beam": None, "at_fraction": 0.5},
    "vacuum_interlock": {},
    "frame_timeout": {"beam": None, "timeout_s": None},
    "autofocus_diverges": {},
    "stage_error": {"at_fraction": 0.5},
    "server_crash": {"when": "after", "exit_code": 70},
    "network_drop": {"duration_s": 5.0},
}


def _check(name: str, opts: dict[str, Any]) -> None:
    beam = opts.get("beam")
    if beam not in (None, "electron", "ion"):
        raise ValueError(f"{name}: beam must be 'electron', 'ion' or None, not {beam!r}")
    frac = opts.get("at_fraction", 0.5)
    if not 0.0 <= float(frac) <= 1.0:
        raise ValueError(f"{name}: at_fraction must be within 0..1, not {frac!r}")
    if name == "server_crash" and opts["when"] not in ("before", "after"):
        raise ValueError(f"server_crash: when must be 'before' or 'after', not {opts['when']!r}")
    for key in ("timeout_s", "duration_s"):
        v = opts.get(key)
        if v is not None and float(v) < 0:
            raise ValueError(f"{name}: {key} cannot be negative")


class FaultPanel:
    """Which faults are on, with their options; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._on: dict[str, dict[str, Any]] = {}
        self._fired: dict[str, int] = dict.fromkeys(FAULT_NAMES, 0)
        self._tripped: set[str] = set()
        self._link_until: float | None = None

    def set(self, name: str, on: bool, **options: Any) -> dict[str, Any]:
        """Switch a fault on (with options) or off; returns the panel's state."""
        if name not in FAULT_NAMES:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULT_NAMES)}")
        unknown = set(options) - set(_OPTIONS[name])
        if unknown:
            raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS[name])}")
        with self._lock:
            if on:
                opts = {**_OPTIONS[name], **options}
                _check(name, opts)
                self._on[name] = opts
                if name == "network_drop":
                    d = opts["duration_s"]
                    self._link_until = None if d is None else time.monotonic() + float(d)
            else:
                self._on.pop(name, None)
                if name == "beam_trip":
                    self._tripped.clear()
        return self.state()

    def is_on(self, name: str) -> bool:
        with self._lock:
            if name == "network_drop":
                return self._link_lost_locked()
            return name in self._on

    def options(self, name: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._on.get(name, {}))

    def state(self) -> dict[str, Any]:
        with self._lock:
            self._link_lost_locked()
            out = {n: {"on": n in self._on, "options": dict(self._on.get(n, {})), "fired": self._fired[n]}
                   for n in FAULT_NAMES}
            out["beam_trip"]["tripped_beams"] = sorted(self._tripped)
            return out

    # -- used by the instrument and the look-alikes -------------------------------------------

    def link_lost(self) -> bool:
        """True while ``network_drop`` is in force."""
        with self._lock:
            return self._link_lost_locked()

    def _link_lost_locked(self) -> bool:
        if "network_drop" not in self._on:
            return False
        if self._link_until is not None and time.monotonic() >= self._link_until:
            self._on.pop("network_drop", None)
            return False
        return True

    def tripped(self, beam: str) -> bool:
        with self._lock:
            return beam in self._tripped

    def take(self, name: str, beam: str | None = None) -> dict[str, Any] | None:
        """If ``name`` is armed (for ``beam``), fire it once and return its options, else None.

        One-shot faults switch off when they fire; ``beam_trip`` stays on and marks the beam tripped
        (and fires only once per switch-on).
        """
        with self._lock:
            opts = self._on.get(name)
            if opts is None:
                return None
            if beam is not None and opts.get("beam") not in (None, beam):
                return None
            if name == "beam_trip":
                if self._tripped:
                    return None
                self._tripped.add(beam or "electron")
            elif name in ("frame_timeout", "stage_error", "server_crash"):
                del self._on[name]
            self._fired[name] += 1
            return dict(opts)

    def vacuum_lost(self) -> bool:
        return self.is_on("vacuum_interlock")
