"""benchmarks/compare_runs.py finds what differs between two runs and nothing else (issue 17)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "benchmarks" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def _run(folder: Path, category: str, seconds: float, voxel: float) -> Path:
    results = folder / "results"
    study = results / "patients" / "P1" / "2024-01-01_1234"
    study.mkdir(parents=True)
    (results / "cohort.csv").write_text(f"patient_id,category,pipeline_version\nP1,{category},0.{seconds}\n")
    (results / "errors.csv").write_text(f"path,reason\n{folder}/export/README.txt,not DICOM\n")
    record = {"patient_id": "P1", "pipeline_version": str(seconds), "imaging": {"timings_s": {"segment": seconds}},
              "registration_to_baseline": {"seconds": seconds, "stop_condition": f"device=cpu, {seconds} s; ncc=0.9"},
              "decision": {"category": category}}
    (study / "assessment.json").write_text(json.dumps(record))
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 2, 3] = 1
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(study / "labels.nii.gz"))
    sub = np.zeros((3, 4, 5), np.float32)
    sub[0, 0, 0] = voxel
    sitk.WriteImage(sitk.GetImageFromArray(sub), str(study / "subtraction.nii.gz"))
    return results


def test_runs_that_differ_only_in_place_and_time_compare_equal(tmp_path):
    before = _run(tmp_path / "a", "complete_ablation", 1.5, 0.25)
    after = _run(tmp_path / "b", "complete_ablation", 3.25, 0.25)
    differences, compared = compare_runs.compare(before, after)
    assert differences == [] and compared == 5


def test_a_changed_call_and_a_changed_voxel_are_reported(tmp_path):
    before = _run(tmp_path / "a", "complete_ablation", 1.5, 0.25)
    after = _run(tmp_path / "b", "local_tumour_progression", 1.5, 0.2500001)
    differences, _ = compare_runs.compare(before, after)
    assert any(d.startswith("cohort.csv[0].category") for d in differences)
    assert any("assessment.json.decision.category" in d for d in differences)
    assert any("subtraction.nii.gz: 1 voxels differ" in d for d in differences)
    within, _ = compare_runs.compare(before, after, atol=1e-5)
    assert not any("subtraction" in d for d in within)


def test_a_study_missing_on_one_side_is_reported(tmp_path):
    before = _run(tmp_path / "a", "complete_ablation", 1.5, 0.25)
    after = _run(tmp_path / "b", "complete_ablation", 1.5, 0.25)
    (after / "patients" / "P1" / "2024-01-01_1234" / "labels.nii.gz").unlink()
    differences, _ = compare_runs.compare(before, after)
    assert differences == ["patients/P1/2024-01-01_1234/labels.nii.gz: only before"]
