"""The audit trail: hash-chained records in the history file; every alteration, deletion and reordering found and named; appends that cannot be written raise."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sqlite3
import threading
from enum import Enum
from pathlib import Path

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from bioreactor_mpc.admin_cli import NO_CHECKPOINTS_NOTE, AdminCommandError, add_parsers, dispatch
from interfaces.audit import GENESIS_HASH, AuditError, AuditRecord, AuditTrail
from interfaces.audit_keys import AuditKeyError, create_key_file, load_key_file
from interfaces.history import SqliteHistory

pytestmark = pytest.mark.usefixtures("uncached_logging")


class Meaning(str, Enum):
    APPROVED = "approved"


def _filled(path: Path, count: int = 5) -> list[AuditRecord]:
    with AuditTrail(path) as trail:
        return [
            trail.append(actor="runtime", action="state_changed", subject=f"cycle {i}", details={"from": "off", "to": "advisory", "i": i}, process_time_h=float(i))
            for i in range(1, count + 1)
        ]


def _raw(path: Path) -> sqlite3.Connection:
    """A connection that does what an attacker with write access could: drop the triggers and change rows."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute("DROP TRIGGER audit_head_no_delete")
    return db


def _problems(path: Path) -> list[str]:
    with AuditTrail(path) as trail:
        result = trail.verify()
    assert result.ok is (not result.problems)
    return result.problems


def _rehash(db: sqlite3.Connection, seq: int) -> None:
    """Recompute one record's hash from its (altered) content, as someone covering an alteration would."""
    row = db.execute("SELECT seq, wall_utc, process_time_h, actor, action, subject, details, prev_hash FROM audit WHERE seq = ?", (seq,)).fetchone()
    content = json.dumps([*row[:6], json.loads(row[6]), row[7]], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    db.execute("UPDATE audit SET hash = ? WHERE seq = ?", (hashlib.sha256(content.encode()).hexdigest(), seq))


def test_records_are_chained_hashed_and_readable(tmp_path):
    path = tmp_path / "history.sqlite"
    history = SqliteHistory(path)  # the history's own file, its tables beside the audit trail's
    history.start_run(batch_id="B1", requested_mode="advisory", config={})
    with AuditTrail(path) as trail:
        first = trail.append(actor="runtime", action="config_loaded", subject="runtime", details={"files": ("a.yaml", "b.yaml"), "nan": math.nan})
        second = trail.append(actor="alice", action="recommendation_approved", subject="cycle 42", details={"meaning": Meaning.APPROVED, "feed_lph": 1.5}, process_time_h=42)
        assert first.seq == 1 and first.prev_hash == GENESIS_HASH
        assert second.seq == 2 and second.prev_hash == first.hash and second.process_time_h == 42.0
        # Independently: SHA-256 over the JSON of the eight fields, sorted keys, no whitespace, NaN as null.
        expected = json.dumps(
            [1, first.wall_utc, None, "runtime", "config_loaded", "runtime", {"files": ["a.yaml", "b.yaml"], "nan": None}, "0" * 64], sort_keys=True, separators=(",", ":")
        )
        assert first.hash == hashlib.sha256(expected.encode()).hexdigest()
        assert first.wall_utc.endswith("+00:00")
        assert trail.records() == [first, second]
        assert second.details == {"meaning": "approved", "feed_lph": 1.5}
        assert trail.head() is not None and (trail.head().seq, trail.head().hash) == (2, second.hash)  # type: ignore[union-attr]
        result = trail.verify()
        assert (result.ok, result.records, result.problems) == (True, 2, [])
    history.record_alarm(1.0, "quality.PV.OUR", "Bad status", active=True)
    assert len(history.table("alarms")) == 1
    history.close()
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 2
    other.close()


def test_records_since_and_limit(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path, 6)
    with AuditTrail(path) as trail:
        assert [r.seq for r in trail.records(since_seq=2, limit=3)] == [3, 4, 5]
        assert [r.seq for r in trail.records(since_seq=5)] == [6]
        assert trail.records(since_seq=6) == []
        trail.append(actor="erik", action="model_approved", subject="model site.yaml", details={"sha256": "ab"})
        assert [(r.seq, r.actor) for r in trail.records(action="model_approved")] == [(7, "erik")]
        assert [r.seq for r in trail.records(since_seq=1, limit=2, action="state_changed")] == [2, 3]
        assert trail.records(action="user_added") == []


def test_update_and_delete_are_refused_by_the_database(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path, 2)
    db = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="append-only: UPDATE refused"):
        db.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only: DELETE refused"):
        db.execute("DELETE FROM audit WHERE seq = 2")
    with pytest.raises(sqlite3.DatabaseError, match="head cannot be deleted"):
        db.execute("DELETE FROM audit_head")
    db.close()
    assert _problems(path) == []


def test_an_altered_detail_is_found(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path)
    db = _raw(path)
    db.execute("""UPDATE audit SET details = '{"from":"off","i":3,"to":"closed_loop"}' WHERE seq = 3""")
    assert _problems(path) == ["seq 3: altered: its content does not match its hash"]


def test_an_alteration_covered_by_a_new_hash_is_found_by_the_next_record(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path)
    db = _raw(path)
    db.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 3")
    _rehash(db, 3)
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].startswith("seq 4: its prev_hash does not match the hash of seq 3")


def test_a_deleted_middle_record_is_found(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path)
    _raw(path).execute("DELETE FROM audit WHERE seq = 3")
    assert _problems(path) == ["seq 3: missing (deleted)"]


def test_deleted_last_records_are_found_by_the_head_and_stay_found_after_the_next_append(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path)
    _raw(path).execute("DELETE FROM audit WHERE seq >= 4")
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith("seq 4 to 5: missing (2 records deleted from the end: the head records seq 5, the last record is seq 3")
    # The next append continues from the head, so the deletion is not covered up by normal use.
    with capture_logs() as logs, AuditTrail(path) as trail:
        record = trail.append(actor="runtime", action="alarm_raised", subject="plc_link", details={})
    assert record.seq == 6
    assert [e["event"] for e in logs] == ["audit_chain_break"]
    assert _problems(path) == ["seq 4 to 5: missing (2 records deleted)"]


def test_a_deleted_head_is_found(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path, 3)
    _raw(path).execute("DELETE FROM audit_head")
    assert _problems(path) == ["seq 3: the head (audit_head) is missing, so deletions at the end cannot be checked"]


def test_swapped_records_are_found_as_reordered(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path)
    db = _raw(path)
    db.execute("UPDATE audit SET seq = -1 WHERE seq = 3")
    db.execute("UPDATE audit SET seq = 3 WHERE seq = 4")
    db.execute("UPDATE audit SET seq = 4 WHERE seq = -1")
    problems = _problems(path)
    assert problems[0].startswith("seq 3: out of order: it was written after the record now at seq 4, not after seq 2 (records reordered)")
    assert problems[0].endswith("altered: its content does not match its hash")
    assert problems[1].startswith("seq 4: out of order: it was written after the record now at seq 2")
    assert problems[2].startswith("seq 5: out of order")
    assert len(problems) == 3


def test_a_broken_genesis_is_found(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path, 3)
    db = _raw(path)
    db.execute("UPDATE audit SET prev_hash = ? WHERE seq = 1", ("f" * 64,))
    _rehash(db, 1)
    problems = _problems(path)
    assert problems[0] == "seq 1: broken genesis: its prev_hash is ffffffffffffffff…, the first record's must be 64 zeros"
    assert problems[1].startswith("seq 2: its prev_hash does not match the hash of seq 1")


def test_a_read_only_trail_refuses_to_append(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path, 2)
    with AuditTrail(path, read_only=True) as trail:
        assert trail.verify().ok
        with pytest.raises(AuditError, match=r"h\.sqlite: cannot write the audit record 'recommendation_approved' on 'cycle 3'.*must not go ahead"):
            trail.append(actor="alice", action="recommendation_approved", subject="cycle 3", details={})
    with AuditTrail(path) as trail:
        assert len(trail.records()) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes files whatever their mode")
def test_a_read_only_file_refuses_to_append(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path, 2)
    path.chmod(0o444)
    try:
        with pytest.raises(AuditError, match=r"h\.sqlite"):
            AuditTrail(path).append(actor="alice", action="recommendation_approved", subject="cycle 3", details={})
    finally:
        path.chmod(0o644)
    with AuditTrail(path) as trail:
        assert len(trail.records()) == 2


def test_a_database_locked_beyond_the_timeout_refuses_to_append(tmp_path):
    path = tmp_path / "h.sqlite"
    _filled(path, 2)
    trail = AuditTrail(path, timeout_s=0.1)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(AuditError, match=r"h\.sqlite: cannot write the audit record 'mode_requested' on 'mode'.*locked"):
        trail.append(actor="bob", action="mode_requested", subject="mode", details={"mode": "closed-loop"})
    other.execute("ROLLBACK")
    other.close()
    assert trail.append(actor="bob", action="mode_requested", subject="mode", details={"mode": "closed-loop"}).seq == 3
    assert trail.verify().ok
    trail.close()


def test_details_that_are_not_json_and_empty_fields_are_refused(tmp_path):
    path = tmp_path / "h.sqlite"
    with AuditTrail(path) as trail:
        with pytest.raises(AuditError, match="details: a value of type object cannot be recorded as JSON"):
            trail.append(actor="runtime", action="setpoint_write", subject="SP.*", details={"when": object()})
        with pytest.raises(AuditError, match="the actor is empty"):
            trail.append(actor=" ", action="setpoint_write", subject="SP.*", details={})
        assert trail.records() == [] and trail.head() is None


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "not-a-db.sqlite"
    path.write_text("hello, this is not SQLite" * 100)
    with pytest.raises(AuditError, match="not-a-db.sqlite: cannot open the audit trail"):
        AuditTrail(path)
    with pytest.raises(AuditError, match="missing.sqlite: no such history file"):
        AuditTrail(tmp_path / "missing.sqlite", read_only=True)


def test_two_writers_on_one_file_keep_one_chain(tmp_path):
    path = tmp_path / "h.sqlite"
    trails = [AuditTrail(path), AuditTrail(path)]

    def write(trail: AuditTrail, actor: str) -> None:
        for i in range(40):
            trail.append(actor=actor, action="alarm_raised", subject=f"alarm {i}", details={"i": i})

    threads = [threading.Thread(target=write, args=(trail, f"writer{n}")) for n, trail in enumerate(trails)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    result = trails[0].verify()
    assert (result.ok, result.records) == (True, 80)
    assert [r.seq for r in trails[1].records()] == list(range(1, 81))
    for trail in trails:
        trail.close()


def test_the_head_is_logged_every_n_records(tmp_path):
    with capture_logs() as logs, AuditTrail(tmp_path / "h.sqlite", head_log_every=2) as trail:
        records = [trail.append(actor="runtime", action="alarm_cleared", subject="x", details={}) for _ in range(5)]
    heads = [(e["seq"], e["hash"]) for e in logs if e["event"] == "audit_head"]
    assert heads == [(2, records[1].hash), (4, records[3].hash)]


# --------------------------------------------------------------------------- audit verify


def _run(*argv: str) -> tuple[int | None, str]:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    status = dispatch(parser.parse_args(argv), Console(file=out, width=80))
    return status, out.getvalue()


def test_audit_verify_exits_0_when_intact_and_1_with_each_problem_on_a_line(tmp_path):
    path = tmp_path / "h.sqlite"
    records = _filled(path)
    status, out = _run("audit", "verify", "--history", str(path), "--without-key")
    assert status == 0
    assert out.splitlines()[0] == f"{path}: audit trail intact: 5 records, WITHOUT the key: MACs not checked; head seq 5, sha256 {records[-1].hash}"
    assert out.splitlines()[1:] == [
        "note: seq 1 to 5: no record carries a MAC (written without an audit key): whoever can write the file could have rewritten them",
        f"note: {NO_CHECKPOINTS_NOTE}",
    ]
    db = _raw(path)
    db.execute("DELETE FROM audit WHERE seq = 2")
    db.execute("UPDATE audit SET subject = 'cycle 9' WHERE seq = 4")
    status, out = _run("audit", "verify", "--history", str(path), "--without-key")
    assert status == 1
    assert out.splitlines()[1:3] == ["seq 2: missing (deleted)", "seq 4: altered: its content does not match its hash"]
    assert out.splitlines()[0].startswith(f"{path}: audit trail NOT intact: 2 problems in 4 records")


def test_audit_verify_needs_a_key_or_says_it_goes_without(tmp_path, monkeypatch):
    path = tmp_path / "h.sqlite"
    _filled(path, 2)
    monkeypatch.delenv("BIOREACTOR_MPC_AUDIT_KEY", raising=False)
    with pytest.raises(AdminCommandError, match="no audit key to check the MACs with: give --key FILE or --key DIR .* or --without-key"):
        _run("audit", "verify", "--history", str(path))
    with pytest.raises(AdminCommandError, match="--key and --without-key"):
        _run("audit", "verify", "--history", str(path), "--without-key", "--key", str(tmp_path))


def test_audit_verify_of_a_history_without_audit_records_or_no_file(tmp_path):
    path = tmp_path / "h.sqlite"
    SqliteHistory(path).close()
    assert _run("audit", "verify", "--history", str(path), "--without-key") == (0, f"{path}: no audit records\nnote: {NO_CHECKPOINTS_NOTE}\n")
    with pytest.raises(AdminCommandError, match="missing.sqlite: no such history file"):
        _run("audit", "verify", "--history", str(tmp_path / "missing.sqlite"), "--without-key")
    assert not (tmp_path / "missing.sqlite").exists()


def test_dispatch_leaves_other_commands_alone():
    assert dispatch(argparse.Namespace(command="simulate"), Console(file=io.StringIO())) is None


def test_audit_key_create_rotate_checkpoint_and_verify_with_a_key_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("BIOREACTOR_MPC_AUDIT_KEY", raising=False)
    keys, path, offsite = tmp_path / "etc" / "keys", tmp_path / "var" / "h.sqlite", tmp_path / "offsite" / "cp.jsonl"
    status, out = _run("audit", "key", "create", str(keys / "audit.key"))
    first = load_key_file(keys / "audit.key")
    assert status == 0 and out.startswith(f"created audit key {first.key_id} in {keys / 'audit.key'} (mode 0600)")
    with pytest.raises(AuditKeyError, match="a file exists there already"):
        _run("audit", "key", "create", str(keys / "audit.key"))
    with AuditTrail(path, key=first) as trail:
        trail.append(actor="erik", action="model_approved", subject="model site.yaml", details={"sha256": "ab" * 32, "file": "/etc/site.yaml"})
    status, out = _run("audit", "checkpoint", "--history", str(path), "--to", str(offsite), "--audit-key", str(keys / "audit.key"))
    assert status == 0 and out.startswith(f"{path}: checkpoint of seq 2 (sha256 ")
    status, out = _run("audit", "key", "rotate", "--key", str(keys / "audit.key"), "--history", str(path))
    second = load_key_file(keys / "audit.key")
    assert status == 0 and f"{first.key_id} -> {second.key_id} (audit record 3)" in out
    # The approval MAC'd by the retired key: a runtime with the new key refuses its model at start, so the rotation says so now.
    assert f"1 model approval(s) were MAC'd by the retired key {first.key_id}" in out
    assert f"/etc/site.yaml (sha256 {'ab' * 32}, approved by erik, audit record 1)" in out
    assert load_key_file(keys / f"{first.key_id}.key").key_id == first.key_id, "the old key kept beside the new"
    assert not (keys / "audit.key.new").exists()
    (keys / "audit.key.new").write_text("left by a crash")
    with pytest.raises(AdminCommandError, match=r"audit\.key\.new: left by a rotation that did not finish"):
        _run("audit", "key", "rotate", "--key", str(keys / "audit.key"), "--history", str(path))
    (keys / "audit.key.new").unlink()
    with AuditTrail(path, key=second) as trail:
        trail.append(actor="runtime", action="alarm_raised", subject="x", details={})
    status, out = _run("audit", "verify", "--history", str(path), "--key", str(keys), "--checkpoints", str(offsite))
    assert status == 0, out
    assert out.splitlines()[0].startswith(f"{path}: audit trail intact: 4 records, MACs checked with key ")
    assert out.splitlines()[1:] == ["note: 1 checkpoints of h.sqlite compared, up to seq 2"]
    status, out = _run("audit", "verify", "--history", str(path), "--key", str(keys / "audit.key"))
    assert status == 1
    assert out.splitlines()[1].startswith(f"seq 1 to 3: MAC not checked: key {first.key_id} is not among the keys given")
    monkeypatch.setenv("BIOREACTOR_MPC_AUDIT_KEY", str(keys))
    assert _run("audit", "verify", "--history", str(path))[0] == 0, "the key directory from the environment"


def test_audit_key_replace_starts_a_new_key_after_a_lost_one(tmp_path, monkeypatch):
    monkeypatch.delenv("BIOREACTOR_MPC_AUDIT_KEY", raising=False)
    lost = create_key_file(tmp_path / "lost" / "audit.key")
    path = tmp_path / "h.sqlite"
    with AuditTrail(path, key=lost) as trail:
        trail.append(actor="runtime", action="config_loaded", subject="B1", details={})
    status, out = _run("audit", "key", "replace", "--key", str(tmp_path / "new" / "audit.key"), "--history", str(path), "--reason", "disk failed, no backup")
    new = load_key_file(tmp_path / "new" / "audit.key")
    assert status == 0 and out.startswith(f"{path}: the audit key {lost.key_id} replaced by {new.key_id} (audit record 2)")
    status, out = _run("audit", "verify", "--history", str(path), "--key", str(tmp_path / "new"))
    assert status == 1, "the lost key's records cannot be checked without it, and the verdict says so"
    assert f"seq 1: MAC not checked: key {lost.key_id} is not among the keys given" in out
    status, out = _run("audit", "verify", "--history", str(path), "--key", str(tmp_path / "new"), "--key", str(tmp_path / "lost"))
    assert status == 0 and f"note: seq 2: the audit key {lost.key_id} was replaced by {new.key_id} without it (reason: disk failed, no backup)" in out
    with pytest.raises(AdminCommandError, match="--reason: say what happened to the old key"):
        _run("audit", "key", "replace", "--key", str(tmp_path / "new" / "audit.key"), "--history", str(path), "--reason", " ")


def test_audit_verify_fails_when_the_trail_of_a_history_with_runs_is_gone(tmp_path):
    path = tmp_path / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="advisory", config={})
    history.close()
    _filled(path, 2)
    db = _raw(path)
    db.execute("DROP TABLE audit")
    db.execute("DROP TABLE audit_head")
    status, out = _run("audit", "verify", "--history", str(path), "--without-key")
    assert status == 1
    assert out.splitlines()[1] == "the audit trail is missing (no audit table), but the history holds 1 runs: its records were deleted"
