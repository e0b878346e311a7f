"""Where data and records go: the run folder and its journal."""
