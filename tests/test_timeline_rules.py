"""IWG-IGTA rules on hand-built timelines: every path of the state machine (criteria.md §6)."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.core.config import load_config
from pipeline.core.records import Category, Timepoint
from pipeline.longitudinal.classify import classify_patient
from pipeline.longitudinal.timeline import Procedure, build_patient_timeline, read_procedures
from tests.helpers import DAY0, classify_sections, focus, imaging, study

CFG = load_config()
C = Category


def run(studies, imgs, sessions=(0,)):
    procs = [Procedure("P1", DAY0 + dt.timedelta(days=d)) for d in sessions] if sessions is not None else None
    az_present = {s.study_instance_uid: imgs[s.study_instance_uid].az_found for s in studies}
    entries = build_patient_timeline(studies, procs, az_present, CFG.rules)
    decisions = classify_patient(entries, imgs, *classify_sections(CFG))
    return entries, [decisions[e.study.study_instance_uid] for e in entries]


def cats(decisions):
    return [d.category for d in decisions]


def test_complete_then_clean_follow_ups():
    studies = [study("s0", -10), study("s1", 30), study("s2", 90), study("s3", 180)]
    imgs = {"s0": imaging(None), "s1": imaging(30), "s2": imaging(27), "s3": imaging(25)}
    entries, d = run(studies, imgs)
    assert [e.timepoint for e in entries] == [Timepoint.PRE_ABLATION, Timepoint.BASELINE, Timepoint.FOLLOW_UP,
                                              Timepoint.FOLLOW_UP]
    assert cats(d) == [C.PRE_ABLATION, C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP, C.NO_EVIDENCE_OF_LTP]
    assert not any(x.flagged for x in d)
    assert d[2].changes.long_axis_change_pct == pytest.approx(-10.0)


def test_residual_at_baseline_persists_as_residual():
    studies = [study("s1", 30), study("s2", 90)]
    imgs = {"s1": imaging(30, [focus()]), "s2": imaging(30, [focus(10)])}
    _, d = run(studies, imgs)
    assert cats(d) == [C.RESIDUAL_UNABLATED_TUMOUR, C.RESIDUAL_UNABLATED_TUMOUR]
    assert d[1].rule_id == "R2-residual-persisting"
    assert all(x.flagged for x in d)


def test_clean_then_ltp_at_12_months():
    studies = [study("s1", 30), study("s2", 90), study("s3", 180), study("s4", 365)]
    imgs = {"s1": imaging(30), "s2": imaging(28), "s3": imaging(27), "s4": imaging(27, [focus()])}
    _, d = run(studies, imgs)
    assert cats(d) == [C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP, C.NO_EVIDENCE_OF_LTP, C.LOCAL_TUMOUR_PROGRESSION]
    assert d[3].rule_id == "R2-ltp-after-documented-complete"
    assert d[3].values["largest_focus_mm"] == 8.0


def test_ltp_never_at_first_contrast_study():
    # The focus is on the first contrast study: residual, never LTP, whatever came later.
    studies = [study("s1", 30), study("s2", 90)]
    imgs = {"s1": imaging(30, [focus()]), "s2": imaging(30)}
    _, d = run(studies, imgs)
    assert d[0].category == C.RESIDUAL_UNABLATED_TUMOUR
    assert d[1].category == C.NO_EVIDENCE_OF_LTP and "residual_no_longer_seen" in d[1].flag_reasons


def test_residual_then_reablation_then_clean():
    studies = [study("s1", 30), study("s2", 100), study("s3", 200)]
    imgs = {"s1": imaging(30, [focus()]), "s2": imaging(35), "s3": imaging(33)}
    entries, d = run(studies, imgs, sessions=(0, 70))
    assert [e.session for e in entries] == [1, 2, 2]
    assert [e.timepoint for e in entries] == [Timepoint.BASELINE, Timepoint.BASELINE, Timepoint.FOLLOW_UP]
    assert cats(d) == [C.RESIDUAL_UNABLATED_TUMOUR, C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP]
    assert entries[2].baseline_study_instance_uid == "s2"
    assert entries[1].days_since_ablation == 30


def test_growth_only_is_suspected_progression_from_3_months():
    studies = [study("s1", 30), study("s2", 90), study("s3", 180), study("s4", 365)]
    imgs = {"s1": imaging(30), "s2": imaging(27), "s3": imaging(36), "s4": imaging(31)}
    _, d = run(studies, imgs)
    # nadir 27 mm: +9 mm >= max(5, 5.4) -> suspected; 31 mm: +4 mm over nadir 27 -> not.
    assert cats(d) == [C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP, C.SUSPECTED_LOCAL_TUMOUR_PROGRESSION,
                       C.NO_EVIDENCE_OF_LTP]
    assert d[2].values["growth_needed_mm"] == pytest.approx(5.4)


def test_growth_before_3_months_is_ignored():
    studies = [study("s1", 30), study("s2", 60)]
    imgs = {"s1": imaging(30), "s2": imaging(40)}
    _, d = run(studies, imgs)
    assert d[1].category == C.NO_EVIDENCE_OF_LTP


def test_new_lesion_only_does_not_change_local_category():
    studies = [study("s1", 30), study("s2", 90)]
    imgs = {"s1": imaging(30), "s2": imaging(28, [focus(distance=25.0)])}
    _, d = run(studies, imgs)
    assert d[1].category == C.NO_EVIDENCE_OF_LTP
    assert d[1].new_lesion and d[1].flagged


def test_missing_post_contrast_is_indeterminate_and_not_baseline():
    studies = [study("s1", 30), study("s2", 90, post=False), study("s3", 180)]
    imgs = {"s1": imaging(30), "s2": imaging(None, ok=False, reason="no post-contrast T1 series in the study"),
            "s3": imaging(28, [focus()])}
    entries, d = run(studies, imgs)
    assert cats(d) == [C.COMPLETE_ABLATION, C.INDETERMINATE, C.LOCAL_TUMOUR_PROGRESSION]
    assert d[1].flagged and "no post-contrast" in d[1].flag_reasons[-1]


def test_first_study_without_contrast_cannot_be_baseline():
    studies = [study("s1", 30, post=False), study("s2", 90)]
    imgs = {"s1": imaging(None, ok=False, reason="no post-contrast"), "s2": imaging(30)}
    entries, d = run(studies, imgs)
    assert entries[0].timepoint == Timepoint.FOLLOW_UP and "before_baseline" in entries[0].flags
    assert entries[1].timepoint == Timepoint.BASELINE
    assert cats(d) == [C.INDETERMINATE, C.COMPLETE_ABLATION]


@pytest.mark.parametrize("days,flag", [(10, "early_baseline"), (90, "late_baseline")])
def test_baseline_outside_window_is_still_baseline_but_flagged(days, flag):
    studies = [study("s1", days)]
    entries, d = run(studies, {"s1": imaging(30)})
    assert entries[0].timepoint == Timepoint.BASELINE and flag in entries[0].flags
    assert d[0].category == C.COMPLETE_ABLATION and d[0].flagged and flag in d[0].flag_reasons


def test_no_ablation_zone_where_one_must_be_is_indeterminate():
    studies = [study("s1", 30), study("s2", 90)]
    _, d = run(studies, {"s1": imaging(30), "s2": imaging(None)})
    assert d[1].category == C.INDETERMINATE and d[1].rule_id == "R5-no-ablation-zone"


def test_sessions_inferred_from_images_without_procedures():
    studies = [study("s0", -20), study("s1", 30), study("s2", 90)]
    imgs = {"s0": imaging(None), "s1": imaging(30), "s2": imaging(28)}
    entries, d = run(studies, imgs, sessions=None)
    assert [e.timepoint for e in entries] == [Timepoint.PRE_ABLATION, Timepoint.BASELINE, Timepoint.FOLLOW_UP]
    assert entries[1].days_since_ablation is None and "session_inferred_from_images" in entries[1].flags
    assert cats(d) == [C.PRE_ABLATION, C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP]


def test_read_procedures(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("patient_id,ablation_date,organ,target_x,target_y,target_z\nA,2024-05-02,liver,1,2,3\n"
                    "A,2024-01-02,,,,\nB,2024-02-03,,,,\n")
    sessions = read_procedures(path)
    assert [p.ablation_date.isoformat() for p in sessions["A"]] == ["2024-01-02", "2024-05-02"]
    assert sessions["A"][1].target_lps == (1.0, 2.0, 3.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,ablation_date\nA,02/05/2024\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        read_procedures(bad)


def _with_rim(img, volume_ml=1.0, max_mm=2.0, coverage=350.0):
    rim = img.rim.model_copy(update={"volume_ml": volume_ml, "max_thickness_mm": max_mm, "coverage_deg": coverage})
    return img.model_copy(update={"rim": rim})


def test_rim_beyond_its_expected_window_is_flagged_by_organ():
    studies = [study("s1", 30), study("s2", 90), study("s3", 250)]
    imgs = {"s1": _with_rim(imaging(30)), "s2": _with_rim(imaging(28), 0.8), "s3": _with_rim(imaging(27), 0.5)}
    _, d = run(studies, imgs)
    # default / liver window 180 days (+ 28 tolerance): the rim at day 250 is flagged, not re-categorised.
    assert d[2].category == C.NO_EVIDENCE_OF_LTP and d[2].flagged
    assert d[2].flag_reasons[0].startswith("rim_persisting")
    assert not d[1].flagged
    # kidney cryoablation: enhancement up to 9 months is expected [S15]-[S17].
    procs = [Procedure("P1", DAY0, organ="kidney")]
    entries = build_patient_timeline(studies, procs, {}, CFG.rules)
    kidney = classify_patient(entries, imgs, *classify_sections(CFG))
    assert not kidney["s3"].flagged
    # A rim covering under 90 deg is not "a rim".
    imgs["s3"] = _with_rim(imaging(27), 0.5, coverage=40)
    _, d = run(studies, imgs)
    assert not d[2].flagged


def test_rim_increasing_between_studies_is_flagged():
    studies = [study("s1", 30), study("s2", 90)]
    imgs = {"s1": _with_rim(imaging(30), 0.5, 1.5), "s2": _with_rim(imaging(29), 0.9, 1.8)}
    _, d = run(studies, imgs)
    assert d[1].category == C.NO_EVIDENCE_OF_LTP and d[1].flagged and "rim_increasing" in d[1].flag_reasons[0]
    imgs["s2"] = _with_rim(imaging(29), 0.6, 1.8)  # +20 % but only +0.1 mL: not enough
    _, d = run(studies, imgs)
    assert not d[1].flagged


def test_missed_timepoint_is_noted_not_flagged():
    studies = [study("s1", 30), study("s3", 365)]
    late = imaging(25)
    late = late.model_copy(update={"rim": late.rim.model_copy(update={"present": False, "coverage_deg": 0.0})})
    _, d = run(studies, {"s1": imaging(30), "s3": late})
    assert d[1].notes and "90" in d[1].notes[0] and "180" in d[1].notes[1]
    assert not d[1].flagged


def test_a_call_resting_on_an_indeterminate_study_is_flagged_saying_which_and_why():
    """Issue 16: the baseline could not be read, so the next study is called as the session's first
    contrast study; that call must go to review naming the baseline and its reason."""
    studies = [study("s1", 30), study("s2", 90), study("s3", 180)]
    imgs = {"s1": imaging(None, ok=False, reason="no usable post-contrast phase"), "s2": imaging(28),
            "s3": imaging(27)}
    _, d = run(studies, imgs)
    assert cats(d) == [C.INDETERMINATE, C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP]
    for later in d[1:]:
        assert later.flagged
        (flag,) = [f for f in later.flag_reasons if f.startswith("depends_on_indeterminate")]
        assert "s1" in flag and "no usable post-contrast phase" in flag and str(studies[0].study_date) in flag


def test_a_new_session_does_not_inherit_an_indeterminate_study():
    studies = [study("s1", 30), study("s2", 90), study("s3", 430), study("s4", 520)]
    imgs = {"s1": imaging(30), "s2": imaging(None, ok=False, reason="registration failed"), "s3": imaging(30),
            "s4": imaging(28)}
    _, d = run(studies, imgs, sessions=(0, 400))
    assert cats(d) == [C.COMPLETE_ABLATION, C.INDETERMINATE, C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP]
    assert not d[2].flagged and not d[3].flagged


def test_a_failed_patients_records_keep_their_timepoints():
    # flows/assess.py: a patient whose assessment raised gets one indeterminate record per study
    # (pipeline/longitudinal/indeterminate.py); the baseline's says baseline, not follow_up.
    from pipeline.longitudinal.indeterminate import indeterminate_records

    studies = [study("s2", 120), study("s0", -10), study("s1", 30), study("s3", 200, post=False)]
    procs = [Procedure("P1", DAY0)]
    records = indeterminate_records(studies, "patient assessment failed: boom", CFG.rules, procs)
    assert [r.study_instance_uid for r in records] == ["s2", "s0", "s1", "s3"]  # the order given
    by_uid = {r.study_instance_uid: r for r in records}
    assert [by_uid[u].timepoint for u in ("s0", "s1", "s2", "s3")] == [
        "pre_ablation", "baseline", "follow_up", "follow_up"]
    baseline = by_uid["s1"]
    assert (baseline.session, baseline.days_since_ablation, baseline.baseline_study_instance_uid,
            baseline.ablation_date) == (1, 30, "s1", DAY0.isoformat())
    assert by_uid["s2"].baseline_study_instance_uid == "s1" and by_uid["s2"].days_since_ablation == 120
    assert by_uid["s0"].session is None and by_uid["s0"].baseline_study_instance_uid is None
    for r in records:
        assert r.decision.category == C.INDETERMINATE and r.decision.flagged
        assert r.decision.flag_reasons == ["indeterminate: patient assessment failed: boom"]
        assert not r.imaging.ok and r.imaging.reason == "patient assessment failed: boom"


def test_a_failed_patient_without_procedures_has_its_first_contrast_study_as_baseline():
    from pipeline.longitudinal.indeterminate import indeterminate_records

    studies = [study("s0", -10, post=False), study("s1", 30), study("s2", 120)]
    records = indeterminate_records(studies, "boom", CFG.rules)
    assert [(r.timepoint, r.baseline_study_instance_uid) for r in records] == [
        ("pre_ablation", None), ("baseline", "s1"), ("follow_up", "s1")]


def test_a_failed_patient_whose_timeline_cannot_be_built_keeps_every_study(monkeypatch):
    import pipeline.longitudinal.indeterminate

    def broken(*args, **kwargs):
        raise ValueError("broken timeline")

    monkeypatch.setattr(pipeline.longitudinal.indeterminate, "build_patient_timeline", broken)
    records = pipeline.longitudinal.indeterminate.indeterminate_records([study("s1", 30), study("s2", 120)], "boom", CFG.rules)
    assert [(r.study_instance_uid, r.timepoint, r.session) for r in records] == [
        ("s1", "follow_up", None), ("s2", "follow_up", None)]
    assert all(r.decision.category == C.INDETERMINATE for r in records)


def _seen(fraction, **kwargs):
    return focus(**kwargs).model_copy(update={"seen_at_baseline_fraction": fraction})


def test_a_focus_that_enhanced_at_the_baseline_is_anatomy_seen_before_not_ltp():
    """Issue 15 (development abdomen seed 63): the end of a bowel loop, read on its own study as a
    40 mm nodule, enhanced at the registered baseline over 88 % of its volume."""
    studies = [study("s1", 30), study("s2", 90), study("s3", 180)]
    imgs = {"s1": imaging(30), "s2": imaging(28), "s3": imaging(28, [_seen(0.88, diameter=40.0)])}
    _, d = run(studies, imgs)
    assert cats(d) == [C.COMPLETE_ABLATION, C.NO_EVIDENCE_OF_LTP, C.NO_EVIDENCE_OF_LTP]
    assert d[2].flagged and any(f.startswith("focus_seen_at_baseline: a 40 mm local focus") and "88 %" in f
                                for f in d[2].flag_reasons), d[2].flag_reasons
    # A focus mostly over tissue that did not enhance at the baseline is new: LTP.
    imgs["s3"] = imaging(28, [_seen(0.15)])
    assert cats(run(studies, imgs)[1])[2] == C.LOCAL_TUMOUR_PROGRESSION
    # Not measured (no usable registration): never discounted.
    imgs["s3"] = imaging(28, [_seen(None)])
    assert cats(run(studies, imgs)[1])[2] == C.LOCAL_TUMOUR_PROGRESSION


def test_the_seen_at_baseline_rule_can_be_switched_off():
    studies = [study("s1", 30), study("s2", 90), study("s3", 180)]
    imgs = {"s1": imaging(30), "s2": imaging(28), "s3": imaging(28, [_seen(0.88)])}
    off = CFG.model_copy(update={"rules": CFG.rules.model_copy(update={"focus_seen_at_baseline_min_fraction": None})})
    procs = [Procedure("P1", DAY0)]
    entries = build_patient_timeline(studies, procs, {s.study_instance_uid: True for s in studies}, off.rules)
    decisions = classify_patient(entries, imgs, *classify_sections(off))
    assert decisions["s3"].category == C.LOCAL_TUMOUR_PROGRESSION


def test_a_distant_focus_seen_at_the_baseline_is_not_a_new_lesion():
    studies = [study("s1", 30), study("s2", 90)]
    imgs = {"s1": imaging(30), "s2": imaging(28, [_seen(0.9, distance=25.0)])}
    _, d = run(studies, imgs)
    assert d[1].category == C.NO_EVIDENCE_OF_LTP and not d[1].new_lesion
    assert any(f.startswith("focus_seen_at_baseline: a 8 mm distant focus") for f in d[1].flag_reasons)
