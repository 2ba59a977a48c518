"""Index a PACS export directory: walk, read DICOM headers, catalogue, group, assign roles.

``index_export`` is the one entry point. It never raises on a bad file: every file, series
or study it cannot use becomes an :class:`ErrorRecord` (one row of ``errors.csv``) with a
human-readable reason. The steps, in the order data flows: :mod:`pipeline.ingest.walk` (the
files), :mod:`pipeline.ingest.headers` (one file's header), :mod:`pipeline.ingest.catalogue`
(the SQLite catalogue), :mod:`pipeline.ingest.grouping` (studies, series, roles).

Speed (DESIGN.md targets: >= 2,000 headers/s on 2 cores; an unchanged rerun of 10,000 files
<= 10 s): headers are read with ``stop_before_pixels`` and a tag whitelist, in worker
processes for large batches (pydicom parsing is pure Python, so threads would not help);
unchanged files (same path, size, mtime_ns) are served from the SQLite catalogue.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import IngestConfig
from pipeline.core.records import ErrorRecord, StudyRecord
from pipeline.ingest.catalogue import Catalogue, CatalogueLocation, is_database_url
from pipeline.ingest.grouping import STAGE, group_catalogue_rows
from pipeline.ingest.headers import read_header
from pipeline.ingest.series_roles import SeriesHeaders
from pipeline.ingest.walk import recently_modified, walk

# Below this many files to read, starting worker processes costs more than it saves.
_PARALLEL_MIN_FILES = 1000
_CHUNK = 200


@dataclass
class IndexResult:
    """What :func:`index_export` found.

    ``studies``: MR studies sorted by (patient, date), series roles assigned;
    ``series_headers``: SeriesInstanceUID -> summarised headers (used by the role rules);
    ``deferred``: files modified less than ``defer_recent_seconds`` ago (not indexed);
    ``deferred_studies``: studies left out because one of their files is being written.
    """

    studies: list[StudyRecord]
    errors: list[ErrorRecord]
    n_files_seen: int
    n_files_read: int
    n_files_cached: int
    n_deferred: int
    seconds: float
    n_files_removed: int = 0
    deferred: list[str] = field(default_factory=list)
    deferred_studies: list[str] = field(default_factory=list)
    series_headers: dict[str, SeriesHeaders] = field(default_factory=dict)
    dicomdir_files: int = 0  # files listed by the DICOMDIR(s) of the export


def _read_chunk(abs_paths: list[str]) -> list[dict[str, Any]]:
    return [read_header(p) for p in abs_paths]


def _read_all(abs_paths: list[str], workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(abs_paths) < _PARALLEL_MIN_FILES:
        return _read_chunk(abs_paths)
    chunks = [abs_paths[i : i + _CHUNK] for i in range(0, len(abs_paths), _CHUNK)]
    # forkserver, not fork: the caller may be a Prefect worker thread, and forking a process
    # that runs other threads can deadlock the child.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        return [row for rows in pool.map(_read_chunk, chunks) for row in rows]


def _missing_from_dicomdir(export_dir: Path, listed: dict[str, list[str]], present: set[str]) -> list[ErrorRecord]:
    """Files a DICOMDIR lists that are not in the export (an incomplete copy of the media).

    Every file is found by walking the export whether a DICOMDIR lists it or not (exports are
    often copied together with files the index does not know); the index is used to say
    what is missing.

    File IDs are matched case-insensitively: media written with ISO 9660 upper-case names are
    often copied onto file systems that change the case.
    """
    lower = {p.lower() for p in present}
    errors = []
    for dicomdir, refs in listed.items():
        for ref in refs:
            if ref.lower() not in lower:
                errors.append(ErrorRecord(str(export_dir / ref), "", "", "", STAGE,
                                          "listed in DICOMDIR but missing from the export"))
    return errors


# --------------------------------------------------------------------------- entry point
def index_export(
    export_dir: Path, catalogue: CatalogueLocation, cfg: IngestConfig, *, workers: int | None = None,
    skip_dirs: Iterable[Path] = (),
) -> IndexResult:
    """Index ``export_dir`` into ``catalogue`` (a SQLite file or a database URL) and group it.

    Only files that are new or whose (size, mtime_ns) changed are read; files gone from
    the export are dropped from the catalogue. Files modified less than
    ``cfg.defer_recent_seconds`` ago are deferred (not read), and so is every study they
    belong to (their study UID is peeked at, nothing is stored), so that a study still being
    copied is never processed half-written. ``workers``: header-reading processes (default:
    the CPUs this process may use). ``skip_dirs``: folders never walked (the output folder,
    should it lie inside the export: its DICOM SEG/SR must not become inputs). Never raises on bad files; raises only if
    ``export_dir`` is not a directory or the catalogue cannot be opened.
    """
    t0 = time.perf_counter()
    export_dir = Path(export_dir).resolve()
    if not export_dir.is_dir():
        raise NotADirectoryError(f"export directory not found: {export_dir}")
    if workers is None:
        workers = cfg.workers
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # A catalogue file inside the export is never indexed itself (nor its -wal/-shm); a
    # database has no files there.
    own_files = None if is_database_url(catalogue) else str(Path(catalogue).resolve())

    def is_catalogue_file(rel: str) -> bool:
        return own_files is not None and str(export_dir / rel).startswith(own_files)

    hidden: list[str] = []
    found = walk(export_dir, skip_dirs, hidden)
    # Never index the catalogue itself if it lives inside the export.
    found = [f for f in found if not is_catalogue_file(f[0])]
    deferred = recently_modified(found, cfg.defer_recent_seconds)
    deferred_set = set(deferred)

    with Catalogue(catalogue, export_dir) as cat:
        known = cat.signatures()
        present = {rel for rel, _, _ in found}
        to_read = [(rel, size, mtime) for rel, size, mtime in found
                   if rel not in deferred_set and known.get(rel) != (size, mtime)]
        removed = [rel for rel in known if rel not in present or rel in deferred_set]
        new_rows = _read_all([str(export_dir / rel) for rel, _, _ in to_read], workers)
        with cat.transaction():
            cat.delete(removed)
            cat.upsert(
                {**row, "path": rel, "size": size, "mtime_ns": mtime}
                for (rel, size, mtime), row in zip(to_read, new_rows)
            )
        rows = list(cat.rows())
        listed = cat.dicomdir_refs()

    errors = [
        ErrorRecord(str(export_dir / r["path"]), r["patient_id"] or "", r["study_uid"] or "",
                    r["series_uid"] or "", STAGE, r["reason"])
        for r in rows if r["status"] == "error" or (r["status"] == "ok" and r["reason"])
    ]
    errors.extend(_missing_from_dicomdir(export_dir, listed, present))
    # Hidden entries are skipped (OS metadata such as .DS_Store, ._* AppleDouble files, .Trash),
    # but said: a hidden folder may hold a whole study. The catalogue's own files are not listed.
    errors.extend(ErrorRecord(str(export_dir / rel), "", "", "", STAGE,
                              f"hidden {'folder' if (export_dir / rel).is_dir() else 'file'} skipped "
                              "(name starts with '.')")
                  for rel in sorted(hidden) if not is_catalogue_file(rel))
    # Studies touched by a file still being written wait for the next run.
    deferred_studies = sorted({
        r["study_uid"] for r in (read_header(str(export_dir / rel)) for rel in deferred)
        if r.get("study_uid")
    })
    studies, headers, group_errors = group_catalogue_rows(
        export_dir, [r for r in rows if r["status"] == "ok"], cfg, set(deferred_studies)
    )
    errors.extend(group_errors)
    return IndexResult(
        studies=studies,
        errors=errors,
        n_files_seen=len(found),
        n_files_read=len(to_read),
        n_files_cached=len(found) - len(to_read) - len(deferred),
        n_deferred=len(deferred),
        seconds=time.perf_counter() - t0,
        n_files_removed=len([rel for rel in known if rel not in present]),
        deferred=[str(export_dir / rel) for rel in deferred],
        deferred_studies=deferred_studies,
        series_headers=headers,
        dicomdir_files=sum(len(v) for v in listed.values()),
    )
