"""Registration layer 1: what the driver, the checks and both backends share.

The image pyramid (:func:`pyramid_image`), the crop of a resampled image's fill
(:func:`without_resampling_fill`), the metric's sampling (:func:`sampling_fraction`,
``MIN_SAMPLES``, ``HISTOGRAM_BINS``, ``SAMPLING_SEED``: one value for both backends), coarse
grids (:func:`coarse_grid_like`), the centroid of a mask (:func:`mask_centroid_lps`) and the one
result type every backend returns (:class:`BackendResult`, and ``Backend``, the signature of a
backend). Plain functions on ``SimpleITK`` images, no state. Imports only ``pipeline.core``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.core.geometry import as_float32, run_filter

# Lower bound on the number of metric samples per level. The configured sampling fraction is
# tuned for ~256x256x64 volumes; on a small, heavily shrunk grid 5 % of the voxels inside the
# body is only a few hundred samples, too few for a stable MI gradient (ENG-DEFAULT).
MIN_SAMPLES = 12_000
# Mattes MI histogram bins (both backends): 32 is plenty for ~10^4 samples (more bins -> noisier
# PDF estimate).
HISTOGRAM_BINS = 32
# Fixed seed of the metric's random sampling (both backends): the same pair always gives the same
# result.
SAMPLING_SEED = 20240601
# A boundary plane of a resampled image is the resampler's fill (``resample_to``'s default 0.0
# where the source was not imaged), not anatomy, when its share of exact zeros exceeds the
# median plane's along that axis by more than this (ENG-DEFAULT: a tilted slab edge crossing a
# slice leaves it 20-70 % fill on the liver development seed 82; scanner-zeroed air is in every
# plane alike and cancels against the median).
FILL_EXCESS_FRACTION = 0.05
# Never crop more than this share of an axis's planes from one side (a sanity bound).
FILL_MAX_CROP_FRACTION = 0.25


def without_resampling_fill(image: sitk.Image) -> sitk.Image:
    """``image`` cropped to the planes that hold no resampler fill at its boundary.

    Why: the pipeline registers the pre-contrast series resampled onto the post-contrast grid
    (``pre_registered``); where the pre-contrast slab did not reach, the resampler wrote 0.0. That
    edge is in no anatomy, and between two studies it is at a different place: a metric and the
    peak test align the two fills. On the liver development seed 82 the follow-up -> baseline
    registration of the resampled images erred 3-7 mm along z (one or two 3 mm slices) where the
    same pairs as acquired registered within 0.7-0.9 mm. Each side of each axis loses the
    boundary planes whose share of exact zeros exceeds the median plane's by
    ``FILL_EXCESS_FRACTION``; the crop keeps physical coordinates, so a transform found on it
    applies to the whole image.
    """
    zero = sitk.GetArrayFromImage(image) == 0
    lo, hi = [0, 0, 0], list(image.GetSize())
    for axis_xyz in range(3):
        axis = 2 - axis_xyz  # numpy axes are (z, y, x)
        others = tuple(k for k in range(3) if k != axis)
        share = zero.mean(axis=others)
        limit = float(np.median(share)) + FILL_EXCESS_FRACTION
        n = len(share)
        most = int(n * FILL_MAX_CROP_FRACTION)
        start = 0
        while start < most and share[start] > limit:
            start += 1
        stop = n
        while n - stop < most and share[stop - 1] > limit:
            stop -= 1
        lo[axis_xyz], hi[axis_xyz] = start, stop
    if lo == [0, 0, 0] and hi == list(image.GetSize()):
        return image
    return sitk.RegionOfInterest(image, [h - l for l, h in zip(lo, hi)], lo)


@dataclass
class BackendResult:
    """What a backend returns: the transform it found and how the optimisation went."""

    transform: sitk.Transform
    iterations: int  # summed over stages and levels
    stop_condition: str  # per stage and level
    converged: bool  # the last (finest) optimisation stopped before its iteration cap


# One function per backend: (fixed, moving, metric mask, initial transform, stage, first step
# in mm, threads, device=...) -> BackendResult; raises RuntimeError on a failed optimisation.
Backend = Callable[..., BackendResult]


def pyramid_image(image: sitk.Image, shrink: int, sigma_mm: float, threads: int) -> sitk.Image:
    """Smooth by ``sigma_mm`` (physical units) then bin-shrink to ~``shrink`` x the finest spacing.

    The shrink factor is applied in physical terms, per axis: with 1.5 mm x 1.5 mm x 3 mm voxels
    and ``shrink=2`` the in-plane axes are binned by 2 and the slice axis by 1, giving ~3 mm
    isotropic voxels. SimpleITK's built-in pyramid shrinks every axis by the same voxel count,
    which would leave 12 mm slices at ``shrink=4`` on typical 3 mm acquisitions.
    """
    img = as_float32(image)
    if sigma_mm > 0:
        g = sitk.SmoothingRecursiveGaussianImageFilter()
        g.SetSigma(float(sigma_mm))
        img = run_filter(g, img, threads=threads)
    finest = min(image.GetSpacing())
    factors = [max(1, int(round(shrink * finest / s))) for s in image.GetSpacing()]
    factors = [min(f, max(1, n // 4)) for f, n in zip(factors, image.GetSize())]
    if any(f > 1 for f in factors):
        b = sitk.BinShrinkImageFilter()
        b.SetShrinkFactors(factors)
        img = run_filter(b, img, threads=threads)
    return img


def sampling_fraction(fixed_level: sitk.Image, mask_fraction: float, cfg_fraction: float) -> float:
    """Metric sampling fraction on a pyramid level: the configured one, raised to give at least
    ``MIN_SAMPLES`` points inside the mask (``mask_fraction``: share of the grid in the mask)."""
    n_in_mask = max(1.0, float(np.prod(fixed_level.GetSize())) * max(mask_fraction, 1e-3))
    return float(min(1.0, max(cfg_fraction, MIN_SAMPLES / n_in_mask)))


def coarse_grid_like(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Empty grid over ``image``'s extent, same origin and direction, spacing >= ``spacing_mm``."""
    spacing = np.maximum(np.array(image.GetSpacing()), spacing_mm)
    size = np.maximum(2, np.ceil((np.array(image.GetSize()) - 1) * np.array(image.GetSpacing()) / spacing) + 1)
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    ref.SetOrigin(image.GetOrigin())
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(image.GetDirection())
    return ref


def mask_centroid_lps(mask: sitk.Image) -> np.ndarray:
    """Centroid (LPS, mm) of the non-zero voxels of ``mask``; image centre if empty."""
    arr = sitk.GetArrayFromImage(mask)
    idx = np.argwhere(arr > 0)
    if idx.size == 0:
        centre_idx = (np.array(mask.GetSize(), dtype=float) - 1.0) / 2.0
    else:
        centre_idx = idx.mean(axis=0)[::-1]  # numpy (k, j, i) -> ITK (i, j, k)
    return np.array(mask.TransformContinuousIndexToPhysicalPoint(centre_idx.tolist()))


__all__ = [
    "HISTOGRAM_BINS",
    "MIN_SAMPLES",
    "SAMPLING_SEED",
    "Backend",
    "BackendResult",
    "coarse_grid_like",
    "mask_centroid_lps",
    "pyramid_image",
    "sampling_fraction",
    "without_resampling_fill",
]
