"""`index` / `catalog` commands; no names or birth dates anywhere; keyed pseudonyms."""

from __future__ import annotations

import csv
import datetime as dt
import sqlite3
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import load_config
from pipeline.ingest.index import index_export
from pipeline.ingest.pseudonym import Pseudonymiser, mapping_csv_path, pseudonym, pseudonymise_run
from pipeline.longitudinal.timeline import Procedure
from pipeline.outputs.contract import study_dir
from tests.dicom_factory import SeriesSpec, write_series

NAME, BIRTH = "Doe^Jane", "19610203"


def _export(root: Path, patient: str = "HOSP-0042", with_post: bool = True) -> str:
    study = generate_uid()
    common = dict(patient_id=patient, study_uid=study, volume=np.full((6, 8, 8), 200.0),
                  extra={"PatientName": NAME, "PatientBirthDate": BIRTH})
    write_series(SeriesSpec(series_description="t1_vibe_fs_tra_pre", series_number=2, **common), root / "pre")
    write_series(SeriesSpec(series_description="t2_tse_tra", series_number=5, echo_time=90.0, **common), root / "t2")
    if with_post:
        write_series(SeriesSpec(series_description="t1_vibe_fs_tra_post", series_number=3, contrast_agent="Gd",
                                acquisition_time="102000", **common), root / "post")
    return study


def test_index_and_catalog_commands(tmp_path: Path) -> None:
    export = tmp_path / "export"
    _export(export)
    (export / "notes.txt").write_text("not dicom\n" * 5)
    cat = tmp_path / "cat.sqlite"
    runner = CliRunner()
    first = runner.invoke(app, ["index", str(export), "--catalogue", str(cat)])
    assert first.exit_code == 0, first.output
    assert "files read (new or changed)" in first.output and "not a DICOM file" in first.output
    again = runner.invoke(app, ["index", str(export), "--catalogue", str(cat)])
    lines = [line for line in again.output.splitlines() if "files read" in line]
    assert lines and lines[0].split()[-2] == "0", again.output  # nightly rerun reads nothing

    shown = runner.invoke(app, ["catalog", "--catalogue", str(cat)])
    assert shown.exit_code == 0, shown.output
    for text in ("HOSP-0042", "t1_vibe_fs_tra_post", "t1_post", "t1_pre", "t2", "0.95"):
        assert text in shown.output, text
    for output in (first.output, again.output, shown.output):
        assert NAME not in output and "Doe" not in output and BIRTH not in output

    missing = runner.invoke(app, ["catalog", "--catalogue", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 2 and "no catalogue at" in missing.output


def test_catalogue_holds_no_name_or_birth_date(tmp_path: Path) -> None:
    export = tmp_path / "export"
    _export(export)
    cat = tmp_path / "cat.sqlite"
    index_export(export, cat, load_config().ingest)
    con = sqlite3.connect(cat)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    dump = "\n".join(con.iterdump())
    con.close()
    assert "HOSP-0042" in dump  # the identifier is catalogued (the catalogue is the private side) ...
    assert NAME not in dump and "Doe" not in dump and BIRTH not in dump  # ... names and birth dates never


def test_pseudonyms_are_keyed_stable_and_stored(tmp_path: Path) -> None:
    export = tmp_path / "export"
    _export(export)
    _export(export / "b", patient="HOSP-0077")
    cat = tmp_path / "out" / "catalogue.sqlite"
    res = index_export(export, cat, load_config().ingest)
    sessions = {"HOSP-0042": [Procedure("HOSP-0042", dt.date(2024, 1, 1))]}
    key = tmp_path / "keys" / "pseudonym.key"
    pseudo, pseudo_sessions, _ = pseudonymise_run(res, sessions, cat, key)

    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    assert not list(cat.parent.glob("*.key"))  # the key is not beside the mapping
    ids = sorted({s.patient_id for s in pseudo.studies})
    assert all(i.startswith("PSN-") and len(i) == 20 for i in ids) and len(ids) == 2
    assert {s.patient_id for st in pseudo.studies for s in st.series} == set(ids)
    assert all(e.patient_id in ("", *ids) for e in pseudo.errors)
    p42 = pseudonym(bytes.fromhex(key.read_text().strip()), "HOSP-0042")
    assert list(pseudo_sessions) == [p42] and pseudo_sessions[p42][0].patient_id == p42
    st42 = next(s for s in pseudo.studies if s.patient_id == p42)
    assert study_dir(tmp_path / "out", st42).parts[-2] == p42  # the <patient> folder is the pseudonym

    # Stable across runs (same key), different with another key, mapping kept beside the catalogue.
    again, _, _ = pseudonymise_run(index_export(export, cat, load_config().ingest), None, cat, key)
    assert sorted({s.patient_id for s in again.studies}) == ids
    assert pseudonym(b"another key of at least 32 bytes!!", "HOSP-0042") != p42
    with open(mapping_csv_path(cat)) as f:
        rows = list(csv.DictReader(f))
    assert {r["patient_id"]: r["pseudonym"] for r in rows}["HOSP-0042"] == p42
    assert dict(sqlite3.connect(cat).execute("SELECT patient_id, pseudonym FROM pseudonyms"))["HOSP-0077"] in ids
    assert Pseudonymiser(cat, key)("HOSP-0042") == p42


# The real flow with pseudonymisation on: tests/test_messy_export.py::test_outputs_carry_only_pseudonyms.
