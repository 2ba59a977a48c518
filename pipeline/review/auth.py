"""Users, passwords and CSRF tokens of the review app.

The user file holds one ``username:hash`` per line (``#`` comments allowed), in the spirit of
an htpasswd file, where ``hash`` is ``scrypt$n$r$p$salt$key`` (salt and key base64). scrypt is
the standard library's ``hashlib.scrypt`` (memory-hard, RFC 7914); the parameters are stored
with each hash so that they can be raised later without invalidating existing users.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from pipeline.core.files import atomic_write_text

# RFC 7914 / OWASP's minimum for interactive logins: N=2^14, r=8, p=1 (16 MiB, ~50 ms).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8


class UserFileError(ValueError):
    """The user file is missing, unreadable or malformed (the message says where)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem must cover 128*n*r bytes plus slack, else OpenSSL refuses larger parameters.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES,
                          maxmem=256 * n * r + 2 ** 20)


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password`` (``scrypt$n$r$p$salt$key``)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# A hash of nothing anyone knows: unknown users cost the same scrypt as known ones, so the
# response time does not tell which user names exist.
_DUMMY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(b'0' * SALT_BYTES)}${_b64(b'0' * KEY_BYTES)}"


def read_users(path: Path) -> dict[str, str]:
    """``{username: hash}`` from the user file; raises :class:`UserFileError`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserFileError(f"user file {path} cannot be read: {exc}") from exc
    users: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not USERNAME_PATTERN.match(name) or not stored.startswith("scrypt$"):
            raise UserFileError(f"{path}:{number}: expected 'username:scrypt$...' (add users with "
                                "'ablation-response review-user USERS_FILE NAME')")
        users[name] = stored
    return users


def add_user(path: Path, username: str, password: str) -> None:
    """Add (or replace the password of) ``username`` in the user file, written atomically (0600)."""
    if not USERNAME_PATTERN.match(username):
        raise ValueError(f"user name {username!r}: 1-64 letters, digits or . _ @ -")
    path = Path(path)
    users = read_users(path) if path.exists() else {}
    users[username] = hash_password(password)
    text = "# ablation-response review users: username:scrypt$n$r$p$salt$key\n"
    text += "".join(f"{name}:{stored}\n" for name, stored in sorted(users.items()))
    atomic_write_text(path, text, mode=0o600)
    os.chmod(path, 0o600)


def authenticate(users: dict[str, str], username: str, password: str) -> bool:
    """True when the user exists and the password is right (same work either way)."""
    stored = users.get(username)
    ok = verify_password(password, stored or _DUMMY_HASH)
    return ok and stored is not None


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(session_token: str | None, form_token: str | None) -> bool:
    """The form's token matches the session's (constant time; both must be present)."""
    return bool(session_token) and bool(form_token) and hmac.compare_digest(str(session_token), str(form_token))


def load_or_create_secret(path: Path) -> str:
    """The session-signing key kept beside the database (created once, 0600)."""
    path = Path(path)
    if path.exists():
        secret = path.read_text().strip()
        if len(secret) >= 32:
            return secret
    secret = secrets.token_hex(32)
    atomic_write_text(path, secret + "\n", mode=0o600)
    os.chmod(path, 0o600)
    return secret
