"""What the ``index`` and ``catalog`` commands show: a catalogue regrouped without reading
any file, and rich tables of it (patients, studies, series, roles; errors by reason)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.table import Table

from pipeline.core.config import IngestConfig
from pipeline.core.records import ErrorRecord, StudyRecord
from pipeline.ingest.catalogue import Catalogue, CatalogueLocation, recorded_export_dir
from pipeline.ingest.grouping import group_catalogue_rows
from pipeline.ingest.index import IndexResult


def group_catalogue(catalogue: CatalogueLocation, cfg: IngestConfig) -> tuple[list[StudyRecord], list[ErrorRecord]]:
    """Studies with their series roles, and the errors, from the catalogue alone (no file read)."""
    export_dir = recorded_export_dir(catalogue)
    with Catalogue(catalogue, export_dir) as cat:
        rows = list(cat.rows())
    errors = [ErrorRecord(str(export_dir / r["path"]), r["patient_id"] or "", r["study_uid"] or "",
                          r["series_uid"] or "", "ingest", r["reason"]) for r in rows if r["status"] == "error"]
    studies, _, group_errors = group_catalogue_rows(export_dir, [r for r in rows if r["status"] == "ok"], cfg,
                                                    set())
    return studies, errors + group_errors


def index_summary_table(res: IndexResult, export_dir: Path, catalogue: str) -> Table:
    """Counts of one ``index`` run and the errors grouped by reason."""
    table = Table(title=f"{export_dir}  ->  {catalogue}  ({res.seconds:.2f} s)")
    table.add_column("what")
    table.add_column("count", justify="right")
    n_series = sum(len(s.series) for s in res.studies)
    for what, n in [("files seen", res.n_files_seen), ("files read (new or changed)", res.n_files_read),
                    ("files unchanged (from the catalogue)", res.n_files_cached),
                    ("files deferred (modified recently)", res.n_deferred), ("files gone", res.n_files_removed),
                    ("files listed by DICOMDIR", res.dicomdir_files),
                    ("patients", len({s.patient_id for s in res.studies})), ("MR studies", len(res.studies)),
                    ("series", n_series), ("errors.csv rows", len(res.errors))]:
        table.add_row(what, str(n))
    return table


def _reason_kind(reason: str) -> str:
    """The reason without the file-specific detail after the first ':' or '(' (for counting)."""
    for sep in (": ", " ("):
        if sep in reason:
            reason = reason.split(sep, 1)[0]
    return reason


def errors_table(errors: list[ErrorRecord], limit: int = 20) -> Table:
    table = Table(title=f"{len(errors)} skipped or failed (by reason)")
    table.add_column("n", justify="right")
    table.add_column("stage")
    table.add_column("reason", overflow="fold")
    counts = Counter((e.stage, _reason_kind(e.reason)) for e in errors)
    for (stage, reason), n in counts.most_common(limit):
        table.add_row(str(n), stage, reason)
    return table


def catalogue_table(studies: list[StudyRecord]) -> Table:
    """One row per series: patient, study, series, role, phase, confidence; study flags last."""
    table = Table(title=f"{len({s.patient_id for s in studies})} patients, {len(studies)} studies, "
                        f"{sum(len(s.series) for s in studies)} series")
    for col in ("patient", "study date", "study", "#", "series description", "role", "phase", "conf.", "files"):
        table.add_column(col, no_wrap=col != "series description")
    table.add_column("why / study flags", overflow="fold")
    for st in studies:
        for i, s in enumerate(st.series):
            table.add_row(
                st.patient_id if i == 0 else "", str(st.study_date or "?") if i == 0 else "",
                f"...{st.study_instance_uid[-8:]}" if i == 0 else "", "" if s.series_number is None else str(s.series_number),
                s.series_description, s.role.value, "" if s.phase_index is None else str(s.phase_index),
                "" if s.role_confidence is None else f"{s.role_confidence:.2f}", str(len(s.files)),
                s.role_reason[:100],
            )
        for flag in st.flags:
            table.add_row("", "", "", "", "", "[yellow]study flag[/yellow]", "", "", "", flag)
        table.add_section()
    return table
