"""A segmentation overlay of one field, for a person to check that cells, endolysosomes and particles were found.

The projections are shown as a colour composite (mitochondria green,
endolysosomes magenta, nuclei blue, particles white), each channel stretched
between its 1st and 99.8th percentile (gamma 0.6, so that dim cytoplasm
shows). Outlines are drawn into the pixels (one
pixel wide, exact, and cheap even with thousands of puncta): measured cells
white with their label at the centroid, cells cut by the border orange and
marked "x", endolysosomes yellow, particles cyan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from .measure import ChannelRoles, ImageQuant

__all__ = ["composite", "write_overlay"]

_COLOURS = {  # role -> RGB
    "mitochondria": (0.1, 0.85, 0.1),
    "endolysosomes": (0.85, 0.1, 0.85),
    "nuclei": (0.15, 0.3, 1.0),
    "particles": (0.8, 0.8, 0.8),
}
_OUTLINE = {
    "cell": (1.0, 1.0, 1.0),
    "border_cell": (1.0, 0.55, 0.0),
    "endolysosomes": (1.0, 0.9, 0.0),
    "particles": (0.0, 0.9, 1.0),
}


def _stretch(image: NDArray) -> NDArray[np.float32]:
    """0..1 between the 1st and 99.8th percentile, gamma 0.6 so dim cytoplasm shows beside bright puncta."""
    img = np.asarray(image, np.float32)
    sample = img[:: max(1, img.shape[0] // 256), :: max(1, img.shape[1] // 256)]
    above = sample[sample > sample.min()]  # a blanked (all-minimum) patch is not the background
    lo, hi = np.percentile(above if above.size else sample, (1.0, 99.8))
    return np.clip((img - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0) ** np.float32(0.6)


def composite(mip: dict[str, NDArray], roles: ChannelRoles | None = None) -> NDArray[np.float32]:
    """(Y, X, 3) colour composite of the projections; channels without a role get grey."""
    roles = roles or ChannelRoles()
    colour_of = {getattr(roles, r): c for r, c in _COLOURS.items() if getattr(roles, r, None) is not None}
    images = list(mip.items())
    if not images:
        raise ValueError("the ImageQuant has no projections to draw (mip is empty)")
    rgb = np.zeros(images[0][1].shape + (3,), np.float32)
    for name, image in images:
        colour = np.asarray(colour_of.get(name, (0.5, 0.5, 0.5)), np.float32)
        rgb += _stretch(image)[..., None] * colour
    return np.clip(rgb, 0.0, 1.0)


def _edges(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    return mask & ~ndi.binary_erosion(mask, border_value=1)


def _label_edges(labels: NDArray) -> NDArray[np.bool_]:
    """Pixels of a label that touch another value (a different cell or background)."""
    lab = np.pad(labels, 1, mode="edge")
    core = lab[1:-1, 1:-1]
    diff = (core != lab[:-2, 1:-1]) | (core != lab[2:, 1:-1]) | (core != lab[1:-1, :-2]) | (core != lab[1:-1, 2:])
    return diff & (core > 0)


def write_overlay(path: str | Path, image_quant: ImageQuant, title: str | None = None) -> Path:
    """Write the segmentation overlay of one field as a PNG at the image's own resolution; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    q = image_quant
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = composite(q.mip, q.roles)
    rgb[_edges(q.endolysosomes)] = _OUTLINE["endolysosomes"]
    rgb[_edges(q.particles)] = _OUTLINE["particles"]
    border = np.zeros(int(q.labels.max()) + 1, bool)
    for c in q.cells:
        border[c.label] = c.touches_border
    flag = np.where(q.labels > 0, np.where(border[q.labels], 2, 1), 0).astype(np.uint8)
    outline = ndi.grey_dilation(np.where(_label_edges(q.labels), flag, 0), size=3)  # two pixels wide
    rgb[outline == 1] = _OUTLINE["cell"]
    rgb[outline == 2] = _OUTLINE["border_cell"]

    h, w = q.labels.shape
    dpi = 100
    _, py, px = q.voxel_um
    size = max(8.0, min(h, w) / 60)
    measured = [c for c in q.cells if not c.touches_border]
    caption = (f"{title}\n" if title else "") + (
        f"{len(measured)} cells measured, {q.excluded_at_border} cut by the border (x)\n"
        "outlines: cells white, endolysosomes yellow" + (", particles cyan" if q.roles.particles else ""))
    text_pt = max(7.0, size * 0.9)
    band = int(np.ceil((caption.count("\n") + 1) * text_pt * 1.3 * dpi / 72)) + 8  # the caption's lines, in pixels
    fig = plt.figure(figsize=(w / dpi, (h + band) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h / (h + band)))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    for c in q.cells:
        x, y = c.centroid_um[0] / px, c.centroid_um[1] / py
        if c.touches_border:
            ax.text(x, y, "x", color=_OUTLINE["border_cell"], fontsize=size * 1.6, ha="center", va="center",
                    fontweight="bold")
        else:
            ax.text(x, y, str(c.label), color="white", fontsize=size * 1.4, ha="center", va="center",
                    fontweight="bold", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"})
    fig.text(0.01, 1 - 4 / (h + band), caption, fontsize=text_pt, va="top", ha="left", color="black")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
