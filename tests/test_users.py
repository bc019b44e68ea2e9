"""Users, roles and sessions: argon2id hashes, failed log-ins logged without the password, sessions that expire, the ``users`` commands."""

from __future__ import annotations

import argparse
import hashlib
import io
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from rich.console import Console
from structlog.testing import capture_logs

from bioreactor_mpc.admin_cli import AdminCommandError, add_parsers, dispatch
from interfaces.audit import AuditError, AuditTrail
from interfaces.history import SqliteHistory
from interfaces.passwords import PasswordPolicy
from interfaces.users import InvalidUserError, Role, UnknownUserError, User, UserStore, WeakPasswordError, can_read_audit, user_store_problems
from plant_models.errors import ConfigError

pytestmark = pytest.mark.usefixtures("uncached_logging")

PASSWORD = "correct horse battery"


class CountingHasher(PasswordHasher):
    """argon2id at its cheapest (tests), counting the verifications."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified += 1
        return super().verify(hash, password)


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[UserStore]:
    users = UserStore(tmp_path / "history.sqlite", session_idle_s=900.0, session_max_s=8 * 3600.0, clock=clock, password_hasher=CountingHasher())
    yield users
    users.close()


def test_passwords_are_stored_as_argon2id_hashes_never_as_themselves(tmp_path):
    path = tmp_path / "h.sqlite"
    with UserStore(path) as users:  # argon2-cffi's defaults, as in production
        alice = users.add_user("alice", full_name="Alice Martin", role=Role.OPERATOR, password=PASSWORD)
        assert alice == User("alice", "Alice Martin", Role.OPERATOR, disabled=False)
        assert users.authenticate("alice", PASSWORD) == alice
    db = sqlite3.connect(path)
    stored = db.execute("SELECT password_hash FROM users WHERE name = 'alice'").fetchone()[0]
    db.close()
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert PASSWORD not in stored and PASSWORD.encode() not in path.read_bytes()


def test_a_wrong_password_an_unknown_user_and_a_disabled_user_fail_and_are_logged_without_the_password(store):
    hasher = store._hasher
    assert isinstance(hasher, CountingHasher)
    store.add_user("bob", full_name="Bob Stone", role="engineer", password=PASSWORD)
    with capture_logs() as logs:
        assert store.authenticate("bob", "wrong password here") is None
        assert store.authenticate("nobody", PASSWORD) is None
        assert hasher.verified == 2, "an unknown user costs a verification too, so timing does not tell which names exist"
        assert store.authenticate("Robert'); DROP TABLE users;--", PASSWORD) is None
        store.disable("bob")
        assert store.authenticate("bob", PASSWORD) is None
    failures = [e for e in logs if e["event"] == "login_failed"]
    assert [(e["user"], e["reason"]) for e in failures] == [
        ("bob", "wrong_password"),
        ("nobody", "unknown_user"),
        ("Robert'); DROP TABLE users;--", "unknown_user"),
        ("bob", "disabled"),
    ]
    assert all(PASSWORD not in str(e) and "wrong password here" not in str(e) for e in logs)
    assert store.user("bob") == User("bob", "Bob Stone", Role.ENGINEER, disabled=True), "a disabled user stays on record"


def test_names_roles_full_names_and_passwords_are_checked(store):
    for name in ("a", "Alice", "1alice", "alice\n", "al ice", "a" * 33, ""):
        with pytest.raises(InvalidUserError, match="user name"):
            store.add_user(name, full_name="A", role="viewer", password=PASSWORD)
    for name in ("al", "alice.martin", "op-2", "x_" + "a" * 30):
        store.add_user(name, full_name=f"Someone {name}", role="viewer", password=PASSWORD)
    with pytest.raises(InvalidUserError, match="role 'admin': use one of viewer, operator, engineer, qa"):
        store.add_user("carol", full_name="Carol", role="admin", password=PASSWORD)
    with pytest.raises(InvalidUserError, match="full name is empty"):
        store.add_user("carol", full_name="  ", role="viewer", password=PASSWORD)
    with pytest.raises(WeakPasswordError, match="the password has 11 characters; use at least 12") as error:
        store.add_user("carol", full_name="Carol", role="viewer", password="elevenchars")
    assert "elevenchars" not in str(error.value)
    with pytest.raises(InvalidUserError, match="user 'al' exists"):
        store.add_user("al", full_name="Al", role="viewer", password=PASSWORD)
    with pytest.raises(UnknownUserError, match="no user 'dave'"):
        store.set_password("dave", PASSWORD)
    with pytest.raises(UnknownUserError, match="no user 'dave'"):
        store.disable("dave")
    assert [u.name for u in store.users()] == ["al", "alice.martin", "op-2", "x_" + "a" * 30]


def test_operator_and_engineer_include_the_roles_below_and_qa_only_viewer():
    assert [r.value for r in Role] == ["viewer", "operator", "engineer", "qa"]
    allowed = {(have, need) for have in Role for need in Role if have.allows(need)}
    assert allowed == {
        (Role.VIEWER, Role.VIEWER),
        (Role.OPERATOR, Role.VIEWER),
        (Role.OPERATOR, Role.OPERATOR),
        (Role.ENGINEER, Role.VIEWER),
        (Role.ENGINEER, Role.OPERATOR),
        (Role.ENGINEER, Role.ENGINEER),
        (Role.QA, Role.VIEWER),
        (Role.QA, Role.QA),
    }


def test_qa_and_engineers_read_the_audit_trail_viewers_and_operators_do_not():
    assert {role for role in Role if can_read_audit(role)} == {Role.QA, Role.ENGINEER}


def test_a_user_database_written_before_qa_existed_still_loads(tmp_path):
    path = tmp_path / "h.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE users (name TEXT PRIMARY KEY, full_name TEXT NOT NULL, role TEXT NOT NULL, password_hash TEXT NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0, created_utc TEXT NOT NULL, password_changed_utc TEXT NOT NULL);
        CREATE TABLE sessions (token_sha256 TEXT PRIMARY KEY, user_name TEXT NOT NULL, created_utc TEXT NOT NULL,
            created_s REAL NOT NULL, last_seen_s REAL NOT NULL, expires_s REAL NOT NULL);
        """
    )
    cheap = CountingHasher()
    db.execute("INSERT INTO users VALUES ('vera', 'Vera', 'viewer', ?, 0, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')", (cheap.hash(PASSWORD),))
    db.commit()
    db.close()
    with UserStore(path, password_hasher=cheap, policy=PasswordPolicy(lock_after_inactive_days=30)) as users:
        assert users.users() == [User("vera", "Vera", Role.VIEWER, disabled=False)]
        assert users.authenticate("vera", PASSWORD) == User("vera", "Vera", Role.VIEWER, disabled=False), "inactivity counts from the upgrade, not from 2026-01-01"


def test_an_old_hash_is_upgraded_at_the_next_login(tmp_path):
    path = tmp_path / "h.sqlite"
    with UserStore(path, password_hasher=CountingHasher()) as cheap:
        cheap.add_user("alice", full_name="Alice", role="operator", password=PASSWORD)
    with capture_logs() as logs, UserStore(path) as users:
        assert users.authenticate("alice", PASSWORD) is not None
        assert users.authenticate("alice", PASSWORD) is not None
    assert [e["event"] for e in logs] == ["password_rehashed"]
    db = sqlite3.connect(path)
    assert db.execute("SELECT password_hash FROM users").fetchone()[0].startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    db.close()


def test_sessions_slide_while_used_and_end_when_idle(store, clock, tmp_path):
    alice = store.add_user("alice", full_name="Alice", role="operator", password=PASSWORD)
    token = store.create_session(alice)
    assert len(token) >= 43
    db = sqlite3.connect(tmp_path / "history.sqlite")
    assert db.execute("SELECT token_sha256, user_name FROM sessions").fetchall() == [(hashlib.sha256(token.encode()).hexdigest(), "alice")]
    db.close()
    assert token.encode() not in (tmp_path / "history.sqlite").read_bytes() + (tmp_path / "history.sqlite-wal").read_bytes()
    for _ in range(3):
        clock.now_s += 899.0
        assert store.session_user(token) == alice
    clock.now_s += 901.0
    assert store.session_user(token) is None
    clock.now_s -= 901.0
    assert store.session_user(token) is None, "an ended session stays ended"
    assert store.session_user("not-a-token") is None and store.session_user("") is None


def test_a_background_refresh_does_not_keep_a_session_alive(store, clock):
    alice = store.add_user("alice", full_name="Alice", role="operator", password=PASSWORD)
    token = store.create_session(alice)
    clock.now_s += 600.0
    assert store.session_user(token, activity=False) == alice
    clock.now_s += 600.0  # 1200 s after the last thing a person did, with refreshes in between
    assert store.session_user(token, activity=False) is None, "an unattended screen logs out after the idle time"


def test_sessions_end_at_their_maximum_age_even_when_used(store, clock):
    alice = store.add_user("alice", full_name="Alice", role="operator", password=PASSWORD)
    token = store.create_session(alice)
    start = clock.now_s
    while clock.now_s + 600.0 < start + 8 * 3600.0:
        clock.now_s += 600.0
        assert store.session_user(token) is not None
    clock.now_s = start + 8 * 3600.0
    assert store.session_user(token) is None


def test_sessions_end_at_log_out_password_change_and_disable_and_see_role_changes(store):
    alice = store.add_user("alice", full_name="Alice", role="operator", password=PASSWORD)
    first, second = store.create_session(alice), store.create_session(alice)
    store.end_session(first)
    assert store.session_user(first) is None and store.session_user(second) == alice
    store.set_role("alice", Role.ENGINEER)
    assert store.session_user(second) == User("alice", "Alice", Role.ENGINEER, disabled=False)
    store.set_password("alice", "another long passphrase")
    assert store.session_user(second) is None
    assert store.authenticate("alice", PASSWORD) is None
    third = store.create_session(store.authenticate("alice", "another long passphrase"))  # type: ignore[arg-type]
    store.disable("alice")
    assert store.session_user(third) is None
    with pytest.raises(UnknownUserError, match="no active user 'alice'"):
        store.create_session(alice)


# --------------------------------------------------------------------------- users commands


def _run(*argv: str) -> tuple[int | None, str]:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    status = dispatch(parser.parse_args(argv), Console(file=out, width=80))
    return status, out.getvalue()


def test_users_commands_add_list_passwd_role_disable_with_audit_records(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite"
    SqliteHistory(path).close()
    monkeypatch.setenv("ALICE_PASSWORD", PASSWORD)
    status, out = _run("users", "add", "alice", "--full-name", "Alice Martin", "--role", "operator", "--history", str(path), "--password-env", "ALICE_PASSWORD")
    assert (status, out) == (0, f"added alice (Alice Martin) as operator to {path}\n")
    assert _run("users", "list", "--history", str(path)) == (0, "alice  operator  active    Alice Martin\n")
    monkeypatch.setenv("NEW_PASSWORD", "a new long passphrase")
    assert _run("users", "passwd", "alice", "--history", str(path), "--password-env", "NEW_PASSWORD")[0] == 0
    with UserStore(path) as users:
        assert users.authenticate("alice", PASSWORD) is None
        assert users.authenticate("alice", "a new long passphrase") is not None
    assert _run("users", "role", "alice", "--role", "engineer", "--history", str(path))[0] == 0
    assert _run("users", "disable", "alice", "--history", str(path))[0] == 0
    assert _run("users", "disable", "alice", "--history", str(path)) == (0, "alice is disabled already; nothing changed\n")
    with UserStore(path) as users:
        assert users.user("alice") == User("alice", "Alice Martin", Role.ENGINEER, disabled=True)
        assert users.authenticate("alice", "a new long passphrase") is None
    with AuditTrail(path) as trail:
        records = trail.records()
        assert trail.verify().ok
    assert [(r.actor, r.action, r.subject) for r in records] == [
        ("admin-cli", "user_added", "user alice"),
        ("admin-cli", "password_changed", "user alice"),
        ("admin-cli", "role_changed", "user alice"),
        ("admin-cli", "user_disabled", "user alice"),
    ]
    assert {k: v for k, v in records[0].details.items() if k != "user"} == {"name": "alice", "full_name": "Alice Martin", "role": "operator"}
    assert {k: v for k, v in records[2].details.items() if k not in ("user", "previous")} == {"name": "alice", "from": "operator", "to": "engineer"}
    assert [r.details["previous"] for r in records[1:]] == [r.details["user"] for r in records[:-1]], "each change starts from the row the one before left"
    assert user_store_problems(path, records) == [], "the users table is what the records say"
    assert PASSWORD.encode() not in path.read_bytes(), "every connection closed: the WAL is in the file"


def test_users_add_is_refused_when_its_audit_record_cannot_be_written(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite"
    monkeypatch.setenv("PW", PASSWORD)

    def fail(self: AuditTrail, **record: object) -> None:
        raise AuditError(f"{self.path}: cannot write the audit record: disk I/O error")

    monkeypatch.setattr(AuditTrail, "append", fail)
    with pytest.raises(AuditError, match="disk I/O error"):
        _run("users", "add", "alice", "--full-name", "Alice", "--role", "operator", "--history", str(path), "--password-env", "PW")
    with UserStore(path) as users:
        assert users.users() == []


def test_users_commands_explain_what_is_wrong(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite"
    monkeypatch.delenv("NOT_SET", raising=False)
    with pytest.raises(AdminCommandError, match="--password-env NOT_SET: the environment variable is not set"):
        _run("users", "add", "alice", "--full-name", "Alice", "--role", "operator", "--history", str(path), "--password-env", "NOT_SET")
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD))
    with pytest.raises(AdminCommandError, match="no terminal to type the password at"):
        _run("users", "add", "alice", "--full-name", "Alice", "--role", "operator", "--history", str(path))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter([PASSWORD, PASSWORD + "x"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    with pytest.raises(AdminCommandError, match="the two passwords differ; nothing changed"):
        _run("users", "add", "alice", "--full-name", "Alice", "--role", "operator", "--history", str(path))
    monkeypatch.setenv("SHORT", "short")
    with pytest.raises(WeakPasswordError, match="use at least 12"):
        _run("users", "add", "alice", "--full-name", "Alice", "--role", "operator", "--history", str(path), "--password-env", "SHORT")
    with pytest.raises(InvalidUserError, match="user name 'Alice'"):
        _run("users", "add", "Alice", "--full-name", "Alice", "--role", "operator", "--history", str(path), "--password-env", "SHORT")
    with pytest.raises(UnknownUserError, match="no user 'bob'"):
        _run("users", "disable", "bob", "--history", str(path))
    with pytest.raises(AdminCommandError, match="other.sqlite: no such history file"):
        _run("users", "list", "--history", str(tmp_path / "other.sqlite"))
    with AuditTrail(path) as trail:
        assert trail.records() == [], "nothing refused was recorded as done"


def test_users_commands_apply_the_sites_password_policy_file(tmp_path, monkeypatch):
    path = tmp_path / "history.sqlite"
    policy = tmp_path / "password-policy.yaml"
    policy.write_text("context_words: [bioreactor, acme]\nmax_age_days: 90\n")
    monkeypatch.setenv("PW", "acme pass phrase 2027")
    with pytest.raises(WeakPasswordError, match="contains 'acme'.*password rule: context_word"):
        _run("users", "add", "alice", "--full-name", "Alice", "--role", "qa", "--history", str(path), "--password-env", "PW", "--password-policy", str(policy))
    assert _run("users", "add", "alice", "--full-name", "Alice", "--role", "qa", "--history", str(path), "--password-env", "PW")[0] == 0, "not a context word by default"
    with pytest.raises(WeakPasswordError, match="password rule: reused"):
        _run("users", "passwd", "alice", "--history", str(path), "--password-env", "PW")
    assert _run("users", "list", "--history", str(path), "--password-policy", str(policy)) == (0, "alice  qa        active    Alice\n")
    db = sqlite3.connect(path)
    db.execute("UPDATE users SET password_changed_utc = '2020-01-01T00:00:00+00:00'")
    db.commit()
    db.close()
    assert _run("users", "list", "--history", str(path), "--password-policy", str(policy)) == (0, "alice  qa        expired   Alice\n")
    assert _run("users", "list", "--history", str(path)) == (0, "alice  qa        active    Alice\n"), "no ageing without a policy that sets it"
    policy.write_text("max_age_days: -1\n")
    with pytest.raises(ConfigError, match="password-policy.yaml: max_age_days"):
        _run("users", "list", "--history", str(path), "--password-policy", str(policy))


def test_a_printed_name_that_reads_as_another_users_is_refused(tmp_path):
    """helper-24: two users could sign with the same printed name (case, spaces, full-width letters), so a signature would not say who signed."""
    from argon2 import PasswordHasher

    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    with UserStore(tmp_path / "h.sqlite", password_hasher=cheap) as store:
        store.add_user("amartin", full_name="Alice Martin", role="operator", password="correct horse battery")
        for same in ("alice martin", "Alice  Martin ", "Ａｌｉｃｅ Martin"):
            with pytest.raises(InvalidUserError, match="reads as user 'amartin'"):
                store.add_user("alice2", full_name=same, role="operator", password="correct horse battery")
        assert store.add_user("alice2", full_name="Alice B. Martin", role="operator", password="correct horse battery").full_name == "Alice B. Martin"
