"""Write one MR series as single-frame MR Image Storage files (Explicit VR Little Endian).

Geometry tags follow DICOM PS3.3 C.7.6.2: ImagePositionPatient = centre of the first
transmitted voxel of the slice (LPS mm), ImageOrientationPatient = row cosine then column
cosine, PixelSpacing = [row spacing (between rows, i.e. along the column cosine), column
spacing (between columns, along the row cosine)].
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from .geometry import Grid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def ds_str(v: float) -> str:
    """Decimal String with as many digits as fit in 16 characters."""
    return format_number_as_ds(float(v))


@dataclass
class SeriesHeader:
    """Series-level attributes; ``extra`` = any further (keyword -> value) attributes."""

    series_instance_uid: str
    series_number: int
    series_description: str
    acquisition_time: str  # HHMMSS.ffffff
    echo_time: float
    repetition_time: float
    scanning_sequence: str
    sequence_variant: str
    scan_options: str
    acquisition_type: str  # 2D | 3D
    image_type: list[str]
    rescale: tuple[float, float] | None = None  # (slope, intercept); None = tags absent
    contrast_agent: str | None = None
    temporal_position: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def study_dataset(attrs: dict[str, Any]) -> Dataset:
    """Dataset with patient/study/equipment attributes given by keyword."""
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def write_series(
    study: Dataset,
    header: SeriesHeader,
    grid: Grid,
    stored: np.ndarray,
    paths: list[Path],
    sop_uids: list[str],
    first_instance: int = 1,
) -> None:
    """Write ``stored`` (uint16, [k, j, i]) slice by slice to ``paths`` (one per slice).

    Slices are written in k order with InstanceNumber k + ``first_instance``; ``grid`` must be the grid the
    pixels were rendered on.
    """
    assert stored.dtype == np.uint16 and stored.shape == grid.shape
    base = Dataset()
    base.update(study)
    base.SOPClassUID = MR_IMAGE_STORAGE
    base.Modality = "MR"
    base.SeriesInstanceUID = header.series_instance_uid
    base.SeriesNumber = header.series_number
    base.SeriesDescription = header.series_description
    base.ImageType = header.image_type
    base.AcquisitionTime = header.acquisition_time
    base.ContentTime = header.acquisition_time
    base.SeriesTime = header.acquisition_time
    base.EchoTime = ds_str(header.echo_time)
    base.RepetitionTime = ds_str(header.repetition_time)
    base.ScanningSequence = header.scanning_sequence.split("\\")
    base.SequenceVariant = header.sequence_variant.split("\\")
    if header.scan_options:
        base.ScanOptions = header.scan_options.split("\\")
    base.MRAcquisitionType = header.acquisition_type
    base.ImageOrientationPatient = [ds_str(v) for v in np.concatenate([grid.row_cosine(), grid.column_cosine()])]
    base.PixelSpacing = [ds_str(grid.spacing[1]), ds_str(grid.spacing[0])]
    base.SliceThickness = ds_str(grid.slice_thickness)
    base.SpacingBetweenSlices = ds_str(grid.spacing[2])
    base.Rows = grid.size[1]
    base.Columns = grid.size[0]
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated = 16
    base.BitsStored = 12
    base.HighBit = 11
    base.PixelRepresentation = 0
    if header.rescale is not None:
        base.RescaleSlope = ds_str(header.rescale[0])
        base.RescaleIntercept = ds_str(header.rescale[1])
        base.RescaleType = "US"
    if header.contrast_agent:
        base.ContrastBolusAgent = header.contrast_agent
    if header.temporal_position is not None:
        base.TemporalPositionIdentifier = header.temporal_position
    for k, v in header.extra.items():
        setattr(base, k, v)

    # Encoding with pydicom costs ~3 ms a file (most of the generator's time). The
    # series-constant elements are encoded once by pydicom; per slice only the few elements
    # that change are encoded here and spliced in tag order (Explicit VR Little Endian).
    variable = (_SOP_INSTANCE_UID, _INSTANCE_NUMBER, _IPP, _SLICE_LOCATION, _PIXEL_DATA)
    segments = _encode_segments(base, variable)
    positions = grid.slice_positions()
    normal = grid.direction[:, 2]
    for k, (path, sop) in enumerate(zip(paths, sop_uids)):
        values = (
            _elem(_SOP_INSTANCE_UID, "UI", _pad(sop, b"\0")),
            _elem(_INSTANCE_NUMBER, "IS", _pad(str(k + first_instance))),
            _elem(_IPP, "DS", _pad("\\".join(ds_str(v) for v in positions[k]))),
            _elem(_SLICE_LOCATION, "DS", _pad(ds_str(positions[k] @ normal))),
            _elem(_PIXEL_DATA, "OW", stored[k].astype("<u2").tobytes()),
        )
        body = bytearray(segments[0])
        for v, seg in zip(values, segments[1:]):
            body += v
            body += seg
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(_file_meta(sop))
            f.write(body)


_SOP_INSTANCE_UID = 0x00080018
_INSTANCE_NUMBER = 0x00200013
_IPP = 0x00200032
_SLICE_LOCATION = 0x00201041
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}


def _pad(text: str, pad: bytes = b" ") -> bytes:
    b = text.encode("ascii")
    return b + pad if len(b) % 2 else b


def _elem(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element."""
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _file_meta(sop_uid: str) -> bytes:
    """Preamble, 'DICM' and the group 0002 file meta information (PS3.10 7.1)."""
    elems = (
        _elem(0x00020001, "OB", b"\x00\x01")
        + _elem(0x00020002, "UI", _pad(MR_IMAGE_STORAGE, b"\0"))
        + _elem(0x00020003, "UI", _pad(sop_uid, b"\0"))
        + _elem(0x00020010, "UI", _pad(ExplicitVRLittleEndian, b"\0"))
        + _elem(0x00020012, "UI", _pad(PYDICOM_IMPLEMENTATION_UID, b"\0"))
        + _elem(0x00020013, "SH", _pad("PHANTOM_1"))
    )
    return b"\0" * 128 + b"DICM" + _elem(0x00020000, "UL", struct.pack("<I", len(elems))) + elems


def _encode_segments(base: Dataset, variable: tuple[int, ...]) -> list[bytes]:
    """Encode ``base`` (without the ``variable`` tags) as len(variable)+1 byte segments,
    segment n holding the elements between variable tag n-1 and variable tag n."""
    bounds = (-1,) + variable + (0xFFFFFFFF,)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = Dataset()
        for elem in base:
            if lo < elem.tag < hi:
                part.add(elem)
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_dataset(fp, part)
        out.append(fp.getvalue())
    return out
