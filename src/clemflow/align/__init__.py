"""Alignment of FIB-SEM slices: streaming coarse phase correlation, then fine registration to a z-median template.

Live (``AlignmentPipeline`` fed by the slice stream) and offline (``clemflow align``) share this code.
"""

from .coarse import CoarseAligner
from .fine import AlignedSlice, align_fine
from .pipeline import AlignmentPipeline
from .transforms import CoarseShift, SliceTransform
from .warp import warp_slice

__all__ = ["AlignedSlice", "AlignmentPipeline", "CoarseAligner", "CoarseShift", "SliceTransform", "align_fine", "warp_slice"]
