"""Screenshots of the review app for docs/review.md, taken with headless chromium.

    .venv/bin/ablation-response demo --out demo_out
    .venv/bin/python scripts/review_screenshots.py demo_out/results --to docs

Works on a temporary copy of the run (the run's folder is not written): syncs the worklist,
adds a throw-away user, overrides one call so that the worklist shows an adjudicated row, and
saves ``review-worklist.png`` and ``review-case.png`` (the first flagged follow-up with a
baseline). Prints how long the case page and its slices took (cold, then cached).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.review import auth  # noqa: E402
from pipeline.review.app import create_app  # noqa: E402
from pipeline.review.db import WorklistItem, record_verdict  # noqa: E402
from pipeline.review.sync import records_of_run, review_after_run  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run's output folder (e.g. demo_out/results)")
    parser.add_argument("--to", type=Path, default=Path("docs"))
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        shutil.copytree(args.run, out)
        review_after_run(out, records_of_run(out))
        users = Path(tmp) / "users.txt"
        auth.add_user(users, "dr.martin", "screenshot-only-password")
        app = create_app(out, users)
        with Session(app.state.engine) as s:
            items = s.scalars(select(WorklistItem).order_by(WorklistItem.study_date)).all()
            with_baseline = [i for i in items if i.baseline_folder]
            case = next((i for i in with_baseline if i.machine_category == "local_tumour_progression"),
                        (with_baseline or items)[0])
            other = next((i for i in items if i.id != case.id), None)
        if other is not None:
            record_verdict(app.state.engine, other.id, "dr.martin", "confirm", comment="agree")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{args.port}"
        args.to.mkdir(parents=True, exist_ok=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(base + "/login")
                page.fill("input[name=username]", "dr.martin")
                page.fill("input[name=password]", "screenshot-only-password")
                page.click("button[type=submit]")
                page.wait_for_url(base + "/")
                page.screenshot(path=str(args.to / "review-worklist.png"), full_page=True)
                for label in ("cold", "cached"):
                    started = time.perf_counter()
                    page.goto(f"{base}/case/{case.id}")
                    page.wait_for_function("""() => [...document.querySelectorAll('img.slice-img')]
                        .every(i => i.complete && i.naturalWidth > 0)""")
                    print(f"case page with its 8 slices ({label}): {time.perf_counter() - started:.2f} s")
                page.screenshot(path=str(args.to / "review-case.png"), full_page=True)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    print(f"wrote {args.to / 'review-worklist.png'} and {args.to / 'review-case.png'}")


if __name__ == "__main__":
    main()
