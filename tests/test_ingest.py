"""index_export on a messy export; incremental catalogue; series roles for four vendors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.core.config import IngestConfig, load_config
from pipeline.core.records import SeriesRecord, SeriesRole, StudyRecord
from pipeline.ingest import index as ingest
from pipeline.ingest.index import index_export
from pipeline.ingest.series_roles import SeriesHeaders, assign_roles
from pipeline.ingest.walk import find_first_dicom
from tests.dicom_factory import SeriesSpec, rotation, truncate, write_series, write_sr


@pytest.fixture(scope="module")
def cfg() -> IngestConfig:
    return load_config().ingest


def _vol(n: int = 6) -> np.ndarray:
    return np.full((n, 8, 8), 200.0)


def _siemens_study(root: Path, patient: str = "P001", date: str = "20240102") -> str:
    """pre, three post phases (series numbers out of time order), T2, localiser."""
    study = generate_uid()
    common = dict(patient_id=patient, study_uid=study, study_date=date, volume=_vol())
    write_series(SeriesSpec(series_description="localizer", series_number=1, **{**common, "volume": _vol(3)}),
                 root / patient / "loc")
    write_series(SeriesSpec(series_description="t2_tse_fs_tra", series_number=2, echo_time=90.0,
                            repetition_time=4000.0, **common), root / patient / "t2")
    write_series(SeriesSpec(series_description="t1_vibe_fs_tra_pre", series_number=3,
                            acquisition_time="100000", **common), root / patient / "pre", extension="")
    for number, (desc, t) in zip((6, 5, 4), [("t1_vibe_fs_tra_post_30s", "100230"),
                                             ("t1_vibe_fs_tra_post_70s", "100310"),
                                             ("t1_vibe_fs_tra_post_180s", "100500")]):
        write_series(SeriesSpec(series_description=desc, series_number=number, acquisition_time=t,
                                contrast_agent="Gadovist", **common), root / patient / f"s{number}")
    return study


def test_messy_export(tmp_path: Path, cfg: IngestConfig) -> None:
    export = tmp_path / "export"
    study = _siemens_study(export)
    (export / "junk").mkdir()
    (export / "junk" / "notes.txt").write_text("export log: 12 studies\n" * 20)
    (export / ".hidden").write_text("ignored")
    sr = write_sr(export / "junk" / "report.dcm", study_uid=study)
    bad_px = write_series(SeriesSpec(volume=np.zeros((4, 64, 64)), series_description="t1 broken"), export / "b1")
    truncate(bad_px[0], 0.5)  # header intact, pixel data cut short
    bad_hdr = write_series(SeriesSpec(volume=_vol(4), series_description="x"), export / "b2")
    truncate(bad_hdr[0], 0.2)  # cut inside the header
    write_series(SeriesSpec(volume=_vol(4), modality="CT", series_description="CT abdomen"),
                 export / "ct")
    # Old exports: no preamble, no file meta, implicit VR.
    raw = write_series(SeriesSpec(volume=_vol(4), series_description="t1 raw"), export / "raw")
    for f in raw:
        ds = pydicom.dcmread(f)
        ds.preamble = None
        del ds.file_meta
        pydicom.dcmwrite(f, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    (export / "empty").write_bytes(b"")

    res = index_export(export, tmp_path / "cat.db", cfg)
    reasons = {e.path: e.reason for e in res.errors}
    assert reasons[str(export / "junk" / "notes.txt")] == "not a DICOM file"
    assert reasons[str(sr)] == "non-image object (Basic Text SR Storage) skipped"
    assert reasons[str(bad_px[0])].startswith("truncated DICOM: pixel data has")
    assert reasons[str(bad_hdr[0])].startswith("truncated DICOM")
    assert reasons[str(export / ".hidden")] == "hidden file skipped (name starts with '.')"  # issue 16: said, not silent
    assert any(e.reason.startswith("non-MR study (modality CT)") for e in res.errors)
    assert reasons[str(export / "empty")] == "empty file (0 bytes)"
    assert not any(e.path.startswith(str(export / "raw")) for e in res.errors if e.stage == "ingest")
    raw_series = [s for st in res.studies for s in st.series if s.series_description == "t1 raw"]
    assert len(raw_series) == 1 and len(raw_series[0].files) == 4
    sr_err = next(e for e in res.errors if e.path == str(sr))
    assert sr_err.study_instance_uid == study  # the SR is traced to its study

    mr = [s for s in res.studies if s.study_instance_uid == study]
    assert len(mr) == 1
    st = mr[0]
    assert str(st.study_date) == "2024-01-02"
    roles = {s.series_description: s for s in st.series}
    assert roles["localizer"].role == SeriesRole.LOCALIZER
    assert roles["t2_tse_fs_tra"].role == SeriesRole.T2
    assert roles["t1_vibe_fs_tra_pre"].role == SeriesRole.T1_PRE
    posts = st.with_role(SeriesRole.T1_POST)
    assert [s.series_description for s in posts] == [
        "t1_vibe_fs_tra_post_30s", "t1_vibe_fs_tra_post_70s", "t1_vibe_fs_tra_post_180s"]
    assert [s.phase_index for s in posts] == [1, 2, 3]
    assert posts[0].contrast_agent == "Gadovist"
    assert all(len(s.files) == 6 for s in st.series if s.role not in (SeriesRole.OTHER, SeriesRole.LOCALIZER))
    assert res.n_files_seen == res.n_files_read  # first run reads everything


def test_incremental_catalogue(tmp_path: Path, cfg: IngestConfig) -> None:
    export = tmp_path / "export"
    _siemens_study(export)
    cat = tmp_path / "cat.db"
    first = index_export(export, cat, cfg)
    assert first.n_files_read == first.n_files_seen == 3 + 6 * 5

    again = index_export(export, cat, cfg)
    assert again.n_files_read == 0 and again.n_files_cached == first.n_files_seen
    assert [s.series_instance_uid for s in again.studies[0].series] == \
        [s.series_instance_uid for s in first.studies[0].series]

    touched = next((export / "P001" / "t2").iterdir())
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = index_export(export, cat, cfg)
    assert third.n_files_read == 1 and third.n_files_cached == first.n_files_seen - 1

    shutil.rmtree(export / "P001" / "loc")
    gone = sorted((export / "P001" / "t2").iterdir())[2]  # slice 2 of 6 (names follow slice order)
    gone.unlink()
    fourth = index_export(export, cat, cfg)
    assert fourth.n_files_read == 0 and fourth.n_files_removed == 4
    t2 = [s for s in fourth.studies[0].series if s.series_description == "t2_tse_fs_tra"][0]
    assert len(t2.files) == 5 and gone not in t2.files
    # A slice gone from inside the stack makes the series unusable (header geometry check).
    assert t2.role == SeriesRole.OTHER and "unusable as t2" in t2.role_reason and "missing slice(s)" in t2.role_reason


def test_recent_files_deferred(tmp_path: Path, cfg: IngestConfig) -> None:
    export = tmp_path / "export"
    study = _siemens_study(export)
    res = index_export(export, tmp_path / "cat.db", cfg.model_copy(update={"defer_recent_seconds": 3600}))
    assert res.n_deferred == res.n_files_seen and res.n_files_read == 0
    assert res.studies == [] and res.deferred_studies == [study]


# --------------------------------------------------------------------------- roles
def _study(series: list[dict]) -> tuple[StudyRecord, dict[str, SeriesHeaders]]:
    study = StudyRecord("P", "1.2.3", None, "")
    headers = {}
    for i, kw in enumerate(series, start=1):
        uid = f"1.2.3.{i}"
        kw = {"series_number": i, "n_files": 40, "iop": (1, 0, 0, 0, 1, 0), "rows": 256,
              "columns": 256, "echo_time_ms": 2.0, "repetition_time_ms": 5.0, **kw}
        headers[uid] = SeriesHeaders(series_instance_uid=uid, **kw)
        study.series.append(SeriesRecord("P", "1.2.3", uid, kw["series_number"],
                                         kw["series_description"], "MR", "", []))
    return study, headers


VENDORS = {
    "siemens": ["t1_vibe_fs_tra_pre", "t1_vibe_fs_tra_post_70s", "t1_vibe_fs_tra_post_180s",
                "t2_tse_fs_tra"],
    "ge": ["Ax LAVA-Flex PRE", "Ax LAVA-Flex +C ph2", "Ax LAVA-Flex +C ph3", "Ax T2 FRFSE FS"],
    "philips": ["THRIVE pre", "THRIVE +C dyn 3", "THRIVE +C dyn 4", "T2W_TSE_SPAIR"],
    "canon": ["T1 FS 3D pre", "T1 FS 3D post", "T1 FS 3D post delayed", "T2 FS FSE"],
}


@pytest.mark.parametrize("vendor", sorted(VENDORS))
@pytest.mark.parametrize("with_tags", [True, False])
def test_vendor_names(vendor: str, with_tags: bool, cfg: IngestConfig) -> None:
    """Roles from descriptions alone, and with tags (agent, TE) as scanners write them."""
    pre, post_a, post_b, t2 = VENDORS[vendor]
    agent = "Gd" if with_tags else ""
    study, headers = _study([
        {"series_description": "3-plane loc", "n_files": 3},
        {"series_description": "DWI b50 b800", "image_type": ("ORIGINAL", "PRIMARY", "DIFFUSION")},
        {"series_description": t2, "echo_time_ms": 85.0 if with_tags else None,
         "repetition_time_ms": 4000.0},
        {"series_description": pre, "acquisition_time": "100000"},
        # the later phase has the lower series number: order must come from the clock
        {"series_description": post_b, "acquisition_time": "100500", "contrast_agent": agent},
        {"series_description": post_a, "acquisition_time": "100200", "contrast_agent": agent},
    ])
    errors = assign_roles(study, headers, cfg)
    assert errors == []
    got = {s.series_description: s for s in study.series}
    assert got["3-plane loc"].role == SeriesRole.LOCALIZER
    assert got["DWI b50 b800"].role == SeriesRole.DWI
    assert got[t2].role == SeriesRole.T2, got[t2].role_reason
    assert got[pre].role == SeriesRole.T1_PRE, got[pre].role_reason
    assert got[post_a].role == got[post_b].role == SeriesRole.T1_POST
    assert (got[post_a].phase_index, got[post_b].phase_index) == (1, 2)
    assert "AcquisitionTime" in got[post_a].role_reason
    assert got[post_a].acquisition_time == "100200"
    if with_tags:
        assert "ContrastBolusAgent" in got[post_a].role_reason
        assert got[t2].echo_time_ms == 85.0


def test_subtraction_and_dynamic_mask(cfg: IngestConfig) -> None:
    study, headers = _study([
        {"series_description": "t1_vibe_fs_tra_dyn", "image_type": ("DERIVED", "PRIMARY", "M", "SUB"),
         "contrast_agent": "Gd"},
        # Philips dynamic: the mask phase carries the agent too, the description says pre
        {"series_description": "THRIVE pre", "contrast_agent": "Gd", "acquisition_time": "100000"},
        {"series_description": "THRIVE +C dyn 2", "contrast_agent": "Gd", "acquisition_time": "100100"},
    ])
    assign_roles(study, headers, cfg)
    roles = [s.role for s in study.series]
    assert roles == [SeriesRole.SUBTRACTION, SeriesRole.T1_PRE, SeriesRole.T1_POST]


def test_pre_candidate_choice(cfg: IngestConfig) -> None:
    """Two pre-contrast candidates: the one with the post geometry, acquired before, wins."""
    study, headers = _study([
        {"series_description": "t1_vibe_fs_cor_pre", "acquisition_time": "095500",
         "iop": (1, 0, 0, 0, 0, -1)},
        {"series_description": "t1_vibe_fs_tra_pre", "acquisition_time": "095000"},
        {"series_description": "t1_vibe_fs_tra_post", "acquisition_time": "100000",
         "contrast_agent": "Gd"},
        {"series_description": "t1_vibe_fs_tra_post_late", "acquisition_time": "101000",
         "contrast_agent": "Gd"},
    ])
    assign_roles(study, headers, cfg)
    cor, tra = study.series[0], study.series[1]
    assert tra.role == SeriesRole.T1_PRE and "same geometry" in tra.role_reason
    assert cor.role == SeriesRole.OTHER and "geometry differs" in cor.role_reason


def test_no_post_is_reported(cfg: IngestConfig) -> None:
    study, headers = _study([{"series_description": "t2_tse_tra", "echo_time_ms": 90.0}])
    errors = assign_roles(study, headers, cfg)
    assert len(errors) == 1 and "no T1 post-contrast" in errors[0].reason


def test_oblique_series_indexes_geometry(tmp_path: Path, cfg: IngestConfig) -> None:
    """Header fields reach SeriesHeaders (IOP, matrix) for the geometry comparison."""
    write_series(SeriesSpec(volume=_vol(), direction=rotation(rx_deg=20)), tmp_path / "e" / "a")
    res = index_export(tmp_path / "e", tmp_path / "c.db", cfg)
    (h,) = res.series_headers.values()
    assert h.rows == 8 and h.columns == 8 and h.n_files == 6
    assert h.iop is not None and h.iop[4] == pytest.approx(np.cos(np.deg2rad(20)))


def test_parallel_reading_matches_serial(tmp_path: Path, cfg: IngestConfig, monkeypatch) -> None:
    """Worker processes (used for large batches) give the same catalogue as one process."""
    export = tmp_path / "export"
    _siemens_study(export)
    serial = index_export(export, tmp_path / "a.db", cfg, workers=1)
    monkeypatch.setattr(ingest, "_PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(ingest, "_CHUNK", 4)
    parallel = index_export(export, tmp_path / "b.db", cfg, workers=2)
    assert parallel.n_files_read == serial.n_files_read
    assert [(s.series_instance_uid, s.role, s.phase_index, s.files) for s in parallel.studies[0].series] == \
        [(s.series_instance_uid, s.role, s.phase_index, s.files) for s in serial.studies[0].series]


def test_output_folder_inside_the_export_is_never_walked(tmp_path: Path, cfg: IngestConfig) -> None:
    """The flow's outputs (SEG/SR are DICOM) must never come back as inputs (issue 18)."""
    export = tmp_path / "export"
    _siemens_study(export)
    out = export / "results"
    write_sr(out / "patients" / "P001" / "sr.dcm")
    write_series(SeriesSpec(series_description="t1_vibe_fs_tra_pre", volume=_vol()), out / "copy")
    res = index_export(export, out / "catalogue.sqlite", cfg, skip_dirs=[out])
    assert res.n_files_seen == 3 + 6 * 5
    assert not any("results" in e.path for e in res.errors)
    assert find_first_dicom(out / "copy") is not None
    assert find_first_dicom(export, [export / "P001", out]) is None
