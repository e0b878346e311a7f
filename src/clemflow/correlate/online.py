"""Is the FIB-SEM on the cell chosen in light microscopy? Asked again every few slices while it mills.

A day of instrument time spent on the wrong cell is the costliest mistake of
a CLEM run, and the droplets say early which cell it is. ``OnlineCorrelation``
takes each aligned slice, keeps a binned copy of the volume milled so far
(about 50 nm laterally, 100 nm along the milling axis: a few hundred MB for a
whole cell at most), and every ``update_every`` slices detects the droplets
in it and registers the confocal droplets of the chosen cell to them.

The verdict, from that registration alone:

- ``confirmed``: at least ``min_inliers`` droplets agree with one transform
  (with its leave-one-out TRE);
- ``not_this_cell``: the EM so far holds at least ``min_inliers + 2`` droplets,
  yet no transform makes even a third of them land on the chosen cell's
  droplets - a different droplet pattern, so most likely another cell (chance
  alone brings a quarter of a neighbour's droplets into agreement at most, in
  the specimen trials);
- ``waiting``: too few droplets milled yet to say either.

A verdict is announced once when it changes; the TRE is kept up to date in
:attr:`last`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..protocol.analysis import Correlation
from .blobs import Blobs
from .detect_em import detect_em_droplets
from .merge import merge_touching
from .register import CorrelationRefused, Registration, register_points
from .working import bin_factors, fill_no_data

__all__ = ["OnlineCorrelation", "Verdict", "online_from_protocol"]

OVERLAP_UM = 1.5
"""Depth searched again before the new planes: more than the largest droplet, so none is split between windows."""
GUARD_UM = 0.7
"""Droplets this close to the face may still be cut by it; they are taken at the next update."""

State = Literal["waiting", "confirmed", "not_this_cell"]
Announce = Callable[[str, str], None]  # (message, level)


@dataclass(frozen=True)
class Verdict:
    """What the latest update says about the run."""

    state: State
    slices: int
    depth_um: float
    em_droplets: int
    agreeing: int
    tre_um: float | None
    message: str
    registration: Registration | None = None


def _concat(parts: list[Blobs]) -> Blobs:
    return Blobs(np.concatenate([b.center_um for b in parts]), np.concatenate([b.radius_um for b in parts]),
                 np.concatenate([b.score for b in parts]))


class OnlineCorrelation:
    """Accumulates aligned slices and checks them against the chosen cell's confocal droplets.

    ``lm_droplets``: droplets of the confocal stack of the chosen cell (LM physical µm). Feed every aligned
    slice, in order, with :meth:`add`; ``announce(message, level)`` hears each change of verdict.
    """

    def __init__(self, lm_droplets: Blobs, settings: Correlation | None = None, *,
                 working_um: tuple[float, float] = (0.05, 0.1), announce: Announce | None = None) -> None:
        self.lm = lm_droplets
        self.settings = settings or Correlation()
        self.working_xy, self.working_z = working_um
        self.announce = announce
        self.slices = 0
        self.last: Verdict | None = None
        self.history: list[Verdict] = []
        self._planes: list[np.ndarray] = []
        self._found: list[Blobs] = []
        self._settled_um = 0.0
        self._group: np.ndarray | None = None
        self._group_n = 0
        self._fxy = self._fz = 1
        self._voxel: tuple[float, float, float] | None = None

    # ------------------------------------------------------------------ input

    def add(self, image: np.ndarray, pixel_um: float, thickness_um: float) -> Verdict | None:
        """One aligned slice (the face only); returns a new verdict when this slice completes an update."""
        if self._voxel is None:
            self._fz, self._fxy, _ = bin_factors((thickness_um, pixel_um, pixel_um),
                                                 (self.working_z, self.working_xy, self.working_xy))
            self._voxel = (thickness_um * self._fz, pixel_um * self._fxy, pixel_um * self._fxy)
        f = self._fxy
        h, w = (image.shape[0] // f) * f, (image.shape[1] // f) * f
        binned = fill_no_data(np.asarray(image[:h, :w], np.float32)).reshape(h // f, f, w // f, f).mean(axis=(1, 3))
        if self._group is None or self._group.shape != binned.shape:
            self._group, self._group_n = np.zeros_like(binned), 0
        self._group += binned
        self._group_n += 1
        if self._group_n == self._fz:
            self._planes.append(self._group / self._group_n)
            self._group, self._group_n = None, 0
        self.slices += 1
        if self.slices % self.settings.update_every == 0:
            return self.update()
        return None

    @property
    def depth_um(self) -> float:
        return self.slices * (self._voxel[0] / self._fz if self._voxel else 0.0)

    def volume(self) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The binned volume milled so far and its voxel (z, y, x) µm."""
        if not self._planes or self._voxel is None:
            return np.zeros((0, 0, 0), np.float32), (1.0, 1.0, 1.0)
        shape = self._planes[0].shape
        planes = [p for p in self._planes if p.shape == shape]
        return np.stack(planes), self._voxel

    # ------------------------------------------------------------------ the check

    def update(self, final: bool = False) -> Verdict:
        """Detect the droplets milled since the last update and register the chosen cell's droplets to all so far.

        Only a window is searched: the new planes plus ``OVERLAP_UM`` before them, so an update costs the same
        at slice 50 as at slice 5000. Droplets within ``GUARD_UM`` of the face may still be cut by it and are
        left for the next update (``final``: the milling is over, take them all).
        """
        volume, voxel = self.volume()
        n, vz = volume.shape[0], voxel[0]
        if n >= 3:
            start = max(0, int(np.floor(self._settled_um / vz - OVERLAP_UM / vz)))
            found = detect_em_droplets(volume[start:], voxel)
            z = found.center_um[:, 2] + start * vz
            end = n * vz if final else max((n - 1) * vz - GUARD_UM, self._settled_um)
            keep = (z >= self._settled_um) & (z < end)
            centres = found.center_um[keep] + np.array([0.0, 0.0, start * vz])
            self._found.append(Blobs(centres, found.radius_um[keep], found.score[keep]))
            self._settled_um = end
        em = merge_touching(_concat(self._found)) if self._found else Blobs.empty()
        verdict = self._judge(em)
        self.history.append(verdict)
        changed = self.last is None or self.last.state != verdict.state
        self.last = verdict
        if changed and self.announce is not None and verdict.state != "waiting":
            self.announce(verdict.message, "info" if verdict.state == "confirmed" else "warning")
        return verdict

    def droplets(self) -> Blobs:
        """The EM droplets settled so far (binned-volume µm)."""
        return merge_touching(_concat(self._found)) if self._found else Blobs.empty()

    def _judge(self, em: Blobs) -> Verdict:
        s = self.settings
        depth = self.depth_um
        where = f"after {self.slices} slices ({depth:.1f} µm milled)"
        max_res = float(s.max_residual) * 1e6  # protocol lengths are metres
        if len(em) < s.min_inliers:
            return Verdict("waiting", self.slices, depth, len(em), 0, None,
                           f"{len(em)} droplets in the EM {where}; {s.min_inliers} are needed to say which cell this is")
        try:
            reg = register_points(self.lm.center_um, em.center_um, model="similarity", min_inliers=s.min_inliers,
                                  max_residual_um=max_res)
        except CorrelationRefused as refused:
            agreeing = int(getattr(refused, "best_inliers", 0) or 0)
            if len(em) >= s.min_inliers + 2 and agreeing * 3 < len(em):
                return Verdict("not_this_cell", self.slices, depth, len(em), agreeing, None,
                               f"{where}: {len(em)} droplets in the EM, but no placement of the chosen cell's "
                               f"{len(self.lm)} confocal droplets matches more than {agreeing} of them - the run may "
                               f"not be on the cell chosen in light microscopy; check the target before milling on")
            return Verdict("waiting", self.slices, depth, len(em), agreeing, None,
                           f"{where}: {agreeing} of {len(em)} EM droplets agree so far ({refused.reason})")
        agreeing = len(reg.pairs)
        return Verdict("confirmed", self.slices, depth, len(em), agreeing, float(reg.tre_estimate_um),
                       f"{where}: on the cell chosen in light microscopy - {agreeing} droplets agree, "
                       f"TRE about {reg.tre_estimate_um * 1000:.0f} nm", reg)


def online_from_protocol(protocol: Any, protocol_path: str | Path | None) -> OnlineCorrelation | None:
    """The online check the protocol asks for (``correlation.lm_stack``), its confocal droplets found; else None."""
    settings: Correlation = protocol.correlation
    if settings.lm_stack is None:
        return None
    from .detect_lm import detect_lm_droplets
    from .inputs import read_lm

    stack = Path(settings.lm_stack)
    if not stack.is_absolute() and protocol_path is not None:
        stack = Path(protocol_path).parent / stack
    lm = read_lm(stack)
    droplets = detect_lm_droplets(np.asarray(lm.channel(settings.lm_channel)), lm.voxel_um)
    return OnlineCorrelation(droplets, settings)
