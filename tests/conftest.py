"""Shared fixtures.

``assessed_run``: one small synthetic export (2 patients, seed 11) assessed by the real Prefect
flow, once per test session. The end-to-end checks and the tests of the outputs built on it
(DICOM SEG/SR, report, review) share it: the flow's ephemeral server starts once and CI pays for
one run. Tests must not modify its output folder; copy it when they need to write.

``postgres``: one throw-away PostgreSQL server for the session (tests/review_support.py), shared
by the review database and catalogue tests; its ``url`` is None, and ``why_not`` says why, where
none can start (each test then skips).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def assessed_run(tmp_path_factory):
    from flows.assess import run_assessment
    from phantom import generate_export

    root = tmp_path_factory.mktemp("assessed")
    truth = generate_export(root / "data", n_patients=2, seed=11)
    out = root / "out"
    summary = run_assessment(root / "data" / "export", out, root / "data" / "procedures.csv", workers=2, device="cpu")
    return root, out, truth, summary


@pytest.fixture(scope="session")
def postgres():
    from tests.review_support import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.stop()
