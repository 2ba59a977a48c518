"""The per-patient assessment as a pure function: records in, records out, no disk (issue 17).

Owns turning one patient's timeline, each study's imaging result and each follow-up's
registration to its baseline into the studies' :class:`AssessmentRecord`: rule 5 (a follow-up
whose registration to the baseline failed is not evaluable), the classification
(:func:`pipeline.longitudinal.classify.classify_patient`), the record's fields and the
patient's timeline points. What is read or written, and when, is the caller's business
(pipeline/run/patient.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.config import FociConfig, RulesConfig
from pipeline.core.records import (
    AssessmentRecord,
    RegistrationQC,
    SeriesUsed,
    StudyImaging,
    StudyRecord,
    TimelineEntry,
    TimelinePoint,
    Timepoint,
)
from pipeline.longitudinal.classify import classify_patient


def registration_failure(to_baseline: RegistrationQC | None, error: str = "") -> str:
    """Why a follow-up's registration to its baseline cannot be used ("" when it can or was not
    needed): ``error`` is the text of an exception the registration raised."""
    if error:
        return f"registration to the baseline failed: {error}"
    if to_baseline is not None and not to_baseline.ok:
        return f"registration to the baseline failed QC: {to_baseline.reason}"
    return ""


@dataclass
class StudyFindings:
    """What the assessment needs of one study: its per-study imaging, its registration to the
    baseline (follow-ups) and the cache keys its record carries."""

    imaging: StudyImaging
    to_baseline: RegistrationQC | None = None
    to_baseline_error: str = ""
    cache_keys: dict[str, str] = field(default_factory=dict)

    @property
    def to_baseline_failure(self) -> str:
        return registration_failure(self.to_baseline, self.to_baseline_error)

    def evaluable_imaging(self) -> StudyImaging:
        """The imaging the rules see: not evaluable when the registration to the baseline failed
        (rule 5); the stored imaging stays the per-study result so that a rerun can reuse it."""
        failure = self.to_baseline_failure
        return self.imaging.model_copy(update={"ok": False, "reason": failure}) if failure else self.imaging


@dataclass
class PatientAssessment:
    """The records of one patient's studies in timeline order, and the patient's timeline."""

    records: list[AssessmentRecord]
    points: list[TimelinePoint]


def series_used(study: StudyRecord) -> list[SeriesUsed]:
    return [SeriesUsed(role=s.role.value, series_instance_uid=s.series_instance_uid, series_number=s.series_number,
                       series_description=s.series_description, phase_index=s.phase_index,
                       role_reason=s.role_reason, n_files=len(s.files), role_confidence=s.role_confidence)
            for s in study.series]


def timeline_points(entries: list[TimelineEntry], records: dict[str, AssessmentRecord]) -> list[TimelinePoint]:
    """One point per timeline entry: date, time point, category and the AZ's size."""
    points = []
    for e in entries:
        rec = records.get(e.study.study_instance_uid)
        az = rec.imaging.ablation_zone if rec else None
        points.append(TimelinePoint(
            study_instance_uid=e.study.study_instance_uid,
            study_date=e.study.study_date.isoformat() if e.study.study_date else None,
            timepoint=e.timepoint.value, session=e.session,
            category=rec.decision.category.value if rec else "indeterminate",
            az_long_axis_mm=az.long_axis_mm if az else None, days_since_ablation=e.days_since_ablation,
            az_short_axis_mm=az.short_axis_mm if az else None, az_volume_ml=az.volume_ml if az else None))
    return points


def assess_timeline(entries: list[TimelineEntry], findings: dict[str, StudyFindings],
                    rules: RulesConfig, foci: FociConfig, review_uncertainty: float | None) -> PatientAssessment:
    """The assessment record of every study of ``entries`` (one patient's timeline, date order).

    ``findings`` holds every study of the timeline, keyed by StudyInstanceUID; ``rules``, ``foci``
    and ``review_uncertainty`` are :func:`pipeline.longitudinal.classify.classify_patient`'s. Each record
    carries the patient's timeline points; its ``errors`` are left empty (the caller knows them).
    """
    evaluable = {uid: f.evaluable_imaging() for uid, f in findings.items()}
    decisions = classify_patient(entries, evaluable, rules, foci, review_uncertainty)
    records: dict[str, AssessmentRecord] = {}
    for entry in entries:
        uid = entry.study.study_instance_uid
        found = findings[uid]
        records[uid] = AssessmentRecord(
            patient_id=entry.study.patient_id, study_instance_uid=uid,
            study_date=entry.study.study_date.isoformat() if entry.study.study_date else None,
            timepoint=entry.timepoint.value, session=entry.session,
            ablation_date=entry.ablation_date.isoformat() if entry.ablation_date else None,
            days_since_ablation=entry.days_since_ablation,
            baseline_study_instance_uid=entry.baseline_study_instance_uid if entry.timepoint == Timepoint.FOLLOW_UP
            else (uid if entry.timepoint == Timepoint.BASELINE else None),
            timeline_flags=entry.flags, series=series_used(entry.study), imaging=found.imaging,
            registration_to_baseline=found.to_baseline, decision=decisions[uid], cache_keys=found.cache_keys)
    points = timeline_points(entries, records)
    return PatientAssessment(
        records=[records[e.study.study_instance_uid].model_copy(update={"patient_timeline": points}) for e in entries],
        points=points)
