"""Users, their roles and their sessions, in the history's SQLite file.

Four roles (:meth:`Role.allows`): ``viewer`` sees the screen; ``operator``
also approves and rejects recommendations; ``engineer`` also changes the
requested mode; ``qa`` (quality assurance, an auditor) sees the screen and
reads the audit trail but signs and changes nothing. Reading the audit trail
is its own capability (:func:`can_read_audit`): QA and engineers have it,
viewers and operators do not. Passwords are stored as argon2id hashes
(argon2-cffi's :class:`~argon2.PasswordHasher` with its defaults, RFC 9106's
low-memory profile) and rehashed at the next login when those defaults move
on. A new password must meet the :class:`~interfaces.passwords.PasswordPolicy`
(NIST SP 800-63B) and differ from the user's last ``history_count``
passwords, whose hashes are kept. A session is a random token the browser
keeps; the file stores only its SHA-256, and the session ends after
``session_idle_s`` without use or ``session_max_s`` after it began, whichever
comes first. Where a site configures them, a password older than
``max_age_days`` no longer logs in, and an account unused for
``lock_after_inactive_days`` locks; an administrator's new password
(``bioreactor-mpc users passwd``) opens either again.

**Everything is recorded in the audit trail** given as ``audit``, first, as
:mod:`interfaces.audit` asks (record, then act; an action whose record cannot
be written does not happen): ``user_added``, ``password_changed``,
``role_changed``, ``user_disabled``, ``login``, ``login_failed`` (with the
reason, never the password), ``session_started``, ``logout``,
``session_expired``, ``user_locked``, ``password_rehashed``, and
``user_add_failed``, ``user_change_failed`` or ``session_start_failed`` when
what was recorded could not be stored. Each
carries the digest of the user's row (:func:`user_row_digest`: role, disabled
and locked flags, the SHA-256 of the password hash, never the hash) or of the
session's row (:func:`session_row_digest`: never the token, nor even its
SHA-256), and a change also the digest of the row before it, so that
:func:`user_store_problems` finds a row no record accounts for: an account
inserted into the file, a role or flag changed there, a session row forged.

Tables: ``users`` (one row per user; never deleted, so a name is never reused
for someone else), ``sessions`` and ``password_history``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from interfaces.audit import AuditRecord, canonical_json
from interfaces.history import read_only_uri
from interfaces.passwords import HARD_MAX_LENGTH, PasswordPolicy, PasswordRule, WeakPasswordError, check_password
from plant_models.errors import BioreactorMPCError

__all__ = [
    "AuditSink",
    "InvalidUserError",
    "LoginPurpose",
    "LoginRefusal",
    "PasswordPolicy",
    "Role",
    "UnknownUserError",
    "User",
    "UserStore",
    "UserStoreError",
    "WeakPasswordError",
    "can_read_audit",
    "check_password",
    "check_user_name",
    "parse_role",
    "session_row_digest",
    "user_row_digest",
    "user_store_problems",
]

log = structlog.get_logger(__name__)

USER_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{1,31}")
"""A user name: 2 to 32 characters, lower-case letters, digits, ``_``, ``.`` and ``-``, starting with a letter."""
MAX_PASSWORD_LENGTH = HARD_MAX_LENGTH
"""A password offered at login longer than this is refused unhashed, so a login form cannot be used to make the server hash megabytes."""
MAX_FULL_NAME_LENGTH = 100
_MAX_TOKEN_LENGTH = 256
_SECONDS_PER_DAY = 86400.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, full_name TEXT NOT NULL, role TEXT NOT NULL, password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0, created_utc TEXT NOT NULL, password_changed_utc TEXT NOT NULL,
    locked_utc TEXT, last_active_utc TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY, user_name TEXT NOT NULL, created_utc TEXT NOT NULL,
    created_s REAL NOT NULL, last_seen_s REAL NOT NULL, expires_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_name);
CREATE TABLE IF NOT EXISTS password_history (user_name TEXT NOT NULL, password_hash TEXT NOT NULL, set_utc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS password_history_by_user ON password_history (user_name);
"""
_ADDED_COLUMNS = (("locked_utc", "TEXT"), ("last_active_utc", "TEXT"))
"""Columns of ``users`` newer than the first schema, added to an older file when it is opened for writing."""
_ROW_COLUMNS = ("name", "full_name", "role", "password_hash", "disabled", "created_utc", "password_changed_utc", "locked_utc")
"""The columns of a user's row that its digest covers (``last_active_utc`` changes at every login and is left out)."""
_SESSION_COLUMNS = ("token_sha256", "user_name", "created_utc", "created_s", "expires_s")
"""The columns of a session's row that its digest covers (``last_seen_s`` slides with use and is left out)."""


class UserStoreError(BioreactorMPCError, RuntimeError):
    """The user database cannot be opened, read or written, or holds something this code did not write."""


class InvalidUserError(ValueError, BioreactorMPCError):
    """A user name, full name or role is not valid, or the user exists already."""


class UnknownUserError(LookupError, BioreactorMPCError):
    """No user of that name."""


class AuditSink(Protocol):
    """Where the store records what it does: :class:`~interfaces.audit.AuditTrail` (its ``append`` raises when the record cannot be written)."""

    def append(self, *, actor: str, action: str, subject: str, details: Mapping[str, Any], process_time_h: float | None = None) -> Any: ...


class LoginPurpose(str, Enum):
    """Why a password is checked: to open a session (recorded as ``login``), or to sign (the signed action's own record names the signer)."""

    SESSION = "session"
    SIGNATURE = "signature"


class LoginRefusal(str, Enum):
    """Why a password did not log in (the ``reason`` of a ``login_failed`` record)."""

    PASSWORD_REJECTED = "password_rejected"
    """Not text, or longer than any password may be: refused without hashing it."""
    UNKNOWN_USER = "unknown_user"
    WRONG_PASSWORD = "wrong_password"
    VERIFICATION_FAILED = "verification_failed"
    DISABLED = "disabled"
    LOCKED = "locked"
    """Locked after ``lock_after_inactive_days`` without use."""
    PASSWORD_EXPIRED = "password_expired"
    """Older than ``max_age_days``."""


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
    locked: bool = False
    """Locked after ``lock_after_inactive_days`` without use; an administrator's new password unlocks it."""


@dataclass(frozen=True)
class _Row:
    """A user's row as stored, the password hash included (it never leaves this module)."""

    name: str
    full_name: str
    role: str
    password_hash: str
    disabled: bool
    created_utc: str
    password_changed_utc: str
    locked_utc: str | None
    last_active_utc: str | None

    def digest(self) -> str:
        return user_row_digest({column: getattr(self, column) for column in _ROW_COLUMNS})

    def user(self, path: Path) -> User:
        try:
            return User(self.name, self.full_name, Role(self.role), self.disabled, locked=self.locked_utc is not None)
        except ValueError:
            raise UserStoreError(f"{path}: user {self.name!r} has the unknown role {self.role!r}") from None


def check_user_name(name: str) -> str:
    """``name`` if it is a valid user name, else :class:`InvalidUserError` saying what one looks like."""
    if not isinstance(name, str) or USER_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidUserError(f"user name {name!r}: use 2 to 32 characters, lower-case letters, digits, '_', '.' or '-', starting with a letter")
    return name


def parse_role(role: Role | str) -> Role:
    """``role`` as a :class:`Role`, or :class:`InvalidUserError` listing the roles."""
    try:
        return Role(role)
    except ValueError:
        raise InvalidUserError(f"role {role!r}: use one of {', '.join(r.value for r in Role)}") from None


def user_row_digest(row: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a user's row as audit records carry it: name, full name, role, disabled, created, password changed, locked, and the SHA-256 of the password hash (never the hash)."""
    content = {column: row[column] for column in _ROW_COLUMNS if column != "password_hash"}
    content["disabled"] = bool(row["disabled"])
    content["password_hash_sha256"] = hashlib.sha256(str(row["password_hash"]).encode("utf-8")).hexdigest()
    return hashlib.sha256(canonical_json({"user_row": content}).encode("utf-8")).hexdigest()


def session_row_digest(row: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a session's row as audit records carry it: over the token's SHA-256, the user, the start and the maximum age (never the token)."""
    content = {column: row[column] for column in _SESSION_COLUMNS}
    content["created_s"], content["expires_s"] = float(row["created_s"]), float(row["expires_s"])
    return hashlib.sha256(canonical_json({"session_row": content}).encode("utf-8")).hexdigest()


def _check_full_name(full_name: str) -> str:
    text = full_name.strip() if isinstance(full_name, str) else ""
    if not text:
        raise InvalidUserError("the full name is empty; it is the printed name on the user's electronic signatures")
    if len(text) > MAX_FULL_NAME_LENGTH or not text.isprintable():
        raise InvalidUserError(f"full name {text[:40]!r}: use at most {MAX_FULL_NAME_LENGTH} printable characters")
    return text


def _printed_key(full_name: str) -> str:
    """What a reader of a printed signature sees: NFKC-normalised, case-folded, spaces collapsed (full-width letters, ligatures and
    case do not make two names different). Look-alike letters of other scripts (Cyrillic а for Latin a) are not caught."""
    return " ".join(unicodedata.normalize("NFKC", full_name).casefold().split())


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _ChangedMeanwhile(Exception):
    """The row changed between reading it and writing the change (another process, or an edit of the file)."""


class UserStore:
    """Users and sessions in the SQLite file at ``path`` (created if missing).

    ``audit`` records every change, login, failed login, logout and session
    end, first (module docstring); without one nothing is recorded, which
    only reading and tests should do. ``actor`` is the recorded actor of what
    the store does on its own (session expiry, an inactivity lock, a failed
    login) and of user changes whose caller names none. ``policy`` is the
    password policy, its ageing and its inactivity lock. ``clock`` gives
    seconds since the epoch for sessions, ageing and the lock; the default,
    the wall clock, means the same in every process sharing the file.
    ``password_hasher`` replaces argon2-cffi's defaults (tests use a cheap
    one). Safe to share between threads.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        audit: AuditSink | None = None,
        actor: str = "user-store",
        policy: PasswordPolicy | None = None,
        session_idle_s: float = 900.0,
        session_max_s: float = 8 * 3600.0,
        clock: Callable[[], float] = time.time,
        password_hasher: PasswordHasher | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if not session_idle_s > 0.0 or not session_max_s > 0.0:
            raise ValueError(f"session_idle_s and session_max_s must be positive, got {session_idle_s} and {session_max_s}")
        if not isinstance(actor, str) or not actor.strip():
            raise ValueError(f"actor must name who acts, got {actor!r}")
        self.path = Path(path)
        self.actor = actor
        self.policy = policy if policy is not None else PasswordPolicy()
        self.session_idle_s = float(session_idle_s)
        self.session_max_s = float(session_max_s)
        self._audit = audit
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
            self._add_new_columns()
        except (sqlite3.Error, OSError) as error:
            raise UserStoreError(f"{self.path}: cannot open the user database: {error}") from error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ users

    def check_new_user(self, name: str, *, full_name: str, role: Role | str, password: str) -> User:
        """The user :meth:`add_user` would add, or what it would raise, without adding anyone."""
        check_user_name(name)
        full_name = _check_full_name(full_name)
        role = parse_role(role)
        check_password(password, policy=self.policy, user_name=name, full_name=full_name)
        if self._row(name) is not None:
            raise InvalidUserError(f"{self.path}: user {name!r} exists")
        printed = _printed_key(full_name)
        for other in self.users():
            if _printed_key(other.full_name) == printed:
                raise InvalidUserError(
                    f"{self.path}: full name {full_name!r} reads as user {other.name!r}'s ({other.full_name!r}); a printed name on a signature must say who signed: add a middle initial or a department"
                )
        return User(name, full_name, role, disabled=False)

    def add_user(self, name: str, *, full_name: str, role: Role | str, password: str, actor: str | None = None) -> User:
        """Add a user, recorded as ``user_added``; raises :class:`InvalidUserError` or :class:`WeakPasswordError` saying what is wrong."""
        user = self.check_new_user(name, full_name=full_name, role=role, password=password)
        actor = actor or self.actor
        stamp = self._stamp()
        row = _Row(user.name, user.full_name, user.role.value, self._hasher.hash(password), False, stamp, stamp, None, stamp)
        self._record(actor, "user_added", name, {"full_name": user.full_name, "role": user.role.value, "user": row.digest()})
        try:
            with self._transaction(f"add user {name!r}") as db:
                db.execute(
                    "INSERT INTO users (name, full_name, role, password_hash, disabled, created_utc, password_changed_utc, locked_utc, last_active_utc)"
                    " VALUES (?, ?, ?, ?, 0, ?, ?, NULL, ?)",
                    (row.name, row.full_name, row.role, row.password_hash, stamp, stamp, stamp),
                )
                self._remember_password(db, name, row.password_hash, stamp)
        except sqlite3.IntegrityError:
            self._record(actor, "user_add_failed", name, {"error": "the user exists"})
            raise InvalidUserError(f"{self.path}: user {name!r} exists") from None
        except UserStoreError as error:
            self._record(actor, "user_add_failed", name, {"error": str(error)})
            raise
        log.info("user_added", path=str(self.path), user=name, role=user.role.value)
        return user

    def set_password(self, name: str, password: str, *, actor: str | None = None) -> None:
        """Replace a user's password (which unlocks a locked account), end the user's sessions; recorded as ``password_changed``.

        Refused with :class:`WeakPasswordError` when the policy refuses the
        password or it is one of the user's last ``history_count``.
        """
        before = self._known_row(name)
        check_password(password, policy=self.policy, user_name=name, full_name=before.full_name)
        self._refuse_reused(before, password)
        password_hash = self._hasher.hash(password)
        stamp = self._stamp()
        changes = {"password_hash": password_hash, "password_changed_utc": stamp, "locked_utc": None, "last_active_utc": stamp}
        self._change(
            before, actor=actor or self.actor, action="password_changed", details={}, changes=changes, end_sessions=True,
            then=lambda db: self._remember_password(db, name, password_hash, stamp),
        )  # fmt: skip
        log.info("password_changed", path=str(self.path), user=name)

    def set_role(self, name: str, role: Role | str, *, actor: str | None = None) -> None:
        """Change a user's role, recorded as ``role_changed``; open sessions see the new role at their next request."""
        role = parse_role(role)
        before = self._known_row(name)
        self._change(before, actor=actor or self.actor, action="role_changed", details={"from": before.role, "to": role.value}, changes={"role": role.value})
        log.info("role_changed", path=str(self.path), user=name, role=role.value)

    def disable(self, name: str, *, actor: str | None = None) -> None:
        """Disable a user (logins fail) and end the user's sessions, recorded as ``user_disabled``; the user stays on record."""
        before = self._known_row(name)
        self._change(before, actor=actor or self.actor, action="user_disabled", details={}, changes={"disabled": True}, end_sessions=True)
        log.info("user_disabled", path=str(self.path), user=name)

    def user(self, name: str) -> User | None:
        """The user of that name, or None."""
        row = self._row(name)
        return row.user(self.path) if row is not None else None

    def users(self) -> list[User]:
        """Every user, disabled ones included, by name."""
        return [self._from_columns(columns).user(self.path) for columns in self._read(f"SELECT {_ALL_COLUMNS} FROM users ORDER BY name")]

    def password_expired(self, name: str) -> bool:
        """Whether the user's password is older than the policy's ``max_age_days`` (never when ageing is off)."""
        return self._password_age_exceeded(self._known_row(name))

    # ------------------------------------------------------------------ log-in

    def authenticate(self, name: str, password: str, *, purpose: LoginPurpose = LoginPurpose.SESSION) -> User | None:
        """The user, when ``password`` is theirs and the account may log in; otherwise None, recorded as ``login_failed`` with the reason.

        A success for a session is recorded as ``login``; at signing
        (``purpose`` :attr:`LoginPurpose.SIGNATURE`, the password entered again,
        21 CFR 11.200) the signed action's own record names the signer. Takes
        about as long for a user that does not exist (a dummy hash is
        verified), so the answer's time does not say which names exist.
        Refused although the password is right: a disabled or locked account,
        one unused for longer than ``lock_after_inactive_days`` (it locks now,
        recorded as ``user_locked``), a password older than ``max_age_days``.
        """
        outcome = self._check_login(name, password)
        if isinstance(outcome, LoginRefusal):
            self._failed(name, outcome, purpose)
            return None
        row = outcome
        if purpose is LoginPurpose.SESSION:
            self._record(row.name, "login", row.name, {"user": row.digest()})
        self._execute("UPDATE users SET last_active_utc = ? WHERE name = ?", (self._stamp(), row.name), what=f"note the log-in of {name!r}")
        if self._hasher.check_needs_rehash(row.password_hash):
            self._change(row, actor=row.name, action="password_rehashed", details={}, changes={"password_hash": self._hasher.hash(password)})
            log.info("password_rehashed", path=str(self.path), user=name)
        return row.user(self.path)

    def create_session(self, user: User) -> str:
        """A new session for ``user`` (who must exist, not disabled nor locked), recorded as ``session_started``: the token to give the browser, never stored."""
        token = secrets.token_urlsafe(32)
        now = self._clock()
        row = self._row(user.name)
        if row is None or row.disabled or row.locked_utc is not None:
            raise UnknownUserError(f"{self.path}: no active user {user.name!r} to open a session for")
        self._expire_stale(now)
        session = {"token_sha256": _token_digest(token), "user_name": user.name, "created_utc": self._stamp(now), "created_s": now, "expires_s": now + self.session_max_s}
        self._record(user.name, "session_started", user.name, {"session": session_row_digest(session), "expires_utc": self._stamp(now + self.session_max_s)})
        try:
            with self._transaction(f"open a session for {user.name!r}") as db:
                active = db.execute("SELECT disabled, locked_utc FROM users WHERE name = ?", (user.name,)).fetchone()
                if active is None or active[0] or active[1] is not None:
                    raise UnknownUserError(f"{self.path}: no active user {user.name!r} to open a session for")
                db.execute(f"INSERT INTO sessions ({', '.join(_SESSION_COLUMNS)}, last_seen_s) VALUES (?, ?, ?, ?, ?, ?)", (*session.values(), now))
        except (UnknownUserError, UserStoreError, sqlite3.IntegrityError) as error:
            self._record(user.name, "session_start_failed", user.name, {"session": session_row_digest(session), "error": str(error)})
            raise
        log.info("session_started", user=user.name)
        return token

    def session_user(self, token: str, *, activity: bool = True) -> User | None:
        """The user of a live session; None when the token is unknown, idle too long, past its maximum age or its user disabled or locked.

        A session found ended is recorded as ``session_expired`` and removed.
        ``activity`` (a person did something) slides the idle expiry; a page's
        background refresh passes False, so an unattended screen still logs out.
        """
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LENGTH:
            return None
        digest = _token_digest(token)
        now = self._clock()
        rows = self._read(
            f"SELECT {', '.join('s.' + c for c in _SESSION_COLUMNS)}, s.last_seen_s, {', '.join('u.' + c for c in _USER_COLUMNS)}"
            " FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.token_sha256 = ?",
            (digest,),
        )
        if not rows:
            return None
        session = dict(zip(_SESSION_COLUMNS, rows[0][: len(_SESSION_COLUMNS)], strict=True))
        last_seen_s = float(rows[0][len(_SESSION_COLUMNS)])
        user = self._from_columns(rows[0][len(_SESSION_COLUMNS) + 1 :]).user(self.path)
        ended = self._end_reason(now, last_seen_s, float(session["expires_s"]), user)
        if ended is not None:
            self._end(session, "session_expired", reason=ended)
            log.info("session_ended", user=user.name, reason=ended)
            return None
        if activity and self._execute("UPDATE sessions SET last_seen_s = max(last_seen_s, ?) WHERE token_sha256 = ?", (now, digest), what="note the session's use") == 0:
            return None
        return user

    def end_session(self, token: str) -> None:
        """End a session (log out), recorded as ``logout``; nothing happens for an unknown token."""
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LENGTH:
            return
        rows = self._read(f"SELECT {', '.join(_SESSION_COLUMNS)} FROM sessions WHERE token_sha256 = ?", (_token_digest(token),))
        if rows:
            session = dict(zip(_SESSION_COLUMNS, rows[0], strict=True))
            self._end(session, "logout")
            log.info("logout", user=session["user_name"])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers

    def _record(self, actor: str, action: str, name: str, details: Mapping[str, Any]) -> None:
        """Write the audit record of what is about to happen; raises (and so refuses the action) when it cannot be written."""
        if self._audit is not None:
            self._audit.append(actor=actor, action=action, subject=f"user {name}", details={"name": name, **details})

    def _check_login(self, name: str, password: str) -> _Row | LoginRefusal:
        """The user's row when ``password`` logs ``name`` in, else why not (locking an account unused too long)."""
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            return LoginRefusal.PASSWORD_REJECTED
        valid_name = isinstance(name, str) and USER_NAME_PATTERN.fullmatch(name) is not None
        row = self._row(name) if valid_name else None
        if row is None:
            self._verify_quietly(self._dummy(), password)
            return LoginRefusal.UNKNOWN_USER
        try:
            self._hasher.verify(row.password_hash, password)
        except VerifyMismatchError:
            return LoginRefusal.WRONG_PASSWORD
        except VerificationError:
            return LoginRefusal.VERIFICATION_FAILED
        except InvalidHashError:
            raise UserStoreError(f"{self.path}: the stored password hash of user {name!r} is not an argon2 hash") from None
        if row.disabled:
            return LoginRefusal.DISABLED
        if row.locked_utc is not None:
            return LoginRefusal.LOCKED
        inactive_days = self._inactive_days(row)
        if self.policy.lock_after_inactive_days is not None and inactive_days > self.policy.lock_after_inactive_days:
            self._change(
                row, actor=self.actor, action="user_locked", changes={"locked_utc": self._stamp()}, end_sessions=True,
                details={"reason": "inactive", "inactive_days": round(inactive_days, 2), "lock_after_inactive_days": self.policy.lock_after_inactive_days},
            )  # fmt: skip
            log.warning("user_locked", path=str(self.path), user=row.name, inactive_days=round(inactive_days, 2))
            return LoginRefusal.LOCKED
        if self._password_age_exceeded(row):
            return LoginRefusal.PASSWORD_EXPIRED
        return row

    def _failed(self, name: object, reason: LoginRefusal, purpose: LoginPurpose) -> None:
        shown = str(name)[:64]
        log.warning("login_failed", user=shown, reason=reason.value)
        self._record(self.actor, "login_failed", shown, {"reason": reason.value, "purpose": purpose.value})

    def _change(
        self,
        before: _Row,
        *,
        actor: str,
        action: str,
        details: Mapping[str, Any],
        changes: Mapping[str, Any],
        end_sessions: bool = False,
        then: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Record ``action`` with the row's digest before and after, then apply ``changes`` if the row is still ``before``; else ``user_change_failed``."""
        after = replace(before, **changes)
        ending = self._read("SELECT COUNT(*) FROM sessions WHERE user_name = ?", (before.name,))[0][0] if end_sessions else 0
        extra = {"sessions_ended": ending} if end_sessions else {}
        self._record(actor, action, before.name, {**details, **extra, "user": after.digest(), "previous": before.digest()})
        assignments = ", ".join(f"{column} = ?" for column in changes)
        unchanged = " AND ".join(f"{column} IS ?" for column in _ROW_COLUMNS)
        try:
            with self._transaction(f"change user {before.name!r}") as db:
                updated = db.execute(f"UPDATE users SET {assignments} WHERE {unchanged}", (*changes.values(), *(getattr(before, c) for c in _ROW_COLUMNS))).rowcount
                if updated == 0:
                    raise _ChangedMeanwhile
                if end_sessions:
                    db.execute("DELETE FROM sessions WHERE user_name = ?", (before.name,))
                if then is not None:
                    then(db)
        except _ChangedMeanwhile:
            error = "the user's row changed between reading and writing it (another process, or an edit of the file); nothing changed"
            self._record(actor, "user_change_failed", before.name, {"action": action, "error": error, "previous": before.digest()})
            raise UserStoreError(f"{self.path}: cannot {action.replace('_', ' ')} for user {before.name!r}: {error}") from None
        except UserStoreError as failure:
            self._record(actor, "user_change_failed", before.name, {"action": action, "error": str(failure), "previous": before.digest()})
            raise

    def _refuse_reused(self, before: _Row, password: str) -> None:
        count = self.policy.history_count
        if count == 0:
            return
        older = [str(r[0]) for r in self._read("SELECT password_hash FROM password_history WHERE user_name = ? ORDER BY rowid DESC LIMIT ?", (before.name, count))]
        for password_hash in dict.fromkeys([before.password_hash, *older]):
            try:
                self._hasher.verify(password_hash, password)
            except (VerificationError, InvalidHashError):
                continue
            raise WeakPasswordError(f"the password is one of {before.name!r}'s last {count} passwords; choose one not used before", PasswordRule.REUSED)

    def _remember_password(self, db: sqlite3.Connection, name: str, password_hash: str, stamp: str) -> None:
        """Keep the newest ``history_count`` password hashes of ``name`` (inside the caller's transaction)."""
        count = self.policy.history_count
        if count > 0:
            db.execute("INSERT INTO password_history (user_name, password_hash, set_utc) VALUES (?, ?, ?)", (name, password_hash, stamp))
        db.execute(
            "DELETE FROM password_history WHERE user_name = ? AND rowid NOT IN (SELECT rowid FROM password_history WHERE user_name = ? ORDER BY rowid DESC LIMIT ?)",
            (name, name, count),
        )

    def _inactive_days(self, row: _Row) -> float:
        """Days since the account was last used, or set up or given a password by an administrator."""
        stamps = [self._seconds(row, column) for column in ("created_utc", "password_changed_utc", "last_active_utc") if getattr(row, column) is not None]
        return (self._clock() - max(stamps)) / _SECONDS_PER_DAY

    def _password_age_exceeded(self, row: _Row) -> bool:
        limit = self.policy.max_age_days
        return limit is not None and (self._clock() - self._seconds(row, "password_changed_utc")) / _SECONDS_PER_DAY > limit

    def _seconds(self, row: _Row, column: str) -> float:
        text = getattr(row, column)
        try:
            stamp = datetime.fromisoformat(str(text))
        except ValueError:
            raise UserStoreError(f"{self.path}: user {row.name!r}: {column} {text!r} is not an ISO 8601 time") from None
        return (stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)).timestamp()

    def _expire_stale(self, now: float) -> None:
        """Record and remove every session past its idle time or maximum age."""
        stale = self._read(f"SELECT {', '.join(_SESSION_COLUMNS)}, last_seen_s FROM sessions WHERE expires_s <= ? OR last_seen_s < ?", (now, now - self.session_idle_s))
        for columns in stale:
            session = dict(zip(_SESSION_COLUMNS, columns[:-1], strict=True))
            self._end(session, "session_expired", reason="max_age" if now >= float(session["expires_s"]) else "idle")

    def _end(self, session: Mapping[str, Any], action: str, *, reason: str | None = None) -> None:
        name = str(session["user_name"])
        actor = name if action == "logout" else self.actor
        self._record(actor, action, name, {"session": session_row_digest(session), **({"reason": reason} if reason is not None else {})})
        self._execute("DELETE FROM sessions WHERE token_sha256 = ?", (session["token_sha256"],), what=f"end a session of {name!r}")

    def _end_reason(self, now: float, last_seen_s: float, expires_s: float, user: User) -> str | None:
        """Why a session has ended, or None while it lives."""
        if now - last_seen_s > self.session_idle_s:
            return "idle"
        if now >= expires_s:
            return "max_age"
        if user.disabled:
            return "disabled"
        if user.locked:
            return "locked"
        return None

    def _stamp(self, seconds: float | None = None) -> str:
        return datetime.fromtimestamp(self._clock() if seconds is None else seconds, UTC).isoformat(timespec="seconds")

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def _verify_quietly(self, password_hash: str, password: str) -> None:
        try:
            self._hasher.verify(password_hash, password)
        except VerificationError:
            pass

    def _row(self, name: str) -> _Row | None:
        rows = self._read(f"SELECT {_ALL_COLUMNS} FROM users WHERE name = ?", (name,))
        return self._from_columns(rows[0]) if rows else None

    def _known_row(self, name: str) -> _Row:
        row = self._row(name)
        if row is None:
            raise UnknownUserError(f"{self.path}: no user {name!r}")
        return row

    def _from_columns(self, columns: tuple[Any, ...]) -> _Row:
        values = dict(zip(_USER_COLUMNS, columns, strict=True))
        return _Row(**{**values, "disabled": bool(values["disabled"])})

    def _add_new_columns(self) -> None:
        """Bring a file written before ``locked_utc`` and ``last_active_utc`` existed up to date (existing user databases load as they are)."""
        with self._transaction("add the new columns to the users table") as db:
            present = {str(row[1]) for row in db.execute("PRAGMA table_info(users)")}
            for column, kind in _ADDED_COLUMNS:
                if column not in present:
                    db.execute(f"ALTER TABLE users ADD COLUMN {column} {kind}")  # names from a fixed tuple
            if "last_active_utc" not in present:  # when each user last logged in was not kept: their inactivity counts from now
                db.execute("UPDATE users SET last_active_utc = ?", (self._stamp(),))

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; an integrity error (a user that exists) is the caller's to translate, other SQLite errors become :class:`UserStoreError`."""
        with self._lock:
            try:
                self._rollback()  # one left open by an interrupted caller
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as error:
                raise UserStoreError(f"{self.path}: cannot {what}: {error}") from error
            finally:
                self._rollback()

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as error:
                raise UserStoreError(f"{self.path}: cannot read the users: {error}") from error

    def _execute(self, sql: str, parameters: tuple[Any, ...], *, what: str) -> int:
        """One statement in its own transaction; the number of rows it changed."""
        with self._lock:
            try:
                return int(self._db.execute(sql, parameters).rowcount)
            except sqlite3.Error as error:
                raise UserStoreError(f"{self.path}: cannot {what}: {error}") from error

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


_USER_COLUMNS = (*_ROW_COLUMNS, "last_active_utc")
_ALL_COLUMNS = ", ".join(_USER_COLUMNS)


# --------------------------------------------------------------------------- cross-check


class _Legacy(Enum):
    """A user added by a record written before records carried row digests."""

    ADDED = "added"


_USER_STATE_ACTIONS = frozenset({"login", "password_changed", "role_changed", "user_disabled", "user_locked", "password_rehashed"})
_SESSION_ENDS = frozenset({"logout", "session_expired"})


def user_store_problems(history_path: str | Path, audit_records: Iterable[AuditRecord]) -> list[str]:
    """Every user or session row of the history at ``history_path`` that ``audit_records`` (the whole trail, oldest first) do not account for.

    A user's row must be the one its last audit record describes (by
    :func:`user_row_digest`); each change must start from the row the record
    before it left; a session's row must have been started by a
    ``session_started`` record and not ended since. So an account inserted
    into the file, a role, flag or password hash changed there, a recorded
    user deleted, and a session row forged or brought back are each named,
    one line per problem. A user added before records carried digests is
    named too, until a change recorded by this code (a new password, a role)
    records its row. Raises :class:`UserStoreError` when the file cannot be read.
    """
    path = Path(history_path)
    users, sessions = _stored_rows(path)
    problems: list[str] = []
    expected: dict[str, str | _Legacy | None] = {}
    recorded_at: dict[str, int] = {}
    before_add: dict[str, str | _Legacy | None] = {}
    started: set[str] = set()
    ended: dict[str, int] = {}
    for record in audit_records:
        details = record.details
        name = details.get("name")
        if not isinstance(name, str):
            continue
        digest, action, seq = details.get("user"), record.action, record.seq
        if action == "user_added":
            before_add[name] = expected.get(name)
            expected[name] = digest if isinstance(digest, str) else _Legacy.ADDED
        elif action == "user_add_failed":
            expected[name] = before_add.get(name)
        elif action == "user_change_failed":
            previous = details.get("previous")
            expected[name] = previous if isinstance(previous, str) else expected.get(name)
        elif action == "session_started" and isinstance(details.get("session"), str):
            started.add(details["session"])
        elif action in _SESSION_ENDS and isinstance(details.get("session"), str):
            ended[details["session"]] = seq
        elif action in _USER_STATE_ACTIONS and isinstance(digest, str):
            state = expected.get(name)
            claimed = details.get("previous", digest) if action != "login" else digest
            if state is None:
                problems.append(f"seq {seq}: {action} of user {name!r}, who no earlier record adds")
                continue  # the row stays unaccounted for
            if isinstance(state, str) and claimed != state:
                problems.append(f"seq {seq}: {action} of user {name!r} found a row no earlier record accounts for: changed outside bioreactor-mpc after seq {recorded_at[name]}")
            expected[name] = digest
        else:
            continue
        if action not in _SESSION_ENDS and action != "session_started":
            recorded_at[name] = seq
    for name, row in users.items():
        state = expected.get(name)
        what = f"user {name!r} ({row['role']}{', disabled' if row['disabled'] else ''})"
        if state is None:
            problems.append(f"{what}: no audit record adds this user: a row inserted outside bioreactor-mpc")
        elif isinstance(state, _Legacy):
            problems.append(
                f"{what}: added at seq {recorded_at[name]} by a record without the row's digest (written before records carried them); "
                "a new password or role set with bioreactor-mpc users records the row"
            )
        elif user_row_digest(row) != state:
            problems.append(f"{what}: the row differs from the one recorded at seq {recorded_at[name]}: changed outside bioreactor-mpc")
    for name, state in expected.items():
        if state is not None and name not in users:
            problems.append(f"user {name!r}: recorded at seq {recorded_at[name]} but missing from the users table: deleted outside bioreactor-mpc")
    for session in sessions:
        digest = session_row_digest(session)
        what = f"session of {session['user_name']!r} started {session['created_utc']}"
        if digest in ended:
            problems.append(f"{what}: ended at seq {ended[digest]}, yet its row is back in the sessions table")
        elif digest not in started:
            problems.append(f"{what}: no audit record started it: a row forged outside bioreactor-mpc")
    return problems


def _stored_rows(path: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The users (by name) and sessions stored at ``path``, read without writing; none when the tables are missing."""
    if not path.is_file():
        raise UserStoreError(f"{path}: no such history file")
    try:
        db = sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as error:
        raise UserStoreError(f"{path}: cannot open the history to check its users: {error}") from error
    try:
        tables = {str(row[0]) for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        users: dict[str, dict[str, Any]] = {}
        if "users" in tables:
            present = {str(row[1]) for row in db.execute("PRAGMA table_info(users)")}
            columns = [column if column in present else f"NULL AS {column}" for column in _ROW_COLUMNS]
            for values in db.execute(f"SELECT {', '.join(columns)} FROM users ORDER BY name"):  # names from a fixed tuple
                row = dict(zip(_ROW_COLUMNS, values, strict=True))
                users[str(row["name"])] = row
        sessions = []
        if "sessions" in tables:
            sessions = [dict(zip(_SESSION_COLUMNS, values, strict=True)) for values in db.execute(f"SELECT {', '.join(_SESSION_COLUMNS)} FROM sessions ORDER BY created_s")]
    except sqlite3.Error as error:
        raise UserStoreError(f"{path}: cannot read the users and sessions: {error}") from error
    finally:
        db.close()
    return users, sessions
