"""What a correlation leaves on disk: the transform, the landmark table, and the light channels on the EM grid.

``transform.json`` is the result other tools consume, so its convention is
written into it; the landmark CSV lets a person see which droplet pairs carry
the result and how far each is off; the resampled channels are what one opens
beside the EM volume in Fiji or napari to check the fit by eye.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy import ndimage

from .blobs import Blobs
from .inputs import ElectronVolume, LightStack

__all__ = ["CONVENTION", "LANDMARK_COLUMNS", "read_transform", "resample_to_em", "write_landmarks", "write_lm_on_em",
           "write_transform"]

Voxel = tuple[float, float, float]
Progress = Callable[[int, int], None]

CONVENTION = ("matrix maps light-microscopy physical coordinates [x, y, z, 1] in µm to EM physical coordinates in "
              "µm (row-major 4x4, homogeneous); in both frames the origin is the centre of voxel (0, 0, 0), x runs "
              "along columns, y along rows and z along planes, scaled by each volume's voxel size")

LANDMARK_COLUMNS = ("lm_index", "em_index", "lm_x_um", "lm_y_um", "lm_z_um", "em_x_um", "em_y_um", "em_z_um",
                    "mapped_x_um", "mapped_y_um", "mapped_z_um", "residual_um", "loo_error_um", "lm_radius_um",
                    "em_radius_um")


def write_transform(path: str | Path, registration: Any, *, lm: LightStack, em: ElectronVolume,
                    extra: dict[str, Any] | None = None, channel: str | int | None = None) -> Path:
    """Write ``transform.json``: the LM -> EM matrix, the model and the evidence for it (inliers, residuals, TRE).

    ``registration`` is read by attribute (``matrix``, ``model``, ``mirrored``, ``scale``, ``z_scale``, ``pairs``,
    ``residuals_um``, ``loo_tre_um``, ``tre_estimate_um``, and ``candidates``/``models_tried`` when present).
    ``extra`` adds top-level entries (the command line, timings); it may not replace the ones written here.
    ``channel``: the LM channel the droplets were found in, when not ``lm.selected``.
    """
    used = lm.selected if channel is None else lm.channels[lm.index(channel)]
    matrix = _matrix(registration.matrix, "registration.matrix")
    pairs = np.asarray(getattr(registration, "pairs", np.zeros((0, 2))), int).reshape(-1, 2)
    doc: dict[str, Any] = {
        "matrix": matrix.tolist(),
        "inverse": np.linalg.inv(matrix).tolist(),
        "convention": CONVENTION,
        "model": getattr(registration, "model", None),
        "mirrored": bool(getattr(registration, "mirrored", np.linalg.det(matrix[:3, :3]) < 0)),
        "scale": getattr(registration, "scale", None),
        "z_scale": getattr(registration, "z_scale", None),
        "inliers": int(len(pairs)),
        "tre_estimate_um": getattr(registration, "tre_estimate_um", None),
        "loo_tre_um": _stats(getattr(registration, "loo_tre_um", None)),
        "residuals_um": _stats(getattr(registration, "residuals_um", None)),
        "lm": {"path": _path(lm.path), "voxel_um": list(lm.voxel_um), "channel": used,
               "channels": list(lm.channels), "shape_zyx": list(lm.data.shape[1:])},
        "em": {"path": _path(em.path), "voxel_um": list(em.voxel_um), "shape_zyx": list(em.shape),
               "dense_is_dark": em.dense_is_dark, **({"source": em.source} if em.source else {})},
    }
    for name in ("candidates", "models_tried"):
        if getattr(registration, name, None) is not None:
            doc[name] = getattr(registration, name)
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"extra entry {key!r} would replace the registration's own; give it another name")
        doc[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(doc), indent=2) + "\n", encoding="utf-8")
    return path


def read_transform(path: str | Path) -> np.ndarray:
    """The 4x4 LM -> EM matrix of a ``transform.json`` (or of any JSON holding a ``"matrix"``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); give the transform.json written by clemflow correlate") from None
    if not isinstance(doc, dict) or "matrix" not in doc:
        raise ValueError(f"{path}: no \"matrix\" entry; give the transform.json written by clemflow correlate")
    return _matrix(doc["matrix"], f"{path}: \"matrix\"")


def write_landmarks(path: str | Path, lm_blobs: Blobs, em_blobs: Blobs, registration: Any) -> Path:
    """One CSV row per matched droplet pair: both centres, where the transform puts the LM one, and the errors.

    ``residual_um`` is the distance from the mapped LM centre to the EM centre; ``loo_error_um`` the same with the
    pair left out of the fit (empty when the registration has no per-pair leave-one-out errors).
    """
    matrix = _matrix(registration.matrix, "registration.matrix")
    pairs = np.asarray(registration.pairs, int).reshape(-1, 2)
    lm_c, em_c = lm_blobs.center_um[pairs[:, 0]], em_blobs.center_um[pairs[:, 1]]
    mapped = lm_c @ matrix[:3, :3].T + matrix[:3, 3]
    residual = _per_pair(getattr(registration, "residuals_um", None), len(pairs))
    if residual is None:
        residual = np.linalg.norm(mapped - em_c, axis=1)
    loo = _per_pair(getattr(registration, "loo_tre_um", None), len(pairs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(LANDMARK_COLUMNS)
        for k, (i, j) in enumerate(pairs):
            row: list[Any] = [int(i), int(j)]
            row += [f"{v:.5f}" for v in (*lm_c[k], *em_c[k], *mapped[k], residual[k])]
            row.append("" if loo is None or not np.isfinite(loo[k]) else f"{loo[k]:.5f}")
            row += [f"{lm_blobs.radius_um[i]:.5f}", f"{em_blobs.radius_um[j]:.5f}"]
            writer.writerow(row)
    return path


def resample_to_em(lm_channel: np.ndarray, lm_voxel_um: Voxel, matrix: np.ndarray, em_shape: tuple[int, int, int],
                   em_voxel_um: Voxel, *, order: int = 1, em_origin_um: Voxel = (0.0, 0.0, 0.0),
                   out: Any = None, progress: Progress | None = None) -> Any:
    """One LM channel (Z, Y, X) sampled at every voxel of the EM grid; zero where the EM voxel maps outside the stack.

    Each EM voxel is mapped back into the LM stack (the inverse of ``matrix``) and interpolated there (``order`` 1:
    trilinear), one EM plane at a time, so memory beyond the result is one plane. ``em_origin_um`` (z, y, x) is
    where the grid's voxel (0, 0, 0) lies in the EM frame: a binned grid (say level 1 of an alignment store)
    samples the same frame more coarsely. ``out`` (an array, memmap or zarr array of ``em_shape``) receives the
    planes instead of a new float32 array; an integer ``out`` gets rounded, clipped values.
    """
    lm_channel = np.asarray(lm_channel)
    if lm_channel.ndim != 3:
        raise ValueError(f"lm_channel has shape {lm_channel.shape}; expected one channel (Z, Y, X)")
    A, b = _em_index_to_lm_index(_matrix(matrix, "matrix"), lm_voxel_um, em_voxel_um, em_origin_um)
    source = lm_channel.astype(np.float32, copy=False)
    if order > 1:
        source = ndimage.spline_filter(source, order=order, mode="mirror", output=np.float32)
    nz, ny, nx = (int(n) for n in em_shape)
    if out is None:
        out = np.zeros((nz, ny, nx), np.float32)
    elif tuple(out.shape) != (nz, ny, nx):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected the EM grid {(nz, ny, nx)}")
    kind = np.dtype(out.dtype)
    limits = (np.iinfo(kind).min, np.iinfo(kind).max) if np.issubdtype(kind, np.integer) else None
    plane = np.empty((1, ny, nx), np.float32)
    for k in range(nz):
        ndimage.affine_transform(source, A, offset=b + A[:, 0] * k, output_shape=(1, ny, nx), output=plane,
                                 order=order, mode="constant", cval=0.0, prefilter=False)
        if limits is not None:
            out[k] = np.clip(np.rint(plane[0]), *limits).astype(kind)
        else:
            out[k] = plane[0]
        if progress is not None:
            progress(k + 1, nz)
    return out


def write_lm_on_em(path: str | Path, lm: LightStack, matrix: np.ndarray, em_shape: tuple[int, int, int],
                   em_voxel_um: Voxel, *, em_origin_um: Voxel = (0.0, 0.0, 0.0),
                   progress: Progress | None = None) -> Path:
    """All LM channels resampled onto the EM grid, one OME-TIFF (C, Z, Y, X) with the EM's voxel size and the
    channel names: opened beside the EM volume it overlays it voxel for voxel.

    Integer stacks keep their type (rounded); the file is filled plane by plane through a memory map.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = lm.data.dtype if np.issubdtype(lm.data.dtype, np.integer) else np.dtype(np.float32)
    nz, ny, nx = (int(n) for n in em_shape)
    shape = (len(lm.channels), nz, ny, nx)
    ez, ey, ex = (float(v) for v in em_voxel_um)
    description = {"what": "light-microscopy channels resampled onto the EM grid", "lm_path": _path(lm.path),
                   "lm_voxel_um": list(lm.voxel_um), "matrix": _matrix(matrix, "matrix").tolist(),
                   "em_origin_um": list(em_origin_um), "convention": CONVENTION}
    ome = {"axes": "CZYX", "PhysicalSizeX": ex, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": ey,
           "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": ez, "PhysicalSizeZUnit": "µm",
           "Channel": {"Name": list(lm.channels)}, "Description": json.dumps(description)}
    if path.exists():
        path.unlink()
    data = tifffile.memmap(path, shape=shape, dtype=dtype, metadata=ome, ome=True,
                           bigtiff=int(np.prod(shape)) * dtype.itemsize > 2 ** 32 - 2 ** 26)
    total = len(lm.channels) * nz
    for c in range(len(lm.channels)):
        step = None if progress is None else (lambda done, _n, c=c: progress(c * nz + done, total))
        resample_to_em(lm.data[c], lm.voxel_um, matrix, (nz, ny, nx), em_voxel_um, em_origin_um=em_origin_um,
                       out=data[c], progress=step)
    data.flush()
    del data
    return path


# -- helpers ------------------------------------------------------------------------------------------------------

def _em_index_to_lm_index(matrix: np.ndarray, lm_voxel_um: Voxel, em_voxel_um: Voxel,
                          em_origin_um: Voxel) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with LM index (z, y, x) = A @ EM index (z, y, x) + b."""
    inv = np.linalg.inv(matrix)
    flip = np.eye(3)[::-1]  # (z, y, x) <-> (x, y, z)
    lin = flip @ inv[:3, :3] @ flip  # on (z, y, x) µm
    shift = flip @ inv[:3, 3]
    d_em = np.diag(np.asarray(em_voxel_um, float))
    d_lm_inv = np.diag(1.0 / np.asarray(lm_voxel_um, float))
    A = d_lm_inv @ lin @ d_em
    b = d_lm_inv @ (lin @ np.asarray(em_origin_um, float) + shift)
    return A, b


def _matrix(value: Any, what: str) -> np.ndarray:
    try:
        m = np.asarray(value, float)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: not a 4x4 matrix of numbers") from None
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"{what}: shape {m.shape}; expected a finite 4x4 homogeneous matrix")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"{what}: last row {m[3].tolist()}; an affine map has [0, 0, 0, 1]")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError(f"{what}: singular (determinant 0); it cannot map a volume")
    return m


def _stats(values: Any) -> dict[str, Any] | None:
    if values is None:
        return None
    v = np.asarray(values, float).reshape(-1)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    return {"n": int(v.size), "median": float(np.median(v)), "mean": float(v.mean()),
            "rms": float(np.sqrt(np.mean(v ** 2))), "p90": float(np.percentile(v, 90)), "max": float(v.max())}


def _per_pair(values: Any, n: int) -> np.ndarray | None:
    if values is None:
        return None
    v = np.asarray(values, float).reshape(-1)
    return v if len(v) == n else None


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "__dict__"):
        return _jsonable({k: v for k, v in vars(value).items() if not k.startswith("_")})
    return str(value)
