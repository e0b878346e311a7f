"""Streaming coarse alignment: each slice placed as it arrives, without a random walk.

Two measurements per slice, both phase correlation on binned spectra:

- the *neighbour* step, against the previous slice: precise from one slice to
  the next, but its small errors (content changes between slices, about a
  quarter pixel on real tissue) add up like a random walk when chained;
- the *long-range* position, against the mean of the already placed slices
  about ``long_range_every`` back: noisier per slice, but it does not
  accumulate, because the reference averages several slices placed in the
  common frame.

They are blended as a complementary filter: the chain carries the high
frequencies and the long-range estimate pulls the low frequencies, with a gain
of 1/``long_range_every`` per slice. A low peak-to-sidelobe ratio triggers the
fallback (full resolution), and if that fails too the slice keeps its
neighbour's position and says so.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..protocol.analysis import Alignment
from .phase import Spectrum, bin_image, box_window, correlate, inverse, plain_spectrum, shifted, shifted_window, spectrum
from .transforms import CoarseShift

__all__ = ["CoarseAligner", "auto_binning"]

TARGET_SIZE = 512  # binned size the coarse stage works at when the protocol leaves binning to us
LONG_RANGE_TOLERANCE_PX = 4.0  # binned px: a long-range answer further than this from the chain is a mismatch
REWINDOW_PX = 0.25  # binned px: steps larger than this are measured a second time with the window moved along
LONG_RANGE_TRUST = 3.0  # the long-range peak must be this many times the neighbour threshold: content decorrelates
# over tens of nanometres, and a weak long-range peak is worse than none


def auto_binning(shape: tuple[int, ...], target: int = TARGET_SIZE) -> int:
    """The binning that brings the larger side near ``target`` pixels (never below 1)."""
    return max(1, int(round(max(shape[:2]) / target)))


@dataclass
class _Placed:
    index: int
    spec: Spectrum  # apodised, for the neighbour step
    plain: Spectrum  # not apodised, for the long-range sum
    x: float  # content position in the common frame, binned px
    y: float


class _LongRangeSum:
    """Running sum, in the common frame, of the placed slices ``every`` +- ``every``/2 back (spectra)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.members: deque[_Placed] = deque()
        self.total: NDArray[np.complex64] | None = None

    def advance(self, index: int, placed: deque[_Placed]) -> None:
        lo, hi = index - self.every - self.every // 2, index - self.every + self.every // 2
        newest = self.members[-1].index if self.members else -(10**9)
        for p in placed:
            if newest < p.index < hi:
                part = shifted(p.plain, -p.x, -p.y)
                self.total = part if self.total is None else self.total + part
                self.members.append(p)
        while self.members and self.members[0].index < lo:
            old = self.members.popleft()
            self.total = self.total - shifted(old.plain, -old.x, -old.y)  # type: ignore[operator]

    def reference(self, x: float, y: float, shape: tuple[int, int]) -> tuple[NDArray[np.float32], tuple[int, int, int, int]] | None:
        """The mean placed at content position (x, y), and the box where every member holds real data."""
        if self.total is None or len(self.members) < max(1, self.every // 2):
            return None
        h, w = shape
        dxs = [x - p.x for p in self.members]
        dys = [y - p.y for p in self.members]
        box = (int(np.ceil(max(0.0, max(dys)))), int(np.floor(min(h, h + min(dys)))),
               int(np.ceil(max(0.0, max(dxs)))), int(np.floor(min(w, w + min(dxs)))))
        if box[1] - box[0] < h // 2 or box[3] - box[2] < w // 2:
            return None  # a recent jump: too little common ground for a fair long-range comparison
        mean = self.total / np.float32(len(self.members))
        return inverse(shifted(Spectrum(mean, shape), x, y), shape), box


class CoarseAligner:
    """Places each new slice in the common frame of the first one; ``add`` answers at once."""

    def __init__(self, settings: Alignment | None = None) -> None:
        self.settings = settings or Alignment()
        self.binning: int | None = self.settings.coarse_binning
        self.sigma = float(self.settings.coarse_sigma_px)
        self.every = int(self.settings.long_range_every)
        self.gain = 1.0 / self.every
        self._placed: deque[_Placed] = deque(maxlen=self.every // 2 + 2)
        self._long = _LongRangeSum(self.every)
        self._previous_raw: NDArray[np.generic] | None = None

    def add(self, index: int, image: NDArray[np.generic]) -> CoarseShift:
        """Measure slice ``index`` against the slices before it; the answer is final."""
        if self.binning is None:
            self.binning = auto_binning(image.shape)
        b = self.binning
        binned = bin_image(image, b)
        spec = spectrum(binned)
        plain = plain_spectrum(binned)
        last = self._placed[-1] if self._placed else None
        if last is None:
            return self._keep(index, image, spec, plain, 0.0, 0.0, 0.0, 0.0, float("inf"), "", False)
        if spec.shape != last.spec.shape:
            raise ValueError(f"slice {index} has shape {image.shape}, the slices before it {self._previous_raw.shape}: "
                             "a stack must keep one frame size (crop or pad the odd slice)")
        step = correlate(last.spec, spec, self.sigma)
        if np.hypot(step.dx, step.dy) > REWINDOW_PX and step.psr >= self.settings.min_confidence:
            # measure again with the window moved along with the content: removes the bias toward zero
            again = correlate(last.spec, spectrum(binned, shifted_window(spec.shape, step.dx, step.dy)), self.sigma)
            if np.hypot(again.dx - step.dx, again.dy - step.dy) < 1.0:
                step = again
        sx, sy, conf, fallback = step.dx, step.dy, step.psr, ""
        if conf < self.settings.min_confidence:
            sx, sy, conf, fallback = self._fallback(image, sx, sy, conf)
        chain_x, chain_y = last.x + sx, last.y + sy
        x, y, used = chain_x, chain_y, False
        self._long.advance(index, self._placed)
        found = self._long.reference(chain_x, chain_y, spec.shape)
        if found is not None:
            reference, box = found
            window = box_window(spec.shape, box)
            far = correlate(spectrum(reference, window), spectrum(binned, window), 2.0 * self.sigma,
                            max_shift=LONG_RANGE_TOLERANCE_PX)
            if far.psr >= LONG_RANGE_TRUST * self.settings.min_confidence:
                x += self.gain * far.dx
                y += self.gain * far.dy
                used = True
        return self._keep(index, image, spec, plain, x, y, sx, sy, conf, fallback, used)

    def prime(self, index: int, image: NDArray[np.generic], dx: float, dy: float) -> None:
        """Enter a slice whose shift is already known (from transforms.csv, on resume) without measuring it."""
        if self.binning is None:
            self.binning = auto_binning(image.shape)
        b = self.binning
        binned = bin_image(image, b)
        self._placed.append(_Placed(index, spectrum(binned), plain_spectrum(binned), -dx / b, -dy / b))
        self._previous_raw = image

    def _keep(self, index: int, image: NDArray[np.generic], spec: Spectrum, plain: Spectrum, x: float, y: float,
              sx: float, sy: float, conf: float, fallback: str, used: bool) -> CoarseShift:
        b = self.binning or 1
        self._placed.append(_Placed(index, spec, plain, x, y))
        self._previous_raw = image
        return CoarseShift(index, -x * b, -y * b, sx * b, sy * b, conf, fallback, used)

    def _fallback(self, image: NDArray[np.generic], sx: float, sy: float, conf: float) -> tuple[float, float, float, str]:
        """Low confidence: try full resolution (centre up to 1024 px); else keep the neighbour's position."""
        b = self.binning or 1
        if b > 1 and self._previous_raw is not None:
            prev, cur = _centre(self._previous_raw, 1024), _centre(image, 1024)
            fine = correlate(spectrum(prev.astype(np.float32)), spectrum(cur.astype(np.float32)), 2.0 * self.sigma)
            if fine.psr >= self.settings.min_confidence:
                return fine.dx / b, fine.dy / b, fine.psr, "full-resolution"
        return 0.0, 0.0, conf, "kept"


def _centre(image: NDArray[np.generic], size: int) -> NDArray[np.generic]:
    h, w = image.shape[:2]
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[y0:y0 + size, x0:x0 + size]
