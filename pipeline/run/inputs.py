"""Checks of a run's inputs before any work starts (no Prefect, no output folder created).

Each problem is one :class:`RunInputError` whose message is a single line naming the option,
the path or the key at fault; the CLI prints it on stderr and exits non-zero.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from pipeline.core.config import ConfigFileError, PipelineConfig, describe_config_error, load_config


class RunInputError(ValueError):
    """An input that makes the run pointless; the message is one line for the user."""


def check_config(config: Path | None) -> PipelineConfig:
    """Load and validate ``config``; a problem becomes one line naming the key and the file."""
    try:
        return load_config(config)
    except ValidationError as exc:
        raise RunInputError(describe_config_error(exc, config)) from None
    except (ConfigFileError, OSError) as exc:
        raise RunInputError(str(exc)) from None


def check_procedures(procedures: Path | None) -> None:
    from pipeline.longitudinal.timeline import ProceduresFileError, read_procedures

    if procedures is None:
        return
    try:
        read_procedures(procedures)
    except (ProceduresFileError, ValueError, OSError) as exc:
        raise RunInputError(str(exc)) from None


def check_device(device: str) -> str:
    """``auto | cpu | cuda`` resolved now: 'gpu' or 'cuda' without a CUDA device is refused."""
    from pipeline.core.devices import resolve_device

    try:
        return resolve_device(device)
    except ValueError as exc:
        raise RunInputError(f"--device: {exc}") from None


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output_folder(export_dir: Path, out: Path) -> None:
    """``out`` must be a folder (or creatable), writable, and outside the export."""
    export = Path(export_dir).resolve()
    target = Path(out).resolve()
    if target == export or target.is_relative_to(export):
        raise RunInputError(f"--out {out} lies inside the export directory {export_dir}: its outputs "
                            "(DICOM SEG/SR) would be read back as inputs; choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise RunInputError(f"--out {out} is an existing file, not a folder")
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise RunInputError(f"--out {out} cannot be created: {existing} is a file, not a folder")
    if not _writable(existing):
        what = "output folder" if existing == target else f"folder {existing} (to create --out {out})"
        raise RunInputError(f"cannot write to the {what}: permission denied on {existing}")


def check_export_has_dicom(export_dir: Path, out: Path | None = None) -> None:
    """At least one file of the export looks like DICOM (the output folder is not looked at)."""
    from pipeline.ingest.walk import find_first_dicom

    if find_first_dicom(export_dir, [out] if out is not None else ()) is None:
        raise RunInputError(f"no DICOM file found in {export_dir} (nothing to assess)")


def check_run_inputs(export_dir: Path, out: Path, procedures: Path | None, config: Path | None,
                     device: str) -> str:
    """Every check of a run, cheapest first; returns the resolved device."""
    check_config(config)
    check_procedures(procedures)
    check_output_folder(export_dir, out)
    return check_device(device)
