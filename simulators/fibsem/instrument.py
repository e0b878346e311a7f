"""The one simulated FIB-SEM both vendor look-alikes wrap: state, persistence, settings, sites.

    inst = SimulatedFibSem(state_dir)                  # full default specimen, built at first image
    inst = SimulatedFibSem.small(state_dir, time_scale=0)  # 1 square, 5 cells: quick for tests
    inst.set_beam("electron", working_distance_m=5.1e-3)
    img, meta = inst.grab("electron", 1024, 768, dwell_s=1e-6, line_averaging=2)
    report = inst.mill([{"kind": "rectangle", "center_m": [0, -5.5e-6], "width_m": 20e-6,
                         "height_m": 1e-6, "depth_m": 8e-6}], current_a=700e-12)
    inst.faults.set("beam_trip", True, beam="ion")

The long actions (``grab``, ``mill``, ``move_stage``, ``autofunction``) live in
:mod:`.actions`. Geometry: the stage (x, y) in metres x 1e6 is the specimen's
EM block frame in µm (what ``world.to_em`` gives). Sites, faces and images are
described in :mod:`.milling` and :mod:`.imaging`.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..specimen import SpecimenParams, generate_world
from ..specimen.em import EMImperfections
from .actions import Actions
from .drift import SimDrift, drift_config
from .errors import BeamOff, Interlock, OutOfRange
from .faults import FaultPanel
from .milling import read_mill_log
from .state import BEAMS, DETECTORS, LIMITS, SITE_RADIUS_UM, Site, load_state, save_state
from .timing import Waiter

__all__ = ["SMALL_WORLD", "SimulatedFibSem"]

SMALL_WORLD = SpecimenParams(n_columns=1, n_rows=1, cells_per_square=5)
DEFAULT_WORLD = SpecimenParams(hours_since_treatment=24.0)
STATE_FILE = "instrument.json"

_BEAM_KEYS = {
    "voltage_v": "voltage_v",
    "current_a": "current_a",
    "working_distance_m": "working_distance_m",
    "horizontal_field_width_m": "hfw_m",
    "hfw_m": "hfw_m",
    "stigmation": "stigmation",
    "beam_shift_m": "beam_shift_m",
    "scan_rotation_deg": "scan_rotation_deg",
    "detector": "detector",
    "brightness": "brightness",
    "contrast": "contrast",
    "blanked": "blanked",
    "on": "on",
}


def check_range(field: str, value: float, limits: tuple[float, float]) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise OutOfRange(f"{field}: {value!r} is not a number", field=field, limits=limits) from e
    if not (limits[0] <= v <= limits[1]):
        raise OutOfRange(f"{field} {v:g} outside {limits[0]:g}..{limits[1]:g}", field=field, limits=limits)
    return v


class SimulatedFibSem(Actions):
    """One simulated Crossbeam-like FIB-SEM whose state lives in ``state_dir``.

    ``world``: a ready specimen (``generate_world(...)``); else one is generated from ``world_params``
    (default ``SpecimenParams(hours_since_treatment=24.0)``, about 2 s, plus about 3 s to prepare the
    first face) and ``world_seed`` at the first image. ``time_scale``: instrument seconds per real second
    (0 or ``inf``: no waiting). ``seed``: noise, drift and the true stigmation. ``em_imperfections``:
    the electron images' imperfections (default: drift on). Drift of the electron image per mill counter:
    ``drift_step_nm`` (random-walk SD), ``drift_jump_probability`` / ``drift_jump_nm`` (``None``: the
    renderer's 3 nm, 0.01, 150 nm) plus a steady ``drift_nm_per_slice`` (x, y) (see :mod:`.drift`).
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        world: Any = None,
        world_params: SpecimenParams | None = None,
        world_seed: int = 0,
        time_scale: float = 1.0,
        seed: int = 0,
        em_imperfections: EMImperfections | None = None,
        drift_step_nm: float | None = None,
        drift_nm_per_slice: tuple[float, float] = (0.0, 0.0),
        drift_jump_probability: float | None = None,
        drift_jump_nm: float | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._world_lock = threading.Lock()
        self._world = world
        self.world_params = world_params or DEFAULT_WORLD
        self.world_seed = int(world_seed)
        self.world_build_s: float | None = None
        self.waiter = Waiter(time_scale)
        self.seed = int(seed)
        self.faults = FaultPanel()
        imp = em_imperfections if em_imperfections is not None else EMImperfections(drift=True)
        self.em_imperfections = drift_config(imp, step_nm=drift_step_nm, per_slice_nm=tuple(drift_nm_per_slice),
                                             jump_probability=drift_jump_probability, jump_nm=drift_jump_nm)
        cfg = self.em_imperfections
        self.drift_model = SimDrift(self.seed, cfg.drift_step_nm, cfg.drift_jump_probability, cfg.drift_jump_nm,
                                    per_slice_nm=tuple(drift_nm_per_slice))
        rng = np.random.default_rng([self.seed, 991])
        self.stig_true = {b: (float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05))) for b in BEAMS}
        self._busy: set[str] = set()
        self._aborts: dict[str, threading.Event] = {}
        self._state = load_state(self.state_dir / STATE_FILE)
        self._reconcile_with_log()
        self._save()

    @classmethod
    def small(cls, state_dir: str | Path, **kwargs: Any) -> "SimulatedFibSem":
        """An instrument over a one-square, five-cell specimen (generated in about 0.2 s)."""
        kwargs.setdefault("world_params", SMALL_WORLD)
        return cls(state_dir, **kwargs)

    # -- world, time, persistence -------------------------------------------------------------

    @property
    def world(self) -> Any:
        """The specimen; generated on first use unless one was given."""
        with self._world_lock:
            if self._world is None:
                t0 = time.perf_counter()
                self._world = generate_world(self.world_params, seed=self.world_seed)
                self.world_build_s = time.perf_counter() - t0
            return self._world

    @property
    def time_scale(self) -> float:
        return self.waiter.time_scale

    @time_scale.setter
    def time_scale(self, value: float) -> None:
        self.waiter.time_scale = float(value)

    @property
    def limits(self) -> dict[str, Any]:
        return copy.deepcopy(LIMITS)

    def _save(self) -> None:
        with self._lock:
            save_state(self.state_dir / STATE_FILE, self._state)

    def _reconcile_with_log(self) -> None:
        """A crash between logging a mill and saving the state: the log is the truth."""
        log = read_mill_log(self.state_dir)
        if not log or int(log[-1]["index"]) <= self._state.mill_count:
            return
        last = log[-1]
        site = self._site_at(tuple(last["site_origin_um"]), create=True)
        assert site is not None
        site.face_s_um = float(last["face_after_um"])
        site.mills += 1
        self._state.mill_count = int(last["index"])

    # -- sites ------------------------------------------------------------------------------

    def _site_at(self, xy_um: tuple[float, float], create: bool) -> Site | None:
        best, dist = None, SITE_RADIUS_UM
        for s in self._state.sites:
            d = float(np.hypot(xy_um[0] - s.origin_um[0], xy_um[1] - s.origin_um[1]))
            if d <= dist:
                best, dist = s, d
        if best is None and create:
            best = Site((float(xy_um[0]), float(xy_um[1])))
            self._state.sites.append(best)
        return best

    def _current_site(self, create: bool = True) -> Site | None:
        st = self._state.stage
        return self._site_at((st.x_m * 1e6, st.y_m * 1e6), create)

    def site(self) -> dict[str, Any] | None:
        """The site under the stage (None if nothing was imaged or milled here yet)."""
        with self._lock:
            s = self._current_site(create=False)
            if s is None:
                return None
            return {"origin_um": list(s.origin_um), "face_s_um": s.face_s_um, "mills": s.mills,
                    "face_geometry": {"origin_um": list(s.origin_um), "azimuth_deg": 0.0}}

    def cell_stage_xy_m(self, index: int = 0) -> tuple[float, float]:
        """Stage (x, y) in metres over cell ``index``'s centre (block frame)."""
        cell = self.world.cells[index]
        b = self.world.to_em(np.array([[cell.center_um[0], cell.center_um[1], 0.0]]))[0]
        return float(b[0]) * 1e-6, float(b[1]) * 1e-6

    # -- reports ----------------------------------------------------------------------------

    def vacuum(self) -> dict[str, Any]:
        lost = self.faults.vacuum_lost()
        return {"ready": self._state.vacuum_ready and not lost, "chamber_pa": 30.0 if lost else self._state.chamber_pa}

    def beam_on(self, beam: str) -> bool:
        return self._state.beam(beam).on and not self.faults.tripped(beam)

    def beam_report(self, beam: str) -> dict[str, Any]:
        with self._lock:
            b = self._state.beam(beam)
            return {
                "on": self.beam_on(beam),
                "tripped": self.faults.tripped(beam),
                "blanked": b.blanked,
                "voltage_v": b.voltage_v,
                "current_a": b.current_a,
                "working_distance_m": b.working_distance_m,
                "horizontal_field_width_m": b.hfw_m,
                "stigmation": list(b.stigmation),
                "beam_shift_m": list(b.beam_shift_m),
                "scan_rotation_deg": b.scan_rotation_deg,
                "detector": b.detector,
                "detectors": list(DETECTORS[beam]),
                "brightness": b.brightness,
                "contrast": b.contrast,
            }

    def stage_report(self) -> dict[str, float]:
        with self._lock:
            s = self._state.stage
            return {"x_m": s.x_m, "y_m": s.y_m, "z_m": s.z_m, "r_deg": s.r_deg, "t_deg": s.t_deg}

    def state(self) -> dict[str, Any]:
        """Snapshot in the bridge's ``state`` shape, plus the face, counters and faults."""
        with self._lock:
            vac = self.vacuum()
            interlocks = [] if vac["ready"] else ["vacuum"]
            interlocks += [f"{b}_beam_tripped" for b in BEAMS if self.faults.tripped(b)]
            return {
                "vacuum": vac,
                "beams": {b: self.beam_report(b) for b in BEAMS},
                "stage": self.stage_report(),
                "interlocks": interlocks,
                "busy": sorted(self._busy),
                "site": self.site(),
                "mill_count": self._state.mill_count,
                "frame_count": self._state.frame_count,
                "faults": self.faults.state(),
                "time": time.time(),
            }

    # -- settings ---------------------------------------------------------------------------

    def set_beam(self, beam: str, **changes: Any) -> dict[str, Any]:
        """Change beam settings (keys of ``beam_report``; ``hfw_m`` = ``horizontal_field_width_m``).

        All values are checked before any is applied (:class:`OutOfRange` names the field). Turning a beam
        on or unblanking it is refused while the vacuum is not ready (:class:`Interlock`); turning on a
        tripped beam raises :class:`BeamOff`. Returns the beam's report.
        """
        lim = LIMITS[beam] if beam in BEAMS else None
        if lim is None:
            raise ValueError(f"unknown beam {beam!r}: use 'electron' or 'ion'")
        unknown = set(changes) - set(_BEAM_KEYS)
        if unknown:
            raise TypeError(f"unknown beam setting(s) {sorted(unknown)}")
        new: dict[str, Any] = {}
        for key, value in changes.items():
            if value is None:
                continue
            attr = _BEAM_KEYS[key]
            if attr in ("voltage_v", "current_a", "working_distance_m"):
                new[attr] = check_range(key, value, lim[attr])
            elif attr == "hfw_m":
                new[attr] = check_range(key, value, lim["hfw_m"])
            elif attr in ("stigmation", "beam_shift_m"):
                lk = "stigmation" if attr == "stigmation" else "beam_shift_m"
                x, y = value
                new[attr] = (check_range(f"{key}[0]", x, lim[lk]), check_range(f"{key}[1]", y, lim[lk]))
            elif attr == "scan_rotation_deg":
                new[attr] = check_range(key, value, (-360.0, 360.0)) % 360.0
            elif attr == "detector":
                if value not in DETECTORS[beam]:
                    raise OutOfRange(f"detector {value!r} not one of {DETECTORS[beam]}", field=key,
                                     limits=DETECTORS[beam])
                new[attr] = str(value)
            elif attr in ("brightness", "contrast"):
                new[attr] = check_range(key, value, (0.0, 1.0))
            else:
                new[attr] = bool(value)
        with self._lock:
            b = self._state.beam(beam)
            if (new.get("on") and not b.on) or (new.get("blanked") is False and b.blanked):
                if not self.vacuum()["ready"]:
                    raise Interlock("vacuum not ready: beam cannot be switched on or unblanked")
            if new.get("on") and self.faults.tripped(beam):
                raise BeamOff(f"{beam} beam is tripped", beam=beam)
            for attr, v in new.items():
                setattr(b, attr, v)
            self._save()
        return self.beam_report(beam)

    def estimate_mill(self, patterns: Any, current_a: float | None = None,
                      voltage_v: float | None = None) -> dict[str, Any]:
        """What ``mill`` would do here, without doing it: expected time and face movement."""
        from .milling import normalise_patterns, plan_mill

        with self._lock:
            ion = self._state.ion
            lim = LIMITS["ion"]
            cur = check_range("current_a", ion.current_a if current_a is None else current_a, lim["current_a"])
            kv = check_range("voltage_v", ion.voltage_v if voltage_v is None else voltage_v, lim["voltage_v"])
            pats = normalise_patterns(patterns, ion.hfw_m)
            st = self._state.stage
            site = self._current_site(create=False) or Site((st.x_m * 1e6, st.y_m * 1e6))
            center = (st.x_m * 1e6 + ion.beam_shift_m[0] * 1e6, st.y_m * 1e6 + ion.beam_shift_m[1] * 1e6)
            plan = plan_mill(site, pats, center, cur, kv)
        return {"expected_s": plan.duration_s, "face_before_um": plan.face_before_um,
                "face_after_um": plan.face_after_um, "removed_um": plan.removed_um, "roles": plan.roles}

    def abort(self, what: str = "all") -> None:
        """Stop running actions: ``mill``, ``scan`` (any beam), ``scan:electron``, ``scan:ion``, ``stage``,
        ``auto`` or ``all``. A stopped action raises :class:`Aborted` in its caller."""
        with self._lock:
            for token, ev in self._aborts.items():
                if what == "all" or token == what or token.startswith(what + ":"):
                    ev.set()

    def busy(self) -> set[str]:
        with self._lock:
            return set(self._busy)
