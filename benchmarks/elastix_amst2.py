"""elastix registration with AMST2's settings, the reference the alignment benchmark is measured against.

AMST2 (Hennies et al.) aligns a FIB-SEM stack in two stages, both by elastix:
a translation between neighbouring slices (Mattes mutual information, 2
resolutions x 256 iterations), then a B-spline of each pre-aligned slice
against the z-median of its 15 neighbours (4 resolutions x 1024 iterations,
256 px final grid spacing, Gaussian sigma 2 pre-filter). The parameter maps
below write those settings out so that the benchmark times the same work.

Runs in-process on one thread, through itk-elastix (``pip install -e ".[bench]"``);
SimpleITK stays untouched (never install simpleitk-simpleelastix beside it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

__all__ = [
    "BSplineResult",
    "bspline_parameters",
    "elastix_available",
    "elastix_bspline",
    "elastix_translation",
    "translation_parameters",
    "z_median_template",
]

INSTALL_HINT = 'itk-elastix is not installed: pip install -e ".[bench]"  (or pip install "itk-elastix>=0.20")'

_itk: Any = None


def _load_itk() -> Any:
    """Import itk once (about 10 s the first time) and keep it on one thread."""
    global _itk
    if _itk is None:
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
        _itk = itk
    return _itk


def elastix_available() -> bool:
    """Whether itk-elastix can be imported here."""
    try:
        _load_itk()
    except ImportError:
        return False
    return True


def _common(p: dict[str, list[str]]) -> dict[str, list[str]]:
    p.update(
        AutomaticTransformInitialization=["false"],
        AutomaticParameterEstimation=["true"],
        AutomaticScalesEstimation=["false"],
        Metric=["AdvancedMattesMutualInformation"],
        NumberOfHistogramBins=["32"],
        Optimizer=["AdaptiveStochasticGradientDescent"],
        ImageSampler=["RandomCoordinate"],
        NewSamplesEveryIteration=["true"],
        NumberOfSpatialSamples=["2048"],
        NumberOfSamplesForExactGradient=["4096"],
        MaximumNumberOfSamplingAttempts=["8"],
        CheckNumberOfSamples=["true"],
        MaximumStepLength=["0.5"],
        Interpolator=["BSplineInterpolator"],
        ResampleInterpolator=["FinalBSplineInterpolator"],
        FinalBSplineInterpolationOrder=["3"],
        DefaultPixelValue=["0"],
        WriteResultImage=["false"],
        WriteIterationInfo=["false"],
    )
    return p


def translation_parameters() -> dict[str, list[str]]:
    """AMST2's neighbour-to-neighbour translation: MI, 2 resolutions x 256 iterations."""
    p = _common({})
    p.update(
        Registration=["MultiResolutionRegistration"],
        Transform=["TranslationTransform"],
        FixedImagePyramid=["FixedSmoothingImagePyramid"],
        MovingImagePyramid=["MovingSmoothingImagePyramid"],
        NumberOfResolutions=["2"],
        MaximumNumberOfIterations=["256"],
        MaximumStepLength=["1.0"],
    )
    return p


def bspline_parameters() -> dict[str, list[str]]:
    """AMST2's fine stage: B-spline to the z-median template, 256 px final grid, 4 x 1024 iterations."""
    p = _common({})
    p.update(
        Registration=["MultiResolutionRegistration"],
        Transform=["BSplineTransform"],
        FixedImagePyramid=["FixedRecursiveImagePyramid"],
        MovingImagePyramid=["MovingRecursiveImagePyramid"],
        NumberOfResolutions=["4"],
        MaximumNumberOfIterations=["1024"],
        FinalGridSpacingInPhysicalUnits=["256"],
        GridSpacingSchedule=["4.0", "3.0", "2.0", "1.0"],
        HowToCombineTransforms=["Compose"],
        WriteResultImage=["true"],  # AMST2 keeps the registered slice; resampling is part of its cost
    )
    return p


def _normalise(image: NDArray[Any], sigma: float = 0.0) -> NDArray[np.float32]:
    """AMST2's pre-processing: optional Gaussian, then stretch the 5-95 % quantiles of the non-zero pixels to 0-255."""
    a = image.astype(np.float32)
    if sigma > 0:
        a = ndi.gaussian_filter(a, sigma)
    nz = a[a > 0]
    lo, hi = np.quantile(nz if nz.size else a, (0.05, 0.95))
    return np.clip((a - lo) * (255.0 / max(float(hi - lo), 1e-6)), 0, 255).astype(np.float32)


def _run(fixed: NDArray[np.float32], moving: NDArray[np.float32], params: dict[str, list[str]]) -> tuple[Any, Any]:
    itk = _load_itk()
    po = itk.ParameterObject.New()
    po.AddParameterMap(params)
    f = itk.GetImageFromArray(np.ascontiguousarray(fixed))
    m = itk.GetImageFromArray(np.ascontiguousarray(moving))
    return itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False, number_of_threads=1)


def elastix_translation(fixed: NDArray[Any], moving: NDArray[Any], sigma: float = 0.0) -> tuple[float, float, float]:
    """Register ``moving`` to ``fixed`` by translation; returns (dx, dy, seconds).

    dx, dy follow clemflow's convention: the shift *applied* to ``moving`` to
    put it onto ``fixed`` (+dx right, +dy down). elastix's parameters map fixed
    points into the moving image, so they are the negative of that. The time
    includes AMST2's pre-processing, which is part of what AMST2 pays per slice.
    """
    t0 = time.perf_counter()
    _, tp = _run(_normalise(fixed, sigma), _normalise(moving, sigma), translation_parameters())
    tx, ty = (float(v) for v in tp.GetParameterMap(0)["TransformParameters"])
    return -tx, -ty, time.perf_counter() - t0


@dataclass(frozen=True)
class BSplineResult:
    """What one AMST2 B-spline registration gave: its time and the registered slice."""

    seconds: float
    image: NDArray[np.float32]  # the moving slice resampled onto the template (pre-processed grey values)
    parameters: NDArray[np.float64]  # B-spline coefficients (x block, then y block), px


def elastix_bspline(fixed_template: NDArray[Any], moving: NDArray[Any], sigma: float = 2.0) -> BSplineResult:
    """Register ``moving`` to the z-median template by AMST2's B-spline (Gaussian sigma 2 first)."""
    t0 = time.perf_counter()
    result, tp = _run(_normalise(fixed_template, sigma), _normalise(moving, sigma), bspline_parameters())
    seconds = time.perf_counter() - t0
    coeffs = np.asarray([float(v) for v in tp.GetParameterMap(0)["TransformParameters"]])
    return BSplineResult(seconds, _load_itk().array_from_image(result).astype(np.float32), coeffs)


def z_median_template(stack: NDArray[Any], index: int, radius: int = 7) -> NDArray[Any]:
    """The z-median of slices index-radius..index+radius that exist: AMST's template for slice ``index``."""
    lo, hi = max(0, index - radius), min(len(stack), index + radius + 1)
    return np.median(np.asarray(stack[lo:hi]), axis=0).astype(stack.dtype)
