"""The review database: worklist sync never overwrites a verdict, audit rows, CSV export.

Every test runs on SQLite and, where a PostgreSQL server can be started here (Debian's
``postgresql``: initdb + pg_ctl into a temporary folder), on PostgreSQL too.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.review.db import (
    PIPELINE_USER,
    AuditEvent,
    Base,
    ReviewError,
    Verdict,
    WorklistItem,
    database_url,
    export_csv,
    open_engine,
    record_verdict,
    reviewed_categories,
    sync_worklist,
)
from tests.review_support import flagged


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        eng = open_engine(database_url(tmp_path))
        yield eng
        eng.dispose()
        return
    server = request.getfixturevalue("postgres")
    if server.url is None:
        pytest.skip(f"PostgreSQL run skipped: {server.why_not}")
    eng = open_engine(server.url)
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    yield eng
    Base.metadata.drop_all(eng)
    eng.dispose()


def _item(engine, uid: str) -> WorklistItem:
    with Session(engine) as s:
        return s.scalar(select(WorklistItem).where(WorklistItem.study_instance_uid == uid))


def _audit(engine) -> list[AuditEvent]:
    with Session(engine) as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_default_url_is_sqlite_file_in_out(tmp_path):
    assert database_url(tmp_path) == f"sqlite:///{(tmp_path / 'review.sqlite').resolve()}"
    assert database_url(tmp_path, "postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_rerun_adds_new_refreshes_pending_and_never_overwrites_a_verdict(engine):
    first = sync_worklist(engine, [flagged("1.1"), flagged("1.2", category="residual_unablated_tumour")])
    assert (first.added, first.updated) == (2, 0)
    # The same run again changes nothing.
    again = sync_worklist(engine, [flagged("1.1"), flagged("1.2", category="residual_unablated_tumour")])
    assert (again.added, again.updated, again.kept_adjudicated) == (0, 0, 0)

    item = _item(engine, "1.1")
    record_verdict(engine, item.id, "alice", "override", "no_evidence_of_ltp", reason="vessel, not a nodule")

    # Next night: the machine's call changes for both; only the pending one follows.
    rerun = sync_worklist(engine, [flagged("1.1", category="indeterminate", confidence=0.3),
                                   flagged("1.2", category="complete_ablation", confidence=0.5),
                                   flagged("1.3")])
    assert (rerun.added, rerun.updated, rerun.kept_adjudicated) == (1, 1, 1)
    adjudicated = _item(engine, "1.1")
    assert adjudicated.status == "overridden"
    assert adjudicated.machine_category == "local_tumour_progression"  # what the radiologist overrode
    pending = _item(engine, "1.2")
    assert (pending.status, pending.machine_category, pending.confidence) == ("pending", "complete_ablation", 0.5)
    assert reviewed_categories(engine) == {"1.1": "no_evidence_of_ltp"}
    # The machine's new call on the adjudicated item is in the audit trail, once.
    sync_worklist(engine, [flagged("1.1", category="indeterminate", confidence=0.3)])
    changed = [e for e in _audit(engine) if e.action == "machine_changed_after_verdict"]
    assert len(changed) == 1 and json.loads(changed[0].after)["machine_category"] == "indeterminate"
    assert json.loads(changed[0].before)["machine_category"] == "local_tumour_progression"
    with Session(engine) as s:
        verdicts = list(s.scalars(select(Verdict)))
    assert [(v.action, v.category, v.username) for v in verdicts] == [("override", "no_evidence_of_ltp", "alice")]


def test_verdicts_are_checked(engine):
    sync_worklist(engine, [flagged("2.1")])
    item_id = _item(engine, "2.1").id
    with pytest.raises(ReviewError, match="unknown category"):
        record_verdict(engine, item_id, "bob", "override", "progressive_disease", reason="x")
    with pytest.raises(ReviewError, match="other than the machine"):
        record_verdict(engine, item_id, "bob", "override", "local_tumour_progression", reason="x")
    with pytest.raises(ReviewError, match="needs a reason"):
        record_verdict(engine, item_id, "bob", "override", "no_evidence_of_ltp", reason="  ")
    with pytest.raises(ReviewError, match="cannot be empty"):
        record_verdict(engine, item_id, "bob", "comment", comment="")
    with pytest.raises(ReviewError, match="no worklist item"):
        record_verdict(engine, item_id + 100, "bob", "confirm")
    with pytest.raises(ReviewError, match="unknown action"):
        record_verdict(engine, item_id, "bob", "delete")
    assert _item(engine, "2.1").status == "pending"
    # A comment leaves the status; a confirm takes the machine's category.
    record_verdict(engine, item_id, "bob", "comment", comment="look at the rim on slice 12")
    assert _item(engine, "2.1").status == "pending"
    record_verdict(engine, item_id, "bob", "confirm", comment="agree")
    assert _item(engine, "2.1").status == "confirmed"
    assert reviewed_categories(engine) == {"2.1": "local_tumour_progression"}


def test_audit_trail_has_who_when_what_before_after(engine):
    sync_worklist(engine, [flagged("3.1")])
    sync_worklist(engine, [flagged("3.1", confidence=0.6)])
    item_id = _item(engine, "3.1").id
    record_verdict(engine, item_id, "carol", "override", "suspected_local_tumour_progression", reason="growth only")
    events = _audit(engine)
    assert [(e.username, e.action) for e in events] == [
        (PIPELINE_USER, "worklist_add"), (PIPELINE_USER, "machine_update"), ("carol", "override")]
    assert all(e.at is not None and e.study_instance_uid == "3.1" for e in events)
    update = events[1]
    assert json.loads(update.before)["confidence"] == 0.9 and json.loads(update.after)["confidence"] == 0.6
    override = events[2]
    before, after = json.loads(override.before), json.loads(override.after)
    assert (before["status"], before["reviewed_category"]) == ("pending", None)
    assert (after["status"], after["reviewed_category"], after["reason"]) == (
        "overridden", "suspected_local_tumour_progression", "growth only")


def test_csv_export_of_adjudicated_results(engine, tmp_path):
    sync_worklist(engine, [flagged("4.1"), flagged("4.2", confidence=0.55)])
    record_verdict(engine, _item(engine, "4.1").id, "dave", "override", "no_evidence_of_ltp", reason="artefact",
                   comment="motion")
    path = export_csv(engine, tmp_path / "export" / "review.csv")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    by_uid = {r["study_instance_uid"]: r for r in rows}
    assert set(by_uid) == {"4.1", "4.2"}
    done, open_ = by_uid["4.1"], by_uid["4.2"]
    assert (done["status"], done["machine_category"], done["reviewed_category"], done["verdict"], done["reason"],
            done["comment"], done["reviewer"]) == (
        "overridden", "local_tumour_progression", "no_evidence_of_ltp", "override", "artefact", "motion", "dave")
    assert done["reviewed_at"]
    assert (open_["status"], open_["reviewed_category"], open_["confidence"]) == ("pending", "", "0.55")
    # Typed text cannot become a spreadsheet formula.
    record_verdict(engine, _item(engine, "4.2").id, "dave", "comment", comment='=HYPERLINK("http://x")')
    rows = {r["study_instance_uid"]: r for r in csv.DictReader(io.StringIO(export_csv(engine, path).read_text()))}
    assert rows["4.2"]["comment"] == "'=HYPERLINK(\"http://x\")"
    assert not list(tmp_path.glob("export/.*.tmp"))  # written atomically
