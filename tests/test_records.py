"""One way to build an indeterminate decision and one way to build an error row from an
exception (issue 17): ``Decision.indeterminate`` and ``ErrorRecord.from_exception``, and no
product module builds either by hand any more."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.records import Category, Changes, Decision, ErrorRecord
from pipeline.longitudinal.classify import classify_patient
from pipeline.longitudinal.indeterminate import indeterminate_records
from pipeline.longitudinal.timeline import build_patient_timeline
from tests.helpers import classify_sections, imaging, study

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config()


def test_an_indeterminate_decision_is_flagged_with_its_reason():
    d = Decision.indeterminate("no post-contrast T1 series")
    assert (d.category, d.rule_id, d.rule, d.confidence, d.flagged, d.new_lesion) == (
        Category.INDETERMINATE, "R5-not-evaluable", "not evaluable: no post-contrast T1 series", 0.0, True, False)
    assert d.flag_reasons == ["indeterminate: no post-contrast T1 series"] and d.changes == Changes()
    flags = ["early_baseline"]
    d = Decision.indeterminate("no zone", rule_id="R5-no-ablation-zone", flags=flags, new_lesion=True)
    assert d.rule_id == "R5-no-ablation-zone" and d.new_lesion
    assert d.flag_reasons == ["early_baseline", "indeterminate: no zone"] and flags == ["early_baseline"]


def test_the_classifier_and_the_failed_patient_records_use_it():
    studies = [study("s1", 30), study("s2", 90), study("s3", 180)]
    imgs = {"s1": imaging(30), "s2": imaging(None, ok=False, reason="registration failed"), "s3": imaging(None)}
    entries = build_patient_timeline(studies, None, {s.study_instance_uid: True for s in studies}, CFG.rules)
    decisions = classify_patient(entries, imgs, *classify_sections(CFG))
    s2, s3 = decisions["s2"], decisions["s3"]
    # Each with the study's own flags first (timeline flags), then its reason.
    assert s2 == Decision.indeterminate("registration failed", flags=s2.flag_reasons[:-1], changes=s2.changes)
    assert s3 == Decision.indeterminate("no ablation zone found where one must be", rule_id="R5-no-ablation-zone",
                                        flags=s3.flag_reasons[:-1], changes=s3.changes)
    records = indeterminate_records(studies, "patient assessment failed: RuntimeError: x", CFG.rules)
    assert all(r.decision == Decision.indeterminate("patient assessment failed: RuntimeError: x") for r in records)


def test_an_error_row_from_an_exception():
    exc = ValueError("bad spacing")
    row = ErrorRecord.from_exception(exc, "imaging", "imaging failed", patient_id="P1", study_instance_uid="1.2")
    assert row == ErrorRecord("", "P1", "1.2", "", "imaging", "imaging failed: ValueError: bad spacing")
    row = ErrorRecord.from_exception(OSError("gone"), "report", path="/x/report.html", series_instance_uid="1.2.3")
    assert row == ErrorRecord("/x/report.html", "", "", "1.2.3", "report", "OSError: gone")


def _hand_built(source: str, where: str) -> list[str]:
    """``Decision(category=Category.INDETERMINATE, ...)`` and ``ErrorRecord(...)`` whose reason is
    an f-string naming an exception's type: what the two constructors above replace."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id == "Decision" and any(
                isinstance(k.value, ast.Attribute) and k.value.attr == "INDETERMINATE" for k in node.keywords):
            found.append(f"{where}:{node.lineno}: indeterminate Decision built by hand")
        if node.func.id == "ErrorRecord" and any(
                isinstance(sub, ast.Attribute) and sub.attr == "__name__"
                for arg in [*node.args, *(k.value for k in node.keywords)] for sub in ast.walk(arg)):
            found.append(f"{where}:{node.lineno}: error row built by hand from an exception")
    return found


def test_no_hand_built_indeterminate_decision_or_exception_row():
    sample = ('Decision(category=Category.INDETERMINATE, rule_id="x")\n'
              'ErrorRecord("", "", "", "", "s", f"failed: {type(exc).__name__}: {exc}")\n'
              'ErrorRecord("", "", "", "", "s", "plain reason")\n')
    assert [hit.split(": ", 1)[0] for hit in _hand_built(sample, "sample")] == ["sample:1", "sample:2"]
    found = [hit for package in ("pipeline", "models", "flows") for path in sorted((ROOT / package).rglob("*.py"))
             for hit in _hand_built(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)
