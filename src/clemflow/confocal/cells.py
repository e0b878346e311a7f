"""Pick cells to image in a low-magnification fluorescence overview (targets: automatic).

Transmitted light at 10x shows live cells too faintly to choose them; the
live stain of the first z-stack channel shows each cell as a bright patch tens
of micrometres across. Cells are the brightest blobs of the band-passed
overview inside the square, away from its edges and its label, returned in
grid coordinates.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from ..grid.registration import GridPosition, GridRegistration, ImageView

__all__ = ["pick_cells"]


def pick_cells(
    mosaic: NDArray, view: ImageView, registration: GridRegistration, square: str, count: int,
    cell_diameter_um: float = 25.0,
) -> list[GridPosition]:
    """Up to `count` cells in `square`, brightest blobs first, as grid positions."""
    scheme = registration.scheme
    pixel = view.camera.pixel_size_um
    image = mosaic.astype(np.float64)
    sigma = cell_diameter_um / 4 / pixel
    band = ndi.gaussian_filter(image, sigma) - ndi.gaussian_filter(image, 4 * sigma)
    noise = float(np.median(np.abs(band - np.median(band)))) * 1.4826 + 1e-9
    darkness = band / noise  # brightness of stained cells over the local background
    h, w = image.shape
    yy, xx = np.mgrid[0:h:2, 0:w:2]
    pixels = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    grid_xy = registration.to_grid(view.pixel_to_stage(pixels))
    cx, cy = scheme.square_center_um(square)
    half = scheme.pitch_um / 2 - scheme.bar_width_um / 2 - cell_diameter_um
    inside = (np.abs(grid_xy[:, 0] - cx) < half) & (np.abs(grid_xy[:, 1] - cy) < half)
    label_box = (np.abs(grid_xy[:, 0] - cx) < 1.3 * scheme.label_height_um) & (np.abs(grid_xy[:, 1] - cy) < 0.8 * scheme.label_height_um)
    allowed = np.zeros(image.shape, bool)
    keep = inside & ~label_box
    allowed[yy.ravel()[keep], xx.ravel()[keep]] = True
    allowed = ndi.binary_dilation(allowed, iterations=1)
    peaks = (darkness == ndi.maximum_filter(darkness, size=int(2 * sigma) | 1)) & allowed & (darkness > 4.0)
    rows, cols = np.nonzero(peaks)
    order = np.argsort(-darkness[rows, cols])[:count]
    chosen = np.stack([cols[order], rows[order]], 1).astype(float)
    positions = registration.to_grid(view.pixel_to_stage(chosen)) if len(chosen) else np.zeros((0, 2))
    return [GridPosition(square, (float(x - cx), float(y - cy))) for x, y in positions]
