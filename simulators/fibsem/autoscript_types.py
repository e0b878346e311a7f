"""Structures, enumerations and the exception of the AutoScript look-alike (SI units, radians).

Shapes follow ``autoscript_sdb_microscope_client.structures`` / ``.enumerations``
as far as clemflow uses them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = [
    "AdornedImage",
    "ApplicationServerException",
    "BeamType",
    "ErrorCode",
    "GrabFrameSettings",
    "ImagingDevice",
    "Limits",
    "PatterningState",
    "Point",
    "StagePosition",
]


class ErrorCode:
    """``ApplicationServerException.code`` values of this look-alike."""

    COMMUNICATION_LOST = 1  # the link to the microscope server is down (network_drop)
    NOT_CONNECTED = 2  # connect() was not called
    INVALID_VALUE = 3  # out of range, not an available value, malformed
    INVALID_STATE = 4  # not allowed now: busy, nothing to run, no image
    VACUUM_NOT_READY = 5  # refused by the vacuum interlock; nothing changed
    BEAM_OFF = 6  # the beam is off or tripped; refused, nothing changed
    BEAM_TRIPPED = 7  # the beam tripped during the operation (a mill may have partly run)
    ACQUISITION_TIMEOUT = 8  # the frame did not complete
    AUTOFUNCTION_FAILED = 9  # the autofunction diverged; settings left where it wandered
    STAGE_ERROR = 10  # the stage stopped part-way
    PATTERNING_FAILED = 11  # a pattern is invalid or milling failed
    ABORTED = 12  # stopped by stop() / stop_acquisition()


class ApplicationServerException(Exception):
    """What every failure raises: ``message`` and a numeric ``code`` (:class:`ErrorCode`)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"


class BeamType:
    ELECTRON = 1
    ION = 2


class ImagingDevice:
    ELECTRON_BEAM = 1
    ION_BEAM = 2


class PatterningState:
    IDLE = "Idle"
    RUNNING = "Running"


@dataclass
class Point:
    x: float = 0.0
    y: float = 0.0


@dataclass
class Limits:
    min: float
    max: float

    def __contains__(self, value: object) -> bool:
        return isinstance(value, (int, float)) and self.min <= float(value) <= self.max


@dataclass
class StagePosition:
    """Stage coordinates: x, y, z in m; r, t in radians; ``None`` = keep (in a move)."""

    x: float | None = None
    y: float | None = None
    z: float | None = None
    r: float | None = None
    t: float | None = None
    coordinate_system: str = "Raw"


@dataclass
class GrabFrameSettings:
    resolution: str = "1536x1024"
    dwell_time: float = 1e-6
    line_integration: int | None = None
    bit_depth: int = 8
    reduced_area: Any = None


class AdornedImage:
    """An image with its metadata: ``.data`` (H, W), ``.width``, ``.height``, ``.bit_depth``, ``.metadata``.

    ``metadata``: ``binary_result.pixel_size`` (Point, m), ``scan_settings`` (dwell_time,
    line_integration, scan_rotation rad, frame_time), ``optics`` (working_distance,
    scan_field_of_view Point, beam_type), ``beam`` (high_voltage, beam_current, beam_type),
    ``detector_settings`` (type, brightness, contrast), ``stage_settings.stage_position``
    (StagePosition), ``acquisition.acquisition_datetime``, ``metadata_as_ini`` (text) and, as a
    look-alike extra, ``instrument`` (the simulated instrument's own report, a dict).
    """

    def __init__(self, data: np.ndarray, metadata: Any) -> None:
        self.data = data
        self.metadata = metadata

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    @property
    def height(self) -> int:
        return int(self.data.shape[0])

    @property
    def bit_depth(self) -> int:
        return int(self.data.dtype.itemsize * 8)

    def save(self, path: str) -> None:
        import tifffile

        tifffile.imwrite(path, self.data, description=self.metadata.metadata_as_ini)


def adorn(data: np.ndarray, meta: dict[str, Any], detector_name: str) -> AdornedImage:
    """Wrap the instrument's frame and report in AutoScript's metadata shape."""
    st = meta["stage"]
    hfw = meta["horizontal_field_width_m"]
    md = SimpleNamespace(
        binary_result=SimpleNamespace(pixel_size=Point(*meta["pixel_size_m"]), bits_per_pixel=meta["bit_depth"]),
        scan_settings=SimpleNamespace(dwell_time=meta["dwell_s"], line_integration=meta["line_averaging"],
                                      scan_rotation=np.deg2rad(meta["scan_rotation_deg"]),
                                      frame_time=meta["frame_time_s"]),
        optics=SimpleNamespace(working_distance=meta["working_distance_m"],
                               scan_field_of_view=Point(hfw, hfw * data.shape[0] / data.shape[1]),
                               beam_type="Electron" if meta["beam"] == "electron" else "Ion"),
        beam=SimpleNamespace(high_voltage=meta["voltage_v"], beam_current=meta["current_a"],
                             beam_type="Electron" if meta["beam"] == "electron" else "Ion",
                             stigmator=Point(*meta["stigmation"]), beam_shift=Point(*meta["beam_shift_m"])),
        detector_settings=SimpleNamespace(type=detector_name, brightness=meta["brightness"], contrast=meta["contrast"]),
        stage_settings=SimpleNamespace(stage_position=StagePosition(st["x_m"], st["y_m"], st["z_m"],
                                                                    np.deg2rad(st["r_deg"]), np.deg2rad(st["t_deg"]))),
        acquisition=SimpleNamespace(acquisition_datetime=meta["end_time_iso"]),
        instrument=meta,
    )
    md.metadata_as_ini = "\n".join([
        "[Beam]", f"HV={meta['voltage_v']}", f"BeamCurrent={meta['current_a']}", f"WD={meta['working_distance_m']}",
        "[Scan]", f"PixelWidth={meta['pixel_size_m'][0]}", f"PixelHeight={meta['pixel_size_m'][1]}",
        f"Dwelltime={meta['dwell_s']}", f"LineIntegration={meta['line_averaging']}",
        f"HorFieldsize={meta['horizontal_field_width_m']}", f"FrameTime={meta['frame_time_s']}",
        "[Detectors]", f"Name={detector_name}",
        "[Stage]", f"StageX={st['x_m']}", f"StageY={st['y_m']}", f"StageZ={st['z_m']}",
        f"StageR={np.deg2rad(st['r_deg'])}", f"StageT={np.deg2rad(st['t_deg'])}",
        "[Simulator]", "Report=" + json.dumps({k: v for k, v in meta.items() if k != "truth"}, default=str),
    ]) + "\n"
    return AdornedImage(data, md)
