"""What the review pages show a radiologist (issue 18): rounded values in words, an override
with no category chosen in advance, the confidence called a heuristic and off the worklist."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.core.records import AssessmentRecord, Category, Decision, RegistrationQC
from pipeline.outputs.contract import write_assessment
from pipeline.review import auth
from pipeline.review.app import create_app
from pipeline.review.db import WorklistItem, sync_worklist
from tests.helpers import focus, imaging
from tests.review_support import flagged

PASSWORD = "correct horse battery"


@pytest.fixture()
def client(tmp_path):
    out = tmp_path / "out"
    study = flagged("7.1", baseline_folder=None, baseline_study_instance_uid=None, post_series_uid=None,
                    confidence=0.95)
    folder = out / study.study_folder
    folder.mkdir(parents=True)
    for name, arr in (("pre_registered", np.full((4, 8, 8), 100, np.float32)),
                      ("subtraction", np.zeros((4, 8, 8), np.float32)), ("labels", np.zeros((4, 8, 8), np.uint8))):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"{name}.nii.gz"))
    record = AssessmentRecord(
        patient_id="P-001", study_instance_uid="7.1", study_date="2026-03-01", timepoint="follow_up", session=1,
        ablation_date="2025-09-02", days_since_ablation=180, baseline_study_instance_uid=None, imaging=imaging(35.2149, [focus(diameter=16.27, thickness=10.0).model_copy(
            update={"seen_at_baseline_fraction": 0.123})]).model_copy(
            update={"surroundings_re": {"3": 0.6, "1": 0.25}, "enhancement_above_surroundings": True}),
        decision=Decision(category=Category.LOCAL_TUMOUR_PROGRESSION, rule_id="R2", rule="r", confidence=0.95,
                          flagged=True, flag_reasons=["local_tumour_progression: nodular focus"],
                          values={"az_long_axis_mm": 35.2149, "rim_max_thickness_mm": 2.98741,
                                  "rim_benign_pattern": False, "focus_max_thickness_mm": 10.0},
                          thresholds={"min_thickness_mm": 5.0}),
        # A follow-up of another field of view whose registration passed on the zone's region.
        registration_to_baseline=RegistrationQC(
            name="followup_to_baseline", method="torch:rigid+field", metric="mattes_mi", metric_before=-0.3,
            metric_after=-1.6, iterations=80, stop_condition="", motion_corrected_mm=12.0, ok=True,
            overlap=0.35, zone_coverage=1.0, peak_offset_mm=0.4))
    write_assessment(folder / "assessment.json", record)
    users = tmp_path / "users.txt"
    auth.add_user(users, "alice", PASSWORD)
    app = create_app(out, users, secret="s" * 64)
    sync_worklist(app.state.engine, [study])
    with TestClient(app, base_url="https://testserver") as c:  # the session cookie is Secure by default
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
        c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token})
        with Session(app.state.engine) as s:
            item_id = s.scalar(select(WorklistItem.id))
        yield c, item_id


def test_the_evidence_is_rounded_to_what_was_measured_and_in_words(client):
    c, item_id = client
    html = c.get(f"/case/{item_id}").text
    assert "<td>ablation zone long axis (mm)</td><td>35.2</td>" in html and "35.2149" not in html
    assert "<td>rim, thickest point (mm)</td><td>3.0</td>" in html and "2.98741" not in html
    assert "(benign pattern)</td><td>no</td>" in html and "False" not in html
    assert "<td>a nodule is at least this thick (mm)</td><td></td><td>5.0</td>" in html
    assert "local tumour progression: nodular focus" in html


def test_an_override_starts_with_no_category_chosen(client):
    c, item_id = client
    html = c.get(f"/case/{item_id}").text
    select_html = html[html.index('<select name="category"'):html.index("</select>")]
    options = re.findall(r"<option[^>]*>", select_html)
    assert options[0] == '<option value="" selected disabled>'
    assert all("selected" not in o for o in options[1:])
    # Sent without a choice anyway, it is refused and nothing is recorded.
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    refused = c.post(f"/case/{item_id}/verdict", data={"csrf_token": token, "action": "override", "category": "",
                                                      "reason": "r"})
    assert "unknown category" in refused.text
    assert "no verdict yet" in c.get(f"/case/{item_id}").text


def test_the_confidence_is_a_heuristic_on_the_case_and_off_the_worklist(client):
    c, item_id = client
    assert "heuristic confidence 0.95" in c.get(f"/case/{item_id}").text
    worklist = c.get("/").text
    assert "confidence" not in worklist and "0.95" not in worklist


def test_another_field_of_view_is_said_on_the_case_page(client):
    c, item_id = client
    html = c.get(f"/case/{item_id}").text
    assert "Registration to the baseline: passed QC; another field of view: 35 % of the baseline's body" in html


def test_how_much_of_a_focus_enhanced_at_the_baseline_is_said_on_the_case_page(client):
    c, item_id = client
    html = c.get(f"/case/{item_id}").text
    assert ("Suspicious foci: 16.3 mm across, 10.0 mm thick (enhanced at the registered baseline over 12 % of "
            "its volume)") in html


def test_a_zone_in_enhancing_parenchyma_is_said_on_the_case_page(client):
    c, item_id = client
    html = c.get(f"/case/{item_id}").text
    assert ("The zone lies in enhancing parenchyma (median enhancement 10-25 mm around it: phase 3 +60 %, "
            "phase 1 +25 %): rim and foci are read as enhancement above it.") in html


def test_the_enhancement_above_surroundings_column_is_there_only_with_its_image(client):
    # The fixture's study has no above_surroundings.nii.gz and no post-contrast series: the
    # optional column is left out, the post-contrast column stays and says it is not available.
    c, item_id = client
    html = c.get(f"/case/{item_id}").text
    assert "enhancement above surroundings" not in html
    assert "<th>post</th>" in html and "not available" in html
    with Session(c.app.state.engine) as s:
        folder = c.app.state.out_dir / s.scalar(select(WorklistItem.study_folder))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32)), str(folder / "above_surroundings.nii.gz"))
    html = c.get(f"/case/{item_id}").text
    assert "<th>enhancement above surroundings</th>" in html
    assert f'src="/case/{item_id}/slice/current/above/' in html
