"""Classical segmentation of the ablation zone, its rim and enhancing foci.

Works on a registered, intensity-normalised pre/post pair on the post-contrast grid:
- **Ablation zone (AZ)**: the necrotic core is T1-bright before contrast and does not enhance
  (criteria.md §2 "Other sequences" [S4][S15][S20]); AZ = connected region that is bright on
  the pre-contrast image and below the enhancement threshold, bounded by the inner edge of the
  enhancing rim. A soft (partial-volume) map of the core is returned for sub-voxel measurement.
- **Enhancing tissue**: relative enhancement >= threshold (rule 6).
- **Rim**: enhancing tissue in a shell around the AZ.
- **Foci**: enhancing tissue thick enough not to be a benign rim: it holds an in-plane disc of
  diameter >= the focus thickness threshold. Slice-wise (in-plane) thickness is used on
  purpose: with 3-5 mm slices, through-plane distances are too coarse to tell a 2 mm rim from
  a 5 mm nodule, and a thin rim cut tangentially at the AZ's poles looks like a thick disc on
  one slice (see ``focus_candidates``).
This is the reference and the fallback of the network of models/ (its own issue).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.core.config import EnhancementConfig, SegmentationConfig


@dataclass
class SegmentationResult:
    """Arrays in SimpleITK's (z, y, x) order on the post-contrast grid."""

    az: np.ndarray  # bool
    az_soft: np.ndarray  # float32 in [0, 1], partial-volume fraction of the necrotic core
    enhancing: np.ndarray  # bool, RE >= threshold inside the body
    rim: np.ndarray  # bool
    focus_candidates: list[np.ndarray]  # bool masks of thick enhancing components
    found: bool
    reason: str


def spacing_zyx(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetSpacing()[::-1], dtype=float)


def ball_zyx(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Structuring element of a physical ball (mm) on an anisotropic grid."""
    r = np.maximum(np.floor(radius_mm / spacing), 0).astype(int)
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    d2 = (zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2
    return d2 <= radius_mm ** 2 + 1e-6


def component_nearest(labels: np.ndarray, n: int, point_zyx: np.ndarray | None, spacing: np.ndarray,
                      min_voxels: int) -> int:
    """Label of the component to keep: nearest to the hint when given, else the largest compact one."""
    best, best_score = 0, -np.inf
    sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    centroids = ndi.center_of_mass(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    for idx in range(1, n + 1):
        size = sizes[idx - 1]
        if size < min_voxels:
            continue
        if point_zyx is not None:
            dist = float(np.linalg.norm((np.asarray(centroids[idx - 1]) - point_zyx) * spacing))
            score = -dist
        else:
            score = float(size)
        if score > best_score:
            best, best_score = idx, score
    return best


def enhancing_mask(re_a: np.ndarray, body_a: np.ndarray, spacing: np.ndarray,
                    enhancement: EnhancementConfig) -> np.ndarray:
    """Rule 6: RE >= threshold inside the body, specks under the minimum component size dropped."""
    enhancing = body_a & (re_a >= enhancement.relative_enhancement_threshold)
    min_vox = max(1, int(np.ceil((np.pi / 6 * enhancement.min_component_mm ** 3) / np.prod(spacing))))
    lab, n = ndi.label(enhancing)
    if n:
        sizes = ndi.sum_labels(enhancing, lab, index=np.arange(1, n + 1))
        enhancing &= np.isin(lab, 1 + np.flatnonzero(sizes >= min_vox))
    return enhancing


def enhancing_tissue(relative_enhancement: sitk.Image, body: sitk.Image, enhancement: EnhancementConfig) -> np.ndarray:
    """Rule 6's enhancing tissue (bool, z/y/x) as :func:`segment` defines it; shared with
    pipeline/segmentation/network.py."""
    re_a = smooth_relative_enhancement(sitk.GetArrayFromImage(relative_enhancement))
    return enhancing_mask(re_a, sitk.GetArrayFromImage(body) > 0, spacing_zyx(relative_enhancement), enhancement)


def segment(
    pre: sitk.Image,
    relative_enhancement: sitk.Image,
    body: sitk.Image,
    segmentation: SegmentationConfig,
    enhancement: EnhancementConfig,
    focus_min_thickness_mm: float,
    target_hint_lps: tuple[float, float, float] | None = None,
) -> SegmentationResult:
    """Segment AZ, rim and focus candidates on the post-contrast grid.

    ``pre`` is the pre-contrast image resampled onto the post grid (after registration),
    ``relative_enhancement`` the RE map (post_norm - pre) / pre on that grid, ``body`` a uint8 mask.
    ``focus_min_thickness_mm`` (``foci.min_thickness_mm``): thinner enhancing tissue is no focus candidate.
    """
    spacing = spacing_zyx(pre)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pre_a = sitk.GetArrayFromImage(pre).astype(np.float32)
    body_a = sitk.GetArrayFromImage(body) > 0
    re_a = smooth_relative_enhancement(sitk.GetArrayFromImage(relative_enhancement))
    empty = np.zeros(pre_a.shape, bool)
    ref = tissue_reference_level(pre_a, body_a)
    if ref is None:
        return SegmentationResult(empty, empty.astype(np.float32), empty, empty, [], False, "no body found")
    enhancing = enhancing_mask(re_a, body_a, spacing, enhancement)

    lab, n = t1_bright_components(pre_a, re_a, body_a, spacing, ref, segmentation, enhancement)
    hint = None
    if target_hint_lps is not None:
        idx_xyz = pre.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in target_hint_lps))
        hint = np.array(idx_xyz[::-1])
    min_az_vox = int(segmentation.az_min_volume_ml / voxel_ml)
    keep = component_nearest(lab, n, hint, spacing, min_az_vox) if n else 0
    if keep == 0:
        return SegmentationResult(empty, empty.astype(np.float32), enhancing, empty, [], False,
                                  "no T1-bright non-enhancing zone found")
    az, soft = half_max_edge(lab == keep, pre_a, enhancing, body_a, spacing, ref)

    # The AZ is non-enhancing by definition: voxels it holds are not enhancing tissue.
    enhancing &= ~az
    shell = ndi.binary_dilation(az, structure=ball_zyx(segmentation.rim_search_mm, spacing)) & ~az
    rim = enhancing & shell
    foci = focus_candidates(enhancing, az, spacing, focus_min_thickness_mm)
    return SegmentationResult(az, soft, enhancing, rim, foci, True, "")


def smooth_relative_enhancement(re_a: np.ndarray) -> np.ndarray:
    """Light in-plane smoothing of an RE array: the RE of single voxels is noisy (noise adds in
    the ratio). Not a median filter: a 3x3 median erases a rim one pixel wide."""
    return ndi.gaussian_filter(np.asarray(re_a, np.float32), sigma=(0, 0.5, 0.5))


def tissue_reference_level(pre_a: np.ndarray, body_a: np.ndarray) -> float | None:
    """Typical body tissue on the pre-contrast (median above its 25th percentile); None without a body."""
    tissue = body_a & (pre_a > 0)
    if tissue.sum() < 100:
        return None
    return float(np.median(pre_a[tissue & (pre_a >= np.percentile(pre_a[tissue], 25))]))


def t1_bright_components(pre_a: np.ndarray, re_smooth: np.ndarray, body_a: np.ndarray, spacing: np.ndarray,
                         ref: float, segmentation: SegmentationConfig,
                         enhancement: EnhancementConfig) -> tuple[np.ndarray, int]:
    """Labelled T1-bright non-enhancing regions (the ablation-zone candidates) and their count.

    Bright: pre-contrast >= ``az_min_pre_ratio`` x ``ref``; non-enhancing: smoothed RE below the
    enhancement threshold; opened with a 1.6 mm ball so that thin bright strands do not join
    a zone to its neighbours.
    """
    bright = (body_a & (pre_a >= segmentation.az_min_pre_ratio * ref)
              & (re_smooth < enhancement.relative_enhancement_threshold))
    bright = ndi.binary_opening(bright, structure=ball_zyx(1.6, spacing))
    return ndi.label(bright)


def half_max_edge(core: np.ndarray, pre_a: np.ndarray, enhancing: np.ndarray, body_a: np.ndarray,
                  spacing: np.ndarray, fallback_level: float) -> tuple[np.ndarray, np.ndarray]:
    """The AZ bounded half-way between the core's pre-contrast signal and its surroundings', and its soft map.

    ``core``: a mask inside the zone (the classical bright core, or the network's zone); the edge
    is placed within 4 mm of it where the pre-contrast signal crosses the half-way level
    (partial volume): a fixed ratio threshold would shift the edge with the core's brightness.
    ``fallback_level``: the surroundings' level when no non-enhancing tissue lies 2-6 mm out.
    Returns the zone (one component, holes filled) and the partial-volume fraction near it.
    """
    near = ndi.binary_dilation(core, structure=ball_zyx(6.0, spacing)) & ~ndi.binary_dilation(
        core, structure=ball_zyx(2.0, spacing)) & body_a
    inner = ndi.binary_erosion(core, structure=ball_zyx(2.0, spacing))
    core_level = float(np.median(pre_a[inner] if inner.any() else pre_a[core]))
    outside_level = float(np.median(pre_a[near & ~enhancing])) if (near & ~enhancing).any() else fallback_level
    half = 0.5 * (core_level + outside_level)
    region = ndi.binary_dilation(core, structure=ball_zyx(4.0, spacing)) & body_a
    soft = np.clip((pre_a - outside_level) / max(core_level - outside_level, 1e-6), 0.0, 1.0).astype(np.float32)
    soft[~region] = 0.0
    az = region & (pre_a >= half)
    az_lab, n = ndi.label(az)
    if n > 1:
        overlap = ndi.sum_labels(core, az_lab, index=np.arange(1, n + 1))
        az = az_lab == (1 + int(np.argmax(overlap)))
    az = ndi.binary_fill_holes(az)
    soft[~ndi.binary_dilation(az, iterations=1)] = 0.0
    return az, soft


def focus_candidates(enhancing: np.ndarray, az: np.ndarray, spacing: np.ndarray,
                     min_thickness_mm: float) -> list[np.ndarray]:
    """Enhancing regions holding an in-plane disc of diameter >= ``min_thickness_mm``.

    A thin rim cut tangentially at the AZ's top or bottom shows as a flat disc on one slice,
    over or under the AZ: where the AZ lies through-plane from a core (within 10 mm), the core
    only counts when it persists on two consecutive slices. Elsewhere one slice is enough (a
    6-7 mm nodule at the side of the AZ spans 1-2 slices of 3 mm).
    """
    radius = min_thickness_mm / 2.0
    core = np.zeros_like(enhancing)
    for k in range(enhancing.shape[0]):
        if enhancing[k].any():
            # In-plane distance to the nearest non-enhancing voxel centre, in mm. A voxel centre at
            # distance d from the background sits in a structure about 2d - pixel wide.
            dist = ndi.distance_transform_edt(enhancing[k], sampling=spacing[1:])
            # Sensitive on purpose (a 6 mm nodule is 4 pixels of 1.5 mm): the focus analysis
            # then measures each candidate's thickness at sub-pixel precision.
            core[k] = dist >= radius
    if not core.any():
        return []
    below = np.zeros_like(core)
    above = np.zeros_like(core)
    below[1:], above[:-1] = core[:-1], core[1:]
    persistent = core & (below | above)
    # Direction of the AZ surface normal at each core voxel, from the gradient of the smoothed AZ
    # mask: through-plane at the AZ's top and bottom (even where a sliver of AZ shows in-plane).
    through_plane = np.zeros_like(core)
    if az.any():
        smooth = ndi.gaussian_filter(az.astype(np.float32), sigma=2.0 / spacing)
        gz, gy, gx = np.gradient(smooth, *spacing)
        magnitude = np.sqrt(gz ** 2 + gy ** 2 + gx ** 2)
        near = magnitude > 1e-3
        through_plane = core & near & (np.abs(gz) > 0.7071 * magnitude)
    valid = core & (persistent | ~through_plane)
    if not valid.any():
        return []
    # Grow the cores back to the tissue they stand for (within the enhancing mask).
    grown = ndi.binary_dilation(valid, structure=ball_zyx(radius + float(np.max(spacing[1:])), spacing),
                                mask=enhancing)
    lab, n = ndi.label(grown)
    return [lab == i for i in range(1, n + 1)]
