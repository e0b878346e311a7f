"""Live alignment and QC of a slice-and-view run, slice by slice, beside the acquisition.

Subscribed to the run's slice stream, ``LiveAnalysis`` takes each saved slice
on a thread of its own (the instrument never waits for it), and:

- aligns it: the coarse shift at once, the fine transform ``fine_radius``
  slices later, written to ``<run>/aligned/`` (OME-Zarr, display copy,
  ``transforms.csv``), exactly as ``clemflow align`` writes them;
- checks it: focus, charging, curtaining, drift jumps, missing or duplicated
  slices, to ``qc.csv`` and ``alerts.jsonl``, with alerts sent where the run's
  alerts go (terminal, journal, notify hook);
- every ``refresh_every`` slices redraws the reslices and the drift and QC plots;
- with an :class:`~clemflow.correlate.online.OnlineCorrelation`, feeds it
  each aligned slice: every ``update_every`` slices it says whether the run is
  on the cell chosen in light microscopy (announced through the alerts).

After a crash the next session picks up where the folder ends: slices already
in ``transforms.csv`` are not redone, the aligner is primed with the last
shifts it found, and slices saved but not yet aligned are aligned first.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..align.csvio import TransformsCsv, read_transforms
from ..align.fine import AlignedSlice
from ..align.outputs import TRANSFORMS, AlignedStores
from ..align.pipeline import AlignmentPipeline
from ..align.transforms import CoarseShift
from ..protocol.analysis import Alignment, LiveQC
from ..qc.monitor import BASELINE_SLICES, QCMonitor, SliceQC
from ..qc.qclog import QCLog
from .stream import read_stream

__all__ = ["ANALYSIS_DIR", "LiveAnalysis"]

ANALYSIS_DIR = "aligned"
log = logging.getLogger("clemflow.fibsem.analysis")

AlertSink = Callable[..., None]  # Alerts.send(message, level, **data)
StatusSink = Callable[[dict[str, Any]], None]
LEVELS = {"info": "info", "warning": "warning", "critical": "error"}


class LiveAnalysis:
    """Aligns and QCs each published slice; call it with stream records, ``close()`` at the end of a session."""

    def __init__(self, run_dir: str | Path, alignment: Alignment | None = None, qc: LiveQC | None = None, *,
                 alert: AlertSink | None = None, status: StatusSink | None = None, background: bool = True,
                 display: bool = True, correlation: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.out = self.run_dir / ANALYSIS_DIR
        self.settings = alignment or Alignment()
        self.qc_settings = qc or LiveQC()
        self.alert, self.status = alert, status
        self.display = display
        self.correlation = correlation  # correlate.online.OnlineCorrelation, or None
        self._pixel_um = self._thickness_um = 0.0
        self.pipeline = AlignmentPipeline(self.settings)
        self.monitor = QCMonitor(self.qc_settings)
        self.processed = 0
        self.aligned = 0
        self.last_qc: SliceQC | None = None
        self.last_shift: CoarseShift | None = None
        self._first_index: int | None = None
        self._face_top: int | None = None
        self._stores: AlignedStores | None = None
        self._csv: TransformsCsv | None = None
        self._qclog: QCLog | None = None
        self._done: set[int] = set()
        self._started = False
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._background = background
        self.errors: list[str] = []

    # ------------------------------------------------------------------ the stream side

    def __call__(self, record: dict[str, Any]) -> None:
        """A slice saved by the engine (a stream listener: returns at once when running in the background)."""
        if not self._background:
            self._handle(record)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="clemflow-live-analysis", daemon=True)
            self._thread.start()
        self._queue.put(record)

    def close(self) -> None:
        """Finish: align the last slices with the neighbours there are, sort the tables, draw the pictures."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        try:
            self._write_aligned(self.pipeline.finish())
            if self.correlation is not None and self.correlation.slices:
                self.correlation.update(final=True)
            if self._csv is not None:
                self._csv.sort()
            if self.processed:
                self._draw()
        except Exception as exc:  # noqa: BLE001 - the acquisition is done and safe; say what failed
            self._failed("finishing the live alignment", exc)

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            self._handle(record)

    def _handle(self, record: dict[str, Any]) -> None:
        try:
            if not self._started:
                self._start(record)
            self._process(record)
        except Exception as exc:  # noqa: BLE001 - analysis must never stop the acquisition
            self._failed(f"slice {record.get('index')}", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        log.exception("live analysis: %s failed", what)
        message = f"live alignment/QC: {what} failed ({exc}); the slices are safe, run `clemflow align` afterwards"
        said = any(str(exc) in e for e in self.errors)
        self.errors.append(message)
        if self.alert is not None and not said:  # once per kind of failure: a broken analysis must not flood the run
            self.alert(message, "warning")

    # ------------------------------------------------------------------ resume

    def _start(self, first: dict[str, Any]) -> None:
        """Open the outputs; on a resumed run, prime from what the folder already holds and align what it lacks."""
        self._started = True
        records = [r for r in read_stream(self.run_dir) if "index" in r]
        self._first_index = int(records[0]["index"]) if records else int(first["index"])
        if records and records[0].get("face_top_px") is not None:
            self._face_top = None
            self._read_face_top(records[0])
        self.out.mkdir(parents=True, exist_ok=True)
        table = self.out / TRANSFORMS
        done = {t.index: t for t in read_transforms(table)} if table.exists() else {}
        self._done = set(done)
        earlier = [r for r in records if int(r["index"]) < int(first["index"])]
        prime_from = max(self.settings.fine_radius + self.settings.long_range_every * 2, BASELINE_SLICES)
        finished = [r for r in earlier if int(r["index"]) in done]
        previous = None
        for r in finished[-prime_from:]:
            t = done[int(r["index"])]
            image = self._read(r)
            step = (0.0, 0.0) if previous is None else (previous.coarse_dx - t.coarse_dx, previous.coarse_dy - t.coarse_dy)
            shift = CoarseShift(t.index, t.coarse_dx, t.coarse_dy, step[0], step[1], t.confidence)
            previous = t
            self.pipeline.prime(t.index, image, shift)
            self.monitor.add(t.index, image, shift)  # rebuilds the QC baseline; its answers were given before
        for r in earlier:
            if int(r["index"]) not in done:
                self._process(r)

    # ------------------------------------------------------------------ one slice

    def _read(self, record: dict[str, Any]) -> np.ndarray:
        """The slice's face: rows above the face edge show the block surface, which rises with every slice and
        would pull the alignment (the first slice's edge holds for the run, so the volume keeps one frame)."""
        image = tifffile.imread(self.run_dir / record["path"])
        if self._face_top is None:
            self._read_face_top(record, image.shape[0])
        return image[self._face_top or 0:]

    def _read_face_top(self, record: dict[str, Any], rows: int | None = None) -> None:
        top = int(record.get("face_top_px") or 0)
        self._face_top = top if top >= 0 and (rows is None or top < rows // 2) else 0

    def _open_outputs(self, record: dict[str, Any], image: np.ndarray) -> None:
        pixel = record.get("pixel_size_m")
        if isinstance(pixel, list | tuple):  # (x, y): the volume takes one lateral size, x
            pixel = pixel[0] if pixel else None
        thickness = record.get("thickness_m")
        pixel_nm = float(pixel) * 1e9 if pixel else None
        thickness_nm = float(thickness) * 1e9 if thickness else None
        self._pixel_um = pixel_nm / 1000 if pixel_nm else 0.0
        self._thickness_um = thickness_nm / 1000 if thickness_nm else 0.0
        self._stores = AlignedStores(self.out, image.shape[:2], image.dtype, pixel_nm, thickness_nm, display=self.display)
        self._csv = TransformsCsv(self.out / TRANSFORMS)
        self._qclog = QCLog(self.out)

    def _process(self, record: dict[str, Any]) -> None:
        index = int(record["index"])
        if index in self._done:
            return
        image = self._read(record)
        if self._stores is None:
            self._open_outputs(record, image)
        shift, ready = self.pipeline.add(index, image)
        qc = self.monitor.add(index, image, shift)
        assert self._qclog is not None
        self._qclog.append(qc)
        for a in qc.alerts:
            if self.alert is not None:
                self.alert(a.message, LEVELS.get(a.level, "warning"), kind=a.kind, slice=a.index, value=a.value,
                           threshold=a.threshold)
        self._write_aligned(ready)
        self.processed += 1
        self.last_qc, self.last_shift = qc, shift
        if self.status is not None:
            self.status(self.summary())
        if self.processed % self.qc_settings.refresh_every == 0:
            self._draw()

    def _write_aligned(self, done: list[AlignedSlice]) -> None:
        if not done or self._stores is None or self._csv is None:
            return
        for a in done:
            self._stores.write(a.transform.index - (self._first_index or 0), a.image)
            self._csv.write(a.transform)
            self._done.add(a.transform.index)
            self.aligned += 1
            self._correlate(a.image)

    def _correlate(self, image: np.ndarray) -> None:
        if self.correlation is None or not self._pixel_um or not self._thickness_um:
            return
        if getattr(self.correlation, "announce", None) is None and self.alert is not None:
            alert = self.alert
            self.correlation.announce = lambda message, level: alert(message, level, kind="correlation")
        try:
            verdict = self.correlation.add(image, self._pixel_um, self._thickness_um)
        except Exception as exc:  # noqa: BLE001 - a failed check must not stop the alignment
            self._failed("the online correlation", exc)
            return
        if verdict is not None:
            log.info("online correlation: %s", verdict.message)

    def _draw(self) -> None:
        from ..qc.plots import write_drift_plot, write_qc_plot, write_reslices

        try:
            write_reslices(self.out)
            write_drift_plot(self.out)
            write_qc_plot(self.out)
        except Exception as exc:  # noqa: BLE001 - a picture is not worth stopping for
            log.warning("live analysis: plots not drawn: %s", exc)

    def summary(self) -> dict[str, Any]:
        """What the dashboard shows: the last slice's shift and QC values, and how far the fine stage is."""
        out: dict[str, Any] = {"processed": self.processed, "aligned": self.aligned}
        if self.last_shift is not None:
            out.update(slice=self.last_shift.index, dx=self.last_shift.dx, dy=self.last_shift.dy,
                       step=self.last_shift.step, confidence=self.last_shift.confidence)
        if self.last_qc is not None:
            out.update({k: self.last_qc.metrics.get(k) for k in ("ncc", "sharpness", "snr", "stripes", "brightness")})
            out["alerts"] = self.last_qc.kinds
        last = getattr(self.correlation, "last", None)
        if last is not None:
            out["correlation"] = {"state": last.state, "agreeing": last.agreeing, "em_droplets": last.em_droplets,
                                  "tre_um": last.tre_um, "depth_um": last.depth_um}
        return out
