"""What the batch flow does with the review database after each run.

1. ``reviewed_category`` of every record is filled from the radiologists' verdicts (so the
   run's ``cohort.csv`` carries the verdicts given since the previous run);
2. the flagged studies go to the worklist (new ones added, pending ones refreshed, adjudicated
   ones left alone: see :func:`pipeline.review.db.sync_worklist`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

from pipeline.core.records import AssessmentRecord
from pipeline.outputs.contract import read_assessment, study_dir
from pipeline.review.db import FlaggedStudy, SyncResult, database_url, open_engine, reviewed_categories, sync_worklist


def _folder(out_dir: Path, record: AssessmentRecord) -> str:
    """The study's output folder relative to OUT, by the contract's own naming (``study_dir``)."""
    date = dt.date.fromisoformat(record.study_date) if record.study_date else None
    key = SimpleNamespace(patient_id=record.patient_id, study_date=date, study_instance_uid=record.study_instance_uid)
    return study_dir(out_dir, key).relative_to(out_dir).as_posix()


def flagged_studies(out_dir: Path, records: list[AssessmentRecord]) -> list[FlaggedStudy]:
    """The worklist entries of the flagged records (with their baselines' folders)."""
    out_dir = Path(out_dir)
    by_uid = {r.study_instance_uid: r for r in records}
    flagged = []
    for r in records:
        if not r.decision.flagged:
            continue
        base_uid = r.baseline_study_instance_uid if r.baseline_study_instance_uid != r.study_instance_uid else None
        base = by_uid.get(base_uid or "")
        flagged.append(FlaggedStudy(
            study_instance_uid=r.study_instance_uid, patient_id=r.patient_id, study_date=r.study_date,
            timepoint=r.timepoint, days_since_ablation=r.days_since_ablation,
            baseline_study_instance_uid=base_uid, study_folder=_folder(out_dir, r),
            baseline_folder=_folder(out_dir, base) if base is not None else None,
            post_series_uid=r.imaging.series_used.get("t1_post"),
            baseline_post_series_uid=base.imaging.series_used.get("t1_post") if base is not None else None,
            machine_category=r.decision.category.value, confidence=float(r.decision.confidence),
            flag_reasons=";".join(x.replace(";", ",") for x in r.decision.flag_reasons), rule_id=r.decision.rule_id))
    return flagged


def review_after_run(out_dir: Path, records: list[AssessmentRecord],
                     url: str | None = None) -> tuple[list[AssessmentRecord], SyncResult]:
    """Fill ``reviewed_category`` from the verdicts and put the flagged studies on the worklist."""
    engine = open_engine(database_url(out_dir, url))
    try:
        reviewed = reviewed_categories(engine)
        filled = [r.model_copy(update={"reviewed_category": reviewed.get(r.study_instance_uid)}) for r in records]
        result = sync_worklist(engine, flagged_studies(out_dir, filled))
    finally:
        engine.dispose()
    return filled, result


def records_of_run(out_dir: Path) -> list[AssessmentRecord]:
    """Every ``assessment.json`` under ``OUT/patients`` (to sync a run that is already on disk)."""
    found = (read_assessment(p) for p in sorted(Path(out_dir).glob("patients/*/*/assessment.json")))
    return [r for r in found if r is not None]
