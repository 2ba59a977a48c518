"""Records for studies that could not be processed at all, so that none is ever dropped."""

from __future__ import annotations

from pipeline.core.config import RulesConfig
from pipeline.core.records import AssessmentRecord, Decision, StudyImaging, StudyRecord, TimelineEntry, Timepoint
from pipeline.longitudinal.timeline import Procedure, build_patient_timeline


def indeterminate_records(studies: list[StudyRecord], reason: str, rules: RulesConfig,
                          procedures: list[Procedure] | None = None) -> list[AssessmentRecord]:
    """One indeterminate, flagged record per study of one patient, carrying ``reason``.

    Each record keeps its place in the patient's timeline (pre-ablation, baseline, follow-up,
    session, days since ablation, baseline UID), built from the headers as the run builds it
    (pipeline/longitudinal/timeline.py): from ``procedures`` when given; without them the session is
    normally inferred from the first study showing an ablation zone, and no image was analysed
    here, so every contrast study is taken as showing one (the first is the baseline).
    When the timeline itself cannot be built (it may be what failed), every study is a
    follow-up without a session, as before issue 17. Records come in the order of ``studies``.
    """
    az_present = {s.study_instance_uid: True for s in studies}
    try:
        timeline = build_patient_timeline(studies, procedures, az_present, rules)
    except Exception:  # noqa: BLE001 - the timeline may be what failed: never lose the studies
        timeline = [TimelineEntry(s, Timepoint.FOLLOW_UP, None, None, None, None) for s in studies]
    entries = {e.study.study_instance_uid: e for e in timeline}
    records = []
    for s in studies:
        entry = entries[s.study_instance_uid]
        baseline_uid = (entry.baseline_study_instance_uid if entry.timepoint == Timepoint.FOLLOW_UP
                        else s.study_instance_uid if entry.timepoint == Timepoint.BASELINE else None)
        records.append(AssessmentRecord(
            patient_id=s.patient_id, study_instance_uid=s.study_instance_uid,
            study_date=s.study_date.isoformat() if s.study_date else None, timepoint=entry.timepoint.value,
            session=entry.session, ablation_date=entry.ablation_date.isoformat() if entry.ablation_date else None,
            days_since_ablation=entry.days_since_ablation, baseline_study_instance_uid=baseline_uid,
            timeline_flags=entry.flags,
            imaging=StudyImaging(ok=False, reason=reason),
            decision=Decision.indeterminate(reason),
        ))
    return records
