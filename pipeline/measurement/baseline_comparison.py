"""Which of a follow-up's suspicious foci already enhanced at the registered baseline (issue 15).

Local tumour progression and a new lesion are, by their IWG-IGTA definitions, new since the
study that documented the ablation. The per-study rules judge a candidate on one study's shape
and enhancement; a radiologist also scrolls the baseline beside it: enhancing tissue that was
already there, in the same place, outside the baseline's own zone, rim and foci, is normal
anatomy seen before (a bowel loop's end cut obliquely by thick slices, an organ's edge), not a
tumour that has appeared. Development abdomen seed 63 (0.3.1 outputs): the three true LTP /
residual follow-up foci lay 0-15 % over tissue enhancing at the baseline (they grew over the
baseline's zone margin and its non-enhancing surroundings), the end of a bowel loop read as a
40 mm nodule 88 %.

This module measures, for each suspicious focus of a follow-up, the fraction of its volume
whose baseline position (through the registration between the studies) enhanced at the baseline
outside the baseline's zone, rim and suspicious foci; the longitudinal rules decide what the
fraction means (``rules.focus_seen_at_baseline_min_fraction``). A residual tumour that persists
lies over the baseline's own focus and is never "seen before" here.

The focus's voxels are the follow-up's suspicious-focus label (``labels.nii.gz``, label 3) in the
connected component that holds, or lies nearest to, the focus's centroid: the per-study stage
keeps one label for all of them.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.core.geometry import resample_to
from pipeline.core.records import Focus, Label
from pipeline.imaging.registration import invert_registration
from pipeline.imaging.subtraction import relative_enhancement
from pipeline.measurement.study import StudyImages

# A focus more than this far (mm) from every suspicious-focus voxel is not found in the label map.
_MAX_CENTROID_GAP_MM = 5.0
# Below this fraction of a focus imaged at the baseline (the slabs differ), no fraction is given.
_MIN_IMAGED_FRACTION = 0.5


def baseline_enhancing_on_follow_up(follow_up: StudyImages, baseline: StudyImages,
                                    baseline_to_follow_up: sitk.Transform, above_surroundings: bool,
                                    threshold: float, follow_up_to_baseline: sitk.Transform | None = None,
                                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """(enhanced at the baseline, imaged at the baseline): boolean (z, y, x) arrays on the follow-up grid.

    "Enhanced": relative enhancement >= ``threshold`` at the baseline (or, ``above_surroundings``:
    the follow-up was read above enhancing parenchyma, its excess over the parenchyma, the map the
    baseline kept in ``above_surroundings``), outside the baseline's zone, rim and suspicious
    foci. ``baseline_to_follow_up``: the registration (maps a baseline point to the follow-up
    point); ``follow_up_to_baseline``: its inverse when the caller has it. None where the baseline
    holds no map of that kind.
    """
    if above_surroundings:
        if baseline.above_surroundings is None:
            return None
        enhancement = baseline.above_surroundings
    else:
        pre = baseline.pre_registered
        enhancement = relative_enhancement(pre, sitk.Add(pre, baseline.subtraction), baseline.pre_body())
    to_baseline = (follow_up_to_baseline if follow_up_to_baseline is not None
                   else invert_registration(baseline_to_follow_up))
    grid = follow_up.labels
    mapped = sitk.GetArrayFromImage(resample_to(enhancement, grid, to_baseline, default=np.nan))
    labels = sitk.GetArrayFromImage(resample_to(baseline.labels, grid, to_baseline, sitk.sitkNearestNeighbor))
    imaged = np.isfinite(mapped)
    findings = np.isin(labels, [Label.ABLATION_ZONE, Label.RIM, Label.ENHANCING_FOCUS])
    return imaged & (np.nan_to_num(mapped, nan=0.0) >= threshold) & ~findings, imaged


def focus_voxels(focus: Focus, labels: sitk.Image) -> np.ndarray | None:
    """Boolean (z, y, x) mask of ``focus`` in a study's label map (None when it is not found there)."""
    label_a = sitk.GetArrayFromImage(labels)
    components, n = ndi.label(label_a == Label.ENHANCING_FOCUS)
    if not n:
        return None
    index = labels.TransformPhysicalPointToIndex(tuple(focus.centroid_lps))
    inside = all(0 <= i < s for i, s in zip(index, labels.GetSize()))
    if inside and components[index[::-1]]:
        return components == components[index[::-1]]
    # A crescent's centroid lies off its voxels: the component nearest to it.
    spacing = np.array(labels.GetSpacing()[::-1])
    distance, nearest = ndi.distance_transform_edt(components == 0, sampling=spacing, return_indices=True)
    centre = np.clip(np.array(labels.TransformPhysicalPointToContinuousIndex(tuple(focus.centroid_lps))[::-1]),
                     0, np.array(label_a.shape) - 1).round().astype(int)
    if distance[tuple(centre)] > _MAX_CENTROID_GAP_MM:
        return None
    return components == components[tuple(nearest[:, centre[0], centre[1], centre[2]])]


def foci_seen_at_baseline(foci: list[Focus], follow_up: StudyImages, baseline: StudyImages,
                          baseline_to_follow_up: sitk.Transform | None, above_surroundings: bool,
                          threshold: float, follow_up_to_baseline: sitk.Transform | None = None) -> list[Focus]:
    """``foci`` with ``seen_at_baseline_fraction`` set on each suspicious one (None elsewhere, and
    where it cannot be measured: no registration, no map, the focus mostly outside the baseline's slab).
    ``follow_up_to_baseline``: the inverse of ``baseline_to_follow_up`` when the caller has it."""
    cleared = [f.model_copy(update={"seen_at_baseline_fraction": None}) for f in foci]
    if baseline_to_follow_up is None or not any(f.suspicious for f in foci):
        return cleared
    maps = baseline_enhancing_on_follow_up(follow_up, baseline, baseline_to_follow_up, above_surroundings, threshold,
                                           follow_up_to_baseline)
    if maps is None:
        return cleared
    enhanced, imaged = maps
    out = []
    for focus in cleared:
        mask = focus_voxels(focus, follow_up.labels) if focus.suspicious else None
        if mask is not None and imaged[mask].mean() >= _MIN_IMAGED_FRACTION:
            focus = focus.model_copy(update={
                "seen_at_baseline_fraction": round(float(enhanced[mask].sum() / imaged[mask].sum()), 3)})
        out.append(focus)
    return out


__all__ = ["baseline_enhancing_on_follow_up", "focus_voxels", "foci_seen_at_baseline"]
