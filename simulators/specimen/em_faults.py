"""A slice-and-view series of the simulated specimen with faults injected where the truth says.

What live QC is measured against: a run of block-face images at a fixed
field, slice after slice, with the mild imperfections every real run has
(a drift random walk, some charging, faint curtains) and, at known slices,
the faults an operator wants to hear about:

- ``defocus``: the working distance off by ``strength`` µm for a few slices
  (blur of 2.5 nm per µm: 8-14 µm is 2-3.5 px at 10 nm, plainly soft);
- ``charging``: a sudden brightness (22-35 %) and/or contrast (x 0.5-0.65 or
  1.45-1.7) change of the whole frame, for a few slices;
- ``curtaining``: vertical stripes as strong as the tissue's own contrast (SD 0.9-1.3 x the
  tissue's signal SD) from a slice on, for a stretch;
- ``drift_jump``: the field jumps by ``strength`` px (20-40) and stays there;
- ``duplicate``: the FIB did not mill, the same depth imaged again (fresh noise);
- ``missing``: a depth skipped (the cut went two slices deep).

:func:`plan_faults` spreads faults over a series with clean gaps between them;
:func:`fault_series` renders the slices one by one with their truth.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .em import DriftModel, EMImperfections, FaceGeometry, face_through, render_em_slice

__all__ = ["FAULT_KINDS", "Fault", "FaultScore", "FaultSlice", "SeriesSetup", "fault_series", "pick_field", "plan_faults",
           "score_alerts"]

FAULT_KINDS: tuple[str, ...] = ("defocus", "charging", "curtaining", "drift_jump", "duplicate", "missing")
LASTING = {"defocus": (3, 12), "charging": (1, 4), "curtaining": (8, 25)}  # kind -> slices it lasts (min, max)
BLUR_NM_PER_UM = 2.5  # defocus blur SD per µm of focus error at the renderer's default 5 mrad


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind`` from ``start`` (series position) for ``length`` slices."""

    kind: str
    start: int
    length: int = 1
    strength: float = 0.0  # defocus: focus error µm; charging: brightness change (fraction); curtaining: stripe SD
    # (in units of the tissue's signal SD); drift_jump: px; duplicate/missing: unused
    extra: float = 0.0  # charging: contrast gain; drift_jump: direction (rad)

    @property
    def end(self) -> int:
        """First slice after the fault."""
        return self.start + self.length

    def covers(self, position: int) -> bool:
        return self.start <= position < self.end


@dataclass(frozen=True)
class FaultSlice:
    """One rendered slice and its truth."""

    position: int  # acquisition index in the series
    image: NDArray[np.uint8]
    depth_um: float  # milled position of the face
    shift_px: tuple[float, float]  # (row, col) content displacement from the start, drift and jumps together
    faults: tuple[str, ...]  # kinds injected on this slice
    onsets: tuple[str, ...]  # kinds whose fault starts at this slice


@dataclass(frozen=True)
class SeriesSetup:
    """Where and how the series is imaged; the background imperfections are mild, as in a good run."""

    face: FaceGeometry = FaceGeometry()
    center_um: tuple[float, float] = (0.0, 2.0)
    pixel_size_nm: float = 10.0
    slice_nm: float = 10.0
    shape: tuple[int, int] = (256, 256)  # (W, H)
    start_depth_um: float = 0.0
    drift_step_nm: float = 5.0  # random walk SD per slice and axis
    charging_strength: float = 0.5
    curtaining_strength: float = 0.3  # the renderer's sparse, block-anchored curtains
    faint_curtains: float = 0.1  # SD of a dense, faint stripe pattern always present (x the tissue's signal SD)


def plan_faults(n_slices: int, per_kind: int, seed: int, kinds: Sequence[str] = FAULT_KINDS, lead: int = 15,
                gap: int = 8) -> list[Fault]:
    """``per_kind`` faults of each kind in random order, each followed by at least ``gap`` clean slices,
    the first after ``lead`` clean slices (the QC's baselines need them). Raises if they do not fit."""
    for k in kinds:
        if k not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {k!r}: use one of {', '.join(FAULT_KINDS)}")
    rng = np.random.default_rng([seed, 8081])
    order = [k for k in kinds for _ in range(per_kind)]
    rng.shuffle(order)
    faults: list[Fault] = []
    for kind in order:
        lo, hi = LASTING.get(kind, (1, 1))
        length = int(rng.integers(lo, hi + 1))
        if kind == "defocus":
            strength, extra = float(rng.uniform(8.0, 14.0) * rng.choice([-1, 1])), 0.0
        elif kind == "charging":
            mode = int(rng.integers(3))  # brightness, contrast, or both
            strength = float(rng.uniform(0.22, 0.35) * rng.choice([-1, 1])) if mode != 1 else 0.0
            extra = float(rng.choice([rng.uniform(0.5, 0.65), rng.uniform(1.45, 1.7)])) if mode != 0 else 1.0
        elif kind == "curtaining":
            strength, extra = float(rng.uniform(0.9, 1.3)), 0.0
        elif kind == "drift_jump":
            strength, extra = float(rng.uniform(20.0, 40.0)), float(rng.uniform(0, 2 * np.pi))
        else:
            strength, extra = 0.0, 0.0
        faults.append(Fault(kind, 0, length, strength, extra))
    needed = lead + sum(f.length + gap for f in faults)
    if needed > n_slices:
        raise ValueError(f"{len(faults)} faults need {needed} slices with their gaps; the series has {n_slices}: "
                         "lengthen the series or inject fewer faults")
    slack = n_slices - needed
    cuts = np.sort(rng.integers(0, slack + 1, len(faults)))  # spread the spare slices between the faults
    placed, pos, used = [], lead, 0
    for f, cut in zip(faults, cuts):
        pos += int(cut) - used
        used = int(cut)
        placed.append(Fault(f.kind, pos, f.length, f.strength, f.extra))
        pos += f.length + gap
    return placed


class _Drift(DriftModel):
    """The renderer's random walk plus the injected jumps (nm, image axes), deterministic per slice."""

    def __init__(self, seed: int, step_nm: float, jumps: dict[int, tuple[float, float]]) -> None:
        super().__init__(seed, step_nm, 0.0, 0.0)
        self._injected = dict(jumps)

    def offset_nm(self, slice_index: int) -> tuple[float, float]:
        x, y = super().offset_nm(slice_index)
        for i, (jx, jy) in self._injected.items():
            if slice_index >= i:
                x, y = x + jx, y + jy
        return x, y

    def jumps(self, upto: int) -> list[int]:
        return sorted(i for i in self._injected if i <= upto)


def _stripes(u_um: NDArray[np.float64], seed: int, sd_grey: float, around_um: tuple[float, float],
             spacing_um: float = 0.12) -> NDArray[np.float32]:
    """A block-anchored curtain profile across the face (grey levels): stripes 20-80 nm wide, about
    ``spacing_um`` apart, so a 2.5 µm field always shows many (the renderer's own curtains are sparse).
    Scaled so that its SD over the face stretch ``around_um`` is ``sd_grey`` exactly."""
    rng = np.random.default_rng([seed, 9176])
    lo, hi = around_um
    n = max(1, int((hi - lo + 1.0) / spacing_um))
    centers = rng.uniform(lo - 0.5, hi + 0.5, n)
    widths = rng.uniform(0.02, 0.08, n)
    amps = rng.normal(0.0, 1.0, n)

    def profile(u: NDArray[np.float64]) -> NDArray[np.float64]:
        out = np.zeros(len(u))
        for c, w, a in zip(centers, widths, amps):
            out += a * np.exp(-0.5 * ((u - c) / w) ** 2)
        return out

    ref = profile(np.linspace(lo, hi, 1024))
    return ((profile(u_um) - ref.mean()) * (sd_grey / max(float(ref.std()), 1e-9))).astype(np.float32)


def pick_field(world: Any, seed: int, pixel_size_nm: float = 10.0, shape: tuple[int, int] = (256, 256),
               top: int = 3) -> tuple[FaceGeometry, tuple[float, float]]:
    """A face through a cell and a field centre inside it with much structure (one of the ``top`` richest
    candidates, chosen by ``seed``): a series of resin or coating would test nothing."""
    rng = np.random.default_rng([seed, 5113])
    cell = world.cells[int(rng.integers(len(world.cells)))]
    face = face_through(world, cell.nucleus_center_um)
    half_v = shape[1] * pixel_size_nm * 1e-3 / 2
    scored = []
    for u in np.arange(-7.0, 7.01, 1.0):
        for v in (half_v + 0.4, half_v + 1.0, half_v + 1.8):
            img, _ = render_em_slice(world, 0.0, (float(u), float(v)), 4 * pixel_size_nm, (shape[0] // 4, shape[1] // 4),
                                     face=face, seed=0)
            a = img.astype(np.float32)
            if a.mean(axis=1).min() < 110 or a.mean() > 185:  # coating in view, or mostly resin
                continue
            scored.append((float(a.std()), float(u), float(v)))
    if not scored:
        raise ValueError("no field with cell content found on this face: pick another world seed or cell")
    scored.sort(reverse=True)
    _, u, v = scored[int(rng.integers(min(top, len(scored))))]
    return face, (u, v)


def _signal_sd(world: Any, setup: SeriesSetup, seed: int) -> float:
    """The tissue's grey-level SD in the field without the noise: the covariance of two renders of the first
    slice that differ only in their noise."""
    a, b = (render_em_slice(world, setup.start_depth_um, setup.center_um, setup.pixel_size_nm, setup.shape,
                            face=setup.face, seed=k, dtype="uint16")[0].astype(np.float64) / 257.0
            for k in (seed + 1_000_003, seed + 2_000_003))
    return float(np.sqrt(max(np.mean((a - a.mean()) * (b - b.mean())), 1.0)))


def fault_series(world: Any, setup: SeriesSetup, n_slices: int, faults: Sequence[Fault], seed: int = 0
                 ) -> Iterator[FaultSlice]:
    """Render the series slice by slice (a generator: a QC can consume it as a run would)."""
    by_start = {f.start: f for f in faults}
    if len(by_start) != len(faults):
        raise ValueError("two faults start at the same slice: one fault per slice start")
    rng = np.random.default_rng([seed, 4271])
    jumps = {f.start: (float(f.strength * np.cos(f.extra) * setup.pixel_size_nm),
                       float(f.strength * np.sin(f.extra) * setup.pixel_size_nm)) for f in faults if f.kind == "drift_jump"}
    # the jump moves the beam; the content moves the other way (x right, y down)
    drift = _Drift(seed, setup.drift_step_nm, jumps)
    base = EMImperfections(drift=True, drift_step_nm=setup.drift_step_nm, drift_jump_probability=0.0,
                           charging=setup.charging_strength > 0, charging_strength=setup.charging_strength,
                           curtaining=setup.curtaining_strength > 0, curtaining_strength=setup.curtaining_strength)
    w, h = setup.shape
    p_um = setup.pixel_size_nm * 1e-3
    cols_um = (np.arange(w) - (w - 1) / 2) * p_um
    faint_phase = float(rng.uniform(0, 2 * np.pi))
    half = w * p_um
    around = (setup.center_um[0] - half, setup.center_um[0] + half)  # where the field can drift to
    mill = 0  # slices milled so far: the face depth
    tissue_sd = _signal_sd(world, setup, seed)
    for i in range(n_slices):
        active = [f for f in faults if f.covers(i)]
        kinds = tuple(f.kind for f in active)
        onsets = tuple(f.kind for f in active if f.start == i)
        if i > 0:
            mill += 0 if "duplicate" in onsets else 2 if "missing" in onsets else 1
        depth = setup.start_depth_um + mill * setup.slice_nm * 1e-3
        imp = base
        for f in active:
            if f.kind == "defocus":
                imp = imp.model_copy(update={"focus_error_um": f.strength})
        img16, meta = render_em_slice(world, depth, setup.center_um, setup.pixel_size_nm, setup.shape,
                                      imperfections=imp, seed=seed, face=setup.face, slice_index=i, drift_model=drift,
                                      dtype="uint16")
        grey = img16.astype(np.float32) / np.float32(257.0)
        bx, _ = meta["drift"]["beam_offset_nm"]
        u = setup.center_um[0] + bx * 1e-3 + cols_um  # face position of each column: curtains stay on the block
        wobble = 0.8 + 0.2 * np.sin(depth / 0.3 + faint_phase)
        stripes = _stripes(u, seed, setup.faint_curtains * tissue_sd * wobble, around)
        for f in active:
            if f.kind == "curtaining":
                stripes = stripes + _stripes(u, seed + 7919 * (f.start + 1), f.strength * tissue_sd, around, 0.08)
        grey += stripes[None, :]
        for f in active:
            if f.kind == "charging":
                mean = float(grey.mean())
                grey = (grey - mean) * np.float32(f.extra) + np.float32(mean * (1.0 + f.strength))
        img = np.clip(grey + np.float32(0.5), 0, 255).astype(np.uint8)
        row, col = meta["drift"]["image_shift_px"]
        yield FaultSlice(i, img, depth, (float(row), float(col)), kinds, onsets)


@dataclass
class FaultScore:
    """How a QC's alerts compare with the injected truth."""

    injected: dict[str, int] = field(default_factory=dict)  # kind -> faults injected
    found: dict[str, int] = field(default_factory=dict)  # kind -> faults with an alert of that kind at onset
    missed: list[Fault] = field(default_factory=list)
    clean_slices: int = 0  # slices away from every fault
    false_alerts: list[tuple[int, str]] = field(default_factory=list)  # (slice, kind) raised on a clean slice
    other_kind: list[tuple[int, str]] = field(default_factory=list)  # alerts on faulty slices of another kind

    def recall(self, kind: str) -> float:
        n = self.injected.get(kind, 0)
        return self.found.get(kind, 0) / n if n else float("nan")

    def add(self, other: "FaultScore") -> None:
        for k, v in other.injected.items():
            self.injected[k] = self.injected.get(k, 0) + v
        for k, v in other.found.items():
            self.found[k] = self.found.get(k, 0) + v
        self.missed += other.missed
        self.clean_slices += other.clean_slices
        self.false_alerts += other.false_alerts
        self.other_kind += other.other_kind


def score_alerts(faults: Sequence[Fault], alerts: Sequence[tuple[int, str]], n_slices: int, tolerance: int = 1,
                 guard: int = 2) -> FaultScore:
    """Score ``alerts`` ((slice, kind) of the warnings) against the truth: a fault counts as found when an alert
    of its kind comes at its onset or up to ``tolerance`` slices later; an alert counts as false when it is
    raised on a slice outside every fault and the ``guard`` slices after it (where the return to normal may
    still show)."""
    score = FaultScore()
    for f in faults:
        score.injected[f.kind] = score.injected.get(f.kind, 0) + 1
        if any(k == f.kind and f.start <= i <= f.start + tolerance for i, k in alerts):
            score.found[f.kind] = score.found.get(f.kind, 0) + 1
        else:
            score.missed.append(f)
    near = np.zeros(n_slices, bool)
    for f in faults:
        near[f.start:min(n_slices, f.end + guard)] = True
    score.clean_slices = int((~near).sum())
    for i, k in alerts:
        if 0 <= i < n_slices and not near[i]:
            score.false_alerts.append((i, k))
        elif not any(f.kind == k and f.start <= i < f.end + guard for f in faults):
            score.other_kind.append((i, k))
    return score
