"""Enhancement above the zone's surroundings: an ablation zone inside enhancing parenchyma (issue 15).

Rule 6 calls tissue enhancing where its relative enhancement (RE) reaches the threshold (15 %).
Inside the liver, kidney or spleen the parenchyma around the zone reaches that itself in every
post-contrast phase, so rule 6 marks the whole organ: the rim reaches its search limit on every
ray and a residual nodule becomes part of an organ-scale structure (development seed 81 of
profile ``liver``: every viable tumour read as anatomy, 0 of 6 found). Radiology reads such
tumour against the parenchyma: LI-RADS v2018 (treatment response, LR-TR viable) asks for
nodular, mass-like or thick irregular tissue with arterial-phase hyper-enhancement, i.e.
enhancement greater than the liver's, in the arterial phase when the parenchyma has barely
started to enhance.

So, when the zone's surroundings themselves enhance (the median RE of the body in a shell
around the zone, ``enhancement.surroundings_shell_mm``, reaches rule 6's threshold), tissue
counts as enhancing where its RE exceeds the surroundings' median by that threshold, in the
phase segmented or in the study's earliest post-contrast (arterial) phase. The median is the
parenchyma's as long as it fills most of the shell; an organ beside a zone in muscle fills less
than half of it and changes nothing. Where the surroundings do not enhance, rule 6 is unchanged.

Known limits, not measured on a body the project did not draw: a zone at the liver's edge, whose
shell is half liver and half muscle or fat, falls back to rule 6 (the liver then reads as an
organ body); ``arterial_phase_read`` assumes parenchyma that enhances mostly in the portal phase
(the liver), and would call a kidney's corticomedullary phase "no arterial phase".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from pipeline.core.config import EnhancementConfig
from pipeline.segmentation.classical import (
    SegmentationResult,
    ball_zyx,
    enhancing_mask,
    focus_candidates,
    half_max_edge,
    smooth_relative_enhancement,
)

# Fewest body voxels in the shell from which the surroundings' median is read.
MIN_SURROUNDING_VOXELS = 200


@dataclass(frozen=True)
class Surroundings:
    """The RE of the body around the zone in one phase."""

    median_re: float
    n_voxels: int


def surroundings_of_zone(az: np.ndarray, re_a: np.ndarray, body_a: np.ndarray, spacing_zyx: np.ndarray,
                         shell_mm: tuple[float, float]) -> Surroundings | None:
    """Median RE of the body voxels ``shell_mm[0]``-``shell_mm[1]`` mm outside the zone (None: too few).

    The inner edge leaves out the rim and a nodule at the margin, which would pull the median up.
    """
    inner, outer = shell_mm
    distance = ndi.distance_transform_edt(~az, sampling=spacing_zyx)
    shell = body_a & (distance > inner) & (distance <= outer) & np.isfinite(re_a)
    n = int(shell.sum())
    if n < MIN_SURROUNDING_VOXELS:
        return None
    return Surroundings(float(np.median(re_a[shell])), n)


def enhances_like_parenchyma(around: Surroundings | None, enhancement: EnhancementConfig) -> bool:
    """The surroundings themselves count as enhancing under rule 6."""
    return around is not None and around.median_re >= enhancement.relative_enhancement_threshold


def arterial_phase_read(read: dict[str, float], max_fraction: float) -> bool:
    """Some phase read shows the surroundings at most ``max_fraction`` of their largest
    enhancement among the phases read: the parenchyma caught before its portal enhancement.

    Which phase is arterial is not in the headers the pipeline can trust (acquisition times
    count from an injection they do not record); the liver says it itself, since three quarters
    of its blood is portal. One phase read, or the earliest as enhanced as the later ones (a
    portal + delayed study), is no arterial phase.
    """
    values = list(read.values())
    return len(values) >= 2 and min(values) <= max_fraction * max(values)


def enhancement_above_surroundings(phases: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Per voxel, the largest RE above its phase's surroundings (float32): ``phases`` holds
    (RE array on the segmentation grid, the surroundings' median RE) per phase. Each RE is
    smoothed as rule 6 smooths it; a voxel outside a phase's field of view (NaN) reads the others."""
    excess = np.full(phases[0][0].shape, -np.inf, np.float32)
    for re_a, median in phases:
        smooth = smooth_relative_enhancement(re_a) - np.float32(median)
        np.fmax(excess, np.nan_to_num(smooth, nan=-np.inf), out=excess)
    excess[~np.isfinite(excess)] = np.nan
    return excess


def read_above_surroundings(seg: SegmentationResult, phases: dict[str, np.ndarray], pre_a: np.ndarray,
                            body_a: np.ndarray, spacing_zyx: np.ndarray, enhancement: EnhancementConfig,
                            shell_mm: tuple[float, float], rim_search_mm: float, focus_min_thickness_mm: float
                            ) -> tuple[SegmentationResult, np.ndarray | None, dict[str, float]]:
    """(segmentation, excess RE or None, the surroundings' median RE by phase).

    ``phases``: RE arrays on the segmentation grid by phase key, the phase segmented first (the
    others: earlier phases, e.g. the arterial one); ``pre_a``: the registered pre-contrast. When
    the surroundings of the first enhance like parenchyma, the segmentation is restricted to
    tissue above them in any phase (``restrict_to_tissue_above``, which also re-places the zone's
    edge) and the excess RE is returned for the foci to be judged on; otherwise the segmentation
    comes back unchanged with None. The medians read are returned either way (the evidence says
    why).
    """
    read: dict[str, float] = {}
    medians: list[tuple[np.ndarray, float]] = []
    for key, re_a in phases.items():
        around = surroundings_of_zone(seg.az, re_a, body_a, spacing_zyx, shell_mm)
        if around is None:
            if not medians:  # the phase segmented: nothing to read against
                return seg, None, read
            continue
        read[key] = round(around.median_re, 3)
        if not medians and not enhances_like_parenchyma(around, enhancement):
            return seg, None, read
        medians.append((re_a, around.median_re))
    excess = enhancement_above_surroundings(medians)
    return (restrict_to_tissue_above(seg, excess, pre_a, body_a, spacing_zyx, enhancement, rim_search_mm,
                                     focus_min_thickness_mm), excess, read)


def restrict_to_tissue_above(seg: SegmentationResult, excess_re: np.ndarray, pre_a: np.ndarray, body_a: np.ndarray,
                             spacing_zyx: np.ndarray, enhancement: EnhancementConfig, rim_search_mm: float,
                             focus_min_thickness_mm: float) -> SegmentationResult:
    """The segmentation with enhancing tissue, rim and focus candidates read above the surroundings.

    Enhancing: ``excess_re`` >= rule 6's threshold (components under its minimum size dropped).
    The zone's edge is placed again half-way between its pre-contrast level and its surroundings'
    (``half_max_edge``, from the zone as found): that rule reads the surroundings on non-enhancing
    tissue 2-6 mm out, which rule 6 leaves none of inside the liver, so the edge had been placed
    against the body's median level instead (development liver seed 81: volume errors to 32 %).
    The rim is that tissue within ``rim_search_mm`` of the zone and the focus
    candidates its thick parts: the classical definitions, for the network too. Its rim and foci
    were drawn on enhancement relative to the body, where the parenchyma is enhancing tissue; a
    network focus intersected with the tissue above would keep the thin rim and the veins it
    swallowed as one candidate (a hand-built 9 mm nodule merged with its rim into a ring).
    """
    spacing = np.asarray(spacing_zyx, float)
    enhancing = enhancing_mask(np.nan_to_num(excess_re, nan=-1.0), body_a, spacing, enhancement)
    inside = body_a & np.isfinite(pre_a)
    az, az_soft = half_max_edge(seg.az, pre_a, enhancing, body_a, spacing, float(np.median(pre_a[inside])))
    if not az.any():  # keep the zone as found rather than lose it
        az, az_soft = seg.az, seg.az_soft
    enhancing &= ~az
    shell = ndi.binary_dilation(az, structure=ball_zyx(rim_search_mm, spacing)) & ~az
    return replace(seg, az=az, az_soft=az_soft, enhancing=enhancing, rim=enhancing & shell,
                   focus_candidates=focus_candidates(enhancing, az, spacing, focus_min_thickness_mm))
