"""Records for studies that could not be processed at all, so that none is ever dropped."""

from __future__ import annotations

from pipeline.classify import Decision
from pipeline.outputs import AssessmentRecord
from pipeline.types import Category, StudyImaging, StudyRecord


def indeterminate_records(studies: list[StudyRecord], reason: str) -> list[AssessmentRecord]:
    """One indeterminate, flagged record per study, carrying ``reason``."""
    return [
        AssessmentRecord(
            patient_id=s.patient_id, study_instance_uid=s.study_instance_uid,
            study_date=s.study_date.isoformat() if s.study_date else None, timepoint="follow_up", session=None,
            ablation_date=None, days_since_ablation=None, baseline_study_instance_uid=None,
            imaging=StudyImaging(ok=False, reason=reason),
            decision=Decision(category=Category.INDETERMINATE, rule_id="R5-not-evaluable",
                              rule=f"not evaluable: {reason}", confidence=0.0, flagged=True,
                              flag_reasons=[f"indeterminate: {reason}"]),
        )
        for s in studies
    ]
