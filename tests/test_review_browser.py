"""The review app end to end: the flow fills the worklist, a radiologist overrides a call in a
real headless browser (Debian's chromium driven by playwright), and the next run's cohort.csv
carries the verdict.

Works on a copy of the shared ``assessed_run`` output (the fixture's folder is never written).
"""

from __future__ import annotations

import csv
import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.review import auth
from pipeline.review.app import create_app
from pipeline.review.db import AuditEvent, Verdict, WorklistItem, database_url, open_engine
from tests.review_support import CHROMIUM, CHROMIUM_ARGS, free_port

pytestmark = pytest.mark.slow
PASSWORD = "radiologist-pass"


def _cohort(out: Path) -> dict[str, dict[str, str]]:
    with (out / "cohort.csv").open() as handle:
        return {r["study_instance_uid"]: r for r in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def review_copy(assessed_run, tmp_path_factory):
    root, out, _truth, _summary = assessed_run
    copy = tmp_path_factory.mktemp("review") / "out"
    shutil.copytree(out, copy)
    return root, copy


def test_flow_puts_every_flagged_study_on_the_worklist(review_copy):
    _root, out = review_copy
    cohort = _cohort(out)
    flagged = {uid for uid, r in cohort.items() if r["flagged"] == "true"}
    assert flagged, "the fixture's export has flagged studies"
    engine = open_engine(database_url(out))
    with Session(engine) as s:
        items = s.scalars(select(WorklistItem)).all()
        assert {i.study_instance_uid for i in items} == flagged
        assert all(i.status == "pending" for i in items)
        assert {i.machine_category for i in items} == {cohort[u]["category"] for u in flagged}
        adds = s.scalars(select(AuditEvent).where(AuditEvent.action == "worklist_add")).all()
        assert len(adds) == len(flagged)
    engine.dispose()
    assert all(r["reviewed_category"] == "" for r in cohort.values())


@pytest.fixture()
def server(review_copy, tmp_path):
    _root, out = review_copy
    users = tmp_path / "users.txt"
    auth.add_user(users, "rad1", PASSWORD)
    app = create_app(out, users, https_only=False)  # served over plain HTTP (review --insecure-http)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


def test_sign_in_override_and_next_run_carries_the_verdict(review_copy, server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test skipped: {CHROMIUM} is absent (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from flows.assess import run_assessment

    root, out = review_copy
    base, app = server
    with Session(app.state.engine) as s:
        item = s.scalars(select(WorklistItem).order_by(WorklistItem.study_date.desc())).first()
        item_id, uid, machine = item.id, item.study_instance_uid, item.machine_category
    chosen = "no_evidence_of_ltp" if machine != "no_evidence_of_ltp" else "indeterminate"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base + "/")
        assert page.url == base + "/login"  # nothing without a session
        page.fill("input[name=username]", "rad1")
        page.fill("input[name=password]", "not the password")
        page.click("button[type=submit]")
        assert "Wrong user name or password" in page.text_content(".error")
        page.fill("input[name=username]", "rad1")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        rows = page.locator("#worklist tbody tr")
        with Session(app.state.engine) as s:
            n_items = len(s.scalars(select(WorklistItem)).all())
        assert rows.count() == n_items
        # Sort by study date, ascending: the column reads in order (the heuristic confidence is
        # no longer a worklist column, issue 18).
        page.goto(base + "/?sort=date&order=asc")
        values = page.locator("#worklist tbody td:nth-child(2)").all_text_contents()
        assert values == sorted(values) and len(values) == n_items

        page.click(f"a[href='/case/{item_id}']")
        page.wait_for_url(f"{base}/case/{item_id}")
        assert page.text_content("#machine-category") == machine
        page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('img.slice-img')];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""")
        # Baseline and follow-up, four panels each (the fixture's latest flagged study is a
        # follow-up whose registration to the baseline passed QC).
        assert page.locator("img.slice-img").count() == 8
        current_pre = page.locator("img[data-view=current][data-panel=pre]")
        src_before = current_pre.get_attribute("src")
        k = int(page.get_attribute("#slice", "value"))
        page.focus("#slice")
        page.keyboard.press("ArrowRight")  # scrolls every panel one slice
        assert int(page.get_attribute("#slice", "value")) == k + 1 or int(page.input_value("#slice")) == k + 1
        page.wait_for_function("(before) => document.querySelector('img[data-view=current][data-panel=pre]').src"
                               " !== before && document.querySelector('img[data-view=current][data-panel=pre]')"
                               ".naturalWidth > 0", arg=base + src_before)
        assert current_pre.get_attribute("src").endswith(f"/{k + 1}.png")

        page.select_option("#override-form select[name=category]", chosen)
        page.fill("#override-form textarea[name=reason]", "enhancement is a vessel crossing the margin")
        page.click("#override-form button[type=submit]")
        page.wait_for_url(f"{base}/case/{item_id}")
        assert page.text_content("#status") == "overridden"
        assert page.text_content("#reviewed-category") == chosen
        assert "rad1" in page.text_content("#history")
        browser.close()

    with Session(app.state.engine) as s:
        verdicts = s.scalars(select(Verdict)).all()
        assert [(v.item_id, v.action, v.category, v.username, v.machine_category) for v in verdicts] == [
            (item_id, "override", chosen, "rad1", machine)]
        assert verdicts[0].reason == "enhancement is a vessel crossing the margin"

    # The next run (the real flow on the copy: every study is reused) fills reviewed_category,
    # and leaves the verdict and the adjudicated item as they were.
    run_assessment(root / "data" / "export", out, root / "data" / "procedures.csv", workers=2, device="cpu")
    cohort = _cohort(out)
    assert cohort[uid]["reviewed_category"] == chosen
    assert cohort[uid]["category"] == machine
    assert all(r["reviewed_category"] == "" for u, r in cohort.items() if u != uid)
    with Session(app.state.engine) as s:
        item = s.get(WorklistItem, item_id)
        assert (item.status, item.machine_category) == ("overridden", machine)
        assert len(s.scalars(select(Verdict)).all()) == 1
