"""Incremental catalogue of a PACS export: one row per file, series/studies as views.

Why a relational table rather than a document store: the nightly rerun must decide in a few
seconds which of ~10^4 files changed, and the table must be queryable by hand
(``sqlite3 catalogue.sqlite "select * from series"``). One row per file holds its stat
signature (size, mtime_ns) and either the extracted header fields or the reason it was
skipped; the ``series``, ``studies`` and ``patients`` tables are views computed from it, so
they can never disagree with the files.

Where: a SQLite file beside the outputs (the single-machine default), or a PostgreSQL
database named by URL (``postgresql+psycopg://host/db``) when several machines or flows share
it (docs/cluster.md). Both go through SQLAlchemy Core with the same statements; writers
upsert (``ON CONFLICT``) in path order, so two flows indexing the same export at once
serialise on the rows instead of failing or deadlocking, and the schema is created under an
advisory lock on PostgreSQL.

The catalogue is a cache of the export: if its schema version or export directory differ
from what is asked, it is emptied and rebuilt rather than migrated.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

# 2: stack attributes (acquisition number, trigger time, b-value), DICOMDIR references,
# pseudonyms. 3: header values checked when read (a version-2 row may hold a non-finite
# position marked usable). 4: SQLAlchemy schema shared with PostgreSQL (version in ``meta``,
# 64-bit sizes and mtimes, DICOMDIR references keyed by position).
SCHEMA_VERSION = 4

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


# A catalogue is a SQLite file (a path) or a database URL.
CatalogueLocation = Path | str

_TYPES = {"TEXT": sa.Text, "INTEGER": sa.BigInteger, "REAL": sa.Float}


def is_database_url(location: CatalogueLocation) -> bool:
    """Whether ``location`` is a database URL (``dialect[+driver]://...``) rather than a file."""
    return isinstance(location, str) and "://" in location


def catalogue_url(location: CatalogueLocation) -> str:
    """The SQLAlchemy URL of a catalogue: a URL as given, a path as its SQLite file."""
    if is_database_url(location):
        return str(location)
    return f"sqlite:///{Path(location).resolve()}"


def display_location(location: CatalogueLocation) -> str:
    """The catalogue as it may be printed or stored in the outputs (no password)."""
    if is_database_url(location):
        return sa.engine.make_url(str(location)).render_as_string(hide_password=True)
    return str(location)


def _metadata() -> tuple[sa.MetaData, sa.Table, sa.Table, sa.Table, sa.Table]:
    md = sa.MetaData()
    files = sa.Table(
        "files", md,
        *(sa.Column(name, _TYPES[kind.split()[0]](), primary_key="PRIMARY KEY" in kind,
                    nullable="NOT NULL" not in kind and "PRIMARY KEY" not in kind,
                    server_default=sa.text("''") if "DEFAULT ''" in kind else None)
          for name, kind in FILE_COLUMNS.items()),
        sa.Index("files_series", "series_uid"), sa.Index("files_study", "study_uid"),
    )
    # Files a DICOMDIR lists (path relative to the export), in its order, to report those missing.
    refs = sa.Table("dicomdir_refs", md, sa.Column("dicomdir", sa.Text, primary_key=True),
                    sa.Column("position", sa.Integer, primary_key=True), sa.Column("ref", sa.Text, nullable=False))
    # Pseudonymisation: PatientID -> pseudonym (kept with the catalogue, never in outputs).
    pseudonyms = sa.Table("pseudonyms", md, sa.Column("patient_id", sa.Text, primary_key=True),
                          sa.Column("pseudonym", sa.Text, nullable=False))
    meta = sa.Table("meta", md, sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text))
    return md, files, refs, pseudonyms, meta


_MD, FILES, DICOMDIR_REFS, PSEUDONYMS, META = _metadata()


def _views(dialect: str) -> list[str]:
    """The ``series``/``studies``/``patients`` views in the dialect's words (the same columns)."""
    create = "CREATE OR REPLACE VIEW" if dialect == "postgresql" else "CREATE VIEW IF NOT EXISTS"
    concat = "string_agg(DISTINCT modality, ',')" if dialect == "postgresql" else "GROUP_CONCAT(DISTINCT modality)"
    return [
        f"""{create} series AS
  SELECT series_uid, MIN(study_uid) AS study_uid, MIN(patient_id) AS patient_id, MIN(modality) AS modality,
         MIN(manufacturer) AS manufacturer, MIN(series_number) AS series_number,
         MIN(series_description) AS series_description, MIN(image_type) AS image_type,
         MAX(contrast_agent) AS contrast_agent, MIN(acquisition_time) AS acquisition_time,
         MIN(echo_time) AS echo_time, MIN(rows) AS rows, MIN(columns) AS columns, COUNT(*) AS n_files
  FROM files WHERE status = 'ok' GROUP BY series_uid""",
        f"""{create} studies AS
  SELECT study_uid, MIN(patient_id) AS patient_id, MIN(study_date) AS study_date,
         MIN(study_description) AS study_description, {concat} AS modalities,
         COUNT(DISTINCT series_uid) AS n_series, COUNT(*) AS n_files
  FROM files WHERE status = 'ok' GROUP BY study_uid""",
        f"""{create} patients AS
  SELECT patient_id, COUNT(DISTINCT study_uid) AS n_studies, COUNT(*) AS n_files
  FROM files WHERE status = 'ok' GROUP BY patient_id""",
    ]


def open_engine(location: CatalogueLocation, *, read_only: bool = False) -> Engine:
    """A SQLAlchemy engine on the catalogue (SQLite: WAL, 60 s busy timeout; read-only on request)."""
    url = catalogue_url(location)
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    if read_only:
        path = Path(location).resolve()
        engine = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true", connect_args={"timeout": 30})
    else:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60.0})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_con, _record) -> None:
        # WAL lets the review UI read while a nightly run writes; NORMAL sync is safe with
        # WAL (a power cut can lose the last commit, never corrupt the file) and much faster.
        if not read_only:
            dbapi_con.execute("PRAGMA journal_mode=WAL")
            dbapi_con.execute("PRAGMA synchronous=NORMAL")
        dbapi_con.execute("PRAGMA busy_timeout=60000")

    return engine


class CatalogueNotFound(FileNotFoundError):
    """No catalogue at the given place (run ``ablation-response index EXPORT`` first)."""


def recorded_export_dir(location: CatalogueLocation) -> Path:
    """The export directory a catalogue describes (its ``meta`` table), without changing it."""
    if not is_database_url(location) and not Path(location).is_file():
        raise CatalogueNotFound(f"no catalogue at {location} (run `ablation-response index EXPORT` first)")
    engine = open_engine(location, read_only=True)
    try:
        with engine.connect() as con:
            row = con.execute(sa.select(META.c.value).where(META.c.key == "export_dir")).first()
    except sa.exc.DBAPIError as exc:
        raise CatalogueNotFound(f"{display_location(location)} is not an ingest catalogue: {exc.orig}") from None
    finally:
        engine.dispose()
    if row is None:
        raise CatalogueNotFound(f"{display_location(location)} is not an ingest catalogue (no export directory recorded)")
    return Path(row[0])


def series_paths(location: CatalogueLocation, series_uid: str) -> tuple[Path, list[str]]:
    """(export directory, usable files of one series relative to it), read-only."""
    export_dir = recorded_export_dir(location)
    engine = open_engine(location, read_only=True)
    try:
        with engine.connect() as con:
            rels = con.execute(sa.select(FILES.c.path).where(FILES.c.series_uid == series_uid,
                                                             FILES.c.status == "ok")).scalars().all()
    finally:
        engine.dispose()
    return export_dir, sorted(rels)


class Catalogue:
    """The file table of one export directory (a SQLite file or a database URL).

    Use as a context manager; writes go through :meth:`transaction` so that a run commits
    all its changes at once (fast, and a crash leaves the previous state intact).
    """

    def __init__(self, location: CatalogueLocation, export_dir: Path | str) -> None:
        self.location = location
        self.export_dir = str(Path(export_dir).resolve())
        self._engine = open_engine(location)
        self._dialect = self._engine.dialect.name
        self._tx: Connection | None = None
        self._ensure_schema()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    def _ensure_schema(self) -> None:
        with self._engine.begin() as con:
            if self._dialect == "postgresql":
                # Two flows starting on an empty database would race on CREATE TABLE; the
                # lock is released with this transaction.
                con.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": zlib.crc32(b"ablation-response catalogue schema")})
            META.create(con, checkfirst=True)
            meta = dict(con.execute(sa.select(META.c.key, META.c.value)).all())
            stale = (meta.get("schema_version") != str(SCHEMA_VERSION)
                     or meta.get("export_dir", self.export_dir) != self.export_dir)
            if stale:
                # A cache of the export: rebuild instead of migrating.
                for view in ("series", "studies", "patients"):
                    con.execute(sa.text(f"DROP VIEW IF EXISTS {view}"))
                for table in (FILES, DICOMDIR_REFS):
                    table.drop(con, checkfirst=True)
            _MD.create_all(con, tables=[FILES, DICOMDIR_REFS, PSEUDONYMS], checkfirst=True)
            for statement in _views(self._dialect):
                con.execute(sa.text(statement))
            if stale or "export_dir" not in meta:
                self._upsert(con, META, ["key"], [{"key": "export_dir", "value": self.export_dir},
                                                  {"key": "schema_version", "value": str(SCHEMA_VERSION)}])

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """The run's transaction when one is open, else a transaction of its own."""
        if self._tx is not None:
            yield self._tx
        else:
            with self._engine.begin() as con:
                yield con

    def _upsert(self, con: Connection, table: sa.Table, keys: list[str], rows: list[dict[str, Any]],
                update: bool = True) -> None:
        if not rows:
            return
        insert = (postgresql if self._dialect == "postgresql" else sqlite).insert(table)
        if update:
            statement = insert.on_conflict_do_update(
                index_elements=keys, set_={c.name: insert.excluded[c.name] for c in table.c if c.name not in keys})
        else:
            statement = insert.on_conflict_do_nothing(index_elements=keys)
        con.execute(statement, rows)

    # ------------------------------------------------------------------ reads
    def signatures(self) -> dict[str, tuple[int, int]]:
        """``{relative path: (size, mtime_ns)}`` of every catalogued file."""
        with self._connection() as con:
            return {p: (s, m) for p, s, m in con.execute(sa.select(FILES.c.path, FILES.c.size, FILES.c.mtime_ns))}

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every file row as a dict (column name -> value), in path order (code points, as
        SQLite's binary collation; PostgreSQL's locale collation would order them otherwise)."""
        with self._connection() as con:
            rows = [dict(r) for r in con.execute(sa.select(FILES)).mappings()]
        yield from sorted(rows, key=lambda r: r["path"])

    def dicomdir_refs(self) -> dict[str, list[str]]:
        """``{DICOMDIR relative path: [listed file, relative to the export]}``."""
        out: dict[str, list[str]] = {}
        with self._connection() as con:
            listed = con.execute(sa.select(DICOMDIR_REFS.c.dicomdir, DICOMDIR_REFS.c.ref)
                                 .order_by(DICOMDIR_REFS.c.dicomdir, DICOMDIR_REFS.c.position)).all()
        for d, ref in listed:
            out.setdefault(d, []).append(ref)
        return out

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        """Run a read-only query (e.g. on the ``series``/``studies`` views; ``:name`` parameters)."""
        with self._connection() as con:
            return [tuple(r) for r in con.execute(sa.text(sql), params or {})]

    # ------------------------------------------------------------------ writes
    @contextmanager
    def transaction(self) -> Iterator[Catalogue]:
        """One transaction for a whole run: commit on success, roll back on error."""
        with self._engine.begin() as con:
            self._tx = con
            try:
                yield self
            finally:
                self._tx = None

    def upsert(self, rows: Iterable[dict[str, Any]]) -> None:
        """Insert or replace file rows (missing columns are stored as NULL).

        In path order: two flows upserting the same files lock them in the same order.
        """
        names = list(FILE_COLUMNS)
        rows = sorted(rows, key=lambda r: r["path"])
        with self._connection() as con:
            # reason: '' when absent (SQLite's INSERT OR REPLACE put the column default there).
            self._upsert(con, FILES, ["path"],
                         [{**{n: row.get(n) for n in names}, "reason": row.get("reason") or ""} for row in rows])
            for row in rows:
                if row.get("status") == "dicomdir":
                    con.execute(sa.delete(DICOMDIR_REFS).where(DICOMDIR_REFS.c.dicomdir == row["path"]))
                    base = row["path"].rpartition("/")[0]
                    self._upsert(con, DICOMDIR_REFS, ["dicomdir", "position"],
                                 [{"dicomdir": row["path"], "position": i, "ref": f"{base}/{r}" if base else r}
                                  for i, r in enumerate(row["dicomdir_refs"])])

    def save_pseudonyms(self, mapping: dict[str, str]) -> None:
        """Store PatientID -> pseudonym pairs (idempotent)."""
        with self._connection() as con:
            self._upsert(con, PSEUDONYMS, ["patient_id"],
                         [{"patient_id": k, "pseudonym": v} for k, v in sorted(mapping.items())])

    def pseudonyms(self) -> dict[str, str]:
        with self._connection() as con:
            return dict(con.execute(sa.select(PSEUDONYMS.c.patient_id, PSEUDONYMS.c.pseudonym)).all())

    def paths_and_patients(self) -> list[tuple[str, str | None]]:
        """(relative path, PatientID) of every file (the raw identifiers a redactor must know)."""
        with self._connection() as con:
            return [tuple(r) for r in con.execute(sa.select(FILES.c.path, FILES.c.patient_id))]

    def delete(self, paths: Iterable[str]) -> None:
        """Drop the rows of files that left the export (or changed and are deferred)."""
        paths = sorted(paths)
        if not paths:
            return
        with self._connection() as con:
            for i in range(0, len(paths), 500):
                chunk = paths[i:i + 500]
                con.execute(sa.delete(FILES).where(FILES.c.path.in_(chunk)))
                con.execute(sa.delete(DICOMDIR_REFS).where(DICOMDIR_REFS.c.dicomdir.in_(chunk)))
