"""Seeded fuzzing of header values (issue 16): whatever one value of a few files is, indexing
and assessing never crash and every study and file is accounted for (tests/header_fuzz.py).
benchmarks/fuzz_headers.py runs the same with many more seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.header_fuzz import base_export, run_once

SEEDS = range(24)  # ~0.5 s each on 2 cores


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return base_export(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_headers_never_crash_and_every_study_is_accounted_for(template: Path, tmp_path: Path,
                                                                      seed: int) -> None:
    outcome = run_once(template, tmp_path / "work", seed)
    assert not outcome.crash, (outcome.mutations, outcome.crash)
    assert outcome.studies_found >= 4, outcome.mutations  # 3 mutations cannot empty a study of 18 files
    assert outcome.studies_assessed == outcome.studies_found, outcome.mutations
    assert not outcome.unaccounted, (outcome.mutations, outcome.unaccounted)
