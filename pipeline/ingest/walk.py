"""Find the candidate files of an export.

Owns walking the export folder (hidden entries and skipped folders such as the output folder
left out, directory symlinks not followed), the deferral of files modified too recently (still
being copied) and :func:`find_first_dicom`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.ingest.headers import looks_like_dicom


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


def walk(root: Path, skip_dirs: Iterable[Path] = (), hidden: list[str] | None = None) -> list[tuple[str, int, int]]:
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


def recently_modified(found: list[tuple[str, int, int]], seconds: float) -> list[str]:
    """Relative paths of the files of :func:`walk` modified less than ``seconds`` ago (0: none):
    files that may still be being copied, deferred to the next run."""
    now_ns = time.time_ns()
    defer_ns = int(seconds * 1e9)
    return [rel for rel, _, mtime in found if defer_ns and now_ns - mtime < defer_ns]


def find_first_dicom(export_dir: Path, skip_dirs: Iterable[Path] = ()) -> Path | None:
    """The first file under ``export_dir`` that looks like DICOM (None: the export holds none).

    Stops at the first hit, so it is cheap on a real export; reads 132 bytes per file.
    """
    for _, entry in _iter_files(Path(export_dir), skip_dirs):
        if looks_like_dicom(entry.path):
            return Path(entry.path)
    return None
