"""Read one file's DICOM header into a catalogue row.

Owns :func:`read_header` (status "ok", "error" with the reason, or "dicomdir"): the cheap
DICOM test, the header parse (``stop_before_pixels``, tag whitelist, from memory when short),
the SOP class and pixel-data truncation checks, the fields Enhanced (multi-frame) objects keep
in functional groups, and DICOMDIR listings. Tags and value checks: :mod:`pipeline.ingest.header_values`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID

from pipeline.ingest.header_values import SPECIFIC_TAGS, TAGS, header_value, to_column
from pipeline.ingest.series_geometry import parse_geometry_tag

_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Files smaller than this cannot hold a DICOM image header worth reading.
_MIN_DICOM_BYTES = 16
# Header bytes parsed from memory (an MR header is 2-20 KiB; longer ones are read from the file).
_HEADER_BYTES = 64 * 1024


def looks_like_dicom(path: str | Path) -> bool:
    """The cheap test of :func:`read_header`: a DICM preamble, or a raw stream's first tag."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return False
    if len(head) < _MIN_DICOM_BYTES:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else ""


def _is_image_sop(uid: str) -> bool | None:
    """True/False for a known SOP class, None for an unknown (private) one."""
    name = _sop_class_name(uid)
    if not name:
        return None
    return "Image Storage" in name and "Secondary Capture" not in name


def _encapsulated_check(abs_path: str, offset: int, size: int) -> str:
    """Walk the items of encapsulated (compressed) pixel data from ``offset`` without reading
    their contents: each item header says where the next one starts, so a file cut short or
    overwritten breaks the chain. Cheap (8 bytes read per fragment), so every file is checked,
    including those of series no stage will decode. Returns an error reason or ""."""
    fragments = 0
    with open(abs_path, "rb") as f:
        f.seek(offset)
        while True:
            head = f.read(8)
            if len(head) < 8:  # no sequence delimiter: tolerated after whole items, as decoders do
                break
            group, elem, length = struct.unpack("<HHL", head)
            if (group, elem) == (0xFFFE, 0xE0DD):
                break
            if (group, elem) != (0xFFFE, 0xE000):
                return (f"corrupt DICOM: compressed pixel data holds ({group:04X},{elem:04X}) where a "
                        f"fragment must be (byte {f.tell() - 8})")
            if f.tell() + length > size:
                return (f"truncated DICOM: compressed pixel data fragment of {length} bytes runs past the "
                        f"end of the file ({size} bytes)")
            f.seek(length, os.SEEK_CUR)
            fragments += 1
    if fragments < 2:  # the first item is the (possibly empty) Basic Offset Table
        return "corrupt DICOM: compressed pixel data without any fragment"
    return ""


def _pixel_check(fp, size: int, ds: pydicom.Dataset, abs_path: str) -> str:
    """Cheap truncation test: compare the bytes left in the file with Rows*Columns*... .

    ``fp`` stands where ``stop_before_pixels`` stopped, i.e. on the Pixel Data element.
    Returns an error reason, or "" when the pixel data is (at least) complete in size.
    """
    tag_bytes = fp.read(4)
    if len(tag_bytes) < 4:
        return f"truncated DICOM: file ends after {size} bytes, before the pixel data"
    implicit, little = ds.original_encoding
    endian = "<" if little is not False else ">"
    group, elem = struct.unpack(endian + "HH", tag_bytes)
    if (group, elem) not in _PIXEL_TAGS:
        return ""
    if implicit:
        raw = fp.read(4)
        header = 8
    else:
        fp.read(4)  # VR (OB/OW/OF) + 2 reserved bytes
        raw = fp.read(4)
        header = 12
    if len(raw) < 4:
        return "truncated DICOM: file ends inside the pixel data element header"
    (length,) = struct.unpack(endian + "L", raw)
    if length == 0xFFFFFFFF:
        # Encapsulated (compressed): sizes are per fragment; the decoder checks the contents.
        return _encapsulated_check(abs_path, fp.tell(), size)
    available = size - fp.tell()
    rows, cols = header_value(ds, "Rows"), header_value(ds, "Columns")
    if not (rows and cols):
        return "image without Rows/Columns"
    try:
        expected = (
            int(rows) * int(cols) * int(header_value(ds, "NumberOfFrames") or 1)
            * int(header_value(ds, "SamplesPerPixel") or 1) * int(header_value(ds, "BitsAllocated") or 16) // 8
        )
    except (TypeError, ValueError):
        expected = length
    if available < min(length, expected):
        return f"truncated DICOM: pixel data has {max(available, 0)} of {length} bytes"
    if length < expected:
        return f"corrupt DICOM: pixel data holds {length} bytes, image needs {expected}"
    return ""


def _dcmread_header(fp, has_preamble: bool) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=SPECIFIC_TAGS, force=not has_preamble)


def _parse_header(fp, size: int, has_preamble: bool) -> tuple[pydicom.Dataset, Any]:
    """Parse the header from the file's first bytes held in memory, else from the file.

    pydicom asks the file for its position at every element; on a buffered file that costs
    more than the reading itself, so the first ``_HEADER_BYTES`` are parsed from memory. A
    header longer than that (or cut short inside it) is parsed again from the file, so the
    result and the truncation reasons are the same. Returns (dataset, stream positioned where
    parsing stopped, i.e. on the pixel data element).
    """
    fp.seek(0)
    prefix = fp.read(_HEADER_BYTES)
    # A deflated dataset is one zlib stream: a cut prefix could inflate to a partial header.
    if size <= len(prefix) or _DEFLATED.encode() not in prefix[:2048]:
        mem = io.BytesIO(prefix)
        try:
            ds = _dcmread_header(mem, has_preamble)
            # The truncation check reads the pixel data element's header (<= 12 bytes) after it.
            if size <= len(prefix) or mem.tell() + 12 <= len(prefix):
                return ds, mem
        except Exception:  # noqa: BLE001 - a header longer than the prefix: parse the file
            if size <= len(prefix):
                raise
    fp.seek(0)
    return _dcmread_header(fp, has_preamble), fp


def read_header(abs_path: str) -> dict[str, Any]:
    """Read one file's header fields into a catalogue row (without path/size/mtime).

    Returns ``{"status": "ok", ...}`` or ``{"status": "error", "reason": ..., ...}``; the
    identifiers found are kept on error rows too so errors.csv can name the study.
    """
    try:
        size = os.path.getsize(abs_path)
        with open(abs_path, "rb") as fp:
            head = fp.read(132)
            if size == 0:
                return {"status": "error", "reason": "empty file (0 bytes)"}
            if size < _MIN_DICOM_BYTES:
                return {"status": "error", "reason": f"not a DICOM file ({size} bytes)"}
            has_preamble = head[128:132] == b"DICM"
            if size < 132 and not head.strip(b"\x00"):
                return {"status": "error",
                        "reason": f"truncated DICOM: {size} bytes, ends inside the preamble"}
            # Without a preamble a raw DICOM stream starts with a group 0002 or 0008 tag.
            if not has_preamble and head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
                return {"status": "error", "reason": "not a DICOM file"}
            try:
                ds, fp = _parse_header(fp, size, has_preamble)
            except (EOFError, struct.error) as exc:
                return {"status": "error", "reason": f"truncated DICOM: {exc or type(exc).__name__}"}
            except Exception as exc:  # noqa: BLE001 - any parser failure is a file-level error
                why = f"{type(exc).__name__}: {exc}"
                if "end of file" in str(exc).lower() or "eof" in str(exc).lower():
                    return {"status": "error", "reason": f"truncated DICOM: {why}"}
                return {"status": "error", "reason": f"corrupt DICOM: {why}"}
            try:
                return _header_row(ds, fp, size, abs_path)
            except Exception as exc:  # noqa: BLE001 - a header value nobody foresaw is a file error
                return {"status": "error", "reason": f"corrupt DICOM header: {type(exc).__name__}: {exc}"}
    except OSError as exc:
        return {"status": "error", "reason": f"unreadable file: {exc.strerror or exc}"}


def _header_row(ds: pydicom.Dataset, fp, size: int, abs_path: str) -> dict[str, Any]:
    """The catalogue row of a parsed header (see :func:`read_header`). Every value is checked
    where it is read: a geometry tag that is present but invalid makes the file an error
    (it cannot be placed in its series); another numeric tag that is invalid is left empty
    and named in the row's ``reason`` (a warning row of errors.csv)."""
    row: dict[str, Any] = {}
    warnings_: list[str] = []
    for kw, col in TAGS.items():
        row[col], problem = to_column(col, header_value(ds, kw))
        if problem:
            warnings_.append(problem)
    meta = getattr(ds, "file_meta", None)
    sop = row["sop_class_uid"] or str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    row["sop_class_uid"] = sop or None
    row["transfer_syntax"] = str(getattr(meta, "TransferSyntaxUID", "") or "") or None
    if sop == _DICOMDIR_SOP:
        return _dicomdir_row(abs_path, row)
    if (row["n_frames"] or 1) > 1 or "SharedFunctionalGroupsSequence" in ds:
        _enhanced_fields(ds, row)
    is_image = _is_image_sop(sop) if sop else None
    if is_image is False:
        name = _sop_class_name(sop)
        what = "secondary capture image" if "Secondary Capture" in name else "non-image object"
        return {**row, "status": "error", "reason": f"{what} ({name}) skipped"}
    if is_image is None and not (row["rows"] and row["columns"]):
        if not sop and not row["study_uid"]:
            return {"status": "error", "reason": "not a DICOM file"}
        return {**row, "status": "error",
                "reason": f"non-image object (SOP Class {sop or 'missing'}) skipped"}
    # Truncation first: a header cut short also lacks the identifiers below.
    if row["transfer_syntax"] != _DEFLATED:
        problem = _pixel_check(fp, size, ds, abs_path)
        if problem:
            return {**row, "status": "error", "reason": problem}
    for column, keyword in (("study_uid", "StudyInstanceUID"),
                            ("series_uid", "SeriesInstanceUID")):
        if not row[column]:
            return {**row, "status": "error", "reason": f"missing {keyword}"}
    for column, keyword in (("ipp", "ImagePositionPatient"), ("iop", "ImageOrientationPatient"),
                            ("pixel_spacing", "PixelSpacing")):
        _, problem = parse_geometry_tag(keyword, row[column])
        if problem:
            return {**row, "status": "error", "reason": f"invalid geometry: {problem}; file left out of its series"}
    return {**row, "status": "ok", "reason": "; ".join(warnings_)}


def _first_item(ds: Any, keyword: str) -> Any:
    try:
        seq = ds.get(keyword) if ds is not None else None
    except Exception:  # noqa: BLE001 - a malformed sequence is "absent"
        return None
    return seq[0] if seq else None


def _group_attr(ds: pydicom.Dataset, sequence: str, keyword: str) -> Any:
    """An attribute of the shared functional groups, else of the first frame's (PS3.3 C.7.6.16)."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        item = _first_item(_first_item(ds, groups), sequence)
        if item is not None and item.get(keyword) not in (None, ""):
            return item.get(keyword)
    return None


def _enhanced_fields(ds: pydicom.Dataset, row: dict[str, Any]) -> None:
    """Fill the catalogue fields that an Enhanced (multi-frame) object holds in functional
    groups rather than at the top level: orientation, first frame position, pixel spacing,
    echo time, contrast agent. Top-level values, when present, are kept."""
    def text(value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return "\\".join(str(v) for v in value)
        return str(value)

    for column, sequence, keyword in (("iop", "PlaneOrientationSequence", "ImageOrientationPatient"),
                                      ("ipp", "PlanePositionSequence", "ImagePositionPatient"),
                                      ("pixel_spacing", "PixelMeasuresSequence", "PixelSpacing")):
        if not row[column]:
            row[column] = text(_group_attr(ds, sequence, keyword))
    if row["echo_time"] is None:
        row["echo_time"], _ = to_column("echo_time", _group_attr(ds, "MREchoSequence", "EffectiveEchoTime"))
    if not row["contrast_agent"]:
        item = _first_item(ds, "ContrastBolusAgentSequence")
        if item is not None:
            row["contrast_agent"] = str(item.get("CodeMeaning") or item.get("CodeValue") or "") or None


def dicomdir_references(abs_path: str) -> list[str]:
    """Paths (relative to the DICOMDIR's folder, POSIX) of the files a DICOMDIR lists."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(abs_path, force=True)
    refs = []
    for record in ds.get("DirectoryRecordSequence") or []:
        ref = record.get("ReferencedFileID")
        if ref:
            parts = [ref] if isinstance(ref, str) else list(ref)
            refs.append("/".join(str(p).strip() for p in parts))
    return refs


def _dicomdir_row(abs_path: str, row: dict[str, Any]) -> dict[str, Any]:
    """A DICOMDIR is an index of the export, not an image: status "dicomdir", and the files
    it lists (checked against the export by :func:`index_export`)."""
    try:
        refs = dicomdir_references(abs_path)
    except Exception as exc:  # noqa: BLE001 - an unreadable index is reported, never fatal
        return {**row, "status": "error", "reason": f"DICOMDIR unreadable: {type(exc).__name__}: {exc}"}
    return {**row, "status": "dicomdir", "reason": f"DICOMDIR listing {len(refs)} files",
            "dicomdir_refs": refs}
