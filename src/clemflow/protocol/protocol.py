"""The protocol: one file that says everything a 3D-CLEM run will do.

Field validators check each value on its own; `cross_check` then checks what
refers to what (channels, samples, grid labels, timepoints) and reports every
problem with the path of the field that is wrong, so the loader can point at
the line in the YAML file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field, model_validator

from .analysis import Alignment, Correlation, LiveQC, Output, Quantification
from .base import ProtocolModel
from .confocal import Confocal
from .experiment import Experiment, Sample, Stain, Treatment
from .fibsem import FIBSEM
from .units import Duration, format_quantity

__all__ = ["CrossReferenceErrors", "Protocol", "cross_check"]

Loc = tuple[str | int, ...]


class CrossReferenceErrors(ValueError):
    """Several problems, each at its own field path; raised from the model validator."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))


class Protocol(ProtocolModel):
    """A clemflow protocol file."""

    clemflow_protocol: Literal[1] = Field(1, description="Version of the protocol format.")
    experiment: Experiment
    samples: list[Sample] = Field(min_length=1, description="The gridded dishes.")
    treatment: Treatment | None = Field(None, description="Particles added at t = 0; empty for a run without treatment.")
    stains: list[Stain] = Field(default_factory=list)
    timepoints: list[Duration] = Field(
        default_factory=list, description="Imaging times after treatment, increasing, e.g. ['1 h', '90 min', '24 h']."
    )
    confocal: Confocal | None = None
    fibsem: FIBSEM | None = None
    alignment: Alignment = Field(default_factory=Alignment)
    qc: LiveQC = Field(default_factory=LiveQC)
    correlation: Correlation = Field(default_factory=Correlation)
    quantification: Quantification = Field(default_factory=Quantification)
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _references(self) -> "Protocol":
        problems = list(cross_check(self))
        if problems:
            raise CrossReferenceErrors(problems)
        return self

    def sample(self, sample_id: str) -> Sample:
        for sample in self.samples:
            if sample.id == sample_id:
                return sample
        raise KeyError(sample_id)


def cross_check(protocol: Protocol) -> Iterator[tuple[Loc, str]]:
    """Every reference between sections, and every ordering rule, as (field path, message)."""
    yield from _check_samples(protocol)
    yield from _check_timepoints(protocol)
    if protocol.confocal is None and protocol.fibsem is None:
        yield ("confocal",), "the protocol does nothing: add a 'confocal' section, a 'fibsem' section, or both"
    if protocol.confocal is not None:
        yield from _check_confocal(protocol)
    elif protocol.stains:
        yield ("stains",), "stains are imaged on the confocal; add a 'confocal' section or remove the stains"
    if protocol.fibsem is not None:
        yield from _check_fibsem(protocol)


def _check_samples(protocol: Protocol) -> Iterator[tuple[Loc, str]]:
    seen: set[str] = set()
    for i, sample in enumerate(protocol.samples):
        if sample.id in seen:
            yield ("samples", i, "id"), f"sample id {sample.id!r} is used twice; give each dish its own id"
        seen.add(sample.id)


def _check_timepoints(protocol: Protocol) -> Iterator[tuple[Loc, str]]:
    previous = 0.0
    for i, t in enumerate(protocol.timepoints):
        if t <= 0:
            yield ("timepoints", i), f"timepoint {format_quantity(t, 'duration')} is not after treatment; timepoints must be positive, e.g. '1 h'"
        elif t <= previous:
            yield (
                ("timepoints", i),
                f"timepoint {format_quantity(t, 'duration')} does not come after the one before it "
                f"({format_quantity(previous, 'duration')}); list timepoints in increasing order",
            )
        previous = max(previous, t)
    treated = [s for s in protocol.samples if s.role == "treated"]
    if protocol.timepoints and treated and protocol.treatment is None:
        yield ("treatment",), "timepoints are counted from the treatment; add a 'treatment' section (particle, concentration)"
    for i, stain in enumerate(protocol.stains):
        if protocol.timepoints and stain.lead_time >= protocol.timepoints[0] + 48 * 3600:
            yield ("stains", i, "lead_time"), "lead_time is far longer than the time course; a live stain is added shortly before imaging"


def _check_confocal(protocol: Protocol) -> Iterator[tuple[Loc, str]]:
    confocal = protocol.confocal
    assert confocal is not None
    channels = [c.name for c in confocal.channels]
    objectives = [o.name for o in confocal.objectives]
    for name, where in ((channels, "channels"), (objectives, "objectives")):
        for i, n in enumerate(name):
            if name.index(n) != i:
                yield ("confocal", where, i, "name"), f"{n!r} is defined twice in confocal.{where}"

    def unknown_channel(loc: Loc, name: str) -> Iterator[tuple[Loc, str]]:
        if name not in channels:
            yield loc, f"unknown channel {name!r}; confocal.channels defines {', '.join(map(repr, channels))}"

    def unknown_objective(loc: Loc, name: str) -> Iterator[tuple[Loc, str]]:
        if name not in objectives:
            yield loc, f"unknown objective {name!r}; confocal.objectives defines {', '.join(map(repr, objectives))}"

    for i, stain in enumerate(protocol.stains):
        yield from unknown_channel(("stains", i, "channel"), stain.channel)
    yield from unknown_channel(("confocal", "overview", "channel", "channel"), confocal.overview.channel.channel)
    yield from unknown_objective(("confocal", "overview", "objective"), confocal.overview.objective)
    yield from unknown_objective(("confocal", "zstack", "objective"), confocal.zstack.objective)
    for i, ch in enumerate(confocal.zstack.channels):
        yield from unknown_channel(("confocal", "zstack", "channels", i, "channel"), ch.channel)
    if confocal.autofocus.enabled:
        yield from unknown_channel(("confocal", "autofocus", "channel"), confocal.autofocus.channel)
    if confocal.zstack.step > confocal.zstack.range > 0:
        yield ("confocal", "zstack", "step"), "z step is larger than the z range; make the step smaller or the range larger"
    yield from unknown_channel(("correlation", "lm_channel"), protocol.correlation.lm_channel)

    ids = {s.id: s for s in protocol.samples}
    for i, label in enumerate(confocal.overview.squares):
        if not any(s.grid.has_label(label) for s in protocol.samples):
            yield ("confocal", "overview", "squares", i), _unknown_label(label, protocol.samples[0])
    for i, target in enumerate(confocal.targets.items):
        loc: Loc = ("confocal", "targets", "items", i)
        sample = ids.get(target.sample)
        if sample is None:
            yield loc + ("sample",), f"unknown sample {target.sample!r}; samples are {', '.join(map(repr, ids))}"
            continue
        if target.square is not None:
            if not sample.grid.has_label(target.square):
                yield loc + ("square",), _unknown_label(target.square, sample)
            half = sample.grid.pitch / 2
            if any(abs(o) > half for o in target.offset):
                yield (
                    loc + ("offset",),
                    f"offset is outside the square: each component must be within half the pitch ({format_quantity(half, 'length')})",
                )
    if confocal.targets.mode == "listed" and not confocal.targets.items and protocol.timepoints:
        yield ("confocal", "targets", "items"), "no targets listed; list cells to image or set mode: automatic"


def _check_fibsem(protocol: Protocol) -> Iterator[tuple[Loc, str]]:
    fibsem = protocol.fibsem
    assert fibsem is not None
    target = fibsem.target
    if target.source == "square":
        ids = {s.id: s for s in protocol.samples}
        sample = ids.get(target.sample or "")
        if sample is None:
            yield ("fibsem", "target", "sample"), f"unknown sample {target.sample!r}; samples are {', '.join(map(repr, ids))}"
        elif not sample.grid.has_label(target.square or ""):
            yield ("fibsem", "target", "square"), _unknown_label(target.square or "", sample)
    elif protocol.confocal is None:
        yield (
            ("fibsem", "target", "source"),
            "target source 'confocal' needs a confocal section (or an earlier run's targets.json); "
            "use source: square with sample and square",
        )
    stop = fibsem.stop
    if stop.depth is not None and stop.depth < fibsem.slice_thickness:
        yield ("fibsem", "stop", "depth"), "stop depth is thinner than one slice; raise the depth or thin the slices"


def _unknown_label(label: str, sample: Sample) -> str:
    grid = sample.grid
    return (
        f"{label!r} is not a square of dish {sample.id}'s {grid.name} grid: labels are a column "
        f"character from {grid.columns!r} then a row character from {grid.rows!r}, e.g. {grid.label(3, 2)!r}"
    )
