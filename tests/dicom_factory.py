"""Build small, valid DICOM objects for tests (MR slices, SR documents, broken files).

Only pydicom is used: the point is to write exactly the tags a scanner writes, so that
ingest and imageio are tested on the same kind of bytes they will meet in a PACS export.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def rotation(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix R = Rz @ Ry @ Rx (angles in degrees about the LPS axes)."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SeriesSpec:
    """Geometry and identity of one synthetic MR series.

    ``volume`` is indexed ``[k, j, i]`` (slice, row, column), like SimpleITK arrays.
    ``direction`` columns are the row cosine (i), the column cosine (j) and the slice
    direction (k); ``spacing`` is (column spacing, row spacing, slice spacing) in mm.
    """

    volume: np.ndarray
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    patient_id: str = "P001"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    study_date: str = "20240102"
    study_description: str = "MR abdomen"
    series_description: str = "t1_vibe_fs_tra_pre"
    series_number: int = 1
    modality: str = "MR"
    manufacturer: str = "SIEMENS"
    echo_time: float | None = 2.0
    repetition_time: float | None = 5.0
    contrast_agent: str | None = None
    acquisition_time: str | None = "101500.000000"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    return meta


def slice_dataset(spec: SeriesSpec, k: int) -> Dataset:
    """The dataset of slice ``k`` of ``spec`` (pixels stored as uint16 with rescale)."""
    d = np.asarray(spec.direction, dtype=float)
    ipp = np.asarray(spec.origin, dtype=float) + k * spec.spacing[2] * d[:, 2]
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_uid)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = spec.patient_id
    ds.PatientName = f"Test^{spec.patient_id}"
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyDate = spec.study_date
    ds.SeriesDate = spec.study_date
    ds.StudyDescription = spec.study_description
    ds.StudyTime = "095000"
    ds.StudyID = "1"
    ds.SeriesDescription = spec.series_description
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = k + 1
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.ImageType = list(spec.image_type)
    if spec.echo_time is not None:
        ds.EchoTime = spec.echo_time
    if spec.repetition_time is not None:
        ds.RepetitionTime = spec.repetition_time
    if spec.contrast_agent is not None:
        ds.ContrastBolusAgent = spec.contrast_agent
    if spec.acquisition_time is not None:
        ds.AcquisitionTime = spec.acquisition_time
    ds.FrameOfReferenceUID = spec.extra.get("FrameOfReferenceUID", generate_uid())
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.PixelSpacing = [f"{spec.spacing[1]:.6f}", f"{spec.spacing[0]:.6f}"]  # row, column
    ds.SliceThickness = spec.spacing[2]
    ds.Rows, ds.Columns = spec.volume.shape[1], spec.volume.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = spec.rescale_slope
    ds.RescaleIntercept = spec.rescale_intercept
    stored = np.round((spec.volume[k] - spec.rescale_intercept) / spec.rescale_slope)
    ds.PixelData = np.clip(stored, 0, 65535).astype("<u2").tobytes()
    for key, value in spec.extra.items():
        setattr(ds, key, value)
    return ds


def write_series(
    spec: SeriesSpec,
    out_dir: Path,
    *,
    shuffle_seed: int | None = None,
    extension: str = ".dcm",
    skip_slices: tuple[int, ...] = (),
) -> list[Path]:
    """Write one file per slice into ``out_dir``; file names in shuffled order if asked.

    ``skip_slices`` leaves slices out (a "missing slice" export). Returns the paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    n = spec.volume.shape[0]
    ks = [k for k in range(n) if k not in skip_slices]
    names = list(range(len(ks)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(names)
    paths = []
    for name, k in zip(names, ks):
        path = out_dir / f"IM{name:05d}{extension}"
        slice_dataset(spec, k).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_sr(path: Path, patient_id: str = "P001", study_uid: str | None = None) -> Path:
    """A minimal Basic Text SR document (a non-image object found in real exports)."""
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(BASIC_TEXT_SR_STORAGE, sop_uid)
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.StudyDate = "20240102"
    ds.ValueType = "CONTAINER"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def set_raw(path: Path, keyword: str, text: str) -> None:
    """Replace the value of ``keyword`` in the file's bytes with ``text`` (pydicom refuses to
    write most invalid values). The factory writes Explicit VR Little Endian, where a text
    element is tag, VR, 2-byte length, value."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = pydicom.datadict.dictionary_VR(tag)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    data = path.read_bytes()
    at = data.index(head, 132)
    (length,) = struct.unpack("<H", data[at + 6:at + 8])
    value = text.encode("utf-8", "surrogateescape")
    value += b" " if len(value) % 2 else b""
    path.write_bytes(data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length:])


def truncate(path: Path, keep_fraction: float) -> Path:
    """Cut a file to ``keep_fraction`` of its size (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def today_minus(days: int) -> str:
    """A DICOM date string ``days`` before today."""
    return (dt.date.today() - dt.timedelta(days=days)).strftime("%Y%m%d")


def read(path: Path) -> Dataset:
    """Read a written file back (test convenience)."""
    return pydicom.dcmread(path)
