"""The review web app (FastAPI, server-rendered jinja2 pages, a little vanilla JS).

Pages: ``/login``, ``/`` (the worklist, sortable), ``/case/{id}`` (images, the machine's call and
its evidence, the verdict forms), ``/case/{id}/slice/{view}/{panel}/{k}.png``, ``/export.csv``.

Security:
- every route but ``/login`` and the static CSS/JS needs a signed session cookie (Starlette's
  SessionMiddleware, itsdangerous-signed, SameSite=Strict, 8 h) naming a session the server
  holds: signing out (or a restart) ends it server-side, so a replayed cookie is refused; a user
  removed from the user file loses access at the next request;
- the cookie is ``Secure`` (sent over HTTPS only) unless the app is created with
  ``https_only=False`` (``review --insecure-http``: plain HTTP on a trusted host);
- sign-in is locked for 5 minutes after 5 failures within 5 minutes, per user name and per
  client address (:class:`SignInThrottle`), answered 429 and audited;
- every POST carries the session's CSRF token in its form (compared in constant time);
- studies are addressed by their worklist id; the folders come from the database (written by
  the pipeline) and are resolved under OUT; view/panel names are checked against fixed lists;
- pages are ``Cache-Control: no-store`` and framed by nobody (CSP ``frame-ancestors 'none'``).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated

import jinja2
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.middleware.sessions import SessionMiddleware

from pipeline.outputs.contract import read_assessment
from pipeline.outputs.report import flag_words, value_words, words
from pipeline.review import auth
from pipeline.review.db import (
    CATEGORIES,
    PENDING,
    ReviewError,
    WorklistItem,
    audit_sign_in,
    database_url,
    export_csv_text,
    open_engine,
    record_verdict,
)
from pipeline.review.slices import OPTIONAL_NIFTI, PANELS, VIEWS, UnsafePathError, case_key, load_case, resolve_under, slice_png

HERE = Path(__file__).resolve().parent
SESSION_MAX_AGE_S = 8 * 3600
SORTS = {"date": WorklistItem.study_date, "category": WorklistItem.machine_category,
         "confidence": WorklistItem.confidence, "patient": WorklistItem.patient_id, "status": WorklistItem.status}
SECRET_NAME = "review_session.key"
log = logging.getLogger(__name__)


class NotSignedIn(Exception):
    pass


class CsrfRefused(Exception):
    pass


class SignInThrottle:
    """Failed sign-ins per key (a user name, a client address) within a sliding window; a key
    with ``max_failures`` in the window is locked until the oldest of them leaves it.
    In memory: a restart forgets it (and signs everybody out, see :func:`create_app`)."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, clock=time.monotonic) -> None:
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        return times

    def locked_for(self, keys: list[str]) -> float:
        """Seconds until every key may try again (0: none is locked)."""
        now = self.clock()
        with self._lock:
            waits = [times[0] + self.window_s - now for times in (self._recent(k, now) for k in keys)
                     if len(times) >= self.max_failures]
        return max(waits, default=0.0)

    def failed(self, keys: list[str]) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) > 100_000:  # a spray of made-up names must not grow memory forever
                self._failures = {k: t for k, t in self._failures.items() if self._recent(k, now)}
            for key in keys:
                self._failures[key] = self._recent(key, now)
                self._failures[key].append(now)


class Users:
    """The user file, re-read when it changes (so removing a user takes effect at once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: int | None = None
        self._users: dict[str, str] = {}
        self.get()  # fail at start-up on a missing or malformed file

    def get(self) -> dict[str, str]:
        mtime = self.path.stat().st_mtime_ns
        if mtime != self._mtime:
            self._users, self._mtime = auth.read_users(self.path), mtime
        return self._users


def create_app(out_dir: Path, users_file: Path, db_url: str | None = None, secret: str | None = None,
               https_only: bool = True, clock=time.monotonic) -> FastAPI:
    """The app over one run's OUT folder. ``secret`` signs the session (default: a key kept in OUT);
    ``https_only``: the session cookie is Secure; ``clock`` (seconds) times sessions and lockouts."""
    out_dir = Path(out_dir).resolve()
    # Server-side sessions: id -> (user name, expiry on ``clock``). Why not only the signed
    # cookie: a cookie stays valid until it expires, so signing out must end it here.
    sessions: dict[str, tuple[str, float]] = {}
    throttle = SignInThrottle(clock=clock)
    users = Users(users_file)
    engine = open_engine(database_url(out_dir, db_url))
    secret = secret or auth.load_or_create_secret(out_dir / SECRET_NAME)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    # The evidence as the report shows it: names in words, values rounded to what was measured.
    env.filters["words"] = words
    env.filters["val"] = value_words
    env.filters["flag_words"] = flag_words
    templates = Jinja2Templates(env=env)

    app = FastAPI(title="ablation-response review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="ablation_review",
                       max_age=SESSION_MAX_AGE_S, same_site="strict", https_only=https_only)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'; form-action 'self'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(NotSignedIn)
    async def not_signed_in(request: Request, _exc: NotSignedIn):
        if request.method == "GET" and not request.url.path.endswith((".png", ".csv")):
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("sign in first", status_code=401)

    def user_of(request: Request) -> str:
        name = request.session.get("user")
        held = sessions.get(str(request.session.get("sid", "")))
        if not name or name not in users.get() or held is None or held[0] != name or held[1] <= clock():
            request.session.clear()
            raise NotSignedIn()
        return name

    def valid_id(item_id: int) -> bool:
        """A worklist id the database can hold (SQLite/PostgreSQL BIGINT): larger ones are 404."""
        return 0 < item_id < 2 ** 63

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = auth.new_csrf_token()
        return token

    def check_csrf(request: Request, token: str | None) -> None:
        if not auth.csrf_ok(request.session.get("csrf"), token):
            raise CsrfRefused()

    @app.exception_handler(CsrfRefused)
    async def forbidden(_request: Request, _exc: CsrfRefused):
        return PlainTextResponse("invalid or missing CSRF token: reload the page and try again", status_code=403)

    def item_or_404(session: Session, item_id: int) -> WorklistItem | None:
        return session.get(WorklistItem, item_id)

    def page(request: Request, name: str, http_status: int = 200, **context):
        context.setdefault("user", request.session.get("user"))
        return templates.TemplateResponse(request, name, {"csrf": csrf_token(request), **context}, status_code=http_status)

    # ------------------------------------------------------------------ sign-in
    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        return page(request, "login.html", error="")

    @app.post("/login")
    def login(request: Request, username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "",
              csrf_token_: Annotated[str, Form(alias="csrf_token")] = ""):
        check_csrf(request, csrf_token_)
        keys = [f"user:{username[:128]}", f"address:{request.client.host if request.client else '?'}"]
        wait = throttle.locked_for(keys)
        if wait > 0:
            audit_sign_in(engine, username[:128] or "?", False, locked=True)
            return page(request, "login.html", http_status=429,
                        error=f"Too many failed sign-ins: try again in {max(1, round(wait / 60))} minute(s).")
        ok = auth.authenticate(users.get(), username, password)
        audit_sign_in(engine, username[:128] or "?", ok)
        if not ok:
            throttle.failed(keys)
            return page(request, "login.html", http_status=401, error="Wrong user name or password.")
        sessions.pop(str(request.session.get("sid", "")), None)
        request.session.clear()  # a new session (and CSRF token) at each sign-in
        sid = secrets.token_urlsafe(32)
        sessions[sid] = (username, clock() + SESSION_MAX_AGE_S)
        request.session.update(user=username, sid=sid, csrf=auth.new_csrf_token())
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    def logout(request: Request, csrf_token_: Annotated[str, Form(alias="csrf_token")] = ""):
        check_csrf(request, csrf_token_)
        sessions.pop(str(request.session.get("sid", "")), None)  # a replayed cookie names no session now
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ------------------------------------------------------------------ worklist
    @app.get("/", response_class=HTMLResponse)
    def worklist(request: Request, sort: str = "date", order: str = "desc", status: str = "all"):
        user = user_of(request)
        sort = sort if sort in SORTS else "date"
        order = "asc" if order == "asc" else "desc"
        column = SORTS[sort]
        query = select(WorklistItem).order_by(column.asc() if order == "asc" else column.desc(), WorklistItem.id)
        if status == "pending":
            query = query.where(WorklistItem.status == PENDING)
        elif status == "done":
            query = query.where(WorklistItem.status != PENDING)
        else:
            status = "all"
        with Session(engine) as session:
            rows = []
            for item in session.scalars(query).all():
                v = item.current_verdict()
                rows.append({"item": item, "reviewed": v.category if v else "", "reviewer": v.username if v else ""})
            return page(request, "worklist.html", user=user, rows=rows, sort=sort, order=order, status=status,
                        n_pending=sum(r["item"].status == PENDING for r in rows))

    @app.get("/export.csv")
    def export(request: Request):
        user_of(request)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return Response(export_csv_text(engine), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="review_{stamp}.csv"'})

    # ------------------------------------------------------------------ case
    def _case_context(request: Request, item: WorklistItem) -> dict:
        folder = resolve_under(out_dir, item.study_folder)
        record = read_assessment(folder / "assessment.json")
        reg_ok = bool(record and record.registration_to_baseline and record.registration_to_baseline.ok)
        key = case_key(out_dir, item.study_folder, item.baseline_folder, item.post_series_uid,
                       item.baseline_post_series_uid, reg_ok)
        notes: list[str] = []
        try:
            volumes = load_case(key)
            n_slices, letters = volumes.n_slices, volumes.letters
            available = {(v, p): volumes.available(v, p) for v in VIEWS for p in PANELS}
            notes = volumes.notes
            # An optional panel neither study has (enhancement above surroundings: zones in
            # parenchyma only) takes no column; the others say "not available".
            panels = [p for p in PANELS if p not in OPTIONAL_NIFTI or any(available[(v, p)] for v in VIEWS)]
        except (OSError, RuntimeError, ValueError) as exc:
            n_slices, letters, available, panels = 0, ("", "", "", ""), {}, list(PANELS)
            notes = [f"images not available: {exc}"]
        k = record.imaging.key_slice_index if record and record.imaging.key_slice_index is not None else n_slices // 2
        suspicious = [f for f in (record.imaging.foci if record else []) if f.suspicious]
        return {"item": item, "record": record, "n_slices": n_slices, "key_slice": min(max(k, 0), max(n_slices - 1, 0)),
                "letters": letters, "available": available, "image_notes": notes, "views": VIEWS, "panels": panels,
                "categories": CATEGORIES, "verdicts": list(item.verdicts), "current": item.current_verdict(),
                "suspicious_foci": suspicious}

    @app.get("/case/{item_id}", response_class=HTMLResponse)
    def case(request: Request, item_id: int):
        user = user_of(request)
        if not valid_id(item_id):
            return PlainTextResponse("no such worklist item", status_code=404)
        with Session(engine) as session:
            item = item_or_404(session, item_id)
            if item is None:
                return PlainTextResponse("no such worklist item", status_code=404)
            try:
                context = _case_context(request, item)
            except UnsafePathError:
                log.warning("worklist item %s points outside %s", item_id, out_dir)
                return PlainTextResponse("no such worklist item", status_code=404)
            return page(request, "case.html", user=user, error="", **context)

    @app.get("/case/{item_id}/slice/{view}/{panel}/{k}.png")
    def slice_image(request: Request, item_id: int, view: str, panel: str, k: int):
        user_of(request)
        if view not in VIEWS or panel not in PANELS:
            return PlainTextResponse("unknown view or panel", status_code=404)
        if not valid_id(item_id):
            return PlainTextResponse("no such worklist item", status_code=404)
        with Session(engine) as session:
            item = item_or_404(session, item_id)
            if item is None:
                return PlainTextResponse("no such worklist item", status_code=404)
            try:
                folder = resolve_under(out_dir, item.study_folder)
                record = read_assessment(folder / "assessment.json")
                reg_ok = bool(record and record.registration_to_baseline and record.registration_to_baseline.ok)
                key = case_key(out_dir, item.study_folder, item.baseline_folder, item.post_series_uid,
                               item.baseline_post_series_uid, reg_ok)
                data = slice_png(key, view, panel, k)
            except UnsafePathError:
                return PlainTextResponse("no such worklist item", status_code=404)
            except KeyError as exc:
                return PlainTextResponse(str(exc), status_code=404)
            except (OSError, RuntimeError, ValueError) as exc:
                return PlainTextResponse(f"image not available: {exc}", status_code=404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/case/{item_id}/verdict")
    def verdict(request: Request, item_id: int, action: Annotated[str, Form()] = "",
                category: Annotated[str, Form()] = "", reason: Annotated[str, Form()] = "",
                comment: Annotated[str, Form()] = "", csrf_token_: Annotated[str, Form(alias="csrf_token")] = ""):
        user = user_of(request)
        check_csrf(request, csrf_token_)
        if not valid_id(item_id):
            return PlainTextResponse("no such worklist item", status_code=404)
        try:
            record_verdict(engine, item_id, user, action, category or None, reason, comment)
        except ReviewError as exc:
            with Session(engine) as session:
                item = item_or_404(session, item_id)
                if item is None:
                    return PlainTextResponse("no such worklist item", status_code=404)
                try:
                    context = _case_context(request, item)
                except UnsafePathError:
                    return PlainTextResponse("no such worklist item", status_code=404)
                return page(request, "case.html", http_status=400, user=user, error=str(exc), **context)
        return RedirectResponse(f"/case/{item_id}", status_code=303)

    app.state.engine = engine
    app.state.out_dir = out_dir
    return app
