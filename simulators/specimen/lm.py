"""Light-microscope images of the ground-truth specimen (widefield transmitted light, confocal fluorescence).

Image geometry: column index increases with dish x, row index with dish y,
and the image centre is the stage position: the centre of pixel (row i,
column j) of an (H, W) image lies at

    x = stage_x + (j - (W - 1) / 2) * pixel,   y = stage_y + (i - (H - 1) / 2) * pixel

(pixel (0, 0)'s centre is image coordinate (0, 0)). Camera rotation and flip
are the confocal simulator's business, not this module's.

Fluorescence is rendered analytically: each object is a Gaussian blob whose
variance is the PSF's plus the object's own (a uniform ball of radius r has
variance r²/5 per axis, a tube's cross-section r²/4), summed in small patches
around the objects of the field. The PSF is the usual Gaussian approximation
(Zhang, Zerubia & Olivo-Marin 2007, widefield/confocal paraxial fits):

    sigma_xy = 0.21 * lambda_em / NA,     sigma_z = 0.66 * lambda_em * n / NA²

(63x/1.4 oil at 520 nm: 78 nm and 266 nm; 10x/0.3 air: 364 nm and 3.8 µm).
Pixel values are dye density blurred by the normalised 3D PSF, i.e.
``brightness`` electrons/s per pixel inside a large stained volume, plus a
background rate, with Poisson shot noise and Gaussian read noise, then offset
and gain to uint16. ``focus_z_um`` is the focal plane's true height above the
glass (no oil/water focal shift).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage
from scipy.special import erf

from .glyphs import glyph_coverage

if TYPE_CHECKING:
    from .world import World

__all__ = [
    "CHANNELS",
    "OBJECTIVES",
    "STAINS",
    "Camera",
    "Objective",
    "Stain",
    "expected_lm",
    "field_coordinates",
    "psf_sigmas",
    "render_lm",
    "render_lm_stack",
]

Channel = Literal["TL", "405", "488", "639"]


@dataclass(frozen=True)
class Objective:
    """An objective on a camera with ``camera_pixel_um`` sensor pixels."""

    name: str
    magnification: float
    na: float
    immersion_index: float
    camera_pixel_um: float = 6.5

    @property
    def pixel_um(self) -> float:
        return self.camera_pixel_um / self.magnification


OBJECTIVES: dict[str, Objective] = {
    "10x": Objective("10x Plan-Apo 0.3 air", 10.0, 0.3, 1.0),
    "63x": Objective("63x Plan-Apo 1.4 oil", 63.0, 1.4, 1.518),
}

CHANNELS: dict[str, float] = {"405": 0.450, "488": 0.520, "639": 0.670}
"""Emission wavelength (µm) that sets the PSF of each excitation channel."""


@dataclass(frozen=True)
class Stain:
    """A stain: which structure it labels, seen in which channel, how bright.

    ``brightness``: electrons/s per pixel inside a large uniformly stained
    object at 63x/1.4 (for the particle dye: per particle, as if one particle
    were 1 µm³ of stain: a lone particle in focus gives about 20x this);
    ``cytoplasm``: diffuse signal of the cytoplasm relative to it.
    """

    channel: str
    structure: Literal["endolysosomes", "lipid_droplets", "mitochondria", "particles"]
    brightness: float
    cytoplasm: float = 0.0


STAINS: dict[str, Stain] = {
    "lysotracker": Stain("405", "endolysosomes", 6.0e4, cytoplasm=0.006),
    "bodipy": Stain("488", "lipid_droplets", 1.2e5, cytoplasm=0.003),
    "mitotracker": Stain("488", "mitochondria", 5.0e4, cytoplasm=0.01),
    "particle_dye": Stain("639", "particles", 12.0),
}


@dataclass(frozen=True)
class Camera:
    """sCMOS-like camera: electrons -> ADU = electrons / gain + offset, read noise in electrons."""

    gain_e_per_adu: float = 0.5
    offset_adu: float = 100.0
    read_noise_e: float = 1.6
    background_e_per_s: dict[str, float] = field(
        default_factory=lambda: {"405": 300.0, "488": 250.0, "639": 150.0, "TL": 0.0}
    )
    tl_e_per_s: float = 2.0e5
    """Transmitted-light electrons/s per pixel through clear glass."""


def psf_sigmas(objective: Objective, channel: str) -> tuple[float, float]:
    """(lateral, axial) Gaussian PSF sigma in µm for an objective and emission channel."""
    lam = CHANNELS.get(channel, 0.55)
    return 0.21 * lam / objective.na, 0.66 * lam * objective.immersion_index / objective.na**2


def field_coordinates(stage_x_um: float, stage_y_um: float, shape: tuple[int, int], pixel_um: float):
    """Pixel-centre dish coordinates: (xs (W,), ys (H,)) for an (H, W) image centred on the stage."""
    h, w = shape
    xs = stage_x_um + (np.arange(w) - (w - 1) / 2) * pixel_um
    ys = stage_y_um + (np.arange(h) - (h - 1) / 2) * pixel_um
    return xs, ys


def _objective(objective: str | Objective) -> Objective:
    if isinstance(objective, Objective):
        return objective
    try:
        return OBJECTIVES[objective]
    except KeyError:
        raise KeyError(f"unknown objective {objective!r}; known: {sorted(OBJECTIVES)}") from None


# -- fluorescence ------------------------------------------------------------------------------


def _splat(
    img: np.ndarray, xs: np.ndarray, ys: np.ndarray, px: np.ndarray, py: np.ndarray, sig: np.ndarray, amp: np.ndarray
) -> None:
    """Add amp * exp(-r²/2 sig²) blobs at (px, py) µm into img, in patches of +-4 sigma, grouped by patch size."""
    if len(amp) == 0:
        return
    h, w = img.shape
    pixel = xs[1] - xs[0]
    half = np.ceil(4 * sig / pixel).astype(np.int64)
    flat = img.reshape(-1)
    for k in np.unique(half):
        sel = np.flatnonzero(half == k)
        # process in chunks to bound memory
        step = max(1, 1_500_000 // (2 * k + 1) ** 2)
        off = np.arange(-k, k + 1)
        for s in range(0, len(sel), step):
            q = sel[s : s + step]
            cj = np.rint((px[q] - xs[0]) / pixel).astype(np.int64)
            ci = np.rint((py[q] - ys[0]) / pixel).astype(np.int64)
            jj = cj[:, None] + off  # (n, K)
            ii = ci[:, None] + off
            inv = -0.5 / sig[q] ** 2
            gx = np.exp((xs[0] + jj * pixel - px[q, None]) ** 2 * inv[:, None])
            gy = np.exp((ys[0] + ii * pixel - py[q, None]) ** 2 * inv[:, None]) * amp[q, None]
            okx = (jj >= 0) & (jj < w)
            oky = (ii >= 0) & (ii < h)
            gx *= okx
            gy *= oky
            jj = np.clip(jj, 0, w - 1)
            ii = np.clip(ii, 0, h - 1)
            patch = gy[:, :, None] * gx[:, None, :]
            index = ii[:, :, None] * w + jj[:, None, :]
            flat += np.bincount(index.reshape(-1), weights=patch.reshape(-1), minlength=h * w)


def _blob_terms(centers, var_obj, dose, box, focus_z, sig_xy, sig_z, pixel):
    """Lateral sigma and peak amplitude of each object's blob in the focal plane (objects out of reach dropped)."""
    s_l = np.sqrt(sig_xy**2 + var_obj)
    s_z = np.sqrt(sig_z**2 + var_obj)
    dz = centers[:, 2] - focus_z
    x0, y0, x1, y1 = box
    near = (np.abs(dz) < 5 * s_z) & (centers[:, 0] > x0 - 4 * s_l) & (centers[:, 0] < x1 + 4 * s_l)
    near &= (centers[:, 1] > y0 - 4 * s_l) & (centers[:, 1] < y1 + 4 * s_l)
    s_l, s_z, dz = s_l[near], s_z[near], dz[near]
    # dose (stained µm³, or particles) spread by the unit-integral 3D Gaussian: dye density at the blob centre
    amp = dose[near] * np.exp(-0.5 * (dz / s_z) ** 2) / ((2 * np.pi) ** 1.5 * s_l**2 * s_z)
    return centers[near, 0], centers[near, 1], s_l, amp


def _structure_blobs(world: "World", structure: str, box, focus_z, sig_xy, sig_z, pixel):
    """Centres, lateral sigmas and amplitudes (per unit brightness) of a structure's blobs near the plane."""
    x0, y0, x1, y1 = box
    pad = 2.0
    if structure in ("endolysosomes", "lipid_droplets"):
        s = world.endolysosomes if structure == "endolysosomes" else world.lipid_droplets
        idx = s.in_box(x0 - pad, y0 - pad, x1 + pad, y1 + pad)
        r = s.radius_um[idx]
        return _blob_terms(s.center_um[idx], r * r / 5, 4 / 3 * np.pi * r**3, box, focus_z, sig_xy, sig_z, pixel)
    if structure == "particles":
        c = world.clusters
        idx = c.in_box(x0 - pad, y0 - pad, x1 + pad, y1 + pad)
        r = c.radius_um[idx]
        return _blob_terms(c.center_um[idx], r * r / 5, c.n_particles[idx].astype(float), box, focus_z, sig_xy, sig_z, pixel)
    if structure == "mitochondria":
        t = world.mitochondria
        idx = t.in_box(x0 - pad, y0 - pad, x1 + pad, y1 + pad)
        p0, p1, r = t.p0_um[idx], t.p1_um[idx], t.radius_um[idx]
        length = np.linalg.norm(p1 - p0, axis=1)
        step = 0.7 * sig_xy
        n = np.maximum(np.ceil(length / step).astype(np.int64), 1)
        seg = np.repeat(np.arange(len(idx)), n)
        frac = (np.arange(seg.size) - np.repeat(np.cumsum(n) - n, n) + 0.5) / n[seg]
        pts = p0[seg] + frac[:, None] * (p1 - p0)[seg]
        dose = (np.pi * r**2 * length / n)[seg]
        return _blob_terms(pts, (r * r / 4)[seg], dose, box, focus_z, sig_xy, sig_z, pixel)
    raise ValueError(f"unknown structure {structure!r}")


def _coarse_cell_terms(world: "World", xs, ys, focus_z: float, sig_z: float, f: int = 4):
    """(cytoplasm, nucleus) fraction of the focal slab filled, on every f-th pixel (smooth: upsampled later)."""
    cx = xs[::f] if len(xs) > f else xs
    cy = ys[::f] if len(ys) > f else ys
    cyto_c = np.zeros((len(cy), len(cx)))
    nuc_c = np.zeros_like(cyto_c)
    cells = world.cells_near(xs[0], ys[0], xs[-1], ys[-1])
    s2 = np.sqrt(2) * sig_z

    def slab(lo, hi):  # fraction of the unit-integral axial Gaussian between lo and hi
        return 0.5 * (erf((hi - focus_z) / s2) - erf((lo - focus_z) / s2))

    step = f * (xs[1] - xs[0])
    for cell in cells:
        x0, y0, x1, y1 = cell.bbox_um
        jj = np.flatnonzero((cx >= x0 - step) & (cx <= x1 + step))
        ii = np.flatnonzero((cy >= y0 - step) & (cy <= y1 + step))
        if len(jj) == 0 or len(ii) == 0:
            continue
        X, Y = cx[jj][None, :], cy[ii][:, None]
        top = cell.height_at(X, Y)
        nb, nt = cell.nucleus_span_at(X, Y)
        whole = np.where(top > 0, slab(0.0, top), 0.0)
        inner = np.where(nt > nb, slab(nb, nt), 0.0)
        sl = np.ix_(ii, jj)
        cyto_c[sl] += whole - inner
        nuc_c[sl] += inner
    return cyto_c, nuc_c


def _upsample(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    zoom = (h / coarse.shape[0], w / coarse.shape[1])
    return ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="nearest")[:h, :w]


def _fluorescence(world, xs, ys, focus_z, obj: Objective, channel: str) -> np.ndarray:
    """Expected signal electrons/s per pixel in one fluorescence channel."""
    sig_xy, sig_z = psf_sigmas(obj, channel)
    pixel = xs[1] - xs[0]
    img = np.zeros((len(ys), len(xs)))
    box = (xs[0], ys[0], xs[-1], ys[-1])
    cyto_level = 0.0
    # brightness is quoted for 63x/1.4 (0.103 µm pixels); light per pixel scales with NA² and pixel area
    collect = (obj.na / 1.4) ** 2 * (pixel / 0.103) ** 2
    for name in world.params.stains:
        stain = STAINS.get(name)
        if stain is None:
            raise KeyError(f"unknown stain {name!r}; known: {sorted(STAINS)}")
        if stain.channel != channel:
            continue
        px, py, sl, amp = _structure_blobs(world, stain.structure, box, focus_z, sig_xy, sig_z, pixel)
        _splat(img, xs, ys, px, py, sl, amp * stain.brightness * collect)
        cyto_level += stain.cytoplasm * stain.brightness * collect
    if cyto_level > 0 and world.cells_near(xs[0], ys[0], xs[-1], ys[-1]):
        cyto, _ = _coarse_cell_terms(world, xs, ys, focus_z, sig_z)
        img += _upsample(cyto_level * cyto, img.shape)
    return img


# -- transmitted light -----------------------------------------------------------------------


def _bar_coverage(coords: np.ndarray, pitch: float, bar: float, blur: float, n_lines: int) -> np.ndarray:
    """Bar profile (1D) across bars centred on k * pitch, k = 0 .. n_lines, blurred by a Gaussian of sd ``blur``."""
    k = np.clip(np.rint(coords / pitch), 0, n_lines)
    d = coords - k * pitch
    s = np.sqrt(2) * blur
    return 0.5 * (erf((d + bar / 2) / s) - erf((d - bar / 2) / s))


def _transmitted(world, xs, ys, focus_z, obj: Objective) -> np.ndarray:
    """Transmission (0..1) of the dish: etched bars and labels darker, cells faint phase-like shading.

    Blur (diffraction plus defocus from the etched surface at z = 0) is applied
    analytically to the bars and locally to the glyphs; the cell terms are smooth.
    """
    grid = world.grid
    pixel = xs[1] - xs[0]
    lam = 0.55
    blur_um = float(np.sqrt((0.21 * lam / obj.na) ** 2 + (0.4 * abs(focus_z) * obj.na) ** 2 + pixel**2 / 12))
    ncol, nrow = grid.shape
    half = grid.bar_width_um / 2
    bx = _bar_coverage(xs, grid.pitch_um, grid.bar_width_um, blur_um, ncol)
    by = _bar_coverage(ys, grid.pitch_um, grid.bar_width_um, blur_um, nrow)
    inside_x = ((xs >= -half) & (xs <= ncol * grid.pitch_um + half)).astype(float)
    inside_y = ((ys >= -half) & (ys <= nrow * grid.pitch_um + half)).astype(float)
    bars = np.minimum(bx[None, :] * inside_y[:, None] + by[:, None] * inside_x[None, :], 1.0)
    etched = np.maximum(bars, glyph_coverage(world, xs, ys, blur_px=blur_um / pixel))
    t = 1.0 - 0.45 * etched
    # cells: thin phase objects; brightfield shows them faintly, darker where thick (nucleus) and at edges
    if world.cells_near(xs[0], ys[0], xs[-1], ys[-1]):
        f = 4
        sig_xy, sig_z = psf_sigmas(obj, "TL")
        cyto, nuc = _coarse_cell_terms(world, xs, ys, focus_z, max(sig_z, 2.0), f)
        thick = cyto + 1.6 * nuc
        gy, gx = np.gradient(thick, f * pixel)
        shade = 1.0 - 0.06 * thick - 0.12 * np.clip(np.hypot(gx, gy) * 1.5, 0, 1)
        t *= _upsample(shade, t.shape)
        # lipid droplets are refractile: small dark dots when in focus
        sig_xy_ld, sig_z_ld = psf_sigmas(obj, "488")
        box = (xs[0], ys[0], xs[-1], ys[-1])
        px, py, sl, amp = _structure_blobs(world, "lipid_droplets", box, focus_z, sig_xy_ld, sig_z_ld, pixel)
        if len(amp):
            dots = np.zeros_like(t)
            _splat(dots, xs, ys, px, py, np.hypot(sl, blur_um), amp * (sl / np.hypot(sl, blur_um)) ** 2)
            t *= 1.0 - 0.35 * np.clip(dots, 0, 1)
    return t


# -- public ----------------------------------------------------------------------------------


def expected_lm(
    world: "World",
    stage_x_um: float,
    stage_y_um: float,
    focus_z_um: float,
    objective: str | Objective = "63x",
    channel: Channel = "488",
    exposure_s: float = 0.1,
    shape: tuple[int, int] = (1024, 1024),
    camera: Camera = Camera(),
) -> np.ndarray:
    """Mean detected electrons per pixel (noise-free), float64 (H, W)."""
    obj = _objective(objective)
    xs, ys = field_coordinates(stage_x_um, stage_y_um, shape, obj.pixel_um)
    if channel == "TL":
        rate = camera.tl_e_per_s * _transmitted(world, xs, ys, focus_z_um, obj)
    elif channel in CHANNELS:
        rate = _fluorescence(world, xs, ys, focus_z_um, obj, channel) + camera.background_e_per_s.get(channel, 0.0)
    else:
        raise ValueError(f"unknown channel {channel!r}; use 'TL', '405', '488' or '639'")
    return rate * exposure_s


def _rng(rng: int | np.random.Generator | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _digitise(electrons: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Shot noise (Poisson; its Gaussian limit when every pixel expects > 1000 electrons) plus read noise."""
    if electrons.min() > 1000.0:
        counts = electrons + rng.standard_normal(electrons.shape) * np.sqrt(electrons + camera.read_noise_e**2)
    else:
        counts = rng.poisson(electrons).astype(np.float64)
        counts += rng.normal(0.0, camera.read_noise_e, counts.shape)
    adu = counts / camera.gain_e_per_adu + camera.offset_adu
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def render_lm(
    world: "World",
    stage_x_um: float,
    stage_y_um: float,
    focus_z_um: float,
    objective: str | Objective = "63x",
    channel: Channel = "488",
    exposure_s: float = 0.1,
    shape: tuple[int, int] = (1024, 1024),
    rng: int | np.random.Generator | None = 0,
    camera: Camera = Camera(),
) -> np.ndarray:
    """One camera frame (uint16, (H, W)) of the specimen; same arguments and integer seed, same frame."""
    mean = expected_lm(world, stage_x_um, stage_y_um, focus_z_um, objective, channel, exposure_s, shape, camera)
    return _digitise(mean, camera, _rng(rng))


def render_lm_stack(
    world: "World",
    stage_x_um: float,
    stage_y_um: float,
    z_um: np.ndarray,
    objective: str | Objective = "63x",
    channel: Channel = "488",
    exposure_s: float = 0.1,
    shape: tuple[int, int] = (1024, 1024),
    rng: int | np.random.Generator | None = 0,
    camera: Camera = Camera(),
) -> np.ndarray:
    """A z-stack (Z, H, W) uint16 at focal heights ``z_um``."""
    g = _rng(rng)
    return np.stack(
        [render_lm(world, stage_x_um, stage_y_um, float(z), objective, channel, exposure_s, shape, g, camera) for z in z_um]
    )
