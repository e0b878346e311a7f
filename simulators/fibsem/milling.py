"""Milling geometry: where ion-beam patterns land on the block, how far they move the face, the mill log.

Frames. The ion image frame is the block frame seen from above (x right,
y up), centred on the stage position plus the ion beam shift, in metres.
A site's faces are ``FaceGeometry(origin_um=site origin, azimuth_deg=0)``,
so the milling axis s is block +y: **+y of the ion image is +s**, and a
block point's s is ``y_um - origin_y_um``.

Face advance. Patterns are taken in order of their near (lower-s) edge.
A pattern *cuts* the face when it reaches it: its near edge is at most
``CONTACT_UM`` (0.1 µm, the beam tail) beyond the face and its far edge
beyond it; the face then moves to the far edge. A pattern wholly behind the
face (in the trench) removes nothing from it; one wholly beyond the face
with a gap (a fiducial, a separate pit) leaves the face where it is. The
removed thickness is ``face after - face before``; a partial mill (beam trip,
stop) removes that fraction of it.

Time. A cutting pattern takes (width x thickness it removed x depth) /
(yield x current); any other pattern takes its full width x height x depth,
as if the area were fresh resin (a trench, a fiducial).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidPattern, OutOfRange
from .state import LIMITS, Site, read_jsonl

__all__ = ["CONTACT_UM", "MILL_LOG", "MillPlan", "add_pit", "append_mill_log", "normalise_patterns", "plan_mill",
           "read_mill_log"]

CONTACT_UM = 0.1
MILL_LOG = "mill_log.jsonl"
KINDS = ("rectangle", "cleaning_cross_section")
SCAN_DIRECTIONS = ("top_to_bottom", "bottom_to_top", "left_to_right", "right_to_left")
MAX_PATTERNS = 64


def _field(p: Any, name: str, default: Any = None) -> Any:
    if isinstance(p, dict):
        return p.get(name, default)
    return getattr(p, name, default)


def normalise_patterns(patterns: Any, ion_hfw_m: float) -> list[dict[str, Any]]:
    """Dicts or objects with kind, center_m, width_m, height_m, depth_m[, scan_direction] -> checked dicts.

    Raises :class:`InvalidPattern` (malformed, outside the ion field) or :class:`OutOfRange` (sizes, depth).
    """
    out: list[dict[str, Any]] = []
    try:
        items = list(patterns)
    except TypeError as e:
        raise InvalidPattern("patterns must be a list") from e
    if not items:
        raise InvalidPattern("no patterns to mill")
    if len(items) > MAX_PATTERNS:
        raise InvalidPattern(f"{len(items)} patterns; at most {MAX_PATTERNS}")
    lo, hi = LIMITS["pattern_size_m"]
    dlo, dhi = LIMITS["mill_depth_m"]
    for i, p in enumerate(items):
        try:
            kind = str(_field(p, "kind", "rectangle"))
            cx, cy = (float(v) for v in _field(p, "center_m"))
            w, h, d = (float(_field(p, k)) for k in ("width_m", "height_m", "depth_m"))
            scan = str(_field(p, "scan_direction", "top_to_bottom") or "top_to_bottom")
        except (TypeError, ValueError) as e:
            raise InvalidPattern(f"pattern {i}: malformed ({e})", index=i) from e
        if kind not in KINDS:
            raise InvalidPattern(f"pattern {i}: unknown kind {kind!r}", index=i)
        if scan not in SCAN_DIRECTIONS:
            raise InvalidPattern(f"pattern {i}: unknown scan direction {scan!r}", index=i)
        for name, v in (("width_m", w), ("height_m", h)):
            if not lo <= v <= hi:
                raise OutOfRange(f"pattern {i}: {name} {v} outside {lo}..{hi} m", field=name, limits=(lo, hi))
        if not dlo <= d <= dhi:
            raise OutOfRange(f"pattern {i}: depth_m {d} outside {dlo}..{dhi} m", field="depth_m", limits=(dlo, dhi))
        half = ion_hfw_m / 2 * (1 + 1e-9)
        if abs(cx) + w / 2 > half or abs(cy) + h / 2 > half:
            raise InvalidPattern(f"pattern {i} reaches outside the ion field (field width {ion_hfw_m:g} m)", index=i)
        out.append({"kind": kind, "center_m": [cx, cy], "width_m": w, "height_m": h, "depth_m": d,
                    "scan_direction": scan})
    return out


@dataclass
class MillPlan:
    face_before_um: float
    face_after_um: float
    duration_s: float
    rects_um: list[list[float]]  # block frame (x0, y0, x1, y1)
    roles: list[str]  # per pattern: "cut", "behind_face", "beyond_face"

    @property
    def removed_um(self) -> float:
        return self.face_after_um - self.face_before_um


def plan_mill(site: Site, patterns: list[dict[str, Any]], field_center_um: tuple[float, float],
              current_a: float, voltage_v: float) -> MillPlan:
    """What the patterns will do to ``site`` and how long they take (see the module docstring)."""
    from .timing import mill_time_s

    fx, fy = field_center_um
    oy = site.origin_um[1]
    rects, spans = [], []
    for p in patterns:
        cx, cy = fx + p["center_m"][0] * 1e6, fy + p["center_m"][1] * 1e6
        w, h = p["width_m"] * 1e6, p["height_m"] * 1e6
        rects.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        spans.append((cy - h / 2 - oy, cy + h / 2 - oy))
    face = site.face_s_um
    roles = [""] * len(patterns)
    volume = 0.0
    for i in sorted(range(len(patterns)), key=lambda k: spans[k][0]):
        near, far = spans[i]
        w, d = patterns[i]["width_m"] * 1e6, patterns[i]["depth_m"] * 1e6
        if far > face and near <= face + CONTACT_UM:
            roles[i] = "cut"
            volume += w * (far - face) * d
            face = far
        else:
            roles[i] = "behind_face" if far <= face else "beyond_face"
            volume += w * (far - near) * d
    return MillPlan(site.face_s_um, face, mill_time_s(volume, current_a, voltage_v), rects, roles)


def add_pit(site: Site, rect: list[float], tol: float = 1e-3) -> None:
    """Record a milled area for ion images; merges into a pit with the same x extent it touches in y."""
    x0, y0, x1, y1 = rect
    for pit in site.pits:
        if abs(pit[0] - x0) < tol and abs(pit[2] - x1) < tol and y0 <= pit[3] + tol and y1 >= pit[1] - tol:
            pit[1], pit[3] = min(pit[1], y0), max(pit[3], y1)
            return
    site.pits.append([x0, y0, x1, y1])
    if len(site.pits) > 200:
        del site.pits[0]


def append_mill_log(state_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it."""
    with open(Path(state_dir) / MILL_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_mill_log(state_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every mill executed, oldest first (a line cut off by a crash is skipped)."""
    return read_jsonl(Path(state_dir) / MILL_LOG)
