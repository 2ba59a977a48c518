"""Helpers of the review tests: a throw-away PostgreSQL server, free ports, flagged studies."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

from pipeline.review.db import FlaggedStudy

CHROMIUM = "/usr/bin/chromium"
# Never `playwright install`: Debian's chromium, no network of its own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flagged(uid: str = "1.2.3.4", category: str = "local_tumour_progression", confidence: float = 0.9,
            **changes) -> FlaggedStudy:
    study = FlaggedStudy(
        study_instance_uid=uid, patient_id="P-001", study_date="2026-03-01", timepoint="follow_up",
        days_since_ablation=180, baseline_study_instance_uid="1.2.3.1",
        study_folder=f"patients/P-001/2026-03-01_{uid.replace('.', '')[-8:]}",
        baseline_folder="patients/P-001/2025-10-01_00001231", post_series_uid="1.2.3.4.5",
        baseline_post_series_uid="1.2.3.1.5", machine_category=category, confidence=confidence,
        flag_reasons=f"{category}: nodular focus", rule_id="R2")
    return replace(study, **changes)


class PostgresServer:
    """``initdb`` + ``pg_ctl`` of Debian's postgresql into a temporary folder, on a free port.

    PostgreSQL refuses to run as root, so when the tests run as root (CI) the server runs as
    the ``postgres`` user that Debian's package creates. ``why_not`` says why none can start.
    """

    def __init__(self) -> None:
        self.url: str | None = None
        self.why_not = ""
        self._dir: Path | None = None
        self._bin = self._find_bin()
        self._as: list[str] = []

    @staticmethod
    def _find_bin() -> Path | None:
        for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
            if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
                return Path(d)
        found = shutil.which("pg_ctl")
        return Path(found).parent if found and shutil.which("initdb") else None

    def start(self) -> bool:
        if self._bin is None:
            self.why_not = "PostgreSQL is not installed (apt-get install postgresql)"
            return False
        self._dir = Path(tempfile.mkdtemp(prefix="review-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                self.why_not = "running as root and there is no 'postgres' user to run the server"
                return False
            os.chown(self._dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        data, port = self._dir / "data", free_port()
        try:
            subprocess.run([*self._as, str(self._bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                            "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
            options = f"-p {port} -k {self._dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            subprocess.run([*self._as, str(self._bin / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                            str(self._dir / "server.log"), "-w", "-t", "60", "start"],
                           check=True, capture_output=True, timeout=90)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            self.why_not = f"PostgreSQL could not start: {exc} {detail.decode(errors='replace')[-300:]}"
            return False
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        return True

    def stop(self) -> None:
        if self._dir is None:
            return
        if self.url:
            subprocess.run([*self._as, str(self._bin / "pg_ctl"), "-D", str(self._dir / "data"), "-m", "fast",
                            "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self._dir, ignore_errors=True)
