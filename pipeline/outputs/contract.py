"""The output contract of DESIGN.md (schema_version 1): cohort.csv, errors.csv, per-study folders.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
crash never leaves a half-written output and a rerun can trust what it finds.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pipeline.core.files import atomic_write_text, csv_text
from pipeline.core.records import AssessmentRecord, ErrorRecord, RegistrationQC, StudyRecord

COHORT_COLUMNS = [
    "patient_id", "study_instance_uid", "study_date", "timepoint", "session", "days_since_ablation",
    "baseline_study_instance_uid", "category", "flagged", "flag_reasons", "new_lesion", "az_long_axis_mm",
    "az_short_axis_mm", "az_volume_ml", "az_long_axis_change_pct", "az_short_axis_change_pct",
    "az_volume_change_pct", "rim_max_thickness_mm", "largest_focus_mm", "registration_ok", "confidence",
    "reviewed_category", "pipeline_version",
]
ERROR_COLUMNS = ["path", "patient_id", "study_instance_uid", "series_instance_uid", "stage", "reason"]


def safe_name(text: str) -> str:
    """A filesystem-safe form of an identifier (PatientID, UID)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return cleaned or "unknown"


_MAX_FOLDER_NAME = 64


def patient_folder_name(patient_id: str) -> str:
    """The ``<patient>`` folder of a PatientID: the ID itself when it is filesystem-safe (and at
    most 64 characters), else its safe form + ``-`` + 8 hex digits of SHA-256(ID), so that two
    IDs cleaned alike (``ABL-002/`` and ``ABL-002``) never share a folder."""
    cleaned = safe_name(patient_id)
    if cleaned == patient_id and len(cleaned) <= _MAX_FOLDER_NAME:
        return cleaned
    digest = hashlib.sha256(patient_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned[:_MAX_FOLDER_NAME - 9]}-{digest}"


def study_dir(out_dir: Path, study: StudyRecord) -> Path:
    """``DIR/patients/<patient>/<study_date>_<study_uid_suffix>/`` (:func:`patient_folder_name`)."""
    date = study.study_date.isoformat() if study.study_date else "nodate"
    suffix = safe_name(study.study_instance_uid.replace(".", "")[-8:])
    return Path(out_dir) / "patients" / patient_folder_name(study.patient_id) / f"{date}_{suffix}"


def write_assessment(path: Path, record: AssessmentRecord) -> None:
    atomic_write_text(path, record.model_dump_json(indent=2))


def read_assessment(path: Path) -> AssessmentRecord | None:
    """The record at ``path``, or None when absent or unreadable (it is then recomputed)."""
    try:
        return AssessmentRecord.model_validate_json(Path(path).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- tables
def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def cohort_row(record: AssessmentRecord) -> dict[str, str]:
    """One row of cohort.csv from a study's record (empty cells where not applicable)."""
    imaging, decision = record.imaging, record.decision
    az = imaging.ablation_zone
    local_foci = [f for f in imaging.foci if f.suspicious]
    regs: list[RegistrationQC] = list(imaging.registration)
    if record.registration_to_baseline is not None:
        regs.append(record.registration_to_baseline)
    return {
        "patient_id": record.patient_id,
        "study_instance_uid": record.study_instance_uid,
        "study_date": record.study_date or "",
        "timepoint": record.timepoint,
        "session": "" if record.session is None else str(record.session),
        "days_since_ablation": "" if record.days_since_ablation is None else str(record.days_since_ablation),
        "baseline_study_instance_uid": record.baseline_study_instance_uid or "",
        "category": decision.category.value,
        "flagged": _bool(decision.flagged),
        "flag_reasons": ";".join(r.replace(";", ",") for r in decision.flag_reasons),
        "new_lesion": _bool(decision.new_lesion),
        "az_long_axis_mm": _num(az.long_axis_mm if az else None),
        "az_short_axis_mm": _num(az.short_axis_mm if az else None),
        "az_volume_ml": _num(az.volume_ml if az else None),
        "az_long_axis_change_pct": _num(decision.changes.long_axis_change_pct, 1),
        "az_short_axis_change_pct": _num(decision.changes.short_axis_change_pct, 1),
        "az_volume_change_pct": _num(decision.changes.volume_change_pct, 1),
        "rim_max_thickness_mm": _num(imaging.rim.max_thickness_mm if imaging.rim and imaging.rim.present else None),
        "largest_focus_mm": _num(max((f.diameter_mm for f in local_foci), default=None)),
        "registration_ok": "" if not regs else _bool(all(r.ok for r in regs)),
        "confidence": _num(decision.confidence),
        "reviewed_category": record.reviewed_category or "",
        "pipeline_version": record.pipeline_version,
    }


# A cell a spreadsheet would run as a formula (OWASP "CSV injection"): = + - @ first, or a
# tab / CR / LF first (some spreadsheets skip them), or leading spaces before one of these.
def write_cohort_csv(out_dir: Path, records: list[AssessmentRecord]) -> Path:
    rows = [cohort_row(r) for r in sorted(records, key=lambda r: (r.patient_id, r.study_date or "", r.study_instance_uid))]
    path = Path(out_dir) / "cohort.csv"
    atomic_write_text(path, csv_text(COHORT_COLUMNS, rows))
    return path


def write_errors_csv(out_dir: Path, errors: list[ErrorRecord]) -> Path:
    rows = [vars(e) for e in errors]
    path = Path(out_dir) / "errors.csv"
    atomic_write_text(path, csv_text(ERROR_COLUMNS, rows))
    return path


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
