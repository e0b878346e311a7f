"""Drift of the simulated electron image: the renderer's random walk plus a steady linear part.

A real slice-and-view run drifts steadily (thermal settling of the stage,
charging) as well as randomly, and the steady part is what walks a fiducial
out of the field over a long run; tests dial it per mill to make that happen
in a few dozen slices.
"""

from __future__ import annotations

from ..specimen.em import DriftModel, EMImperfections

__all__ = ["SimDrift", "drift_config"]


class SimDrift(DriftModel):
    """``DriftModel`` offsets plus ``per_slice_nm`` x the mill counter.

    ``offset_nm(i)`` is where the electron beam lands relative to where it is
    aimed at mill counter ``i``, image axes (x right, y down), nm; the image
    content moves the other way (see :mod:`.imaging`).
    """

    def __init__(self, seed: int, step_nm: float = 3.0, jump_probability: float = 0.01, jump_nm: float = 150.0,
                 per_slice_nm: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__(seed, step_nm, jump_probability, jump_nm)
        self.per_slice_nm = (float(per_slice_nm[0]), float(per_slice_nm[1]))

    def offset_nm(self, slice_index: int) -> tuple[float, float]:
        x, y = super().offset_nm(slice_index)
        return x + self.per_slice_nm[0] * slice_index, y + self.per_slice_nm[1] * slice_index


def drift_config(
    imperfections: EMImperfections,
    *,
    step_nm: float | None = None,
    per_slice_nm: tuple[float, float] = (0.0, 0.0),
    jump_probability: float | None = None,
    jump_nm: float | None = None,
) -> EMImperfections:
    """The electron imperfections with the drift options applied (``None`` keeps the renderer's value).

    Asking for a linear drift switches drift on; if it was off, the random walk and jumps stay at
    zero unless asked for, so the drift is exactly the linear part.
    """
    update: dict[str, object] = {}
    linear = tuple(per_slice_nm) != (0.0, 0.0)
    if linear and not imperfections.drift:
        update.update(drift=True, drift_step_nm=0.0, drift_jump_probability=0.0)
    if step_nm is not None:
        update["drift_step_nm"] = float(step_nm)
    if jump_probability is not None:
        update["drift_jump_probability"] = float(jump_probability)
    if jump_nm is not None:
        update["drift_jump_nm"] = float(jump_nm)
    return imperfections.model_copy(update=update) if update else imperfections
