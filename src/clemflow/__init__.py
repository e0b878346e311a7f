"""clemflow: acquisition and control orchestrator for 3D correlative light and electron microscopy."""

__version__ = "0.1.0"
