"""Uptake quantification (issue 10): per-image segmentation and per-cell metrics.

:mod:`.segment` finds cells, endolysosomes and particles in a confocal field
(projections for areas, plane by plane for volumes); :mod:`.measure` turns
them into one :class:`CellQuant` per cell; :mod:`.overlay` draws what was
found for a person to check.
"""

from .measure import CellQuant, ChannelRoles, ImageQuant, quantify_stack
from .overlay import write_overlay

__all__ = ["CellQuant", "ChannelRoles", "ImageQuant", "quantify_stack", "write_overlay"]
