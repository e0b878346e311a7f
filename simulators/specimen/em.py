"""FIB-SEM block-face images of the ground-truth specimen.

What a slice-and-view run sees: the milled face of the resin block, imaged
with the in-column backscatter (EsB) detector and displayed inverted, as
FIB-SEM data usually is (osmium-dense = dark): clean resin light grey,
cytoplasm mid-grey and granular, membranes dark lines, heterochromatin dark
patches, mitochondria darker with cristae, lysosomes dark and mottled, lipid
droplets uniformly dark, nanoparticles black dots (the densest thing there).

Geometry (block frame, face frame, rows = depth below the block surface) is
described in :mod:`.em_geometry`. Each slice is rendered analytically: the
world's objects are moved into the face frame once per world
(:mod:`.em_scene`), and only those crossing the face are drawn, each in its
bounding box (:mod:`.em_draw`). Texture is a block-anchored 3D-continuous
field (:mod:`.em_texture`). Shot noise follows the electron dose: its SD
scales as 1/sqrt(dwell x line averaging x current).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .em_draw import LOOK, Canvas
from .em_geometry import FaceGeometry
from .em_imperfections import DriftModel, EMImperfections, apply_blur, charging_field, curtain_field
from .em_scene import CellFace, EMScene, get_scene
from .em_texture import TextureBank

__all__ = [
    "DISPLAY",
    "DriftModel",
    "EMImperfections",
    "FaceGeometry",
    "detected_electrons",
    "face_coordinates",
    "face_through",
    "render_em_slice",
]

Float = NDArray[np.float64]
F32 = NDArray[np.float32]

# detected backscattered electrons per pixel for density 1 at 10 µs total dwell and 1 nA
ELECTRONS_REF = 700.0
# display: grey = DISPLAY[0] - DISPLAY[1] * density (inverted backscatter)
DISPLAY = (215.0, 200.0)
_YIELD0, _YIELD1 = 0.15, 0.85  # BSE yield = _YIELD0 + _YIELD1 * density


def detected_electrons(dwell_s: float, line_averaging: int, current_pa: float) -> float:
    """Mean detected electrons per pixel for density 1: the dose that sets the shot noise."""
    return ELECTRONS_REF * (dwell_s * line_averaging / 10e-6) * (current_pa / 1000.0)


def face_coordinates(world: Any, points_dish_um: Float, face: FaceGeometry = FaceGeometry()) -> Float:
    """Dish-frame points (N, 3) -> face coordinates (s, u, v): where they appear in the slice stack."""
    return get_scene(world, face).frame.block_to_face(world.to_em(np.asarray(points_dish_um, float).reshape(-1, 3)))


def face_through(world: Any, point_dish_um: Float, azimuth_deg: float = 0.0) -> FaceGeometry:
    """A face geometry whose origin lies on the block surface right above a dish-frame point
    (so that point sits at s = u = 0, at depth v below the surface)."""
    b = world.to_em(np.asarray(point_dish_um, float).reshape(1, 3))[0]
    return FaceGeometry((float(b[0]), float(b[1])), float(azimuth_deg))


def _psf_sigma_nm(kv: float) -> float:
    """Beam interaction blur: grows with landing energy (1.5 kV -> ~3.7 nm)."""
    return 2.0 * max(kv, 0.3) ** 1.5


def _seed_of(seed: int | np.random.Generator | None, slice_index: int) -> np.random.Generator:
    """Noise stream: a given Generator, else one from (seed, slice index) so slices never share noise."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng([abs(int(seed or 0)), int(int(seed or 0) < 0), max(int(slice_index), 0)])


_DRIFTS: dict[tuple[int, EMImperfections], DriftModel] = {}
_TEXTURES: dict[tuple[int, str], TextureBank] = {}


def _texture(seed: int, kind: str) -> TextureBank:
    key = (seed, kind)
    if key not in _TEXTURES:
        if kind == "fine":
            _TEXTURES[key] = TextureBank(seed, 0.005, 1.2, 1)
        else:
            _TEXTURES[key] = TextureBank(seed, 0.01, 5.0, 2)
    return _TEXTURES[key]


def _draw_surface(cv: Canvas, scene: EMScene) -> None:
    """Above the block surface: the protective coating, then vacuum."""
    f = scene.frame
    az = f.dish0[2] + cv.s * f.dish_axes[0, 2] + cv.u * f.dish_axes[1, 2]
    vsurf = -az / f.dish_axes[2, 2]  # glass plane, per column
    if cv.v[0] > vsurf.max() + 2 * cv.edge:
        return
    rs = cv.rows(cv.v[0], vsurf.max() + 2 * cv.edge)
    d = (cv.v[rs][:, None] - vsurf[None, :]).astype(np.float32)  # > 0 inside the block
    coat = np.clip(0.5 + d / (2 * cv.edge), 0, 1)
    outside = 1 - coat
    dens = np.where(d < -1.0, np.float32(LOOK.vacuum), np.float32(LOOK.coating))
    cv.dens[rs] = cv.dens[rs] * coat + dens * outside
    cv.tex[rs] *= coat


def _cell_columns(cv: Canvas, scene: EMScene, cf: CellFace) -> tuple[slice, Float, Float, Float] | None:
    """Columns of the face crossing the cell and, per column, the bottom/top v and top slope."""
    if abs(cv.s - cf.s) > cf.reach:
        return None
    cs = cv.cols(cf.u - cf.reach, cf.u + cf.reach)
    if cs.start >= cs.stop:
        return None
    f = scene.frame
    u = cv.u[cs]
    base = f.dish0 + cv.s * f.dish_axes[0] + u[:, None] * f.dish_axes[1]  # (n, 3) dish point at v = 0
    av = f.dish_axes[2]
    vbot = -base[:, 2] / av[2]
    v = vbot.copy()
    h = np.zeros(len(u))
    for _ in range(4):  # v where dish z equals the top surface height (fixed point; shear is small)
        x = base[:, 0] + v * av[0]
        y = base[:, 1] + v * av[1]
        h = np.asarray(cf.cell.height_at(x, y), float)
        v = (h - base[:, 2]) / av[2]
    present = h > 0
    if not present.any():
        return None
    vtop = np.where(present, v, vbot)
    lo, hi = np.minimum(vbot, vtop), np.maximum(vbot, vtop)
    slope = np.gradient(hi, cv.p) if len(u) > 1 else np.zeros(len(u))
    cosine = 1.0 / np.sqrt(1.0 + slope * slope)
    return cs, lo, np.where(present, hi, -np.inf), cosine


def _draw_cell(cv: Canvas, scene: EMScene, cf: CellFace) -> None:
    got = _cell_columns(cv, scene, cf)
    if got is None:
        return
    cs, lo, hi, cosine = got
    band = 4 * max(cv.edge, cv.msig) + cv.p
    finite = np.isfinite(hi)
    rs = cv.rows(lo[finite].min() - band, hi[finite].max() + band)
    if rs.start >= rs.stop:
        return
    j0 = cs.start
    for rt, ct in cv.tiles(rs, cs):
        sub = slice(ct.start - j0, ct.stop - j0)
        h, l, c = hi[sub], lo[sub], cosine[sub]
        if not np.isfinite(h).any():
            continue
        vmin, vmax = cv.v[rt.start], cv.v[rt.stop - 1]
        if np.isfinite(h).all() and min(float(np.min((h - vmax) * c)), vmin - float(l.max())) > band:
            cv.dens[rt, ct] = LOOK.cytoplasm  # interior: flat fill, no membrane
            cv.tex[rt, ct] = LOOK.cytoplasm_tex
            continue
        if max(float(np.max(np.where(np.isfinite(h), h, -1e9) - vmin)), 0.0) < -band or vmax < float(l.min()) - band:
            continue
        v = cv.v[rt][:, None]
        d = -np.minimum((h[None, :] - v) * c[None, :], v - l[None, :]).astype(np.float32)  # positive outside
        d[:, ~np.isfinite(h)] = np.float32(10.0)
        cv.fill(rt, ct, d, LOOK.cytoplasm, LOOK.cytoplasm_tex)
        cv.membrane(rt, ct, d, 1.0)
    _draw_nucleus(cv, scene, cf)


def _draw_nucleus(cv: Canvas, scene: EMScene, cf: CellFace) -> None:
    q3 = cf.nucleus_q
    if not q3.any():
        return
    f = scene.frame
    e = f.dish0 + cv.s * f.dish_axes[0] - cf.nucleus_center
    au, av = f.dish_axes[1], f.dish_axes[2]
    quu, quv, qvv = au @ q3 @ au, au @ q3 @ av, av @ q3 @ av
    lu, lv, c0 = 2 * e @ q3 @ au, 2 * e @ q3 @ av, e @ q3 @ e
    m = np.array([[quu, quv], [quv, qvv]])
    minv = np.linalg.inv(m)
    lvec = np.array([lu, lv])
    w0 = -0.5 * minv @ lvec
    qmin = c0 - 0.25 * lvec @ minv @ lvec
    if qmin >= 1.0:
        return
    span = 1.0 - qmin
    a_min = float(np.sqrt(span / np.linalg.eigvalsh(m).max()))  # shortest semi-axis of the section
    band = 0.2 + 4 * max(cv.edge, cv.msig) + cv.p  # rim heterochromatin + envelope
    hu, hv = np.sqrt(span * minv[0, 0]) + band, np.sqrt(span * minv[1, 1]) + band
    rs, cs = cv.rows(w0[1] - hv, w0[1] + hv), cv.cols(w0[0] - hu, w0[0] + hu)
    if rs.start >= rs.stop or cs.start >= cs.stop:
        return
    r_in = max(1.0 - band / a_min, 0.0)

    def qf(u: NDArray, v: NDArray) -> NDArray:
        return c0 + lu * u + lv * v + quu * u * u + 2 * quv * u * v + qvv * v * v

    coarse_all = _texture(scene.seed, "coarse").sample(cv.s, cv.u[cs], cv.v[rs], cv.p)
    for rt, ct in cv.tiles(rs, cs):
        uu = np.array([cv.u[ct.start], cv.u[ct.stop - 1]])
        vv = np.array([cv.v[rt.start], cv.v[rt.stop - 1]])
        corners = qf(uu[None, :], vv[:, None])
        coarse = coarse_all[rt.start - rs.start : rt.stop - rs.start, ct.start - cs.start : ct.stop - cs.start]
        clumps = np.clip((coarse - np.float32(1.5)) * np.float32(1.2), 0, 1)
        if np.sqrt(max((corners.max() - qmin) / span, 0.0)) < r_in:  # interior tile
            cv.dens[rt, ct] = np.float32(LOOK.nucleoplasm) + np.float32(LOOK.heterochromatin) * clumps
            cv.tex[rt, ct] = LOOK.nucleoplasm_tex
            continue
        u = cv.u[ct][None, :]
        v = cv.v[rt][:, None]
        q = qf(u, v)
        gu = lu + 2 * quu * u + 2 * quv * v
        gv = lv + 2 * quv * u + 2 * qvv * v
        d = ((q - 1.0) / np.sqrt(gu * gu + gv * gv + 1e-12)).astype(np.float32)  # µm, positive outside
        if float(d.min()) > 4 * max(cv.edge, cv.msig):
            continue
        rim = np.clip(1.0 - (-d - 0.04) / 0.1, 0, 1) * np.clip(coarse + 1.2, 0, 1)
        nuc = np.float32(LOOK.nucleoplasm) + np.float32(LOOK.heterochromatin) * np.maximum(clumps, rim)
        cv.fill(rt, ct, d, nuc, LOOK.nucleoplasm_tex)
        env = 1.0 - 0.85 * np.clip((coarse - 1.5) * 4, 0, 1)  # nuclear pores: gaps in the envelope
        for off, amp in ((0.0, 1.0), (-0.03, 1.0)):
            x = (d - off) * (1.0 / cv.msig)
            cv.dens[rt, ct] += (np.float32(cv.mpeak * amp) * np.exp(-0.5 * x * x) * env).astype(np.float32)
        y = (d + 0.015) * (1.0 / 0.008)
        cv.dens[rt, ct] -= (0.05 * np.exp(-0.5 * y * y) * env).astype(np.float32)  # perinuclear space


def _density(scene: EMScene, s: float, u: Float, v: Float, pixel_um: float, kv: float) -> F32:
    psf = _psf_sigma_nm(kv) * 1e-3
    edge = max(psf, 0.5 * pixel_um)
    msig = float(np.sqrt(0.0025**2 + psf**2 + (0.4 * pixel_um) ** 2))
    cv = Canvas(s, u, v, pixel_um, edge, msig)
    _draw_surface(cv, scene)
    for cf in scene.cells:
        _draw_cell(cv, scene, cf)
    ves = scene.vesicles
    for i in ves.crossing(s):
        cv.sphere(ves.suv[i], float(ves.radius[i]), "vesicle")
    mi = scene.mitochondria
    for i in mi.crossing(s):
        cv.capsule(mi.a[i], mi.b[i], float(mi.radius[i]), scene.seed * 100003 + int(i))
    ly = scene.lysosomes
    for i in ly.crossing(s):
        cv.sphere(ly.suv[i], float(ly.radius[i]), "lysosome")
    ld = scene.droplets
    for i in ld.crossing(s):
        cv.sphere(ld.suv[i], float(ld.radius[i]), "droplet")
    cv.dens += cv.tex * _texture(scene.seed, "fine").sample(s, u, v, pixel_um)
    pa = scene.particles
    for i in pa.crossing(s):
        cv.sphere(pa.suv[i], float(pa.radius[i]), "particle")
    return cv.dens


def _detect(dens: F32, electrons: float, rng: np.random.Generator, detector: str) -> F32:
    """Shot noise on the backscatter signal, shown in the inverted display (grey levels, float).

    Detected electrons n ~ N * y(density), y = Y0 + Y1 * density; the display
    shows the density estimated from n, so the grey-level noise is
    DISPLAY[1] / (Y1 * N) * sqrt(N * y): SD falls as 1/sqrt(dose).
    """
    gain = np.float32(1.0 if detector == "EsB" else 0.6)  # in-lens SE: weaker material contrast
    y = np.maximum(np.float32(_YIELD0 / _YIELD1) + gain * dens, np.float32(1e-3))  # yield / Y1
    k = DISPLAY[1] / np.sqrt(electrons * _YIELD1)
    noise = rng.standard_normal(dens.shape, dtype=np.float32)
    np.sqrt(y, out=y)
    noise *= y
    grey = np.float32(DISPLAY[0]) - np.float32(DISPLAY[1]) * gain * dens
    grey -= np.float32(k) * noise
    return grey


def render_em_slice(
    world: Any,
    depth_um: float,
    center_um: tuple[float, float],
    pixel_size_nm: float = 5.0,
    shape: tuple[int, int] = (2048, 1536),
    dwell_s: float = 2e-6,
    line_averaging: int = 5,
    kv: float = 1.5,
    detector: Literal["EsB", "InLens"] = "EsB",
    imperfections: EMImperfections | None = None,
    seed: int | np.random.Generator | None = 0,
    *,
    face: FaceGeometry = FaceGeometry(),
    slice_index: int = 0,
    drift_model: DriftModel | None = None,
    beam_current_pa: float = 1000.0,
    scan_rotation_deg: float = 0.0,
    dtype: Literal["uint8", "uint16"] = "uint8",
) -> tuple[NDArray[np.uint8] | NDArray[np.uint16], dict[str, Any]]:
    """Render one block-face image; returns (image (H, W), metadata with the truth).

    ``depth_um``: milled position s of the face along the milling axis;
    ``center_um``: image centre (u, v) on the face; ``shape``: (W, H).
    Same arguments and integer seed give a bit-identical image.
    """
    imp = imperfections or EMImperfections()
    if detector not in ("EsB", "InLens"):
        raise ValueError(f"unknown detector {detector!r}: use 'EsB' or 'InLens'")
    w, h = int(shape[0]), int(shape[1])
    p = pixel_size_nm * 1e-3
    rng = _seed_of(seed, slice_index)
    scene = get_scene(world, face)
    meta: dict[str, Any] = {
        "face_depth_um": float(depth_um),
        "center_um": [float(center_um[0]), float(center_um[1])],
        "pixel_size_nm": float(pixel_size_nm),
        "shape_wh": [w, h],
        "dwell_s": float(dwell_s),
        "line_averaging": int(line_averaging),
        "kv": float(kv),
        "beam_current_pa": float(beam_current_pa),
        "detector": detector,
        "scan_rotation_deg": float(scan_rotation_deg),
        "slice_index": int(slice_index),
        "face_geometry": {"origin_um": list(face.origin_um), "azimuth_deg": face.azimuth_deg},
        "display": "inverted backscatter: dense (osmium, particles) dark",
        "frame_time_s": float(w * h * dwell_s * line_averaging),
    }
    # drift: the beam lands off target by (bx, by) nm in image axes; the content moves the other way
    bx = by = 0.0
    if imp.drift:
        model = drift_model
        if model is None:
            key = (int(seed) if isinstance(seed, int | np.integer) else 0, imp)
            model = _DRIFTS.setdefault(key, DriftModel.from_config(key[0], imp))
        bx, by = model.offset_nm(slice_index)
        meta["drift"] = {
            "beam_offset_nm": [bx, by],
            "image_shift_px": [-by / pixel_size_nm, -bx / pixel_size_nm],  # (row, col) content displacement
            "jump_slices": model.jumps(slice_index)[-5:],
        }
    ang = np.deg2rad(scan_rotation_deg)
    if abs(scan_rotation_deg) > 1e-9:  # render an upright canvas that covers the rotated frame
        cw = int(np.ceil(abs(w * np.cos(ang)) + abs(h * np.sin(ang)))) + 4
        ch = int(np.ceil(abs(w * np.sin(ang)) + abs(h * np.cos(ang)))) + 4
    else:
        cw, ch = w, h
    c, s_ = np.cos(ang), np.sin(ang)
    du, dv = c * bx - s_ * by, s_ * bx + c * by  # beam offset in face axes (nm)
    u = center_um[0] + du * 1e-3 + (np.arange(cw) - (cw - 1) / 2) * p
    v = center_um[1] + dv * 1e-3 + (np.arange(ch) - (ch - 1) / 2) * p
    dens = _density(scene, float(depth_um), u, v, p, kv)
    if imp.curtaining:
        field, truth = curtain_field(u, v, float(depth_um), scene.seed, imp.curtaining_strength)
        dens += field
        meta["curtaining"] = truth
    if cw != w or ch != h:
        dens = _rotate_crop(dens, ang, w, h)
    if imp.any_blur:
        dens, truth = apply_blur(dens, imp, pixel_size_nm)
        meta["blur"] = truth
    if imp.charging:
        field, truth = charging_field((h, w), scene.seed, slice_index, imp.charging_strength)
        dens += field
        meta["charging"] = truth
    electrons = detected_electrons(dwell_s, line_averaging, beam_current_pa)
    grey = _detect(dens, electrons, rng, detector)
    meta["electrons_per_pixel_density1"] = electrons
    if dtype == "uint16":
        img = np.clip(grey * np.float32(257.0), 0, 65535).astype(np.uint16)
    else:
        img = np.clip(grey + np.float32(0.5), 0, 255).astype(np.uint8)
    return img, meta


def _rotate_crop(canvas: F32, ang: float, w: int, h: int) -> F32:
    """Sample the rotated (w, h) frame out of an upright canvas (bilinear)."""
    from scipy import ndimage

    ch, cw = canvas.shape
    c, s = np.cos(ang), np.sin(ang)
    # output (i, j) -> canvas: rotate offsets from the centre by the scan rotation
    mat = np.array([[c, s], [-s, c]])
    out_c = np.array([(h - 1) / 2, (w - 1) / 2])
    in_c = np.array([(ch - 1) / 2, (cw - 1) / 2])
    offset = in_c - mat @ out_c
    return ndimage.affine_transform(canvas, mat, offset=offset, output_shape=(h, w), order=1, mode="nearest").astype(
        np.float32
    )
