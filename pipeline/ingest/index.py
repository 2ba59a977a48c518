"""Index a PACS export directory: walk, read DICOM headers, catalogue, group, assign roles.

``index_export`` is the one entry point. It never raises on a bad file: every file, series
or study it cannot use becomes an :class:`ErrorRecord` (one row of ``errors.csv``) with a
human-readable reason.

Speed (DESIGN.md targets: >= 2,000 headers/s on 2 cores; an unchanged rerun of 10,000 files
<= 10 s): headers are read with ``stop_before_pixels`` and a tag whitelist, in worker
processes for large batches (pydicom parsing is pure Python, so threads would not help);
unchanged files (same path, size, mtime_ns) are served from the SQLite catalogue.
"""

from __future__ import annotations

import datetime as dt
import io
import multiprocessing
import os
import struct
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag
from pydicom.uid import UID

from pipeline.core.config import IngestConfig
from pipeline.core.records import ErrorRecord, SeriesRecord, StudyRecord
from pipeline.ingest.catalogue import Catalogue
from pipeline.ingest.series_geometry import SeriesGeometryError, check_volume, describe_stacks, parse_geometry_tag
from pipeline.ingest.series_roles import SeriesHeaders, assign_roles

STAGE = "ingest"

# keyword -> catalogue column. The whitelist keeps header parsing cheap.
_TAGS: dict[str, str] = {
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
    for kw in [*_TAGS, *_EXTRA_TAGS]
}
_SPECIFIC_TAGS = [tag for tag, _ in _TAG_VR.values()] + [BaseTag(tag_for_keyword(k)) for k in _SEQUENCE_TAGS]
_INT_COLUMNS = {"series_number", "temporal_position", "rows", "columns", "instance_number", "n_frames",
                "acquisition_number"}
_FLOAT_COLUMNS = {"echo_time", "repetition_time", "inversion_time", "trigger_time", "diffusion_b_value"}

_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Files smaller than this cannot hold a DICOM image header worth reading.
_MIN_DICOM_BYTES = 16
# Header bytes parsed from memory (an MR header is 2-20 KiB; longer ones are read from the file).
_HEADER_BYTES = 64 * 1024
# Below this many files to read, starting worker processes costs more than it saves.
_PARALLEL_MIN_FILES = 1000
_CHUNK = 200


@dataclass
class IndexResult:
    """What :func:`index_export` found.

    ``studies``: MR studies sorted by (patient, date), series roles assigned;
    ``series_headers``: SeriesInstanceUID -> summarised headers (used by the role rules);
    ``deferred``: files modified less than ``defer_recent_seconds`` ago (not indexed);
    ``deferred_studies``: studies left out because one of their files is being written.
    """

    studies: list[StudyRecord]
    errors: list[ErrorRecord]
    n_files_seen: int
    n_files_read: int
    n_files_cached: int
    n_deferred: int
    seconds: float
    n_files_removed: int = 0
    deferred: list[str] = field(default_factory=list)
    deferred_studies: list[str] = field(default_factory=list)
    series_headers: dict[str, SeriesHeaders] = field(default_factory=dict)
    dicomdir_files: int = 0  # files listed by the DICOMDIR(s) of the export


# --------------------------------------------------------------------------- walking
def _iter_files(root: Path, skip_dirs: Iterable[Path] = (),
                hidden: list[str] | None = None) -> Iterator[tuple[str, os.DirEntry]]:
    """``(relative posix path, entry)`` of every non-hidden regular file under ``root``.

    Directories in ``skip_dirs`` (e.g. the output folder, should it lie inside the export) are
    not entered. Directory symlinks are not followed (exports rarely use them and they can loop).
    Hidden entries (name starting with '.') are not entered; their relative paths are
    appended to ``hidden`` when given (each becomes a row of errors.csv).
    """
    skip = {os.path.realpath(d) for d in skip_dirs}
    stack = [(str(root), "")]
    while stack:
        abs_dir, rel_dir = stack.pop()
        try:
            entries = list(os.scandir(abs_dir))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                if hidden is not None:
                    hidden.append(f"{rel_dir}{entry.name}")
                continue
            rel = f"{rel_dir}{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not skip or os.path.realpath(entry.path) not in skip:
                        stack.append((entry.path, rel + "/"))
                elif entry.is_file():
                    yield rel, entry
            except OSError:
                continue


def _walk(root: Path, skip_dirs: Iterable[Path] = (), hidden: list[str] | None = None) -> list[tuple[str, int, int]]:
    """``[(relative posix path, size, mtime_ns)]`` of every file of :func:`_iter_files`.

    os.scandir gives the file type without a stat call; one stat per file remains.
    """
    out: list[tuple[str, int, int]] = []
    for rel, entry in _iter_files(root, skip_dirs, hidden):
        try:
            st = entry.stat()
        except OSError:
            continue
        out.append((rel, st.st_size, st.st_mtime_ns))
    return out


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


def find_first_dicom(export_dir: Path, skip_dirs: Iterable[Path] = ()) -> Path | None:
    """The first file under ``export_dir`` that looks like DICOM (None: the export holds none).

    Stops at the first hit, so it is cheap on a real export; reads 132 bytes per file.
    """
    for _, entry in _iter_files(Path(export_dir), skip_dirs):
        if looks_like_dicom(entry.path):
            return Path(entry.path)
    return None


# --------------------------------------------------------------------------- headers
def _value(ds: pydicom.Dataset, keyword: str) -> Any:
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
_KEYWORD_OF = {column: keyword for keyword, column in _TAGS.items()}


def _to_column(column: str, value: Any) -> tuple[Any, str]:
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
    rows, cols = _value(ds, "Rows"), _value(ds, "Columns")
    if not (rows and cols):
        return "image without Rows/Columns"
    try:
        expected = (
            int(rows) * int(cols) * int(_value(ds, "NumberOfFrames") or 1)
            * int(_value(ds, "SamplesPerPixel") or 1) * int(_value(ds, "BitsAllocated") or 16) // 8
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
        return pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_SPECIFIC_TAGS, force=not has_preamble)


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
    for kw, col in _TAGS.items():
        row[col], problem = _to_column(col, _value(ds, kw))
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
        row["echo_time"], _ = _to_column("echo_time", _group_attr(ds, "MREchoSequence", "EffectiveEchoTime"))
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


def _read_chunk(abs_paths: list[str]) -> list[dict[str, Any]]:
    return [read_header(p) for p in abs_paths]


def _read_all(abs_paths: list[str], workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(abs_paths) < _PARALLEL_MIN_FILES:
        return _read_chunk(abs_paths)
    chunks = [abs_paths[i : i + _CHUNK] for i in range(0, len(abs_paths), _CHUNK)]
    # forkserver, not fork: the caller may be a Prefect worker thread, and forking a process
    # that runs other threads can deadlock the child.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        return [row for rows in pool.map(_read_chunk, chunks) for row in rows]


# --------------------------------------------------------------------------- grouping
def _parse_date(text: str | None) -> dt.date | None:
    text = (text or "").strip().replace("-", "").replace(".", "")
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def _floats(text: str | None) -> tuple[float, ...] | None:
    """The numbers of a multi-valued catalogue text; None when absent, malformed or not finite."""
    try:
        values = tuple(float(v) for v in text.split("\\")) if text else None
    except ValueError:
        return None
    return values if values is not None and np.all(np.isfinite(values)) else None


def _summarise(uid: str, rows: list[dict[str, Any]]) -> SeriesHeaders:
    """One SeriesHeaders from the file rows of a series (earliest times, union of types)."""
    first = rows[0]

    def first_of(col: str) -> Any:
        return next((r[col] for r in rows if r[col] not in (None, "")), None)

    def min_of(col: str) -> Any:
        values = [r[col] for r in rows if r[col] not in (None, "")]
        return min(values) if values else None

    itypes: list[str] = []
    for r in rows:
        for v in (r["image_type"] or "").upper().split("\\"):
            if v and v not in itypes:
                itypes.append(v)
    return SeriesHeaders(
        series_instance_uid=uid,
        series_description=first_of("series_description") or "",
        series_number=first_of("series_number"),
        image_type=tuple(itypes),
        contrast_agent=first_of("contrast_agent") or "",
        acquisition_time=min_of("acquisition_time") or "",
        content_time=min_of("content_time") or "",
        series_time=min_of("series_time") or "",
        temporal_position=min_of("temporal_position"),
        echo_time_ms=min_of("echo_time"),
        repetition_time_ms=first_of("repetition_time"),
        inversion_time_ms=first_of("inversion_time"),
        scan_options=first_of("scan_options") or "",
        scanning_sequence=first_of("scanning_sequence") or "",
        iop=_floats(first["iop"]),
        rows=first["rows"],
        columns=first["columns"],
        n_files=len(rows),
        n_frames=max((r["n_frames"] or 1) for r in rows),
        manufacturer=first_of("manufacturer") or "",
    )


@dataclass
class _HeaderSlice:
    """A catalogue row seen as a slice, for the header-level geometry checks."""

    name: str
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    shape: tuple[int, int]
    stack_keys: dict[str, str]
    row: dict[str, Any]


# Catalogue columns that tell stacks apart inside one series, named as in the DICOM standard
# (the same attributes pipeline.imaging.volumes checks in the files).
_STACK_COLUMNS = {"EchoTime": "echo_time", "TemporalPositionIdentifier": "temporal_position",
                  "DiffusionBValue": "diffusion_b_value", "TriggerTime": "trigger_time",
                  "AcquisitionTime": "acquisition_time", "AcquisitionNumber": "acquisition_number"}


def _header_slices(rows: list[dict[str, Any]]) -> list[_HeaderSlice] | None:
    """The series' rows as slices; None when a row is multi-frame or lacks geometry (the
    checks then happen when the files are read, in pipeline.imaging.volumes)."""
    out = []
    for r in rows:
        iop, ipp, ps = _floats(r["iop"]), _floats(r["ipp"]), _floats(r["pixel_spacing"])
        if (r["n_frames"] or 1) > 1 or not (iop and ipp and ps) or len(iop) != 6 or len(ipp) != 3 \
                or len(ps) != 2 or not (r["rows"] and r["columns"]):
            return None
        keys = {kw: "" if r[col] is None else f"{r[col]:g}" if isinstance(r[col], float) else str(r[col])
                for kw, col in _STACK_COLUMNS.items()}
        out.append(_HeaderSlice(Path(r["path"]).name, np.asarray(ipp), np.asarray(iop), np.asarray(ps),
                                (int(r["rows"]), int(r["columns"])), keys, r))
    return out


def _split_stacks(series_uid: str, files: list[dict[str, Any]]) -> tuple[list[tuple[str, str, list[dict]]], str]:
    """Split a series holding several stacks (echoes, dynamic phases, b-values, repeats at the
    same positions) into one pseudo-series per stack.

    Returns ([(series key, description suffix, rows)], reason); a single entry keyed by the
    SeriesInstanceUID itself and an empty reason when the series is one stack. Split keys are
    ``<SeriesInstanceUID>#<attribute>=<value>`` (not UIDs: the original UID stays recoverable
    before the ``#``).
    """
    slices = _header_slices(files)
    if slices is None or len(slices) < 4:
        return [(series_uid, "", files)], ""
    iop = slices[0].iop
    normal = np.cross(iop[:3], iop[3:])
    positions = [float(s.ipp @ normal) for s in slices]
    if len({round(p / 0.01) for p in positions}) == len(positions):
        return [(series_uid, "", files)], ""  # no two slices at one position: one stack
    found = describe_stacks([s.stack_keys for s in slices], positions)
    if found is None:
        return [(series_uid, "", files)], ""  # duplicates without a distinguishing attribute
    keyword, counts = found
    parts = [(f"{series_uid}#{keyword}={value}", f" [{keyword} {value}]",
              [s.row for s in slices if s.stack_keys[keyword] == value]) for value in counts]
    listed = ", ".join(f"{v} ({n} slices)" for v, n in counts.items())
    return parts, f"several stacks in one series: {len(counts)} stacks by {keyword}: {listed}; split into {len(counts)} series"


def _geometry_problem(uid: str, number: Any, description: str, files: list[dict[str, Any]]) -> str:
    """Why the series' slices do not form one regular volume, from the headers ("" if they do)."""
    slices = _header_slices(files)
    if slices is None or len(slices) < 2:
        return ""
    try:
        check_volume(slices, f"series {number} '{description}'")
    except SeriesGeometryError as exc:
        return str(exc)
    return ""


def _common_dir(export_dir: Path, rels: list[str]) -> str:
    try:
        return os.path.commonpath([str(export_dir / r) for r in rels]) if rels else str(export_dir)
    except ValueError:
        return str(export_dir)


def group_catalogue_rows(
    export_dir: Path, rows: list[dict[str, Any]], cfg: IngestConfig, skip_studies: set[str]
) -> tuple[list[StudyRecord], dict[str, SeriesHeaders], list[ErrorRecord]]:
    """Catalogue rows (status ok) -> MR studies with their series and roles, headers per series, errors.

    Reads no file: everything comes from the rows. Studies in ``skip_studies`` are left out.
    """
    errors: list[ErrorRecord] = []

    def err(path: str, reason: str, pid: str = "", study: str = "", series: str = "") -> None:
        errors.append(ErrorRecord(path, pid or "", study or "", series or "", STAGE, reason))

    # Same instance exported twice (several exports merged): keep the first path.
    seen_sop: dict[str, str] = {}
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        sop = r["sop_instance_uid"]
        if sop and sop in seen_sop:
            err(str(export_dir / r["path"]), f"duplicate SOPInstanceUID (same instance as "
                f"{export_dir / seen_sop[sop]}) skipped", r["patient_id"], r["study_uid"], r["series_uid"])
            continue
        if sop:
            seen_sop[sop] = r["path"]
        if r["study_uid"] not in skip_studies:
            by_study[r["study_uid"]].append(r)

    studies: list[StudyRecord] = []
    headers: dict[str, SeriesHeaders] = {}
    for study_uid, srows in by_study.items():
        try:
            _group_study(export_dir, study_uid, srows, cfg, studies, headers, errors)
        except Exception as exc:  # noqa: BLE001 - one study's headers must never stop the batch
            # Listed without series, the study is assessed as indeterminate and keeps its row.
            pid = Counter(r["patient_id"] or "" for r in srows).most_common(1)[0][0] or f"UNKNOWN-{study_uid[-8:]}"
            errors.append(ErrorRecord.from_exception(exc, STAGE, "study could not be grouped from its headers",
                                                     path=_common_dir(export_dir, [r["path"] for r in srows]),
                                                     patient_id=pid, study_instance_uid=study_uid))
            studies[:] = [s for s in studies if s.study_instance_uid != study_uid]
            studies.append(StudyRecord(pid, study_uid, None, ""))
    studies.sort(key=lambda s: (s.patient_id, s.study_date is None,
                                s.study_date or dt.date.min, s.study_instance_uid))
    errors.extend(_stray_single_files(studies, export_dir))
    return studies, headers, errors


def _stray_single_files(studies: list[StudyRecord], export_dir: Path) -> list[ErrorRecord]:
    """A warning row for each study of one file that has the patient, date and series
    description of a series of another study: most likely a file of that study exported with
    a wrong StudyInstanceUID (it is still listed, and will be indeterminate)."""
    rows = []
    for lone in studies:
        files = [f for s in lone.series for f in s.files]
        if len(files) != 1:
            continue
        description = lone.series[0].series_description
        twins = [other for other in studies if other is not lone and other.patient_id == lone.patient_id
                 and other.study_date == lone.study_date
                 and any(s.series_description == description for s in other.series)]
        if twins:
            rows.append(ErrorRecord(
                str(files[0]), lone.patient_id, lone.study_instance_uid, lone.series[0].series_instance_uid, STAGE,
                f"warning: a study of one file with the patient, date and series description '{description}' of "
                f"study {twins[0].study_instance_uid}: a file of that study with a wrong StudyInstanceUID?"))
    return rows


def _group_study(export_dir: Path, study_uid: str, srows: list[dict[str, Any]], cfg: IngestConfig,
                 studies: list[StudyRecord], headers: dict[str, SeriesHeaders], errors: list[ErrorRecord]) -> None:
    """Group one study's file rows into series (appended to ``studies``, ``headers``, ``errors``)."""

    def err(path: str, reason: str, pid: str = "", study: str = "", series: str = "") -> None:
        errors.append(ErrorRecord(path, pid or "", study or "", series or "", STAGE, reason))

    where = _common_dir(export_dir, [r["path"] for r in srows])
    pids = Counter(r["patient_id"] or "" for r in srows)
    pid = pids.most_common(1)[0][0]
    if len(pids) > 1:
        err(where, f"StudyInstanceUID shared by several PatientIDs {sorted(pids)}; "
            f"'{pid}' (most files) used", pid, study_uid)
    if not pid:
        pid = f"UNKNOWN-{study_uid[-8:]}"
        err(where, f"PatientID missing; study treated as its own patient '{pid}'", pid, study_uid)
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in srows:
        by_series[r["series_uid"]].append(r)
    modalities = Counter((r["modality"] or "").upper() for r in srows)
    if "MR" not in modalities:
        mods = ", ".join(sorted(m or "none" for m in modalities))
        err(where, f"non-MR study (modality {mods}) skipped", pid, study_uid)
        return
    first = min(srows, key=lambda r: r["path"])
    date = _majority_study_date(export_dir, srows, err, pid, study_uid)
    if date is None:
        date_text = next((first[c] for c in ("study_date", "series_date", "acquisition_date")
                          if first[c]), None)
        date = _parse_date(date_text)
    if date is None:
        err(where, "study date unknown (no valid StudyDate, SeriesDate or AcquisitionDate"
            + (f": '{date_text}'" if date_text else "") + ")", pid, study_uid)
    study = StudyRecord(pid, study_uid, date, first["study_description"] or "")
    unusable: dict[str, str] = {}
    for original_uid, all_files in by_series.items():
        all_files.sort(key=lambda r: r["path"])
        modality = (all_files[0]["modality"] or "").upper()
        if modality != "MR":
            err(_common_dir(export_dir, [r["path"] for r in all_files]),
                f"non-MR series (modality {modality or 'none'}) in an MR study skipped",
                pid, study_uid, original_uid)
            continue
        stacks, split_reason = _split_stacks(original_uid, all_files)
        if split_reason:
            err(_common_dir(export_dir, [r["path"] for r in all_files]), split_reason, pid, study_uid,
                original_uid)
        for series_uid, suffix, files in stacks:
            h = headers[series_uid] = _summarise(series_uid, files)
            h.series_description += suffix
            if problem := _geometry_problem(series_uid, h.series_number, h.series_description, files):
                unusable[series_uid] = problem
            study.series.append(SeriesRecord(
                patient_id=pid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                series_number=h.series_number,
                series_description=h.series_description,
                modality=modality,
                manufacturer=files[0]["manufacturer"] or "",
                files=[export_dir / r["path"] for r in files],
            ))
    study.series.sort(key=lambda s: (s.series_number is None, s.series_number or 0,
                                     s.series_instance_uid))
    errors.extend(assign_roles(study, headers, cfg, unusable))
    studies.append(study)


def _majority_study_date(export_dir: Path, srows: list[dict[str, Any]], err, pid: str,
                         study_uid: str) -> dt.date | None:
    """The StudyDate most files of the study carry (ties: the first file's by path), or None
    when no file has a valid one. Every file whose StudyDate is invalid or another date gets a
    row of errors.csv: one bad file (e.g. '20231345') no longer undates the whole study."""
    rows = sorted(srows, key=lambda r: r["path"])
    dates = [_parse_date(r["study_date"]) for r in rows]
    counts = Counter(d for d in dates if d is not None)
    if not counts:
        return None
    date, n = counts.most_common(1)[0]
    for r, d in zip(rows, dates):
        if r["study_date"] and d != date:
            what = "is not a valid date" if d is None else "differs"
            err(str(export_dir / r["path"]), f"StudyDate '{r['study_date'][:40]}' {what}: study dated "
                f"{date.isoformat()} from {n} of {len(rows)} files", pid, study_uid, r["series_uid"])
    return date


def _missing_from_dicomdir(export_dir: Path, listed: dict[str, list[str]], present: set[str]) -> list[ErrorRecord]:
    """Files a DICOMDIR lists that are not in the export (an incomplete copy of the media).

    Every file is found by walking the export whether a DICOMDIR lists it or not (exports are
    often copied together with files the index does not know); the index is used to say
    what is missing.

    File IDs are matched case-insensitively: media written with ISO 9660 upper-case names are
    often copied onto file systems that change the case.
    """
    lower = {p.lower() for p in present}
    errors = []
    for dicomdir, refs in listed.items():
        for ref in refs:
            if ref.lower() not in lower:
                errors.append(ErrorRecord(str(export_dir / ref), "", "", "", STAGE,
                                          "listed in DICOMDIR but missing from the export"))
    return errors


# --------------------------------------------------------------------------- entry point
def index_export(
    export_dir: Path, catalogue_path: Path, cfg: IngestConfig, *, workers: int | None = None,
    skip_dirs: Iterable[Path] = (),
) -> IndexResult:
    """Index ``export_dir`` into the SQLite catalogue at ``catalogue_path`` and group it.

    Only files that are new or whose (size, mtime_ns) changed are read; files gone from
    the export are dropped from the catalogue. Files modified less than
    ``cfg.defer_recent_seconds`` ago are deferred (not read), and so is every study they
    belong to (their study UID is peeked at, nothing is stored), so that a study still being
    copied is never processed half-written. ``workers``: header-reading processes (default:
    the CPUs this process may use). ``skip_dirs``: folders never walked (the output folder,
    should it lie inside the export: its DICOM SEG/SR must not become inputs). Never raises on bad files; raises only if
    ``export_dir`` is not a directory or the catalogue cannot be opened.
    """
    t0 = time.perf_counter()
    export_dir = Path(export_dir).resolve()
    if not export_dir.is_dir():
        raise NotADirectoryError(f"export directory not found: {export_dir}")
    if workers is None:
        workers = cfg.workers
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    catalogue_path = Path(catalogue_path).resolve()

    hidden: list[str] = []
    found = _walk(export_dir, skip_dirs, hidden)
    # Never index the catalogue itself if it lives inside the export.
    found = [f for f in found if not str(export_dir / f[0]).startswith(str(catalogue_path))]
    now_ns = time.time_ns()
    defer_ns = int(cfg.defer_recent_seconds * 1e9)
    deferred = [rel for rel, _, mtime in found if defer_ns and now_ns - mtime < defer_ns]
    deferred_set = set(deferred)

    with Catalogue(catalogue_path, export_dir) as cat:
        known = cat.signatures()
        present = {rel for rel, _, _ in found}
        to_read = [(rel, size, mtime) for rel, size, mtime in found
                   if rel not in deferred_set and known.get(rel) != (size, mtime)]
        removed = [rel for rel in known if rel not in present or rel in deferred_set]
        new_rows = _read_all([str(export_dir / rel) for rel, _, _ in to_read], workers)
        with cat.transaction():
            cat.delete(removed)
            cat.upsert(
                {**row, "path": rel, "size": size, "mtime_ns": mtime}
                for (rel, size, mtime), row in zip(to_read, new_rows)
            )
        rows = list(cat.rows())
        listed = cat.dicomdir_refs()

    errors = [
        ErrorRecord(str(export_dir / r["path"]), r["patient_id"] or "", r["study_uid"] or "",
                    r["series_uid"] or "", STAGE, r["reason"])
        for r in rows if r["status"] == "error" or (r["status"] == "ok" and r["reason"])
    ]
    errors.extend(_missing_from_dicomdir(export_dir, listed, present))
    # Hidden entries are skipped (OS metadata such as .DS_Store, ._* AppleDouble files, .Trash),
    # but said: a hidden folder may hold a whole study. The catalogue's own files are not listed.
    errors.extend(ErrorRecord(str(export_dir / rel), "", "", "", STAGE,
                              f"hidden {'folder' if (export_dir / rel).is_dir() else 'file'} skipped "
                              "(name starts with '.')")
                  for rel in sorted(hidden) if not str(export_dir / rel).startswith(str(catalogue_path)))
    # Studies touched by a file still being written wait for the next run.
    deferred_studies = sorted({
        r["study_uid"] for r in (read_header(str(export_dir / rel)) for rel in deferred)
        if r.get("study_uid")
    })
    studies, headers, group_errors = group_catalogue_rows(
        export_dir, [r for r in rows if r["status"] == "ok"], cfg, set(deferred_studies)
    )
    errors.extend(group_errors)
    return IndexResult(
        studies=studies,
        errors=errors,
        n_files_seen=len(found),
        n_files_read=len(to_read),
        n_files_cached=len(found) - len(to_read) - len(deferred),
        n_deferred=len(deferred),
        seconds=time.perf_counter() - t0,
        n_files_removed=len([rel for rel in known if rel not in present]),
        deferred=[str(export_dir / rel) for rel in deferred],
        deferred_studies=deferred_studies,
        series_headers=headers,
        dicomdir_files=sum(len(v) for v in listed.values()),
    )
