"""Invalid header values (issue 16): one bad slice never stops the batch.

A non-finite or absurd ImagePositionPatient, ImageOrientationPatient or PixelSpacing on one file
becomes a row of errors.csv naming the file and the tag; the file is left out of its series and
the study still reaches the assessment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from pipeline.core.config import load_config
from pipeline.core.records import SeriesRecord
from pipeline.imaging.volumes import load_series
from pipeline.ingest.index import index_export
from pipeline.ingest.series_geometry import SeriesGeometryError
from tests.dicom_factory import SeriesSpec, set_raw, write_series


def small_study(root: Path, patient: str = "P-HDR", study_uid: str | None = None,
                extra: dict | None = None) -> dict[str, list[Path]]:
    """One small MR study (pre, post, T2; 6 slices of 8x8) -> {series folder: files}.
    ``extra``: more attributes for every file (e.g. PatientName)."""
    common = dict(patient_id=patient, study_uid=study_uid or generate_uid(), volume=np.full((6, 8, 8), 200.0),
                  extra=dict(extra or {}))
    return {
        "pre": write_series(SeriesSpec(series_description="t1_vibe_fs_tra_pre", series_number=2, **common), root / "pre"),
        "post": write_series(SeriesSpec(series_description="t1_vibe_fs_tra_post", series_number=3,
                                        contrast_agent="Gd", acquisition_time="102000", **common), root / "post"),
        "t2": write_series(SeriesSpec(series_description="t2_tse_tra", series_number=5, echo_time=90.0, **common),
                           root / "t2"),
    }


BAD_VALUES = [
    ("ImagePositionPatient", "nan\\nan\\nan"),
    ("ImagePositionPatient", "inf\\0\\0"),
    ("ImagePositionPatient", "-inf\\0\\0"),
    ("ImagePositionPatient", "1e308\\1e308\\1e308"),
    ("ImagePositionPatient", "0\\nan\\4"),  # one component
    ("ImagePositionPatient", "0\\abc\\4"),
    ("ImageOrientationPatient", "nan\\0\\0\\0\\1\\0"),
    ("ImageOrientationPatient", "inf\\0\\0\\0\\1\\0"),
    ("PixelSpacing", "nan\\nan"),
    ("PixelSpacing", "1\\inf"),
    ("PixelSpacing", "0\\0"),
]


@pytest.mark.parametrize(("keyword", "text"), BAD_VALUES, ids=[f"{k}={t}" for k, t in BAD_VALUES])
@pytest.mark.parametrize("which", ["first", "middle"])
def test_a_bad_geometry_tag_is_a_file_error_not_a_batch_failure(tmp_path: Path, keyword: str, text: str,
                                                                  which: str) -> None:
    export = tmp_path / "export"
    files = small_study(export)
    # "first": the first file of the series by path (the one whose orientation stood for all).
    bad = sorted(files["post"])[0 if which == "first" else 3]
    set_raw(bad, keyword, text)
    res = index_export(export, tmp_path / "cat.sqlite", load_config().ingest)

    rows = [e for e in res.errors if Path(e.path) == bad]
    assert len(rows) == 1, res.errors
    assert keyword in rows[0].reason and "invalid geometry" in rows[0].reason
    (study,) = res.studies
    post = next(s for s in study.series if "post" in s.series_description)
    assert bad not in post.files and len(post.files) == 5


@pytest.mark.parametrize(("keyword", "text"), [("ImagePositionPatient", "0\\nan\\4"), ("PixelSpacing", "nan\\nan"),
                                               ("ImageOrientationPatient", "nan\\0\\0\\0\\1\\0"),
                                               ("ImagePositionPatient", "1e308\\0\\0"),
                                               ("RescaleSlope", "nan"), ("RescaleIntercept", "inf")])
def test_reading_a_series_with_a_bad_value_names_the_file_and_the_tag(tmp_path: Path, keyword: str, text: str) -> None:
    files = write_series(SeriesSpec(volume=np.full((4, 8, 8), 100.0)), tmp_path / "s")
    set_raw(files[2], keyword, text)
    series = SeriesRecord("P", "1.2", "1.2.3", 1, "t1", "MR", "", files)
    with pytest.raises(SeriesGeometryError) as caught:
        load_series(series)
    assert files[2].name in str(caught.value) and keyword in str(caught.value)


@pytest.mark.parametrize(("keyword", "text"), [("InstanceNumber", "inf"), ("InstanceNumber", "99999999999999999999"),
                                               ("SeriesNumber", "nan"), ("EchoTime", "nan"),
                                               ("EchoTime", "1e400"), ("RepetitionTime", "abc")])
def test_a_bad_numeric_tag_is_a_warning_row_and_the_file_is_kept(tmp_path: Path, keyword: str, text: str) -> None:
    export = tmp_path / "export"
    files = small_study(export)
    bad = sorted(files["post"])[2]
    set_raw(bad, keyword, text)
    res = index_export(export, tmp_path / "cat.sqlite", load_config().ingest)
    rows = [e for e in res.errors if Path(e.path) == bad]
    assert len(rows) == 1 and keyword in rows[0].reason and "ignored" in rows[0].reason, res.errors
    post = next(s for s in res.studies[0].series if "post" in s.series_description)
    assert bad in post.files


def test_a_study_whose_grouping_fails_is_still_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last line of defence: whatever a header does to the grouping, the study is listed
    (without series: assessed as indeterminate) and the reason is a row of errors.csv."""
    import pipeline.ingest.grouping as grouping

    export = tmp_path / "export"
    small_study(export / "a", patient="P-A")
    small_study(export / "b", patient="P-B")

    def broken(series_uid, files):
        if files[0]["patient_id"] == "P-B":
            raise ValueError("cannot convert float NaN to integer")
        return [(series_uid, "", files)], ""

    monkeypatch.setattr(grouping, "_split_stacks", broken)
    res = index_export(export, tmp_path / "cat.sqlite", load_config().ingest)
    by_patient = {s.patient_id: s for s in res.studies}
    assert set(by_patient) == {"P-A", "P-B"}
    assert len(by_patient["P-A"].series) == 3 and by_patient["P-B"].series == []
    (row,) = [e for e in res.errors if e.patient_id == "P-B"]
    assert "could not be grouped" in row.reason and "NaN" in row.reason


@pytest.mark.parametrize("bad_date", ["20231345", "20240501"])
def test_one_odd_study_date_neither_undates_nor_redates_the_study(tmp_path: Path, bad_date: str) -> None:
    export = tmp_path / "export"
    files = small_study(export)
    first = min(p for ps in files.values() for p in ps)  # the file the study's date was taken from
    set_raw(first, "StudyDate", bad_date)
    res = index_export(export, tmp_path / "cat.sqlite", load_config().ingest)
    (study,) = res.studies
    assert study.study_date is not None and study.study_date.isoformat() == "2024-01-02"
    (row,) = [e for e in res.errors if Path(e.path) == first]
    assert bad_date in row.reason and "17 of 18 files" in row.reason


def test_hidden_files_and_folders_are_reported(tmp_path: Path) -> None:
    export = tmp_path / "export"
    small_study(export / "s")
    (export / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (export / "s" / "._IM00000.dcm").write_bytes(b"\x00\x05\x16\x07")
    hidden_study = small_study(export / ".Trash" / "old")
    res = index_export(export, tmp_path / "cat.sqlite", load_config().ingest)
    rows = {Path(e.path).relative_to(export).as_posix(): e.reason for e in res.errors}
    assert rows == {".DS_Store": "hidden file skipped (name starts with '.')",
                    "s/._IM00000.dcm": "hidden file skipped (name starts with '.')",
                    ".Trash": "hidden folder skipped (name starts with '.')"}
    assert len(res.studies) == 1 and hidden_study["pre"][0] not in res.studies[0].series[0].files


def test_a_one_file_study_like_a_series_of_another_study_is_a_warning(tmp_path: Path) -> None:
    export = tmp_path / "export"
    files = small_study(export / "s")
    stray = files["post"][3]
    set_raw(stray, "StudyInstanceUID", generate_uid())  # one file exported with another study's UID
    res = index_export(export, tmp_path / "cat.sqlite", load_config().ingest)
    assert len(res.studies) == 2  # both listed: every study found appears in cohort.csv
    (row,) = [e for e in res.errors if e.reason.startswith("warning: a study of one file")]
    assert Path(row.path) == stray and "t1_vibe_fs_tra_post" in row.reason
