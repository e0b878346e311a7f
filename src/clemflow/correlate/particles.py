"""Particles in context: clusters of nanoparticles in the EM volume, each placed in an endolysosome or the cytoplasm.

:func:`detect_clusters` (:mod:`.particles_detect`) finds the clusters;
:func:`classify_clusters` (:mod:`.particles_classify`) weighs the EM
surroundings of each and the LysoTracker signal at its place, and returns a
:class:`ClusterTable` with one row per cluster and a summary per cell.
"""

from __future__ import annotations

from .particles_classify import CLUSTER_COLUMNS, ClusterTable, classify_clusters, em_enclosure
from .particles_detect import ParticleClusters, density_scale, detect_clusters, particle_mask

__all__ = ["CLUSTER_COLUMNS", "ClusterTable", "ParticleClusters", "classify_clusters", "density_scale",
           "detect_clusters", "em_enclosure", "particle_mask"]
