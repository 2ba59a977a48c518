"""Image geometry every stage uses: the body mask and resampling onto another grid (LPS, mm).

Plain functions on ``SimpleITK`` images, no state: :func:`body_mask` (binary mask of the
patient's body), :func:`resample_to` (an image onto another image's grid under a transform,
ITK convention: the transform maps a reference point to a moving point) and the small helpers
they need (:func:`run_filter`, :func:`as_float32`, :func:`radius_vox`), which registration
shares. May import: the standard library and third-party libraries; nothing from a stage.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def run_filter(filt, *images: sitk.Image, threads: int | None = None) -> sitk.Image:
    """Run a SimpleITK filter object with a per-filter thread count (no global state)."""
    if threads is not None:
        filt.SetNumberOfThreads(int(threads))
    return filt.Execute(*images)


def as_float32(image: sitk.Image) -> sitk.Image:
    """``image`` as float32 (the same object when it already is)."""
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def radius_vox(image: sitk.Image, radius_mm: float) -> list[int]:
    """Per-axis kernel radius (voxels) approximating a ball of ``radius_mm``."""
    return [max(1, int(round(radius_mm / s))) for s in image.GetSpacing()]


def body_mask(image: sitk.Image, *, smoothing_mm: float = 2.0, closing_mm: float = 4.0,
              threads: int | None = None) -> sitk.Image:
    """Binary mask (uint8, 1 = body) of the patient's body on ``image``'s grid.

    Otsu threshold of the lightly smoothed image, relaxed to a quarter of the median foreground
    signal when Otsu lands inside tissue (tight FOVs, bright fat), largest 3-D connected
    component, a morphological closing of ``closing_mm`` and in-slice hole filling (dark
    fat-suppressed fat, necrosis and fluid inside the body belong to it). The hole filling is
    per slice (array axis 0 = the acquired slices) because a dark tube leaving through the top
    or bottom slice is not a 3-D hole. Cost: a few tens of ms for ~1.3 M voxels.

    Parameters: ``smoothing_mm`` Gaussian sigma (mm) before thresholding, ``closing_mm`` closing
    radius (mm). Geometry (origin, spacing, direction) is that of ``image``.
    """
    img = as_float32(image)
    if smoothing_mm > 0:
        g = sitk.SmoothingRecursiveGaussianImageFilter()
        g.SetSigma(float(smoothing_mm))
        img = run_filter(g, img, threads=threads)
    arr = sitk.GetArrayFromImage(img)
    finite = arr[np.isfinite(arr)]
    out = np.zeros(arr.shape, dtype=np.uint8)
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        mask = sitk.GetImageFromArray(out)
        mask.CopyInformation(image)
        return mask
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    run_filter(otsu, img, threads=threads)
    t = float(otsu.GetThreshold())
    fg = finite[finite > t]
    if fg.size:
        t = min(t, 0.25 * float(np.median(fg)))
    fg_mask = arr > t
    labels, n = ndimage.label(fg_mask)
    if n == 0:
        mask = sitk.GetImageFromArray(out)
        mask.CopyInformation(image)
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    if closing_mm > 0:
        largest = binary_closing_ball(largest, radius_vox(image, closing_mm))
    in_slice = np.zeros((3, 3, 3), dtype=bool)
    in_slice[1] = ndimage.generate_binary_structure(2, 1)
    filled = ndimage.binary_fill_holes(largest, structure=in_slice)
    out = sitk.GetImageFromArray(filled.astype(np.uint8))
    out.CopyInformation(image)
    return out


@lru_cache(maxsize=32)
def ball_structure(radius_xyz: tuple[int, ...]) -> np.ndarray:
    """ITK's ball kernel of per-axis radius ``radius_xyz`` (voxels, x y z) as a boolean array
    (z y x): a single voxel dilated by ITK itself, so the shape is ITK's by construction."""
    size_zyx = [2 * r + 3 for r in radius_xyz[::-1]]
    point = np.zeros(size_zyx, dtype=np.uint8)
    point[tuple(r + 1 for r in radius_xyz[::-1])] = 1
    dilate = sitk.BinaryDilateImageFilter()
    dilate.SetKernelRadius([int(r) for r in radius_xyz])
    dilate.SetKernelType(sitk.sitkBall)
    dilate.SetForegroundValue(1)
    ball = sitk.GetArrayFromImage(dilate.Execute(sitk.GetImageFromArray(point)))[1:-1, 1:-1, 1:-1] > 0
    ball.setflags(write=False)
    return ball


def binary_closing_ball(mask_zyx: np.ndarray, radius_xyz: list[int] | tuple[int, ...]) -> np.ndarray:
    """Closing of a boolean (z, y, x) mask with ITK's ball of ``radius_xyz`` voxels: the result of
    ``sitk.BinaryMorphologicalClosingImageFilter`` (safe border on) in a quarter of its time.

    Hand-written because ITK's filter took ~0.2 s a body mask on a 1 M-voxel grid, several
    times per study; SciPy's closing erodes from the array's edge. Padding by the radius first
    makes the edge irrelevant: every voxel the erosion reads for the original grid lies in the
    padding, which the dilation fills exactly as on an unbounded background (ITK's safe border)."""
    radius_zyx = tuple(int(r) for r in radius_xyz)[::-1]
    ball = ball_structure(tuple(int(r) for r in radius_xyz))
    padded = np.pad(mask_zyx.astype(bool, copy=False), [(r, r) for r in radius_zyx])
    closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, ball), ball)
    return closed[tuple(slice(r, r + n) for r, n in zip(radius_zyx, mask_zyx.shape))]


def resample_to(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
                interpolator: int = sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """Resample ``moving`` onto ``reference``'s grid (origin, spacing, direction, size).

    ``transform`` maps reference (fixed) points to moving points (ITK convention). Intensity
    images come back as float32 (no rounding of interpolated values); with nearest-neighbour or
    label interpolators the pixel type of ``moving`` is kept, so label maps stay labels.
    Voxels mapping outside ``moving`` get ``default``.
    """
    keep_type = interpolator in (sitk.sitkNearestNeighbor, sitk.sitkLabelGaussian)
    pixel = moving.GetPixelID() if keep_type else sitk.sitkFloat32
    src = moving if keep_type else as_float32(moving)
    return sitk.Resample(src, reference, transform, interpolator, float(default), pixel)


def field_of_view_mask(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Boolean (z, y, x) array on ``reference``'s grid: the voxels ``transform`` maps inside ``moving``.

    Where it is False, ``resample_to`` wrote its fill value (0.0), not an image of the anatomy:
    the slab of ``moving`` did not reach there.
    """
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    return sitk.GetArrayFromImage(resample_to(ones, reference, transform, sitk.sitkNearestNeighbor, 0)) > 0


__all__ = ["as_float32", "body_mask", "field_of_view_mask", "radius_vox", "resample_to", "run_filter"]
