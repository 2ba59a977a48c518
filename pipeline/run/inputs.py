"""Checks of a run's inputs before any work starts (no Prefect, no output folder created).

Each problem is one :class:`RunInputError` whose message is a single line naming the option,
the path or the key at fault; the CLI prints it on stderr and exits non-zero.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from pydantic import ValidationError

from pipeline.core.config import ConfigFileError, IngestConfig, PipelineConfig, describe_config_error, load_config


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


ENGINES = ("threads", "dask")
_SCHEDULER = re.compile(r"^(?:(?P<scheme>tcp|tls)://)?(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


def check_engine(engine: str | None, scheduler_address: str | None, timeout_s: float = 3.0) -> None:
    """``--engine`` is threads or dask; a ``--scheduler`` address is ``[tcp://|tls://]host:port``
    and answers a TCP connection within ``timeout_s`` (a typo must not leave the run waiting)."""
    if engine is not None and engine not in ENGINES:
        raise RunInputError(f"--engine {engine!r}: choose from {', '.join(ENGINES)}")
    if scheduler_address is None:
        return
    if engine == "threads":
        raise RunInputError("--scheduler needs --engine dask (a Dask scheduler runs no threads engine)")
    match = _SCHEDULER.match(scheduler_address.strip())
    if match is None:
        raise RunInputError(f"--scheduler {scheduler_address!r}: expected tcp://host:port (e.g. tcp://10.0.0.5:8786)")
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise RunInputError(f"--scheduler {scheduler_address}: no Dask scheduler answers there ({exc})") from None


def check_prefect_server(work_pool: str, timeout_s: float = 10.0) -> str:
    """The Prefect server a deployment is registered with (``PREFECT_API_URL``) answers, and it
    has the work pool ``work_pool``; returns the API URL."""
    import urllib.error
    import urllib.request

    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        raise RunInputError("PREFECT_API_URL is not set: point it at a Prefect server, "
                            "e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api (docs/operations.md)")

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=timeout_s) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        health = status("/health")
        pool = status(f"/work_pools/{urllib.request.quote(work_pool)}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RunInputError(f"PREFECT_API_URL {url}: no Prefect server answers there ({exc})") from None
    if health != 200:
        raise RunInputError(f"PREFECT_API_URL {url}: the server answers {health} on /health")
    if pool == 404:
        raise RunInputError(f"--pool {work_pool!r}: no such work pool on {url} "
                            f"(create it: prefect work-pool create {work_pool} --type process)")
    if pool != 200:
        raise RunInputError(f"--pool {work_pool!r}: the server answers {pool}")
    return url


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


def check_catalogue(ingest: IngestConfig, timeout_s: int = 5) -> None:
    """``ingest.catalogue_url``: a PostgreSQL or SQLite URL whose database answers within
    ``timeout_s`` (a typo or a server down must not surface after the export was walked); not
    with pseudonymisation (the mapping and the key are kept beside a catalogue file)."""
    url = ingest.catalogue_url
    if not url:
        return
    import sqlalchemy as sa

    from pipeline.ingest.catalogue import display_location

    shown = "ingest.catalogue_url"
    if ingest.pseudonymise_patient_ids:
        raise RunInputError(f"{shown} cannot be used with ingest.pseudonymise_patient_ids (the catalogue of a "
                            "pseudonymised run stays in its private folder)")
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # the text may quote a password: not repeated
        raise RunInputError(f"{shown}: not a database URL (expected postgresql+psycopg://user@host:port/database)") from None
    shown = f"{shown} {display_location(url)}"
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise RunInputError(f"{shown}: only postgresql+psycopg:// and sqlite:/// catalogues are supported")
    args = {"connect_timeout": timeout_s} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sa.create_engine(parsed, connect_args=args)
    except ModuleNotFoundError as exc:
        raise RunInputError(f"{shown}: the database driver is not installed ({exc.name}); "
                            "pip install 'ablation-response[postgres]'") from None
    try:
        with engine.connect() as con:
            con.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise RunInputError(f"{shown}: the database does not answer ({reason})") from None
    finally:
        engine.dispose()


def check_run_inputs(export_dir: Path, out: Path, procedures: Path | None, config: Path | None,
                     device: str, engine: str | None = None, scheduler_address: str | None = None) -> str:
    """Every check of a run, cheapest first; returns the resolved device. ``engine`` and
    ``scheduler_address`` (the command line's) default to the config's ``execution`` section."""
    cfg = check_config(config)
    execution = cfg.execution
    check_procedures(procedures)
    check_catalogue(cfg.ingest)
    check_output_folder(export_dir, out)
    resolved = check_device(device)
    if scheduler_address is None and (engine or execution.engine) == "dask":
        scheduler_address = execution.scheduler_address
    check_engine(engine, scheduler_address)
    return resolved
