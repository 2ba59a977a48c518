"""The pipeline's rules around the network's prediction: one ablation zone, its rim and foci.

The network itself (weights, ``predict``) is ``models.infer``'s; this module turns its
prediction on a study's post grid into the ``SegmentationResult`` the classical method returns
(pipeline/segmentation/classical.py), so the measurement, rim and focus stages downstream are
the same whichever method segmented. The rules are the classical method's, with its helpers
(one treated zone per study, the rim near it and enhancing, rule 6's minimum focus size, the
half-way pre-contrast edge, rule 6's thick enhancing regions as focus candidates).

``WeightsError``, ``load_model`` and ``resolve_weights`` are re-exported from ``models.infer``
for the study analysis (pipeline/measurement/study.py), which falls back to the classical method
on ``WeightsError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from models.infer import LoadedModel, NetworkPrediction, WeightsError, load_model, predict_study, resolve_weights
from pipeline.core.config import EnhancementConfig, SegmentationConfig
from pipeline.core.records import Label, label_map
from pipeline.segmentation.classical import (
    SegmentationResult,
    component_nearest,
    enhancing_tissue,
    focus_candidates,
    half_max_edge,
    smooth_relative_enhancement,
    spacing_zyx,
    t1_bright_components,
    tissue_reference_level,
)

__all__ = ["NOT_AN_ABLATION_ZONE", "CleanedPrediction", "WeightsError", "clean_prediction", "load_model",
           "pipeline_foci", "place_az_edge", "resolve_weights", "segment_network"]


@dataclass
class CleanedPrediction:
    """The network's labels as the pipeline uses them (``clean_prediction``), on the post grid."""

    az: np.ndarray  # bool: the ablation-zone component kept, holes filled
    az_soft: np.ndarray  # float32: its probability within one voxel of it
    rim: np.ndarray  # bool: rim voxels outside the AZ and within rim_search_mm of it
    foci: list[np.ndarray]  # bool masks: focus components of at least the minimum size

    def labels(self) -> np.ndarray:
        """uint8 label map, values of :class:`models.labels.Label`."""
        return label_map(self.az, self.rim, self.foci)


def clean_prediction(pred: NetworkPrediction, body_a: np.ndarray, spacing_zyx: np.ndarray,
                     segmentation: SegmentationConfig, enhancement: EnhancementConfig,
                     hint_zyx: np.ndarray | None = None,
                     relative_enhancement: np.ndarray | None = None) -> CleanedPrediction | None:
    """The argmax turned into one ablation zone, its rim and the foci; None without an AZ.

    Why each rule (the same as the classical method's, pipeline/segmentation/classical.py): one
    treated lesion per study, so the AZ is the component nearest the target hint (else the
    largest) of at least ``az_min_volume_ml``; the rim is the benign margin of that zone, so rim
    voxels farther than ``rim_search_mm`` from it are not rim (they measured as false rim on
    rim-free held-out studies); focus components under rule 6's minimum size are specks
    (single stray voxels set the focus HD95 to tens of mm before this filter).
    """
    spacing = np.asarray(spacing_zyx, float)
    lab, n = ndi.label(pred.labels == Label.ABLATION_ZONE)
    min_az_vox = int(segmentation.az_min_volume_ml / (float(np.prod(spacing)) / 1000.0))
    keep = component_nearest(lab, n, hint_zyx, spacing, min_az_vox) if n else 0
    if keep == 0:
        return None
    az = ndi.binary_fill_holes(lab == keep) & body_a
    soft = pred.probabilities[Label.ABLATION_ZONE].copy()
    soft[~ndi.binary_dilation(az, iterations=1)] = 0.0
    near_az = ndi.distance_transform_edt(~az, sampling=spacing) <= segmentation.rim_search_mm
    rim = (pred.labels == Label.RIM) & ~az & body_a & near_az
    if (relative_enhancement is not None and rim.any()
            and float(relative_enhancement[rim].mean()) < segmentation.network_rim_min_mean_re):
        rim = np.zeros_like(rim)
    focus = (pred.labels == Label.ENHANCING_FOCUS) & ~az & body_a
    flab, nf = ndi.label(focus)
    min_vox = max(1, int(np.ceil((np.pi / 6 * enhancement.min_component_mm ** 3) / np.prod(spacing))))
    sizes = ndi.sum_labels(np.ones_like(flab), flab, index=np.arange(1, nf + 1)) if nf else []
    foci = [flab == i for i, size in zip(range(1, nf + 1), sizes) if int(size) >= min_vox]
    return CleanedPrediction(az, soft.astype(np.float32), rim, foci)


def place_az_edge(cleaned: CleanedPrediction, pre_a: np.ndarray, relative_enhancement: np.ndarray,
                  enhancing: np.ndarray, body_a: np.ndarray, spacing_zyx: np.ndarray,
                  segmentation: SegmentationConfig, enhancement: EnhancementConfig) -> CleanedPrediction:
    """The network's zone with its edge at the half-way pre-contrast level (``segmentation.network_az_edge``).

    The network decides which zone is the ablation zone and where its rim and foci are; the edge
    of the zone is then placed where the pre-contrast signal crosses half-way between the zone's
    core and its surroundings, the partial-volume convention the classical method measures on
    (``pipeline.segmentation.classical.half_max_edge``, shared). Why: the network sees the study on a
    1.6 mm working grid and is trained on labels resampled to it by nearest neighbour, so its edge
    jitters by a fraction of a voxel (held-out AZ Dice 0.967 with its own edge; models/README.md
    gives both figures).

    The core the edge grows from is the network's zone joined with the T1-bright non-enhancing
    region it overlaps most (``t1_bright_components``, the classical method's zone candidates):
    the half-way rule measures the core's own signal 2 mm inside it and the surroundings' 2-6 mm
    outside it, and where the network's zone falls short of the bright region the edge would
    otherwise be searched from too far inside. Chosen on the validation cohort over the network's
    zone alone (AZ Dice 0.9886 against 0.9882) and checked on the held-out one (0.9818 against
    0.9812; the classical method 0.9885 and 0.9817). Without an overlapping bright region the
    core is the network's zone. Rim and foci keep the network's voxels outside the new zone.
    """
    spacing = np.asarray(spacing_zyx, float)
    core = cleaned.az
    ref = tissue_reference_level(pre_a, body_a)
    if ref is not None:
        bright, n = t1_bright_components(pre_a, smooth_relative_enhancement(relative_enhancement), body_a, spacing,
                                         ref, segmentation, enhancement)
        if n:
            overlap = ndi.sum_labels(cleaned.az, bright, index=np.arange(1, n + 1))
            if overlap.max() > 0:
                core = cleaned.az | (bright == 1 + int(np.argmax(overlap)))
    inside = body_a & np.isfinite(pre_a)
    az, soft = half_max_edge(core, pre_a, enhancing, body_a, spacing, float(np.median(pre_a[inside])))
    if not az.any():
        return cleaned
    return CleanedPrediction(az, soft, cleaned.rim & ~az, [m & ~az for m in cleaned.foci if (m & ~az).any()])


def segment_network(pre_on_post: sitk.Image, subtraction: sitk.Image, relative_enhancement: sitk.Image,
                    body: sitk.Image, segmentation: SegmentationConfig, enhancement: EnhancementConfig,
                    focus_min_thickness_mm: float, model: LoadedModel,
                    target_hint_lps: tuple[float, float, float] | None = None
                    ) -> tuple[SegmentationResult, NetworkPrediction]:
    """``SegmentationResult`` (pipeline/segmentation/classical.py) from the network, plus the prediction.

    The prediction is ``models.infer.predict_study``'s (TTA as ``segmentation.network_tta`` and
    ``network_tta_views``), its input scaled within ``body``. The AZ and rim are
    ``clean_prediction``'s, its foci merged with rule 6's thick enhancing regions
    (``pipeline_foci``), the AZ's edge placed by ``place_az_edge``
    when ``segmentation.network_az_edge`` is ``half_max``; ``az_soft`` is then the zone's
    partial-volume fraction, else the network's AZ probability (what the measurement refines the
    edge with). ``enhancing`` stays rule 6's
    definition (RE >= threshold, components >= the minimum size; shared with the classical
    method) plus the network's rim and foci, because the foci stage measures new lesions and
    vessels on it, not only what the network labels. ``focus_min_thickness_mm`` is
    ``foci.min_thickness_mm`` (``pipeline_foci``).
    """
    body_a = sitk.GetArrayFromImage(body) > 0
    pred = predict_study(model, pre_on_post, subtraction, body_a, tta=segmentation.network_tta,
                         tta_views=segmentation.network_tta_views)
    spacing = spacing_zyx(pre_on_post)
    enhancing = enhancing_tissue(relative_enhancement, body, enhancement)
    hint = None
    if target_hint_lps is not None:
        hint = np.array(pre_on_post.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in target_hint_lps))[::-1])
    cleaned = clean_prediction(pred, body_a, spacing, segmentation, enhancement, hint,
                               sitk.GetArrayFromImage(relative_enhancement))
    if cleaned is None:
        empty = np.zeros(pred.labels.shape, bool)
        return SegmentationResult(empty, empty.astype(np.float32), enhancing, empty, [], False,
                                  "the network found no ablation zone"), pred
    if not _zone_is_bright_and_non_enhancing(cleaned.az, pre_on_post, relative_enhancement, body_a, spacing,
                                             segmentation, enhancement):
        empty = np.zeros(pred.labels.shape, bool)
        return SegmentationResult(empty, empty.astype(np.float32), enhancing, empty, [], False,
                                  NOT_AN_ABLATION_ZONE), pred
    if segmentation.network_az_edge == "half_max":
        cleaned = place_az_edge(cleaned, sitk.GetArrayFromImage(pre_on_post).astype(np.float32),
                                sitk.GetArrayFromImage(relative_enhancement), enhancing, body_a, spacing,
                                segmentation, enhancement)
    enhancing, foci = pipeline_foci(cleaned, enhancing, spacing, focus_min_thickness_mm)
    return SegmentationResult(cleaned.az, cleaned.az_soft, enhancing, cleaned.rim, foci, True, ""), pred


# The reason ``segment_network`` gives for a zone that fails the definition; the study driver then
# segments with the classical method (pipeline/measurement/study.py).
NOT_AN_ABLATION_ZONE = "the network's zone overlaps no T1-bright non-enhancing region (not an ablation zone)"


def _zone_is_bright_and_non_enhancing(az: np.ndarray, pre_on_post: sitk.Image, relative_enhancement: sitk.Image,
                                      body_a: np.ndarray, spacing: np.ndarray, segmentation: SegmentationConfig,
                                      enhancement: EnhancementConfig) -> bool:
    """The network's zone overlaps a T1-bright non-enhancing region, or the study holds none.

    The ablation zone is T1-bright and non-enhancing by definition (criteria.md); the network
    proposes which zone it is, the definition checks it. Out of its training distribution it
    can label something else: development liver seed 81, a follow-up whose network zone was a
    55 mm sliver of enhancing liver edge 80 mm from the real zone, which the classical candidates
    show plainly. A study holding no bright non-enhancing region at all (a zone whose T1 signal
    has faded) keeps the network's zone: the classical method would find nothing either.
    """
    pre_a = sitk.GetArrayFromImage(pre_on_post).astype(np.float32)
    ref = tissue_reference_level(pre_a, body_a)
    if ref is None:
        return True
    bright, n = t1_bright_components(pre_a, smooth_relative_enhancement(sitk.GetArrayFromImage(relative_enhancement)),
                                     body_a, spacing, ref, segmentation, enhancement)
    return n == 0 or bool((bright[az] > 0).any())


def pipeline_foci(cleaned: CleanedPrediction, enhancing: np.ndarray, spacing_zyx: np.ndarray,
                  focus_min_thickness_mm: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """(enhancing tissue, focus candidates) as ``segment_network`` hands them on to the foci stage.

    ``enhancing``: rule 6's enhancing tissue. Returned: it plus the network's rim and foci,
    outside the zone; the candidates are the network's foci merged with rule 6's thick enhancing
    regions (the classical candidates). The network alone under-drew a residual tumour at the
    zone's margin (5.6 mm thick where the classical candidate measured 7.2 mm; default cohort
    seed 2027) and the study read as complete; a missed viable tumour costs more than a
    candidate that the foci rules (thickness, vessel shape, distance) then dismiss.
    """
    network_enhancing = cleaned.rim.copy()
    for mask in cleaned.foci:
        network_enhancing |= mask
    enhancing = (enhancing | network_enhancing) & ~cleaned.az
    merged = np.zeros(enhancing.shape, bool)
    for mask in cleaned.foci + focus_candidates(enhancing, cleaned.az, np.asarray(spacing_zyx, float),
                                                focus_min_thickness_mm):
        merged |= mask
    lab, n = ndi.label(merged)
    return enhancing, [lab == i for i in range(1, n + 1)]
