"""Frames of the simulated FIB-SEM: the electron beam sees the milled face, the ion beam the block surface.

Electron. A sample-fixed view (:mod:`.view`): ``render_em_slice`` at depth =
the current site's face position s, face ``FaceGeometry(site origin, 0)``,
centre ``ElectronView.render_center_um`` (u = stage offset along u + beam shift
x; v = ``V_CENTER_UM`` - beam shift y + ``FACE_RISE_PER_S`` x (face s - S0)),
rendered only over the rows that can show the face; the rows above the face
edge show the block surface ahead of it with its milled pits (:mod:`.surface`).
Pixel size = field width / width. The detector ``EsB`` renders as EsB,
``InLens`` and ``SE2`` as InLens.
Defocus: the renderer's Gaussian blur with ``focus_error_um = (WD - WD_true)``
(about 2.5 nm sigma per µm of error at its 5 mrad beam half-angle), where
``WD_true = WD_REF_M + (Z_REF_M - stage z) + 0.8 x (face s - S0_UM)`` (the face
recedes along the SEM axis by ~0.8 x each slice at 54 degrees); astigmatism
with ``stigmator_error_um = STIG_UM_PER_UNIT x (stigmation - true stigmation)``.
Drift, charging, curtaining: the instrument's ``EMImperfections`` (drift on by
default), drift indexed by the mill counter (:mod:`.drift`); drift moves the
face and the surface band together.

Ion. ``render_ion_image`` of the block surface centred on stage xy + ion beam
shift, pixel size = ion field width / width, incidence ``|tilt - 54|``
degrees, the milled areas (pits) of every site drawn; flipped so that +y is
up the image (the milling frame). No focus, rotation or stigmation effects.

Brightness and contrast (fractions): 0.5 / 0.5 leaves the renderer's grey
levels; otherwise ``grey = mid + (grey - mid) x 2^(4 (contrast - 0.5)) +
(brightness - 0.5) x full scale``. A blanked beam gives a dark, noisy frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..specimen.em import DriftModel, EMImperfections, FaceGeometry, render_em_slice
from ..specimen.em_geometry import face_frame
from ..specimen.em_overview import render_ion_image
from .state import S0_UM, WD_REF_M, Z_REF_M, BeamState, InstrumentState, Site
from .surface import pits_ahead, render_surface_band
from .view import ElectronView, electron_view

__all__ = ["STIG_UM_PER_UNIT", "apply_brightness_contrast", "blank_frame", "electron_view_now", "render_electron",
           "render_ion", "wd_true_m"]

STIG_UM_PER_UNIT = 20.0
EM_DETECTOR = {"EsB": "EsB", "InLens": "InLens", "SE2": "InLens"}


def wd_true_m(state: InstrumentState, site: Site | None) -> float:
    """Electron working distance that is in focus on the face now."""
    milled = (site.face_s_um - S0_UM) if site is not None else 0.0
    return WD_REF_M + (Z_REF_M - state.stage.z_m) + 0.8 * milled * 1e-6


def apply_brightness_contrast(img: NDArray, beam: BeamState) -> NDArray:
    if beam.brightness == 0.5 and beam.contrast == 0.5:
        return img
    full = 65535.0 if img.dtype == np.uint16 else 255.0
    mid = full / 2
    out = mid + (img.astype(np.float32) - mid) * 2.0 ** (4 * (beam.contrast - 0.5)) + (beam.brightness - 0.5) * full
    return np.clip(out + 0.5, 0, full).astype(img.dtype)


def blank_frame(width: int, height: int, bit_depth: int, seed: int) -> NDArray:
    rng = np.random.default_rng([seed, 77])
    grey = np.abs(rng.normal(0.0, 2.0, (height, width)))
    if bit_depth == 16:
        return (grey * 257).astype(np.uint16)
    return grey.astype(np.uint8)


def electron_view_now(world: Any, state: InstrumentState, site: Site, *, width: int, height: int,
                      drift_model: DriftModel | None) -> ElectronView:
    """The geometry of an electron frame taken now (see :mod:`.view`)."""
    beam = state.electron
    axes = face_frame(np.asarray(world.lm_to_em, float), FaceGeometry(tuple(site.origin_um), 0.0)).axes
    off = (state.stage.x_m * 1e6 - site.origin_um[0], state.stage.y_m * 1e6 - site.origin_um[1])
    drift = drift_model.offset_nm(int(state.mill_count)) if drift_model is not None else (0.0, 0.0)
    return electron_view(width=width, height=height, hfw_m=beam.hfw_m, face_s_um=site.face_s_um,
                         stage_offset_um=off, u_axis=(float(axes[1, 0]), float(axes[1, 1])),
                         beam_shift_m=beam.beam_shift_m, drift_nm=drift, rotation_deg=beam.scan_rotation_deg)


def render_electron(
    world: Any,
    state: InstrumentState,
    site: Site,
    *,
    width: int,
    height: int,
    dwell_s: float,
    line_averaging: int,
    bit_depth: int,
    imperfections: EMImperfections,
    drift_model: DriftModel | None,
    noise_seed: int,
    stig_true: tuple[float, float],
    grain_seed: int = 0,
) -> tuple[NDArray, dict[str, Any], ElectronView]:
    """The face and the surface ahead of it as the electron beam sees them now.

    Returns (image, metadata, view): metadata carries ``render_em_slice``'s own plus ``render`` (the exact
    arguments used, so a test can render the same face) and ``surface`` (the band above the face edge).
    """
    beam = state.electron
    face = FaceGeometry((float(site.origin_um[0]), float(site.origin_um[1])), 0.0)
    axes = face_frame(np.asarray(world.lm_to_em, float), face).axes
    view = electron_view_now(world, state, site, width=width, height=height, drift_model=drift_model)
    wd_err_um = (beam.working_distance_m - wd_true_m(state, site)) * 1e6
    stig_err = tuple(STIG_UM_PER_UNIT * (beam.stigmation[k] - stig_true[k]) for k in range(2))
    imp = imperfections.model_copy(
        update={
            "focus_error_um": imperfections.focus_error_um + wd_err_um,
            "stigmator_error_um": (imperfections.stigmator_error_um[0] + stig_err[0],
                                   imperfections.stigmator_error_um[1] + stig_err[1]),
        }
    )
    # the face is rendered only over the rows that can show it (no scan rotation: rows are lines of equal v)
    row0 = _first_face_row(view) if view.rotation_deg % 360.0 == 0.0 else 0
    u_c, v_c = view.render_center_um
    args: dict[str, Any] = {
        "depth_um": float(site.face_s_um),
        "center_um": (u_c, v_c + row0 * view.pixel_um / 2),
        "pixel_size_nm": beam.hfw_m / width * 1e9,
        "shape": (int(width), int(height) - row0),
        "dwell_s": float(dwell_s),
        "line_averaging": int(line_averaging),
        "kv": beam.voltage_v / 1000.0,
        "detector": EM_DETECTOR[beam.detector],
        "seed": int(noise_seed),
        "slice_index": int(state.mill_count),
        "beam_current_pa": beam.current_a * 1e12,
        "scan_rotation_deg": float(beam.scan_rotation_deg),
        "dtype": "uint16" if bit_depth == 16 else "uint8",
    }
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    if row0 < height:
        face_img, meta = render_em_slice(world, imperfections=imp, face=face, drift_model=drift_model, **args)
    else:  # the whole frame looks at the surface
        face_img, meta = np.zeros((0, width), dtype), {}
    img = face_img if row0 == 0 else np.concatenate([np.zeros((row0, width), dtype), face_img])
    meta["render"] = {**args, "center_um": list(args["center_um"]), "shape": list(args["shape"]),
                      "face_origin_um": list(face.origin_um), "imperfections": imp.model_dump(mode="json")}
    pits = pits_ahead(site.pits, site.origin_um, axes, site.face_s_um)
    band = render_surface_band(view, pits=pits, grain_seed=grain_seed, imperfections=imp, dwell_s=float(dwell_s),
                               line_averaging=int(line_averaging), current_pa=beam.current_a * 1e12,
                               detector=EM_DETECTOR[beam.detector], noise_seed=noise_seed)
    meta["surface"] = {"rows": None, "face_row0": row0, "face_edge_row": view.face_edge_row(),
                       "pits_uv_um": [list(p) for p in pits],
                       "drift_nm_per_slice": list(getattr(drift_model, "per_slice_nm", (0.0, 0.0)))}
    if band is not None:
        rows, grey, weight = band
        img = _compose(img, rows, grey, weight)
        meta["surface"]["rows"] = [rows.start, rows.stop]
    return apply_brightness_contrast(img, beam), meta, view


def _first_face_row(view: ElectronView) -> int:
    """First frame row that shows any of the face (above it, every pixel shows the surface only)."""
    edge = view.face_edge_row()  # v = 0 here; the surface band's weight is 1 where v < -pixel / 2
    return int(min(max(np.floor(edge - 0.5), 0), view.height))


def _compose(img: NDArray, rows: slice, grey: NDArray[np.float32], weight: NDArray[np.float32]) -> NDArray:
    """Blend the surface band (8-bit-scale grey) into the face image over ``rows``."""
    scale = np.float32(257.0) if img.dtype == np.uint16 else np.float32(1.0)
    full = 65535.0 if img.dtype == np.uint16 else 255.0
    face = img[rows].astype(np.float32)
    w = np.broadcast_to(weight, face.shape)
    out = face + w * (grey * scale - face)
    img = img.copy() if not img.flags.writeable else img
    img[rows] = np.clip(out + np.float32(0.5 if scale == 1 else 0.0), 0, full).astype(img.dtype)
    return img


def render_ion(
    world: Any,
    state: InstrumentState,
    *,
    width: int,
    height: int,
    dwell_s: float,
    line_averaging: int,
    bit_depth: int,
    noise_seed: int,
) -> tuple[NDArray, dict[str, Any]]:
    beam = state.ion
    center = (state.stage.x_m * 1e6 + beam.beam_shift_m[0] * 1e6, state.stage.y_m * 1e6 + beam.beam_shift_m[1] * 1e6)
    milled = [tuple(p) for s in state.sites for p in s.pits]
    incidence = min(abs(state.stage.t_deg - 54.0), 80.0)
    img, meta = render_ion_image(
        world,
        center,
        pixel_size_um=beam.hfw_m / width * 1e6,
        shape=(int(width), int(height)),
        incidence_deg=incidence,
        dwell_s=dwell_s * line_averaging,
        milled=milled,  # type: ignore[arg-type]
        seed=int(noise_seed),
    )
    img = np.ascontiguousarray(img[::-1])
    meta["frame"] = "EM block frame: columns +x_em, rows -y_em (+y up the image), centred on stage + ion beam shift"
    if bit_depth == 16:
        img = img.astype(np.uint16) * np.uint16(257)
    return apply_brightness_contrast(img, beam), meta
