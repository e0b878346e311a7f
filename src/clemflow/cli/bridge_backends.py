"""Build the backend a bridge server drives, by name: the one place that knows simulated from real.

``sim-smartsem`` and ``sim-autoscript`` are the real ``smartsem`` and
``autoscript`` drivers over the vendor look-alikes of
``clemflow.simulators.fibsem``, with the simulator's fault panel wired to
``set_fault``; ``smartsem``, ``autoscript`` and ``openfibsem`` connect to vendor
software and need its Python package on this computer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clemflow.bridge.backend import Backend, InstrumentFault

__all__ = ["BACKEND_NAMES", "BackendOptions", "UnknownBackend", "open_backend"]

BACKEND_NAMES: tuple[str, ...] = ("sim-smartsem", "sim-autoscript", "smartsem", "autoscript", "openfibsem")


class UnknownBackend(ValueError):
    """No backend of that name."""


@dataclass(frozen=True)
class BackendOptions:
    """What the ``clemflow bridge serve`` options say about the instrument.

    ``sim_*`` apply to the simulated backends only: the instrument's state folder
    (kept across restarts, with its mill log), how much faster than real time it
    runs (``0`` = no delays) and which specimen it images (``small`` starts fast).
    ``sim_drift_*``: the electron image's drift per mill (random-walk SD, a steady
    (x, y) nm per mill, jumps; ``None`` = the simulator's default).
    """

    sim_state: Path = Path("bridge-state/instrument")
    sim_time_scale: float = 1.0
    sim_seed: int = 0
    sim_world: Literal["full", "small"] = "full"
    sim_drift_step_nm: float | None = None
    sim_drift_nm_per_slice: tuple[float, float] = (0.0, 0.0)
    sim_drift_jump_probability: float | None = None
    sim_drift_jump_nm: float | None = None
    vendor_host: str | None = None
    openfibsem_manufacturer: str = "Demo"


def open_backend(name: str, options: BackendOptions) -> Backend:
    """The backend called ``name``; ``UnknownBackend`` or ``ImportError`` (with what to install) if it cannot be built."""
    if name == "sim-smartsem":
        return _sim_smartsem(options)
    if name == "sim-autoscript":
        return _sim_autoscript(options)
    if name == "smartsem":
        from clemflow.drivers.fibsem.smartsem import SmartSEMBackend

        return SmartSEMBackend.connect()
    if name == "autoscript":
        from clemflow.drivers.fibsem.autoscript import AutoScriptBackend

        return AutoScriptBackend.connect(options.vendor_host or "localhost")
    if name == "openfibsem":
        from clemflow.drivers.fibsem.openfibsem import OpenFIBSEMBackend

        return OpenFIBSEMBackend.connect(options.openfibsem_manufacturer, options.vendor_host or "localhost",
                                         session_path=Path(options.sim_state) / "openfibsem-session")
    raise UnknownBackend(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def _instrument(options: BackendOptions) -> Any:
    from clemflow.simulators.fibsem import SimulatedFibSem

    if options.sim_world not in ("full", "small"):
        raise ValueError(f"sim_world must be 'full' or 'small', not {options.sim_world!r}")
    state = Path(options.sim_state)
    state.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"seed": options.sim_seed, "time_scale": options.sim_time_scale,
                          "drift_step_nm": options.sim_drift_step_nm,
                          "drift_nm_per_slice": tuple(options.sim_drift_nm_per_slice),
                          "drift_jump_probability": options.sim_drift_jump_probability,
                          "drift_jump_nm": options.sim_drift_jump_nm}
    if options.sim_world == "small":
        return SimulatedFibSem.small(state, **kw)
    return SimulatedFibSem(state, **kw)


def _fault_switch(instrument: Any) -> Any:
    def switch(name: str, on: bool, fault_options: dict[str, Any]) -> dict[str, Any]:
        try:
            panel = instrument.faults.set(name, on, **fault_options)
        except (TypeError, ValueError) as exc:  # an unknown fault or option: the request's fault, not the server's
            raise InstrumentFault("invalid_arguments", str(exc), retry_safe=False, details={"field": "args.options"}) from exc
        return {"fault": name, "on": on, "panel": panel}

    return switch


def _sim_smartsem(options: BackendOptions) -> Backend:
    from clemflow.drivers.fibsem.smartsem import SmartSEMBackend
    from clemflow.simulators.fibsem.smartsem import FIB_PROBES, SmartSEMApi

    instrument = _instrument(options)
    api = SmartSEMApi(instrument)
    code = api.InitialiseRemoting()
    if code != 0:
        raise RuntimeError(f"the SmartSEM look-alike refused InitialiseRemoting ({code})")
    return SmartSEMBackend(api, fault_switch=_fault_switch(instrument), frame_dir=Path(options.sim_state) / "frames",
                           probes=tuple(FIB_PROBES), serial=f"sim-{options.sim_seed}")


def _sim_autoscript(options: BackendOptions) -> Backend:
    from clemflow.drivers.fibsem.autoscript import AutoScriptBackend
    from clemflow.simulators.fibsem import autoscript as lookalike

    instrument = _instrument(options)
    microscope = lookalike.SdbMicroscopeClient(instrument)
    microscope.connect("localhost")
    return AutoScriptBackend(microscope, fault_switch=_fault_switch(instrument), structures=lookalike)
