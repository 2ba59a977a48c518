"""A pseudonymised run leaks no identity (issue 16): no PatientID, PatientName, birth date or
identifying folder name in any file of the output folder, nor in the logs; the catalogue and
the mapping sit outside the outputs, the key apart from both.

The export is the smallest that goes through the real flow (one 8x8x6 study, tests/
test_header_values.py) with every path by which identity reached the outputs before: folder
and file names holding the name and birth date, a second PatientID sharing the study (quoted in
a reason), a junk file and a file with an invalid position (rows of errors.csv with a path).
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from tests.dicom_factory import SeriesSpec, set_raw, write_series
from tests.test_header_values import small_study

PATIENT_ID, OTHER_ID = "ZQXID7731", "ZQXOTHER5512"
NAME, BIRTH = "Wolfgangzqx^Amadeuszqx", "19450617"
FOLDER = f"WOLFGANGZQX_AMADEUSZQX_{BIRTH}"


def _export(root: Path) -> Path:
    export = root / "export"
    study_uid = generate_uid()
    everyone = {"PatientName": NAME, "PatientBirthDate": BIRTH}
    files = small_study(export / FOLDER / "MR_1", patient=PATIENT_ID, study_uid=study_uid, extra=everyone)
    write_series(SeriesSpec(patient_id=OTHER_ID, study_uid=study_uid, volume=np.full((3, 8, 8), 100.0),
                            series_description="localizer", series_number=1, extra=everyone),
                 export / FOLDER / "OTHER")
    bad = files["t2"][2]
    set_raw(bad, "ImagePositionPatient", "nan\\0\\0")
    shutil.move(bad, bad.with_name(f"{FOLDER}_IM2.dcm"))  # a file name holding identity too
    (export / FOLDER / "notes.txt").write_text(f"{NAME} {BIRTH}\n" * 3)
    return export


def test_no_identity_in_outputs_or_logs(tmp_path: Path, caplog, capfd) -> None:
    from flows.assess import run_assessment

    export = _export(tmp_path)
    out, key = tmp_path / "out", tmp_path / "keys" / "pseudonym.key"
    config = tmp_path / "site.yaml"
    config.write_text(f"ingest:\n  pseudonymise_patient_ids: true\n  pseudonym_key_file: {key}\n")
    with caplog.at_level(logging.DEBUG):
        run_assessment(export, out, None, config)
    logs = caplog.text + "".join(capfd.readouterr())

    secrets = [PATIENT_ID, OTHER_ID, NAME, NAME.split("^")[0], NAME.split("^")[1], BIRTH, FOLDER,
               NAME.upper().replace("^", "_")]
    scanned = 0
    for path in out.rglob("*"):
        if path.is_file():
            scanned += 1
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, (path.relative_to(out), secret)
                assert secret.lower().encode() not in data.lower(), (path.relative_to(out), secret)
    assert scanned >= 4  # cohort.csv, errors.csv, run_summary.json, the study's files
    for secret in secrets:
        assert secret not in logs, secret

    with open(out / "cohort.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["patient_id"].startswith("PSN-")
    with open(out / "errors.csv") as f:
        errors = list(csv.DictReader(f))
    reasons = " | ".join(e["reason"] for e in errors)
    assert "several PatientIDs" in reasons and "ImagePositionPatient" in reasons and "not a DICOM file" in reasons
    assert all(e["path"].startswith("export:") for e in errors if e["path"] and "not a DICOM" in e["reason"])

    # The catalogue and the mapping (raw IDs) are in the private folder, the key apart from both.
    private = tmp_path / "out.private"
    assert (private / "catalogue.sqlite").exists() and (private / "catalogue.pseudonyms.csv").exists()
    assert key.exists() and key.parent != private and not key.is_relative_to(out)
    assert PATIENT_ID in (private / "catalogue.pseudonyms.csv").read_text()


def test_a_failing_task_logs_no_identity(tmp_path: Path, capfd, monkeypatch) -> None:
    """Prefect logs a failed task's exception (to the console and its API): in a pseudonymised
    run the exception's text is redacted before it leaves the task."""
    from flows.assess import run_assessment

    export = _export(tmp_path)

    def failing_imaging(study, cfg, out_dir, device="cpu"):
        raise ValueError(f"cannot read {study.series[0].files[0]} of {study.patient_id}")

    monkeypatch.setattr("flows.assess.study_imaging", failing_imaging)
    config = tmp_path / "site.yaml"
    config.write_text(f"ingest:\n  pseudonymise_patient_ids: true\n  pseudonym_key_file: {tmp_path / 'k' / 'k.key'}\n")
    # Prefect's console handler writes to the stream it was configured with when the process ran
    # its first flow (an earlier test's captured stream): read its records here too, with their
    # tracebacks, from a handler on the "prefect" logger itself (it does not propagate to root).
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(handler)
    try:
        run_assessment(export, tmp_path / "out", None, config)
    finally:
        prefect_logger.removeHandler(handler)
    logs = "".join(capfd.readouterr()) + records.getvalue()
    assert "cannot read export:" in logs  # the failure is logged, with the file's reference
    for secret in (FOLDER, PATIENT_ID, NAME, BIRTH):
        assert secret not in logs, secret
    assert "cannot read export:" in (tmp_path / "out" / "errors.csv").read_text()


def test_redaction_keeps_identifiers_and_uid_folders(tmp_path: Path) -> None:
    """Exports often name folders by UID: those are not names, and a record's UIDs, pseudonym
    and cache keys stay as they are; free text loses the paths and names."""
    from pipeline.ingest.pseudonym import Redactor

    study_uid = "1.2.826.0.1.3680043.8.498.1234"
    rels = [f"{FOLDER}/{study_uid}/IM0001.dcm", f"{FOLDER}/{study_uid}/IM0002.dcm", "2024-01-02/IM0003.dcm"]
    redactor = Redactor(b"k" * 32, tmp_path, rels, {PATIENT_ID}, lambda pid: "PSN-TEST")
    record = {"patient_id": "PSN-TEST", "study_instance_uid": study_uid, "cache_keys": {"imaging": "IM0001.dcm"},
              "study_date": "2024-01-02", "patient_timeline": [{"study_date": "2024-01-02"}],
              "imaging": {"reason": f"series 3: IM0001.dcm: {tmp_path}/{rels[0]} of {PATIENT_ID} in {FOLDER}"},
              "series": [{"series_instance_uid": study_uid + ".1"}]}
    cleaned = redactor.tree(record)
    kept = ("patient_id", "study_instance_uid", "cache_keys", "series", "study_date", "patient_timeline")
    assert {k: cleaned[k] for k in kept} == {k: record[k] for k in kept}
    reason = cleaned["imaging"]["reason"]
    assert FOLDER not in reason and PATIENT_ID not in reason and "IM0001.dcm" not in reason and str(tmp_path) not in reason
    assert f"export:{redactor.reference(rels[0])[7:]}" in reason and "PSN-TEST" in reason
