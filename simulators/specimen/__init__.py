"""The simulated ground-truth specimen: one 3D world that both simulated instruments image.

``generate_world(SpecimenParams(...), seed)`` builds it; renderers (light in
:mod:`.lm`, electron in :mod:`.em`) draw it; :mod:`.truth` writes what every
accuracy claim is measured against.
"""

from .kinetics import UptakeKinetics, UptakeState
from .shapes import Cell, ParticleClusters, SphereSet, TubeSet
from .world import CellParams, EmbeddingParams, OrganelleParams, SpecimenParams, World, generate_world

__all__ = [
    "Cell",
    "CellParams",
    "EmbeddingParams",
    "OrganelleParams",
    "ParticleClusters",
    "SpecimenParams",
    "SphereSet",
    "TubeSet",
    "UptakeKinetics",
    "UptakeState",
    "World",
    "generate_world",
]
