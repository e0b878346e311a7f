"""The confocal side: a controller that talks only to a CMMCorePlus, simulated or real."""
