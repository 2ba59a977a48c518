"""``run_export()`` without Prefect (issue 17): the batch logic of a run (grouping by patient, a
failed patient's indeterminate records and error rows, the tables, the summary, ``workers``)
exercised with plain stage calls on the smallest export (8x8x6 studies, tests/test_header_values.py).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from pathlib import Path

from pydicom import dcmread

from pipeline.longitudinal.indeterminate import indeterminate_records
from pipeline.run.export import assess_patient_reported, run_export
from pipeline.run.patient import PatientResult
from tests.test_header_values import small_study

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _export(root: Path, patients: list[str]) -> tuple[Path, dict[str, str]]:
    """One small study per patient (pre, post, T2), plus a junk file; -> (export, patient -> study UID)."""
    export = root / "export"
    uids = {}
    for pid in patients:
        files = small_study(export / pid, patient=pid)
        uids[pid] = str(dcmread(files["post"][0], stop_before_pixels=True).StudyInstanceUID)
    (export / "notes.txt").write_text("not a DICOM file\n")
    return export, uids


def test_run_export_without_prefect_keeps_every_study_and_survives_a_failed_patient(tmp_path: Path) -> None:
    export, uids = _export(tmp_path, ["P-A", "P-B"])
    out = tmp_path / "out"

    def patient(studies, procedures, cfg, out_dir, device, reporter=None, redactor=None):
        if studies[0].patient_id == "P-B":
            raise RuntimeError("injected failure")
        return assess_patient_reported(studies, procedures, cfg, out_dir, device, reporter, redactor)

    summary = run_export(export, out, device="cpu", patient_fn=patient)

    rows = _rows(out / "cohort.csv")
    assert sorted((r["patient_id"], r["study_instance_uid"]) for r in rows) == sorted(uids.items())
    failed = next(r for r in rows if r["patient_id"] == "P-B")
    assert failed["category"] == "indeterminate" and failed["flagged"] == "true"
    assert "patient assessment failed: RuntimeError: injected failure" in failed["flag_reasons"]
    errors = _rows(out / "errors.csv")
    assess_rows = [e for e in errors if e["stage"] == "assess"]
    assert [(e["patient_id"], e["study_instance_uid"]) for e in assess_rows] == [("P-B", uids["P-B"])]
    assert "injected failure" in assess_rows[0]["reason"]
    assert any("not a DICOM" in e["reason"] for e in errors)  # the index's rows come first, kept
    # The patient that did not fail went through the stages: its study has its own folder.
    assert list((out / "patients").glob("P-A/*/assessment.json"))

    stored = json.loads((out / "run_summary.json").read_text())
    assert stored == summary
    assert (summary["patients"], summary["studies"], summary["studies_reused"]) == (2, 2, 0)
    assert summary["errors"] == len(errors)
    assert summary["flagged"] == sum(r["flagged"] == "true" for r in rows)
    assert summary["device"] == "cpu" and summary["files_seen"] >= 1
    log = (out / "run.log").read_text()
    assert "patient P-B: assessment failed: RuntimeError: injected failure" in log and "run finished:" in log


def _indeterminate_patient(seen: list[str], lock: threading.Lock, active: list[int], barrier: threading.Barrier | None):
    """A patient call that does no imaging: records who ran and how many ran at once."""

    def patient(studies, procedures, cfg, out_dir, device, reporter=None, redactor=None):
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
            seen.append(studies[0].patient_id)
            first = len(seen) <= 2
        try:
            if barrier is not None and first:
                barrier.wait(timeout=10)  # BrokenBarrierError (a failed patient) unless the first two overlap
        finally:
            with lock:
                active[0] -= 1
        return PatientResult(studies[0].patient_id, indeterminate_records(studies, "not imaged here", cfg.rules))

    return patient


def test_workers_is_the_number_of_patients_assessed_at_once(tmp_path: Path) -> None:
    export, uids = _export(tmp_path, ["P-A", "P-B", "P-C"])
    lock = threading.Lock()

    seen, active = [], [0, 0]
    summary = run_export(export, tmp_path / "one", device="cpu", workers=1,
                         patient_fn=_indeterminate_patient(seen, lock, active, None))
    assert sorted(seen) == sorted(uids) and active[1] == 1 and summary["studies"] == 3

    seen, active = [], [0, 0]
    summary = run_export(export, tmp_path / "two", device="cpu", workers=2,
                         patient_fn=_indeterminate_patient(seen, lock, active, threading.Barrier(2)))
    # The first two patients ran at the same time (else the barrier broke: failed patients).
    assert active[1] == 2 and sorted(seen) == sorted(uids)
    rows = _rows(tmp_path / "two" / "cohort.csv")
    assert len(rows) == 3 and summary["studies"] == 3
    assert not any("patient assessment failed" in r["flag_reasons"] for r in rows)


def test_run_export_imports_neither_prefect_nor_the_flows() -> None:
    code = ("import sys, pipeline.run.export\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows'))\n"
            "sys.exit(f'imported: {bad}' if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
