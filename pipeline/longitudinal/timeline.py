"""Place every study of a patient in its treatment history: pre-ablation, baseline, follow-up.

Rules (DESIGN.md "Clinical rules", criteria.md §6 rules 1 and 3):
- sessions come from the procedures file; without it the first study that shows an ablation
  zone opens the (single) session and earlier studies are pre-ablation;
- the baseline of a session is its first contrast-enhanced MRI; outside the expected window
  (21-56 days by default) it is still the baseline but flagged ``early_baseline``/``late_baseline``;
- a new session resets the baseline.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import RulesConfig
from pipeline.core.records import SeriesRole, StudyRecord, TimelineEntry, Timepoint


@dataclass(frozen=True)
class Procedure:
    """One ablation session from the procedures file."""

    patient_id: str
    ablation_date: dt.date
    organ: str = ""
    target_lps: tuple[float, float, float] | None = None


class ProceduresFileError(ValueError):
    """The procedures CSV cannot be used; the message says which line and why."""


def read_procedures(path: Path) -> dict[str, list[Procedure]]:
    """Read ``patient_id,ablation_date[,organ,target_x,target_y,target_z]`` (ISO dates).

    Returns sessions per patient sorted by date. Raises ProceduresFileError on a missing
    column or an unparseable line, naming the line.
    """
    sessions: dict[str, list[Procedure]] = defaultdict(list)
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"patient_id", "ablation_date"} - set(reader.fieldnames or [])
        if missing:
            raise ProceduresFileError(f"{path}: missing column(s) {sorted(missing)}")
        for line_no, row in enumerate(reader, start=2):
            pid = (row.get("patient_id") or "").strip()
            if not pid:
                raise ProceduresFileError(f"{path}:{line_no}: empty patient_id")
            try:
                date = dt.date.fromisoformat((row.get("ablation_date") or "").strip())
            except ValueError as exc:
                raise ProceduresFileError(f"{path}:{line_no}: ablation_date: {exc}") from None
            target = None
            coords = [row.get(k) for k in ("target_x", "target_y", "target_z")]
            if all(c not in (None, "") for c in coords):
                try:
                    target = tuple(float(c) for c in coords)  # type: ignore[assignment]
                except ValueError as exc:
                    raise ProceduresFileError(f"{path}:{line_no}: target: {exc}") from None
            sessions[pid].append(Procedure(pid, date, (row.get("organ") or "").strip(), target))
    return {pid: sorted(rows, key=lambda p: p.ablation_date) for pid, rows in sessions.items()}


def has_post_contrast(study: StudyRecord) -> bool:
    return bool(study.with_role(SeriesRole.T1_POST))


def _study_sort_key(study: StudyRecord) -> tuple:
    return (study.study_date or dt.date.max, study.study_instance_uid)


def build_patient_timeline(
    studies: list[StudyRecord],
    procedures: list[Procedure] | None,
    az_present: dict[str, bool],
    rules: RulesConfig,
) -> list[TimelineEntry]:
    """Timeline of one patient's studies (any order in, date order out).

    ``az_present`` maps StudyInstanceUID -> whether the imaging stage found an ablation zone;
    it is used only when ``procedures`` is None, to infer the session.
    """
    ordered = sorted(studies, key=_study_sort_key)
    if procedures:
        session_dates: list[dt.date | None] = [p.ablation_date for p in procedures]
    else:
        first_az = next(
            (s for s in ordered if s.study_date and has_post_contrast(s) and az_present.get(s.study_instance_uid)),
            None,
        )
        session_dates = [] if first_az is None else [None]
        inferred_start = first_az.study_date if first_az else None

    entries: list[TimelineEntry] = []
    baseline_of_session: dict[int, str] = {}
    for study in ordered:
        flags: list[str] = list(study.flags)  # ingest's flags (e.g. series_roles_ambiguous)
        if study.study_date is None:
            entries.append(TimelineEntry(study, Timepoint.FOLLOW_UP, None, None, None, None,
                                         [*flags, "no_study_date"]))
            continue
        if procedures:
            # Sessions strictly before the study: an MRI on the day of an ablation is taken
            # before it (planning) and is not a follow-up of that session.
            index = sum(1 for d in session_dates if d is not None and d < study.study_date)
            ablation_date = session_dates[index - 1] if index else None
        else:
            index = 1 if (session_dates and study.study_date >= inferred_start) else 0
            ablation_date = None
            if index:
                flags.append("session_inferred_from_images")
        if index == 0:
            entries.append(TimelineEntry(study, Timepoint.PRE_ABLATION, None, None, None, None, flags))
            continue
        days = (study.study_date - ablation_date).days if ablation_date else None
        organ = procedures[index - 1].organ if procedures else ""
        baseline_uid = baseline_of_session.get(index)
        if baseline_uid is None and has_post_contrast(study):
            baseline_of_session[index] = study.study_instance_uid
            if days is not None and days < rules.baseline_min_days:
                flags.append("early_baseline")
            elif days is not None and days > rules.baseline_max_days:
                flags.append("late_baseline")
            entries.append(TimelineEntry(study, Timepoint.BASELINE, index, ablation_date, days,
                                         study.study_instance_uid, flags, organ))
            continue
        if baseline_uid is None:
            flags.append("before_baseline")
        entries.append(TimelineEntry(study, Timepoint.FOLLOW_UP, index, ablation_date, days, baseline_uid, flags,
                                     organ))
    return entries


def build_timelines(
    studies: list[StudyRecord],
    procedures: dict[str, list[Procedure]] | None,
    az_present: dict[str, bool],
    rules: RulesConfig,
) -> dict[str, list[TimelineEntry]]:
    """Timelines of every patient, keyed by PatientID."""
    by_patient: dict[str, list[StudyRecord]] = defaultdict(list)
    for study in studies:
        by_patient[study.patient_id].append(study)
    return {
        pid: build_patient_timeline(rows, (procedures or {}).get(pid) if procedures is not None else None,
                                    az_present, rules)
        for pid, rows in sorted(by_patient.items())
    }
