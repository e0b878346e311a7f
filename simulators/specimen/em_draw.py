"""Cross-sections drawn into the density image, each in its own bounding box.

The canvas holds two float32 images over the face raster: ``dens`` (stain
density, 0 = clean resin, 1 = as dense as a nanoparticle) and ``tex`` (the
amplitude of the granular texture added at the end). Every drawing function
blends a region with a soft edge (half-width ``edge`` µm, the beam's
interaction blur or half a pixel, whichever is larger) and adds membranes as
Gaussian lines whose integral density is fixed, so thin membranes fade
rather than alias at coarse pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Canvas", "Look", "LOOK"]

F32 = NDArray[np.float32]
Float = NDArray[np.float64]
SQRT2PI = float(np.sqrt(2 * np.pi))


@dataclass(frozen=True)
class Look:
    """Stain densities and texture amplitudes (0 resin .. 1 particle)."""

    resin: float = 0.05
    resin_tex: float = 0.02
    coating: float = 0.85
    vacuum: float = -0.15
    cytoplasm: float = 0.31
    cytoplasm_tex: float = 0.09
    nucleoplasm: float = 0.25
    nucleoplasm_tex: float = 0.06
    heterochromatin: float = 0.26  # added on top of nucleoplasm
    membrane_nm: float = 2.6  # integral density of a membrane, density x nm
    mito: float = 0.5
    mito_tex: float = 0.05
    lysosome: float = 0.47
    lysosome_tex: float = 0.17
    droplet: float = 0.74
    droplet_tex: float = 0.012
    particle: float = 1.0
    vesicle_lumen: float = 0.16


LOOK = Look()


def _ramp(d: NDArray, edge: float) -> NDArray:
    """Inside weight from signed distance d (µm, positive outside)."""
    return np.clip(0.5 - d * (0.5 / edge), 0.0, 1.0)


class Canvas:
    """Density and texture-amplitude images over a face raster (u columns, v rows, µm)."""

    def __init__(self, s: float, u: Float, v: Float, pixel_um: float, edge_um: float, membrane_sigma_um: float) -> None:
        self.s = s
        self.u = u
        self.v = v
        self.p = pixel_um
        self.edge = edge_um
        self.msig = membrane_sigma_um
        h, w = len(v), len(u)
        self.dens = np.full((h, w), LOOK.resin, np.float32)
        self.tex = np.full((h, w), LOOK.resin_tex, np.float32)
        # membrane peak density such that peak * sigma * sqrt(2 pi) = integral
        self.mpeak = min(0.6, LOOK.membrane_nm * 1e-3 / (membrane_sigma_um * SQRT2PI))

    # -- boxes --------------------------------------------------------------

    def cols(self, lo: float, hi: float) -> slice:
        j0 = int(np.floor((lo - self.u[0]) / self.p))
        j1 = int(np.ceil((hi - self.u[0]) / self.p)) + 1
        return slice(max(j0, 0), max(min(j1, len(self.u)), 0))

    def rows(self, lo: float, hi: float) -> slice:
        i0 = int(np.floor((lo - self.v[0]) / self.p))
        i1 = int(np.ceil((hi - self.v[0]) / self.p)) + 1
        return slice(max(i0, 0), max(min(i1, len(self.v)), 0))

    def box(self, uc: float, vc: float, half: float) -> tuple[slice, slice] | None:
        rs, cs = self.rows(vc - half, vc + half), self.cols(uc - half, uc + half)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return None
        return rs, cs

    def tiles(self, rs: slice, cs: slice, size: int = 128):
        """Sub-boxes of a box, so that interiors can be filled flat and only boundaries computed."""
        for i in range(rs.start, rs.stop, size):
            for j in range(cs.start, cs.stop, size):
                yield slice(i, min(i + size, rs.stop)), slice(j, min(j + size, cs.stop))

    # -- primitives ---------------------------------------------------------

    def fill(self, rs: slice, cs: slice, d: NDArray, dens: float | NDArray, tex: float) -> NDArray:
        """Blend region d < 0 to density/texture; returns the inside weight."""
        w = _ramp(d, self.edge).astype(np.float32)
        sub = self.dens[rs, cs]
        sub += (np.float32(dens) - sub) * w if np.isscalar(dens) else (dens - sub) * w
        t = self.tex[rs, cs]
        t += (np.float32(tex) - t) * w
        return w

    def membrane(self, rs: slice, cs: slice, d: NDArray, scale: float = 1.0, offset: float = 0.0) -> None:
        x = (d - offset) * (1.0 / self.msig)
        self.dens[rs, cs] += (np.float32(self.mpeak * scale) * np.exp(-0.5 * x * x)).astype(np.float32)

    def disk_distance(self, rs: slice, cs: slice, uc: float, vc: float, rho: float) -> NDArray:
        du = (self.u[cs] - uc) ** 2
        dv = (self.v[rs] - vc) ** 2
        return np.sqrt(dv[:, None] + du[None, :]) - rho

    # -- objects ------------------------------------------------------------

    def sphere(self, center: Float, radius: float, kind: str) -> None:
        s_off = self.s - center[0]
        if abs(s_off) >= radius:
            return
        rho = float(np.sqrt(radius * radius - s_off * s_off))
        b = self.box(center[1], center[2], rho + 4 * max(self.edge, self.msig) + self.p)
        if b is None:
            return
        rs, cs = b
        d = self.disk_distance(rs, cs, center[1], center[2], rho).astype(np.float32)
        if kind == "droplet":
            self.fill(rs, cs, d, LOOK.droplet, LOOK.droplet_tex)
        elif kind == "lysosome":
            self.fill(rs, cs, d, LOOK.lysosome, LOOK.lysosome_tex)
            self.membrane(rs, cs, d, 1.3)
        elif kind == "vesicle":
            self.fill(rs, cs, d, LOOK.vesicle_lumen, LOOK.cytoplasm_tex * 0.3)
            self.membrane(rs, cs, d, 1.0)
        elif kind == "particle":
            w = _ramp(d, min(self.edge, 0.5 * self.p + 0.002)).astype(np.float32)
            sub = self.dens[rs, cs]
            sub += (np.float32(LOOK.particle) - sub) * w
            self.tex[rs, cs] *= 1 - w
        else:
            raise ValueError(kind)

    def capsule(self, a: Float, b: Float, radius: float, seed: int) -> None:
        """Mitochondrion: a capsule with a double membrane and tilted lamellar cristae."""
        ab = b - a
        length2 = float(ab @ ab)
        # part of the axis within reach of the face
        lo, hi = self.s - radius, self.s + radius
        if abs(ab[0]) > 1e-9:
            t0, t1 = sorted(((lo - a[0]) / ab[0], (hi - a[0]) / ab[0]))
            t0, t1 = max(t0, 0.0), min(t1, 1.0)
            if t0 > t1:
                return
        else:
            t0, t1 = 0.0, 1.0
        pa, pb = a + t0 * ab, a + t1 * ab
        pad = radius + 4 * max(self.edge, self.msig) + self.p
        rs = self.rows(min(pa[2], pb[2]) - pad, max(pa[2], pb[2]) + pad)
        cs = self.cols(min(pa[1], pb[1]) - pad, max(pa[1], pb[1]) + pad)
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return
        ds = self.s - a[0]
        du = (self.u[cs] - a[1])[None, :]
        dv = (self.v[rs] - a[2])[:, None]
        if length2 > 1e-12:
            t = np.clip((ds * ab[0] + du * ab[1] + dv * ab[2]) / length2, 0.0, 1.0)
        else:
            t = np.zeros((1, 1))
        es = ds - t * ab[0]
        eu = du - t * ab[1]
        ev = dv - t * ab[2]
        r = np.sqrt(es * es + eu * eu + ev * ev)
        d = (r - radius).astype(np.float32)
        if not (d < 2 * self.edge).any():
            return
        self.fill(rs, cs, d, LOOK.mito, LOOK.mito_tex)
        self.membrane(rs, cs, d, 1.0)
        self.membrane(rs, cs, d, 0.8, offset=-0.012)
        # cristae: planes with a tilted normal, spaced ~90 nm, inside the inner membrane
        rng = np.random.default_rng([seed, 7717])
        axis = ab / np.sqrt(length2) if length2 > 1e-12 else np.array([1.0, 0.0, 0.0])
        perp = np.cross(axis, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-12
        n = axis + rng.uniform(0.3, 1.2) * perp
        n /= np.linalg.norm(n)
        period = rng.uniform(0.075, 0.11)
        x = (ds * n[0] + du * n[1] + dv * n[2]) / period + rng.uniform()
        x = (x - np.floor(x) - 0.5) * period  # µm from the nearest crista mid-plane
        inner = np.clip((-d - 0.025) / 0.02, 0.0, 1.0)
        lumen = np.exp(-0.5 * (x / 0.006) ** 2)
        mem = np.exp(-0.5 * ((np.abs(x) - 0.011) / max(self.msig, 0.0035)) ** 2)
        self.dens[rs, cs] += ((0.2 * mem - 0.12 * lumen) * inner).astype(np.float32)
