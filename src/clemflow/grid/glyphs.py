"""Templates of the characters etched on gridded coverslips, rendered from the scheme's alphabet.

No trained model and no download: each character is rasterised once in a bold
sans-serif face (DejaVu Sans Bold ships with matplotlib) at the scale the
reader works at, and cached.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

__all__ = ["char_template"]


@lru_cache(maxsize=512)
def char_template(char: str, height_px: int) -> NDArray[np.float32]:
    """Ink coverage (0..1) of one upright character whose ink box is `height_px` tall, with a 2 px margin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import PathPatch
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    path = TextPath((0, 0), char, size=1.0, prop=FontProperties(family="DejaVu Sans", weight="bold"))
    polygons = path.to_polygons(closed_only=True)
    points = np.concatenate(polygons)
    lo, hi = points.min(0), points.max(0)
    scale = height_px / (hi[1] - lo[1])
    width_px = int(np.ceil((hi[0] - lo[0]) * scale)) + 4
    full_height = height_px + 4
    figure = Figure(figsize=(width_px / 100, full_height / 100), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    place = Affine2D().translate(-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2).scale(scale).translate(
        width_px / 2, full_height / 2
    )
    axes.add_patch(PathPatch(place.transform_path(path), facecolor="black", edgecolor="none"))
    axes.set_xlim(0, width_px)
    axes.set_ylim(0, full_height)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return (1.0 - rgba[..., 0].astype(np.float32) / 255.0).copy()
