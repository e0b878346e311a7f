"""Light-to-electron correlation: lipid droplets as landmarks, particles in context.

Detection (:mod:`.detect_lm`, :mod:`.detect_em`) turns each modality into
droplet centres in physical µm; registration (:mod:`.register`) finds the
transform with no starting guess; :mod:`.particles` places the particle
clusters; :mod:`.outputs` writes what a person checks; :mod:`.online` runs it
while the FIB-SEM mills.
"""
