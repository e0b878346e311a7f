"""Settings of the consumers: alignment, live QC, correlation, quantification, and output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, HttpUrl

from .base import ProtocolModel
from .units import Length

__all__ = ["Alignment", "Correlation", "LiveQC", "Notify", "Output", "Quantification"]


class Alignment(ProtocolModel):
    """Online slice alignment: coarse phase correlation, then fine registration to a z-median template."""

    coarse_binning: int | None = Field(None, ge=1, le=16, description="Binning before phase correlation; empty: automatic (about 512 px).")
    coarse_sigma_px: float = Field(1.0, ge=0, le=10, description="Gaussian pre-filter on the binned slice.")
    long_range_every: int = Field(8, ge=2, le=64, description="Distance of the long-range reference, in slices.")
    min_confidence: float = Field(6.0, gt=0, description="Peak-to-sidelobe ratio below which the fallback runs.")
    fine_model: Literal["none", "translation", "affine"] = Field(
        "affine", description="Fine registration to the z-median template. No B-spline: fitted freely it raises neighbour "
        "correlation while moving structures by pixels.")
    fine_radius: int = Field(7, ge=1, le=50, description="Half-width of the z-median template, in slices.")


class Notify(ProtocolModel):
    """Where alerts go besides the terminal and the journal."""

    command: str | None = Field(None, description="A command run with the alert text on standard input.")
    webhook: HttpUrl | None = Field(None, description="A URL that receives the alert as JSON.")


class LiveQC(ProtocolModel):
    """Thresholds for alerts during a slice-and-view run."""

    min_neighbour_ncc: float = Field(0.3, ge=-1, le=1)
    max_shift_px: float = Field(50.0, gt=0)
    min_sharpness_ratio: float = Field(0.6, gt=0, le=1, description="Alert below this fraction of the running median.")
    max_brightness_drift: float = Field(0.15, gt=0, le=1, description="Relative change of mean brightness.")
    max_stripe_energy: float = Field(0.2, gt=0, le=1, description="Share of energy in vertical stripes (curtaining).")
    refresh_every: int = Field(25, ge=1, description="Slices between refreshes of the PNG plots.")
    notify: Notify = Field(default_factory=Notify)


class Correlation(ProtocolModel):
    """Light-to-electron registration by lipid-droplet landmarks."""

    lm_channel: str = Field("488", description="Confocal channel with the droplet stain (BODIPY).")
    model: Literal["auto", "similarity", "similarity_z", "affine"] = "auto"
    min_inliers: int = Field(8, ge=4, le=1000)
    max_residual: Length = "0.5 um"  # type: ignore[assignment]
    update_every: int = Field(50, ge=1, description="Slices between online registration updates.")
    lm_stack: str | None = Field(
        None, description="Confocal z-stack (OME-TIFF) of the FIB-SEM target cell, relative to the protocol file; when "
        "given, the run checks online that it is milling that cell.")


class Quantification(ProtocolModel):
    """Uptake quantification, with the study's choices as defaults."""

    tophat_radius: Length = "1 um"  # type: ignore[assignment]
    gaussian_sigma: Length = "0.1 um"  # type: ignore[assignment]
    organelle_threshold: Literal["li", "otsu", "triangle"] = "li"
    cell_threshold: Literal["otsu", "li"] = "otsu"
    particle_block_size: Length = "5 um"  # type: ignore[assignment]
    particle_offset_sd: float = Field(3.0, ge=0, description="Particles are this many robust SDs above background.")
    particle_diameter: Length = Field(  # type: ignore[assignment]
        "55 nm",
        description="Diameter of one particle: the area a faint spot counts per particle it holds, since no light "
        "image resolves its size.",
    )
    min_cell_diameter: Length = "10 um"  # type: ignore[assignment]
    overlays_per_timepoint: int = Field(4, ge=0, le=100)


class Output(ProtocolModel):
    """Where and how data are written."""

    folder: str = Field("runs/{experiment}", description="Run folder; '{experiment}' is replaced by the experiment name.")
    image_format: Literal["ome-tiff", "ome-zarr"] = "ome-tiff"
