"""Relocation benchmark: 50 random trials LM (10x overview) -> EM (SEM overview of the block).

Each trial places the specimen dish on the confocal stage at a random pose (any
rotation, mirrored or not), the objective's true pixel size off its nominal
value by up to 3 %, 10-20 % of the bars in view hidden by debris, camera noise.
A random cell is picked in the 10x overview, turned into grid coordinates,
and found again in an SEM overview of the embedded block (which the embedding
mirrors, rotates, shrinks and shears). The error is the distance between the
EM stage position predicted for the cell and its true position.

Goals (issue 4): median <= 1.5 um, 95th percentile <= 4 um, label accuracy
>= 99 % over squares with a visible glyph, no wrong-but-confident answer,
grid find on a 2048 x 2048 image <= 1 s on one core. Baseline: CLEMSite,
8.7 +/- 5.2 um (local model) on real samples.

Run: python benchmarks/bench_grid.py [--trials N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

from clemflow.grid.find import GridNotFound, find_grid  # noqa: E402
from clemflow.grid.registration import CameraGeometry, GridPosition, ImageView, register_grid  # noqa: E402
from clemflow.protocol.grid_scheme import MATTEK  # noqa: E402
from clemflow.simulators.specimen.em_overview import render_sem_overview  # noqa: E402
from clemflow.simulators.specimen.lm import Objective  # noqa: E402
from clemflow.simulators.specimen.overview import Damage, DishPose, render_posed_overview  # noqa: E402
from clemflow.simulators.specimen.world import EmbeddingParams, SpecimenParams, generate_world  # noqa: E402

LM_SHAPE = (1024, 1024)
EM_SHAPE = (2048, 2048)
EM_PIXEL = 1.0


def _labels_correct(finding, to_dish) -> tuple[int, int]:
    """(correct, total) labels over the squares the finding reports, against the dish truth."""
    correct = total = 0
    for square in finding.squares():
        dish = to_dish(np.array([square["x"], square["y"]]))
        truth = MATTEK.label(int(dish[0] // MATTEK.pitch_um), int(dish[1] // MATTEK.pitch_um))
        total += 1
        correct += square["label"] == truth
    return correct, total


def trial(rng: np.random.Generator, index: int) -> dict:
    embedding = EmbeddingParams(
        rotation_deg=float(rng.uniform(0, 360)), mirror=True, shrinkage=float(rng.uniform(0, 0.05)),
        shear=float(rng.uniform(-0.02, 0.02)),
    )
    world = generate_world(
        SpecimenParams(first_square=(3, 2), n_columns=3, n_rows=3, cells_per_square=3, embedding=embedding), seed=index
    )
    cell = world.cells[int(rng.integers(len(world.cells)))]
    target = np.array(cell.center_um, float)

    # LM: the dish at a random pose; the objective's true pixel differs from its nominal value.
    nominal = 1.3
    true_pixel = nominal * float(rng.uniform(0.97, 1.03))
    pose = DishPose(float(rng.uniform(0, 360)), tuple(rng.uniform(-2000, 2000, 2)), bool(rng.integers(2)), 1.0)
    objective = Objective("10x binned", 10.0, 0.3, 1.0, camera_pixel_um=13.0)
    view_centre = target + rng.uniform(-250, 250, 2)
    stage = pose.dish_to_stage(view_centre[None])[0]
    damage = Damage(bar_fraction=float(rng.uniform(0.1, 0.2)), glyphs_hidden=int(rng.integers(0, 2)), seed=index)
    lm_image, _ = render_posed_overview(world, pose, tuple(stage), true_pixel, LM_SHAPE, objective=objective,
                                        damage=damage, rng=index)
    h, w = LM_SHAPE
    target_stage = pose.dish_to_stage(target[None])[0]
    target_px = (target_stage - stage) / true_pixel + [(w - 1) / 2, (h - 1) / 2]  # where the operator clicks

    result = {"lm_found": False, "em_found": False, "error_um": float("nan"), "confident_wrong": False}
    try:
        lm = find_grid(lm_image, nominal, MATTEK)
    except GridNotFound as exc:
        result["reason"] = f"LM: {exc}"
        return result
    result["lm_found"] = lm.labelled
    c, t = _labels_correct(lm, lambda xy: pose.stage_to_dish(stage + (xy - [(w - 1) / 2, (h - 1) / 2]) * true_pixel))
    result["labels"] = [c, t]
    if lm.labelled and c < t:
        result["confident_wrong"] = True
    if not lm.labelled:
        result["reason"] = "LM labels not confident"
        return result
    position = GridPosition.from_grid_um(MATTEK, lm.image_to_grid_um(target_px[None])[0])

    # EM: an SEM overview of the block surface roughly where the target should be.
    block = world.to_em(np.array([[*target, 0.0]]))[0][:2]
    centre = block + rng.uniform(-150, 150, 2)
    em_image, _ = render_sem_overview(world, tuple(centre), EM_PIXEL, EM_SHAPE, dwell_s=4e-6, seed=index)
    try:
        em = find_grid(em_image, EM_PIXEL, MATTEK)
    except GridNotFound as exc:
        result["reason"] = f"EM: {exc}"
        return result
    hh, ww = EM_SHAPE
    c2, t2 = _labels_correct(em, lambda xy: world.to_lm(np.array([[*(centre + (xy - [(ww - 1) / 2, (hh - 1) / 2]) * EM_PIXEL), 0.0]]))[0][:2])
    result["labels"] = [c + c2, t + t2]
    if em.labelled and c2 < t2:
        result["confident_wrong"] = True
    result["em_found"] = em.labelled
    if not em.labelled:
        result["reason"] = "EM labels not confident"
        return result
    view = ImageView(EM_SHAPE, tuple(centre), CameraGeometry(EM_PIXEL))
    registration = register_grid([(em_image, view, em)])
    em_stage = registration.stage_of(position)
    result["error_um"] = float(np.linalg.norm(em_stage - block))
    result["predicted_um"] = registration.predicted_error_um(em_stage)
    return result


def grid_find_speed(repeats: int = 5) -> float:
    world = generate_world(SpecimenParams(), seed=1)
    pose = DishPose(33.0, (0.0, 0.0), False, 1.0)
    stage = pose.dish_to_stage(np.array([[2700.0, 2100.0]]))[0]
    image, _ = render_posed_overview(world, pose, tuple(stage), 0.65, (2048, 2048), rng=1)
    find_grid(image, 0.65, MATTEK)  # templates rendered once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        find_grid(image, 0.65, MATTEK)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
    results = []
    with Progress() as progress:
        task = progress.add_task("relocation trials", total=args.trials)
        for i in range(args.trials):
            results.append(trial(rng, i))
            progress.advance(task)
    errors = np.array([r["error_um"] for r in results if np.isfinite(r["error_um"])])
    labels = np.array([r.get("labels", [0, 0]) for r in results]).sum(0)
    failed = [r.get("reason") for r in results if not np.isfinite(r["error_um"])]
    confident_wrong = sum(r["confident_wrong"] for r in results)
    speed = grid_find_speed()
    print(f"trials: {len(results)}, relocated: {len(errors)}, refused: {len(failed)} {failed if failed else ''}")
    if len(errors):
        median, p95, worst = np.median(errors), np.percentile(errors, 95), errors.max()
        print(f"LM->EM relocation error: median {median:.2f} um (goal 1.5, ratio {median / 1.5:.2f}), "
              f"p95 {p95:.2f} um (goal 4, ratio {p95 / 4:.2f}), max {worst:.2f} um; CLEMSite baseline 8.7 +/- 5.2 um "
              f"(ratio of medians {median / 8.7:.3f})")
        predicted = np.array([r["predicted_um"] for r in results if np.isfinite(r["error_um"])])
        print(f"predicted error (median) {np.median(predicted):.2f} um; measured/predicted {median / np.median(predicted):.2f}")
    print(f"label accuracy: {labels[0]}/{labels[1]} = {labels[0] / max(labels[1], 1):.4f} (goal 0.99)")
    print(f"wrong but confident: {confident_wrong} (goal 0)")
    print(f"grid find, 2048 x 2048 at 10x, one core: {speed:.3f} s (goal 1 s, ratio {speed:.2f})")


if __name__ == "__main__":
    main()
