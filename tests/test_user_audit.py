"""Every user change, login, failed login, session start, logout and expiry is an audit record; user_store_problems names rows no record accounts for."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from interfaces.audit import AuditError, AuditTrail
from interfaces.passwords import PasswordPolicy
from interfaces.users import LoginPurpose, Role, UnknownUserError, UserStore, UserStoreError, session_row_digest, user_row_digest, user_store_problems

DAY_S = 86400.0
PASSWORD = "correct horse battery"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "history.sqlite"


@pytest.fixture
def trail(path: Path) -> Iterator[AuditTrail]:
    with AuditTrail(path) as audit:
        yield audit


@pytest.fixture
def store(path: Path, trail: AuditTrail, clock: Clock) -> Iterator[UserStore]:
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    policy = PasswordPolicy(lock_after_inactive_days=30)
    with UserStore(path, audit=trail, actor="admin-cli", clock=clock, password_hasher=cheap, policy=policy) as users:
        yield users


def _events(trail: AuditTrail) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.subject) for r in trail.records()]


def _sql(path: Path, statement: str, parameters: tuple[Any, ...] = ()) -> None:
    db = sqlite3.connect(path)
    db.execute(statement, parameters)
    db.commit()
    db.close()


def _row(path: Path, table: str, where: str, parameters: tuple[Any, ...]) -> Mapping[str, Any]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    row = db.execute(f"SELECT * FROM {table} WHERE {where}", parameters).fetchone()
    db.close()
    return dict(row)


@pytest.mark.security
def test_every_change_login_failure_logout_and_expiry_is_recorded_in_order(store, trail, clock, path):
    alice = store.add_user("alice", full_name="Alice Martin", role=Role.OPERATOR, password=PASSWORD)
    assert store.authenticate("alice", "not her password") is None
    assert store.authenticate("nobody", PASSWORD) is None
    assert store.authenticate("alice", PASSWORD) == alice
    first = store.create_session(alice)
    store.end_session(first)
    second = store.create_session(alice)
    clock.now_s += 901.0
    assert store.session_user(second) is None  # idle
    third = store.create_session(alice)
    fourth = store.create_session(alice)
    clock.now_s += 800.0
    assert store.session_user(fourth) == alice
    clock.now_s += 200.0  # the third: idle for 1000 s, found when the next session opens
    fifth = store.create_session(alice)
    store.set_role("alice", Role.ENGINEER)
    store.set_password("alice", "another long passphrase")  # ends the fourth and fifth
    assert store.authenticate("alice", "another long passphrase", purpose=LoginPurpose.SIGNATURE) is not None
    clock.now_s += 31 * DAY_S
    assert store.authenticate("alice", "another long passphrase") is None  # locks: unused for 31 days
    store.disable("alice")
    assert _events(trail) == [
        ("admin-cli", "user_added", "user alice"),
        ("admin-cli", "login_failed", "user alice"),
        ("admin-cli", "login_failed", "user nobody"),
        ("alice", "login", "user alice"),
        ("alice", "session_started", "user alice"),
        ("alice", "logout", "user alice"),
        ("alice", "session_started", "user alice"),
        ("admin-cli", "session_expired", "user alice"),
        ("alice", "session_started", "user alice"),
        ("alice", "session_started", "user alice"),
        ("admin-cli", "session_expired", "user alice"),
        ("alice", "session_started", "user alice"),
        ("admin-cli", "role_changed", "user alice"),
        ("admin-cli", "password_changed", "user alice"),
        ("admin-cli", "user_locked", "user alice"),
        ("admin-cli", "login_failed", "user alice"),
        ("admin-cli", "user_disabled", "user alice"),
    ]
    records = trail.records()
    failures = [r.details for r in records if r.action == "login_failed"]
    assert [(d["name"], d["reason"], d["purpose"]) for d in failures] == [
        ("alice", "wrong_password", "session"),
        ("nobody", "unknown_user", "session"),
        ("alice", "locked", "session"),
    ]
    expiries = [r.details["reason"] for r in records if r.action == "session_expired"]
    assert expiries == ["idle", "idle"]
    assert records[12].details["from"] == "operator" and records[12].details["to"] == "engineer"
    assert records[13].details["sessions_ended"] == 2 and records[14].details["reason"] == "inactive"
    text = "".join(str(r.details) for r in records)
    for secret in (PASSWORD, "another long passphrase", "not her password", first, second, third, fourth, fifth):
        assert secret not in text
    for token in (first, second, third, fourth, fifth):
        assert hashlib.sha256(token.encode()).hexdigest() not in text, "not even the token's SHA-256, the key of its row"
    stored_hash = _row(path, "users", "name = ?", ("alice",))["password_hash"]
    assert stored_hash not in text
    assert records[-1].details["user"] == user_row_digest(_row(path, "users", "name = ?", ("alice",)))
    assert user_store_problems(path, records) == []


@pytest.mark.security
def test_each_session_record_carries_its_rows_digest(store, trail, path):
    alice = store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
    token = store.create_session(alice)
    row = _row(path, "sessions", "token_sha256 = ?", (hashlib.sha256(token.encode()).hexdigest(),))
    started = trail.records(action="session_started")[-1]
    assert started.details["session"] == session_row_digest(row)
    store.end_session(token)
    assert trail.records(action="logout")[-1].details["session"] == session_row_digest(row)


@pytest.mark.security
def test_a_login_whose_record_cannot_be_written_is_refused(store, trail, monkeypatch):
    alice = store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)

    def fail(self: AuditTrail, **record: Any) -> None:
        raise AuditError(f"{self.path}: cannot write the audit record: disk I/O error")

    monkeypatch.setattr(AuditTrail, "append", fail)
    with pytest.raises(AuditError, match="disk I/O error"):
        store.authenticate("alice", PASSWORD)
    with pytest.raises(AuditError, match="disk I/O error"):
        store.create_session(alice)
    with pytest.raises(AuditError, match="disk I/O error"):
        store.set_role("alice", Role.ENGINEER)
    monkeypatch.undo()
    assert store.user("alice") == alice, "nothing changed"
    assert store.authenticate("alice", PASSWORD) == alice


def test_a_change_whose_row_moved_under_it_is_refused_and_recorded(store, trail, path, monkeypatch):
    store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
    real_append = AuditTrail.append

    def append_then_edit(self: AuditTrail, **record: Any) -> Any:
        written = real_append(self, **record)
        if record["action"] == "role_changed":
            _sql(path, "UPDATE users SET disabled = 1 WHERE name = 'alice'")  # between the record and the change
        return written

    monkeypatch.setattr(AuditTrail, "append", append_then_edit)
    with pytest.raises(UserStoreError, match="cannot role changed for user 'alice': the user's row changed between reading and writing it"):
        store.set_role("alice", Role.ENGINEER)
    assert [r.action for r in trail.records()][-2:] == ["role_changed", "user_change_failed"]
    assert store.user("alice").role is Role.OPERATOR
    problems = user_store_problems(path, trail.records())
    assert problems == [f"user 'alice' (operator, disabled): the row differs from the one recorded at seq {trail.head().seq}: changed outside bioreactor-mpc"]


# --------------------------------------------------------------------------- the cross-check


def _forge_user(path: Path, name: str, role: str, password: str) -> None:
    password_hash = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(password)
    _sql(
        path,
        "INSERT INTO users (name, full_name, role, password_hash, disabled, created_utc, password_changed_utc) VALUES (?, ?, ?, ?, 0, '2027-01-01T00:00:00+00:00', '2027-01-01T00:00:00+00:00')",
        (name, name.title(), role, password_hash),
    )


@pytest.mark.security
def test_an_engineer_inserted_into_the_file_is_found(store, trail, path):
    store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
    assert user_store_problems(path, trail.records()) == []
    _forge_user(path, "mallory", "engineer", "mallory's own password")
    assert store.authenticate("mallory", "mallory's own password") is not None, "the store alone lets the inserted account in"
    assert user_store_problems(path, trail.records()) == [
        f"seq {trail.head().seq}: login of user 'mallory', who no earlier record adds",
        "user 'mallory' (engineer): no audit record adds this user: a row inserted outside bioreactor-mpc",
    ]


@pytest.mark.security
def test_a_forged_session_row_is_found(store, trail, path, clock):
    alice = store.add_user("alice", full_name="Alice", role=Role.ENGINEER, password=PASSWORD)
    token = store.create_session(alice)
    assert user_store_problems(path, trail.records()) == []
    forged = secrets.token_urlsafe(32)
    _sql(
        path,
        "INSERT INTO sessions (token_sha256, user_name, created_utc, created_s, last_seen_s, expires_s) VALUES (?, 'alice', '2027-01-15T08:00:00+00:00', ?, ?, ?)",
        (hashlib.sha256(forged.encode()).hexdigest(), clock.now_s, clock.now_s, clock.now_s + 8 * 3600.0),
    )
    assert store.session_user(forged) == alice, "the store alone lets the forged session in"
    assert user_store_problems(path, trail.records()) == ["session of 'alice' started 2027-01-15T08:00:00+00:00: no audit record started it: a row forged outside bioreactor-mpc"]
    _sql(path, "UPDATE sessions SET expires_s = expires_s + 86400 WHERE token_sha256 = ?", (hashlib.sha256(token.encode()).hexdigest(),))
    assert len(user_store_problems(path, trail.records())) == 2, "a real session made to live longer is found too"


@pytest.mark.security
def test_an_ended_session_brought_back_is_found(store, trail, path):
    alice = store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
    token = store.create_session(alice)
    row = _row(path, "sessions", "token_sha256 = ?", (hashlib.sha256(token.encode()).hexdigest(),))
    store.end_session(token)
    _sql(path, f"INSERT INTO sessions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    logout = trail.records(action="logout")[-1].seq
    assert user_store_problems(path, trail.records()) == [f"session of 'alice' started {row['created_utc']}: ended at seq {logout}, yet its row is back in the sessions table"]


@pytest.mark.security
@pytest.mark.parametrize(
    ("edit", "found"),
    [
        ("UPDATE users SET role = 'engineer' WHERE name = 'alice'", "user 'alice' (engineer): the row differs from the one recorded at seq 1: changed outside bioreactor-mpc"),
        ("UPDATE users SET disabled = 0 WHERE name = 'bob'", "user 'bob' (operator): the row differs from the one recorded at seq 3: changed outside bioreactor-mpc"),
        ("UPDATE users SET password_hash = (SELECT password_hash FROM users WHERE name = 'alice') WHERE name = 'bob'", "user 'bob' (operator, disabled): the row differs"),
        ("DELETE FROM users WHERE name = 'bob'", "user 'bob': recorded at seq 3 but missing from the users table: deleted outside bioreactor-mpc"),
        ("DROP TABLE users", "user 'alice': recorded at seq 1 but missing from the users table"),
    ],
)
def test_a_user_row_changed_or_deleted_in_the_file_is_found(store, trail, path, edit, found):
    store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
    store.add_user("bob", full_name="Bob", role=Role.OPERATOR, password=PASSWORD)
    store.disable("bob")  # enabling him again in the file brings back a state that was recorded once: still found
    assert [r.seq for r in trail.records()] == [1, 2, 3]
    assert user_store_problems(path, trail.records()) == []
    _sql(path, edit)
    problems = user_store_problems(path, trail.records())
    assert len(problems) >= 1 and problems[0].startswith(found)


@pytest.mark.security
def test_a_recorded_change_does_not_launder_an_earlier_edit(store, trail, path):
    store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
    _sql(path, "UPDATE users SET role = 'engineer' WHERE name = 'alice'")
    store.set_password("alice", "another long passphrase")  # records the row it found, and the row it started from
    assert user_store_problems(path, trail.records()) == [
        "seq 2: password_changed of user 'alice' found a row no earlier record accounts for: changed outside bioreactor-mpc after seq 1"
    ]


def test_users_added_before_records_carried_digests_are_named_until_a_change_records_them(tmp_path):
    path = tmp_path / "history.sqlite"
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    with UserStore(path, password_hasher=cheap) as users, AuditTrail(path) as trail:  # as the admin command did before
        trail.append(actor="admin-cli", action="user_added", subject="user alice", details={"name": "alice", "full_name": "Alice", "role": "operator"})
        users.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
        assert user_store_problems(path, trail.records()) == [
            "user 'alice' (operator): added at seq 1 by a record without the row's digest (written before records carried them); "
            "a new password or role set with bioreactor-mpc users records the row"
        ]
    with AuditTrail(path) as trail, UserStore(path, audit=trail, password_hasher=cheap) as users:
        users.set_password("alice", "another long passphrase")
        assert user_store_problems(path, trail.records()) == []


def test_the_cross_check_names_a_missing_file(tmp_path):
    with pytest.raises(UserStoreError, match="nowhere.sqlite: no such history file"):
        user_store_problems(tmp_path / "nowhere.sqlite", [])


def test_a_history_without_users_has_nothing_to_account_for(tmp_path, trail, path):
    trail.append(actor="runtime", action="state_changed", subject="runtime", details={"to": "advisory"})
    assert user_store_problems(path, trail.records()) == []


def test_a_session_whose_user_was_disabled_meanwhile_is_refused_and_recorded(store, trail, path, monkeypatch):
    alice = store.add_user("alice", full_name="Alice", role=Role.OPERATOR, password=PASSWORD)
    real_append = AuditTrail.append

    def append_then_disable(self: AuditTrail, **record: Any) -> Any:
        written = real_append(self, **record)
        if record["action"] == "session_started":
            store.disable("alice")
        return written

    monkeypatch.setattr(AuditTrail, "append", append_then_disable)
    with pytest.raises(UnknownUserError, match="no active user 'alice' to open a session for"):
        store.create_session(alice)
    assert [r.action for r in trail.records()] == ["user_added", "session_started", "user_disabled", "session_start_failed"]
    started, failed = trail.records(action="session_started")[0], trail.records(action="session_start_failed")[0]
    assert failed.details["session"] == started.details["session"]
    assert user_store_problems(path, trail.records()) == []


@pytest.mark.security
def test_audit_verify_checks_the_users_and_sessions_tables(store, trail, path):
    """``bioreactor-mpc audit verify`` runs the cross-check: intact after recorded changes, not intact (exit 1, the row named) after an insert."""
    import subprocess
    import sys

    store.add_user("erik", full_name="Erik Engineer", role=Role.ENGINEER, password=PASSWORD)
    token = store.create_session(store.authenticate("erik", PASSWORD))
    store.end_session(token)
    command = [sys.executable, "-m", "bioreactor_mpc", "audit", "verify", "--history", str(path), "--without-key"]
    intact = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    _forge_user(path, "mallory", "engineer", "mallory's own password")
    forged = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert forged.returncode == 1 and "mallory" in forged.stdout and "no audit record adds this user" in forged.stdout, forged.stdout + forged.stderr
