"""A simulated operator who puts each dish on the simulated stage before each timepoint.

Each dish is one specimen world (same cells at every timepoint, uptake that
follows the hours since treatment). Between timepoints the dish is taken out
and put back: a few degrees of rotation and a few hundred micrometres of shift,
drawn from a seeded generator, so the grid has to be found again.
"""

from __future__ import annotations

import numpy as np

from clemflow.simulators.specimen.overview import DishPose
from clemflow.simulators.specimen.world import SpecimenParams, generate_world

from .context import SimulatedMicroscope

__all__ = ["SimulatedDishHandler"]


class SimulatedDishHandler:
    def __init__(
        self,
        microscope: SimulatedMicroscope,
        samples: dict[str, tuple[int, bool]],
        timepoints_s: list[float],
        *,
        seed: int = 0,
        rotation_deg: float = 8.0,
        shift_um: float = 250.0,
        params: SpecimenParams | None = None,
    ) -> None:
        """`samples`: id -> (world seed, treated). Controls get no particles."""
        self.microscope = microscope
        self.samples = samples
        self.timepoints_s = timepoints_s
        self.rng = np.random.default_rng(seed)
        self.rotation_deg = rotation_deg
        self.shift_um = shift_um
        self.params = params or SpecimenParams(cells_per_square=4)
        self.poses: dict[tuple[str, int], DishPose] = {}
        self._base = {name: DishPose(float(self.rng.uniform(-20, 20)), (0.0, 0.0), False, 1.0) for name in samples}

    def place(self, sample: str, timepoint_index: int, guess_xy: tuple[float, float] | None) -> tuple[float, float]:
        world_seed, treated = self.samples[sample]
        hours = self.timepoints_s[timepoint_index] / 3600.0 if treated else None
        world = generate_world(self.params.model_copy(update={"hours_since_treatment": hours}), seed=world_seed)
        base = self._base[sample]
        pose = DishPose(
            base.rotation_deg + float(self.rng.uniform(-self.rotation_deg, self.rotation_deg)),
            tuple(float(v) for v in self.rng.uniform(-self.shift_um, self.shift_um, 2)),
            False,
            1.0,
        )
        self.poses[(sample, timepoint_index)] = pose
        for other in list(self.microscope.dishes):
            self.microscope.remove_dish(other)
        self.microscope.place_dish(sample, world, pose)
        # The operator centres the region roughly: within a tenth of a square.
        centre = np.array(world.params.first_square) + np.array([world.params.n_columns, world.params.n_rows]) / 2
        centre_dish = centre * world.grid.pitch_um + self.rng.uniform(-60, 60, 2)
        x, y = pose.dish_to_stage(centre_dish[None])[0]
        return float(x), float(y)
