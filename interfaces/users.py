"""Users, their roles and their sessions, in the history's SQLite file.

Four roles (:meth:`Role.allows`): ``viewer`` sees the screen; ``operator``
also approves and rejects recommendations; ``engineer`` also changes the
requested mode; ``qa`` (quality assurance, an auditor) sees the screen and
reads the audit trail but signs and changes nothing. Reading the audit trail
is its own capability (:func:`can_read_audit`): QA and engineers have it,
viewers and operators do not. Passwords are
stored as argon2id hashes (argon2-cffi's :class:`~argon2.PasswordHasher` with
its defaults, RFC 9106's low-memory profile) and rehashed at the next login
when those defaults move on. A session is a random token the browser keeps;
the file stores only its SHA-256, and the session ends after
``session_idle_s`` without use or ``session_max_s`` after it began, whichever
comes first.

Who may add users, change passwords and disable accounts: whoever may write
the history file (``bioreactor-mpc users``, :mod:`bioreactor_mpc.admin_cli`),
and those changes are audit records. Failed logins are logged
(``login_failed``, with the user name and never the password).

Tables: ``users`` (one row per user; never deleted, so a name is never reused
for someone else) and ``sessions``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

USER_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{1,31}")
"""A user name: 2 to 32 characters, lower-case letters, digits, ``_``, ``.`` and ``-``, starting with a letter."""
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
"""Longer passwords are refused, so a login form cannot be used to make the server hash megabytes."""
MAX_FULL_NAME_LENGTH = 100
_MAX_TOKEN_LENGTH = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, full_name TEXT NOT NULL, role TEXT NOT NULL, password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0, created_utc TEXT NOT NULL, password_changed_utc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY, user_name TEXT NOT NULL, created_utc TEXT NOT NULL,
    created_s REAL NOT NULL, last_seen_s REAL NOT NULL, expires_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_name);
"""


class UserStoreError(BioreactorMPCError, RuntimeError):
    """The user database cannot be opened, read or written, or holds something this code did not write."""


class InvalidUserError(ValueError, BioreactorMPCError):
    """A user name, full name or role is not valid, or the user exists already."""


class WeakPasswordError(ValueError, BioreactorMPCError):
    """A new password does not meet the policy (at least :data:`MIN_PASSWORD_LENGTH` characters)."""


class UnknownUserError(LookupError, BioreactorMPCError):
    """No user of that name."""


class Role(str, Enum):
    """What a user may do: operator and engineer each include the roles before them; QA includes only viewer."""

    VIEWER = "viewer"
    """Sees the screen: the batch, the forecast, the recommendation, the alarms."""
    OPERATOR = "operator"
    """Also approves and rejects recommendations (electronic signatures)."""
    ENGINEER = "engineer"
    """Also changes the requested mode (off, advisory, closed loop), and reads the audit trail."""
    QA = "qa"
    """Quality assurance: sees the screen and reads the audit trail; signs nothing and changes nothing."""

    def allows(self, needed: Role) -> bool:
        """Whether a user with this role may do what ``needed`` may: ``Role.ENGINEER.allows(Role.OPERATOR)`` is true, ``Role.QA.allows(Role.OPERATOR)`` false."""
        return type(self)(needed) in _INCLUDED_ROLES[self]


_INCLUDED_ROLES: dict[Role, frozenset[Role]] = {
    Role.VIEWER: frozenset({Role.VIEWER}),
    Role.OPERATOR: frozenset({Role.VIEWER, Role.OPERATOR}),
    Role.ENGINEER: frozenset({Role.VIEWER, Role.OPERATOR, Role.ENGINEER}),
    Role.QA: frozenset({Role.VIEWER, Role.QA}),
}
"""What each role may do, as the roles whose rights it has (one table, read by :meth:`Role.allows`)."""

_AUDIT_READERS = frozenset({Role.ENGINEER, Role.QA})


def can_read_audit(role: Role) -> bool:
    """Whether a user with ``role`` may read the audit trail (QA and engineers; not viewers or operators)."""
    return Role(role) in _AUDIT_READERS


@dataclass(frozen=True)
class User:
    name: str
    """The log-in name, recorded as the actor of everything the user does."""
    full_name: str
    """The printed name an electronic signature shows (21 CFR 11.50)."""
    role: Role
    disabled: bool


def check_user_name(name: str) -> str:
    """``name`` if it is a valid user name, else :class:`InvalidUserError` saying what one looks like."""
    if not isinstance(name, str) or USER_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidUserError(f"user name {name!r}: use 2 to 32 characters, lower-case letters, digits, '_', '.' or '-', starting with a letter")
    return name


def check_password(password: str) -> None:
    """Raise :class:`WeakPasswordError` when ``password`` is not acceptable as a new password (the message never contains it)."""
    if not isinstance(password, str):
        raise WeakPasswordError("the password must be text")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(f"the password has {len(password)} characters; use at least {MIN_PASSWORD_LENGTH}")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPasswordError(f"the password has {len(password)} characters; use at most {MAX_PASSWORD_LENGTH}")


def parse_role(role: Role | str) -> Role:
    """``role`` as a :class:`Role`, or :class:`InvalidUserError` listing the roles."""
    try:
        return Role(role)
    except ValueError:
        raise InvalidUserError(f"role {role!r}: use one of {', '.join(r.value for r in Role)}") from None


def _check_full_name(full_name: str) -> str:
    text = full_name.strip() if isinstance(full_name, str) else ""
    if not text:
        raise InvalidUserError("the full name is empty; it is the printed name on the user's electronic signatures")
    if len(text) > MAX_FULL_NAME_LENGTH or not text.isprintable():
        raise InvalidUserError(f"full name {text[:40]!r}: use at most {MAX_FULL_NAME_LENGTH} printable characters")
    return text


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class UserStore:
    """Users and sessions in the SQLite file at ``path`` (created if missing).

    ``clock`` gives seconds for session expiry; the default, the wall clock,
    is the one that means the same in every process sharing the file (a
    monotonic clock restarts with the machine). ``password_hasher`` replaces
    argon2-cffi's defaults (tests use a cheap one). Safe to share between
    threads.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        session_idle_s: float = 900.0,
        session_max_s: float = 8 * 3600.0,
        clock: Callable[[], float] = time.time,
        password_hasher: PasswordHasher | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if not session_idle_s > 0.0 or not session_max_s > 0.0:
            raise ValueError(f"session_idle_s and session_max_s must be positive, got {session_idle_s} and {session_max_s}")
        self.path = Path(path)
        self.session_idle_s = float(session_idle_s)
        self.session_max_s = float(session_max_s)
        self._clock = clock
        self._hasher = password_hasher if password_hasher is not None else PasswordHasher()
        self._dummy_hash: str | None = None
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=timeout_s, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as error:
            raise UserStoreError(f"{self.path}: cannot open the user database: {error}") from error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ users

    def check_new_user(self, name: str, *, full_name: str, role: Role | str, password: str) -> User:
        """The user :meth:`add_user` would add, or what it would raise, without adding anyone (to validate before recording the action)."""
        check_user_name(name)
        full_name = _check_full_name(full_name)
        role = parse_role(role)
        check_password(password)
        if self.user(name) is not None:
            raise InvalidUserError(f"{self.path}: user {name!r} exists")
        return User(name, full_name, role, disabled=False)

    def add_user(self, name: str, *, full_name: str, role: Role | str, password: str) -> User:
        """Add a user; raises :class:`InvalidUserError` or :class:`WeakPasswordError` saying what is wrong."""
        check_user_name(name)
        full_name = _check_full_name(full_name)
        role = parse_role(role)
        check_password(password)
        password_hash = self._hasher.hash(password)
        stamp = _now_utc()
        try:
            self._write(
                "INSERT INTO users (name, full_name, role, password_hash, disabled, created_utc, password_changed_utc) VALUES (?, ?, ?, ?, 0, ?, ?)",
                (name, full_name, role.value, password_hash, stamp, stamp),
            )
        except sqlite3.IntegrityError:
            raise InvalidUserError(f"{self.path}: user {name!r} exists") from None
        log.info("user_added", path=str(self.path), user=name, role=role.value)
        return User(name, full_name, role, disabled=False)

    def set_password(self, name: str, password: str) -> None:
        """Replace a user's password and end the user's sessions."""
        check_password(password)
        password_hash = self._hasher.hash(password)
        self._change(name, "UPDATE users SET password_hash = ?, password_changed_utc = ? WHERE name = ?", (password_hash, _now_utc(), name), end_sessions=True)
        log.info("password_changed", path=str(self.path), user=name)

    def set_role(self, name: str, role: Role | str) -> None:
        """Change a user's role; open sessions see the new role at their next request."""
        role = parse_role(role)
        self._change(name, "UPDATE users SET role = ? WHERE name = ?", (role.value, name), end_sessions=False)
        log.info("role_changed", path=str(self.path), user=name, role=role.value)

    def disable(self, name: str) -> None:
        """Disable a user (logins fail) and end the user's sessions; the user stays on record."""
        self._change(name, "UPDATE users SET disabled = 1 WHERE name = ?", (name,), end_sessions=True)
        log.info("user_disabled", path=str(self.path), user=name)

    def user(self, name: str) -> User | None:
        """The user of that name, or None."""
        rows = self._read("SELECT name, full_name, role, disabled FROM users WHERE name = ?", (name,))
        return self._user(rows[0]) if rows else None

    def users(self) -> list[User]:
        """Every user, disabled ones included, by name."""
        return [self._user(row) for row in self._read("SELECT name, full_name, role, disabled FROM users ORDER BY name")]

    # ------------------------------------------------------------------ log-in

    def authenticate(self, name: str, password: str) -> User | None:
        """The user, when ``password`` is theirs and the user is not disabled; otherwise None, logged as ``login_failed``.

        Takes about as long for a user that does not exist (a dummy hash is
        verified), so the answer's time does not say which names exist. Use it
        again at signing, to have the password re-entered (21 CFR 11.200).
        """
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            self._failed(name, "password_rejected")
            return None
        valid_name = isinstance(name, str) and USER_NAME_PATTERN.fullmatch(name) is not None
        rows = self._read("SELECT name, full_name, role, disabled, password_hash FROM users WHERE name = ?", (name,)) if valid_name else []
        if not rows:
            self._verify_quietly(self._dummy(), password)
            self._failed(name, "unknown_user")
            return None
        stored_hash = str(rows[0][4])
        try:
            self._hasher.verify(stored_hash, password)
        except VerifyMismatchError:
            self._failed(name, "wrong_password")
            return None
        except VerificationError:
            self._failed(name, "verification_failed")
            return None
        except InvalidHashError:
            raise UserStoreError(f"{self.path}: the stored password hash of user {name!r} is not an argon2 hash") from None
        user = self._user(rows[0][:4])
        if user.disabled:
            self._failed(name, "disabled")
            return None
        if self._hasher.check_needs_rehash(stored_hash):
            self._write("UPDATE users SET password_hash = ? WHERE name = ? AND password_hash = ?", (self._hasher.hash(password), name, stored_hash))
            log.info("password_rehashed", path=str(self.path), user=name)
        return user

    def create_session(self, user: User) -> str:
        """A new session for ``user`` (who must exist and not be disabled): the token to give the browser, never stored."""
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT disabled FROM users WHERE name = ?", (user.name,)).fetchone()
                if row is None or row[0]:
                    self._db.execute("ROLLBACK")
                    raise UnknownUserError(f"{self.path}: no active user {user.name!r} to open a session for")
                self._db.execute("DELETE FROM sessions WHERE expires_s <= ? OR last_seen_s < ?", (now, now - self.session_idle_s))
                self._db.execute(
                    "INSERT INTO sessions (token_sha256, user_name, created_utc, created_s, last_seen_s, expires_s) VALUES (?, ?, ?, ?, ?, ?)",
                    (_token_digest(token), user.name, _now_utc(), now, now, now + self.session_max_s),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise UserStoreError(f"{self.path}: cannot open a session for {user.name!r}: {error}") from error
        log.info("session_started", user=user.name)
        return token

    def session_user(self, token: str, *, activity: bool = True) -> User | None:
        """The user of a live session; None when the token is unknown, idle too long, past its maximum age or its user disabled.

        ``activity`` (a person did something) slides the idle expiry; a page's
        background refresh passes False, so an unattended screen still logs out.
        """
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LENGTH:
            return None
        digest = _token_digest(token)
        now = self._clock()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT s.last_seen_s, s.expires_s, u.name, u.full_name, u.role, u.disabled FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.token_sha256 = ?",
                    (digest,),
                ).fetchone()
                if row is None:
                    self._db.execute("COMMIT")
                    return None
                last_seen_s, expires_s = float(row[0]), float(row[1])
                user = self._user(row[2:])
                ended = self._end_reason(now, last_seen_s, expires_s, user)
                if ended is None:
                    if activity:
                        self._db.execute("UPDATE sessions SET last_seen_s = ? WHERE token_sha256 = ?", (max(now, last_seen_s), digest))
                else:
                    self._db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (digest,))
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise UserStoreError(f"{self.path}: cannot read the session: {error}") from error
        if ended is not None:
            log.info("session_ended", user=user.name, reason=ended)
            return None
        return user

    def end_session(self, token: str) -> None:
        """End a session (log out); nothing happens for an unknown token."""
        if isinstance(token, str) and token and len(token) <= _MAX_TOKEN_LENGTH:
            self._write("DELETE FROM sessions WHERE token_sha256 = ?", (_token_digest(token),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers

    def _user(self, row: tuple[Any, ...]) -> User:
        name, full_name, role, disabled = row
        try:
            return User(str(name), str(full_name), Role(role), bool(disabled))
        except ValueError:
            raise UserStoreError(f"{self.path}: user {name!r} has the unknown role {role!r}") from None

    def _end_reason(self, now: float, last_seen_s: float, expires_s: float, user: User) -> str | None:
        """Why a session has ended, or None while it lives."""
        if now - last_seen_s > self.session_idle_s:
            return "idle"
        if now >= expires_s:
            return "max_age"
        if user.disabled:
            return "disabled"
        return None

    def _failed(self, name: object, reason: str) -> None:
        log.warning("login_failed", user=str(name)[:64], reason=reason)

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def _verify_quietly(self, password_hash: str, password: str) -> None:
        try:
            self._hasher.verify(password_hash, password)
        except VerificationError:
            pass

    def _change(self, name: str, sql: str, parameters: tuple[Any, ...], *, end_sessions: bool) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if self._db.execute(sql, parameters).rowcount == 0:
                    self._db.execute("ROLLBACK")
                    raise UnknownUserError(f"{self.path}: no user {name!r}")
                if end_sessions:
                    self._db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise UserStoreError(f"{self.path}: cannot change user {name!r}: {error}") from error

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as error:
                raise UserStoreError(f"{self.path}: cannot read the users: {error}") from error

    def _write(self, sql: str, parameters: tuple[Any, ...]) -> None:
        """One statement in its own transaction; an integrity error (a user that exists) is the caller's to translate."""
        with self._lock:
            try:
                self._db.execute(sql, parameters)
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as error:
                raise UserStoreError(f"{self.path}: cannot write to the user database: {error}") from error

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
