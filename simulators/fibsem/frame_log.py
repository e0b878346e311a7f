"""The truth of every electron frame: where the sample and the face were in it (``frame_log.jsonl``).

Tracking code never sees this file on a real instrument; tests use it to
measure how well fiducial tracking held the sample, against what the
simulator really did (drift, beam shift, face position).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from .state import read_jsonl
from .view import ElectronView

__all__ = ["FRAME_LOG", "append_frame_log", "frame_record", "read_frame_log"]

FRAME_LOG = "frame_log.jsonl"
_lock = threading.Lock()


def frame_record(view: ElectronView, *, frame: int, mill: int, time_s: float, site_origin_um: tuple[float, float],
                 blanked: bool) -> dict[str, Any]:
    """One line of the log (see README "Frame truth")."""
    sx, sy = view.sample_offset_px()
    fx, fy = view.face_offset_px()
    return {
        "frame": int(frame),
        "mill": int(mill),
        "time": float(time_s),
        "face_s_um": view.face_s_um,
        "site_origin_um": [float(site_origin_um[0]), float(site_origin_um[1])],
        "drift_nm": [view.drift_nm[0], view.drift_nm[1]],
        "beam_shift_m": [view.shift_um[0] * 1e-6, view.shift_um[1] * 1e-6],
        "pixel_size_m": view.pixel_um * 1e-6,
        "shape": [view.width, view.height],
        "scan_rotation_deg": view.rotation_deg,
        "sample_offset_px": [sx, sy],
        "face_offset_px": [fx, fy],
        "face_rise_px": view.rise_um / view.pixel_um,
        "face_edge_row": view.face_edge_row(),
        "render_center_um": list(view.render_center_um),
        "blanked": bool(blanked),
    }


def append_frame_log(state_dir: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line (no fsync: truth for tests, not a safety record)."""
    with _lock, open(Path(state_dir) / FRAME_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_frame_log(state_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every electron frame's truth, oldest first (a line cut off by a crash is skipped)."""
    return read_jsonl(Path(state_dir) / FRAME_LOG)
