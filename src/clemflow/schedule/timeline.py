"""The absolute timeline of a protocol: what happens when, counted from treatment.

Pure data from the protocol; the runner (a later layer) walks it with a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..protocol import Protocol

__all__ = ["TimelineEntry", "timeline"]


@dataclass(frozen=True)
class TimelineEntry:
    """One thing to do at `at_s` seconds after treatment."""

    at_s: float
    kind: Literal["stain", "acquire"]
    sample: str
    timepoint_s: float
    what: str


def timeline(protocol: Protocol) -> list[TimelineEntry]:
    """Stain additions and acquisitions for every dish and timepoint, in time order.

    Control dishes are stained and imaged at the same times as treated ones, so
    that they differ only in the particles.
    """
    entries: list[TimelineEntry] = []
    confocal = protocol.confocal
    if confocal is None:
        return entries
    channels = ", ".join(c.channel for c in confocal.zstack.channels)
    for t in protocol.timepoints:
        for sample in protocol.samples:
            by_lead: dict[float, list[str]] = {}
            for stain in protocol.stains:
                by_lead.setdefault(stain.lead_time, []).append(f"{stain.name} ({stain.marks})")
            for lead, names in by_lead.items():
                entries.append(TimelineEntry(t - lead, "stain", sample.id, t, "add " + ", ".join(names)))
            targets = [x for x in confocal.targets.items if x.sample == sample.id]
            if confocal.targets.mode == "automatic":
                n = len(targets) * confocal.targets.cells_per_square
                what = f"overview + {n} automatic target(s) in {len(targets)} square(s)"
            else:
                what = f"overview + {len(targets)} target(s)"
            what += f"; {confocal.zstack.planes} planes x [{channels}]"
            entries.append(TimelineEntry(t, "acquire", sample.id, t, what))
    order = {"stain": 0, "acquire": 1}
    return sorted(entries, key=lambda e: (e.at_s, order[e.kind], e.sample))
