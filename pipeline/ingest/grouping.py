"""Group catalogue rows into studies and series.

Owns :func:`group_catalogue_rows`: duplicate instances, rows -> studies (majority StudyDate,
PatientID checks, non-MR studies and series) -> series (several stacks in one series split,
header-level geometry check, headers summarised into :class:`SeriesHeaders`), then the role
assignment of :mod:`pipeline.ingest.series_roles`. Reads no file. Also owns ``STAGE``, the stage
name of ingest's rows of errors.csv.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import IngestConfig
from pipeline.core.records import ErrorRecord, SeriesRecord, StudyRecord
from pipeline.ingest.series_geometry import SeriesGeometryError, check_volume, describe_stacks
from pipeline.ingest.series_roles import SeriesHeaders, assign_roles

STAGE = "ingest"


def _parse_date(text: str | None) -> dt.date | None:
    text = (text or "").strip().replace("-", "").replace(".", "")
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def _floats(text: str | None) -> tuple[float, ...] | None:
    """The numbers of a multi-valued catalogue text; None when absent, malformed or not finite."""
    try:
        values = tuple(float(v) for v in text.split("\\")) if text else None
    except ValueError:
        return None
    return values if values is not None and np.all(np.isfinite(values)) else None


def _summarise(uid: str, rows: list[dict[str, Any]]) -> SeriesHeaders:
    """One SeriesHeaders from the file rows of a series (earliest times, union of types)."""
    first = rows[0]

    def first_of(col: str) -> Any:
        return next((r[col] for r in rows if r[col] not in (None, "")), None)

    def min_of(col: str) -> Any:
        values = [r[col] for r in rows if r[col] not in (None, "")]
        return min(values) if values else None

    itypes: list[str] = []
    for r in rows:
        for v in (r["image_type"] or "").upper().split("\\"):
            if v and v not in itypes:
                itypes.append(v)
    return SeriesHeaders(
        series_instance_uid=uid,
        series_description=first_of("series_description") or "",
        series_number=first_of("series_number"),
        image_type=tuple(itypes),
        contrast_agent=first_of("contrast_agent") or "",
        acquisition_time=min_of("acquisition_time") or "",
        content_time=min_of("content_time") or "",
        series_time=min_of("series_time") or "",
        temporal_position=min_of("temporal_position"),
        echo_time_ms=min_of("echo_time"),
        repetition_time_ms=first_of("repetition_time"),
        inversion_time_ms=first_of("inversion_time"),
        scan_options=first_of("scan_options") or "",
        scanning_sequence=first_of("scanning_sequence") or "",
        iop=_floats(first["iop"]),
        rows=first["rows"],
        columns=first["columns"],
        n_files=len(rows),
        n_frames=max((r["n_frames"] or 1) for r in rows),
        manufacturer=first_of("manufacturer") or "",
    )


@dataclass
class _HeaderSlice:
    """A catalogue row seen as a slice, for the header-level geometry checks."""

    name: str
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    shape: tuple[int, int]
    stack_keys: dict[str, str]
    row: dict[str, Any]


# Catalogue columns that tell stacks apart inside one series, named as in the DICOM standard
# (the same attributes pipeline.imaging.volumes checks in the files).
_STACK_COLUMNS = {"EchoTime": "echo_time", "TemporalPositionIdentifier": "temporal_position",
                  "DiffusionBValue": "diffusion_b_value", "TriggerTime": "trigger_time",
                  "AcquisitionTime": "acquisition_time", "AcquisitionNumber": "acquisition_number"}


def _header_slices(rows: list[dict[str, Any]]) -> list[_HeaderSlice] | None:
    """The series' rows as slices; None when a row is multi-frame or lacks geometry (the
    checks then happen when the files are read, in pipeline.imaging.volumes)."""
    out = []
    for r in rows:
        iop, ipp, ps = _floats(r["iop"]), _floats(r["ipp"]), _floats(r["pixel_spacing"])
        if (r["n_frames"] or 1) > 1 or not (iop and ipp and ps) or len(iop) != 6 or len(ipp) != 3 \
                or len(ps) != 2 or not (r["rows"] and r["columns"]):
            return None
        keys = {kw: "" if r[col] is None else f"{r[col]:g}" if isinstance(r[col], float) else str(r[col])
                for kw, col in _STACK_COLUMNS.items()}
        out.append(_HeaderSlice(Path(r["path"]).name, np.asarray(ipp), np.asarray(iop), np.asarray(ps),
                                (int(r["rows"]), int(r["columns"])), keys, r))
    return out


def _split_stacks(series_uid: str, files: list[dict[str, Any]]) -> tuple[list[tuple[str, str, list[dict]]], str]:
    """Split a series holding several stacks (echoes, dynamic phases, b-values, repeats at the
    same positions) into one pseudo-series per stack.

    Returns ([(series key, description suffix, rows)], reason); a single entry keyed by the
    SeriesInstanceUID itself and an empty reason when the series is one stack. Split keys are
    ``<SeriesInstanceUID>#<attribute>=<value>`` (not UIDs: the original UID stays recoverable
    before the ``#``).
    """
    slices = _header_slices(files)
    if slices is None or len(slices) < 4:
        return [(series_uid, "", files)], ""
    iop = slices[0].iop
    normal = np.cross(iop[:3], iop[3:])
    positions = [float(s.ipp @ normal) for s in slices]
    if len({round(p / 0.01) for p in positions}) == len(positions):
        return [(series_uid, "", files)], ""  # no two slices at one position: one stack
    found = describe_stacks([s.stack_keys for s in slices], positions)
    if found is None:
        return [(series_uid, "", files)], ""  # duplicates without a distinguishing attribute
    keyword, counts = found
    parts = [(f"{series_uid}#{keyword}={value}", f" [{keyword} {value}]",
              [s.row for s in slices if s.stack_keys[keyword] == value]) for value in counts]
    listed = ", ".join(f"{v} ({n} slices)" for v, n in counts.items())
    return parts, f"several stacks in one series: {len(counts)} stacks by {keyword}: {listed}; split into {len(counts)} series"


def _geometry_problem(uid: str, number: Any, description: str, files: list[dict[str, Any]]) -> str:
    """Why the series' slices do not form one regular volume, from the headers ("" if they do)."""
    slices = _header_slices(files)
    if slices is None or len(slices) < 2:
        return ""
    try:
        check_volume(slices, f"series {number} '{description}'")
    except SeriesGeometryError as exc:
        return str(exc)
    return ""


def _common_dir(export_dir: Path, rels: list[str]) -> str:
    try:
        return os.path.commonpath([str(export_dir / r) for r in rels]) if rels else str(export_dir)
    except ValueError:
        return str(export_dir)


def group_catalogue_rows(
    export_dir: Path, rows: list[dict[str, Any]], cfg: IngestConfig, skip_studies: set[str]
) -> tuple[list[StudyRecord], dict[str, SeriesHeaders], list[ErrorRecord]]:
    """Catalogue rows (status ok) -> MR studies with their series and roles, headers per series, errors.

    Reads no file: everything comes from the rows. Studies in ``skip_studies`` are left out.
    """
    errors: list[ErrorRecord] = []

    def err(path: str, reason: str, pid: str = "", study: str = "", series: str = "") -> None:
        errors.append(ErrorRecord(path, pid or "", study or "", series or "", STAGE, reason))

    # Same instance exported twice (several exports merged): keep the first path.
    seen_sop: dict[str, str] = {}
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        sop = r["sop_instance_uid"]
        if sop and sop in seen_sop:
            err(str(export_dir / r["path"]), f"duplicate SOPInstanceUID (same instance as "
                f"{export_dir / seen_sop[sop]}) skipped", r["patient_id"], r["study_uid"], r["series_uid"])
            continue
        if sop:
            seen_sop[sop] = r["path"]
        if r["study_uid"] not in skip_studies:
            by_study[r["study_uid"]].append(r)

    studies: list[StudyRecord] = []
    headers: dict[str, SeriesHeaders] = {}
    for study_uid, srows in by_study.items():
        try:
            _group_study(export_dir, study_uid, srows, cfg, studies, headers, errors)
        except Exception as exc:  # noqa: BLE001 - one study's headers must never stop the batch
            # Listed without series, the study is assessed as indeterminate and keeps its row.
            pid = Counter(r["patient_id"] or "" for r in srows).most_common(1)[0][0] or f"UNKNOWN-{study_uid[-8:]}"
            errors.append(ErrorRecord.from_exception(exc, STAGE, "study could not be grouped from its headers",
                                                     path=_common_dir(export_dir, [r["path"] for r in srows]),
                                                     patient_id=pid, study_instance_uid=study_uid))
            studies[:] = [s for s in studies if s.study_instance_uid != study_uid]
            studies.append(StudyRecord(pid, study_uid, None, ""))
    studies.sort(key=lambda s: (s.patient_id, s.study_date is None,
                                s.study_date or dt.date.min, s.study_instance_uid))
    errors.extend(_stray_single_files(studies, export_dir))
    return studies, headers, errors


def _stray_single_files(studies: list[StudyRecord], export_dir: Path) -> list[ErrorRecord]:
    """A warning row for each study of one file that has the patient, date and series
    description of a series of another study: most likely a file of that study exported with
    a wrong StudyInstanceUID (it is still listed, and will be indeterminate)."""
    rows = []
    for lone in studies:
        files = [f for s in lone.series for f in s.files]
        if len(files) != 1:
            continue
        description = lone.series[0].series_description
        twins = [other for other in studies if other is not lone and other.patient_id == lone.patient_id
                 and other.study_date == lone.study_date
                 and any(s.series_description == description for s in other.series)]
        if twins:
            rows.append(ErrorRecord(
                str(files[0]), lone.patient_id, lone.study_instance_uid, lone.series[0].series_instance_uid, STAGE,
                f"warning: a study of one file with the patient, date and series description '{description}' of "
                f"study {twins[0].study_instance_uid}: a file of that study with a wrong StudyInstanceUID?"))
    return rows


def _group_study(export_dir: Path, study_uid: str, srows: list[dict[str, Any]], cfg: IngestConfig,
                 studies: list[StudyRecord], headers: dict[str, SeriesHeaders], errors: list[ErrorRecord]) -> None:
    """Group one study's file rows into series (appended to ``studies``, ``headers``, ``errors``)."""

    def err(path: str, reason: str, pid: str = "", study: str = "", series: str = "") -> None:
        errors.append(ErrorRecord(path, pid or "", study or "", series or "", STAGE, reason))

    where = _common_dir(export_dir, [r["path"] for r in srows])
    pids = Counter(r["patient_id"] or "" for r in srows)
    pid = pids.most_common(1)[0][0]
    if len(pids) > 1:
        err(where, f"StudyInstanceUID shared by several PatientIDs {sorted(pids)}; "
            f"'{pid}' (most files) used", pid, study_uid)
    if not pid:
        pid = f"UNKNOWN-{study_uid[-8:]}"
        err(where, f"PatientID missing; study treated as its own patient '{pid}'", pid, study_uid)
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in srows:
        by_series[r["series_uid"]].append(r)
    modalities = Counter((r["modality"] or "").upper() for r in srows)
    if "MR" not in modalities:
        mods = ", ".join(sorted(m or "none" for m in modalities))
        err(where, f"non-MR study (modality {mods}) skipped", pid, study_uid)
        return
    first = min(srows, key=lambda r: r["path"])
    date = _majority_study_date(export_dir, srows, err, pid, study_uid)
    if date is None:
        date_text = next((first[c] for c in ("study_date", "series_date", "acquisition_date")
                          if first[c]), None)
        date = _parse_date(date_text)
    if date is None:
        err(where, "study date unknown (no valid StudyDate, SeriesDate or AcquisitionDate"
            + (f": '{date_text}'" if date_text else "") + ")", pid, study_uid)
    study = StudyRecord(pid, study_uid, date, first["study_description"] or "")
    unusable: dict[str, str] = {}
    for original_uid, all_files in by_series.items():
        all_files.sort(key=lambda r: r["path"])
        modality = (all_files[0]["modality"] or "").upper()
        if modality != "MR":
            err(_common_dir(export_dir, [r["path"] for r in all_files]),
                f"non-MR series (modality {modality or 'none'}) in an MR study skipped",
                pid, study_uid, original_uid)
            continue
        stacks, split_reason = _split_stacks(original_uid, all_files)
        if split_reason:
            err(_common_dir(export_dir, [r["path"] for r in all_files]), split_reason, pid, study_uid,
                original_uid)
        for series_uid, suffix, files in stacks:
            h = headers[series_uid] = _summarise(series_uid, files)
            h.series_description += suffix
            if problem := _geometry_problem(series_uid, h.series_number, h.series_description, files):
                unusable[series_uid] = problem
            study.series.append(SeriesRecord(
                patient_id=pid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                series_number=h.series_number,
                series_description=h.series_description,
                modality=modality,
                manufacturer=files[0]["manufacturer"] or "",
                files=[export_dir / r["path"] for r in files],
            ))
    study.series.sort(key=lambda s: (s.series_number is None, s.series_number or 0,
                                     s.series_instance_uid))
    errors.extend(assign_roles(study, headers, cfg, unusable))
    studies.append(study)


def _majority_study_date(export_dir: Path, srows: list[dict[str, Any]], err, pid: str,
                         study_uid: str) -> dt.date | None:
    """The StudyDate most files of the study carry (ties: the first file's by path), or None
    when no file has a valid one. Every file whose StudyDate is invalid or another date gets a
    row of errors.csv: one bad file (e.g. '20231345') no longer undates the whole study."""
    rows = sorted(srows, key=lambda r: r["path"])
    dates = [_parse_date(r["study_date"]) for r in rows]
    counts = Counter(d for d in dates if d is not None)
    if not counts:
        return None
    date, n = counts.most_common(1)[0]
    for r, d in zip(rows, dates):
        if r["study_date"] and d != date:
            what = "is not a valid date" if d is None else "differs"
            err(str(export_dir / r["path"]), f"StudyDate '{r['study_date'][:40]}' {what}: study dated "
                f"{date.isoformat()} from {n} of {len(rows)} files", pid, study_uid, r["series_uid"])
    return date
