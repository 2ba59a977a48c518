"""A non-editable install runs the demo (issue 17): the wheel carries its configs, weights and templates.

The project is built into a wheel and installed, without dependencies, into a folder of its own;
the demo then runs from a working directory outside the repository, with that folder first on
the path (the dependencies come from the test's environment). The run must import the installed
copy, not the checkout, and must write the outputs of a whole patient.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_built_wheel_runs_the_demo_outside_the_repository(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "demo_out", "bench_out",
        "train_cache", "eval_cache", "train_out*", ".whl"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(source)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("ablation_response-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data_file in ("configs/default.yaml", "configs/series_roles.yaml", "models/weights/segresnet_synthetic.pt",
                      "pipeline/outputs/templates/patient_report.html.j2", "pipeline/review/templates/case.html"):
        assert data_file in names, f"{data_file} missing from the wheel"
    assert not any(name.startswith("tests/") for name in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PREFECT_HOME": str(tmp_path / "prefect")}
    where = subprocess.run([sys.executable, "-c", "import pipeline, configs, models; "
                            "print(pipeline.__file__); print(configs.__file__); print(models.__file__)"],
                           check=True, cwd=work, env=env, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where

    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--out", str(work / "demo"),
                          "--patients", "1", "--seed", "3", "--workers", "1"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with (work / "demo" / "results" / "cohort.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["category"] for row in rows)
    assert list((work / "demo" / "results" / "patients").glob("*/report.html"))
