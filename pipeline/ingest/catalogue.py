"""Incremental SQLite catalogue of a PACS export: one row per file, series/studies as views.

Why SQLite (stdlib) rather than a document store: the nightly rerun must decide in a few
seconds which of ~10^4 files changed, and the table must be queryable by hand
(``sqlite3 catalogue.db "select * from series"``). One row per file holds its stat signature
(size, mtime_ns) and either the extracted header fields or the reason it was skipped; the
``series``, ``studies`` and ``patients`` tables are views computed from it, so they can never
disagree with the files.

The catalogue is a cache of the export: if its schema version or export directory differ
from what is asked, it is emptied and rebuilt rather than migrated.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# 2: stack attributes (acquisition number, trigger time, b-value), DICOMDIR references,
# pseudonyms. 3: header values checked when read (a version-2 row may hold a non-finite
# position marked usable).
SCHEMA_VERSION = 3

# Header columns, in table order. Values are stored as DICOM-ish text (multi-values joined
# with a backslash, as in the standard's own encoding) or numbers where they are compared.
HEADER_COLUMNS: dict[str, str] = {
    "patient_id": "TEXT",
    "study_uid": "TEXT",
    "study_date": "TEXT",
    "series_date": "TEXT",
    "acquisition_date": "TEXT",
    "study_description": "TEXT",
    "series_uid": "TEXT",
    "series_number": "INTEGER",
    "series_description": "TEXT",
    "modality": "TEXT",
    "manufacturer": "TEXT",
    "sop_class_uid": "TEXT",
    "sop_instance_uid": "TEXT",
    "transfer_syntax": "TEXT",
    "image_type": "TEXT",
    "contrast_agent": "TEXT",
    "acquisition_time": "TEXT",
    "content_time": "TEXT",
    "series_time": "TEXT",
    "temporal_position": "INTEGER",
    "echo_time": "REAL",
    "repetition_time": "REAL",
    "inversion_time": "REAL",
    "scan_options": "TEXT",
    "scanning_sequence": "TEXT",
    "sequence_name": "TEXT",
    "iop": "TEXT",
    "ipp": "TEXT",
    "pixel_spacing": "TEXT",
    "rows": "INTEGER",
    "columns": "INTEGER",
    "instance_number": "INTEGER",
    "n_frames": "INTEGER",
    "acquisition_number": "INTEGER",
    "trigger_time": "REAL",
    "diffusion_b_value": "REAL",
}
# status: "ok" (an image file usable downstream), "dicomdir" (a media index: the files it lists
# are in ``dicomdir_refs``) or "error" (skipped; ``reason`` says why).
FILE_COLUMNS: dict[str, str] = {
    "path": "TEXT PRIMARY KEY",  # relative to the export directory, POSIX separators
    "size": "INTEGER NOT NULL",
    "mtime_ns": "INTEGER NOT NULL",
    "status": "TEXT NOT NULL",
    "reason": "TEXT NOT NULL DEFAULT ''",
    **HEADER_COLUMNS,
}

_VIEWS = """
CREATE VIEW IF NOT EXISTS series AS
  SELECT series_uid, study_uid, patient_id, modality, manufacturer,
         MIN(series_number) AS series_number, MIN(series_description) AS series_description,
         MIN(image_type) AS image_type, MAX(contrast_agent) AS contrast_agent,
         MIN(acquisition_time) AS acquisition_time, MIN(echo_time) AS echo_time,
         MIN(rows) AS rows, MIN(columns) AS columns, COUNT(*) AS n_files
  FROM files WHERE status = 'ok' GROUP BY series_uid;
CREATE VIEW IF NOT EXISTS studies AS
  SELECT study_uid, patient_id, MIN(study_date) AS study_date,
         MIN(study_description) AS study_description,
         GROUP_CONCAT(DISTINCT modality) AS modalities,
         COUNT(DISTINCT series_uid) AS n_series, COUNT(*) AS n_files
  FROM files WHERE status = 'ok' GROUP BY study_uid;
CREATE VIEW IF NOT EXISTS patients AS
  SELECT patient_id, COUNT(DISTINCT study_uid) AS n_studies, COUNT(*) AS n_files
  FROM files WHERE status = 'ok' GROUP BY patient_id;
"""


class Catalogue:
    """The SQLite file table of one export directory.

    Use as a context manager; writes go through :meth:`transaction` so that a run commits
    all its changes at once (fast, and a crash leaves the previous state intact).
    """

    def __init__(self, path: Path | str, export_dir: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.export_dir = str(Path(export_dir).resolve())
        self._con = sqlite3.connect(self.path, timeout=60.0)
        # WAL lets the review UI read while a nightly run writes; NORMAL sync is safe with
        # WAL (a power cut can lose the last commit, never corrupt the file) and much faster.
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute("PRAGMA busy_timeout=60000")
        self._ensure_schema()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._con.close()

    def _ensure_schema(self) -> None:
        con = self._con
        version = con.execute("PRAGMA user_version").fetchone()[0]
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = con.execute("SELECT value FROM meta WHERE key = 'export_dir'").fetchone()
        stale = version != SCHEMA_VERSION or (row is not None and row[0] != self.export_dir)
        with con:
            if stale:
                # A cache of the export: rebuild instead of migrating.
                for view in ("series", "studies", "patients"):
                    con.execute(f"DROP VIEW IF EXISTS {view}")
                con.execute("DROP TABLE IF EXISTS files")
                con.execute("DROP TABLE IF EXISTS dicomdir_refs")
            cols = ", ".join(f"{name} {kind}" for name, kind in FILE_COLUMNS.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS files ({cols})")
            con.execute("CREATE INDEX IF NOT EXISTS files_series ON files(series_uid)")
            con.execute("CREATE INDEX IF NOT EXISTS files_study ON files(study_uid)")
            # Files a DICOMDIR lists (path relative to the export), to report those missing.
            con.execute("CREATE TABLE IF NOT EXISTS dicomdir_refs (dicomdir TEXT NOT NULL, ref TEXT NOT NULL)")
            con.execute("CREATE INDEX IF NOT EXISTS dicomdir_refs_dir ON dicomdir_refs(dicomdir)")
            # Pseudonymisation: PatientID -> pseudonym (kept with the catalogue, never in outputs).
            con.execute("CREATE TABLE IF NOT EXISTS pseudonyms (patient_id TEXT PRIMARY KEY, pseudonym TEXT NOT NULL)")
            for statement in filter(None, (s.strip() for s in _VIEWS.split(";"))):
                con.execute(statement)
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('export_dir', ?)", (self.export_dir,)
            )
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ reads
    def signatures(self) -> dict[str, tuple[int, int]]:
        """``{relative path: (size, mtime_ns)}`` of every catalogued file."""
        return {p: (s, m) for p, s, m in self._con.execute("SELECT path, size, mtime_ns FROM files")}

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every file row as a dict (column name -> value), in path order."""
        cur = self._con.execute("SELECT * FROM files ORDER BY path")
        names = [d[0] for d in cur.description]
        for values in cur:
            yield dict(zip(names, values))

    def dicomdir_refs(self) -> dict[str, list[str]]:
        """``{DICOMDIR relative path: [listed file, relative to the export]}``."""
        out: dict[str, list[str]] = {}
        for d, ref in self._con.execute("SELECT dicomdir, ref FROM dicomdir_refs ORDER BY rowid"):
            out.setdefault(d, []).append(ref)
        return out

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        """Run a read-only query (e.g. on the ``series``/``studies`` views)."""
        return self._con.execute(sql, tuple(params)).fetchall()

    # ------------------------------------------------------------------ writes
    @contextmanager
    def transaction(self) -> Iterator[Catalogue]:
        """One transaction for a whole run: commit on success, roll back on error."""
        with self._con:
            yield self

    def upsert(self, rows: Iterable[dict[str, Any]]) -> None:
        """Insert or replace file rows (missing columns are stored as NULL)."""
        names = list(FILE_COLUMNS)
        sql = (
            f"INSERT OR REPLACE INTO files ({', '.join(names)}) "
            f"VALUES ({', '.join('?' * len(names))})"
        )
        rows = list(rows)
        self._con.executemany(sql, ([row.get(n) for n in names] for row in rows))
        for row in rows:
            if row.get("status") == "dicomdir":
                self._con.execute("DELETE FROM dicomdir_refs WHERE dicomdir = ?", (row["path"],))
                base = row["path"].rpartition("/")[0]
                self._con.executemany("INSERT INTO dicomdir_refs VALUES (?, ?)",
                                      ((row["path"], f"{base}/{r}" if base else r) for r in row["dicomdir_refs"]))

    def save_pseudonyms(self, mapping: dict[str, str]) -> None:
        """Store PatientID -> pseudonym pairs (idempotent)."""
        with self._con:
            self._con.executemany("INSERT OR REPLACE INTO pseudonyms VALUES (?, ?)", mapping.items())

    def pseudonyms(self) -> dict[str, str]:
        return dict(self._con.execute("SELECT patient_id, pseudonym FROM pseudonyms"))

    def delete(self, paths: Iterable[str]) -> None:
        """Drop the rows of files that left the export (or changed and are deferred)."""
        paths = list(paths)
        self._con.executemany("DELETE FROM files WHERE path = ?", ((p,) for p in paths))
        self._con.executemany("DELETE FROM dicomdir_refs WHERE dicomdir = ?", ((p,) for p in paths))
