"""Atomic file writing and CSV cells, shared by every stage that writes a file.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
crash never leaves a half-written output and a rerun can trust what it finds. Every CSV cell goes
through :func:`csv_cell` (a cell a spreadsheet would run as a formula is neutralised).
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import SimpleITK as sitk

# --------------------------------------------------------------------------- atomic writes
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc/self/status).

    Elsewhere it is set and restored at once (``os.umask`` has no read-only form), under a lock.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _final_mode(mode: int | None) -> int:
    """What ``open()`` would give a new file (0o666 & ~umask), or ``mode`` (e.g. 0o600 for a key).

    ``tempfile.mkstemp`` creates its file 0600 whatever the umask; outputs shared with a group
    (a results folder on a share) need the permissions any other program would have given them.
    """
    return mode if mode is not None else 0o666 & ~current_umask()


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename); permissions by the umask,
    or ``mode`` (set before the file appears under its name: a secret is never readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _final_mode(mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


# One lock around every SimpleITK image file read and write of the process. Why: ITK's NIfTI I/O
# keeps global state and is not thread-safe (SimpleITK/SimpleITK#74: concurrent ReadImage may
# segfault); the batch flow's patients run in threads, and a crash of that kind was seen in the
# test suite once each worker started reading its images back. I/O is a small part of a study.
_IMAGE_IO_LOCK = threading.Lock()


def read_image(path: Path | str, pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    """``sitk.ReadImage`` serialised with the other image I/O of the process."""
    with _IMAGE_IO_LOCK:
        return sitk.ReadImage(str(path), pixel_type)


def atomic_write_image(image: sitk.Image, path: Path) -> None:
    """Write a SimpleITK image (format from the final suffix, e.g. .nii.gz) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        with _IMAGE_IO_LOCK:
            sitk.WriteImage(image, tmp, useCompression=True)
        os.chmod(tmp, _final_mode(None))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_transform(transform: sitk.Transform, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tfm")
    os.close(fd)
    try:
        sitk.WriteTransform(transform, tmp)
        os.chmod(tmp, _final_mode(None))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



_FORMULA_START = re.compile(r"^[\s]*[=+\-@]|^[\t\r\n]")
# A plain number (e.g. a negative change in %) is data, not a formula.
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# C0 control characters but tab, LF and CR (kept, quoted by the csv module), and DEL: a NUL
# byte breaks many CSV readers; none is ever meaningful in a reason or an identifier.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def csv_cell(value: Any) -> str:
    """Any value as inert CSV cell text: control characters removed, and a quote (') before a
    text a spreadsheet would evaluate (from a DICOM header, a reason or a typed comment)."""
    text = _CONTROL.sub("", "" if value is None else str(value))
    if _FORMULA_START.match(text) and not _NUMBER.match(text.strip()):
        return "'" + text
    return text


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """CSV text of ``rows`` (header first); every cell goes through :func:`csv_cell`, the one
    place where text reaches a CSV cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_cell(row.get(k)) for k in columns} for row in rows)
    return buffer.getvalue()
