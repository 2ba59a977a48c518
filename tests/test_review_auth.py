"""Sign-in, sessions, CSRF and path handling of the review app (FastAPI's TestClient, no browser)."""

from __future__ import annotations

import re
import stat

import numpy as np
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from pipeline.cli import app as cli_app
from pipeline.review import auth
from pipeline.review.app import create_app
from pipeline.review.db import AuditEvent, Verdict, WorklistItem, sync_worklist
from pipeline.review.slices import UnsafePathError, resolve_under
from tests.review_support import flagged

PASSWORD = "correct horse battery"


def _write_study(folder, shape=(6, 20, 24), spacing=(1.5, 1.0, 3.0)):
    """The three NIfTI files of a study folder, on one grid with a non-identity direction."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, arr in (("pre_registered", rng.random(shape, dtype=np.float32) * 100),
                      ("subtraction", rng.standard_normal(shape).astype(np.float32)),
                      ("labels", (rng.random(shape) > 0.8).astype(np.uint8))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
        sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))


@pytest.fixture()
def site(tmp_path):
    """An OUT folder with one flagged study (images, no baseline) and one user."""
    out = tmp_path / "out"
    study = flagged("9.1", baseline_folder=None, baseline_study_instance_uid=None, post_series_uid=None)
    _write_study(out / study.study_folder)
    users = tmp_path / "users.txt"
    auth.add_user(users, "alice", PASSWORD)
    clock = FakeClock()
    app = create_app(out, users, secret="s" * 64, clock=clock)
    app.state.test_clock = clock
    sync_worklist(app.state.engine, [study, flagged("9.2", study_folder="../../../../etc")])
    with TestClient(app, base_url="https://testserver") as client:  # the cookie is Secure by default
        yield client, app, users


class FakeClock:
    """Seconds that pass only when a test says so (lockouts, session expiry: no timed test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _csrf(client, path="/login") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def _sign_in(client, password=PASSWORD, username="alice"):
    return client.post("/login", data={"username": username, "password": password, "csrf_token": _csrf(client)},
                       follow_redirects=False)


def _item_id(app, uid):
    with Session(app.state.engine) as s:
        return s.scalar(select(WorklistItem.id).where(WorklistItem.study_instance_uid == uid))


# --------------------------------------------------------------------------- passwords, user file
def test_scrypt_hash_is_salted_and_verifies():
    a, b = auth.hash_password(PASSWORD), auth.hash_password(PASSWORD)
    assert a != b and a.startswith("scrypt$16384$8$1$")
    assert auth.verify_password(PASSWORD, a) and auth.verify_password(PASSWORD, b)
    assert not auth.verify_password(PASSWORD + "x", a)
    assert not auth.verify_password(PASSWORD, "scrypt$garbage") and not auth.verify_password(PASSWORD, "")
    with pytest.raises(ValueError, match="at least"):
        auth.hash_password("short")


def test_user_file_written_private_and_malformed_lines_refused(tmp_path):
    users = tmp_path / "users.txt"
    auth.add_user(users, "alice", PASSWORD)
    auth.add_user(users, "bob", PASSWORD + "2")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert set(auth.read_users(users)) == {"alice", "bob"}
    assert PASSWORD not in users.read_text()
    users.write_text("alice:plaintext-password\n")
    with pytest.raises(auth.UserFileError, match="users.txt:1"):
        auth.read_users(users)
    with pytest.raises(ValueError):
        auth.add_user(tmp_path / "u2.txt", "../evil", PASSWORD)


def test_cli_adds_a_user_from_stdin(tmp_path):
    users = tmp_path / "users.txt"
    result = CliRunner().invoke(cli_app, ["review-user", str(users), "erin", "--password-stdin"], input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert auth.authenticate(auth.read_users(users), "erin", PASSWORD)
    assert not auth.authenticate(auth.read_users(users), "erin", "wrong password")


# --------------------------------------------------------------------------- sessions
def test_wrong_password_and_unknown_user_are_refused(site):
    client, app, _ = site
    assert _sign_in(client, password="wrong password").status_code == 401
    assert _sign_in(client, username="mallory").status_code == 401
    assert client.get("/", follow_redirects=False).status_code == 303
    ok = _sign_in(client)
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    assert client.get("/").status_code == 200
    with Session(app.state.engine) as s:
        actions = [(e.username, e.action) for e in s.scalars(select(AuditEvent).where(AuditEvent.action.like("sign_in%")))]
    assert actions == [("alice", "sign_in_refused"), ("mallory", "sign_in_refused"), ("alice", "sign_in")]


def test_no_page_image_or_data_without_a_session(site):
    client, app, _ = site
    item = _item_id(app, "9.1")
    for path in ("/", f"/case/{item}", "/?sort=confidence"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
    for path in (f"/case/{item}/slice/current/pre/2.png", "/export.csv"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 401 and b"P-001" not in r.content and not r.content.startswith(b"\x89PNG"), path
    # A forged cookie is no session.
    client.cookies.set("ablation_review", "eyJ1c2VyIjogImFsaWNlIn0=.forged.sig")
    assert client.get("/", follow_redirects=False).status_code == 303
    client.cookies.clear()
    # The same requests signed in: the page, the PNG and the CSV come.
    _sign_in(client)
    assert "P-001" in client.get(f"/case/{item}").text
    png = client.get(f"/case/{item}/slice/current/overlay/2.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert "P-001" in client.get("/export.csv").text
    # Pages with patient data are not cached by the browser.
    assert client.get("/").headers["cache-control"] == "no-store"


def test_removed_user_loses_the_session(site):
    client, _, users = site
    _sign_in(client)
    assert client.get("/").status_code == 200
    users.write_text("".join(line + "\n" for line in users.read_text().splitlines() if not line.startswith("alice:")))
    assert client.get("/", follow_redirects=False).status_code == 303


def test_posts_need_the_csrf_token(site):
    client, app, _ = site
    # Sign-in itself without the form's token.
    r = client.post("/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403
    _sign_in(client)
    item = _item_id(app, "9.1")
    form = {"action": "override", "category": "no_evidence_of_ltp", "reason": "vessel"}
    assert client.post(f"/case/{item}/verdict", data=form, follow_redirects=False).status_code == 403
    assert client.post(f"/case/{item}/verdict", data={**form, "csrf_token": "not-the-token"},
                       follow_redirects=False).status_code == 403
    with Session(app.state.engine) as s:
        assert s.scalars(select(Verdict)).all() == []
    token = _csrf(client, f"/case/{item}")
    r = client.post(f"/case/{item}/verdict", data={**form, "reason": "", "csrf_token": token})
    assert r.status_code == 400 and "an override needs a reason" in r.text
    r = client.post(f"/case/{item}/verdict", data={**form, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    with Session(app.state.engine) as s:
        assert [(v.username, v.category) for v in s.scalars(select(Verdict))] == [("alice", "no_evidence_of_ltp")]


# --------------------------------------------------------------------------- paths
def test_resolve_under_refuses_escapes(tmp_path):
    assert resolve_under(tmp_path, "patients/a/b") == (tmp_path / "patients/a/b").resolve()
    for bad in ("../x", "patients/../../x", "/etc/passwd"):
        with pytest.raises(UnsafePathError):
            resolve_under(tmp_path, bad)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(UnsafePathError):
        resolve_under(tmp_path, "link/passwd")


def test_path_traversal_refused(site):
    client, app, _ = site
    _sign_in(client)
    good, evil = _item_id(app, "9.1"), _item_id(app, "9.2")
    # A stored folder pointing outside OUT is never opened.
    assert client.get(f"/case/{evil}").status_code == 404
    assert client.get(f"/case/{evil}/slice/current/pre/0.png").status_code == 404
    # Paths in the request are not paths: ids are integers, views and panels from fixed lists.
    for path in (f"/case/{good}/slice/current/..%2F..%2F..%2Fetc%2Fpasswd/0.png",
                 f"/case/{good}/slice/..%2Fpatients/pre/0.png",
                 "/case/..%2F..%2Fetc%2Fpasswd",
                 f"/case/{good}/slice/current/labels/0.png",
                 "/static/..%2F..%2Fdb.py"):
        r = client.get(path)
        assert r.status_code in (404, 422), path
        assert b"root:" not in r.content and b"import" not in r.content
    assert client.get(f"/case/{good}/slice/current/pre/0.png").status_code == 200


# --------------------------------------------------------------------------- issue 16
def _sign_out(client):
    return client.post("/logout", data={"csrf_token": _csrf(client, "/")}, follow_redirects=False)


def test_sign_out_ends_the_session_on_the_server(site):
    client, app, _ = site
    _sign_in(client)
    assert client.get("/").status_code == 200
    stolen = dict(client.cookies)
    assert _sign_out(client).status_code == 303
    client.cookies.clear()
    client.cookies.update(stolen)  # the cookie replayed after sign-out
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.get("/export.csv", follow_redirects=False).status_code == 401


def test_a_session_ends_after_eight_hours_whatever_the_cookie(site):
    client, app, _ = site
    _sign_in(client)
    app.state.test_clock.now += 8 * 3600 + 1
    assert client.get("/", follow_redirects=False).status_code == 303


def test_sign_in_locked_after_five_failures_per_user_then_released(site):
    client, app, users = site
    auth.add_user(users, "bob", PASSWORD)
    for _ in range(5):
        assert _sign_in(client, password="wrong password").status_code == 401
    locked = _sign_in(client)  # the right password, during the lockout
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
    app.state.test_clock.now += 301
    assert _sign_in(client).status_code == 303
    with Session(app.state.engine) as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.action.like("sign_in%")))]
    assert actions == ["sign_in_refused"] * 5 + ["sign_in_locked", "sign_in"]


def test_sign_in_locked_per_address_across_user_names(site):
    client, _, users = site
    for name in ("u1", "u2", "u3", "u4", "u5"):  # a spray of names from one address
        assert _sign_in(client, username=name, password="wrong password").status_code == 401
    assert _sign_in(client).status_code == 429  # alice from that address too


def test_session_cookie_is_secure_unless_insecure_http(site, tmp_path):
    client, _, _ = site
    cookie = _sign_in(client).headers["set-cookie"]
    assert "secure" in cookie.lower() and "samesite=strict" in cookie.lower()
    (tmp_path / "out2").mkdir()
    plain = create_app(tmp_path / "out2", site[2], secret="s" * 64, https_only=False)
    with TestClient(plain) as c:
        assert "secure" not in _sign_in(c).headers["set-cookie"].lower()


@pytest.mark.parametrize("item_id", [2 ** 63, 2 ** 64, 10 ** 30, 0, -1])
def test_huge_or_impossible_ids_are_404(site, item_id):
    client, _, _ = site
    _sign_in(client)
    assert client.get(f"/case/{item_id}").status_code == 404
    assert client.get(f"/case/{item_id}/slice/current/pre/2.png").status_code == 404
    token = _csrf(client, "/")
    r = client.post(f"/case/{item_id}/verdict", data={"action": "confirm", "csrf_token": token},
                    follow_redirects=False)
    assert r.status_code == 404
