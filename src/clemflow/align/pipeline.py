"""The live alignment pipeline: coarse at once, fine ``fine_radius`` slices later.

Slices go in one at a time, as the run saves them. The coarse shift comes back
immediately (for QC and the dashboard); a slice's fine transform and aligned
pixels come back when the slices after it that its z-median template needs
have arrived. ``finish`` aligns the last few with the neighbours there are.
Only the window of raw slices the template needs is held in memory.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from numpy.typing import NDArray

from ..protocol.analysis import Alignment
from .coarse import CoarseAligner
from .fine import AlignedSlice, align_fine
from .transforms import CoarseShift

__all__ = ["AlignmentPipeline"]


class AlignmentPipeline:
    """Coarse then fine alignment of a stream of slices."""

    def __init__(self, settings: Alignment | None = None, *, warp: bool = True) -> None:
        self.settings = settings or Alignment()
        self.radius = int(self.settings.fine_radius)
        self.coarse = CoarseAligner(self.settings)
        self.warp = warp
        self._raw: OrderedDict[int, NDArray[np.generic]] = OrderedDict()
        self._shifts: dict[int, CoarseShift] = {}
        self._cache: dict[int, NDArray[np.float32]] = {}
        self._pending: list[int] = []

    def add(self, index: int, image: NDArray[np.generic]) -> tuple[CoarseShift, list[AlignedSlice]]:
        """Take slice ``index``; returns its coarse shift and the slices whose fine stage is now complete."""
        shift = self.coarse.add(index, image)
        self._raw[index] = image
        self._shifts[index] = shift
        self._pending.append(index)
        ready = [k for k in self._pending if k + self.radius <= index]
        return shift, self._align(ready)

    def prime(self, index: int, image: NDArray[np.generic], shift: CoarseShift) -> None:
        """Enter a slice aligned in an earlier session (its shift from transforms.csv): the later ones build on it."""
        self.coarse.prime(index, image, shift.dx, shift.dy)
        self._raw[index] = image
        self._shifts[index] = shift
        for j in [j for j in self._raw if j < index - 2 * self.radius]:
            del self._raw[j]
            self._shifts.pop(j, None)

    def finish(self) -> list[AlignedSlice]:
        """Fine-align the slices still waiting for later neighbours (end of the run)."""
        return self._align(list(self._pending))

    def _align(self, ready: list[int]) -> list[AlignedSlice]:
        out = []
        for k in ready:
            window = {j: img for j, img in self._raw.items() if abs(j - k) <= self.radius}
            out.append(align_fine(k, window, self._shifts, self.settings, cache=self._cache, warp=self.warp))
            self._pending.remove(k)
        if out:
            oldest_needed = (min(self._pending) if self._pending else out[-1].transform.index + 1) - self.radius
            for j in [j for j in self._raw if j < oldest_needed]:
                del self._raw[j]
                self._cache.pop(j, None)
                self._shifts.pop(j, None)
        return out
