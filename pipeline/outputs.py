"""The output contract of DESIGN.md (schema_version 1): cohort.csv, errors.csv, per-study folders.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
crash never leaves a half-written output and a rerun can trust what it finds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from pydantic import BaseModel, Field

from pipeline import SCHEMA_VERSION, __version__
from pipeline.classify import Decision
from pipeline.types import ErrorRecord, RegistrationQC, StudyImaging, StudyRecord, TimelineEntry

COHORT_COLUMNS = [
    "patient_id", "study_instance_uid", "study_date", "timepoint", "session", "days_since_ablation",
    "baseline_study_instance_uid", "category", "flagged", "flag_reasons", "new_lesion", "az_long_axis_mm",
    "az_short_axis_mm", "az_volume_ml", "az_long_axis_change_pct", "az_short_axis_change_pct",
    "az_volume_change_pct", "rim_max_thickness_mm", "largest_focus_mm", "registration_ok", "confidence",
    "reviewed_category", "pipeline_version",
]
ERROR_COLUMNS = ["path", "patient_id", "study_instance_uid", "series_instance_uid", "stage", "reason"]


class SeriesUsed(BaseModel):
    role: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    phase_index: int | None
    role_reason: str
    n_files: int
    role_confidence: float | None = None  # 0..1, from the role rules (configs/series_roles.yaml)


class TimelinePoint(BaseModel):
    study_instance_uid: str
    study_date: str | None
    timepoint: str
    session: int | None
    category: str
    az_long_axis_mm: float | None
    days_since_ablation: int | None = None
    az_short_axis_mm: float | None = None
    az_volume_ml: float | None = None


class AssessmentRecord(BaseModel):
    """Full record of one study: ``assessment.json``."""

    schema_version: int = SCHEMA_VERSION
    pipeline_version: str = __version__
    patient_id: str
    study_instance_uid: str
    study_date: str | None
    timepoint: str
    session: int | None
    ablation_date: str | None
    days_since_ablation: int | None
    baseline_study_instance_uid: str | None
    timeline_flags: list[str] = Field(default_factory=list)
    series: list[SeriesUsed] = Field(default_factory=list)
    imaging: StudyImaging
    registration_to_baseline: RegistrationQC | None = None
    decision: Decision
    patient_timeline: list[TimelinePoint] = Field(default_factory=list)
    reviewed_category: str | None = None
    # This study's rows of errors.csv from the stages after ingest (re-emitted when reused).
    errors: list[dict[str, str]] = Field(default_factory=list)
    # What the cached imaging results depend on; a rerun reuses them only when these match.
    cache_keys: dict[str, str] = Field(default_factory=dict)


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


# --------------------------------------------------------------------------- atomic writes
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc/self/status).

    Elsewhere it is set and restored at once (``os.umask`` has no read-only form), under a lock.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _final_mode(mode: int | None) -> int:
    """What ``open()`` would give a new file (0o666 & ~umask), or ``mode`` (e.g. 0o600 for a key).

    ``tempfile.mkstemp`` creates its file 0600 whatever the umask; outputs shared with a group
    (a results folder on a share) need the permissions any other program would have given them.
    """
    return mode if mode is not None else 0o666 & ~current_umask()


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename); permissions by the umask,
    or ``mode`` (set before the file appears under its name: a secret is never readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _final_mode(mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


# One lock around every SimpleITK image file read and write of the process. Why: ITK's NIfTI I/O
# keeps global state and is not thread-safe (SimpleITK/SimpleITK#74: concurrent ReadImage may
# segfault); the batch flow's patients run in threads, and a crash of that kind was seen in the
# test suite once each worker started reading its images back. I/O is a small part of a study.
_IMAGE_IO_LOCK = threading.Lock()


def read_image(path: Path | str, pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    """``sitk.ReadImage`` serialised with the other image I/O of the process."""
    with _IMAGE_IO_LOCK:
        return sitk.ReadImage(str(path), pixel_type)


def atomic_write_image(image: sitk.Image, path: Path) -> None:
    """Write a SimpleITK image (format from the final suffix, e.g. .nii.gz) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        with _IMAGE_IO_LOCK:
            sitk.WriteImage(image, tmp, useCompression=True)
        os.chmod(tmp, _final_mode(None))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_transform(transform: sitk.Transform, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tfm")
    os.close(fd)
    try:
        sitk.WriteTransform(transform, tmp)
        os.chmod(tmp, _final_mode(None))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
_FORMULA_START = re.compile(r"^[\s]*[=+\-@]|^[\t\r\n]")
# A plain number (e.g. a negative change in %) is data, not a formula.
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# C0 control characters but tab, LF and CR (kept, quoted by the csv module), and DEL: a NUL
# byte breaks many CSV readers; none is ever meaningful in a reason or an identifier.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def csv_cell(value: Any) -> str:
    """Any value as inert CSV cell text: control characters removed, and a quote (') before a
    text a spreadsheet would evaluate (from a DICOM header, a reason or a typed comment)."""
    text = _CONTROL.sub("", "" if value is None else str(value))
    if _FORMULA_START.match(text) and not _NUMBER.match(text.strip()):
        return "'" + text
    return text


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """CSV text of ``rows`` (header first); every cell goes through :func:`csv_cell`, the one
    place where text reaches a CSV cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_cell(row.get(k)) for k in columns} for row in rows)
    return buffer.getvalue()


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


def timeline_points(entries: list[TimelineEntry], records: dict[str, AssessmentRecord]) -> list[TimelinePoint]:
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


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
