"""Live QC: each slice measured as it arrives and compared with what the run has looked like so far.

Every judgement that is not an absolute protocol limit is relative to a
running robust baseline: the median (and median absolute deviation) of the
last good values of that measure. Each measure is kept from the faults that
move it (sharpness from defocused slices, brightness and contrast from
charged ones, the slice-to-slice change from any pair with a faulty slice or
an event), so a fault does not teach the monitor that faulty is normal,
while the others keep following the tissue. Baselines are short (8 slices
for levels, 12 for the change): faults are sudden, the tissue's own drift
of these measures is slow (a slow loss of focus is FocusWatch's job in the
slice-and-view engine, which holds a fixed reference between autofocus runs).

Brightness and contrast are judged as chains of ratios between neighbours
over the place both show (:func:`metrics.compare`): the sum of their logs is
the detector's level and gain against the first slice, which an organelle
entering the field or a drift jump does not move, while charging does.

The aligner is cross-checked: a jump it reports but that the images do not
bear out (the slice matches the previous one better unmoved, or badly at the
jump too) is said as a doubtful registration ("low_confidence"), not as a
drift jump.

Faults come in two kinds. A lasting condition (defocus, charging,
curtaining, low correlation or confidence) is said once at its onset, again
every ``REPEAT_EVERY`` slices while it lasts, and once more (level "info")
when it has cleared for ``CLEAR_AFTER`` slices: a day-long run must not
drown the operator in one alert per slice. It holds until its measure is
back inside ``HOLD`` of the limit (hysteresis). An event (drift jump,
duplicated or missing slice) belongs to one slice and is said at that slice.
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
                            "sharpness", "snr", "brightness", "contrast", "brightness_change", "contrast_change",
                            "stripes")  # what SliceQC.metrics holds
LASTING = ("defocus", "charging", "curtaining", "low_ncc", "low_confidence")

# Constants the protocol (LiveQC) does not carry yet.
BASELINE_SLICES = 25  # good slices the running baseline remembers
MIN_BASELINE = 5  # good slices needed before relative judgements start
REPEAT_EVERY = 50  # slices between reminders of a lasting fault; a relative one (defocus, charging) is then taken
# as the new reference instead: after that long it is the run's state, and a baseline must not stay frozen forever
CLEAR_AFTER = 2  # consecutive good slices before a lasting fault counts as cleared
HOLD = 0.8  # once on, a lasting condition holds until its value is back within this fraction of its limit
MAX_CONTRAST_CHANGE = 0.25  # relative change of the signal SD that counts as charging
JUMP_MIN_PX = 5.0  # a step below this is never a drift jump
JUMP_MADS = 10.0  # ... nor one within this many robust SDs of the usual step
DUPLICATE_CHANGE_RATIO = 0.3  # content change below this fraction of the usual one: the same depth imaged again
MISSING_CHANGE_RATIO = 2.5  # content change above this multiple of the usual one: a depth skipped
CHANGE_FLOOR = 0.003  # content change too small to judge a ratio of (estimation noise of the change measure)
CHANGE_SLICES = 12  # the usual change is taken over fewer slices: it follows the tissue more closely
MIN_CHANGE_BASELINE = 8  # ... and needs more of them first (it varies from slice to slice more than the rest)
LEVEL_SLICES = 8  # so are sharpness, brightness and contrast: faults are sudden, the tissue's own change is slow
MIN_CONFIDENCE = 6.0  # peak-to-sidelobe ratio of the coarse registration (as Alignment.min_confidence)

_MAD_TO_SD = 1.4826
_REFERENCED = {"defocus": ("sharpness",), "charging": ("brightness_chain", "contrast_chain")}  # judged by baselines


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
        self._chain_b = self._chain_c = 0.0  # log brightness and contrast against the first slice, same place
        self.factor: int | None = None

    def _baseline(self, name: str) -> _Baseline:
        if name not in self._base:
            size = {"change": CHANGE_SLICES, "change2": CHANGE_SLICES, "brightness_chain": LEVEL_SLICES,
                    "contrast_chain": LEVEL_SLICES, "sharpness": LEVEL_SLICES}.get(name, BASELINE_SLICES)
            self._base[name] = _Baseline(size, MIN_CHANGE_BASELINE if name.startswith("change") else MIN_BASELINE)
        return self._base[name]

    # ----------------------------------------------------------------- measuring
    def measure(self, index: int, image: ArrayLike, coarse: CoarseShift | None = None
                ) -> tuple[m.Prepared, dict[str, float], m.Comparison | None]:
        """The measures of one slice against the slices held (no judgement, no state change); also the
        comparison with the previous slice (None for the first)."""
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
            "contrast": m.contrast(prep), "brightness_change": nan, "contrast_change": nan,
            "stripes": m.stripe_energy(prep),
        }
        comparison = None
        if self._recent:
            _, p1, sx1, sy1, _ = self._recent[-1]
            vals["ncc"] = m.neighbour_ncc(p1, prep, sx, sy)
            comparison = m.compare(p1, prep, sx, sy)
            vals["change"] = 1.0 - comparison.similarity
            if len(self._recent) == 2:
                _, p2, _, _, _ = self._recent[0]
                vals["ncc2"] = m.neighbour_ncc(p2, prep, sx + sx1, sy + sy1)
                vals["change2"] = 1.0 - m.similarity(p2, prep, sx + sx1, sy + sy1)
        return prep, vals, comparison

    # ----------------------------------------------------------------- judging
    def add(self, index: int, image: ArrayLike, coarse: CoarseShift | None = None) -> SliceQC:
        """Measure slice ``index`` (with its coarse shift against the previous slice) and judge it."""
        prev_index = self._recent[-1][0] if self._recent else None
        if prev_index is not None and index <= prev_index:
            raise ValueError(f"slice {index} arrived after slice {prev_index}: QC needs slices in acquisition order")
        prep, vals, comparison = self.measure(index, image, coarse)

        # a jump the aligner reports but the images deny: compare again where the slice was
        events: list[QCAlert] = []
        jump = self._jump(index, vals)
        step = (vals["step_dx"], vals["step_dy"])
        if jump is not None and self._recent:
            again = self._jump_contradicted(index, prep, vals, coarse, events)
            if again is not None:
                comparison, unmoved = again
                jump = None
                if unmoved:
                    step = (0.0, 0.0)
        self._advance_chains(comparison, vals)

        defocus = self._defocus(index, vals)
        found: dict[str, _Finding] = {
            "defocus": defocus,
            "charging": self._charging(index, vals, blurred=defocus.active),
            "curtaining": self._curtaining(index, vals),
        }
        own = {k for k, f in found.items() if f.active}
        prev_faulty = bool(self._recent and self._recent[-1][4])

        # events between this slice and the previous one
        if jump is not None:
            events.append(jump)
        if prev_index is not None and index > prev_index + 1:
            n = index - prev_index - 1
            events.append(QCAlert(index, "missing", "warning",
                                  f"slice {index}: {n} slice number(s) skipped after slice {prev_index} - "
                                  "check the acquisition and the slice files", float(n), 0.0))
        elif not own and not prev_faulty and jump is None:
            events.extend(self._depth_events(index, vals))

        # the generic ones, only when nothing more specific explains them
        specific = bool(own or events)
        found["low_ncc"] = self._low_ncc(index, vals, specific)
        found["low_confidence"] = self._low_confidence(index, vals, coarse, prev_index is None or specific)
        alerts = events + self._lasting_alerts(index, found)
        self._learn(vals, own, bool(events), prev_faulty)
        self._recent.append((index, prep, step[0], step[1], bool(own or events)))
        return SliceQC(index, vals, alerts)

    def _holding(self, kind: str, onset: bool, hold: bool) -> bool:
        """Whether a lasting condition is on: its onset test, or once on, the looser hold test (hysteresis, so
        that a value hovering at the limit is said once, not on and off)."""
        return onset or (kind in self._lasting and hold)

    def _defocus(self, index: int, vals: dict[str, float]) -> _Finding:
        thr = self.settings.min_sharpness_ratio
        b = self._baseline("sharpness")
        if not b.ready or b.median() <= 0:
            return _Finding()
        ratio = vals["sharpness"] / b.median()
        active = self._holding("defocus", ratio < thr, ratio < 1 - HOLD * (1 - thr))
        return _Finding(active, ratio, thr, f"slice {index}: focus lost, sharpness {ratio:.0%} of the running median "
                                            f"(alert below {thr:.0%}) - check autofocus / working distance")

    def _advance_chains(self, comparison: m.Comparison | None, vals: dict[str, float]) -> None:
        """Brightness and contrast as chains of slice-to-slice ratios of the same place: their logs add up to
        the detector's level and gain against the first slice, free of what the tissue does to the frame."""
        if comparison is not None:
            if math.isfinite(comparison.level) and comparison.level > 0:
                self._chain_b += math.log(comparison.level)
            if math.isfinite(comparison.gain) and comparison.gain > 0:
                self._chain_c += math.log(comparison.gain)
        for name, chain, key in (("brightness_chain", self._chain_b, "brightness_change"),
                                 ("contrast_chain", self._chain_c, "contrast_change")):
            b = self._baseline(name)
            vals[key] = math.expm1(chain - b.median()) if b.ready else float("nan")

    def _charging(self, index: int, vals: dict[str, float], blurred: bool) -> _Finding:
        """Brightness or contrast off the reference; a defocused slice is judged on brightness only (blur lowers
        the contrast as well, and the defocus alert already explains that)."""
        thr_b, thr_c = self.settings.max_brightness_drift, MAX_CONTRAST_CHANGE
        db, dc = vals["brightness_change"], vals["contrast_change"]
        if blurred:
            dc = 0.0
        if not (math.isfinite(db) and math.isfinite(dc)):
            return _Finding()
        active = self._holding("charging", abs(db) > thr_b or abs(dc) > thr_c,
                               abs(db) > HOLD * thr_b or abs(dc) > HOLD * thr_c)
        what, value, thr = ("brightness", db, thr_b) if abs(db) / thr_b >= abs(dc) / thr_c else ("contrast", dc, thr_c)
        return _Finding(active, value, thr, f"slice {index}: {what} {value:+.0%} against the slices before, same "
                                            f"place (alert beyond {thr:.0%}) - charging? check the face, dose and "
                                            "detector settings")

    def _curtaining(self, index: int, vals: dict[str, float]) -> _Finding:
        thr = self.settings.max_stripe_energy
        v = vals["stripes"]
        active = self._holding("curtaining", v > thr, v > HOLD * thr)
        return _Finding(active, v, thr, f"slice {index}: curtaining, {v:.0%} of the image in vertical stripes (alert "
                                        f"above {thr:.0%}) - check the FIB current and the protective coating; "
                                        "consider a polish")

    def _low_ncc(self, index: int, vals: dict[str, float], explained: bool) -> _Finding:
        thr = self.settings.min_neighbour_ncc
        v = vals["ncc"]
        if explained or not math.isfinite(v):
            return _Finding()
        active = self._holding("low_ncc", v < thr, v < thr + (1 - HOLD) * (1 - thr))
        return _Finding(active, v, thr, f"slice {index}: correlation with the previous slice {v:.2f} (alert below "
                                        f"{thr:.2f}) - the slices do not match; check image quality and alignment")

    def _low_confidence(self, index: int, vals: dict[str, float], coarse: CoarseShift | None,
                        explained: bool) -> _Finding:
        if coarse is None or explained:
            return _Finding()
        conf = vals["confidence"]
        how = f", fallback: {coarse.fallback}" if coarse.fallback else ""
        return _Finding(conf < MIN_CONFIDENCE or coarse.fallback == "kept", conf, MIN_CONFIDENCE,
                        f"slice {index}: its shift against the previous slice is uncertain (PSR {conf:.1f}, trusted "
                        f"from {MIN_CONFIDENCE:.0f}{how}) - check for a blank or damaged slice")

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

    def _jump_contradicted(self, index: int, prep: m.Prepared, vals: dict[str, float], coarse: CoarseShift | None,
                           events: list[QCAlert]) -> tuple[m.Comparison, bool] | None:
        """A reported jump that the images do not bear out: the slice matches the previous one better where it
        was, or matches it badly at the jump too (more change than a skipped slice). Then the registration was
        fooled or could not work (say so) and the better comparison is returned, with whether that is the one
        without the jump; else None."""
        p1 = self._recent[-1][1]
        still = m.compare(p1, prep, 0.0, 0.0)
        b = self._baseline("change")
        poor = b.ready and vals["change"] > MISSING_CHANGE_RATIO * (b.median() + CHANGE_FLOOR)
        unmoved = 1.0 - still.similarity < vals["change"]
        if not (unmoved or poor):
            return None
        conf = f" (PSR {coarse.confidence:.0f})" if coarse is not None else ""
        why = ("the slice matches the previous one better unmoved - the aligner was fooled" if unmoved else
               "the slice does not match the previous one there either - a damaged or skipped slice?")
        events.append(QCAlert(index, "low_confidence", "warning",
                              f"slice {index}: the registration reports a jump of {vals['step']:.1f} px{conf}, but "
                              f"{why}; check this slice's alignment", vals["step"], 1.0 - still.similarity))
        if not unmoved:
            return m.compare(p1, prep, vals["step_dx"], vals["step_dy"]), False
        vals["change"] = 1.0 - still.similarity
        vals["ncc"] = m.neighbour_ncc(p1, prep, 0.0, 0.0)
        return still, True

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

    def _lasting_alerts(self, index: int, found: dict[str, _Finding]) -> list[QCAlert]:
        out: list[QCAlert] = []
        for kind in LASTING:
            f = found.get(kind, _Finding())
            state = self._lasting.get(kind)
            if f.active:
                if state is None:
                    self._lasting[kind] = _Lasting(index, index)
                    out.append(QCAlert(index, kind, "warning", f.message, f.value, f.threshold))
                else:
                    state.good_run = 0
                    if index - state.last_said >= REPEAT_EVERY:
                        state.last_said = index
                        lasting = f"{f.message} (for {index - state.since + 1} slices now"
                        if kind in _REFERENCED:
                            del self._lasting[kind]
                            for name in _REFERENCED[kind]:
                                self._base.pop(name, None)
                            lasting += "; taken as the new reference from here"
                        out.append(QCAlert(index, kind, "warning", lasting + ")", f.value, f.threshold))
            elif state is not None:
                state.good_run += 1
                if state.good_run >= CLEAR_AFTER:
                    del self._lasting[kind]
                    out.append(QCAlert(index, kind, "info", f"slice {index}: {kind.replace('_', ' ')} cleared "
                                                            f"(since slice {state.since})", f.value, f.threshold))
        return out

    def _learn(self, vals: dict[str, float], own: set[str], event: bool, prev_faulty: bool) -> None:
        """Good values into the baselines, each measure kept from the faults that move it."""
        levels = {"sharpness": vals["sharpness"], "brightness_chain": self._chain_b, "contrast_chain": self._chain_c}
        for kind, names in _REFERENCED.items():
            if kind not in own:
                for name in names:
                    if not (name == "contrast_chain" and "defocus" in own):  # a blur lowers the contrast too
                        self._baseline(name).add(levels[name])
        if own or event or prev_faulty:
            return  # comparisons with a faulty slice say nothing about the usual step
        self._baseline("step").add(vals["step"])
        self._baseline("change").add(vals["change"])
        if not (len(self._recent) == 2 and self._recent[0][4]):
            self._baseline("change2").add(vals["change2"])


@dataclass(frozen=True)
class _Finding:
    """One lasting condition judged on one slice."""

    active: bool = False
    value: float = float("nan")
    threshold: float = float("nan")
    message: str = ""


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _jsonable(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
