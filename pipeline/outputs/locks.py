"""One patient is assessed by one run at a time: an exclusive lock per patient folder (issue 20).

Two runs may share an output folder: the nightly deployment overlapping a manual rerun, or two
flows feeding the same share from a Dask cluster. Both would write the same patient's files.
``patient_lock`` takes an exclusive ``flock`` on ``OUT/.locks/<patient folder>.lock`` for the
whole patient; the second run waits for it, then finds the first one's results in the study
store and reuses them (same inputs, same config: same cache keys).

Why ``flock`` and not a lease row in a database: the kernel drops the lock when its process dies
(a killed Dask worker, an out-of-memory kill), so there is no stale lease to expire or to clean
up, and no clock to trust. It holds between processes on one machine and between NFSv4 clients
(whose servers implement it as a byte-range lock); on a filesystem without locks (some SMB
mounts, old NFSv3 without lockd) ``flock`` raises and the run says so instead of running unlocked.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR = ".locks"


class PatientBusyError(RuntimeError):
    """Another run held the patient's lock for longer than the wait allowed."""


@contextmanager
def patient_lock(out_dir: Path, patient_folder: str, timeout_s: float, poll_s: float = 0.5) -> Iterator[Path]:
    """Hold the exclusive lock of ``patient_folder`` (its name under ``OUT/patients``) while the
    block runs; wait up to ``timeout_s`` for another holder, then raise :class:`PatientBusyError`."""
    folder = Path(out_dir) / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{patient_folder}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PatientBusyError(f"patient folder {patient_folder} is being assessed by another run "
                                           f"(lock {path} held for over {timeout_s:g} s)") from None
                time.sleep(poll_s)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
