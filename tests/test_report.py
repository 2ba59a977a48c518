"""patients/<patient>/report.html: renders, holds every study, inlines its images, escapes text."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.core.records import AssessmentRecord, Category, Decision
from pipeline.outputs.contract import read_assessment
from pipeline.outputs.report import render_patient_report, write_patient_report
from tests.helpers import focus, imaging

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


class _Collector(HTMLParser):
    """The page's images, study sections and timeline rows (the structure a reader sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.img_src: list[str] = []
        self.sections: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.img_src.append(attrs.get("src", ""))
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if tag == "script":
            self.scripts += 1


def _parse(html: str) -> _Collector:
    collector = _Collector()
    collector.feed(html)
    return collector


def _record(uid: str, date: str, category: Category, patient: str, flags: list[str], rule: str) -> AssessmentRecord:
    return AssessmentRecord(
        patient_id=patient, study_instance_uid=uid, study_date=date, timepoint="follow_up", session=1,
        ablation_date="2024-01-01", days_since_ablation=90, baseline_study_instance_uid="1.2",
        imaging=imaging(28.0, foci=[focus()]),
        decision=Decision(category=category, rule_id="R2-ltp-after-documented-complete", rule=rule,
                          values={"focus_max_thickness_mm": 7.0, "focus_reason": "nodular <b>thick</b>"},
                          thresholds={"min_thickness_mm": 5.0}, confidence=0.8, flagged=bool(flags),
                          flag_reasons=flags))


def test_report_escapes_text_and_inlines_images(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script>'
    patient_folder = tmp_path / "patients" / "P"
    studies = []
    for i, (date, cat) in enumerate([("2024-02-01", Category.COMPLETE_ABLATION),
                                     ("2024-05-01", Category.LOCAL_TUMOUR_PROGRESSION)]):
        folder = patient_folder / f"{date}_{i}"
        folder.mkdir(parents=True)
        (folder / "key_image.png").write_bytes(PNG_1PX)
        studies.append((_record(f"1.2.{i}", date, cat, f"P{evil}", [f"flag {evil}"], f"rule & {evil}"), folder))
    (patient_folder / "timeline.png").write_bytes(PNG_1PX)
    write_patient_report(patient_folder / "report.html", f"P{evil}", studies)
    html = (patient_folder / "report.html").read_text()

    page = _parse(html)
    assert page.scripts == 0 and "<script>" not in html and "<b>thick</b>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "rule &amp; &lt;script&gt;" in html and "nodular &lt;b&gt;thick&lt;/b&gt;" in html
    # Self-contained: every image is inline, the key images and the timeline plot.
    assert len(page.img_src) == 3 and all(src.startswith("data:image/png;base64,") for src in page.img_src)
    assert base64.b64encode(PNG_1PX).decode() in page.img_src[0]
    assert len(page.sections) == 2
    for category in ("complete ablation", "local tumour progression"):
        assert category in html
    # Evidence, values against thresholds, in words (issue 18).
    assert "a nodule is at least this thick (mm)" in html and "as rule 9 compares it (mm)" in html
    assert "min_thickness_mm" not in html and "focus_max_thickness_mm" not in html


def test_report_speaks_words_and_keeps_uids_in_the_details(tmp_path: Path) -> None:
    """Issue 18: code names (az_long_axis_mm, rim_benign_pattern False) and full UIDs where a
    radiologist reads."""
    record = _record("1.2.826.0.1.3680043.8.498.12345678901234567890", "2024-05-01",
                     Category.RESIDUAL_UNABLATED_TUMOUR, "P", ["residual_unablated_tumour: nodular"], "r")
    record.decision.values.update({"az_long_axis_mm": 31.234, "rim_benign_pattern": False})
    record.imaging.foci[0] = record.imaging.foci[0].model_copy(update={"measured_thickness_mm": 14.2})
    html = render_patient_report("P", [(record, tmp_path / "missing")], tmp_path)
    assert "ablation zone long axis (mm)</td><td class=\"num\">31.2<" in html
    assert "rim thin, smooth and covering the margin (benign pattern)</td><td class=\"num\">no<" in html
    assert "az_long_axis_mm" not in html and "rim_benign_pattern" not in html and "False" not in html
    assert "residual unablated tumour: nodular" in html and "residual_unablated_tumour" not in html
    assert ">14.2 mm<" in html  # the focus's whole thickness
    body, _, details = html.partition("<details>")
    assert record.study_instance_uid not in body and record.study_instance_uid in details
    assert "R2-ltp-after-documented-complete" not in body


def test_report_without_images_says_so(tmp_path: Path) -> None:
    record = _record("1.2.9", "2024-02-01", Category.INDETERMINATE, "P", [], "not evaluable")
    html = render_patient_report("P", [(record, tmp_path / "missing")], tmp_path)
    assert "No key image for this study" in html and "No timeline plot" in html
    assert not _parse(html).img_src


@pytest.mark.slow
def test_flow_wrote_a_report_per_patient_with_every_study(assessed_run) -> None:
    _, out, _, _ = assessed_run
    patients = sorted(p for p in (out / "patients").iterdir() if p.is_dir())
    assert patients
    for patient in patients:
        html = (patient / "report.html").read_text()
        records = [read_assessment(p) for p in sorted(patient.glob("*/assessment.json"))]
        page = _parse(html)
        assert len(page.sections) == len(records)
        for record in records:
            assert record.study_instance_uid in html
            assert record.decision.rule_id in html
        n_key_images = len(list(patient.glob("*/key_image.png")))
        assert len(page.img_src) == n_key_images + 1  # + timeline.png
        assert all(src.startswith("data:image/png;base64,") for src in page.img_src)
        assert not re.search(r'src="(?!data:)', html)  # nothing fetched from elsewhere
