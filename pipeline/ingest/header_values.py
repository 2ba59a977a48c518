"""The header tags ingest reads and the validation of their values.

Owns the tag whitelist (DICOM keyword -> catalogue column), the decoding of one element's value
from its raw bytes (:func:`header_value`) and the check that turns it into a catalogue value
(:func:`to_column`: a numeric tag that is not a finite number in range is left empty, with the
reason). Used by :mod:`pipeline.ingest.headers`.
"""

from __future__ import annotations

import struct
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag

# keyword -> catalogue column. The whitelist keeps header parsing cheap.
TAGS: dict[str, str] = {
    "PatientID": "patient_id",
    "StudyInstanceUID": "study_uid",
    "StudyDate": "study_date",
    "SeriesDate": "series_date",
    "AcquisitionDate": "acquisition_date",
    "StudyDescription": "study_description",
    "SeriesInstanceUID": "series_uid",
    "SeriesNumber": "series_number",
    "SeriesDescription": "series_description",
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "SOPClassUID": "sop_class_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "ImageType": "image_type",
    "ContrastBolusAgent": "contrast_agent",
    "AcquisitionTime": "acquisition_time",
    "ContentTime": "content_time",
    "SeriesTime": "series_time",
    "TemporalPositionIdentifier": "temporal_position",
    "EchoTime": "echo_time",
    "RepetitionTime": "repetition_time",
    "InversionTime": "inversion_time",
    "ScanOptions": "scan_options",
    "ScanningSequence": "scanning_sequence",
    "SequenceName": "sequence_name",
    "ImageOrientationPatient": "iop",
    "ImagePositionPatient": "ipp",
    "PixelSpacing": "pixel_spacing",
    "Rows": "rows",
    "Columns": "columns",
    "InstanceNumber": "instance_number",
    "NumberOfFrames": "n_frames",
    "AcquisitionNumber": "acquisition_number",
    "TriggerTime": "trigger_time",
    "DiffusionBValue": "diffusion_b_value",
}
# Read too (for the pixel-size check) but not catalogued.
_EXTRA_TAGS = ["BitsAllocated", "SamplesPerPixel"]
# Enhanced (multi-frame) objects keep geometry, echo time and contrast in sequences.
_SEQUENCE_TAGS = ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
                  "ContrastBolusAgentSequence"]
# As BaseTag objects: pydicom converts keywords to tags on every call otherwise.
_TAG_VR = {
    kw: (BaseTag(tag_for_keyword(kw)), dictionary_VR(tag_for_keyword(kw)))
    for kw in [*TAGS, *_EXTRA_TAGS]
}
SPECIFIC_TAGS = [tag for tag, _ in _TAG_VR.values()] + [BaseTag(tag_for_keyword(k)) for k in _SEQUENCE_TAGS]
_INT_COLUMNS = {"series_number", "temporal_position", "rows", "columns", "instance_number", "n_frames",
                "acquisition_number"}
_FLOAT_COLUMNS = {"echo_time", "repetition_time", "inversion_time", "trigger_time", "diffusion_b_value"}


def header_value(ds: pydicom.Dataset, keyword: str) -> Any:
    """The value of ``keyword`` as text (multi-values joined by a backslash) or int (US).

    Hand-decoded from the raw element bytes: every whitelisted tag has a text VR (or US),
    and pydicom's general value conversion (validation, MultiValue, DSfloat objects) costs
    more than half of the per-file time. Anything unusual falls back to pydicom.
    """
    tag, vr = _TAG_VR[keyword]
    try:
        elem = ds.get_item(tag)
    except Exception:  # noqa: BLE001 - a malformed element is "absent", not a crash
        return None
    if elem is None:
        return None
    raw = getattr(elem, "value", None)
    if isinstance(raw, bytes) and getattr(elem, "is_raw", False):
        if getattr(elem, "VR", None) not in (None, "UN"):
            vr = elem.VR
        if vr == "US":
            if len(raw) < 2:
                return None
            return int.from_bytes(raw[:2], "little" if elem.is_little_endian else "big")
        if vr in ("FD", "FL"):
            size = 8 if vr == "FD" else 4
            if len(raw) < size:
                return None
            fmt = ("<" if elem.is_little_endian else ">") + ("d" if vr == "FD" else "f")
            return struct.unpack(fmt, raw[:size])[0]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # ISO_IR 100, the usual European character set
        text = "\\".join(part.strip(" \x00") for part in text.split("\\"))
        return text or None
    try:
        v = ds.get(keyword)
    except Exception:  # noqa: BLE001
        return None
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x).strip() for x in v)
    return v


# Integer tags are IS (or US): at most 2^31 - 1 in magnitude (PS3.5 6.2), and SQLite stores
# no integer beyond 2^63. Float tags (times in ms, b-values) beyond 1e12 are corrupt.
_INT_LIMIT = 2**31
_FLOAT_LIMIT = 1e12
_KEYWORD_OF = {column: keyword for keyword, column in TAGS.items()}


def to_column(column: str, value: Any) -> tuple[Any, str]:
    """(catalogue value, problem): a numeric tag that is not a finite number in range is
    None with the reason why (the file stays usable: these tags only help to sort and name)."""
    if value is None:
        return None, ""
    if column in _INT_COLUMNS or column in _FLOAT_COLUMNS:
        text = str(value).split("\\")[0].strip()
        try:
            number = float(text)
        except ValueError:
            return None, f"{_KEYWORD_OF[column]} {text[:40]!r} is not a number: ignored"
        limit = _INT_LIMIT if column in _INT_COLUMNS else _FLOAT_LIMIT
        if not (abs(number) < limit):  # also false for nan
            return None, f"{_KEYWORD_OF[column]} {text[:40]!r} is not a finite number below {limit:g}: ignored"
        return (int(number) if column in _INT_COLUMNS else number), ""
    return str(value).strip(), ""
