"""Output contract helpers and the configuration schema."""

from __future__ import annotations

import csv
import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError

from pipeline.core.config import load_config
from pipeline.core.files import atomic_write_image, atomic_write_text
from pipeline.core.records import AssessmentRecord, Category, Decision
from pipeline.outputs.contract import (
    COHORT_COLUMNS,
    cohort_row,
    read_assessment,
    safe_name,
    write_assessment,
    write_cohort_csv,
)
from tests.helpers import focus, imaging


def test_cohort_columns_are_the_contract_in_order(tmp_path):
    record = AssessmentRecord(
        patient_id="P1", study_instance_uid="1.2.3", study_date="2024-04-01", timepoint="baseline", session=1,
        ablation_date="2024-03-01", days_since_ablation=31, baseline_study_instance_uid="1.2.3",
        imaging=imaging(31.234, [focus(diameter=9.5)]),
        decision=Decision(category=Category.RESIDUAL_UNABLATED_TUMOUR, rule_id="r", rule="r", confidence=0.9,
                          flagged=True, flag_reasons=["a;b", "c"]))
    path = write_cohort_csv(tmp_path, [record])
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COHORT_COLUMNS
        row = next(reader)
    assert row["az_long_axis_mm"] == "31.23" and row["largest_focus_mm"] == "9.50"
    assert row["flagged"] == "true" and row["new_lesion"] == "false"
    assert row["flag_reasons"] == "a,b;c"  # ';' separates reasons, so it never appears inside one
    assert row["az_long_axis_change_pct"] == ""  # empty cell where not applicable
    assert cohort_row(record)["registration_ok"] == ""


def test_assessment_round_trip(tmp_path):
    record = AssessmentRecord(
        patient_id="P1", study_instance_uid="1.2.3", study_date=None, timepoint="follow_up", session=None,
        ablation_date=None, days_since_ablation=None, baseline_study_instance_uid=None, imaging=imaging(20.0),
        decision=Decision(category=Category.INDETERMINATE, rule_id="x", rule="x", confidence=0, flagged=True))
    write_assessment(tmp_path / "a" / "assessment.json", record)
    again = read_assessment(tmp_path / "a" / "assessment.json")
    assert again == record and again.schema_version == 1
    (tmp_path / "broken.json").write_text("{")
    assert read_assessment(tmp_path / "broken.json") is None


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "x.txt", "hello")
    img = sitk.GetImageFromArray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    atomic_write_image(img, tmp_path / "l.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["l.nii.gz", "x.txt"]
    back = sitk.ReadImage(str(tmp_path / "l.nii.gz"))
    assert back.GetDirection() == img.GetDirection()


def test_safe_name():
    assert safe_name("ABL/001 ^x") == "ABL_001_x"
    assert safe_name("..") == "unknown"


def test_config_default_and_override(tmp_path):
    cfg = load_config()
    assert cfg.enhancement.relative_enhancement_threshold == 0.15
    override = tmp_path / "site.yaml"
    override.write_text("enhancement:\n  relative_enhancement_threshold: 0.2\n")
    site = load_config(override)
    assert site.enhancement.relative_enhancement_threshold == 0.2
    assert site.rules == cfg.rules and site.digest() != cfg.digest()
    bad = tmp_path / "bad.yaml"
    bad.write_text("enhancement:\n  relative_enhancement_threshold: -1\n")
    with pytest.raises(ValidationError):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("rulez: {}\n")
    with pytest.raises(ValidationError):
        load_config(typo)


def test_timeline_plot_renders(tmp_path):
    from pipeline.core.records import TimelinePoint
    from pipeline.outputs.timeline_plot import render_timeline_plot

    points = [
        TimelinePoint(study_instance_uid="1", study_date="2024-01-01", timepoint="pre_ablation", session=None,
                      category="pre_ablation", az_long_axis_mm=None),
        TimelinePoint(study_instance_uid="2", study_date="2024-02-10", timepoint="baseline", session=1,
                      category="complete_ablation", az_long_axis_mm=35.0, az_short_axis_mm=30.0, az_volume_ml=15.0,
                      days_since_ablation=30),
        TimelinePoint(study_instance_uid="3", study_date="2024-05-10", timepoint="follow_up", session=1,
                      category="indeterminate", az_long_axis_mm=None, days_since_ablation=120),
        TimelinePoint(study_instance_uid="4", study_date="2024-11-10", timepoint="follow_up", session=1,
                      category="local_tumour_progression", az_long_axis_mm=33.0, az_short_axis_mm=28.0,
                      az_volume_ml=12.0, days_since_ablation=300),
    ]
    render_timeline_plot(tmp_path / "timeline.png", "P1", points)
    data = (tmp_path / "timeline.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_honour_the_umask_and_secrets_stay_private(tmp_path, umask_0022):
    """mkstemp creates 0600 files: outputs must get what the umask gives (issue 18)."""
    from pipeline.core.files import atomic_write_bytes, atomic_write_image, atomic_write_transform, current_umask

    assert current_umask() == 0o022
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_text(tmp_path / "cohort.csv", "a,b\n")
    atomic_write_image(sitk.Image(4, 4, 4, sitk.sitkUInt8), tmp_path / "labels.nii.gz")
    atomic_write_transform(sitk.Euler3DTransform(), tmp_path / "to_baseline.tfm")
    for name in ("a.bin", "cohort.csv", "labels.nii.gz", "to_baseline.tfm"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    atomic_write_text(tmp_path / "key", "secret", mode=0o600)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    os.umask(0o027)
    atomic_write_text(tmp_path / "group.csv", "a\n")
    assert stat.S_IMODE((tmp_path / "group.csv").stat().st_mode) == 0o640


def test_timeline_plot_marks_unmeasured_studies_apart_and_draws_the_nadir_and_threshold():
    """Issue 18: pre-ablation studies were drawn at 0 mm, complete ablation and no evidence of LTP
    shared a marker, and the growth rule had no line to read against."""
    from pipeline.core.records import TimelinePoint
    from pipeline.outputs.timeline_plot import nadir_steps, timeline_figure

    def point(uid, date, timepoint, category, long_mm):
        return TimelinePoint(study_instance_uid=uid, study_date=date, timepoint=timepoint,
                             session=None if timepoint == "pre_ablation" else 1, category=category,
                             az_long_axis_mm=long_mm, az_volume_ml=long_mm / 3 if long_mm else None)

    points = [point("1", "2024-01-01", "pre_ablation", "pre_ablation", None),
              point("2", "2024-02-10", "baseline", "complete_ablation", 35.0),
              point("3", "2024-05-10", "follow_up", "no_evidence_of_ltp", 30.0),
              point("4", "2024-08-10", "follow_up", "indeterminate", None),
              point("5", "2024-11-10", "follow_up", "suspected_local_tumour_progression", 37.0)]
    assert nadir_steps(points, 5.0, 20.0) == [("2024-02-10", 35.0, 42.0), ("2024-05-10", 30.0, 36.0),
                                              ("2024-11-10", 30.0, 36.0)]
    ax = timeline_figure("P1", points).axes[0]
    for line in ax.lines:  # nothing drawn at 0 mm on the data scale
        if line.get_transform() == ax.transData and len(line.get_ydata()):
            assert 0.0 not in list(line.get_ydata()), line.get_label()
    handles, labels = ax.get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    assert "pre-ablation (not measured)" in by_label and "indeterminate (not measured)" in by_label
    assert by_label["complete ablation"].get_marker() != by_label["no evidence of LTP"].get_marker()
    assert "nadir" in by_label and any(label.startswith("growth threshold") for label in labels)
    assert list(by_label["nadir"].get_ydata()) == [35.0, 30.0, 30.0]


def test_key_image_has_a_20_mm_bar_a_legend_the_slice_position_and_the_day():
    """Issue 18: the README promises a 20 mm scale bar; the labels' colours, the slice and the
    day since ablation were nowhere on the image."""
    from pipeline.outputs.key_image import days_text, key_image_figure, slice_position

    arr = np.zeros((10, 80, 80), np.float32)
    arr[:, 30:50, 30:50] = 100.0
    lab = np.zeros((10, 80, 80), np.uint8)
    lab[4, 32:48, 32:48], lab[4, 30:32, 30:50], lab[4, 48:52, 40:44] = 1, 2, 3
    images = {}
    for name, a in (("pre", arr), ("post", arr * 1.5), ("subtraction", arr * 0.5), ("labels", lab)):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.0, 1.0, 3.0))
        img.SetOrigin((-40.0, -40.0, -12.0))
        images[name] = img
    assert slice_position(images["post"], 3) == "slice 4/10, I 3.0 mm"
    assert slice_position(images["post"], 9) == "slice 10/10, S 15.0 mm"
    fig = key_image_figure(images, 9, f"P1  2024-05-01 ({days_text(92)})")
    assert "day 92 after ablation" in fig._suptitle.get_text() and "slice 10/10, S 15.0 mm" in fig._suptitle.get_text()
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("20 mm") == 3 and "10 mm" not in texts
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ablation zone", "rim", "enhancing focus"]
    assert days_text(None) == "no ablation date" and days_text(-3) == "3 days before ablation"


def test_key_image_of_a_zone_in_parenchyma_shows_what_its_foci_were_judged_on():
    """Issue 15: a nodule iso to the liver in the phase segmented shows only above the
    surroundings (its arterial phase); the key image has that map as a fourth column, empty for a
    baseline read without it."""
    from pipeline.outputs.key_image import key_image_figure

    images = {}
    for name, value in (("pre", 1.0), ("post", 2.0), ("subtraction", 1.0), ("labels", 0), ("above_surroundings", 0.3)):
        a = np.full((6, 40, 40), value, np.uint8 if name == "labels" else np.float32)
        images[name] = sitk.GetImageFromArray(a)
    fig = key_image_figure(images, 3, "P1", baseline={k: v for k, v in images.items() if k != "above_surroundings"})
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 8 and titles[3].startswith("this study: RE above surroundings")
    assert titles[7] == "" and not fig.axes[7].axison
    assert len(key_image_figure({k: v for k, v in images.items() if k != "above_surroundings"}, 3, "P1").axes) == 3


def test_key_image_title_says_why_a_focus_it_shows_is_not_counted():
    """Issue 15: a suspicious focus read as anatomy seen at the baseline is still in the label map
    (red); the title says why the call does not count it."""
    from pipeline.outputs.writers import key_image_title

    seen = focus(diameter=40.0).model_copy(update={"seen_at_baseline_fraction": 0.88})
    decision = Decision(category=Category.NO_EVIDENCE_OF_LTP, rule_id="R2-no-suspicious-focus", rule="r",
                        confidence=0.9, flagged=True, flag_reasons=["focus_seen_at_baseline: a 40 mm local focus ..."])
    record = AssessmentRecord(patient_id="P1", study_instance_uid="1.2", study_date="2024-02-11", timepoint="follow_up",
                              session=1, ablation_date="2023-08-21", days_since_ablation=174,
                              baseline_study_instance_uid="1.1", imaging=imaging(30.0, [seen]), decision=decision)
    title = key_image_title(record)
    assert title.endswith("no evidence of ltp  (confidence 0.90)\n"
                          "a suspicious focus enhanced at the baseline already (88 % of it): anatomy seen before")
    plain = record.model_copy(update={"decision": decision.model_copy(update={"flag_reasons": []})})
    assert "\n" not in key_image_title(plain)
