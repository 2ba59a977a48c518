"""Intensity normalisation, subtraction and relative enhancement of a registered pre/post pair.

All functions take images on the SAME grid: the pre-contrast series' grid, with the post-contrast
series already resampled onto it (``pipeline.core.geometry.resample_to(post, pre, post_to_pre)``).
They raise ``ValueError`` when the grids differ, because a voxel-wise operation on two different
grids silently shifts anatomy.

Normalisation decision (DESIGN.md "Clinical rules", enhancement rule 6)
----------------------------------------------------------------------
Vendors store pre and post on different intensity scales (e.g. a different Philips
RescaleSlope/ScaleSlope per series; receiver gain re-tuned between series), so raw ``post - pre``
is not comparable across series, studies or sites. The post-contrast series is therefore scaled
onto the pre-contrast one by a single factor: the inverse of the **median of post/pre over body
voxels with solid signal**. Most of the body (muscle, fat, bone, the non-enhancing ablation
zone) barely enhances, so the median ratio measures the scale difference, not enhancement; the
median ignores the enhancing minority, misregistered edges and noise.

Consequence: after normalisation, relative enhancement is **relative to the typical (median)
body tissue**, not an absolute enhancement. Tissue that enhances as much as the typical tissue
reads 0; a nodule reading 0.5 enhances 50 % more than the bulk of the body does. If more than
half of the sampled body enhanced strongly (a FOV filled by an enhancing organ), the factor
would absorb real enhancement and under-read it; keep the body mask to the whole body.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# Voxels with solid signal: pre at least this fraction of the body median of pre. Excludes air,
# fat-suppressed fat and signal voids, where the ratio post/pre is dominated by noise.
SOLID_SIGNAL_FRACTION = 0.5
# Fewest voxels from which the normalisation factor is estimated.
MIN_NORMALISATION_VOXELS = 200
# Geometry tolerance when checking that two images share a grid (relative to the spacing).
_GRID_TOL = 1e-3


def _check_same_grid(a: sitk.Image, b: sitk.Image, what: str) -> None:
    if a.GetSize() != b.GetSize():
        raise ValueError(f"{what}: sizes differ {a.GetSize()} vs {b.GetSize()}; resample first")
    sp = np.asarray(a.GetSpacing())
    tol = _GRID_TOL * float(sp.min())
    if (not np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            or not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            or not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)):
        raise ValueError(f"{what}: origin/spacing/direction differ; resample onto the pre grid first")


def _array(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).astype(np.float32, copy=False)


def _image_like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32, copy=False))
    out.CopyInformation(ref)
    return out


def _body_median(pre_arr: np.ndarray, body_arr: np.ndarray) -> float:
    vals = pre_arr[(body_arr > 0) & np.isfinite(pre_arr)]
    if vals.size == 0:
        raise ValueError("empty body mask")
    return float(np.median(vals))


def normalise_post_to_pre(pre: sitk.Image, post_on_pre_grid: sitk.Image,
                          body: sitk.Image) -> tuple[sitk.Image, float]:
    """Scale the post-contrast image onto the pre-contrast intensity scale.

    Returns ``(post_norm, factor)`` with ``post_norm = factor * post`` (float32, pre's grid) and
    ``factor = 1 / median(post / pre)`` over body voxels whose pre signal is at least
    ``SOLID_SIGNAL_FRACTION`` of the body median of pre (see the module docstring for why).
    ``body``: mask (non-zero = body) on the pre grid. Raises ``ValueError`` when the grids differ
    or fewer than ``MIN_NORMALISATION_VOXELS`` voxels qualify.
    """
    _check_same_grid(pre, post_on_pre_grid, "normalise_post_to_pre(pre, post)")
    _check_same_grid(pre, body, "normalise_post_to_pre(pre, body)")
    pre_a, post_a = _array(pre), _array(post_on_pre_grid)
    body_a = sitk.GetArrayFromImage(body)
    solid = SOLID_SIGNAL_FRACTION * _body_median(pre_a, body_a)
    sel = (body_a > 0) & (pre_a >= solid) & (pre_a > 0) & (post_a > 0) \
        & np.isfinite(pre_a) & np.isfinite(post_a)
    if int(sel.sum()) < MIN_NORMALISATION_VOXELS:
        raise ValueError(f"only {int(sel.sum())} body voxels with solid signal; cannot normalise")
    ratio = post_a[sel].astype(np.float64) / pre_a[sel].astype(np.float64)
    factor = 1.0 / float(np.median(ratio))
    return _image_like(post_a * np.float32(factor), pre), factor


def subtraction(pre: sitk.Image, post_norm: sitk.Image, imaged: np.ndarray | None = None) -> sitk.Image:
    """``post_norm - pre`` (float32, pre's grid, pre's intensity units).

    ``imaged``: boolean (z, y, x) array, False where one of the two images holds the resampler's
    fill, not anatomy (``pipeline.core.geometry.field_of_view_mask``); the subtraction is 0 there.
    Without it the post-contrast minus an empty pre-contrast reads as a slab of bright
    "enhancement" where the pre-contrast slab ended before the post-contrast one.
    """
    _check_same_grid(pre, post_norm, "subtraction(pre, post)")
    sub = _array(post_norm) - _array(pre)
    if imaged is not None:
        if imaged.shape != sub.shape:
            raise ValueError(f"subtraction: imaged mask {imaged.shape} is not on the grid {sub.shape}")
        sub[~imaged] = 0.0
    return _image_like(sub, pre)


def relative_enhancement(pre: sitk.Image, post_norm: sitk.Image, body: sitk.Image,
                         floor_fraction: float = 0.1) -> sitk.Image:
    """Relative enhancement ``(post - pre) / max(pre, floor)`` (float32, unitless; 0.5 = +50 %).

    ``floor = floor_fraction * median(pre over body)``: dark voxels (fat-suppressed fat, air
    pockets, signal voids) have a near-zero pre signal, and dividing by it would turn noise into
    huge "enhancement"; with the floor their RE is the signal change relative to a tenth of the
    typical tissue. Outside ``body`` the RE is 0 (air carries no enhancement, only noise).
    Expects ``post_norm`` from :func:`normalise_post_to_pre`, so RE is relative to the typical
    body tissue.
    """
    if not 0 < floor_fraction <= 1:
        raise ValueError("floor_fraction must be in (0, 1]")
    _check_same_grid(pre, post_norm, "relative_enhancement(pre, post)")
    _check_same_grid(pre, body, "relative_enhancement(pre, body)")
    pre_a, post_a = _array(pre), _array(post_norm)
    body_a = sitk.GetArrayFromImage(body) > 0
    floor = floor_fraction * _body_median(pre_a, body_a)
    if not floor > 0:
        raise ValueError("body median of the pre-contrast image is not positive")
    re = (post_a - pre_a) / np.maximum(pre_a, np.float32(floor))
    re[~body_a | ~np.isfinite(re)] = 0.0
    return _image_like(re, pre)


def temporal_difference(followup_sub: sitk.Image, followup_pre: sitk.Image, baseline_sub: sitk.Image,
                        baseline_pre: sitk.Image, baseline_to_followup: sitk.Transform,
                        followup_to_baseline: sitk.Transform | None = None,
                        followup_body: sitk.Image | None = None,
                        baseline_body: sitk.Image | None = None) -> sitk.Image:
    """Follow-up subtraction minus the baseline's, on the follow-up grid (float32, unitless).

    ``followup_sub``/``followup_pre``: the follow-up's subtraction and pre-contrast on its own
    grid; ``baseline_sub``/``baseline_pre`` likewise for the baseline; ``baseline_to_followup``:
    ``to_baseline`` (maps a baseline point to the follow-up point, ITK convention; inverted here
    to bring the baseline onto the follow-up grid; ``followup_to_baseline``: that inverse when the
    caller has it, issue 19; ``followup_body``/``baseline_body``: ``body_mask`` of each
    pre-contrast when the caller has it: a baseline's is read for each of its follow-ups). Each
    subtraction is in its own pre-contrast's
    intensity units, and the two studies' scales differ (other scanner, receiver gain), so each is
    divided by the median of its pre-contrast over its body first: 0.3 = enhancement grew by 30 %
    of the typical tissue signal since the baseline. 0 outside the follow-up body and where the
    baseline did not cover the follow-up's anatomy (the two slabs rarely match along z).
    """
    from pipeline.core.geometry import body_mask, resample_to
    from pipeline.imaging.registration import invert_registration

    _check_same_grid(followup_sub, followup_pre, "temporal_difference(followup sub, pre)")
    _check_same_grid(baseline_sub, baseline_pre, "temporal_difference(baseline sub, pre)")
    if followup_body is None:
        followup_body = body_mask(followup_pre)
    if baseline_body is None:
        baseline_body = body_mask(baseline_pre)
    _check_same_grid(followup_pre, followup_body, "temporal_difference(followup pre, body)")
    _check_same_grid(baseline_pre, baseline_body, "temporal_difference(baseline pre, body)")
    fu_body = sitk.GetArrayFromImage(followup_body) > 0
    base_scale = _body_median(_array(baseline_pre), sitk.GetArrayFromImage(baseline_body))
    fu_scale = _body_median(_array(followup_pre), fu_body)
    if not (base_scale > 0 and fu_scale > 0):
        raise ValueError("body median of a pre-contrast image is not positive")
    if followup_to_baseline is None:
        followup_to_baseline = invert_registration(baseline_to_followup)
    base_on_fu = _array(resample_to(baseline_sub, followup_sub, followup_to_baseline, default=np.nan))
    diff = _array(followup_sub) / np.float32(fu_scale) - base_on_fu / np.float32(base_scale)
    diff[~fu_body | ~np.isfinite(diff)] = 0.0
    return _image_like(diff, followup_sub)


__all__ = ["normalise_post_to_pre", "relative_enhancement", "subtraction", "temporal_difference"]
