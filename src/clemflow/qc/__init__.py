"""Live quality control of FIB-SEM slices: per-slice measures, alerts against running baselines, and their log."""
