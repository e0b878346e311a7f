"""Deterministic 3D-continuous texture for the block face, cheap to sample.

Cytoplasm, nucleoplasm and lysosome content are granular at the 10-30 nm
scale. Rendering that from 3D noise per pixel is too slow for 2048x1536 in a
quarter second, so the texture is a stack of 2D layers, one every
``LAYER_SPACING_UM`` of milled depth, blended linearly between the two layers
around the face. Every layer is the same periodic base tile read at its own
seeded offset (a gather, no new noise), so layers are independent yet cost
nothing to make, and the texture is anchored to the block: faces 15 nm apart
share most of it, faces 150 nm apart share none.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

__all__ = ["TextureBank", "LAYER_SPACING_UM"]

LAYER_SPACING_UM = 0.04
TILE = 512


@lru_cache(maxsize=8)
def _base_tile(seed: int, sigma_texels: float, smooth_texels: float) -> NDArray[np.float32]:
    """Periodic band-limited noise of unit variance (before optional smoothing)."""
    rng = np.random.default_rng([seed, 7919])
    white = rng.standard_normal((TILE, TILE))
    k = np.fft.fftfreq(TILE)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    f = np.fft.fft2(white)
    fine = np.real(np.fft.ifft2(f * np.exp(-2 * np.pi**2 * k2 * sigma_texels**2)))
    # a second, 4x coarser component: the mottling of ribosome clusters and ER seen in real cytoplasm
    white2 = np.fft.fft2(rng.standard_normal((TILE, TILE)))
    coarse = np.real(np.fft.ifft2(white2 * np.exp(-2 * np.pi**2 * k2 * (4 * sigma_texels) ** 2)))
    tile = 0.8 * fine / fine.std() + 0.6 * coarse / coarse.std()
    tile /= tile.std()
    if smooth_texels > 0:  # area sampling at coarse pixels: averaging lowers the contrast
        tile = np.real(np.fft.ifft2(np.fft.fft2(tile) * np.exp(-2 * np.pi**2 * k2 * smooth_texels**2)))
    return tile.astype(np.float32)


class TextureBank:
    """Texture of one world at one texel size (µm)."""

    def __init__(self, seed: int, texel_um: float, sigma_texels: float, tag: int) -> None:
        self.seed = seed
        self.texel_um = texel_um
        self.sigma_texels = sigma_texels
        self.tag = tag

    def _offsets(self, k: int) -> tuple[int, int]:
        o = np.random.default_rng([self.seed, self.tag, k & 0x7FFFFFFF, int(k < 0)]).integers(0, TILE, 2)
        return int(o[0]), int(o[1])

    def sample(self, s_um: float, u_um: NDArray, v_um: NDArray, pixel_um: float) -> NDArray[np.float32]:
        """Texture on the grid v_um (rows) x u_um (columns) of the face at milled depth s_um."""
        smooth = 0.0
        ratio = pixel_um / self.texel_um
        if ratio > 1.5:
            smooth = round(0.4 * ratio, 1)
        tile = _base_tile(self.seed * 31 + self.tag, self.sigma_texels, smooth)
        kf = s_um / LAYER_SPACING_UM
        k = int(np.floor(kf))
        w = float(kf - k)
        # bilinear in the face plane, so that a sub-pixel shift of the raster shifts the texture exactly
        fu = np.asarray(u_um, float) / self.texel_um
        fv = np.asarray(v_um, float) / self.texel_um
        cu, rv = np.floor(fu).astype(np.int64), np.floor(fv).astype(np.int64)
        au = (fu - cu).astype(np.float32)[None, :]
        av = (fv - rv).astype(np.float32)[:, None]
        out = None
        for layer, weight in ((k, 1.0 - w), (k + 1, w)):
            if weight < 1e-6:
                continue
            oy, ox = self._offsets(layer)
            r0 = (rv + oy) % TILE
            rows = tile[r0] * (1 - av) + tile[(r0 + 1) % TILE] * av  # (H, TILE)
            c0 = (cu + ox) % TILE
            part = rows[:, c0]
            part += (rows[:, (c0 + 1) % TILE] - part) * au
            out = part * np.float32(weight) if out is None else out + part * np.float32(weight)
        assert out is not None
        norm = 1.0 / np.sqrt((1.0 - w) ** 2 + w**2)
        if abs(norm - 1.0) > 1e-6:
            out *= np.float32(norm)
        return out
