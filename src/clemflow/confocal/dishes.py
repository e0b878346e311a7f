"""Putting a dish on the stage: the operator's job on a real confocal.

The session asks a `DishHandler` to place a dish before each timepoint and gets
back where on the stage to start looking for its grid. On a real instrument
that is a prompt to the operator; the simulator's handler (in
`clemflow.simulators.confocal.dishes`) puts the simulated dish back, a little
rotated and shifted, as a person would.
"""

from __future__ import annotations

from typing import Callable, Protocol

__all__ = ["DishHandler", "OperatorDishHandler"]


class DishHandler(Protocol):
    def place(self, sample: str, timepoint_index: int, guess_xy: tuple[float, float] | None) -> tuple[float, float]:
        """Have `sample` on the stage; return the stage position (µm) around which its grid lies."""
        ...


class OperatorDishHandler:
    """Asks the operator to put the dish on the stage and centre its labelled area under the objective."""

    def __init__(self, prompt: Callable[[str, float], bool], core) -> None:
        self.prompt = prompt
        self.core = core

    def place(self, sample: str, timepoint_index: int, guess_xy: tuple[float, float] | None) -> tuple[float, float]:
        where = f" (last time near stage x={guess_xy[0]:.0f}, y={guess_xy[1]:.0f} µm)" if guess_xy else ""
        if not self.prompt(f"Put dish {sample} on the stage and centre its target squares under the objective{where}.", 0.0):
            raise RuntimeError(f"dish {sample} was not placed on the stage")
        x, y = self.core.getXYPosition()
        return float(x), float(y)
