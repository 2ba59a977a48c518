"""End to end: generate a small export, run the real Prefect flow, compare with truth.json.

One run of the flow (the session fixture `assessed_run` of conftest.py) shared by the checks.
"""

from __future__ import annotations

import csv
import json

import pytest

from phantom.evaluation import evaluate_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(assessed_run):
    return assessed_run


def _cohort(out):
    with (out / "cohort.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_every_study_is_in_the_cohort_with_the_true_category(run):
    root, out, truth, summary = run
    report = evaluate_run(out, root / "data" / "truth.json")
    assert report["missing_from_cohort"] == []
    assert report["studies_in_cohort"] == report["studies_in_truth"] == summary["studies"]
    assert report["viable_tumour"]["sensitivity"] == 1.0, report["wrong"]
    assert report["category_accuracy"] == 1.0, report["wrong"]


def test_measurements_match_truth_within_tolerance(run):
    root, out, truth, _ = run
    report = evaluate_run(out, root / "data" / "truth.json")
    # Registration, interpolation and segmentation compound: allow two in-plane voxels.
    assert report["long_axis_error_mm"]["max_abs"] <= 3.5, report["long_axis_error_mm"]
    assert report["short_axis_error_mm"]["max_abs"] <= 3.5, report["short_axis_error_mm"]
    assert report["volume_error_pct"]["median_abs"] <= 15, report["volume_error_pct"]


def test_follow_ups_are_registered_to_their_baseline(run):
    """The pipeline's own to_baseline transforms, scored on the generator's landmarks (issue 15:
    TRE of the follow-up -> baseline registration is part of every evaluation)."""
    root, out, truth, _ = run
    tre = evaluate_run(out, root / "data" / "truth.json")["follow_up_tre"]
    assert tre["pairs"] > 0 and tre["without"] == [], tre
    # The truth holds a smooth deformation of ~1.5 mm beside rigid repositioning; the held-out
    # figure is ~0.7 mm median (docs/registration.md): 1.5 mm only catches a broken transform.
    assert tre["median_mm"] <= 1.5 and tre["worst_pair_mean_mm"] <= 3.0, tre


def test_outputs_of_the_contract_exist(run):
    root, out, truth, _ = run
    rows = _cohort(out)
    for row in rows:
        folders = list((out / "patients").glob(f"*/{row['study_date']}_*"))
        assert folders, row
        folder = folders[0]
        record = json.loads((folder / "assessment.json").read_text())
        assert record["schema_version"] == 1 and record["decision"]["category"] == row["category"]
        if row["timepoint"] != "pre_ablation" and row["az_long_axis_mm"]:
            assert (folder / "labels.nii.gz").exists() and (folder / "subtraction.nii.gz").exists()
            assert (folder / "key_image.png").stat().st_size > 10_000
        if row["timepoint"] == "follow_up" and row["category"] != "indeterminate":
            assert (folder / "to_baseline.tfm").exists()
        if row["category"] == "local_tumour_progression":
            focus = next(f for f in record["imaging"]["foci"] if f["suspicious"])
            # Supporting signals: enhancement in every phase, T2-brighter than the necrotic zone.
            assert focus["enhancement_by_phase"] and min(focus["enhancement_by_phase"].values()) > 0.15
            assert focus["t2_ratio_to_az"] > 1.2
    assert list((out / "patients").glob("*/timeline.png"))
    # Issue 18: the run log in the output folder has a line per study with its stages' seconds.
    log = (out / "run.log").read_text()
    for row in rows:
        folder = next((out / "patients").glob(f"*/{row['study_date']}_*"))
        assert f"study {row['patient_id']} {folder.name}: imaging" in log, folder.name
    assert "register_intra" in log and "index:" in log and "run finished:" in log
    errors = (out / "errors.csv").read_text()
    assert "truncated" in errors.lower() or "not a dicom" in errors.lower()


def test_every_step_of_every_study_is_timed(run):
    """Issue 19: where a study's time goes is never a guess: the imaging steps, the image writes,
    the registration to the baseline, the temporal difference, the key image and SEG/SR."""
    _root, out, _truth, _summary = run
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("assessment.json"))]
    assessed = [r for r in records if r["imaging"]["ok"]]
    assert assessed
    for record in assessed:
        seconds = record["stage_seconds"]
        steps = {"load", "register_intra", "subtract", "segment", "measure", "write_images", "key_image",
                 "dicom_seg_sr"}
        assert steps <= set(seconds) or "read_cache" in seconds, (record["study_instance_uid"], seconds)
        assert all(isinstance(v, float) and v >= 0 for v in seconds.values())
    follow_ups = [r for r in assessed if r["timepoint"] == "follow_up" and r["registration_to_baseline"]]
    assert follow_ups and all("register_to_baseline" in r["stage_seconds"] for r in follow_ups)
    assert any("temporal_difference" in r["stage_seconds"] for r in follow_ups)


def test_rerun_reuses_every_study_and_gives_the_same_cohort(run):
    root, out, truth, summary = run
    from flows.assess import run_assessment

    before = (out / "cohort.csv").read_text()
    again = run_assessment(root / "data" / "export", out, root / "data" / "procedures.csv", workers=1, device="cpu")
    assert again["studies_reused"] == again["studies"] == summary["studies"]
    assert (out / "cohort.csv").read_text() == before


def test_resume_after_a_lost_study_recomputes_it_identically(run, tmp_path):
    """A crash that lost one study's outputs: the rerun recomputes that study alone and the
    cohort is byte-identical (registration, segmentation and measurement are deterministic)."""
    import shutil

    from flows.assess import run_assessment

    root, out, truth, summary = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assessments = sorted(copy.rglob("assessment.json"))
    lost = next(p for p in assessments if json.loads(p.read_text()).get("timepoint") == "follow_up")
    before = json.loads(lost.read_text())
    shutil.rmtree(lost.parent)
    again = run_assessment(root / "data" / "export", copy, root / "data" / "procedures.csv", workers=1, device="cpu")
    assert again["studies_reused"] == summary["studies"] - 1
    assert (copy / "cohort.csv").read_text() == (out / "cohort.csv").read_text()
    after = json.loads(lost.read_text())
    for key in ("decision", "imaging", "registration_to_baseline"):
        assert _stable(after[key]) == _stable(before[key]), key


def _stable(value):
    """``value`` without what legitimately differs between two runs: wall-clock seconds."""
    import re

    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in ("timings_s", "seconds")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, str):  # the torch backend's stop condition ends "device=cpu, 3.10 s"
        return re.sub(r"device=(\w+), [0-9.]+ s", r"device=\1", value)
    return value


def test_a_failed_patient_keeps_each_studys_timepoint(run, tmp_path, monkeypatch):
    """A patient whose assessment raises: every study is still a row, indeterminate and flagged,
    at the time point the run gives it (its baseline says baseline, not follow_up)."""
    import flows.assess
    from flows.assess import run_assessment

    root, out, truth, summary = run

    def crash(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(flows.assess, "assess_patient", crash)
    failed = run_assessment(root / "data" / "export", tmp_path / "out", root / "data" / "procedures.csv", workers=1,
                            device="cpu")
    assert failed["studies"] == summary["studies"]
    expected = {r["study_instance_uid"]: r for r in _cohort(out)}
    rows = _cohort(tmp_path / "out")
    assert {r["timepoint"] for r in rows} >= {"baseline", "follow_up"}
    for row in rows:
        want = expected[row["study_instance_uid"]]
        assert (row["timepoint"], row["session"], row["days_since_ablation"], row["baseline_study_instance_uid"]) == (
            want["timepoint"], want["session"], want["days_since_ablation"], want["baseline_study_instance_uid"])
        assert row["category"] == "indeterminate" and row["flagged"] == "true"
        assert "patient assessment failed: RuntimeError: injected" in row["flag_reasons"]
