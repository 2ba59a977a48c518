"""The per-patient assessment without the disk, and the study store's cache keys (issue 17).

``assess_timeline`` takes hand-built records (timeline entries, each study's imaging, the
registration to the baseline) and gives the studies' records; the store's keys decide what a
rerun may reuse.
"""

from __future__ import annotations

import builtins
import datetime as dt
import io
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.core.config import load_config
from pipeline.core.records import (
    AssessmentRecord,
    Category,
    Decision,
    RegistrationQC,
    SeriesRecord,
    SeriesRole,
    StudyRecord,
    TimelinePoint,
)
from pipeline.longitudinal.assessment import StudyFindings, assess_timeline, registration_failure
from pipeline.longitudinal.timeline import Procedure, build_patient_timeline
from pipeline.outputs.store import (
    IMAGE_FILES,
    StudyStore,
    cache_keys,
    files_digest,
    imaging_key,
    to_baseline_key,
)
from tests.helpers import DAY0, az, classify_sections, focus, imaging, study

CFG = load_config()


def entries_of(studies, imgs, sessions=(0,)):
    procedures = [Procedure("P1", DAY0 + dt.timedelta(days=d)) for d in sessions]
    az_present = {s.study_instance_uid: imgs[s.study_instance_uid].ok and imgs[s.study_instance_uid].az_found
                  for s in studies}
    return build_patient_timeline(studies, procedures, az_present, CFG.rules)


def qc(ok: bool, reason: str = "") -> RegistrationQC:
    return RegistrationQC(name="to_baseline", method="rigid", metric="mattes", metric_before=-0.2, metric_after=-0.5,
                          iterations=40, stop_condition="converged", motion_corrected_mm=3.0, ok=ok, reason=reason)


@pytest.fixture
def no_disk(monkeypatch):
    """The assessment must neither read nor write a file."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"disk access: {args!r}")

    for target, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "replace")):
        monkeypatch.setattr(target, name, refuse)


def test_complete_ablation_then_a_suspicious_focus_is_local_tumour_progression(no_disk):
    studies = [study("s1", 30), study("s2", 120)]
    imgs = {"s1": imaging(30), "s2": imaging(28, [focus()])}
    entries = entries_of(studies, imgs)
    findings = {"s1": StudyFindings(imgs["s1"], cache_keys=cache_keys("k1", "")),
                "s2": StudyFindings(imgs["s2"], to_baseline=qc(True), cache_keys=cache_keys("k2", "b2"))}
    assessed = assess_timeline(entries, findings, *classify_sections(CFG))

    baseline, follow_up = assessed.records
    assert [r.study_instance_uid for r in assessed.records] == ["s1", "s2"]
    assert baseline.decision.category == Category.COMPLETE_ABLATION and baseline.timepoint == "baseline"
    assert follow_up.decision.category == Category.LOCAL_TUMOUR_PROGRESSION
    assert follow_up.decision.rule_id == "R2-ltp-after-documented-complete" and follow_up.decision.flagged
    assert follow_up.timepoint == "follow_up" and follow_up.session == 1 and follow_up.days_since_ablation == 120
    assert baseline.baseline_study_instance_uid == follow_up.baseline_study_instance_uid == "s1"
    assert follow_up.registration_to_baseline == qc(True)
    assert follow_up.cache_keys == {"imaging": "k2", "to_baseline": "b2"}
    assert [s.role for s in follow_up.series] == ["t1_pre", "t1_post"] and follow_up.errors == []
    # Every record carries the patient's whole timeline, and so does the assessment.
    assert [p.category for p in assessed.points] == ["complete_ablation", "local_tumour_progression"]
    assert baseline.patient_timeline == follow_up.patient_timeline == assessed.points
    assert all(isinstance(p, TimelinePoint) for p in assessed.points)
    assert assessed.points[1].az_long_axis_mm == 28


def test_an_indeterminate_imaging_gives_an_indeterminate_record_at_its_timepoint(no_disk):
    studies = [study("s1", 30), study("s2", 90), study("s3", 180)]
    imgs = {"s1": imaging(30), "s2": imaging(None, ok=False, reason="no usable post-contrast series"),
            "s3": imaging(27)}
    entries = entries_of(studies, imgs)
    findings = {uid: StudyFindings(i) for uid, i in imgs.items()}
    records = assess_timeline(entries, findings, *classify_sections(CFG)).records

    middle = records[1]
    assert middle.decision.category == Category.INDETERMINATE and middle.decision.flagged
    assert "no usable post-contrast series" in middle.decision.rule + " ".join(middle.decision.flag_reasons)
    assert (middle.timepoint, middle.session, middle.days_since_ablation, middle.baseline_study_instance_uid) == (
        "follow_up", 1, 90, "s1")
    assert [p.category for p in middle.patient_timeline] == ["complete_ablation", "indeterminate", "no_evidence_of_ltp"]
    assert middle.patient_timeline[1].timepoint == "follow_up" and middle.patient_timeline[1].days_since_ablation == 90


@pytest.mark.parametrize("to_baseline, error, why", [
    (qc(False, "NCC 0.12 below 0.3"), "", "registration to the baseline failed QC: NCC 0.12 below 0.3"),
    (None, "RuntimeError: optimiser diverged", "registration to the baseline failed: RuntimeError: optimiser diverged"),
])
def test_a_failed_registration_to_the_baseline_makes_the_follow_up_indeterminate(no_disk, to_baseline, error, why):
    studies = [study("s1", 30), study("s2", 120)]
    imgs = {"s1": imaging(30), "s2": imaging(28, [focus()])}
    findings = {"s1": StudyFindings(imgs["s1"]), "s2": StudyFindings(imgs["s2"], to_baseline, error)}
    assert findings["s2"].to_baseline_failure == registration_failure(to_baseline, error) == why
    records = assess_timeline(entries_of(studies, imgs), findings, *classify_sections(CFG)).records

    follow_up = records[1]
    assert follow_up.decision.category == Category.INDETERMINATE  # rule 5: not evaluable
    assert why in follow_up.decision.rule + " ".join(follow_up.decision.flag_reasons)
    # The stored imaging stays the per-study result, so that a rerun can reuse it.
    assert follow_up.imaging.ok and follow_up.imaging == imgs["s2"]
    assert follow_up.registration_to_baseline == to_baseline
    assert registration_failure(qc(True)) == registration_failure(None) == ""


# --------------------------------------------------------------------------- the store's cache keys
def files_study(tmp_path: Path, uid: str = "1.2.3.4") -> StudyRecord:
    files = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        path = tmp_path / f"IM{i}.dcm"
        path.write_bytes(b"DICM" * (i + 1))
        files.append(path)
    series = [SeriesRecord("P1", uid, f"{uid}.1", 1, "t1 pre", "MR", "X", files[:1], SeriesRole.T1_PRE),
              SeriesRecord("P1", uid, f"{uid}.2", 2, "t1 post", "MR", "X", files[1:], SeriesRole.T1_POST, phase_index=1)]
    return StudyRecord("P1", uid, DAY0, "MRI", series)


def test_the_same_inputs_and_config_give_the_same_key(tmp_path):
    s = files_study(tmp_path)
    reordered = StudyRecord(s.patient_id, s.study_instance_uid, s.study_date, s.study_description, s.series[::-1])
    key = imaging_key(s, CFG.digest())
    assert key == imaging_key(s, load_config().digest()) == imaging_key(reordered, CFG.digest())
    assert len(imaging_key(s, CFG.digest())) == 16
    # A change of the review database changes no study result.
    moved = CFG.model_copy(update={"review": CFG.review.model_copy(update={"database_url": "sqlite:///elsewhere.db"})})
    assert imaging_key(s, moved.digest()) == imaging_key(s, CFG.digest())


@pytest.mark.parametrize("section, field, value", [
    ("rules", "growth_min_pct", 25.0),
    ("foci", "min_thickness_mm", 9.0),
    ("outputs", "key_image_dpi", 300),
])
def test_a_changed_config_section_changes_the_key(tmp_path, section, field, value):
    s = files_study(tmp_path)
    changed = CFG.model_copy(update={section: getattr(CFG, section).model_copy(update={field: value})})
    assert getattr(changed, section) != getattr(CFG, section)
    assert imaging_key(s, changed.digest()) != imaging_key(s, CFG.digest())


def test_a_changed_input_changes_the_key(tmp_path):
    s = files_study(tmp_path)
    before, digest = imaging_key(s, CFG.digest()), files_digest(s)
    path = s.series[1].files[0]
    path.write_bytes(path.read_bytes() + b"more")  # another size
    assert files_digest(s) != digest and imaging_key(s, CFG.digest()) != before
    again = imaging_key(s, CFG.digest())
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the same size, a newer file
    assert imaging_key(s, CFG.digest()) != again
    s.series[1].role = SeriesRole.T1_PRE  # another role given to a series
    assert imaging_key(s, CFG.digest()) != again
    s.series[1].files[0].unlink()
    assert imaging_key(s, CFG.digest()) != again  # a missing file is part of the key too


def test_the_registration_key_follows_both_studies():
    key = to_baseline_key("a" * 16, "b" * 16)
    assert key == to_baseline_key("a" * 16, "b" * 16) and len(key) == 16
    assert key != to_baseline_key("c" * 16, "b" * 16) != to_baseline_key("a" * 16, "c" * 16)
    assert key != to_baseline_key("b" * 16, "a" * 16)
    assert cache_keys("k", "") == {"imaging": "k", "to_baseline": ""}


def test_the_store_reuses_a_study_only_under_its_keys(tmp_path):
    s = files_study(tmp_path / "export")
    store = StudyStore(tmp_path / "out")
    key = imaging_key(s, CFG.digest())
    imaged = imaging(30)
    record = AssessmentRecord(
        patient_id="P1", study_instance_uid=s.study_instance_uid, study_date=DAY0.isoformat(), timepoint="baseline",
        session=1, ablation_date=None, days_since_ablation=30, baseline_study_instance_uid=s.study_instance_uid,
        imaging=imaged, decision=Decision.indeterminate("x"), cache_keys=cache_keys(key, ""),
        errors=[{"path": "", "patient_id": "P1", "study_instance_uid": s.study_instance_uid, "series_instance_uid": "",
                 "stage": stage, "reason": stage} for stage in ("load", "dicom_sr")])
    assert store.cached_imaging(s, key) is None  # nothing stored yet
    store.write_record(s, record)
    assert store.cached_imaging(s, key) is None  # imaging ok, but its images are missing
    for name in IMAGE_FILES.values():
        (store.folder(s) / name).write_bytes(b"")
    cached, errors = store.cached_imaging(s, key)
    assert cached == imaged and [e.stage for e in errors] == ["load"]  # the imaging rows only
    assert store.cached_imaging(s, "another key") is None
    assert store.cached_to_baseline(s, "") is None  # no registration stored


def test_the_nightly_deferral_and_the_header_readers_change_no_cache_key():
    """The nightly run defers files changed in the last 300 s where a manual run uses 0: with the
    deferral in the key, each kind of run recomputed every study the other had assessed."""
    nightly = CFG.model_copy(update={"ingest": CFG.ingest.model_copy(update={"defer_recent_seconds": 300.0,
                                                                             "workers": 3})})
    assert nightly.digest() == CFG.digest()
    roles = CFG.model_copy(update={"ingest": CFG.ingest.model_copy(update={"series_roles_file": "other.yaml"})})
    assert roles.digest() != CFG.digest()  # what decides the series roles still counts


def test_zone_guidance_for_the_follow_up_registration():
    # The hint is the shift between the zones' centroids; the region is the baseline zone with
    # rule 4's local margin. Without a baseline zone there is neither; without a follow-up zone
    # there is no hint, but the region (the baseline's) still tells another field of view apart.
    from pipeline.run.patient import zone_guidance

    base = az(30.0).model_copy(update={"centroid_lps": [10.0, -20.0, 5.0]})
    follow = az(28.0).model_copy(update={"centroid_lps": [13.0, -18.0, 9.0]})
    hint, region = zone_guidance(base, follow, 10.0)
    assert hint == pytest.approx([3.0, 2.0, 4.0])
    assert region[0] == pytest.approx([10.0, -20.0, 5.0]) and region[1] == pytest.approx(25.0)
    assert zone_guidance(None, follow, 10.0) == (None, None)
    hint, region = zone_guidance(base, None, 10.0)
    assert hint is None and region[1] == pytest.approx(25.0)


def test_a_zone_read_above_its_surroundings_keeps_that_map_and_is_reused_only_with_it(tmp_path):
    """Issue 15 evidence: the map the foci of a zone in parenchyma were judged on is kept beside
    the study's images, read back for the key image of a rerun, and required for reuse; a rerun
    where the rule no longer applies removes it."""
    from pipeline.measurement.study import StudyImages
    from pipeline.outputs.store import ABOVE_SURROUNDINGS_NAME

    s = files_study(tmp_path / "export")
    store = StudyStore(tmp_path / "out")
    key = imaging_key(s, CFG.digest())
    imaged = imaging(30).model_copy(update={"enhancement_above_surroundings": True})
    record = AssessmentRecord(
        patient_id="P1", study_instance_uid=s.study_instance_uid, study_date=DAY0.isoformat(), timepoint="baseline",
        session=1, ablation_date=None, days_since_ablation=30, baseline_study_instance_uid=s.study_instance_uid,
        imaging=imaged, decision=Decision.indeterminate("x"), cache_keys=cache_keys(key, ""))
    store.write_record(s, record)
    grid = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    above = sitk.GetImageFromArray(np.full((4, 5, 6), 0.4, np.float32))
    kept = store.keep_images(s, StudyImages(post=grid, pre_registered=grid, subtraction=grid,
                                            labels=sitk.Cast(grid, sitk.sitkUInt8), above_surroundings=above))
    assert float(sitk.GetArrayFromImage(kept.above_surroundings).mean()) == pytest.approx(0.4)
    assert store.cached_imaging(s, key) is not None
    (store.folder(s) / ABOVE_SURROUNDINGS_NAME).unlink()
    assert store.cached_imaging(s, key) is None  # the key image could not be drawn again without it
    store.keep_images(s, StudyImages(post=grid, pre_registered=grid, subtraction=grid,
                                     labels=sitk.Cast(grid, sitk.sitkUInt8), above_surroundings=above))
    store.keep_images(s, StudyImages(post=grid, pre_registered=grid, subtraction=grid,
                                     labels=sitk.Cast(grid, sitk.sitkUInt8)))
    assert not (store.folder(s) / ABOVE_SURROUNDINGS_NAME).exists()


def test_new_network_weights_under_the_same_path_invalidate_the_imaging_key(tmp_path):
    """A retrained network shipped under the same file name must not leave a rerun with the old
    network's zones and calls; the classical method does not read the weights."""
    from pipeline.outputs.store import analysis_digest

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first")
    cfg = CFG.model_copy(update={"segmentation": CFG.segmentation.model_copy(
        update={"method": "network", "network_weights": str(weights)})})
    first = analysis_digest(cfg.digest(), cfg.segmentation)
    assert analysis_digest(cfg.digest(), cfg.segmentation) == first
    weights.write_bytes(b"retrained")
    assert analysis_digest(cfg.digest(), cfg.segmentation) != first
    classical = cfg.segmentation.model_copy(update={"method": "classical"})
    assert analysis_digest(cfg.digest(), classical) == cfg.digest()
