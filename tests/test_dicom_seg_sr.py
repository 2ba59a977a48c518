"""DICOM SEG and SR (TID 1500) outputs: geometry round trips, content, validation, the flow's files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.core.config import load_config
from pipeline.core.records import AssessmentRecord, Category, Changes, Decision, SeriesRecord, SeriesRole, StudyRecord
from pipeline.imaging.volumes import load_series
from pipeline.outputs.contract import read_assessment
from pipeline.outputs.dicom import SEG_NAME, SR_NAME, write_study_dicom
from pipeline.outputs.dicom_seg import (
    SEGMENTS,
    SegmentationGeometryError,
    build_segmentation,
    labels_from_segmentation,
    read_source_datasets,
    slice_index_of_frames,
    tracking_uid,
    write_segmentation,
)
from pipeline.outputs.dicom_sr import CATEGORY_CODES, LOCAL_SCHEME, build_measurement_report, write_report_sr
from tests.dicom_factory import SeriesSpec, rotation, write_series
from tests.helpers import imaging

PATIENT = "P-SEG"


# --------------------------------------------------------------------------- builders
def _series(tmp: Path, direction: np.ndarray, shape=(10, 24, 20), spacing=(0.9, 1.2, 2.5),
            origin=(12.0, -30.0, 45.0)) -> tuple[SeriesSpec, list[Path], sitk.Image]:
    vol = np.random.default_rng(3).uniform(100, 400, shape)
    spec = SeriesSpec(volume=vol, origin=origin, spacing=spacing, direction=direction, patient_id=PATIENT,
                      series_description="t1 post", extra={"FrameOfReferenceUID": pydicom.uid.generate_uid()})
    files = write_series(spec, tmp / "post", shuffle_seed=7)
    files = [files[i] for i in np.random.default_rng(5).permutation(len(files))]  # list order != slice order
    record = SeriesRecord(PATIENT, spec.study_uid, spec.series_uid, 1, "t1 post", "MR", "X", files, SeriesRole.T1_POST)
    return spec, files, load_series(record)


def _labels_on(grid: sitk.Image, tmp: Path) -> tuple[np.ndarray, sitk.Image]:
    """An asymmetric label volume (1 AZ, 2 rim, 3 focus) on ``grid``, through labels.nii.gz."""
    nz, ny, nx = grid.GetSize()[::-1]
    lab = np.zeros((nz, ny, nx), np.uint8)
    lab[2:7, 5:15, 4:12] = 1
    lab[2:7, 5:15, 12:14] = 2
    lab[2:8, 15:16, 4:14] = 2
    lab[4, 10:13, 13:16] = 3  # one slice only: a flipped slice axis would move it
    image = sitk.GetImageFromArray(lab)
    image.CopyInformation(grid)
    sitk.WriteImage(image, str(tmp / "labels.nii.gz"))  # the pipeline's file, float32 geometry
    return lab, sitk.ReadImage(str(tmp / "labels.nii.gz"))


def _round_trip(tmp: Path, direction: np.ndarray) -> None:
    spec, files, grid = _series(tmp, direction)
    lab, labels = _labels_on(grid, tmp)
    seg = build_segmentation(read_source_datasets(files), labels, PATIENT, 1)
    write_segmentation(tmp / "seg.dcm", seg)
    back = pydicom.dcmread(tmp / "seg.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and back.SegmentationType == "BINARY"
    np.testing.assert_array_equal(labels_from_segmentation(back, labels), lab)

    # Each frame references the source slice at its own position (not the file order).
    ipp_by_sop = {str(ds.SOPInstanceUID): np.array(ds.ImagePositionPatient, float)
                  for ds in map(pydicom.dcmread, files)}
    frames = pydicom.dcmread(tmp / "seg.dcm").PerFrameFunctionalGroupsSequence
    assert len(frames) == sum(int((lab[k] == v).any()) for k in range(lab.shape[0]) for v in (1, 2, 3))
    for frame in frames:
        sop = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float),
                                   ipp_by_sop[sop], atol=1e-3)
    # Segments: one per label, coded, tracked by patient + session.
    descriptions = {int(d.SegmentNumber): d for d in back.SegmentSequence}
    assert sorted(descriptions) == [1, 2, 3]
    for spec_ in SEGMENTS:
        d = descriptions[spec_.label_value]
        assert d.SegmentLabel == spec_.label
        assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == spec_.property_type.value
        assert d.TrackingUID == tracking_uid(PATIENT, 1, spec_.tracking_name)


def test_seg_round_trip_oblique(tmp_path: Path) -> None:
    _round_trip(tmp_path, rotation(20.0, -15.0, 30.0))


def test_seg_round_trip_negated_axes(tmp_path: Path) -> None:
    """Column cosine negated and slices written against r x c (the loader reverses them)."""
    r, c = np.array([1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])
    _round_trip(tmp_path, np.column_stack([r, c, -np.cross(r, c)]))


def test_seg_round_trip_enhanced_multiframe_source(tmp_path: Path) -> None:
    """One Enhanced MR file whose frames are stored in shuffled slice order (per-frame positions)."""
    from phantom.enhanced import to_enhanced

    spec, files, grid = _series(tmp_path, rotation(-12.0, 8.0, 25.0))
    lab, labels = _labels_on(grid, tmp_path)
    enhanced = to_enhanced([pydicom.dcmread(f) for f in files], pydicom.uid.generate_uid())
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    source = read_source_datasets([tmp_path / "enhanced.dcm"])
    ks = slice_index_of_frames(source, labels)
    assert sorted(ks) == list(range(lab.shape[0])) and ks != sorted(ks)
    seg = build_segmentation(source, labels, PATIENT, 1)
    write_segmentation(tmp_path / "seg.dcm", seg)
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    np.testing.assert_array_equal(labels_from_segmentation(back, labels), lab)
    for frame in back.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        k = ks[int(ref.ReferencedFrameNumber) - 1]
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   grid.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-3)


def test_seg_rejects_a_label_grid_that_is_not_the_source_grid(tmp_path: Path) -> None:
    _, files, grid = _series(tmp_path, rotation(0.0, 10.0, 0.0))
    _, labels = _labels_on(grid, tmp_path)
    source = read_source_datasets(files)
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(np.array(labels.GetOrigin()) + np.array(labels.GetDirection()).reshape(3, 3)[:, 0] * 0.4))
    with pytest.raises(SegmentationGeometryError, match="not on a slice"):
        slice_index_of_frames(source, shifted)
    flipped = sitk.Image(labels)
    d = np.array(labels.GetDirection()).reshape(3, 3)
    flipped.SetDirection(np.column_stack([-d[:, 0], d[:, 1], -d[:, 2]]).ravel().tolist())
    with pytest.raises(SegmentationGeometryError, match="orientation"):
        slice_index_of_frames(source, flipped)


# --------------------------------------------------------------------------- SR
def _record(study_uid: str, category: Category = Category.NO_EVIDENCE_OF_LTP, session: int = 1,
            long_mm: float | None = 30.0, rule_id: str = "R2-no-suspicious-focus") -> AssessmentRecord:
    return AssessmentRecord(
        patient_id=PATIENT, study_instance_uid=study_uid, study_date="2024-06-01", timepoint="follow_up",
        session=session, ablation_date="2024-03-01", days_since_ablation=92, baseline_study_instance_uid="1.2.3",
        imaging=imaging(long_mm), decision=Decision(
            category=category, rule_id=rule_id, rule="no suspicious focus <and> no growth", confidence=0.9,
            flagged=False, changes=Changes(long_axis_change_pct=-12.5, short_axis_change_pct=-8.0,
                                           volume_change_pct=-30.25)))


def _content_items(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    items, stack = [], list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        items.append(item)
        stack.extend(item.get("ContentSequence", []))
    return items


def test_sr_measurements_tracking_and_seg_reference(tmp_path: Path) -> None:
    spec, files, grid = _series(tmp_path, rotation(5.0, 0.0, -10.0))
    _, labels = _labels_on(grid, tmp_path)
    source = read_source_datasets(files)
    seg = build_segmentation(source, labels, PATIENT, 1)
    record = _record(spec.study_uid)
    write_report_sr(tmp_path / "sr.dcm", build_measurement_report(record, source, seg))

    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert sr.PatientID == PATIENT and sr.StudyInstanceUID == spec.study_uid
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.tracking_uid == tracking_uid(PATIENT, 1, "ablation_zone")
    measured = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    az = record.imaging.ablation_zone
    assert measured["Long axis"] == (pytest.approx(az.long_axis_mm), "mm")
    assert measured["Short axis"] == (pytest.approx(az.short_axis_mm), "mm")
    assert measured["Volume"] == (pytest.approx(round(az.volume_ml, 3)), "ml")
    assert measured["Long axis change from baseline"] == (pytest.approx(-12.5), "%")
    assert measured["Volume change from baseline"] == (pytest.approx(-30.25), "%")
    # The ROI is segment 1 (ablation zone) of this SEG.
    referenced = group.referenced_segment
    assert referenced[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert int(referenced[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) == 1
    codes_found = {(i.ConceptNameCodeSequence[0].CodeMeaning, i.ConceptCodeSequence[0].CodeValue)
                   for i in _content_items(sr) if i.ValueType == "CODE"}
    assert ("IWG-IGTA response category", CATEGORY_CODES["no_evidence_of_ltp"].value) in codes_found
    assert ("Finding", "NOFOCUS") in codes_found
    texts = [i.TextValue for i in _content_items(sr) if i.ValueType == "TEXT"]
    assert any("R2-no-suspicious-focus" in t for t in texts)
    assert LOCAL_SCHEME in {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}
    # The SEG is part of the evidence (a PACS can fetch it from the SR).
    evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_tracking_uid_stable_within_a_session_only() -> None:
    assert tracking_uid("P1", 1, "ablation_zone") == tracking_uid("P1", 1, "ablation_zone")
    assert tracking_uid("P1", 1, "ablation_zone") != tracking_uid("P1", 2, "ablation_zone")
    assert tracking_uid("P1", 1, "ablation_zone") != tracking_uid("P2", 1, "ablation_zone")
    assert tracking_uid("P1", 1, "ablation_zone") != tracking_uid("P1", 1, "rim")
    pydicom.uid.UID(tracking_uid("P1", 1, "ablation_zone")).is_valid  # noqa: B018 - must not raise


def test_indeterminate_study_gets_a_category_only_sr(tmp_path: Path) -> None:
    spec, files, _ = _series(tmp_path, np.eye(3))
    record = _record(spec.study_uid, Category.INDETERMINATE, long_mm=None, rule_id="R5-not-evaluable")
    record.imaging.ok = False
    sr = build_measurement_report(record, read_source_datasets(files), None)
    write_report_sr(tmp_path / "sr.dcm", sr)
    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert back.content.get_volumetric_roi_measurement_groups() == []
    values = {i.ConceptCodeSequence[0].CodeValue for i in _content_items(back) if i.ValueType == "CODE"}
    assert {"INDET", "NOTEVAL"} <= values
    assert not [i for i in _content_items(back) if i.ValueType == "NUM"]


def test_write_study_dicom_reports_failures_without_raising(tmp_path: Path) -> None:
    """A label grid that does not match the source: no SEG, a dicom_seg error row, the SR still written."""
    spec, files, grid = _series(tmp_path, np.eye(3))
    _, labels = _labels_on(grid, tmp_path)
    bad = sitk.Image(labels)
    bad.SetOrigin(tuple(np.array(labels.GetOrigin()) + [0.5, 0.0, 0.0]))
    study = StudyRecord(PATIENT, spec.study_uid, None, "MR", [
        SeriesRecord(PATIENT, spec.study_uid, spec.series_uid, 1, "t1 post", "MR", "X", files, SeriesRole.T1_POST)])
    record = _record(spec.study_uid)
    record.imaging.series_used = {"t1_post": spec.series_uid}
    folder = tmp_path / "study"
    (folder).mkdir()
    (folder / SEG_NAME).write_bytes(b"stale")  # from an earlier run: must not survive
    written, errors = write_study_dicom(record, study, lambda: bad, folder, load_config().outputs)
    assert written == [SR_NAME]
    assert [e.stage for e in errors] == ["dicom_seg"] and "not on a slice" in errors[0].reason
    assert not (folder / SEG_NAME).exists() and (folder / SR_NAME).is_file()
    written, errors = write_study_dicom(record, study, lambda: labels, folder, load_config().outputs)
    assert written == [SEG_NAME, SR_NAME] and errors == []
    # The switches of configs/default.yaml outputs: (a file not written now is not left over).
    no_seg = load_config().outputs.model_copy(update={"write_dicom_seg": False})
    assert write_study_dicom(record, study, lambda: labels, folder, no_seg) == ([SR_NAME], [])
    assert not (folder / SEG_NAME).exists()
    sr_without_roi = hd.sr.srread(folder / SR_NAME)
    assert sr_without_roi.content.get_volumetric_roi_measurement_groups() == []
    none = no_seg.model_copy(update={"write_dicom_sr": False})
    assert write_study_dicom(record, study, lambda: labels, folder, none) == ([], [])
    assert not (folder / SR_NAME).exists()


def test_pseudonymised_run_writes_no_source_identity(tmp_path: Path) -> None:
    """With pseudonyms in the records, SEG and SR carry the pseudonym and none of the files' identity."""
    spec, files, grid = _series(tmp_path, rotation(0.0, 0.0, 15.0))
    for path in files:  # identity a PACS export carries
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientBirthDate, ds.AccessionNumber = "Doe^Jane", "19600101", "ACC123"
        ds.InstitutionName, ds.ReferringPhysicianName = "General Hospital", "House^Gregory"
        ds.save_as(path)
    _, labels = _labels_on(grid, tmp_path)
    study = StudyRecord("PSN-0123456789ABCDEF", spec.study_uid, None, "MR", [
        SeriesRecord("PSN-0123456789ABCDEF", spec.study_uid, spec.series_uid, 1, "t1 post", "MR", "X", files,
                     SeriesRole.T1_POST)])
    record = _record(spec.study_uid).model_copy(update={"patient_id": "PSN-0123456789ABCDEF"})
    record.imaging.series_used = {"t1_post": spec.series_uid}
    written, errors = write_study_dicom(record, study, lambda: labels, tmp_path, load_config().outputs)
    assert written == [SEG_NAME, SR_NAME] and errors == []
    for name in written:
        raw = (tmp_path / name).read_bytes()
        for identity in (PATIENT.encode(), b"Doe^Jane", b"19600101", b"ACC123", b"General Hospital", b"House"):
            assert identity not in raw, (name, identity)
        ds = pydicom.dcmread(tmp_path / name)
        assert ds.PatientID == "PSN-0123456789ABCDEF" and ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID == spec.study_uid  # still filed with its study
    # Without pseudonyms the objects keep their source's identity (what a PACS files them by).
    plain = _record(spec.study_uid)
    plain.imaging.series_used = {"t1_post": spec.series_uid}
    write_study_dicom(plain, study, lambda: labels, tmp_path, load_config().outputs)
    assert pydicom.dcmread(tmp_path / SEG_NAME).PatientName == "Doe^Jane"
    assert "PatientIdentityRemoved" not in pydicom.dcmread(tmp_path / SR_NAME)


# --------------------------------------------------------------------------- validator
DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed: "
                    "`apt-get install dicom3tools` (.ci/run installs it)")
def test_dciodvfy_finds_no_error_in_seg_and_sr(tmp_path: Path) -> None:
    spec, files, grid = _series(tmp_path, rotation(20.0, -15.0, 30.0))
    _, labels = _labels_on(grid, tmp_path)
    source = read_source_datasets(files)
    seg = build_segmentation(source, labels, PATIENT, 1)
    write_segmentation(tmp_path / "seg.dcm", seg)
    write_report_sr(tmp_path / "sr.dcm", build_measurement_report(_record(spec.study_uid), source, seg))
    # The category-only SR of an indeterminate study and a SEG of an Enhanced MR source too.
    indeterminate = _record(spec.study_uid, Category.INDETERMINATE, long_mm=None, rule_id="R5-not-evaluable")
    write_report_sr(tmp_path / "sr_indeterminate.dcm", build_measurement_report(indeterminate, source, None))
    from phantom.enhanced import to_enhanced

    enhanced = to_enhanced([pydicom.dcmread(f) for f in files], pydicom.uid.generate_uid())
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    write_segmentation(tmp_path / "seg_enhanced.dcm",
                       build_segmentation(read_source_datasets([tmp_path / "enhanced.dcm"]), labels, PATIENT, 1))
    for name, iod in (("seg.dcm", "Segmentation"), ("sr.dcm", "Comprehensive3DSR"),
                      ("sr_indeterminate.dcm", "Comprehensive3DSR"), ("seg_enhanced.dcm", "Segmentation")):
        out = subprocess.run([DCIODVFY, str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        report = out.stdout + out.stderr
        assert iod in report, report
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], f"{name}: {errors}"


# --------------------------------------------------------------------------- the flow's outputs
@pytest.mark.slow
def test_flow_wrote_seg_and_sr_for_each_assessed_study(assessed_run) -> None:
    _, out, _, _ = assessed_run
    records = [(p.parent, read_assessment(p)) for p in sorted((out / "patients").glob("*/*/assessment.json"))]
    assert records
    tracking: dict[tuple[str, int | None], set[str]] = {}
    n_seg = 0
    for folder, record in records:
        assert not [e for e in record.errors if e["stage"] in {"dicom_seg", "dicom_sr"}], record.errors
        if record.timepoint == "pre_ablation":
            assert not (folder / SR_NAME).exists()
            continue
        assert (folder / SR_NAME).is_file(), folder
        sr = hd.sr.srread(folder / SR_NAME)
        assert sr.StudyInstanceUID == record.study_instance_uid
        category = {i.ConceptCodeSequence[0].CodeValue for i in _content_items(sr) if i.ValueType == "CODE"}
        assert CATEGORY_CODES[record.decision.category.value].value in category
        labels_path = folder / "labels.nii.gz"
        labelled = labels_path.exists() and sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))).any()
        if labelled:
            n_seg += 1
            labels = sitk.ReadImage(str(labels_path))
            seg = pydicom.dcmread(folder / SEG_NAME)
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == record.imaging.series_used["t1_post"]
            np.testing.assert_array_equal(labels_from_segmentation(seg, labels), sitk.GetArrayFromImage(labels))
            group = sr.content.get_volumetric_roi_measurement_groups()[0]
            assert group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
            tracking.setdefault((record.patient_id, record.session), set()).add(group.tracking_uid)
        else:
            assert not (folder / SEG_NAME).exists()
    assert n_seg >= 2
    # One tracking UID per patient and session, shared by all its studies.
    assert all(len(uids) == 1 for uids in tracking.values()), tracking
    assert len({u for uids in tracking.values() for u in uids}) == len(tracking)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["studies"] == len(records)


@pytest.mark.slow
def test_unchanged_rerun_writes_missing_seg_sr_and_report_only(assessed_run, tmp_path: Path) -> None:
    """Outputs of a run before SEG/SR existed (or deleted): the nightly rerun of an unchanged
    patient writes them, and leaves every other output as it was."""
    from flows.assess import run_assessment

    root, out, _, _ = assessed_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    study = sorted(copy.glob("patients/*/*/seg.dcm"))[0].parent
    patient = study.parent
    (study / SEG_NAME).unlink()
    (study / SR_NAME).unlink()
    (patient / "report.html").unlink()
    untouched = {p: p.stat().st_mtime_ns for p in copy.glob("patients/*/*/*") if p.suffix in {".json", ".dcm"}}
    summary = run_assessment(root / "data" / "export", copy, root / "data" / "procedures.csv", workers=1, device="cpu")
    assert summary["studies_reused"] == summary["studies"]
    assert (study / SEG_NAME).is_file() and (study / SR_NAME).is_file() and (patient / "report.html").is_file()
    labels = sitk.ReadImage(str(study / "labels.nii.gz"))
    np.testing.assert_array_equal(labels_from_segmentation(pydicom.dcmread(study / SEG_NAME), labels),
                                  sitk.GetArrayFromImage(labels))
    # The re-made objects are the same instances as before (deterministic UIDs).
    assert pydicom.dcmread(study / SEG_NAME).SOPInstanceUID == pydicom.dcmread(
        out / study.relative_to(copy) / SEG_NAME).SOPInstanceUID
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
