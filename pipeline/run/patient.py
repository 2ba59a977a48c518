"""Assess one patient: the orchestration of the stages, in the order data flows (issue 17).

Per study, the imaging (:func:`study_imaging`: reused from the study store,
:mod:`pipeline.outputs.store`, when its inputs are unchanged, else
:func:`pipeline.measurement.study.analyse_study`); the patient's timeline; a patient whose stored
records all still hold is left as it is (SEG/SR/report back-filled where missing); else each
follow-up's registration to its baseline (cached), the pure assessment
(:func:`pipeline.longitudinal.assessment.assess_timeline`) and the writers
(:mod:`pipeline.outputs.writers`). Plain functions; the Prefect flow in flows/ wraps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from pipeline.core.config import PipelineConfig
from pipeline.core.records import (
    AssessmentRecord,
    AxisMeasurement,
    ErrorRecord,
    RegistrationQC,
    StudyImaging,
    StudyRecord,
    TimelineEntry,
    Timepoint,
)
from pipeline.imaging.registration import PreparedFixed, invert_registration, prepare_baseline, register_to_baseline
from pipeline.imaging.subtraction import temporal_difference
from pipeline.longitudinal.assessment import StudyFindings, assess_timeline, registration_failure
from pipeline.longitudinal.timeline import Procedure, build_patient_timeline
from pipeline.measurement.baseline_comparison import foci_seen_at_baseline
from pipeline.measurement.study import StudyImages, analyse_study
from pipeline.outputs.locks import patient_lock
from pipeline.outputs.store import StudyStore, analysis_digest, cache_keys, imaging_key, read_cached_images, to_baseline_key
from pipeline.outputs.writers import (
    StudyEvidence,
    backfill_report,
    backfill_study_dicom,
    write_patient_outputs,
    write_study_outputs,
)


@dataclass
class StudyState:
    """What the patient-level steps need of one study."""

    study: StudyRecord
    imaging: StudyImaging
    loaded: StudyImages | None
    imaging_key: str
    folder: Path | None = None
    reused: bool = False
    to_baseline: RegistrationQC | None = None
    to_baseline_key: str = ""
    transform: sitk.Transform | None = None
    to_baseline_error: str = ""
    # The inverse of ``transform`` (this study -> baseline), computed once on first use: the
    # temporal difference, the comparison with the baseline and the key image all need it.
    inverse_transform: sitk.Transform | None = None
    # Seconds of this run's steps on the study beyond its imaging (AssessmentRecord.stage_seconds).
    seconds: dict[str, float] = field(default_factory=dict)

    def images(self) -> StudyImages | None:
        """The study's images; a reused study reads them from its output folder on first use."""
        if self.loaded is None and self.reused and self.imaging.ok and self.folder is not None:
            self.loaded = read_cached_images(self.folder, self.study, self.imaging)
        return self.loaded

    @property
    def to_baseline_failure(self) -> str:
        """Why the registration to the baseline cannot be used ("" when it can or was not needed)."""
        return registration_failure(self.to_baseline, self.to_baseline_error)

    def findings(self) -> StudyFindings:
        return StudyFindings(self.imaging, self.to_baseline, self.to_baseline_error,
                             cache_keys(self.imaging_key, self.to_baseline_key))

    def to_baseline_inverse(self) -> sitk.Transform | None:
        """This study -> its baseline (None without a usable registration), inverted once."""
        if self.to_baseline_failure or self.transform is None:
            return None
        if self.inverse_transform is None:
            self.inverse_transform = invert_registration(self.transform)
        return self.inverse_transform

    def evidence(self, baseline: StudyState | None) -> StudyEvidence:
        # The inverse only when already computed (by the temporal difference): inverting here
        # could raise outside the writers' error handling, which invert it themselves.
        usable = not self.to_baseline_failure and self.transform is not None
        return StudyEvidence(self.images, baseline.images if baseline is not None else None,
                             self.transform if usable else None, self.inverse_transform if usable else None)


@dataclass
class PatientResult:
    patient_id: str
    records: list[AssessmentRecord] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    n_reused: int = 0


def study_imaging(study: StudyRecord, cfg: PipelineConfig, out_dir: Path, device: str = "cpu") -> tuple[StudyState, list[ErrorRecord]]:
    """Per-study imaging, reusing the results of an earlier run when its inputs are unchanged."""
    store = StudyStore(out_dir)
    folder = store.folder(study)
    key = imaging_key(study, analysis_digest(cfg.digest(), cfg.segmentation))
    t0 = time.perf_counter()
    cached = store.cached_imaging(study, key)
    if cached is not None:
        imaging, errors = cached
        return StudyState(study, imaging, None, key, folder, reused=True,
                          seconds={"read_cache": time.perf_counter() - t0}), errors
    analysis = analyse_study(study, cfg, device=device)
    t0 = time.perf_counter()
    images = None if analysis.images is None else store.keep_images(study, analysis.images)
    state = StudyState(study, analysis.imaging, images, key, folder, seconds={"write_images": time.perf_counter() - t0})
    return state, analysis.errors


def zone_guidance(baseline_zone: AxisMeasurement | None, follow_up_zone: AxisMeasurement | None,
                  local_max_distance_mm: float
                  ) -> tuple[list[float] | None, tuple[list[float], float] | None]:
    """What the two studies' ablation zones tell the follow-up -> baseline registration.

    ``(hint_shift_lps, zone_region_lps)``: the shift between the zones' centroids (the one
    structure both studies are centred on: a start within the optimiser's capture range, one
    candidate among others), and the baseline zone with the margin in which a focus is local
    (rule 4) as ``(centre, radius_mm)``: where the comparison matters, so a follow-up of another
    field of view that images it is not a failed registration. None where a zone is missing.
    """
    a, b = baseline_zone, follow_up_zone
    hint = None if a is None or b is None else [fu - base for fu, base in zip(b.centroid_lps, a.centroid_lps)]
    region = None if a is None else (list(a.centroid_lps), a.max_3d_diameter_mm / 2.0 + local_max_distance_mm)
    return hint, region


def _register_follow_up(state: StudyState, baseline: StudyState, cfg: PipelineConfig, store: StudyStore,
                        prepared: dict[str, PreparedFixed | None]) -> None:
    """Follow-up -> baseline registration (cached by both studies' keys). ``prepared``: the
    baselines' sides of the registration by study UID, filled on first use (one per baseline)."""
    key = to_baseline_key(state.imaging_key, baseline.imaging_key)
    state.to_baseline_key = key
    cached = store.cached_to_baseline(state.study, key)
    if cached is not None:
        state.to_baseline = cached
        state.transform, state.inverse_transform = store.read_to_baseline(state.study), None
        return
    # ITK convention, baseline fixed: the transform maps a baseline point to this study's point.
    hint, zone_region = zone_guidance(baseline.imaging.ablation_zone, state.imaging.ablation_zone,
                                      cfg.foci.local_max_distance_mm)
    base_uid = baseline.study.study_instance_uid
    if base_uid not in prepared:
        try:
            prepared[base_uid] = prepare_baseline(baseline.images().pre_registered, cfg.registration)
        except RuntimeError:  # ITK (N4...): the registration itself then fails with its QC reason
            prepared[base_uid] = None
    transform, qc = register_to_baseline(baseline.images().pre_registered, state.images().pre_registered,
                                         cfg.registration, hint_shift_lps=hint, zone_region_lps=zone_region,
                                         prepared=prepared[base_uid])
    state.to_baseline, state.transform, state.inverse_transform = qc, transform, None
    if qc.ok:
        store.keep_to_baseline(state.study, transform, baseline.images().pre_registered)


def _register_follow_ups(entries: list[TimelineEntry], states: dict[str, StudyState], cfg: PipelineConfig,
                         store: StudyStore) -> list[ErrorRecord]:
    """Each follow-up onto its baseline, the temporal difference where that passed QC, and its
    suspicious foci compared with the baseline (``rules.focus_seen_at_baseline_min_fraction``)."""
    errors: list[ErrorRecord] = []
    prepared: dict[str, PreparedFixed | None] = {}
    for entry in entries:
        state = states[entry.study.study_instance_uid]
        base_uid = entry.baseline_study_instance_uid
        if any(f.seen_at_baseline_fraction is not None for f in state.imaging.foci):
            # An earlier run's comparison (read back with the cached imaging) is measured again below.
            state.imaging = state.imaging.model_copy(update={"foci": [
                f.model_copy(update={"seen_at_baseline_fraction": None}) for f in state.imaging.foci]})
        if entry.timepoint != Timepoint.FOLLOW_UP or not base_uid or not state.imaging.ok:
            continue
        baseline = states.get(base_uid)
        if baseline is None or not baseline.imaging.ok or state.images() is None or baseline.images() is None:
            continue
        try:
            t0 = time.perf_counter()
            _register_follow_up(state, baseline, cfg, store, prepared)
            state.seconds["register_to_baseline"] = time.perf_counter() - t0
            if not state.to_baseline_failure:
                # Follow-up subtraction minus the baseline's, brought onto this study's grid.
                fu, base = state.images(), baseline.images()
                t0 = time.perf_counter()
                try:
                    store.keep_temporal_difference(entry.study, temporal_difference(
                        fu.subtraction, fu.pre_registered, base.subtraction, base.pre_registered, state.transform,
                        state.to_baseline_inverse(), fu.pre_body(), base.pre_body()))
                    state.seconds["temporal_difference"] = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001 - supporting image: never lose the study
                    errors.append(ErrorRecord.from_exception(
                        exc, "temporal_difference", patient_id=entry.study.patient_id,
                        study_instance_uid=entry.study.study_instance_uid))
        except Exception as exc:  # noqa: BLE001
            state.to_baseline_error = f"{type(exc).__name__}: {exc}"
        if state.to_baseline_failure:
            errors.append(ErrorRecord("", entry.study.patient_id, entry.study.study_instance_uid, "",
                                      "register_to_baseline", state.to_baseline_failure))
        if cfg.rules.focus_seen_at_baseline_min_fraction is not None:
            errors.extend(_compare_foci_with_baseline(entry, state, baseline, cfg))
    return errors


def _compare_foci_with_baseline(entry: TimelineEntry, state: StudyState, baseline: StudyState,
                                cfg: PipelineConfig) -> list[ErrorRecord]:
    """Set each suspicious focus's ``seen_at_baseline_fraction`` (None where the registration to
    the baseline is not usable: then no focus is discounted)."""
    t0 = time.perf_counter()
    transform = None if state.to_baseline_failure else state.transform
    try:
        foci = foci_seen_at_baseline(state.imaging.foci, state.images(), baseline.images(), transform,
                                     bool(state.imaging.enhancement_above_surroundings),
                                     cfg.enhancement.relative_enhancement_threshold,
                                     state.to_baseline_inverse() if transform is not None else None)
    except Exception as exc:  # noqa: BLE001 - a supporting comparison: never lose the study
        foci = [f.model_copy(update={"seen_at_baseline_fraction": None}) for f in state.imaging.foci]
        state.imaging = state.imaging.model_copy(update={"foci": foci})
        return [ErrorRecord.from_exception(exc, "seen_at_baseline", patient_id=entry.study.patient_id,
                                           study_instance_uid=entry.study.study_instance_uid)]
    state.imaging = state.imaging.model_copy(update={"foci": foci})
    state.seconds["seen_at_baseline"] = time.perf_counter() - t0
    return []


def _unchanged_records(entries: list[TimelineEntry], states: dict[str, StudyState],
                       store: StudyStore) -> list[AssessmentRecord] | None:
    """The stored records when every study and the timeline are as in the last run, else None."""
    uids = [e.study.study_instance_uid for e in entries]
    records = []
    for entry in entries:
        state = states[entry.study.study_instance_uid]
        base = states.get(entry.baseline_study_instance_uid or "")
        expected = None
        if entry.timepoint == Timepoint.FOLLOW_UP and base is not None and state.imaging.ok and base.imaging.ok:
            expected = to_baseline_key(state.imaging_key, base.imaging_key)
        record = store.unchanged_record(entry, uids, expected) if state.reused else None
        if record is None:
            return None
        records.append(record)
    return records


def assess_patient(
    studies: list[StudyRecord],
    procedures: list[Procedure] | None,
    cfg: PipelineConfig,
    out_dir: Path,
    device: str = "cpu",
    imaging_fn=study_imaging,
    redactor=None,
) -> PatientResult:
    """All stages for one patient; writes the per-study outputs and returns the records.

    ``imaging_fn`` lets the Prefect flow run each study's imaging as its own task.
    ``redactor`` (a :class:`pipeline.ingest.pseudonym.Redactor`, pseudonymised runs): cleans the text
    of every record and error row before it is written or returned. The patient's lock is held
    throughout (pipeline/outputs/locks.py): another run on the same output folder waits, then
    reuses these results; after ``execution.patient_lock_timeout_s`` it raises PatientBusyError.
    """
    store = StudyStore(Path(out_dir))
    with patient_lock(store.out_dir, store.patient_folder(studies[0]).name, cfg.execution.patient_lock_timeout_s):
        return _assess_patient(studies, procedures, cfg, store, device, imaging_fn, redactor)


def _assess_patient(studies: list[StudyRecord], procedures: list[Procedure] | None, cfg: PipelineConfig,
                    store: StudyStore, device: str, imaging_fn, redactor) -> PatientResult:
    out_dir = store.out_dir
    result = PatientResult(patient_id=studies[0].patient_id)
    states: dict[str, StudyState] = {}
    for study in sorted(studies, key=lambda s: (s.study_date is None, s.study_date, s.study_instance_uid)):
        try:
            state, errors = imaging_fn(study, cfg, out_dir, device)
        except Exception as exc:  # noqa: BLE001 - a failing study must never kill the batch
            row = ErrorRecord.from_exception(exc, "imaging", "imaging failed", patient_id=study.patient_id,
                                             study_instance_uid=study.study_instance_uid)
            state, errors = StudyState(study, StudyImaging(ok=False, reason=row.reason), None, "",
                                       store.folder(study)), [row]
        states[study.study_instance_uid] = state
        result.errors.extend(errors)
        result.n_reused += int(state.reused)

    az_present = {uid: s.imaging.ok and s.imaging.az_found for uid, s in states.items()}
    entries: list[TimelineEntry] = build_patient_timeline(studies, procedures, az_present, cfg.rules)

    def redact(errors: list[ErrorRecord]) -> list[ErrorRecord]:
        return errors if redactor is None else [redactor.error(e) for e in errors]

    unchanged = _unchanged_records(entries, states, store)
    if unchanged is not None:
        # Nothing new for this patient: the nightly rerun leaves its outputs as they are, except
        # the SEG/SR/report that a run before they existed (or a deletion) left missing.
        result.records = unchanged
        result.errors = [ErrorRecord(**e) for r in unchanged for e in r.errors]
        for entry, record in zip(entries, unchanged):
            evidence = states[entry.study.study_instance_uid].evidence(None)
            result.errors.extend(backfill_study_dicom(record, entry.study, evidence, store.folder(entry.study),
                                                      cfg.outputs))
        if entries:
            studies_out = [(r, store.folder(e.study)) for e, r in zip(entries, unchanged)]
            result.errors.extend(backfill_report(result.patient_id, studies_out, store.patient_folder(entries[0].study),
                                                 cfg.outputs))
        result.errors = redact(result.errors)
        return result

    result.errors.extend(_register_follow_ups(entries, states, cfg, store))
    assessed = assess_timeline(entries, {uid: s.findings() for uid, s in states.items()}, cfg.rules, cfg.foci,
                               cfg.segmentation.network_review_uncertainty)
    records = [_redacted_record(r, redactor) for r in assessed.records]
    result.errors = redact(result.errors)
    for entry, record in zip(entries, records):
        state = states[entry.study.study_instance_uid]
        evidence = state.evidence(states.get(entry.baseline_study_instance_uid or ""))
        computed = {} if state.reused else record.imaging.timings_s
        record.stage_seconds = {k: round(v, 3) for k, v in {**computed, **state.seconds}.items()}
        result.errors.extend(write_study_outputs(record, entry.study, evidence, store.folder(entry.study), cfg.outputs,
                                                 result.errors, redact))
    if entries:
        studies_out = [(r, store.folder(e.study)) for e, r in zip(entries, records)]
        result.errors.extend(write_patient_outputs(result.patient_id, studies_out, assessed.points,
                                                   store.patient_folder(entries[0].study), cfg.outputs,
                                                   (cfg.rules.growth_min_abs_mm, cfg.rules.growth_min_pct)))
    result.records = records
    result.errors = redact(result.errors)
    return result


def _redacted_record(record: AssessmentRecord, redactor) -> AssessmentRecord:
    """The record with every free text redacted; the series used keep their descriptions
    (they name sequences, and the role rules have read them already)."""
    if redactor is None:
        return record
    data = record.model_dump()
    series = data.pop("series")
    return AssessmentRecord.model_validate({**redactor.tree(data), "series": series})
