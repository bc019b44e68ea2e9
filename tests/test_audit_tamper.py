"""Tampering with a key-bound audit trail and its process history: every attempt of the issue 15 probe, and more, is found and named.

Each test builds the same small keyed site (a history written by
``SqliteHistory`` and ``AuditTrail`` with an audit key, checkpoints exported
to a file elsewhere), attacks the file as someone who can write it but does
not hold the key would (with SQLite, triggers dropped, hashes recomputed with
the public formula), and runs the verification an auditor runs.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.ports import CycleRecord, Reading
from controller.types import LabResult
from interfaces.audit import DEFAULT_CHECKERS, GENESIS_HASH, AuditError, AuditTrail, AuditVerification, checkpoints_checker, record_hash
from interfaces.audit_export import FileSink, read_checkpoints
from interfaces.audit_keys import AuditKey, AuditKeyError, create_key_file, generate_key, load_key_file, load_keys
from interfaces.history import SqliteHistory

pytestmark = [pytest.mark.usefixtures("uncached_logging"), pytest.mark.security]

CYCLES = 8


@dataclass(frozen=True)
class Site:
    path: Path
    key: AuditKey
    key_dir: Path
    checkpoints: Path


def _cycle(t_h: float) -> CycleRecord:
    return CycleRecord(
        process_time_h=t_h,
        state="closed_loop",
        reason="ok",
        source="mpc",
        requested={"feed_rate_lph": t_h},
        applied={"feed_rate_lph": t_h},
        adjustments=(),
        harvest_time_h=336.0,
        predicted_titer_g_per_l=math.nan,
        predicted_score_g_per_day=500.0,
        solve_time_s=0.05,
        estimate={"state": {"glucose": 5.0}},
        wrote_setpoints=True,
    )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A batch of :data:`CYCLES` cycles: scans, lab results, writes (one pending across a checkpoint), alarms, audit records; checkpoints every 2 cycles and at shutdown."""
    key_dir = tmp_path / "etc" / "audit-keys"
    key = create_key_file(key_dir / "audit.key")
    checkpoints = tmp_path / "offsite" / "checkpoints.jsonl"
    path = tmp_path / "var" / "history.sqlite"
    trail = AuditTrail(path, key=key, sinks=[FileSink(checkpoints)], checkpoint_every=12)
    history = SqliteHistory(path, mac_key=key, checkpoint=lambda: trail.checkpoint("every 2 cycles"), checkpoint_every_cycles=2)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={"x": 1})
    trail.append(actor="runtime", action="config_loaded", subject="B1", details={"files": ["a.yaml"]})
    pending = None
    for i in range(1, CYCLES + 1):
        t_h = float(i)
        now = datetime(2026, 12, 1, tzinfo=UTC)
        history.record_scan(t_h, {"PV.Volume": Reading(1400.0 + i, True, now), "Status.BatchId": Reading("B1", True, None)}, {})
        if i % 3 == 0:
            history.record_lab(t_h, LabResult(i, t_h - 0.5, 1.0 + i, 97.0, 4.0, 0.2, 6.0, 0.5, 0.1 * i, 300.0), used=True)
        trail.append(actor="runtime", action="setpoint_write", subject="SP.*", details={"feed_rate_lph": t_h}, process_time_h=t_h)
        write_id = history.record_write_intent(t_h, {"SP.FeedRate": t_h})
        if i == 3:
            pending = write_id  # its outcome comes two cycles (a checkpoint) later
        else:
            history.record_write_outcome(write_id, "ok")
        if i == 5 and pending is not None:
            history.record_write_outcome(pending, "link_error", "timed out")
        trail.append(actor="runtime", action="setpoint_write_result", subject="SP.*", details={"outcome": "ok"}, process_time_h=t_h)
        if i == 4:
            history.record_alarm(t_h, "quality.PV.OUR", "Bad status", active=True)
            history.record_state_change(t_h, "closed_loop", "held", "bad data")
            trail.append(actor="alice", action="recommendation_approved", subject="recommendation made at 4.00 h", details={"signature": {"reason": "as planned"}})
        history.commit_cycle(_cycle(t_h), None)
    history.end_run(reason="harvested")
    history.close()
    trail.close()  # the shutdown checkpoint
    return Site(path, key, key_dir, checkpoints)


def _verify(site: Site, *, keys: bool = True, checkpoints: bool = True) -> AuditVerification:
    checkers = list(DEFAULT_CHECKERS)
    if checkpoints:
        read, damaged = read_checkpoints(site.checkpoints)
        checkers.append(checkpoints_checker(read, damaged))
    with AuditTrail(site.path, read_only=True) as trail:
        return trail.verify(keys=load_keys([site.key_dir]) if keys else None, checkers=checkers)


def _raw(path: Path) -> sqlite3.Connection:
    """What an attacker with write access does first: open the file and drop the triggers."""
    db = sqlite3.connect(path, isolation_level=None)
    for trigger in ("audit_no_update", "audit_no_delete", "audit_head_no_delete"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    return db


def _rechain(db: sqlite3.Connection) -> None:
    """Recompute every record's hash and prev_hash, and the head, with the public formula: a chain that verifies by itself."""
    previous = GENESIS_HASH
    rows = db.execute("SELECT seq, wall_utc, process_time_h, actor, action, subject, details FROM audit ORDER BY seq").fetchall()
    for seq, wall_utc, time_h, actor, action, subject, details in rows:
        digest = record_hash(seq, wall_utc, time_h, actor, action, subject, json.loads(details), previous)
        db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (previous, digest, seq))
        previous = digest
    last = rows[-1][0] if rows else 0
    db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (last, previous))


def _seq_of(site: Site, action: str) -> int:
    with AuditTrail(site.path, read_only=True) as trail:
        return trail.records(action=action)[0].seq


def test_the_site_verifies_intact_with_its_key_and_checkpoints(site):
    result = _verify(site)
    assert result.problems == []
    assert result.ok and result.records > CYCLES * 2
    assert result.notes == [f"{_count_checkpoints(site)} checkpoints of history.sqlite compared, up to seq {result.records}"], "the shutdown checkpoint is the last record"
    with AuditTrail(site.path, read_only=True) as trail:
        records = trail.records()
    assert all(r.key_id == site.key.key_id and r.mac for r in records), "every record MAC'd"
    db = sqlite3.connect(site.path)
    for table in ("runs", "readings", "lab_results", "cycles", "writes", "state_changes", "alarms"):
        macs = [row[0] for row in db.execute(f"SELECT audit_mac FROM {table}")]
        assert macs and all(m.startswith(site.key.key_id + ":") for m in macs), table
    db.close()


def _count_checkpoints(site: Site) -> int:
    return len(site.checkpoints.read_text().splitlines())


# --------------------------------------------------------------------------- the audit records


def _edit_detail(site: Site) -> None:
    _raw(site.path).execute("""UPDATE audit SET details = '{"feed_rate_lph":9.0}' WHERE seq = 5""")


def _edit_and_rechain(site: Site) -> None:
    db = _raw(site.path)
    db.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 5")
    _rechain(db)


def _delete_middle(site: Site) -> None:
    _raw(site.path).execute("DELETE FROM audit WHERE seq = 5")


def _delete_and_renumber(site: Site) -> None:
    db = _raw(site.path)
    db.execute("DELETE FROM audit WHERE seq = 5")
    db.execute("UPDATE audit SET seq = seq - 1 WHERE seq > 5")
    _rechain(db)


def _swap(site: Site) -> None:
    db = _raw(site.path)
    db.execute("UPDATE audit SET seq = -1 WHERE seq = 5")
    db.execute("UPDATE audit SET seq = 5 WHERE seq = 6")
    db.execute("UPDATE audit SET seq = 6 WHERE seq = -1")


def _truncate_and_rewind(site: Site) -> None:
    db = _raw(site.path)
    db.execute("DELETE FROM audit WHERE seq > 10")
    _rechain(db)


def _forge_from_scratch(site: Site) -> None:
    """A whole new trail, consistent in itself, written without the key (MACs stripped: the attacker has none)."""
    db = _raw(site.path)
    db.execute("UPDATE audit SET key_id = NULL, mac = NULL, actor = 'runtime'")
    db.execute("DELETE FROM audit WHERE action = 'recommendation_approved'")
    db.execute("CREATE TEMP TABLE renumbered AS SELECT seq AS old, ROW_NUMBER() OVER (ORDER BY seq) AS new FROM audit")
    db.execute("UPDATE audit SET seq = -(SELECT new FROM renumbered WHERE old = audit.seq)")
    db.execute("UPDATE audit SET seq = -seq")
    _rechain(db)


def _forge_with_own_key(site: Site) -> None:
    """A forged record MAC'd with a key the attacker made: its key id is not among the auditor's keys."""
    own = generate_key()
    db = _raw(site.path)
    row = db.execute("SELECT seq, wall_utc, process_time_h, actor, action, subject, details FROM audit WHERE seq = 5").fetchone()
    details = {"feed_rate_lph": 0.0}
    from interfaces.audit import record_mac_content

    mac = own.mac("audit-record", record_mac_content(row[0], row[1], row[2], "mallory", row[4], row[5], details, own.key_id))
    db.execute("UPDATE audit SET actor = 'mallory', details = ?, key_id = ?, mac = ? WHERE seq = 5", (json.dumps(details), own.key_id, mac))
    _rechain(db)


def _append_without_key(site: Site) -> None:
    db = _raw(site.path)
    last_seq, last_hash = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, wall = last_seq + 1, "2026-12-02T00:00:00+00:00"
    digest = record_hash(seq, wall, None, "erik", "model_approved", "model x.yaml", {"sha256": "ab"}, last_hash)
    db.execute(
        "INSERT INTO audit (seq, wall_utc, process_time_h, actor, action, subject, details, prev_hash, hash) VALUES (?, ?, NULL, 'erik', 'model_approved', 'model x.yaml', ?, ?, ?)",
        (seq, wall, json.dumps({"sha256": "ab"}), last_hash, digest),
    )
    db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))


def _strip_macs(site: Site) -> None:
    _raw(site.path).execute("UPDATE audit SET key_id = NULL, mac = NULL")


def _drop_tables(site: Site) -> None:
    db = _raw(site.path)
    db.execute("DROP TABLE audit")
    db.execute("DROP TABLE audit_head")


def _empty_tables(site: Site) -> None:
    db = _raw(site.path)
    db.execute("DELETE FROM audit")
    db.execute("DELETE FROM audit_head")


def _delete_head(site: Site) -> None:
    db = _raw(site.path)
    db.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    db.execute("DELETE FROM audit_head")


# --------------------------------------------------------------------------- the process history


def _edit_cycle(site: Site) -> None:
    sqlite3.connect(site.path, isolation_level=None).execute("UPDATE cycles SET state = 'advisory' WHERE id = 3")


def _edit_write(site: Site) -> None:
    sqlite3.connect(site.path, isolation_level=None).execute("UPDATE writes SET outcome = 'ok', detail = '' WHERE id = 3")


def _edit_reading(site: Site) -> None:
    sqlite3.connect(site.path, isolation_level=None).execute("UPDATE readings SET value = 9999.0 WHERE rowid = 5")


def _edit_lab(site: Site) -> None:
    sqlite3.connect(site.path, isolation_level=None).execute("UPDATE lab_results SET glucose_g_per_l = 0.1 WHERE rowid = 1")


def _delete_reading(site: Site) -> None:
    sqlite3.connect(site.path, isolation_level=None).execute("DELETE FROM readings WHERE rowid = 7")


def _delete_last_cycles(site: Site) -> None:
    sqlite3.connect(site.path, isolation_level=None).execute(f"DELETE FROM cycles WHERE id > {CYCLES - 2}")


def _insert_reading(site: Site) -> None:
    db = sqlite3.connect(site.path, isolation_level=None)
    mac = db.execute("SELECT audit_mac FROM readings WHERE rowid = 1").fetchone()[0]  # a valid MAC, of another row
    db.execute("INSERT INTO readings (run_id, process_time_h, signal, value, good, audit_mac) VALUES (1, 8.5, 'PV.Volume', 1500.0, 1, ?)", (mac,))


def _insert_alarm_without_mac(site: Site) -> None:
    sqlite3.connect(site.path, isolation_level=None).execute("INSERT INTO alarms (run_id, process_time_h, wall_utc, code, message, active) VALUES (1, 8.5, 'x', 'fake', 'fake', 0)")


ATTACKS: list[tuple[str, Callable[[Site], None], list[str]]] = [
    ("a detail edited", _edit_detail, ["seq 5: altered: its content does not match its hash", "seq 5: altered: its MAC does not match"]),
    ("a record edited and the chain recomputed", _edit_and_rechain, ["seq 5: altered: its MAC does not match", "records 1–6 altered or replaced: the checkpoint at seq 6"]),
    ("a record deleted", _delete_middle, ["seq 5: missing (deleted)"]),
    (
        "a record deleted and the rest renumbered and rechained",
        _delete_and_renumber,
        ["altered: its MAC does not match (changed, or renumbered", "is beyond the history's last record"],
    ),
    ("two records swapped", _swap, ["seq 5: out of order", "seq 5 to 6: altered: its MAC does not match"]),
    ("the tail truncated and the head rewound", _truncate_and_rewind, ["records 11–", "missing: the checkpoint at seq", "is beyond the history's last record 10"]),
    (
        "a trail forged from scratch without the key",
        _forge_from_scratch,
        ["no record carries a MAC: the trail was written without a key, or rewritten", "altered or replaced: the checkpoint at seq"],
    ),
    ("a record forged with the attacker's own key", _forge_with_own_key, ["seq 5: MAC'd with key", "seq 5: MAC not checked: key"]),
    ("a record appended without the key", _append_without_key, [": no MAC, though the records before it have one"]),
    ("the MACs stripped", _strip_macs, ["no record carries a MAC: the trail was written without a key, or rewritten by someone without it"]),
    ("the audit tables dropped", _drop_tables, ["the audit trail is missing (no audit table), but the history holds 1 runs, 8 cycles, 8 writes: its records were deleted"]),
    ("the audit tables emptied", _empty_tables, ["the audit trail is empty, but the history holds 1 runs, 8 cycles, 8 writes: its records were deleted"]),
    ("the last record and the head deleted", _delete_head, ["the head (audit_head) is missing", "is beyond the history's last record"]),
    ("a cycle edited", _edit_cycle, ["cycles row 3: altered: its MAC does not match", "cycles rows 3–4: their content no longer gives the digest"]),
    (
        "a write's outcome edited",
        _edit_write,
        ["writes row 3: altered: its MAC does not match", "writes rows 5–6 and row 3 (final since the checkpoint before): their content no longer gives the digest"],
    ),
    ("a reading edited", _edit_reading, ["readings row 5: altered: its MAC does not match", "readings rows 5–8: their content no longer gives the digest"]),
    ("a lab result edited", _edit_lab, ["lab_results row 1: altered: its MAC does not match"]),
    ("a reading deleted", _delete_reading, ["readings row 7: deleted: a history checkpoint counted it"]),
    ("the last cycles deleted", _delete_last_cycles, [f"cycles rows {CYCLES - 1}–{CYCLES}: deleted: a history checkpoint counted it"]),
    ("a reading inserted with another row's MAC", _insert_reading, ["readings row 17: altered: its MAC does not match"]),
    ("an alarm inserted without a MAC", _insert_alarm_without_mac, ["alarms row 2: no MAC, though rows before it have one"]),
]


@pytest.mark.parametrize(("attack", "expected"), [pytest.param(a, e, id=name) for name, a, e in ATTACKS])
def test_every_tampering_is_found_and_named(site, attack, expected):
    assert _verify(site).ok, "intact before the attack"
    attack(site)
    result = _verify(site)
    assert not result.ok
    for text in expected:
        assert any(text in problem for problem in result.problems), f"{text!r} not in {result.problems}"


def test_without_the_key_the_checkpoints_and_digests_still_find_what_they_cover(site):
    _truncate_and_rewind(site)
    result = _verify(site, keys=False)
    assert not result.ok
    assert any("is beyond the history's last record 10" in p for p in result.problems)
    assert any("record MACs NOT checked: no key given" in n for n in result.notes)


def test_without_the_key_a_row_edited_inside_a_checkpoint_is_found_by_its_digest(site):
    _edit_cycle(site)
    result = _verify(site, keys=False, checkpoints=False)
    assert result.problems == ["cycles rows 3–4: their content no longer gives the digest of the history checkpoint at seq 12 (a row altered or replaced)"]
    assert "history rows' MACs NOT checked (no key given): the rows after each table's last history checkpoint are not checked at all" in result.notes


def test_without_checkpoints_a_rewound_trail_is_not_found_which_is_why_they_are_exported(site):
    _truncate_and_rewind(site)
    result = _verify(site, checkpoints=False)
    assert not any("seq" in p and "missing" in p for p in result.problems), "a rollback to an earlier, keyed state is only visible from outside"


def test_audit_verify_without_checkpoints_says_a_rewound_trail_would_pass_it(site):
    """Found by the attack review: the tail truncated and the head rewound, then every table dropped, both gave exit 0 from audit
    verify without --checkpoints, and nothing in its output said that those attacks are exactly what it did not check."""
    import argparse
    import io

    from rich.console import Console

    from bioreactor_mpc.admin_cli import NO_CHECKPOINTS_NOTE, add_parsers, dispatch

    def verify(*extra: str) -> tuple[int | None, str]:
        parser = argparse.ArgumentParser()
        add_parsers(parser.add_subparsers(dest="command", required=True))
        out = io.StringIO()
        status = dispatch(parser.parse_args(["audit", "verify", "--history", str(site.path), "--key", str(site.key_dir), *extra]), Console(file=out, width=400))
        return status, out.getvalue()

    _truncate_and_rewind(site)
    status, out = verify()
    assert status == 0
    assert f"note: {NO_CHECKPOINTS_NOTE}" in out.splitlines()
    status, out = verify("--checkpoints", str(site.checkpoints))
    assert status == 1
    assert NO_CHECKPOINTS_NOTE not in out
    db = _raw(site.path)
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        db.execute(f"DROP TABLE {table}")
    db.close()
    assert verify() == (0, f"{site.path}: no audit records\nnote: {NO_CHECKPOINTS_NOTE}\n")
    assert verify("--checkpoints", str(site.checkpoints))[0] == 1


def test_an_altered_checkpoint_line_is_found_and_not_used(site):
    lines = site.checkpoints.read_text().splitlines()
    first = json.loads(lines[0])
    first["hash"] = "f" * 64
    lines[0] = json.dumps(first)
    site.checkpoints.write_text("\n".join(lines) + "\n")
    result = _verify(site)
    assert result.problems == [f"{site.checkpoints} line 1: the checkpoint of seq {first['seq']} was altered: its MAC does not match (key {site.key.key_id}); not used"]


def test_a_damaged_checkpoint_line_and_syslog_noise(site):
    text = site.checkpoints.read_text()
    site.checkpoints.write_text("Dec  6 10:00:00 host sshd[1]: unrelated\n" + "Dec  6 10:00:01 host bioreactor-mpc: bioreactor-mpc-audit-checkpoint {broken\n" + text)
    result = _verify(site)
    assert result.problems == [f"{site.checkpoints} line 2: damaged checkpoint, not read (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]


def test_a_history_replaced_by_an_older_copy_is_found_by_the_checkpoints(site, tmp_path):
    older = tmp_path / "older.sqlite"
    db = sqlite3.connect(site.path)
    db.execute("VACUUM INTO ?", (str(older),))
    db.close()
    with AuditTrail(site.path, key=site.key, sinks=[FileSink(site.checkpoints)]) as trail:
        trail.append(actor="runtime", action="alarm_raised", subject="x", details={})
        trail.checkpoint("requested")
    for suffix in ("", "-wal", "-shm"):
        Path(str(site.path) + suffix).unlink(missing_ok=True)
    older.rename(site.path)
    result = _verify(site)
    assert any("is beyond the history's last record" in p for p in result.problems)


# --------------------------------------------------------------------------- the key


def test_a_key_file_readable_by_others_is_refused_naming_its_mode(tmp_path):
    path = tmp_path / "audit.key"
    create_key_file(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    path.chmod(0o644)
    with pytest.raises(AuditKeyError, match=rf"{path}: mode 0644: an audit key file must be readable by its owner only .*chmod 600"):
        load_key_file(path)
    path.chmod(0o640)
    with pytest.raises(AuditKeyError, match="mode 0640"):
        load_key_file(path)
    path.chmod(0o600)
    assert load_key_file(path).path == path


def test_a_key_directory_others_may_write_is_refused_so_a_planted_key_cannot_vouch_for_a_forgery(site):
    """Found by the attack review: in a key directory others could write, an attacker put a key of their own beside the site's,
    appended a key replacement naming it and a forged approval MAC'd with it, and verify --key DIR said intact (exit 0), checkpoints or not."""
    from interfaces.audit import KEY_REPLACED, record_mac_content

    site.key_dir.chmod(0o777)
    planted = create_key_file(site.key_dir / "zz-attacker.key")
    db = _raw(site.path)
    for actor, action, subject, details in [
        ("admin-cli", KEY_REPLACED, "audit key", {"lost_key_id": site.key.key_id, "to_key_id": planted.key_id, "reason": "disk failure"}),
        ("olga", "recommendation_approved", "recommendation made at 9.00 h", {"signature": {"signer": "olga", "reason": "forged"}}),
    ]:
        seq, previous = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        wall_utc = "2026-12-06T10:00:00+00:00"
        digest = record_hash(seq + 1, wall_utc, None, actor, action, subject, details, previous)
        mac = planted.mac("audit-record", record_mac_content(seq + 1, wall_utc, None, actor, action, subject, details, planted.key_id))
        db.execute(
            "INSERT INTO audit VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?)", (seq + 1, wall_utc, actor, action, subject, json.dumps(details), previous, digest, planted.key_id, mac)
        )
        db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq + 1, digest))
    db.close()
    for mode in (0o777, 0o770, 0o1777):
        site.key_dir.chmod(mode)
        with pytest.raises(AuditKeyError, match=rf"{site.key_dir}: mode {mode:04o}: the group or others may write in this audit key directory"):
            load_keys([site.key_dir])
        with pytest.raises(AuditKeyError, match="may write in this audit key directory"):
            load_key_file(site.key_dir / "audit.key")
    site.key_dir.chmod(0o700)
    (site.key_dir / "zz-attacker.key").unlink()
    result = _verify(site)
    assert not result.ok
    assert any(f"key {planted.key_id} is not among the keys given" in problem for problem in result.problems), result.problems


def test_a_key_file_is_never_overwritten_and_a_damaged_one_is_named(tmp_path):
    path = tmp_path / "k" / "audit.key"
    key = create_key_file(path)
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"
    with pytest.raises(AuditKeyError, match="a file exists there already"):
        create_key_file(path)
    content = json.loads(path.read_text())
    content["key_id"] = "0" * 16
    path.write_text(json.dumps(content))
    with pytest.raises(AuditKeyError, match="damaged audit key file: its key_id '0000000000000000' does not match its secret"):
        load_key_file(path)
    with pytest.raises(AuditKeyError, match="no such audit key file .*audit key create"):
        load_key_file(tmp_path / "missing.key")
    assert key.key_id not in repr(key.secret.hex()) and key.secret.hex() not in repr(key)


def test_a_keyed_trail_refuses_appends_without_its_key(site):
    with AuditTrail(site.path) as trail, pytest.raises(Exception, match=f"the trail is MAC'd with audit key {site.key.key_id} and no key was given"):
        trail.append(actor="bob", action="mode_requested", subject="mode", details={})
    with AuditTrail(site.path, key=generate_key()) as trail, pytest.raises(Exception, match=f"the trail is MAC'd with audit key {site.key.key_id}, the key given is"):
        trail.append(actor="bob", action="mode_requested", subject="mode", details={})
    assert _verify(site).ok, "nothing written"


def test_rotation_is_a_record_by_the_old_key_and_a_retired_key_is_refused_after_it(site):
    new = generate_key()
    with AuditTrail(site.path, key=site.key) as trail:
        rotation = trail.rotate_key(new, actor="admin-cli")
        after = trail.append(actor="runtime", action="alarm_raised", subject="x", details={})
    assert rotation.key_id == site.key.key_id and rotation.details == {"from_key_id": site.key.key_id, "to_key_id": new.key_id}
    assert after.key_id == new.key_id
    new_file = create_key_file(site.key_dir / "new.key", new)
    assert new_file.key_id == new.key_id
    assert _verify(site).ok
    with AuditTrail(site.path, key=site.key) as trail, pytest.raises(Exception, match=f"MAC'd with audit key {new.key_id}"):
        trail.append(actor="mallory", action="alarm_cleared", subject="x", details={})
    # A record MAC'd by the retired key, forced in with the old key's MAC: named.
    db = _raw(site.path)
    last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    from interfaces.audit import record_mac_content

    seq, wall = last[0] + 1, "2026-12-03T00:00:00+00:00"
    mac = site.key.mac("audit-record", record_mac_content(seq, wall, None, "mallory", "alarm_cleared", "x", {}, site.key.key_id))
    digest = record_hash(seq, wall, None, "mallory", "alarm_cleared", "x", {}, last[1])
    db.execute("INSERT INTO audit VALUES (?, ?, NULL, 'mallory', 'alarm_cleared', 'x', '{}', ?, ?, ?, ?)", (seq, wall, last[1], digest, site.key.key_id, mac))
    db.execute("UPDATE audit_head SET seq = ?, hash = ?", (seq, digest))
    result = _verify(site, checkpoints=False)
    assert result.problems == [f"seq {seq}: MAC'd with key {site.key.key_id}, but the trail uses key {new.key_id} since seq {rotation.seq}"]


def test_a_running_trail_picks_up_a_rotation_made_elsewhere_from_its_key_file(tmp_path):
    key_path = tmp_path / "keys" / "audit.key"
    key = create_key_file(key_path)
    path = tmp_path / "h.sqlite"
    runtime = AuditTrail(path, key=key)
    runtime.append(actor="runtime", action="config_loaded", subject="B1", details={})
    new = generate_key()
    with AuditTrail(path, key=key) as admin:
        admin.rotate_key(new, actor="admin-cli")
    key_path.unlink()
    create_key_file(key_path, new)
    record = runtime.append(actor="runtime", action="alarm_raised", subject="x", details={})
    assert record.key_id == new.key_id
    runtime.close()


def test_a_lost_key_is_replaced_by_a_record_of_the_new_one(site):
    new = generate_key()
    with AuditTrail(site.path) as trail:
        replaced = trail.replace_key(new, actor="admin-cli", reason="the key's disk failed; no backup")
        trail.append(actor="runtime", action="alarm_raised", subject="x", details={})
    assert replaced.key_id == new.key_id and replaced.details["lost_key_id"] == site.key.key_id
    create_key_file(site.key_dir / "new.key", new)
    result = _verify(site)
    assert result.ok, result.problems
    assert any(f"the audit key {site.key.key_id} was replaced by {new.key_id}" in n for n in result.notes)
    # Without the lost key, its records' MACs are not checked, and the verdict says so.
    (site.key_dir / "audit.key").unlink()
    result = _verify(site)
    assert not result.ok and any(f"MAC not checked: key {site.key.key_id} is not among the keys given" in p for p in result.problems)


@pytest.mark.parametrize("attack", [_drop_tables, _empty_tables], ids=["dropped", "emptied"])
def test_a_deleted_trail_is_not_restarted_over_a_keyed_history(site, attack):
    attack(site)
    with pytest.raises(AuditError, match=r"history\.sqlite: the audit trail is (missing|empty), but the history holds 1 runs MAC'd with an audit key: the trail was deleted"):
        AuditTrail(site.path, key=site.key)
    with AuditTrail(site.path, read_only=True) as trail:
        assert trail.records() == []


def test_a_history_from_before_the_key_may_start_its_trail_and_says_what_predates_coverage(tmp_path):
    """An old file: no audit_mac columns, an audit table without key_id/mac; opened by this version, it is migrated and keyed from then on."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '2');
        CREATE TABLE runs (id INTEGER PRIMARY KEY, batch_id TEXT NOT NULL, requested_mode TEXT NOT NULL, config TEXT NOT NULL,
            started_utc TEXT NOT NULL, ended_utc TEXT, end_reason TEXT);
        CREATE TABLE readings (run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, signal TEXT NOT NULL, value REAL, text TEXT,
            good INTEGER NOT NULL, source_utc TEXT, problem TEXT);
        INSERT INTO runs VALUES (1, 'B0', 'advisory', '{}', '2026-01-01T00:00:00+00:00', '2026-01-02T00:00:00+00:00', 'harvested');
        INSERT INTO readings VALUES (1, 1.0, 'PV.Volume', 1400.0, NULL, 1, NULL, NULL);
        INSERT INTO readings VALUES (1, 2.0, 'PV.Volume', 1401.0, NULL, 1, NULL, NULL);
        CREATE TABLE audit (seq INTEGER PRIMARY KEY, wall_utc TEXT NOT NULL, process_time_h REAL, actor TEXT NOT NULL, action TEXT NOT NULL,
            subject TEXT NOT NULL, details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
        CREATE TABLE audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL, wall_utc TEXT NOT NULL);
        """
    )
    wall = "2026-01-01T00:00:01+00:00"
    digest = record_hash(1, wall, None, "runtime", "config_loaded", "B0", {}, GENESIS_HASH)
    db.execute("INSERT INTO audit VALUES (1, ?, NULL, 'runtime', 'config_loaded', 'B0', '{}', ?, ?)", (wall, GENESIS_HASH, digest))
    db.execute("INSERT INTO audit_head VALUES (1, 1, ?, ?)", (digest, wall))
    db.close()
    keys_dir = tmp_path / "keys"
    key = create_key_file(keys_dir / "audit.key")
    with AuditTrail(path, read_only=True) as reader:  # an old file read as it is, without migrating it
        old = reader.verify(keys=load_keys([keys_dir]))
    assert old.problems == ["seq 1: no record carries a MAC: the trail was written without a key, or rewritten by someone without it"]
    assert "readings rows 1–2: no MAC: written before the history was MAC'd (covered by the history checkpoints only)" in old.notes
    history = SqliteHistory(path, mac_key=key)
    with AuditTrail(path, key=key) as trail:
        history.start_run(batch_id="B1", requested_mode="advisory", config={})
        history.record_scan(1.0, {"PV.Volume": Reading(1500.0, True, None)}, {})
        trail.append(actor="runtime", action="config_loaded", subject="B1", details={})
        trail.checkpoint("requested")
    history.close()
    with AuditTrail(path, read_only=True) as reader:
        result = reader.verify(keys=load_keys([keys_dir]))
    assert result.problems == []
    assert result.notes == [
        "seq 1: written before the trail had an audit key: checked by the hash chain (and checkpoints) only",
        "runs row 1: no MAC: written before the history was MAC'd (covered by the history checkpoints only)",
        "readings rows 1–2: no MAC: written before the history was MAC'd (covered by the history checkpoints only)",
    ]
    # The old rows are pinned by the checkpoint from then on: an edit of one is found, without the key too.
    sqlite3.connect(path, isolation_level=None).execute("UPDATE readings SET value = 1.0 WHERE rowid = 1")
    with AuditTrail(path, read_only=True) as reader:
        assert reader.verify().problems == ["readings rows 1–3: their content no longer gives the digest of the history checkpoint at seq 3 (a row altered or replaced)"]
