"""PNG previews of a simulated specimen, for people: does it look like the microscopy it stands for?

Writes, into one folder: a 10x transmitted-light overview of the squares
around the target cell, a 63x confocal maximum projection (405 blue, 488
green, 639 magenta), an EM block-face slice through the cell and a reslice of
a short EM stack, each also as a copy with the truth drawn on (circles at the
true lipid droplets, endolysosomes and particle clusters), plus the truth files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .lm import OBJECTIVES, render_lm, render_lm_stack
from .truth import save_truth
from .world import SpecimenParams, World, generate_world

__all__ = ["write_preview", "pick_cell"]

_COLOURS = {"lipid_droplet": "#39ff14", "endolysosome": "#00bfff", "particle_cluster": "#ff00ff"}


def pick_cell(world: World) -> int:
    """The cell nearest the middle of the region: the preview's target."""
    centres = np.array([c.center_um for c in world.cells])
    mid = centres.mean(0)
    return int(np.argmin(np.linalg.norm(centres - mid, axis=1)))


def _stretch(img: np.ndarray, lo: float = 0.5, hi: float = 99.8) -> np.ndarray:
    a, b = np.percentile(img, [lo, hi])
    return np.clip((img.astype(np.float64) - a) / max(b - a, 1e-9), 0, 1)


def _save(path: Path, rgb: np.ndarray, circles=(), extent=None, title: str | None = None) -> None:
    """Save an image at one screen pixel per image pixel, with optional circles (x, y, r, colour) in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    h, w = rgb.shape[:2]
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(rgb, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for x, y, r, colour in circles:
        ax.add_patch(Circle((x, y), max(r, 1.5), fill=False, edgecolor=colour, linewidth=0.6))
    if title:
        ax.text(8, 8, title, color="yellow", fontsize=9, va="top", ha="left")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    fig.savefig(path, dpi=100)


def _lm_circles(world: World, cell_id: int, xs, ys, z_range=None):
    """Truth circles (pixel x, pixel y, pixel radius, colour) of a cell's objects in an LM field."""
    pixel = xs[1] - xs[0]
    out = []
    sets = [
        ("lipid_droplet", world.lipid_droplets.center_um, world.lipid_droplets.radius_um, world.lipid_droplets.cell_id),
        ("endolysosome", world.endolysosomes.center_um, world.endolysosomes.radius_um, world.endolysosomes.cell_id),
        ("particle_cluster", world.clusters.center_um, world.clusters.radius_um, world.clusters.cell_id),
    ]
    for name, c, r, cid in sets:
        sel = cid == cell_id
        if name == "particle_cluster":
            sel &= world.clusters.lysosome_index < 0  # clusters in endolysosomes are ringed by their lysosome
        for (x, y, _z), rr in zip(c[sel], r[sel]):
            out.append(((x - xs[0]) / pixel, (y - ys[0]) / pixel, rr / pixel, _COLOURS[name]))
    return out


def _tl_overview(world: World, cell_id: int, out: Path) -> list[Path]:
    cell = world.cells[cell_id]
    obj = OBJECTIVES["10x"]
    pitch = world.grid.pitch_um
    # centre on the crossing nearest the cell, so four labelled squares show
    cx = np.round(cell.center_um[0] / pitch) * pitch
    cy = np.round(cell.center_um[1] / pitch) * pitch
    shape = (1800, 1800)
    img = render_lm(world, cx, cy, 0.0, obj, "TL", exposure_s=0.02, shape=shape, rng=world.seed)
    grey = _stretch(img, 0.1, 99.9)
    xs = cx + (np.arange(shape[1]) - (shape[1] - 1) / 2) * obj.pixel_um
    ys = cy + (np.arange(shape[0]) - (shape[0] - 1) / 2) * obj.pixel_um
    p1 = out / "lm_10x_tl_overview.png"
    _save(p1, grey)
    circles = [
        ((c.center_um[0] - xs[0]) / obj.pixel_um, (c.center_um[1] - ys[0]) / obj.pixel_um, c.max_radius_um / obj.pixel_um, "#ff3030" if c.id == cell_id else "#ffa500")
        for c in world.cells_near(xs[0], ys[0], xs[-1], ys[-1])
    ]
    p2 = out / "lm_10x_tl_overview_truth.png"
    _save(p2, grey, circles, title=f"cells (target: cell {cell_id}, red)")
    return [p1, p2]


def _confocal_mip(world: World, cell_id: int, out: Path) -> list[Path]:
    cell = world.cells[cell_id]
    obj = OBJECTIVES["63x"]
    size = int(np.ceil(2 * cell.max_radius_um / obj.pixel_um / 64 + 1) * 64)
    shape = (size, size)
    z = np.arange(0.3, cell.height_um + 0.3, 0.3)
    rgb = np.zeros(shape + (3,))
    planes = {}
    for k, ch in enumerate(("405", "488", "639")):
        stack = render_lm_stack(world, *cell.center_um, z, obj, ch, 0.1, shape, rng=world.seed + k)
        planes[ch] = _stretch(stack.max(0), 1.0, 99.9)
    rgb[..., 2] += planes["405"]
    rgb[..., 1] += planes["488"]
    rgb[..., 0] += planes["639"]
    rgb[..., 2] += planes["639"]
    rgb = np.clip(rgb, 0, 1)
    xs = cell.center_um[0] + (np.arange(size) - (size - 1) / 2) * obj.pixel_um
    ys = cell.center_um[1] + (np.arange(size) - (size - 1) / 2) * obj.pixel_um
    p1 = out / "lm_63x_mip_composite.png"
    _save(p1, rgb)
    p2 = out / "lm_63x_mip_composite_truth.png"
    _save(p2, rgb, _lm_circles(world, cell_id, xs, ys), title="truth: droplets green, lysosomes cyan, free clusters magenta")
    return [p1, p2]


def _em_panels(world: World, cell_id: int, out: Path) -> list[Path]:
    try:
        from .em import face_coordinates, face_through, render_em_slice
    except ImportError:  # the EM renderer is optional for a preview
        return []
    cell = world.cells[cell_id]
    # the classic view: a face through the nucleus, cytoplasm and organelles either side
    target = np.array([cell.nucleus_center_um[0], cell.nucleus_center_um[1], 0.0])
    face = face_through(world, target)
    paths = []
    pixel_nm = 20.0
    w = int(np.ceil(2.1 * cell.max_radius_um * 1e3 / pixel_nm / 16) * 16)
    h = int(np.ceil((cell.height_um + 2.0) * 1e3 / pixel_nm / 16) * 16)
    v_mid = (cell.height_um + 2.0) / 2 - 0.5
    img, _ = render_em_slice(world, 0.0, (0.0, v_mid), pixel_nm, (w, h), seed=world.seed, face=face)
    grey = img.astype(float) / 255
    p1 = out / "em_slice.png"
    _save(p1, grey)
    # truth: objects cut by the face s = 0
    circles = []
    sets = [
        ("lipid_droplet", world.lipid_droplets.center_um, world.lipid_droplets.radius_um),
        ("endolysosome", world.endolysosomes.center_um, world.endolysosomes.radius_um),
        ("particle_cluster", world.clusters.center_um, world.clusters.radius_um),
    ]
    scale = float(abs(np.linalg.det(world.lm_to_em[:3, :3])) ** (1 / 3))
    p = pixel_nm * 1e-3
    for name, c, r in sets:
        near = np.flatnonzero(np.linalg.norm(c[:, :2] - target[:2], axis=1) < 2 * cell.max_radius_um)
        if len(near) == 0:
            continue
        suv = face_coordinates(world, c[near], face)
        rs = r[near] * scale
        cut = np.abs(suv[:, 0]) < rs
        for (s, u, v), rr in zip(suv[cut], rs[cut]):
            rr_cut = np.sqrt(max(rr * rr - s * s, 0.0))
            circles.append((u / p + (w - 1) / 2, (v - v_mid) / p + (h - 1) / 2, rr_cut / p, _COLOURS[name]))
    p2 = out / "em_slice_truth.png"
    _save(p2, grey, circles, title="truth: droplets green, lysosomes cyan, clusters magenta")
    paths += [p1, p2]

    # a short stack, resliced parallel to the block face (the plane an LM section sees)
    n, step = 48, 0.1
    depth = min(1.5, 0.5 * cell.height_um)
    sw, sh = w // 2, 64
    rows = []
    for k in range(n):
        s = (k - n / 2) * step
        im, _ = render_em_slice(world, s, (0.0, depth), 2 * pixel_nm, (sw, sh), seed=world.seed + k, face=face, slice_index=k)
        rows.append(im[sh // 2])
    res = np.array(rows, float) / 255
    # stretch the s axis to the same µm per pixel as u
    from scipy import ndimage

    res = ndimage.zoom(res, (step / (2 * p), 1.0), order=1)
    p3 = out / "em_reslice_su.png"
    _save(p3, res, title=f"EM stack resliced at {depth:.1f} um depth (rows: milling axis)")
    paths.append(p3)
    return paths


def write_preview(out: str | Path, seed: int = 0, params: SpecimenParams | None = None, em: bool = True) -> list[Path]:
    """Generate a world and write the preview PNGs and truth files into ``out``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = generate_world(params or SpecimenParams(), seed)
    cell_id = pick_cell(world)
    paths = _tl_overview(world, cell_id, out) + _confocal_mip(world, cell_id, out)
    if em:
        paths += _em_panels(world, cell_id, out)
    save_truth(world, out / "truth")
    return paths
