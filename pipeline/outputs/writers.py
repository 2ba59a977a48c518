"""Writers of one patient's outputs from its assessment records (issue 17).

Owns what is written once the records exist, in this order: per study the key image, SEG/SR
and then ``assessment.json``, written once per study and run with every error row of the
study; per patient ``timeline.json``, ``timeline.png`` and ``report.html``; for an unchanged
patient (every record reused) only the back-fill of a missing SEG/SR or report. A failure to
write evidence is an :class:`ErrorRecord`, never a lost study or patient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from pipeline.core.config import OutputsConfig
from pipeline.core.records import AssessmentRecord, ErrorRecord, StudyRecord, TimelinePoint
from pipeline.core.geometry import resample_to
from pipeline.imaging.registration import invert_registration
from pipeline.measurement.study import StudyImages
from pipeline.outputs.contract import write_assessment, write_json
from pipeline.outputs.dicom import dicom_outputs_missing, write_study_dicom
from pipeline.outputs.key_image import days_text, render_key_image
from pipeline.outputs.report import write_patient_report
from pipeline.outputs.store import ASSESSMENT_NAME
from pipeline.outputs.timeline_plot import render_timeline_plot

KEY_IMAGE_NAME = "key_image.png"
REPORT_NAME = "report.html"
TIMELINE_JSON_NAME = "timeline.json"
TIMELINE_PLOT_NAME = "timeline.png"

# Error rows -> the same rows as the outputs may hold them (a pseudonymised run's redaction).
Redact = Callable[[list[ErrorRecord]], list[ErrorRecord]]


def _as_is(errors: list[ErrorRecord]) -> list[ErrorRecord]:
    return errors


@dataclass
class StudyEvidence:
    """The images a study's key image and SEG are drawn from, each loaded on first use:
    the study's own, its baseline's and the registration baseline -> study (None when there is
    none or it failed), with its inverse when the caller has it (``from_study``: study -> baseline)."""

    images: Callable[[], StudyImages | None]
    baseline_images: Callable[[], StudyImages | None] | None = None
    to_baseline: sitk.Transform | None = None
    from_study: sitk.Transform | None = None

    def labels(self) -> sitk.Image | None:
        return getattr(self.images(), "labels", None)


def key_image_title(record: AssessmentRecord) -> str:
    """The key image's title: patient, date, time point, call; and, where a suspicious focus the
    label map still shows was read as anatomy seen at the baseline, why the call does not count it."""
    title = (f"{record.patient_id}  {record.study_date} ({days_text(record.days_since_ablation)})  "
             f"{record.timepoint.replace('_', ' ')}  ->  {record.decision.category.value.replace('_', ' ')}"
             f"  (confidence {record.decision.confidence:.2f})")
    if any(r.startswith("focus_seen_at_baseline") for r in record.decision.flag_reasons):
        seen = max((f.seen_at_baseline_fraction or 0.0 for f in record.imaging.foci if f.suspicious), default=0.0)
        title += f"\na suspicious focus enhanced at the baseline already ({100 * seen:.0f} % of it): anatomy seen before"
    return title


def render_study_key_image(record: AssessmentRecord, evidence: StudyEvidence, folder: Path, dpi: int) -> None:
    """key_image.png of the study; beside it the baseline brought onto the study's grid."""
    images = evidence.images()
    if images is None:
        return
    current = {"pre": images.pre_registered, "post": images.post, "subtraction": images.subtraction,
               "labels": images.labels}
    if images.above_surroundings is not None:
        current["above_surroundings"] = images.above_surroundings
    base_view = None
    if (evidence.baseline_images is not None and evidence.baseline_images() is not None
            and evidence.to_baseline is not None):
        # Baseline onto this study's grid: needs this study -> baseline, the inverse of to_baseline.
        inverse = (evidence.from_study if evidence.from_study is not None
                   else invert_registration(evidence.to_baseline))
        b = evidence.baseline_images()
        base_view = {
            "pre": resample_to(b.pre_registered, images.post, inverse),
            "post": resample_to(b.post, images.post, inverse),
            "subtraction": resample_to(b.subtraction, images.post, inverse),
            "labels": resample_to(b.labels, images.post, inverse, interpolator=sitk.sitkNearestNeighbor),
        }
        if "above_surroundings" in current and b.above_surroundings is not None:
            base_view["above_surroundings"] = resample_to(b.above_surroundings, images.post, inverse)
    k = record.imaging.key_slice_index
    if k is None:
        k = images.post.GetSize()[2] // 2
    title = key_image_title(record)
    render_key_image(Path(folder) / KEY_IMAGE_NAME, current, k, title, base_view, dpi=dpi)


def write_study_outputs(record: AssessmentRecord, study: StudyRecord, evidence: StudyEvidence, folder: Path,
                        outputs: OutputsConfig, earlier_errors: list[ErrorRecord],
                        redact: Redact = _as_is) -> list[ErrorRecord]:
    """Key image, seg.dcm/sr.dcm, then assessment.json (once) of one study.

    The record's ``errors`` become the study's rows among ``earlier_errors`` (as they stand,
    redacted) followed by what this writing failed at; returns those new rows, redacted.
    """
    uid = record.study_instance_uid
    new: list[ErrorRecord] = []
    if outputs.write_key_image:
        t0 = time.perf_counter()
        try:
            render_study_key_image(record, evidence, folder, outputs.key_image_dpi)
        except Exception as exc:  # noqa: BLE001 - evidence rendering must not lose the study
            new.append(ErrorRecord.from_exception(exc, "key_image", "key image not rendered",
                                                  patient_id=record.patient_id, study_instance_uid=uid))
        record.stage_seconds["key_image"] = round(time.perf_counter() - t0, 3)
    # SEG/SR read nothing of the record's errors; their failure is a row of errors.csv, never a lost study.
    t0 = time.perf_counter()
    new.extend(write_study_dicom(record, study, evidence.labels, folder, outputs)[1])
    if outputs.write_dicom_seg or outputs.write_dicom_sr:
        record.stage_seconds["dicom_seg_sr"] = round(time.perf_counter() - t0, 3)
    new = redact(new)
    record.errors = [vars(e) for e in [*earlier_errors, *new] if e.study_instance_uid == uid]
    write_assessment(Path(folder) / ASSESSMENT_NAME, record)
    return new


def write_report(patient_id: str, studies: list[tuple[AssessmentRecord, Path]], patient_folder: Path) -> list[ErrorRecord]:
    """report.html of the patient (after timeline.png and the key images it embeds)."""
    path = Path(patient_folder) / REPORT_NAME
    try:
        write_patient_report(path, patient_id, studies)
    except Exception as exc:  # noqa: BLE001 - the report must not lose the patient
        return [ErrorRecord.from_exception(exc, "report", "report.html not written", path=str(path),
                                           patient_id=patient_id)]
    return []


def write_patient_outputs(patient_id: str, studies: list[tuple[AssessmentRecord, Path]], points: list[TimelinePoint],
                          patient_folder: Path, outputs: OutputsConfig,
                          growth_threshold: tuple[float, float]) -> list[ErrorRecord]:
    """timeline.json, timeline.png and (switched on) report.html of a patient; ``studies``:
    (record, study folder) in timeline order; ``growth_threshold``: (``rules.growth_min_abs_mm``,
    ``rules.growth_min_pct``), drawn on the plot. Returns the error rows."""
    patient_folder = Path(patient_folder)
    errors: list[ErrorRecord] = []
    write_json(patient_folder / TIMELINE_JSON_NAME, [p.model_dump() for p in points])
    try:
        render_timeline_plot(patient_folder / TIMELINE_PLOT_NAME, patient_id, points, outputs.key_image_dpi,
                             growth_threshold)
    except Exception as exc:  # noqa: BLE001 - evidence rendering must not lose the patient
        errors.append(ErrorRecord.from_exception(exc, "timeline_plot", "timeline plot not rendered",
                                                 patient_id=patient_id))
    if outputs.write_report:
        errors.extend(write_report(patient_id, studies, patient_folder))
    return errors


def backfill_study_dicom(record: AssessmentRecord, study: StudyRecord, evidence: StudyEvidence, folder: Path,
                         outputs: OutputsConfig) -> list[ErrorRecord]:
    """An unchanged study: write its SEG/SR only when one it should have is missing (a run before
    they existed, or a deletion); its assessment.json is left as it is."""
    if not dicom_outputs_missing(record, folder, outputs):
        return []
    return write_study_dicom(record, study, evidence.labels, folder, outputs)[1]


def backfill_report(patient_id: str, studies: list[tuple[AssessmentRecord, Path]], patient_folder: Path,
                    outputs: OutputsConfig) -> list[ErrorRecord]:
    """An unchanged patient: write report.html only when switched on and missing."""
    if not outputs.write_report or (Path(patient_folder) / REPORT_NAME).exists():
        return []
    return write_report(patient_id, studies, patient_folder)
