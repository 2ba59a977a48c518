"""sr.dcm: one study's call as a DICOM SR Measurement Report (TID 1500), built with highdicom.

Content (one measurement group, TID 1411 volumetric ROI when the ablation zone was segmented,
else TID 1501 without ROI):
- TrackingIdentifier / TrackingUID of the ablation zone: the same for every study of one ablation
  session of the patient (:func:`pipeline.outputs.dicom_seg.tracking_uid`), so a viewer follows it over time;
- the referenced SEG segment (segment 1, ablation zone) and its source series;
- long axis, short axis (SCT), volume (SCT) and their change from the session's baseline (%);
- qualitative evaluations: the IWG-IGTA category, the key finding, a new lesion when found,
  and the deciding rule as text.
IWG-IGTA categories and the change-from-baseline measurements have no code in DICOM, SNOMED CT
or LOINC: they use this project's local coding scheme ``99ABLRESP`` (PS3.16 allows private
schemes with a "99" prefix); docs/dicom-outputs.md lists every code.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline import __version__
from pipeline.core.files import atomic_write_bytes
from pipeline.core.records import AssessmentRecord, Label
from pipeline.outputs.dicom_seg import MANUFACTURER, tracking_identifier, tracking_uid

LOCAL_SCHEME = "99ABLRESP"
SR_SERIES_NUMBER = 9902
AZ_SEGMENT_NUMBER = int(Label.ABLATION_ZONE)  # the SEG's segment numbers are the label values


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, LOCAL_SCHEME, meaning)


# Concept names
IWG_IGTA_CATEGORY = _local("IWGIGTA-CAT", "IWG-IGTA response category")
KEY_FINDING = hd.sr.CodedConcept(codes.DCM.Finding.value, "DCM", codes.DCM.Finding.meaning)
DECIDING_RULE = _local("RULE", "Deciding rule")
LONG_AXIS_CHANGE = _local("LAX-CHG-BL", "Long axis change from baseline")
SHORT_AXIS_CHANGE = _local("SAX-CHG-BL", "Short axis change from baseline")
VOLUME_CHANGE = _local("VOL-CHG-BL", "Volume change from baseline")

CATEGORY_CODES = {
    "complete_ablation": _local("CA", "Complete ablation"),
    "residual_unablated_tumour": _local("RUT", "Residual unablated tumour"),
    "no_evidence_of_ltp": _local("NOLTP", "No evidence of local tumour progression"),
    "local_tumour_progression": _local("LTP", "Local tumour progression"),
    "suspected_local_tumour_progression": _local("SLTP", "Suspected local tumour progression"),
    "indeterminate": _local("INDET", "Indeterminate"),
}
FINDING_CODES = {
    "focus": _local("NODFOCUS", "Suspicious nodular enhancing focus at the ablation margin"),
    "growth": _local("GROWTH", "Serial growth of the ablation zone without nodular focus"),
    "none": _local("NOFOCUS", "No suspicious enhancing focus"),
    "not_evaluable": _local("NOTEVAL", "Not evaluable"),
}
NEW_LESION = _local("NEWLES", "New enhancing lesion distant from the ablation zone")

MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
MRI = hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging")
ABLATION_ZONE_FINDING = hd.sr.CodedConcept(codes.SCT.Necrosis.value, "SCT", codes.SCT.Necrosis.meaning)


def key_finding(rule_id: str) -> hd.sr.CodedConcept:
    """The key finding behind a decision's rule (classify.py's rule ids)."""
    if rule_id.startswith("R5"):
        return FINDING_CODES["not_evaluable"]
    if rule_id.startswith("R14"):
        return FINDING_CODES["growth"]
    if rule_id in {"R2-residual-first-contrast-study", "R2-ltp-after-documented-complete", "R2-residual-persisting",
                   "R2-residual-never-documented-complete"}:
        return FINDING_CODES["focus"]
    return FINDING_CODES["none"]


def _measurements(record: AssessmentRecord) -> list[hd.sr.Measurement]:
    az = record.imaging.ablation_zone
    if az is None:
        return []
    changes = record.decision.changes
    values = [
        (hd.sr.CodedConcept(codes.SCT.LongAxis.value, "SCT", codes.SCT.LongAxis.meaning), az.long_axis_mm, MM),
        (hd.sr.CodedConcept(codes.SCT.ShortAxis.value, "SCT", codes.SCT.ShortAxis.meaning), az.short_axis_mm, MM),
        (hd.sr.CodedConcept(codes.SCT.Volume.value, "SCT", codes.SCT.Volume.meaning), az.volume_ml, ML),
        (LONG_AXIS_CHANGE, changes.long_axis_change_pct, PERCENT),
        (SHORT_AXIS_CHANGE, changes.short_axis_change_pct, PERCENT),
        (VOLUME_CHANGE, changes.volume_change_pct, PERCENT),
    ]
    return [hd.sr.Measurement(name=name, value=round(float(value), 3), unit=unit)
            for name, value, unit in values if value is not None]


def _qualitative(record: AssessmentRecord) -> list[hd.sr.QualitativeEvaluation]:
    decision = record.decision
    items = [hd.sr.QualitativeEvaluation(IWG_IGTA_CATEGORY, CATEGORY_CODES[decision.category.value]),
             hd.sr.QualitativeEvaluation(KEY_FINDING, key_finding(decision.rule_id))]
    if decision.new_lesion:
        items.append(hd.sr.QualitativeEvaluation(KEY_FINDING, NEW_LESION))
    return items


def build_measurement_report(
    record: AssessmentRecord,
    evidence: list[pydicom.Dataset],
    segmentation: pydicom.Dataset | None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one study.

    ``evidence``: datasets of the study (the post-contrast source series; headers suffice);
    ``segmentation``: the study's SEG (referenced as the ROI of the ablation zone) or None when
    none was written (indeterminate study without images): the report then holds the category,
    key finding and rule only. Raises ``ValueError`` for a pre-ablation record (nothing to report).
    """
    if record.decision.category.value not in CATEGORY_CODES:
        raise ValueError(f"no measurement report for a {record.decision.category.value} study")
    if not evidence and segmentation is None:
        raise ValueError("a measurement report needs at least one dataset of the study as evidence")
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid(record.patient_id, record.session, "ablation_zone"),
                                        identifier=tracking_identifier(record.session, "ablation_zone"))
    time_point = hd.sr.TimePointContext(
        time_point=record.timepoint if record.days_since_ablation is None
        else f"{record.timepoint} day {record.days_since_ablation}")
    common = dict(tracking_identifier=tracking, time_point_context=time_point, finding_type=ABLATION_ZONE_FINDING,
                  measurements=_measurements(record) or None, qualitative_evaluations=_qualitative(record),
                  algorithm_id=hd.sr.AlgorithmIdentification(name="ablation-response", version=__version__))
    if segmentation is not None:
        referenced = hd.sr.ReferencedSegment.from_segmentation(segmentation, AZ_SEGMENT_NUMBER)
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=referenced, **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    # The deciding rule with its values, as text (TID 1501 allows TEXT qualitative evaluations).
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=DECIDING_RULE, value=f"{record.decision.rule_id}: {record.decision.rule}"[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["ablation-response", "device"]), name="ablation-response",
            manufacturer_name=MANUFACTURER, model_name=__version__))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=MRI, imaging_measurements=[group])
    sources = ([segmentation] if segmentation is not None else []) + list(evidence)
    digest = hashlib.sha256(record.decision.model_dump_json().encode()
                            + (record.imaging.ablation_zone.model_dump_json().encode()
                               if record.imaging.ablation_zone else b"")
                            + (str(segmentation.SOPInstanceUID).encode() if segmentation is not None else b"")).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = hd.sr.Comprehensive3DSR(
            evidence=sources, content=report,
            series_instance_uid=generate_uid(entropy_srcs=["ablation-response", "sr-series", record.study_instance_uid]),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=["ablation-response", "sr", record.study_instance_uid, digest,
                                                        __version__]),
            instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
            series_description="Ablation response measurement report (ablation-response)")
    # A private coding scheme is declared in the SOP Common module (PS3.3 C.12.1.1.2).
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "ablation-response local codes (IWG-IGTA categories, changes from baseline)"
    scheme.CodingSchemeResponsibleOrganization = "ablation-response project"
    existing = list(sr.get("CodingSchemeIdentificationSequence", []))
    sr.CodingSchemeIdentificationSequence = existing + [scheme]
    return sr


def write_report_sr(path: Path, sr: pydicom.Dataset) -> None:
    """Write ``sr`` atomically."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(Path(path), buffer.getvalue())
