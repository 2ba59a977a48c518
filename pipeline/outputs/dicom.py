"""Write one study's seg.dcm and sr.dcm (just before its assessment.json), never losing the study.

Which objects a study gets (docs/dicom-outputs.md):
- ``pre_ablation`` studies: none (nothing is assessed);
- a study whose labels hold at least one labelled voxel: seg.dcm, and sr.dcm referencing it
  with the measurements;
- an assessed study without labels (``indeterminate``: no usable post-contrast, failed
  registration, no ablation zone): sr.dcm with the category, key finding and rule only, so that
  the archive holds the call for every assessed study; its evidence is the post-contrast series
  (or, without one, the study's first series).
Every failure becomes an :class:`ErrorRecord` with stage ``dicom_seg`` or ``dicom_sr``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.core.config import OutputsConfig
from pipeline.core.records import AssessmentRecord, ErrorRecord, StudyRecord
from pipeline.outputs.dicom_seg import (
    build_segmentation,
    mark_identity_removed,
    read_source_datasets,
    with_patient_identity,
    write_segmentation,
)
from pipeline.outputs.dicom_sr import build_measurement_report, write_report_sr

SEG_NAME = "seg.dcm"
SR_NAME = "sr.dcm"


def _evidence_series(study: StudyRecord, record: AssessmentRecord):
    post_uid = record.imaging.series_used.get("t1_post")
    by_uid = {s.series_instance_uid: s for s in study.series if s.files}
    if post_uid in by_uid:
        return by_uid[post_uid]
    return next(iter(sorted(by_uid.values(), key=lambda s: (s.series_number or 0, s.series_instance_uid))), None)


def dicom_outputs_missing(record: AssessmentRecord, folder: Path, outputs: OutputsConfig) -> bool:
    """Whether a switched-on object this study should have is absent from ``folder`` (outputs of a
    run before SEG/SR existed, or deleted): the nightly rerun of an unchanged patient writes it."""
    if record.timepoint == "pre_ablation":
        return False
    if outputs.write_dicom_sr and not (Path(folder) / SR_NAME).exists():
        return True
    return (outputs.write_dicom_seg and record.imaging.ok and record.imaging.az_found
            and not (Path(folder) / SEG_NAME).exists())


def write_study_dicom(record: AssessmentRecord, study: StudyRecord, load_labels: Callable[[], sitk.Image | None],
                      folder: Path, outputs: OutputsConfig) -> tuple[list[str], list[ErrorRecord]]:
    """Write the study's SEG and SR into ``folder``; returns (names written, error rows).

    ``load_labels`` returns the study's label image on the post-contrast grid (or None); it is
    called only when a SEG is to be written (a reused study reads labels.nii.gz then).
    """
    folder = Path(folder)
    written, errors = _write(record, study, load_labels, folder, outputs)
    # An object not written in this run (switched off, nothing to segment, failed) must not
    # survive from an earlier run: it would describe other labels or another call.
    for name in (SEG_NAME, SR_NAME):
        if name not in written:
            (folder / name).unlink(missing_ok=True)
    return written, errors


def _write(record: AssessmentRecord, study: StudyRecord, load_labels: Callable[[], sitk.Image | None],
           folder: Path, outputs: OutputsConfig) -> tuple[list[str], list[ErrorRecord]]:
    written: list[str] = []
    errors: list[ErrorRecord] = []
    if record.timepoint == "pre_ablation" or not (outputs.write_dicom_seg or outputs.write_dicom_sr):
        return written, errors

    def fail(stage: str, series_uid: str, exc: Exception, what: str) -> None:
        errors.append(ErrorRecord.from_exception(exc, stage, f"{what} not written", path=str(folder / what),
                                                 patient_id=record.patient_id,
                                                 study_instance_uid=record.study_instance_uid,
                                                 series_instance_uid=series_uid))

    series = _evidence_series(study, record)
    series_uid = series.series_instance_uid if series is not None else ""
    try:
        source = read_source_datasets(series.files) if series is not None else []
        # Pseudonymised run: the objects carry the records' pseudonym, not the files' identity.
        source, identity_removed = with_patient_identity(source, record.patient_id)
    except Exception as exc:  # noqa: BLE001 - an unreadable source must not lose the study
        fail("dicom_seg" if outputs.write_dicom_seg else "dicom_sr", series_uid, exc, SEG_NAME)
        return written, errors

    segmentation = None
    is_post = series is not None and series_uid == record.imaging.series_used.get("t1_post")
    if outputs.write_dicom_seg and is_post and record.imaging.ok:
        try:
            labels = load_labels()
            if labels is None or not np.any(sitk.GetArrayFromImage(labels)):
                labels = None  # nothing segmented (e.g. no ablation zone): the SR alone carries the call
            segmentation = None if labels is None else build_segmentation(
                source, labels, record.patient_id, record.session, record.imaging.segmentation_method or "classical")
            if segmentation is not None:
                if identity_removed:
                    mark_identity_removed(segmentation)
                write_segmentation(folder / SEG_NAME, segmentation)
                written.append(SEG_NAME)
        except Exception as exc:  # noqa: BLE001
            segmentation = None
            fail("dicom_seg", series_uid, exc, SEG_NAME)
    if outputs.write_dicom_sr:
        try:
            sr = build_measurement_report(record, source, segmentation)
            if identity_removed:
                mark_identity_removed(sr)
            write_report_sr(folder / SR_NAME, sr)
            written.append(SR_NAME)
        except Exception as exc:  # noqa: BLE001
            fail("dicom_sr", series_uid, exc, SR_NAME)
    return written, errors
