"""Series defects found from the headers at ingest (each with its precise reason, the rest of
the study still used), stacks split, role rules from YAML with confidence and ambiguity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.core.config import IngestConfig, load_config
from pipeline.core.records import SeriesRecord, SeriesRole, StudyRecord
from pipeline.ingest.index import index_export
from pipeline.ingest.role_rules import RoleRulesError, load_role_rules
from pipeline.ingest.series_roles import SeriesHeaders, assign_roles
from pipeline.longitudinal.classify import classify_patient
from pipeline.longitudinal.timeline import build_patient_timeline
from tests.dicom_factory import SeriesSpec, rotation, write_series
from tests.helpers import classify_sections, imaging


@pytest.fixture(scope="module")
def cfg() -> IngestConfig:
    return load_config().ingest


def _vol(n: int = 8, rows: int = 8) -> np.ndarray:
    return np.full((n, rows, 8), 300.0)


def _study(root: Path, study: str, posts: dict[str, dict], pre: dict | None = None) -> None:
    common = dict(patient_id="P9", study_uid=study, volume=_vol(), spacing=(1, 1, 3.0))
    write_series(SeriesSpec(series_description="t1_vibe_fs_tra_pre", series_number=3,
                            acquisition_time="100000", **{**common, **(pre or {})}), root / "pre")
    for n, (desc, extra) in enumerate(posts.items(), start=4):
        kw = {**common, "series_description": desc, "series_number": n, "contrast_agent": "Gd",
              "acquisition_time": f"1003{n:02d}"}
        skip = extra.pop("skip_slices", ())
        write_series(SeriesSpec(**{**kw, **extra}), root / desc, skip_slices=skip)


def _by_desc(res, study: str) -> dict[str, SeriesRecord]:
    st = next(s for s in res.studies if s.study_instance_uid == study)
    return {s.series_description: s for s in st.series}


def test_geometry_defects_each_reported_and_the_study_still_used(tmp_path: Path, cfg: IngestConfig) -> None:
    export = tmp_path / "export"
    study = generate_uid()
    _study(export, study, {
        "t1_post_missing": {"skip_slices": (3,)},
        "t1_post_good": {},
    })
    # non-uniform spacing: one slice moved 1 mm along the normal
    _study(export / "b", study2 := generate_uid(), {"t1_post_nonuniform": {}, "t1_post_ok": {}})
    f = sorted((export / "b" / "t1_post_nonuniform").iterdir())[4]
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient = [0, 0, float(ds.ImagePositionPatient[2]) + 1.0]
    ds.save_as(f)
    # mixed orientation and mixed matrix in the pre-contrast series of two more studies
    _study(export / "c", study3 := generate_uid(), {"t1_post": {}})
    g = sorted((export / "c" / "pre").iterdir())[2]
    ds = pydicom.dcmread(g)
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*rotation(rx_deg=30)[:, 0], *rotation(rx_deg=30)[:, 1])]
    ds.save_as(g)
    _study(export / "d", study4 := generate_uid(), {"t1_post": {}})
    h = sorted((export / "d" / "pre").iterdir())[5]
    ds = pydicom.dcmread(h)
    ds.Rows = 4
    ds.PixelData = ds.PixelData[: 4 * 8 * 2]
    ds.save_as(h)

    res = index_export(export, tmp_path / "cat.db", cfg)
    geo = {(e.study_instance_uid, e.series_instance_uid): e.reason for e in res.errors if e.stage == "series_geometry"}

    roles = _by_desc(res, study)
    missing = roles["t1_post_missing"]
    assert missing.role == SeriesRole.OTHER and "unusable as t1_post" in missing.role_reason
    reason = geo[(study, missing.series_instance_uid)]
    assert "missing slice(s): gap of 6.00 mm" in reason and "1 slice(s) missing in all" in reason
    assert [s.series_description for s in roles.values() if s.role == SeriesRole.T1_POST] == ["t1_post_good"]
    assert roles["t1_post_good"].phase_index == 1  # the study is still assessed with the good phase

    roles2 = _by_desc(res, study2)
    assert "non-uniform slice spacing: gap of 4.000 mm" in geo[(study2, roles2["t1_post_nonuniform"].series_instance_uid)]
    assert roles2["t1_post_ok"].role == SeriesRole.T1_POST

    pre3 = _by_desc(res, study3)["t1_vibe_fs_tra_pre"]
    assert "mixed orientations: 2 different ImageOrientationPatient values" in geo[(study3, pre3.series_instance_uid)]
    pre4 = _by_desc(res, study4)["t1_vibe_fs_tra_pre"]
    assert "mixed matrix sizes" in geo[(study4, pre4.series_instance_uid)] and "is 4x8" in geo[(study4, pre4.series_instance_uid)]


def test_multi_echo_series_is_split_into_stacks(tmp_path: Path, cfg: IngestConfig) -> None:
    """Two echoes written under one SeriesInstanceUID at the same positions: split by
    EchoTime into two series; the split is reported; a plain duplicate stays one series."""
    export = tmp_path / "export"
    study, series = generate_uid(), generate_uid()
    for te, folder in ((2.4, "e1"), (4.8, "e2")):
        write_series(SeriesSpec(volume=_vol(), patient_id="P9", study_uid=study, series_uid=series, echo_time=te,
                                series_description="t1_vibe_dixon_tra_post", contrast_agent="Gd",
                                series_number=7), export / folder)
    res = index_export(export, tmp_path / "cat.db", cfg)
    st = res.studies[0]
    assert sorted(s.series_instance_uid for s in st.series) == [f"{series}#EchoTime=2.4", f"{series}#EchoTime=4.8"]
    assert all(len(s.files) == 8 for s in st.series)
    assert sorted(s.series_description for s in st.series) == [
        "t1_vibe_dixon_tra_post [EchoTime 2.4]", "t1_vibe_dixon_tra_post [EchoTime 4.8]"]
    (split,) = [e for e in res.errors if e.reason.startswith("several stacks")]
    assert split.reason == ("several stacks in one series: 2 stacks by EchoTime: 2.4 (8 slices), "
                            "4.8 (8 slices); split into 2 series")
    assert split.series_instance_uid == series

    # Same positions, nothing tells the copies apart: duplicate positions, one unusable series.
    export2 = tmp_path / "export2"
    study2, series2 = generate_uid(), generate_uid()
    for folder in ("a", "b"):
        write_series(SeriesSpec(volume=_vol(), patient_id="P9", study_uid=study2, series_uid=series2,
                                series_description="t1_post", contrast_agent="Gd"), export2 / folder)
    res2 = index_export(export2, tmp_path / "cat2.db", cfg)
    (only,) = res2.studies[0].series
    assert only.role == SeriesRole.OTHER and "duplicate slice positions: 8 pair(s)" in only.role_reason


# --------------------------------------------------------------------------- role rules
def _headers(series: list[dict]) -> tuple[StudyRecord, dict[str, SeriesHeaders]]:
    study = StudyRecord("P", "1.2.3", dt.date(2024, 5, 1), "")
    headers = {}
    for i, kw in enumerate(series, start=1):
        uid = f"1.2.3.{i}"
        kw = {"series_number": i, "n_files": 40, "iop": (1, 0, 0, 0, 1, 0), "rows": 256, "columns": 256,
              "echo_time_ms": 2.0, "repetition_time_ms": 5.0, **kw}
        headers[uid] = SeriesHeaders(series_instance_uid=uid, **kw)
        study.series.append(SeriesRecord("P", "1.2.3", uid, kw["series_number"], kw["series_description"], "MR",
                                         kw.get("manufacturer", ""), [Path(f"/x/{i}/a")]))
    return study, headers


def test_confidence_per_assignment(cfg: IngestConfig) -> None:
    study, headers = _headers([
        {"series_description": "t1_vibe_fs_tra_pre", "acquisition_time": "100000"},
        {"series_description": "t1_vibe_fs_tra_post", "acquisition_time": "100200", "contrast_agent": "Gd"},
        {"series_description": "t2_tse_tra", "echo_time_ms": 90.0},
        {"series_description": "ep2d_diff_b800", "image_type": ("ORIGINAL", "PRIMARY", "DIFFUSION")},
        {"series_description": "ep2d_diff_b800_ADC", "image_type": ("DERIVED", "PRIMARY", "ADC")},
    ])
    assert assign_roles(study, headers, cfg) == []
    got = {s.series_description: s for s in study.series}
    rules = load_role_rules(cfg.series_roles_file)
    assert got["t1_vibe_fs_tra_pre"].role_confidence == rules.confidence["whole_word"]
    assert got["t1_vibe_fs_tra_post"].role_confidence == rules.confidence["tag"]
    assert got["t2_tse_tra"].role_confidence == rules.confidence["tag"]
    assert got["ep2d_diff_b800"].role == SeriesRole.DWI
    assert got["ep2d_diff_b800_ADC"].role == SeriesRole.ADC
    assert study.flags == []


def test_ambiguous_roles_flag_reaches_the_decision(cfg: IngestConfig) -> None:
    """A T1 series with no agent and no pre keyword is pre only by elimination (low
    confidence), and two post phases without any time: flagged, candidates listed, and the
    flag makes the study's decision flagged even when the category is benign."""
    study, headers = _headers([
        {"series_description": "t1_fl3d_tra"},
        {"series_description": "t1_fl3d_tra +c", "contrast_agent": "Gd"},
        {"series_description": "t1_fl3d_tra +c", "contrast_agent": "Gd"},
    ])
    assign_roles(study, headers, cfg)
    (flag,) = study.flags
    assert flag.startswith("series_roles_ambiguous: pre-contrast series 1 't1_fl3d_tra' (0.50) below 0.6")
    assert "post phases ordered by SeriesNumber only" in flag
    assert "series 2 't1_fl3d_tra +c' (0.95), series 3 't1_fl3d_tra +c' (0.95)" in flag

    rules = load_config().rules
    entries = build_patient_timeline([study], None, {study.study_instance_uid: True}, rules)
    assert flag in entries[0].flags
    decision = classify_patient(entries, {study.study_instance_uid: imaging(30.0)},
                                *classify_sections(load_config()))[
        study.study_instance_uid]
    assert decision.category.value == "complete_ablation"
    assert decision.flagged and flag in decision.flag_reasons


def test_site_rules_extend_the_default(tmp_path: Path, cfg: IngestConfig) -> None:
    """A site file with `extends: default` adds a keyword without code; errors name the file."""
    study, headers = _headers([
        {"series_description": "KM-nativ t1", "acquisition_time": "100000"},
        {"series_description": "KM-spaet t1", "acquisition_time": "100500"},  # German 'late'
    ])
    assign_roles(study, headers, cfg)
    assert study.series[1].role != SeriesRole.T1_POST
    site = tmp_path / "site_roles.yaml"
    site.write_text("extends: default\nkeywords:\n  post_contrast: [spaet]\n")
    study, headers = _headers([
        {"series_description": "KM-nativ t1", "acquisition_time": "100000"},
        {"series_description": "KM-spaet t1", "acquisition_time": "100500"},
    ])
    assign_roles(study, headers, cfg.model_copy(update={"series_roles_file": str(site)}))
    assert [s.role for s in study.series] == [SeriesRole.T1_PRE, SeriesRole.T1_POST]
    assert "keyword 'spaet'" in study.series[1].role_reason

    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: default\nkeywords:\n  postcontrast: [x]\n")
    with pytest.raises(RoleRulesError, match=r"bad.yaml: unknown keyword kind\(s\) \['postcontrast'\]"):
        load_role_rules(str(bad))


@pytest.mark.parametrize("manufacturer, description, role", [
    ("SIEMENS", "t1_fl3d_tra_fs_post", SeriesRole.T1_POST),
    ("GE MEDICAL SYSTEMS", "Ax 3D SPGR c+", SeriesRole.T1_POST),
    ("Philips Medical Systems", "T1W_FFE pre", SeriesRole.T1_PRE),
    ("CANON_MEC", "T2 FASE tra", SeriesRole.T2),
    ("SIEMENS", "localizer_haste", SeriesRole.LOCALIZER),
])
def test_vendor_keywords(manufacturer: str, description: str, role: SeriesRole, cfg: IngestConfig) -> None:
    study, headers = _headers([{"series_description": description, "manufacturer": manufacturer,
                                "echo_time_ms": None, "repetition_time_ms": None}])
    assign_roles(study, headers, cfg)
    assert study.series[0].role == role, study.series[0].role_reason
