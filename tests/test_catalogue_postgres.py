"""The catalogue on PostgreSQL (issue 20, docs/cluster.md): the rows SQLite holds, and two
flows writing one catalogue at once.

Every test runs on a throw-away PostgreSQL server (``initdb`` + ``pg_ctl`` of Debian's
``postgresql``, as the review database tests do) and is skipped, saying why, where none can
start. Each test gets a database of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.core.config import load_config
from pipeline.ingest.catalogue import Catalogue
from pipeline.ingest.index import index_export

_COUNT = iter(range(1000))


@pytest.fixture
def database(postgres):
    """The URL of an empty database on the throw-away server."""
    if postgres.url is None:
        pytest.skip(f"PostgreSQL run skipped: {postgres.why_not}")
    name = f"catalogue_{next(_COUNT)}"
    admin = sa.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    from phantom import generate_export

    root = tmp_path_factory.mktemp("pg-export")
    generate_export(root / "data", n_patients=1, seed=5)
    return root / "data" / "export"


def test_a_postgresql_catalogue_holds_the_rows_and_studies_of_a_sqlite_one(small_export, database, tmp_path):
    ingest = load_config().ingest
    on_file = index_export(small_export, tmp_path / "catalogue.sqlite", ingest, workers=1)
    on_server = index_export(small_export, database, ingest, workers=1)
    assert on_server.n_files_read == on_file.n_files_read > 0
    with Catalogue(tmp_path / "catalogue.sqlite", small_export) as a, Catalogue(database, small_export) as b:
        assert list(b.rows()) == list(a.rows())
        assert b.query("SELECT count(*) FROM studies") == a.query("SELECT count(*) FROM studies")
        assert b.query("SELECT modalities FROM studies ORDER BY study_uid") == \
            a.query("SELECT modalities FROM studies ORDER BY study_uid")
    assert on_server.studies == on_file.studies
    assert [e.reason for e in on_server.errors] == [e.reason for e in on_file.errors]

    again = index_export(small_export, database, ingest, workers=1)  # incremental on the server too
    assert again.n_files_read == 0 and again.studies == on_file.studies


def test_concurrent_writers_of_the_same_rows_wait_for_each_other_and_lose_nothing(small_export, database):
    """A run's transaction holds the rows it upserted; a second writer of the same rows waits for
    its commit instead of failing or duplicating them."""
    rows = [{"path": f"a/{i:03d}.dcm", "size": i, "mtime_ns": 10**18 + i, "status": "ok", "patient_id": "P"}
            for i in range(200)]
    second_done = threading.Event()
    waited: list[float] = []

    def second_writer():
        with Catalogue(database, small_export) as cat, cat.transaction():
            started = time.monotonic()
            cat.upsert([{**r, "size": r["size"] + 1} for r in reversed(rows)])
            waited.append(time.monotonic() - started)
        second_done.set()

    with Catalogue(database, small_export) as first:
        with first.transaction():
            first.upsert(rows)
            writer = threading.Thread(target=second_writer)
            writer.start()
            time.sleep(1.0)
            assert not second_done.is_set()  # blocked on the rows this transaction holds
        writer.join(timeout=60)
        assert second_done.is_set() and waited[0] >= 0.9
        stored = {r["path"]: r["size"] for r in first.rows()}
    assert len(stored) == len(rows)
    assert all(size == int(path[2:5]) + 1 for path, size in stored.items())  # the later commit wins


def test_two_flows_write_one_postgresql_catalogue_at_once(assessed_run, database, tmp_path):
    root, threads_out, _truth, threads_summary = assessed_run
    config = tmp_path / "shared.yaml"
    config.write_text(f"ingest:\n  catalogue_url: {database}\n")
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"out_{name}"
        shutil.copytree(threads_out, out)  # every study already assessed: the runs reuse them
        (out / "catalogue.sqlite").unlink()
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / f"prefect_{name}"), "PREFECT_LOGGING_LEVEL": "WARNING"}
        command = [sys.executable, "-m", "pipeline.cli", "assess", str(root / "data" / "export"), "--out", str(out),
                   "--procedures", str(root / "data" / "procedures.csv"), "--config", str(config),
                   "--workers", "1", "--device", "cpu"]
        runs.append((out, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)))
    for out, process in runs:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-2000:]
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["catalogue"] == database  # no password in this URL to hide
        assert summary["studies"] == summary["studies_reused"] == threads_summary["studies"]
        assert (out / "cohort.csv").read_text() == (threads_out / "cohort.csv").read_text()
        assert not (out / "catalogue.sqlite").exists()

    export = root / "data" / "export"
    n_files = sum(1 for p in export.rglob("*") if p.is_file())
    with Catalogue(database, export) as cat:
        assert cat.query("SELECT count(*), count(DISTINCT path) FROM files") == [(n_files, n_files)]
        assert sum(n for (n,) in cat.query("SELECT n_studies FROM patients")) == threads_summary["studies"]


def test_a_catalogue_url_nobody_answers_is_refused_before_the_run(tmp_path):
    from pipeline.run.inputs import RunInputError, check_catalogue

    ingest = load_config().ingest
    for url, words in [("postgresql+psycopg://nobody@127.0.0.1:9/none", "does not answer"),
                       ("mysql://h/db", "only postgresql"), ("postgresql+psycopg://:bad:url", "not a database URL")]:
        with pytest.raises(RunInputError, match=words):
            check_catalogue(ingest.model_copy(update={"catalogue_url": url}), timeout_s=2)
    with pytest.raises(RunInputError, match="pseudonymise"):
        check_catalogue(ingest.model_copy(update={"catalogue_url": "sqlite:///x", "pseudonymise_patient_ids": True}))
    check_catalogue(ingest.model_copy(update={"catalogue_url": f"sqlite:///{Path(tmp_path, 'c.sqlite')}"}))


def test_the_commands_refuse_a_catalogue_url_nobody_answers_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    export = tmp_path / "export"
    export.mkdir()
    url = "postgresql+psycopg://nobody@127.0.0.1:9/none"
    for args in (["index", str(export), "--catalogue", url], ["catalog", "--catalogue", url]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "--catalogue" in lines[0] and "does not answer" in lines[0]
    config = tmp_path / "shared.yaml"
    config.write_text(f"ingest:\n  catalogue_url: {url}\n")
    result = CliRunner().invoke(app, ["assess", str(export), "--out", str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 2 and "ingest.catalogue_url" in result.output
    assert not (tmp_path / "out").exists()
