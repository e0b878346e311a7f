"""Pictures of a grid finding: what was found, where, and where the target is (for people to check)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .find import GridFinding

__all__ = ["plot_grid_finding"]


def plot_grid_finding(
    image: NDArray, finding: GridFinding, path: str | Path, *, targets: dict[str, tuple[float, float]] | None = None,
    title: str = "",
) -> Path:
    """PNG of the image with bar crossings (+ measured, x predicted), square labels and targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    h, w = image.shape[:2]
    lo, hi = np.percentile(image, [0.5, 99.5])
    fig, ax = plt.subplots(figsize=(8, 8 * h / w), dpi=100)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    for crossing in finding.crossings():
        ax.plot(crossing["x"], crossing["y"], "+" if crossing["observed"] else "x", color="#00d0ff", ms=14, mew=2)
    for square in finding.squares():
        ax.text(square["x"], square["y"], square["label"], color="#ffd000", fontsize=16, ha="center", va="center",
                fontweight="bold", alpha=0.9)
    for name, (x, y) in (targets or {}).items():
        ax.plot(x, y, "o", mfc="none", mec="#ff3080", ms=18, mew=2)
        ax.text(x + 25, y - 25, name, color="#ff3080", fontsize=12)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
