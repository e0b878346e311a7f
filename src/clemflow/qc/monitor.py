"""Live QC: each slice measured as it arrives and compared with what the run has looked like so far.

Every judgement that is not an absolute protocol limit is relative to a
running robust baseline: the median (and median absolute deviation) of the
last ``BASELINE_SLICES`` *good* slices. A slice that raised an alert, or
that a lasting fault is active on, does not enter the baseline, so a fault
does not teach the monitor that faulty is normal; comparisons between two
slices enter only when both were good.

Faults come in two kinds. A lasting condition (defocus, charging,
curtaining, low correlation or confidence) is said once at its onset, again
every ``REPEAT_EVERY`` slices while it lasts, and once more (level "info")
when it has cleared for ``CLEAR_AFTER`` slices: a day-long run must not
drown the operator in one alert per slice. An event (drift jump, duplicated
or missing slice) belongs to one slice and is said at that slice.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from ..align.transforms import CoarseShift
from ..protocol.analysis import LiveQC
from . import metrics as m

__all__ = ["ALERT_KINDS", "METRICS", "QCAlert", "QCMonitor", "SliceQC"]

AlertKind = Literal["defocus", "charging", "curtaining", "drift_jump", "duplicate", "missing", "low_ncc",
                    "low_confidence"]
ALERT_KINDS: tuple[str, ...] = ("defocus", "charging", "curtaining", "drift_jump", "duplicate", "missing", "low_ncc",
                                "low_confidence")
METRICS: tuple[str, ...] = ("ncc", "ncc2", "change", "change2", "step", "step_dx", "step_dy", "confidence",
                            "sharpness", "snr", "brightness", "contrast", "stripes")  # what SliceQC.metrics holds
LASTING = ("defocus", "charging", "curtaining", "low_ncc", "low_confidence")

# Constants the protocol (LiveQC) does not carry yet.
BASELINE_SLICES = 25  # good slices the running baseline remembers
MIN_BASELINE = 5  # good slices needed before relative judgements start
REPEAT_EVERY = 50  # slices between reminders of a lasting fault
CLEAR_AFTER = 2  # consecutive good slices before a lasting fault counts as cleared
MAX_CONTRAST_CHANGE = 0.25  # relative change of the signal SD that counts as charging
JUMP_MIN_PX = 5.0  # a step below this is never a drift jump
JUMP_MADS = 10.0  # ... nor one within this many robust SDs of the usual step
DUPLICATE_CHANGE_RATIO = 0.3  # content change below this fraction of the usual one: the same depth imaged again
MISSING_CHANGE_RATIO = 2.2  # content change above this multiple of the usual one: a depth skipped
CHANGE_FLOOR = 0.003  # content change too small to judge a ratio of (estimation noise of the change measure)
CHANGE_SLICES = 12  # the usual change is taken over fewer slices: it follows the tissue more closely
MIN_CHANGE_BASELINE = 8  # ... and needs more of them first (it varies from slice to slice more than the rest)
LEVEL_SLICES = 8  # so are brightness and contrast: charging is a sudden change, the tissue's own is slow
MIN_CONFIDENCE = 6.0  # peak-to-sidelobe ratio of the coarse registration (as Alignment.min_confidence)

_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class QCAlert:
    """One thing the operator should know about one slice."""

    index: int
    kind: str
    level: Literal["info", "warning", "critical"]
    message: str
    value: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {"slice": self.index, "kind": self.kind, "level": self.level, "message": self.message,
                "value": _jsonable(self.value), "threshold": _jsonable(self.threshold)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QCAlert":
        return cls(int(d["slice"]), str(d["kind"]), d.get("level", "warning"), str(d.get("message", "")),
                   _float(d.get("value")), _float(d.get("threshold")))


@dataclass
class SliceQC:
    """The measures of one slice and what they raised."""

    index: int
    metrics: dict[str, float]
    alerts: list[QCAlert] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        """Kinds of the warnings and critical alerts (not the "cleared" notes)."""
        return [a.kind for a in self.alerts if a.level != "info"]


@dataclass
class _Lasting:
    since: int
    last_said: int
    good_run: int = 0


class _Baseline:
    """Median and robust SD of the last good values of one measure."""

    def __init__(self, size: int, needed: int = MIN_BASELINE) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.needed = needed

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(float(value))

    @property
    def ready(self) -> bool:
        return len(self.values) >= self.needed

    def median(self) -> float:
        return float(np.median(self.values))

    def sd(self) -> float:
        v = np.asarray(self.values)
        return _MAD_TO_SD * float(np.median(np.abs(v - np.median(v))))


class QCMonitor:
    """Measures each slice against its predecessors and the run's baseline; ``add`` answers at once.

    Slices must arrive in acquisition order. A gap in the indices is itself
    reported as a missing slice. To resume a run, feed the last
    ``BASELINE_SLICES`` slices again and drop what they return.
    """

    def __init__(self, settings: LiveQC | None = None) -> None:
        self.settings = settings or LiveQC()
        self._recent: deque[tuple[int, m.Prepared, float, float, bool]] = deque(maxlen=2)  # index, prep, step, faulty
        self._base: dict[str, _Baseline] = {}
        self._lasting: dict[str, _Lasting] = {}
        self.factor: int | None = None

    def _baseline(self, name: str) -> _Baseline:
        if name not in self._base:
            size = {"change": CHANGE_SLICES, "change2": CHANGE_SLICES, "brightness": LEVEL_SLICES,
                    "contrast": LEVEL_SLICES}.get(name, BASELINE_SLICES)
            self._base[name] = _Baseline(size, MIN_CHANGE_BASELINE if name.startswith("change") else MIN_BASELINE)
        return self._base[name]

    # ----------------------------------------------------------------- measuring
    def measure(self, index: int, image: ArrayLike, coarse: CoarseShift | None = None) -> tuple[m.Prepared, dict[str, float]]:
        """The measures of one slice against the slices held (no judgement, no state change)."""
        a = np.asarray(image)
        if self.factor is None:
            self.factor = m.auto_factor(a.shape)
        prep = m.prepare(a, self.factor)
        if self._recent and prep.binned.shape != self._recent[-1][1].binned.shape:
            raise ValueError(f"slice {index} has shape {a.shape}, unlike the slices before it: "
                             "a stack must keep one frame size")
        sx, sy = (coarse.step_dx, coarse.step_dy) if coarse is not None else (0.0, 0.0)
        nan = float("nan")
        vals: dict[str, float] = {
            "step_dx": float(sx), "step_dy": float(sy), "step": float(math.hypot(sx, sy)),
            "confidence": float(coarse.confidence) if coarse is not None else nan,
            "ncc": nan, "ncc2": nan, "change": nan, "change2": nan,
            "sharpness": prep.sharpness, "snr": m.snr(prep), "brightness": m.brightness(prep),
            "contrast": m.contrast(prep), "stripes": m.stripe_energy(prep),
        }
        if self._recent:
            _, p1, sx1, sy1, _ = self._recent[-1]
            vals["ncc"] = m.neighbour_ncc(p1, prep, sx, sy)
            vals["change"] = 1.0 - m.similarity(p1, prep, sx, sy)
            if len(self._recent) == 2:
                _, p2, _, _, _ = self._recent[0]
                vals["ncc2"] = m.neighbour_ncc(p2, prep, sx + sx1, sy + sy1)
                vals["change2"] = 1.0 - m.similarity(p2, prep, sx + sx1, sy + sy1)
        return prep, vals

    # ----------------------------------------------------------------- judging
    def add(self, index: int, image: ArrayLike, coarse: CoarseShift | None = None) -> SliceQC:
        """Measure slice ``index`` (with its coarse shift against the previous slice) and judge it."""
        prev_index = self._recent[-1][0] if self._recent else None
        if prev_index is not None and index <= prev_index:
            raise ValueError(f"slice {index} arrived after slice {prev_index}: QC needs slices in acquisition order")
        prep, vals = self.measure(index, image, coarse)
        s = self.settings
        found: dict[str, tuple[bool, float, float, str]] = {}  # kind -> (active, value, threshold, message)

        # lasting conditions of the slice itself
        b = self._baseline("sharpness")
        if b.ready and b.median() > 0:
            ratio = vals["sharpness"] / b.median()
            found["defocus"] = (ratio < s.min_sharpness_ratio, ratio, s.min_sharpness_ratio,
                                f"slice {index}: focus lost, sharpness {ratio:.0%} of the running median "
                                f"(alert below {s.min_sharpness_ratio:.0%}) - check autofocus / working distance")
        found["charging"] = self._charging(index, vals)
        found["curtaining"] = (vals["stripes"] > s.max_stripe_energy, vals["stripes"], s.max_stripe_energy,
                               f"slice {index}: curtaining, {vals['stripes']:.0%} of the image in vertical stripes "
                               f"(alert above {s.max_stripe_energy:.0%}) - check the FIB current and the protective "
                               "coating; consider a polish")
        own_fault = any(found.get(k, (False,))[0] for k in ("defocus", "charging", "curtaining"))
        prev_fault = bool(self._recent and self._recent[-1][4])
        comparable = not own_fault and not prev_fault

        # events between this slice and the previous ones
        events: list[QCAlert] = []
        jump = self._jump(index, vals)
        if jump is not None:
            events.append(jump)
        if prev_index is not None and index > prev_index + 1:
            n = index - prev_index - 1
            events.append(QCAlert(index, "missing", "warning",
                                  f"slice {index}: {n} slice number(s) skipped after slice {prev_index} - "
                                  "check the acquisition and the slice files", float(n), 0.0))
        elif comparable and jump is None:
            events.extend(self._depth_events(index, vals))

        # the generic ones, only when nothing more specific explains them
        specific = own_fault or bool(events)
        ncc = vals["ncc"]
        found["low_ncc"] = (not specific and math.isfinite(ncc) and ncc < s.min_neighbour_ncc, ncc,
                            s.min_neighbour_ncc,
                            f"slice {index}: correlation with the previous slice {ncc:.2f} (alert below "
                            f"{s.min_neighbour_ncc:.2f}) - the slices do not match; check image quality and alignment")
        conf = vals["confidence"]
        unsure = coarse is not None and prev_index is not None and (conf < MIN_CONFIDENCE or coarse.fallback == "kept")
        how = f", fallback: {coarse.fallback}" if coarse is not None and coarse.fallback else ""
        found["low_confidence"] = (unsure and jump is None, conf, MIN_CONFIDENCE,
                                   f"slice {index}: its shift against the previous slice is uncertain (PSR {conf:.1f}, "
                                   f"trusted from {MIN_CONFIDENCE:.0f}{how}) - check for a blank or damaged slice")

        alerts = events + self._lasting_alerts(index, found)
        self._learn(index, prep, vals, alerts, own_fault, prev_fault)
        return SliceQC(index, vals, alerts)

    def _charging(self, index: int, vals: dict[str, float]) -> tuple[bool, float, float, str]:
        s = self.settings
        bb, bc = self._baseline("brightness"), self._baseline("contrast")
        if not (bb.ready and bc.ready) or bb.median() <= 0 or bc.median() <= 0:
            return (False, float("nan"), s.max_brightness_drift, "")
        db = vals["brightness"] / bb.median() - 1.0
        dc = vals["contrast"] / bc.median() - 1.0
        if abs(db) / s.max_brightness_drift >= abs(dc) / MAX_CONTRAST_CHANGE:
            return (abs(db) > s.max_brightness_drift, db, s.max_brightness_drift,
                    f"slice {index}: brightness {db:+.0%} against the running median (alert beyond "
                    f"{s.max_brightness_drift:.0%}) - charging? check the face, dose and detector settings")
        return (abs(dc) > MAX_CONTRAST_CHANGE, dc, MAX_CONTRAST_CHANGE,
                f"slice {index}: contrast {dc:+.0%} against the running median (alert beyond "
                f"{MAX_CONTRAST_CHANGE:.0%}) - charging? check the face, dose and detector settings")

    def _jump(self, index: int, vals: dict[str, float]) -> QCAlert | None:
        s = self.settings
        step = vals["step"]
        b = self._baseline("step")
        limit = s.max_shift_px
        if b.ready:
            limit = min(limit, max(JUMP_MIN_PX, b.median() + JUMP_MADS * b.sd()))
        if not step > limit:
            return None
        level: Literal["warning", "critical"] = "critical" if step > s.max_shift_px else "warning"
        usual = f", usual step {b.median():.1f} px" if b.ready else ""
        return QCAlert(index, "drift_jump", level,
                       f"slice {index}: the image jumped {step:.1f} px (dx {vals['step_dx']:+.1f}, dy "
                       f"{vals['step_dy']:+.1f}) against the previous slice{usual} - stage or beam jump; check "
                       "the stage, the beam shift and the fiducial", step, limit)

    def _depth_events(self, index: int, vals: dict[str, float]) -> list[QCAlert]:
        b = self._baseline("change")
        change = vals["change"]
        if not (b.ready and math.isfinite(change)) or b.median() <= 0:
            return []
        usual = b.median()
        if change < DUPLICATE_CHANGE_RATIO * usual:
            ratio = change / usual
            return [QCAlert(index, "duplicate", "warning",
                            f"slice {index}: the same content as slice {index - 1} (change {ratio:.0%} of the usual "
                            "step) - the same depth imaged twice? check that the FIB milled", ratio,
                            DUPLICATE_CHANGE_RATIO)]
        ratio = (change + CHANGE_FLOOR) / (usual + CHANGE_FLOOR)
        if ratio > MISSING_CHANGE_RATIO:
            return [QCAlert(index, "missing", "warning",
                            f"slice {index}: content changed {ratio:.1f} x the usual step since slice {index - 1} - "
                            "a slice seems skipped (too deep a cut); check the milling step and the FIB drift",
                            ratio, MISSING_CHANGE_RATIO)]
        return []

    def _lasting_alerts(self, index: int, found: dict[str, tuple[bool, float, float, str]]) -> list[QCAlert]:
        out: list[QCAlert] = []
        for kind in LASTING:
            active, value, threshold, message = found.get(kind, (False, float("nan"), float("nan"), ""))
            state = self._lasting.get(kind)
            if active:
                if state is None:
                    self._lasting[kind] = _Lasting(index, index)
                    out.append(QCAlert(index, kind, "warning", message, value, threshold))
                else:
                    state.good_run = 0
                    if index - state.last_said >= REPEAT_EVERY:
                        state.last_said = index
                        out.append(QCAlert(index, kind, "warning",
                                           f"{message} (for {index - state.since + 1} slices now)", value, threshold))
            elif state is not None:
                state.good_run += 1
                if state.good_run >= CLEAR_AFTER:
                    del self._lasting[kind]
                    out.append(QCAlert(index, kind, "info",
                                       f"slice {index}: {kind.replace('_', ' ')} cleared (since slice {state.since})",
                                       value, threshold))
        return out

    def _learn(self, index: int, prep: m.Prepared, vals: dict[str, float], alerts: list[QCAlert], own_fault: bool,
               prev_fault: bool) -> None:
        """Good values into the baselines; the slice into the neighbour memory."""
        raised = any(a.level != "info" for a in alerts)
        pending = any(k in self._lasting for k in ("defocus", "charging", "curtaining"))
        if not own_fault and not raised and not pending:
            for name in ("sharpness", "brightness", "contrast"):
                self._baseline(name).add(vals[name])
            if not prev_fault:
                self._baseline("step").add(vals["step"])
                self._baseline("change").add(vals["change"])
                if not (self._recent and len(self._recent) == 2 and self._recent[0][4]):
                    self._baseline("change2").add(vals["change2"])
        self._recent.append((index, prep, vals["step_dx"], vals["step_dy"], own_fault or raised))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _jsonable(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
