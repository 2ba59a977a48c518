"""Keyed pseudonyms of PatientID for every output (``ingest.pseudonymise_patient_ids``).

A pseudonym is ``PSN-`` + the first 16 hex digits of HMAC-SHA256(key, PatientID): stable across
nightly runs (the same patient keeps the same folder and row), not reversible without the key,
and not guessable from a list of hospital IDs without the key (a plain hash would be). The
64-byte key is generated once with :mod:`secrets` beside the catalogue (``<catalogue>.key``,
mode 0600) and never written into the outputs; the mapping PatientID -> pseudonym is kept in
the catalogue (table ``pseudonyms``) and in ``<catalogue stem>.pseudonyms.csv`` beside it, for
the team that may re-identify. Losing the key means new pseudonyms on the next run.

Only identifiers are replaced: the catalogue never stores names or birth dates, and no output
writes them (see docs/ingest.md "Privacy").
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import secrets
from dataclasses import replace
from pathlib import Path

from pipeline.catalogue import Catalogue
from pipeline.outputs import atomic_write_bytes, atomic_write_text
from pipeline.types import ErrorRecord, StudyRecord

PREFIX = "PSN-"
_KEY_BYTES = 64


def key_path(catalogue_path: Path) -> Path:
    return Path(catalogue_path).with_suffix(".key")


def mapping_csv_path(catalogue_path: Path) -> Path:
    p = Path(catalogue_path)
    return p.with_name(f"{p.stem}.pseudonyms.csv")


def load_or_create_key(path: Path) -> bytes:
    """The secret key at ``path`` (hex text), generated on first use with mode 0600."""
    path = Path(path)
    if path.exists():
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"pseudonymisation key {path} is not hex text: restore it or remove it "
                             "(a new key gives every patient a new pseudonym)") from None
        if len(key) < 32:
            raise ValueError(f"pseudonymisation key {path} is too short ({len(key)} bytes, >= 32 needed)")
        return key
    key = secrets.token_bytes(_KEY_BYTES)
    atomic_write_bytes(path, key.hex().encode() + b"\n", mode=0o600)
    os.chmod(path, 0o600)
    return key


def pseudonym(key: bytes, patient_id: str) -> str:
    """``PSN-`` + 16 hex digits of HMAC-SHA256(key, PatientID) (64 bits: no collision in any
    realistic cohort)."""
    digest = hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:16].upper()


class Pseudonymiser:
    """Maps PatientIDs to pseudonyms with the key beside ``catalogue_path``; remembers the
    pairs it made so that :meth:`save` can store the mapping."""

    def __init__(self, catalogue_path: Path) -> None:
        self.catalogue_path = Path(catalogue_path)
        self.key = load_or_create_key(key_path(self.catalogue_path))
        self.mapping: dict[str, str] = {}

    def __call__(self, patient_id: str) -> str:
        if not patient_id:
            return patient_id
        if patient_id not in self.mapping:
            self.mapping[patient_id] = pseudonym(self.key, patient_id)
        return self.mapping[patient_id]

    def studies(self, studies: list[StudyRecord]) -> list[StudyRecord]:
        """The studies (and their series) with pseudonymised patient IDs (copies)."""
        out = []
        for st in studies:
            pid = self(st.patient_id)
            out.append(replace(st, patient_id=pid, series=[replace(s, patient_id=pid) for s in st.series]))
        return out

    def errors(self, errors: list[ErrorRecord]) -> list[ErrorRecord]:
        return [replace(e, patient_id=self(e.patient_id)) for e in errors]

    def save(self) -> None:
        """Store the mapping in the catalogue and in the CSV beside it (merged with earlier runs)."""
        with Catalogue(self.catalogue_path, _export_dir_of(self.catalogue_path)) as cat:
            cat.save_pseudonyms(self.mapping)
            everything = cat.pseudonyms()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["patient_id", "pseudonym"])
        writer.writerows(sorted(everything.items()))
        atomic_write_text(mapping_csv_path(self.catalogue_path), buf.getvalue(), mode=0o600)
        os.chmod(mapping_csv_path(self.catalogue_path), 0o600)


def _export_dir_of(catalogue_path: Path) -> str:
    """The export directory a catalogue was built for (opening it with another would empty it)."""
    import sqlite3  # noqa: PLC0415

    con = sqlite3.connect(catalogue_path)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'export_dir'").fetchone()
    finally:
        con.close()
    if row is None:
        raise ValueError(f"{catalogue_path} is not an ingest catalogue (no export_dir)")
    return row[0]


def pseudonymise_run(index, sessions: dict | None, catalogue_path: Path):
    """(index, sessions) of a run with every PatientID replaced by its pseudonym.

    ``index`` is an :class:`pipeline.ingest.IndexResult` (a pseudonymised copy is returned);
    ``sessions`` the procedures file's ``{PatientID: [Procedure]}`` (re-keyed, or None). The
    mapping is stored beside the catalogue before anything is written to the outputs.
    """
    mapper = Pseudonymiser(catalogue_path)
    index = replace(index, studies=mapper.studies(index.studies), errors=mapper.errors(index.errors))
    if sessions is not None:
        sessions = {mapper(pid): [replace(p, patient_id=mapper(pid)) for p in procs] for pid, procs in sessions.items()}
    mapper.save()
    return index, sessions
