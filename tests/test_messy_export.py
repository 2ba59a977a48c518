"""The issue's "done when": a generated export that mixes vendors' naming, every transfer
syntax, multi-frame and single-frame series and every defect is assessed by the real flow with
each study in cohort.csv and each defect in errors.csv with its reason; with pseudonymisation
on, no output carries the PatientID, name or birth date."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from phantom import generate_export
from phantom.transcode import SYNTAXES
from pipeline.ingest.pseudonym import mapping_csv_path, path_reference

KEEP_STUDIES = 3  # of the patient's studies: three vendors, every defect, a shorter flow run


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    from flows.assess import run_assessment

    root = tmp_path_factory.mktemp("messy")
    truth = generate_export(root / "data", n_patients=1, seed=3, messy=True)
    (patient,) = truth["patients"]
    for st in patient["studies"][KEEP_STUDIES:]:  # dropped: their folders go
        for s in st["series"]:
            for f in s["files"]:
                shutil.rmtree((root / "data" / f).parent, ignore_errors=True)
    kept = patient["studies"][:KEEP_STUDIES]
    config = root / "site.yaml"
    config.write_text(f"ingest:\n  pseudonymise_patient_ids: true\n  pseudonym_key_file: {root / 'keys' / 'k.key'}\n"
                      "outputs:\n  write_key_image: false\n")
    out = root / "out"
    run_assessment(root / "data" / "export", out, root / "data" / "procedures.csv", config)
    return root, out, truth, patient, kept


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_export_is_really_messy(messy_run) -> None:
    root, _, truth, patient, kept = messy_run
    messy = truth["messy"]
    vendors = {messy["vendors"][st["study_instance_uid"]] for st in kept}
    assert len(vendors) == 3
    used = {messy["transfer_syntaxes"][s["series_instance_uid"]] for st in kept for s in st["series"]}
    assert used == set(SYNTAXES), set(SYNTAXES) - used  # every transfer syntax is in the export
    multi = [s for st in kept for s in st["series"] if s["series_instance_uid"] in messy["multiframe_series"]]
    assert multi and all(len(s["files"]) == 1 for s in multi)
    assert int(pydicom.dcmread(root / "data" / multi[0]["files"][0], stop_before_pixels=True).NumberOfFrames) > 20
    kinds = {d["kind"] for d in messy["defects"] if d["study_instance_uid"] in {st["study_instance_uid"] for st in kept}}
    assert kinds >= {"missing_slice", "duplicate_position", "non_uniform_spacing", "mixed_orientation", "mixed_matrix",
                     "several_stacks", "non_image", "dicomdir_missing"}


def test_every_study_assessed_and_every_defect_reported(messy_run) -> None:
    root, out, truth, patient, kept = messy_run
    cohort = _rows(out / "cohort.csv")
    by_uid = {r["study_instance_uid"]: r for r in cohort}
    assert sorted(by_uid) == sorted(st["study_instance_uid"] for st in kept)
    for st in kept:  # lossless re-encoding and multi-frame files change nothing in the call
        row = by_uid[st["study_instance_uid"]]
        assert row["category"] == st["category"], (st["study_date"], row["category"], row["flag_reasons"])
    ambiguous = by_uid[truth["messy"]["ambiguous_study"]]
    assert ambiguous["flagged"] == "true" and "series_roles_ambiguous: pre-contrast series" in ambiguous["flag_reasons"]

    errors = _rows(out / "errors.csv")
    key = bytes.fromhex((root / "keys" / "k.key").read_text().strip())
    kept_uids = {st["study_instance_uid"] for st in kept}
    for defect in truth["messy"]["defects"]:
        if defect["study_instance_uid"] not in kept_uids:
            continue
        if "path" in defect:  # a pseudonymised run names a file by its keyed reference
            ref = path_reference(key, str(Path(defect["path"]).relative_to(root / "data" / "export")))
            hits = [e for e in errors if e["path"] == ref and e["reason"] == defect["reason"]]
        else:
            hits = [e for e in errors if e["series_instance_uid"] == defect["series_instance_uid"]
                    and e["stage"] == defect["stage"] and defect["reason_contains"] in e["reason"]]
        assert len(hits) == 1, (defect, [e for e in errors if e["study_instance_uid"] == defect["study_instance_uid"]])
    # Every study has its assessment.json, with the series roles and their confidence.
    for st in kept:
        (record,) = [json.loads(p.read_text()) for p in (out / "patients").rglob("assessment.json")
                     if json.loads(p.read_text())["study_instance_uid"] == st["study_instance_uid"]]
        roles = {s["role"] for s in record["series"]}
        assert {"t1_pre", "t1_post", "t2"} <= roles
        assert all(s["role_confidence"] is not None for s in record["series"])


def test_outputs_carry_only_pseudonyms(messy_run) -> None:
    root, out, truth, patient, kept = messy_run
    cohort = _rows(out / "cohort.csv")
    (pid,) = {r["patient_id"] for r in cohort}
    assert pid.startswith("PSN-") and (out / "patients" / pid).is_dir()
    assert {e["patient_id"] for e in _rows(out / "errors.csv")} <= {"", pid}
    src = pydicom.dcmread(root / "data" / kept[0]["series"][1]["files"][0], stop_before_pixels=True)
    secrets = [patient["patient_id"].encode(), str(src.PatientName).encode(), str(src.PatientBirthDate).encode()]
    assert all(secrets)
    assert not (out / "catalogue.sqlite").exists() and mapping_csv_path(out.parent / "out.private" / "catalogue.sqlite").exists()
    for path in out.rglob("*"):  # the catalogue and the mapping are in out.private, the key elsewhere
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret not in data, (path, secret)
