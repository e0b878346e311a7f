"""An MDA engine that keeps frame indices honest.

pymmcore-plus's engine logs a failed snap and goes on, so a frame that never
arrived is simply absent. Here a failed snap is retried, and if it fails
again the frame's own index is reported as a gap; the writer places every
frame by its index, so nothing after a gap is ever mislabelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from pymmcore_plus import CMMCorePlus
from pymmcore_plus.mda import MDAEngine
from pymmcore_plus.mda._engine import ImagePayload
from useq import MDAEvent

__all__ = ["GapRecordingEngine"]

GapHandler = Callable[[MDAEvent, str], None]


class GapRecordingEngine(MDAEngine):
    def __init__(self, mmcore: CMMCorePlus, retries: int = 1, on_gap: GapHandler | None = None) -> None:
        super().__init__(mmcore)
        self.retries = retries
        self.on_gap = on_gap

    def exec_single_event(self, event: MDAEvent) -> Iterator[ImagePayload | None]:
        core = self.mmcore
        error: Exception | None = None
        t0 = event.metadata.get("runner_t0") or time.perf_counter()
        for _ in range(self.retries + 1):
            try:
                core.snapImage()
                error = None
                break
            except Exception as exc:  # a camera timeout or a dropped frame from the device
                error = exc
        if error is not None:
            if self.on_gap is not None:
                self.on_gap(event, f"{type(error).__name__}: {error}")
            return
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if not event.keep_shutter_open and self._autoshutter_was_set:
            core.setShutterOpen(False)
        meta = self.get_frame_metadata(event, runner_time_ms=elapsed_ms, camera_device=core.getCameraDevice())
        yield ImagePayload(core.getImage(), event, meta)  # type: ignore[misc]
