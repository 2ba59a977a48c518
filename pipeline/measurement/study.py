"""Per-study imaging: load, register post->pre, subtract, segment, measure (one study, no history).

``analyse_study`` never raises for bad input: a study it cannot read comes back with
``ok=False`` and the reason, plus error rows for errors.csv.

The one function of the imaging, segmentation and measurement stages that takes the whole
``PipelineConfig``: it is the per-study driver and hands each stage function its own section
(docs/architecture.md, "Configuration").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from pipeline.core.config import PipelineConfig
from pipeline.core.geometry import body_mask, field_of_view_mask, resample_to
from pipeline.core.records import (
    ErrorRecord,
    RegistrationQC,
    SeriesRecord,
    SeriesRole,
    StudyImaging,
    StudyRecord,
    label_map,
)
from pipeline.imaging.phases import relative_enhancement_on_grid
from pipeline.imaging.registration import register_intra_study
from pipeline.imaging.subtraction import normalise_post_to_pre, relative_enhancement, subtraction
from pipeline.imaging.volumes import SeriesGeometryError, load_series
from pipeline.measurement.axes import measure_ablation_zone
from pipeline.measurement.foci import analyse_foci
from pipeline.measurement.rim import rim_metrics, rim_thickness_profile
from pipeline.measurement.supporting import enhancement_by_phase, t2_ratios
from pipeline.segmentation.classical import SegmentationResult, segment, spacing_zyx
from pipeline.segmentation.surroundings import (
    arterial_phase_read,
    enhances_like_parenchyma,
    read_above_surroundings,
    surroundings_of_zone,
)


@dataclass
class StudyImages:
    """Images of one study on the grid of the post-contrast series used."""

    post: sitk.Image
    pre_registered: sitk.Image
    subtraction: sitk.Image
    labels: sitk.Image
    # A zone in enhancing parenchyma: RE above the surroundings, largest over the phases read
    # (the arterial one included), which the foci were judged on; None where rule 6 read them.
    above_surroundings: sitk.Image | None = None
    # The subtraction the network was given: ``subtraction`` without the slab ends zeroed, what
    # the shipped weights were trained on (analyse_study); training cases are written from it
    # (phantom/training_cases.py). Not written to the outputs. None: the same as ``subtraction``.
    network_subtraction: sitk.Image | None = None
    # body_mask(pre_registered), computed on first use (pre_body): the temporal difference and
    # the comparison with the baseline read a baseline's for each of its follow-ups (issue 19).
    _pre_body: sitk.Image | None = field(default=None, init=False, repr=False, compare=False)

    def pre_body(self) -> sitk.Image:
        """``core.geometry.body_mask`` of ``pre_registered``, computed once."""
        if self._pre_body is None:
            self._pre_body = body_mask(self.pre_registered)
        return self._pre_body


@dataclass
class StudyAnalysis:
    imaging: StudyImaging
    images: StudyImages | None
    errors: list[ErrorRecord] = field(default_factory=list)


def _error(study: StudyRecord, series: SeriesRecord | None, stage: str, reason: str) -> ErrorRecord:
    return ErrorRecord(
        path=str(series.files[0].parent) if series and series.files else "",
        patient_id=study.patient_id, study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid if series else "", stage=stage, reason=reason)


def _phase_order(posts: list[SeriesRecord], choice: str | int) -> list[SeriesRecord]:
    """Post-contrast phases in the order they are tried: the configured one first."""
    if choice == "latest":
        return list(reversed(posts))
    preferred = [p for p in posts if p.phase_index == choice]
    return preferred + [p for p in reversed(posts) if p not in preferred]


def analyse_study(
    study: StudyRecord,
    cfg: PipelineConfig,
    target_hint_lps: tuple[float, float, float] | None = None,
    device: str = "cpu",
) -> StudyAnalysis:
    """Run the per-study stages on one study. See module docstring."""
    timings: dict[str, float] = {}
    errors: list[ErrorRecord] = []
    pres = study.with_role(SeriesRole.T1_PRE)
    posts = study.with_role(SeriesRole.T1_POST)
    used = {}
    if not posts:
        # Ingest already reported the missing series in errors.csv (stage series_roles).
        return StudyAnalysis(StudyImaging(ok=False, reason="no post-contrast T1 series in the study"), None, [])
    if not pres:
        reason = "no pre-contrast T1 series in the study (subtraction impossible)"
        return StudyAnalysis(StudyImaging(ok=False, reason=reason), None, [_error(study, None, "select_series", reason)])

    t0 = time.perf_counter()
    pre_series = pres[0]
    try:
        pre = load_series(pre_series)
    except (SeriesGeometryError, OSError, ValueError) as exc:
        reason = f"pre-contrast series unreadable: {exc}"
        return StudyAnalysis(StudyImaging(ok=False, reason=reason), None, [_error(study, pre_series, "load", reason)])
    used[SeriesRole.T1_PRE.value] = pre_series.series_instance_uid
    timings["load"] = time.perf_counter() - t0

    # Rule 5: register each phase to the pre-contrast; a phase failing QC is not used.
    registrations: list[RegistrationQC] = []
    chosen = None
    for post_series in _phase_order(posts, cfg.enhancement.phase):
        t0 = time.perf_counter()
        try:
            post = load_series(post_series)
        except (SeriesGeometryError, OSError, ValueError) as exc:
            errors.append(_error(study, post_series, "load", f"post-contrast phase unreadable: {exc}"))
            continue
        timings["load"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        # The post grid is the output grid (DESIGN.md): the pre-contrast is moved onto it.
        transform, qc = register_intra_study(post, pre, cfg.registration, name=f"pre_to_post_phase{post_series.phase_index}")
        timings["register_intra"] = timings.get("register_intra", 0.0) + time.perf_counter() - t0
        registrations.append(qc)
        if qc.ok:
            chosen = (post_series, post, transform)
            break
        errors.append(_error(study, post_series, "register_intra", f"phase not used: {qc.reason}"))
    if chosen is None:
        reason = ("no usable post-contrast phase: " + "; ".join(f"{q.name}: {q.reason}" for q in registrations)
                  if registrations else "no post-contrast phase could be read")
        return StudyAnalysis(StudyImaging(ok=False, reason=reason, registration=registrations, series_used=used,
                                          timings_s=timings), None, errors)
    post_series, post, transform = chosen
    used[SeriesRole.T1_POST.value] = post_series.series_instance_uid

    t0 = time.perf_counter()
    pre_on_post = resample_to(pre, post, transform)
    body = body_mask(pre_on_post)
    post_norm, _factor = normalise_post_to_pre(pre_on_post, post, body)
    # Where the pre-contrast slab did not reach, pre_on_post is the resampler's fill: no
    # subtraction there (the RE is 0 there already: the body mask is read from pre_on_post).
    sub = subtraction(pre_on_post, post_norm, field_of_view_mask(pre, post, transform))
    # The shipped network weights were trained on subtractions that kept the fill (post-contrast
    # minus nothing at the slab ends); given the clean one their case uncertainty rose 0.06 ->
    # 0.34 on liver development seed 82 (docs/evaluation.md, "0.3.2"). The network gets what it
    # was trained on until it is retrained on the clean subtraction.nii.gz (models/README.md).
    sub_as_trained = subtraction(pre_on_post, post_norm)
    rel = relative_enhancement(pre_on_post, post_norm, body)
    timings["subtract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seg, seg_method, seg_note, seg_uncertainty, seg_device = _segment(pre_on_post, sub_as_trained, rel, body, cfg,
                                                                      target_hint_lps, device)
    timings["segment"] = time.perf_counter() - t0

    # A zone inside enhancing parenchyma: rim and foci read above the surroundings.
    t0 = time.perf_counter()
    rel_for_foci, surroundings_re, above = rel, {}, False
    # RE maps of other phases on the post grid, read once: the surroundings step and the
    # supporting signals both need the earliest phase of a zone in parenchyma (issue 19).
    other_phases_re: dict[str, sitk.Image] = {}
    if seg.found and cfg.enhancement.surroundings_shell_mm is not None:
        seg, rel_for_foci, surroundings_re, above = _read_above_surroundings(
            study, seg, pre, pre_on_post, post_series, post, transform, rel, body, cfg, other_phases_re)
    timings["surroundings"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels_a = np.zeros(seg.az.shape, np.uint8)
    az_measure = rim = None
    foci = []
    if seg.found:
        az_img = _like(seg.az.astype(np.uint8), post)
        az_measure = measure_ablation_zone(az_img, _like(seg.az_soft, post))
        enh_img = _like(seg.enhancing.astype(np.uint8), post)
        profile = rim_thickness_profile(az_img, enh_img, max_search_mm=cfg.segmentation.rim_search_mm)
        rim_volume_ml = float(seg.rim.sum() * np.prod(post.GetSpacing()) / 1000.0)
        rim = rim_metrics(profile, rim_volume_ml, cfg.rim.benign_max_thickness_mm,
                          cfg.rim.benign_min_coverage_deg, cfg.rim.benign_max_cv)
        rim_typical = float(np.median(profile.thickness_mm)) if profile.n else 0.0
        foci, focus_masks = analyse_foci(seg, rel_for_foci, post, az_measure, rim, cfg.foci, cfg.enhancement.min_component_mm,
                                          cfg.rim.benign_max_thickness_mm, rim_typical)
        timings["measure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        foci = _with_supporting_signals(study, foci, focus_masks, pre, post_series, post, transform, rel, seg,
                                        sitk.GetArrayFromImage(body) > 0, cfg, other_phases_re)
        timings["supporting_signals"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        labels_a = label_map(seg.az, seg.rim, focus_masks)
    timings["measure"] = timings.get("measure", 0.0) + time.perf_counter() - t0

    labels = _like(labels_a, post)
    key_slice = None
    if seg.found:
        key_slice = int(az_measure.slice_index) if az_measure else None
        suspicious = [f for f in foci if f.suspicious]
        if suspicious:
            worst = max(suspicious, key=lambda f: f.diameter_mm)
            key_slice = int(round(post.TransformPhysicalPointToContinuousIndex(tuple(worst.centroid_lps))[2]))
    imaging = StudyImaging(
        ok=True, series_used=used, post_phase_used=post_series.phase_index, registration=registrations,
        az_found=seg.found and az_measure is not None, ablation_zone=az_measure, rim=rim, foci=foci,
        segmentation_method=seg_method, segmentation_note=seg_note, segmentation_uncertainty=seg_uncertainty,
        device=seg_device, key_slice_index=key_slice, timings_s=timings,
        surroundings_re=surroundings_re, enhancement_above_surroundings=above,
        arterial_phase_read=arterial_phase_read(surroundings_re, cfg.enhancement.arterial_max_fraction) if above else None,
        reason="" if seg.found else seg.reason)
    images = StudyImages(post=post, pre_registered=pre_on_post, subtraction=sub, labels=labels,
                         above_surroundings=rel_for_foci if above else None, network_subtraction=sub_as_trained)
    return StudyAnalysis(imaging, images, errors)


def _read_above_surroundings(study: StudyRecord, seg: SegmentationResult, pre: sitk.Image, pre_on_post: sitk.Image,
                             post_series: SeriesRecord, post: sitk.Image, transform: sitk.Transform, rel: sitk.Image,
                             body: sitk.Image, cfg: PipelineConfig,
                             other_phases_re: dict[str, sitk.Image]) -> tuple[SegmentationResult, sitk.Image, dict[str, float], bool]:
    """(segmentation, RE map the foci are judged on, the surroundings' median RE by phase, applied).

    ``pipeline.segmentation.surroundings.read_above_surroundings`` on the phase segmented and,
    only when its surroundings enhance like parenchyma, the study's earliest post-contrast phase
    (registered to the pre-contrast like any phase, rule 5; skipped when unreadable or failing QC).
    The earliest phase's RE map, when read, is added to ``other_phases_re`` (None: unusable).
    """
    spacing = spacing_zyx(post)
    body_a = sitk.GetArrayFromImage(body) > 0
    shell = tuple(cfg.enhancement.surroundings_shell_mm)
    phases = {str(post_series.phase_index): sitk.GetArrayFromImage(rel)}
    chosen = surroundings_of_zone(seg.az, phases[str(post_series.phase_index)], body_a, spacing, shell)
    earlier = [s for s in study.with_role(SeriesRole.T1_POST)
               if s.phase_index is not None and post_series.phase_index is not None
               and s.phase_index < post_series.phase_index]
    if earlier and enhances_like_parenchyma(chosen, cfg.enhancement):
        earliest = min(earlier, key=lambda s: s.phase_index)
        re_early = relative_enhancement_on_grid(earliest, pre, post, transform, cfg.registration)
        other_phases_re[str(earliest.phase_index)] = re_early
        if re_early is not None:
            phases[str(earliest.phase_index)] = sitk.GetArrayFromImage(re_early)
    pre_a = sitk.GetArrayFromImage(pre_on_post).astype(np.float32)
    seg, excess, read = read_above_surroundings(seg, phases, pre_a, body_a, spacing, cfg.enhancement, shell,
                                                cfg.segmentation.rim_search_mm, cfg.foci.min_thickness_mm)
    if excess is None:
        return seg, rel, read, False
    return seg, _like(np.nan_to_num(excess, nan=0.0), post), read, True


def _segment(pre_on_post, sub, rel, body, cfg: PipelineConfig, target_hint_lps, device: str):
    """(SegmentationResult, method used, note, uncertainty, device used): the network when
    configured and its weights load and run, else the classical method with the reason in the note."""
    note = ""
    if cfg.segmentation.method == "network":
        from pipeline.segmentation.network import (
            NOT_AN_ABLATION_ZONE,
            WeightsError,
            load_model,
            resolve_weights,
            segment_network,
        )

        weights = resolve_weights(cfg.segmentation.network_weights)
        # CPU fallback: a CUDA failure (out of memory, driver) is retried on the CPU.
        for run_on in dict.fromkeys([device, "cpu"]):
            try:
                seg, pred = segment_network(pre_on_post, sub, rel, body, cfg.segmentation, cfg.enhancement,
                                            cfg.foci.min_thickness_mm, load_model(weights, run_on), target_hint_lps)
                fell_back = f"ran on cpu after {note}" if run_on != device else ""
                if seg.reason == NOT_AN_ABLATION_ZONE:
                    # The definition overrules the network; the classical method finds the zone.
                    note = f"{fell_back + '; ' if fell_back else ''}{seg.reason}"
                    break
                return seg, "network", fell_back, pred.case_uncertainty, pred.device
            except WeightsError as exc:
                note = str(exc)
                break
            except (RuntimeError, ValueError) as exc:  # noqa: PERF203 - at most two tries
                note = f"network inference failed on {run_on}: {type(exc).__name__}: {exc}"
    note = f"{note}; classical method used" if note else ""
    seg = segment(pre_on_post, rel, body, cfg.segmentation, cfg.enhancement, cfg.foci.min_thickness_mm, target_hint_lps)
    return seg, "classical", note, None, device


def _with_supporting_signals(study, foci, masks, pre, post_series, post, transform, rel, seg, body, cfg,
                             other_phases_re):
    """Add enhancement by phase and T2 ratios to the suspicious foci (same order as ``masks``);
    ``other_phases_re``: RE maps of phases already read on the post grid."""
    suspicious = [i for i, f in enumerate(foci) if f.suspicious]
    if not suspicious:
        return foci
    phases = enhancement_by_phase(study, pre, post_series, post, transform, rel, masks, cfg.registration,
                                  other_phases_re)
    t2, _note = t2_ratios(study, post, seg.az, body, masks)
    out = list(foci)
    for index, by_phase, (to_az, to_body) in zip(suspicious, phases, t2):
        out[index] = foci[index].model_copy(update={
            "enhancement_by_phase": by_phase, "t2_ratio_to_az": to_az, "t2_ratio_to_body": to_body})
    return out


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
