"""Assess one patient end to end: per-study imaging (cached), timeline, registration to the
baseline, classification, outputs. Plain functions; the Prefect flow in flows/ wraps them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from pipeline import __version__
from pipeline.core.config import PipelineConfig
from pipeline.core.files import atomic_write_image, read_image
from pipeline.core.geometry import resample_to
from pipeline.core.records import (
    AssessmentRecord,
    ErrorRecord,
    RegistrationQC,
    SeriesUsed,
    StudyImaging,
    StudyRecord,
    TimelineEntry,
    Timepoint,
)
from pipeline.imaging.registration import (
    invert_registration,
    read_to_baseline,
    register_to_baseline,
    write_to_baseline,
)
from pipeline.imaging.subtraction import temporal_difference
from pipeline.imaging.volumes import load_series
from pipeline.longitudinal.classify import classify_patient
from pipeline.longitudinal.timeline import Procedure, build_patient_timeline
from pipeline.measurement.study import StudyImages, analyse_study
from pipeline.outputs.contract import read_assessment, study_dir, timeline_points, write_assessment, write_json
from pipeline.outputs.dicom import dicom_outputs_missing, write_study_dicom
from pipeline.outputs.key_image import days_text, render_key_image
from pipeline.outputs.report import write_patient_report
from pipeline.outputs.timeline_plot import render_timeline_plot

# Stages of errors.csv rows that per-study imaging produces (kept with a reused result).
IMAGING_STAGES = {"select_series", "load", "register_intra", "imaging"}
IMAGE_FILES = {"labels": "labels.nii.gz", "subtraction": "subtraction.nii.gz", "pre_registered": "pre_registered.nii.gz"}


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

    def images(self) -> StudyImages | None:
        """The study's images; a reused study reads them from its output folder on first use."""
        if self.loaded is None and self.reused and self.imaging.ok and self.folder is not None:
            self.loaded = _load_cached_images(self.folder, self.study, self.imaging)
        return self.loaded

    @property
    def to_baseline_failure(self) -> str:
        """Why the registration to the baseline cannot be used ("" when it can or was not needed)."""
        if self.to_baseline_error:
            return f"registration to the baseline failed: {self.to_baseline_error}"
        if self.to_baseline is not None and not self.to_baseline.ok:
            return f"registration to the baseline failed QC: {self.to_baseline.reason}"
        return ""


@dataclass
class PatientResult:
    patient_id: str
    records: list[AssessmentRecord] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    n_reused: int = 0


def _files_digest(study: StudyRecord) -> str:
    """Content key of a study's inputs: every file's path, size and modification time."""
    h = hashlib.sha256()
    for series in sorted(study.series, key=lambda s: s.series_instance_uid):
        h.update(f"{series.series_instance_uid}|{series.role.value}|{series.phase_index}".encode())
        for path in sorted(series.files):
            try:
                st = path.stat()
                h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{path}|missing".encode())
    return h.hexdigest()[:16]


def imaging_key(study: StudyRecord, cfg: PipelineConfig) -> str:
    return hashlib.sha256(f"{_files_digest(study)}|{cfg.digest()}|{__version__}".encode()).hexdigest()[:16]


def _load_cached_images(folder: Path, study: StudyRecord, imaging: StudyImaging) -> StudyImages | None:
    try:
        post_uid = imaging.series_used.get("t1_post")
        post_series = next(s for s in study.series if s.series_instance_uid == post_uid)
        loaded = {name: read_image(folder / fname) for name, fname in IMAGE_FILES.items()}
        return StudyImages(post=load_series(post_series), pre_registered=loaded["pre_registered"],
                           subtraction=loaded["subtraction"], labels=loaded["labels"])
    except (StopIteration, RuntimeError, OSError, ValueError):
        return None


def study_imaging(study: StudyRecord, cfg: PipelineConfig, out_dir: Path, device: str = "cpu") -> tuple[StudyState, list[ErrorRecord]]:
    """Per-study imaging, reusing the results of an earlier run when its inputs are unchanged."""
    folder = study_dir(out_dir, study)
    key = imaging_key(study, cfg)
    previous = read_assessment(folder / "assessment.json")
    if previous is not None and previous.cache_keys.get("imaging") == key and (
            not previous.imaging.ok or all((folder / name).exists() for name in IMAGE_FILES.values())):
        errors = [ErrorRecord(**e) for e in previous.errors if e.get("stage") in IMAGING_STAGES]
        return StudyState(study, previous.imaging, None, key, folder, reused=True), errors
    analysis = analyse_study(study, cfg, device=device)
    images = analysis.images
    if images is not None:
        atomic_write_image(images.labels, folder / IMAGE_FILES["labels"])
        atomic_write_image(images.subtraction, folder / IMAGE_FILES["subtraction"])
        atomic_write_image(sitk.Cast(images.pre_registered, sitk.sitkFloat32), folder / IMAGE_FILES["pre_registered"])
        # The later stages (registration to the baseline, temporal difference) use the images as
        # written, float32 with NIfTI's header precision, not the in-memory ones: a rerun after a
        # crash reads them back from disk and must compute exactly what the first run did
        # (tests/test_end_to_end.py::test_resume_after_a_lost_study_recomputes_it_identically).
        loaded = {name: read_image(folder / fname) for name, fname in IMAGE_FILES.items()}
        images = StudyImages(post=images.post, pre_registered=loaded["pre_registered"],
                             subtraction=loaded["subtraction"], labels=loaded["labels"])
    return StudyState(study, analysis.imaging, images, key, folder), analysis.errors


def to_baseline_key(state: StudyState, baseline: StudyState) -> str:
    return hashlib.sha256(f"{state.imaging_key}|{baseline.imaging_key}".encode()).hexdigest()[:16]


def _register_follow_up(state: StudyState, baseline: StudyState, cfg: PipelineConfig, folder: Path) -> None:
    """Follow-up -> baseline registration (cached by both studies' keys)."""
    key = to_baseline_key(state, baseline)
    state.to_baseline_key = key
    tfm_path = folder / "to_baseline.tfm"
    previous = read_assessment(folder / "assessment.json")
    if (previous is not None and previous.cache_keys.get("to_baseline") == key and tfm_path.exists()
            and previous.registration_to_baseline is not None):
        state.to_baseline = previous.registration_to_baseline
        state.transform = read_to_baseline(folder)
    else:
        # ITK convention, baseline fixed: the transform maps a baseline point to this study's point.
        # The ablation zone is the one structure both studies are centred on: its centroids
        # give the optimiser a start within its capture range (one candidate among others).
        hint = None
        a, b = baseline.imaging.ablation_zone, state.imaging.ablation_zone
        if a is not None and b is not None:
            hint = [fu - base for fu, base in zip(b.centroid_lps, a.centroid_lps)]
        transform, qc = register_to_baseline(baseline.images().pre_registered, state.images().pre_registered,
                                             cfg.registration, hint_shift_lps=hint)
        state.to_baseline, state.transform = qc, transform
        if qc.ok:
            # Affine in to_baseline.tfm, a deformable part in to_baseline_field.nii.gz.
            write_to_baseline(transform, folder, baseline.images().pre_registered)


def _key_image(state: StudyState, baseline: StudyState | None, record: AssessmentRecord, folder: Path,
               cfg: PipelineConfig) -> None:
    images = state.images()
    if images is None:
        return
    current = {"pre": images.pre_registered, "post": images.post, "subtraction": images.subtraction,
               "labels": images.labels}
    base_view = None
    if (baseline is not None and baseline.images() is not None and state.transform is not None
            and not state.to_baseline_failure):
        # Baseline onto this study's grid: needs this study -> baseline, the inverse of to_baseline.
        inverse = invert_registration(state.transform)
        b = baseline.images()
        base_view = {
            "pre": resample_to(b.pre_registered, images.post, inverse),
            "post": resample_to(b.post, images.post, inverse),
            "subtraction": resample_to(b.subtraction, images.post, inverse),
            "labels": resample_to(b.labels, images.post, inverse, interpolator=sitk.sitkNearestNeighbor),
        }
    k = state.imaging.key_slice_index
    if k is None:
        k = images.post.GetSize()[2] // 2
    title = (f"{record.patient_id}  {record.study_date} ({days_text(record.days_since_ablation)})  "
             f"{record.timepoint.replace('_', ' ')}  ->  {record.decision.category.value.replace('_', ' ')}"
             f"  (confidence {record.decision.confidence:.2f})")
    render_key_image(folder / "key_image.png", current, k, title, base_view, dpi=cfg.outputs.key_image_dpi)


def _series_used(study: StudyRecord) -> list[SeriesUsed]:
    return [SeriesUsed(role=s.role.value, series_instance_uid=s.series_instance_uid, series_number=s.series_number,
                       series_description=s.series_description, phase_index=s.phase_index,
                       role_reason=s.role_reason, n_files=len(s.files), role_confidence=s.role_confidence)
            for s in study.series]


def _unchanged_records(entries: list[TimelineEntry], states: dict[str, StudyState],
                       out_dir: Path) -> list[AssessmentRecord] | None:
    """The stored records when every study and the timeline are as in the last run, else None."""
    uids = [e.study.study_instance_uid for e in entries]
    records = []
    for entry in entries:
        state = states[entry.study.study_instance_uid]
        folder = study_dir(out_dir, entry.study)
        record = read_assessment(folder / "assessment.json")
        if not state.reused or record is None or [p.study_instance_uid for p in record.patient_timeline] != uids:
            return None
        if record.timepoint != entry.timepoint.value or record.session != entry.session:
            return None
        base = states.get(entry.baseline_study_instance_uid or "")
        if entry.timepoint == Timepoint.FOLLOW_UP and base is not None and state.imaging.ok and base.imaging.ok:
            if record.cache_keys.get("to_baseline") != to_baseline_key(state, base):
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
    of every record and error row before it is written or returned.
    """
    out_dir = Path(out_dir)
    result = PatientResult(patient_id=studies[0].patient_id)
    states: dict[str, StudyState] = {}
    for study in sorted(studies, key=lambda s: (s.study_date is None, s.study_date, s.study_instance_uid)):
        try:
            state, errors = imaging_fn(study, cfg, out_dir, device)
        except Exception as exc:  # noqa: BLE001 - a failing study must never kill the batch
            row = ErrorRecord.from_exception(exc, "imaging", "imaging failed", patient_id=study.patient_id,
                                             study_instance_uid=study.study_instance_uid)
            state, errors = StudyState(study, StudyImaging(ok=False, reason=row.reason), None, "",
                                       study_dir(out_dir, study)), [row]
        states[study.study_instance_uid] = state
        result.errors.extend(errors)
        result.n_reused += int(state.reused)

    az_present = {uid: s.imaging.ok and s.imaging.az_found for uid, s in states.items()}
    entries: list[TimelineEntry] = build_patient_timeline(studies, procedures, az_present, cfg.rules)
    unchanged = _unchanged_records(entries, states, out_dir)
    if unchanged is not None:
        # Nothing new for this patient: the nightly rerun leaves its outputs as they are, except
        # the SEG/SR/report that a run before they existed (or a deletion) left missing.
        result.records = unchanged
        result.errors = [ErrorRecord(**e) for r in unchanged for e in r.errors]
        for entry, record in zip(entries, unchanged):
            folder = study_dir(out_dir, entry.study)
            if dicom_outputs_missing(record, folder, cfg.outputs):
                state = states[entry.study.study_instance_uid]
                result.errors.extend(write_study_dicom(record, entry.study, lambda: getattr(state.images(), "labels", None),
                                                       folder, cfg.outputs)[1])
        if entries and cfg.outputs.write_report and not (study_dir(out_dir, entries[0].study).parent / "report.html").exists():
            _write_report(result, entries, {r.study_instance_uid: r for r in unchanged}, out_dir)
        result.errors = _redacted_errors(result.errors, redactor)
        return result

    for entry in entries:
        state = states[entry.study.study_instance_uid]
        base_uid = entry.baseline_study_instance_uid
        if entry.timepoint != Timepoint.FOLLOW_UP or not base_uid or not state.imaging.ok:
            continue
        baseline = states.get(base_uid)
        if baseline is None or not baseline.imaging.ok or state.images() is None or baseline.images() is None:
            continue
        try:
            _register_follow_up(state, baseline, cfg, study_dir(out_dir, entry.study))
            if not state.to_baseline_failure:
                # Follow-up subtraction minus the baseline's, brought onto this study's grid.
                fu, base = state.images(), baseline.images()
                try:
                    atomic_write_image(temporal_difference(fu.subtraction, fu.pre_registered, base.subtraction,
                                                           base.pre_registered, state.transform),
                                       study_dir(out_dir, entry.study) / "temporal_difference.nii.gz")
                except Exception as exc:  # noqa: BLE001 - supporting image: never lose the study
                    result.errors.append(ErrorRecord.from_exception(
                        exc, "temporal_difference", patient_id=entry.study.patient_id,
                        study_instance_uid=entry.study.study_instance_uid))
        except Exception as exc:  # noqa: BLE001
            state.to_baseline_error = f"{type(exc).__name__}: {exc}"
        if state.to_baseline_failure:
            result.errors.append(ErrorRecord("", entry.study.patient_id, entry.study.study_instance_uid, "",
                                             "register_to_baseline", state.to_baseline_failure))

    # A follow-up whose registration to the baseline failed is not evaluable (rule 5); the
    # stored imaging stays the per-study result so that a rerun can reuse it.
    evaluable = {
        uid: (s.imaging.model_copy(update={"ok": False, "reason": s.to_baseline_failure})
              if s.to_baseline_failure else s.imaging)
        for uid, s in states.items()
    }
    decisions = classify_patient(entries, evaluable, cfg)
    records: dict[str, AssessmentRecord] = {}
    for entry in entries:
        uid = entry.study.study_instance_uid
        state = states[uid]
        records[uid] = AssessmentRecord(
            patient_id=entry.study.patient_id, study_instance_uid=uid,
            study_date=entry.study.study_date.isoformat() if entry.study.study_date else None,
            timepoint=entry.timepoint.value, session=entry.session,
            ablation_date=entry.ablation_date.isoformat() if entry.ablation_date else None,
            days_since_ablation=entry.days_since_ablation,
            baseline_study_instance_uid=entry.baseline_study_instance_uid if entry.timepoint == Timepoint.FOLLOW_UP
            else (uid if entry.timepoint == Timepoint.BASELINE else None),
            timeline_flags=entry.flags, series=_series_used(entry.study), imaging=state.imaging,
            registration_to_baseline=state.to_baseline, decision=decisions[uid],
            cache_keys={"imaging": state.imaging_key, "to_baseline": state.to_baseline_key})
    points = timeline_points(entries, records)
    for entry in entries:
        uid = entry.study.study_instance_uid
        record = records[uid].model_copy(update={"patient_timeline": points})
        record = records[uid] = _redacted_record(record, redactor)
        folder = study_dir(out_dir, entry.study)
        if cfg.outputs.write_key_image:
            try:
                _key_image(states[uid], states.get(entry.baseline_study_instance_uid or ""), record, folder, cfg)
            except Exception as exc:  # noqa: BLE001 - evidence rendering must not lose the study
                result.errors.append(ErrorRecord.from_exception(exc, "key_image", "key image not rendered",
                                                                patient_id=record.patient_id, study_instance_uid=uid))
        result.errors = _redacted_errors(result.errors, redactor)
        record.errors = [vars(e) for e in result.errors if e.study_instance_uid == uid]
        write_assessment(folder / "assessment.json", record)
        # seg.dcm / sr.dcm after assessment.json: their failure is a row of errors.csv, never a lost study.
        state = states[uid]
        _, dicom_errors = write_study_dicom(record, entry.study, lambda: getattr(state.images(), "labels", None),
                                            folder, cfg.outputs)
        if dicom_errors:
            result.errors = _redacted_errors(result.errors + dicom_errors, redactor)
            record.errors = [vars(e) for e in result.errors if e.study_instance_uid == uid]
            write_assessment(folder / "assessment.json", record)  # a reused record re-emits them
    if entries:
        patient_folder = study_dir(out_dir, entries[0].study).parent
        write_json(patient_folder / "timeline.json", [p.model_dump() for p in points])
        try:
            render_timeline_plot(patient_folder / "timeline.png", result.patient_id, points, cfg.outputs.key_image_dpi,
                                 (cfg.rules.growth_min_abs_mm, cfg.rules.growth_min_pct))
        except Exception as exc:  # noqa: BLE001 - evidence rendering must not lose the patient
            result.errors.append(ErrorRecord.from_exception(exc, "timeline_plot", "timeline plot not rendered",
                                                            patient_id=result.patient_id))
        if cfg.outputs.write_report:
            _write_report(result, entries, records, out_dir)
    result.records = [records[e.study.study_instance_uid] for e in entries]
    result.errors = _redacted_errors(result.errors, redactor)
    return result


def _redacted_errors(errors: list[ErrorRecord], redactor) -> list[ErrorRecord]:
    return errors if redactor is None else [redactor.error(e) for e in errors]


def _redacted_record(record: AssessmentRecord, redactor) -> AssessmentRecord:
    """The record with every free text redacted; the series used keep their descriptions
    (they name sequences, and the role rules have read them already)."""
    if redactor is None:
        return record
    data = record.model_dump()
    series = data.pop("series")
    return AssessmentRecord.model_validate({**redactor.tree(data), "series": series})


def _write_report(result: PatientResult, entries: list[TimelineEntry], records: dict[str, AssessmentRecord],
                  out_dir: Path) -> None:
    """report.html of the patient (after timeline.png and the key images it embeds)."""
    path = study_dir(out_dir, entries[0].study).parent / "report.html"
    try:
        write_patient_report(path, result.patient_id,
                             [(records[e.study.study_instance_uid], study_dir(out_dir, e.study)) for e in entries])
    except Exception as exc:  # noqa: BLE001 - the report must not lose the patient
        result.errors.append(ErrorRecord.from_exception(exc, "report", "report.html not written", path=str(path),
                                                        patient_id=result.patient_id))
