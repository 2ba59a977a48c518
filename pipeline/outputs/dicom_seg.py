"""seg.dcm: the study's labels (pipeline.core.records.Label) as a DICOM Segmentation, segment number = label value.

highdicom builds the object (BINARY, one segment per label) from the source post-contrast
series' datasets. The labels live on that series' native grid (DESIGN.md), so no resampling is
ever done here: each source frame is matched to its label slice by its ImagePositionPatient,
never by file order, and a source series whose geometry does not match the label grid is a
:class:`SegmentationGeometryError` (a wrong reference would put the contours on the wrong
anatomy in every viewer).
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline import __version__
from pipeline.core.files import atomic_write_bytes
from pipeline.core.records import Label

MANUFACTURER = "ablation-response"
SEG_SERIES_NUMBER = 9901
# In-plane position and orientation of a source frame must agree with the label grid within
# these (mm, cosine): NIfTI stores the grid in float32, DICOM DS strings hold ~16 digits.
_POSITION_TOL_MM = 0.01
_COSINE_TOL = 1e-4


class SegmentationGeometryError(ValueError):
    """The source series and the label grid do not describe the same voxels."""


@dataclass(frozen=True)
class SegmentSpec:
    label_value: int
    label: str
    category: hd.sr.CodedConcept
    property_type: hd.sr.CodedConcept
    tracking_name: str
    colour_lab: tuple[float, float, float]


def _coded(code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


# Segment codes (CID 7150 category, CID 7151-like property types, SNOMED CT):
# - ablation zone: the non-enhancing zone of induced necrosis (DESIGN.md), so category
#   "Morphologically abnormal structure" and type "Necrosis" (SCT 6574001);
# - rim: the benign peri-ablational enhancing rim is reactive hyperaemia / inflammation and
#   granulation tissue (criteria.md rule 7-8), so type "Inflammation (morphologic abnormality)";
# - focus: an enhancing focus outside the benign-rim pattern is a finding to review, not a proven
#   tumour (every call is a proposal), so the neutral "Lesion" (SCT 52988006), not "Neoplasm".
SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec(int(Label.ABLATION_ZONE), "Ablation zone", _coded(codes.SCT.MorphologicallyAbnormalStructure),
                _coded(codes.SCT.Necrosis), "ablation_zone", (60.0, -10.0, -40.0)),
    SegmentSpec(int(Label.RIM), "Enhancing rim", _coded(codes.SCT.MorphologicallyAbnormalStructure),
                _coded(codes.SCT.InflammationMorphologic), "rim", (85.0, 0.0, 80.0)),
    SegmentSpec(int(Label.ENHANCING_FOCUS), "Enhancing focus", _coded(codes.SCT.MorphologicallyAbnormalStructure),
                _coded(codes.SCT.Lesion), "enhancing_foci", (55.0, 80.0, 65.0)),
)


def tracking_uid(patient_id: str, session: int | None, structure: str) -> str:
    """The TrackingUID of ``structure`` in one ablation session of one patient.

    Derived deterministically from (patient, session, structure), so every study of the session
    (and every rerun) carries the same UID: a viewer follows the ablation zone over time by it.
    A new session (re-ablation) is a new zone and gets a new UID.
    """
    return generate_uid(entropy_srcs=["ablation-response", "tracking", str(patient_id), str(session), structure])


def tracking_identifier(session: int | None, structure: str) -> str:
    return f"{structure.replace('_', ' ')}, session {session if session is not None else '-'}"


# Patient and General Study attributes of Type 2 (present, possibly empty) that a derived object
# must carry; some exports omit them, and highdicom copies them from the source.
_TYPE2_COPIED = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def read_source_datasets(files: list[Path]) -> list[pydicom.Dataset]:
    """The source series' datasets (headers only: highdicom copies geometry and identifiers).

    Type 2 patient/study attributes absent from a file are added empty (in memory only), as the
    standard allows, so that the derived objects stay valid.
    """
    datasets = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, None)
        datasets.append(ds)
    if not datasets:
        raise SegmentationGeometryError("the source series has no files")
    return datasets


# Identifying Patient/Study attributes that highdicom copies into the SEG and SR from the source
# (PS3.15 Basic Application Level Confidentiality Profile: emptied, "Z"); the UIDs are kept:
# the outputs are keyed by them already.
_IDENTIFYING = ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID")
# LO (64 characters at most): PatientID -> keyed HMAC pseudonym, PatientName and the above emptied.
DEIDENTIFICATION_METHOD = "ablation-response: PatientID HMAC pseudonym, identifiers emptied"


def with_patient_identity(datasets: list[pydicom.Dataset], patient_id: str) -> tuple[list[pydicom.Dataset], bool]:
    """The source datasets as the outputs identify the patient, and whether identity was removed.

    When the run pseudonymises PatientID (``ingest.pseudonymise_patient_ids``), the records carry
    the pseudonym while the source files carry the hospital's identifiers: the SEG and SR then
    carry the pseudonym as PatientID, an empty PatientName and none of the identifying attributes, like
    every other output. Otherwise the datasets are returned as they are (a derived object keeps
    its source's identity, which is what a PACS needs to file it with the study).
    """
    if all(str(ds.get("PatientID", "")) == patient_id for ds in datasets):
        return datasets, False
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.PatientID = patient_id
        for keyword in ("PatientName", *_IDENTIFYING):
            setattr(ds, keyword, None)
        for keyword in ("OtherPatientIDsSequence", "IssuerOfPatientID", "PatientAge", "PatientWeight", "PatientSize",
                        "InstitutionName", "InstitutionAddress", "PerformingPhysicianName", "OperatorsName"):
            if keyword in ds:
                delattr(ds, keyword)
        out.append(ds)
    return out, True


def mark_identity_removed(ds: pydicom.Dataset) -> None:
    """Patient Identity Removed / De-identification Method (PS3.3 C.7.1.1) on a SEG or SR."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD


def _frame_geometry(ds: pydicom.Dataset) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(label, orientation, pixel spacing, position) of each frame of ``ds``, in frame order.

    Single-frame images carry them at the top level; multi-frame (Enhanced MR) ones in their
    per-frame or shared functional groups (PS3.3 C.7.6.16).
    """
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [(str(ds.SOPInstanceUID), np.array([float(v) for v in ds.ImageOrientationPatient]),
                 np.array([float(v) for v in ds.PixelSpacing]), np.array([float(v) for v in ds.ImagePositionPatient]))]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else pydicom.Dataset()
    frames = []
    for number, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        def group(keyword: str) -> pydicom.Dataset:
            for source in (per_frame, shared):
                if keyword in source:
                    return source[keyword].value[0]
            raise SegmentationGeometryError(f"{ds.SOPInstanceUID} frame {number}: no {keyword}")
        frames.append((f"{ds.SOPInstanceUID} frame {number}",
                       np.array([float(v) for v in group("PlaneOrientationSequence").ImageOrientationPatient]),
                       np.array([float(v) for v in group("PixelMeasuresSequence").PixelSpacing]),
                       np.array([float(v) for v in group("PlanePositionSequence").ImagePositionPatient])))
    return frames


def slice_index_of_frames(source: list[pydicom.Dataset], labels: sitk.Image) -> list[int]:
    """For each source frame (datasets in order, frames in order), the slice k of the label grid.

    Matches ImagePositionPatient to the grid's slice positions (file order is meaningless) and
    checks that orientation, pixel spacing and matrix agree; raises
    :class:`SegmentationGeometryError`. Source: single-frame images, or one multi-frame image
    (highdicom references the frames of one multi-frame source only).
    """
    if len(source) > 1 and any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in source):
        raise SegmentationGeometryError(
            f"the source series has {len(source)} files of which some are multi-frame: a SEG references "
            "either single-frame images or one multi-frame image")
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    spacing = np.array(labels.GetSpacing())
    nx, ny, nz = labels.GetSize()
    ks = []
    for ds in source:
        if (int(ds.Rows), int(ds.Columns)) != (ny, nx):
            raise SegmentationGeometryError(
                f"source image {ds.SOPInstanceUID}: {ds.Rows}x{ds.Columns} pixels, label grid {ny}x{nx}")
        for label, iop, pixel_spacing, ipp in _frame_geometry(ds):
            if (np.abs(iop[:3] - direction[:, 0]).max() > _COSINE_TOL
                    or np.abs(iop[3:] - direction[:, 1]).max() > _COSINE_TOL):
                raise SegmentationGeometryError(
                    f"source {label}: orientation {np.round(iop, 4).tolist()} differs from the label "
                    f"grid's {np.round(direction[:, :2].T.ravel(), 4).tolist()}")
            # PixelSpacing = (row spacing, column spacing); the grid's spacing is (column, row, slice).
            if np.abs(pixel_spacing[::-1] - spacing[:2]).max() > _POSITION_TOL_MM:
                raise SegmentationGeometryError(
                    f"source {label}: PixelSpacing {pixel_spacing.tolist()} differs from the label "
                    f"grid's {spacing[1::-1].tolist()}")
            index = np.array(labels.TransformPhysicalPointToContinuousIndex(ipp.tolist()))
            k = int(round(index[2]))
            offset_mm = np.abs(index - [0.0, 0.0, k]) * spacing
            if offset_mm.max() > _POSITION_TOL_MM or not 0 <= k < nz:
                raise SegmentationGeometryError(
                    f"source {label}: ImagePositionPatient {np.round(ipp, 3).tolist()} is not on a "
                    f"slice of the label grid (continuous index {np.round(index, 3).tolist()})")
            ks.append(k)
    if len(set(ks)) != len(ks):
        raise SegmentationGeometryError("two source frames lie on the same label slice")
    return ks


def build_segmentation(
    source: list[pydicom.Dataset],
    labels: sitk.Image,
    patient_id: str,
    session: int | None,
    segmentation_method: str = "classical",
) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of ``labels`` (uint label image on the grid of ``source``).

    One segment per label value of :data:`SEGMENTS` (also when a label is empty in this study:
    the segment list is the same in every study, so a viewer's legend and the SR's segment
    numbers never shift). Raises :class:`SegmentationGeometryError` or ``ValueError``.
    """
    array = sitk.GetArrayFromImage(labels)  # (k, row, column)
    known = {s.label_value for s in SEGMENTS}
    unknown = set(np.unique(array).tolist()) - known - {0}
    if unknown:
        raise ValueError(f"label values {sorted(unknown)} have no segment (expected {sorted(known)})")
    if not array.any():
        raise ValueError("the label image is empty: no segmentation to write")
    ks = slice_index_of_frames(source, labels)
    # Frame i of pixel_array belongs to source frame i; highdicom copies each one's position.
    frames = array[ks].astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"ablation-response {segmentation_method} segmentation", version=__version__,
        # The classical method is thresholding of the subtraction + morphology (connected
        # components, openings): CID 7162 "Morphological Operations".
        family=codes.cid7162.MorphologicalOperations if segmentation_method == "classical"
        else codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s.label_value, segment_label=s.label, segmented_property_category=s.category,
            segmented_property_type=s.property_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=tracking_uid(patient_id, session, s.tracking_name),
            tracking_id=tracking_identifier(session, s.tracking_name), display_color=hd.color.CIELabColor(*s.colour_lab))
        for s in SEGMENTS]
    series_uid = str(source[0].SeriesInstanceUID)
    # Deterministic UIDs: the same labels give the same instance (a re-push to PACS replaces it),
    # changed labels a new one.
    content = generate_uid(entropy_srcs=["ablation-response", "seg", series_uid, _digest(frames), __version__])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns about optional attributes absent in sources
        return hd.seg.Segmentation(
            source_images=source, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(entropy_srcs=["ablation-response", "seg-series", series_uid]),
            series_number=SEG_SERIES_NUMBER, sop_instance_uid=content, instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name="ablation-response", software_versions=__version__,
            device_serial_number="0", content_label="ABLATION", content_description="Ablation zone, rim, enhancing foci",
            series_description="Ablation zone segmentation (ablation-response)", omit_empty_frames=True)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()


def _affine_kji(image: sitk.Image) -> np.ndarray:
    """4x4 affine from the array index (k, row, column) of ``image`` to LPS mm."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = (direction * spacing)[:, ::-1]  # columns: slice (k), row (j), column (i)
    affine[:3, 3] = image.GetOrigin()
    return affine


def labels_from_segmentation(seg: pydicom.Dataset, reference: sitk.Image) -> np.ndarray:
    """Decode a SEG back onto the grid of ``reference``: a (k, row, column) uint8 label array.

    Uses each frame's own PlanePositionSequence (highdicom's volume reconstruction), so it checks
    the SEG's geometry, not just its references. Raises ``RuntimeError`` when the SEG's frames do
    not lie on the reference grid.
    """
    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.Segmentation.from_dataset(seg, copy=False)
    volume = seg.get_volume(combine_segments=True, dtype=np.uint8)
    target = hd.Volume(np.zeros(reference.GetSize()[::-1], np.uint8), _affine_kji(reference), coordinate_system="PATIENT")
    matched = volume.match_geometry(target, tol=_POSITION_TOL_MM)
    return np.asarray(matched.array, dtype=np.uint8)


def segmentation_bytes(seg: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_segmentation(path: Path, seg: pydicom.Dataset) -> None:
    """Write ``seg`` atomically (serialised in memory, then temp file + rename)."""
    atomic_write_bytes(Path(path), segmentation_bytes(seg))
