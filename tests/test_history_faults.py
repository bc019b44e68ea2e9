"""The history and the audit trail when storage fails: one writer per file, disk full, read-only, deleted or replaced (issue 11).

Every failure is a :class:`HistoryUnavailableError` that says plainly what is
wrong and leaves the history usable, so that the next record succeeds once the
cause is gone, without reopening. The tests that need a real small or
read-only file system mount a tmpfs or a read-only bind mount, and are skipped
where mounting is not permitted.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.ports import CycleRecord, HistoryUnavailableError, PendingWrite, Reading, ResumeState
from interfaces.audit import AuditError, AuditTrail
from interfaces.history import SCHEMA_VERSION, HistoryError, HistoryLockedError, HistoryWriteError, SqliteHistory

REPO = Path(__file__).resolve().parent.parent

# The schema of version 1, as the runtime wrote it before the writes had an id (commit 9991147).
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, batch_id TEXT NOT NULL, requested_mode TEXT NOT NULL, config TEXT NOT NULL,
    started_utc TEXT NOT NULL, ended_utc TEXT, end_reason TEXT);
CREATE TABLE IF NOT EXISTS readings (
    run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, signal TEXT NOT NULL, value REAL, text TEXT,
    good INTEGER NOT NULL, source_utc TEXT, problem TEXT);
CREATE INDEX IF NOT EXISTS readings_by_time ON readings (process_time_h, signal);
CREATE TABLE IF NOT EXISTS lab_results (
    run_id INTEGER NOT NULL, received_at_h REAL NOT NULL, seq INTEGER NOT NULL, taken_at_h REAL NOT NULL,
    vcd_1e6_per_ml REAL, viability_pct REAL, glucose_g_per_l REAL, lactate_g_per_l REAL, glutamine_mm REAL,
    ammonia_mm REAL, titer_g_per_l REAL, osmolality_mosm_per_kg REAL, used INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, wall_utc TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL, source TEXT NOT NULL, requested TEXT, applied TEXT, adjustments TEXT,
    harvest_time_h REAL, predicted_titer_g_per_l REAL, predicted_score_g_per_day REAL, solve_time_s REAL,
    estimate TEXT, wrote_setpoints INTEGER NOT NULL, read_time_s REAL, write_time_s REAL);
CREATE TABLE IF NOT EXISTS writes (
    run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, wall_utc TEXT NOT NULL, "values" TEXT NOT NULL,
    outcome TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS state_changes (
    run_id INTEGER NOT NULL, process_time_h REAL, wall_utc TEXT NOT NULL, previous TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    run_id INTEGER NOT NULL, process_time_h REAL, wall_utc TEXT NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL,
    active INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS resume (
    batch_id TEXT PRIMARY KEY, last_cycle_h REAL NOT NULL, lab_seq INTEGER NOT NULL, harvest_time_h REAL NOT NULL,
    estimator TEXT NOT NULL, wall_utc TEXT NOT NULL, requested_mode TEXT);
"""


def _cycle(t_h: float) -> CycleRecord:
    return CycleRecord(
        process_time_h=t_h,
        state="closed_loop",
        reason="ok",
        source="mpc",
        requested={"feed_rate_lph": 1.0},
        applied={"feed_rate_lph": 1.0},
        adjustments=(),
        harvest_time_h=336.0,
        predicted_titer_g_per_l=5.0,
        predicted_score_g_per_day=500.0,
        solve_time_s=0.05,
        estimate={"state": {"glucose": 5.0}},
        wrote_setpoints=True,
    )


def _scan(count: int = 50) -> dict[str, Reading]:
    return {f"PV.Signal{i}": Reading(float(i), True, datetime.now(UTC)) for i in range(count)}


def _every_record(history: SqliteHistory, t_h: float) -> list[tuple[str, object]]:
    """One call of each method that records, each as (name, thunk)."""
    return [
        ("record_scan", lambda: history.record_scan(t_h, _scan(), {})),
        ("record_write", lambda: history.record_write(t_h, {"SP.FeedRate": 1.0}, "refused", "the audit record could not be written")),
        ("record_write_intent", lambda: history.record_write_intent(t_h, {"SP.FeedRate": 1.0})),
        ("record_state_change", lambda: history.record_state_change(t_h, "closed_loop", "fault", "history unavailable")),
        ("record_alarm", lambda: history.record_alarm(t_h, "history", "history unavailable", active=True)),
        ("commit_cycle", lambda: history.commit_cycle(_cycle(t_h), ResumeState("B1", t_h, {}, 1, 336.0))),
        ("end_run", lambda: history.end_run(reason="stopped")),
    ]


def _quota(history: SqliteHistory | AuditTrail, pages: int) -> None:
    """Fault injection: cap the file at ``pages`` pages on this object's own connection (SQLite then answers SQLITE_FULL, as on a full disk).

    ``max_page_count`` is a setting of one connection, so it has to be this one.
    """
    history._db.execute(f"PRAGMA max_page_count = {pages}")  # fault injection: no production hook for it


def _until_full(record: object, limit: int = 10_000) -> HistoryUnavailableError | AuditError:
    """Call ``record`` until it raises; the error it raised."""
    for _ in range(limit):
        try:
            record()  # type: ignore[operator]
        except (HistoryUnavailableError, AuditError) as error:
            return error
    raise AssertionError(f"still recording after {limit} records: the storage never filled")


def _fill(directory: Path) -> Path:
    """A file that takes every free byte of the file system holding ``directory``."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                try:
                    os.write(fd, b"\0")
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def _mount(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *argv], capture_output=True, text=True, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, or a skip where mounting is not permitted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = _mount("-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[Path]:
    """A directory that :func:`_make_read_only` can bind-mount read-only over itself (unmounted afterwards)."""
    directory = tmp_path / "data"
    directory.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def _make_read_only(directory: Path) -> None:
    """Bind-mount ``directory`` over itself read-only: files already open stay writable by their descriptors, the path is read-only."""
    bound = _mount("--bind", str(directory), str(directory))
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    remounted = _mount("-o", "remount,bind,ro", str(directory))
    if remounted.returncode != 0:
        subprocess.run(["umount", str(directory)], check=False)
        pytest.skip(f"cannot remount read-only here: {remounted.stderr.strip()}")


def _make_writable(directory: Path) -> None:
    subprocess.run(["umount", str(directory)], check=True)


# --------------------------------------------------------------------------- one writer per file


def test_a_second_writer_on_the_same_file_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "h.sqlite"
    first = SqliteHistory(path)
    with pytest.raises(HistoryLockedError, match=rf"h\.sqlite: .*locked by another runtime \(pid {os.getpid()}\b") as raised:
        SqliteHistory(path)
    assert isinstance(raised.value, HistoryUnavailableError) and raised.value.holder_pid == os.getpid()
    first.close()
    second = SqliteHistory(path)  # released on close
    second.start_run(batch_id="B1", requested_mode="advisory", config={})
    second.close()


def test_readers_and_the_audit_trail_do_not_need_the_lock(tmp_path):
    path = tmp_path / "h.sqlite"
    writer = SqliteHistory(path)
    writer.start_run(batch_id="B1", requested_mode="advisory", config={})
    writer.commit_cycle(_cycle(1.0), ResumeState("B1", 1.0, {"x": 1}, 1, 336.0))
    with SqliteHistory(path, read_only=True) as reader:
        assert [row["batch_id"] for row in reader.table("runs")] == ["B1"]
        assert reader.load_resume("B1") == ResumeState("B1", 1.0, {"x": 1}, 1, 336.0)
        with pytest.raises(HistoryError, match="read-only"):
            reader.record_alarm(1.0, "x", "y", active=True)
        with pytest.raises(HistoryUnavailableError, match="read-only"):
            reader.check_available()
    with AuditTrail(path) as trail, AuditTrail(path, read_only=True) as audit_reader:
        trail.append(actor="alice", action="mode_requested", subject="mode", details={})
        assert audit_reader.verify().ok
    writer.record_alarm(2.0, "x", "still the writer", active=True)
    writer.close()


_HOLD_THE_LOCK = """
import sys, time
from interfaces.history import SqliteHistory
history = SqliteHistory(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""


def test_the_lock_dies_with_a_killed_runtime(tmp_path):
    path = tmp_path / "h.sqlite"
    child = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        with pytest.raises(HistoryLockedError, match=rf"pid {child.pid}\b"):
            SqliteHistory(path)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    history = SqliteHistory(path)  # the OS released it with the process
    history.start_run(batch_id="B1", requested_mode="advisory", config={})
    history.close()


# --------------------------------------------------------------------------- disk full


def test_disk_full_raises_from_every_record_and_the_next_record_succeeds_once_space_is_back(tmp_path):
    history = SqliteHistory(tmp_path / "h.sqlite")
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    history.commit_cycle(_cycle(1.0), ResumeState("B1", 1.0, {}, 1, 336.0))
    _quota(history, 1)  # no page more than the file has now
    first = _until_full(lambda: history.record_scan(2.0, _scan(), {}))
    assert isinstance(first, HistoryWriteError)
    assert str(first).startswith(f"{tmp_path / 'h.sqlite'}: cannot record the scan at 2.00 h: disk full")
    for name, record in _every_record(history, 3.0):
        if name == "end_run":
            continue  # an update in place needs no new page
        error = _until_full(record)  # each table fills its last page first
        assert isinstance(error, HistoryWriteError) and "disk full" in str(error), name
    history.check_available()  # the file system itself has room: only SQLite's answer says full
    cycles = [row["process_time_h"] for row in history.table("cycles")]
    with pytest.raises(HistoryWriteError, match="disk full"):
        history.commit_cycle(_cycle(3.5), ResumeState("B1", 3.5, {}, 1, 336.0))
    assert [row["process_time_h"] for row in history.table("cycles")] == cycles, "nothing of a refused cycle is written"
    assert history.load_resume("B1").last_cycle_h != 3.5  # type: ignore[union-attr]
    scans = Counter(row["process_time_h"] for row in history.table("readings"))
    assert all(count % 50 == 0 for count in scans.values()), "a scan is recorded whole or not at all"
    _quota(history, 1_000_000)  # space is back: the same connection records again
    history.record_scan(4.0, _scan(), {})
    write_id = history.record_write_intent(4.0, {"SP.FeedRate": 1.0})
    history.record_write_outcome(write_id, "ok")
    history.commit_cycle(_cycle(4.0), ResumeState("B1", 4.0, {}, 1, 336.0))
    assert [row["process_time_h"] for row in history.table("cycles")] == [*cycles, 4.0]
    assert Counter(row["process_time_h"] for row in history.table("readings")) - scans == Counter({4.0: 50})
    assert history.load_resume("B1").last_cycle_h == 4.0  # type: ignore[union-attr]
    history.close()


def test_a_real_full_file_system_then_freed(small_fs):
    path = small_fs / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    history.commit_cycle(_cycle(1.0), ResumeState("B1", 1.0, {}, 1, 336.0))
    filler = _fill(small_fs)
    error = _until_full(lambda: history.record_scan(2.0, _scan(), {}))
    assert "disk full" in str(error) and str(path) in str(error)
    with pytest.raises(HistoryUnavailableError, match="disk full"):
        history.check_available()
    with pytest.raises(HistoryUnavailableError, match="disk full"):
        history.commit_cycle(_cycle(2.0), ResumeState("B1", 2.0, {}, 1, 336.0))
    filler.unlink()
    history.check_available()
    history.commit_cycle(_cycle(3.0), ResumeState("B1", 3.0, {}, 1, 336.0))
    assert [row["process_time_h"] for row in history.table("cycles")] == [1.0, 3.0]
    history.close()


def test_opening_on_a_full_file_system_says_disk_full(small_fs):
    filler = _fill(small_fs)
    with pytest.raises(HistoryUnavailableError, match=r"h\.sqlite: .*disk full"):
        SqliteHistory(small_fs / "h.sqlite")
    filler.unlink()
    SqliteHistory(small_fs / "h.sqlite").close()


# --------------------------------------------------------------------------- read-only


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes files whatever their mode (the bind-mount tests cover root)")
def test_opening_a_read_only_file_or_directory_says_read_only(tmp_path):
    path = tmp_path / "h.sqlite"
    SqliteHistory(path).close()
    path.chmod(0o444)
    try:
        with pytest.raises(HistoryUnavailableError, match=rf"{path}: cannot open the history: read-only"):
            SqliteHistory(path)
    finally:
        path.chmod(0o644)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(HistoryUnavailableError, match="read-only"):
            SqliteHistory(tmp_path / "new.sqlite")
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes files whatever their mode (the bind-mount tests cover root)")
def test_a_file_made_read_only_while_open_is_refused_at_the_next_record(tmp_path):
    path = tmp_path / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    path.chmod(0o444)
    try:
        with pytest.raises(HistoryUnavailableError, match="read-only"):
            history.record_alarm(1.0, "x", "y", active=True)
    finally:
        path.chmod(0o644)
    history.record_alarm(1.0, "x", "y", active=True)
    history.close()


def test_opening_on_a_read_only_mount_says_read_only(read_only_view):
    path = read_only_view / "h.sqlite"
    SqliteHistory(path).close()
    _make_read_only(read_only_view)
    with pytest.raises(HistoryUnavailableError, match=rf"{path}: cannot open the history: read-only"):
        SqliteHistory(path)
    with pytest.raises(HistoryUnavailableError, match="read-only"):
        SqliteHistory(read_only_view / "new.sqlite")
    with SqliteHistory(path, read_only=True) as reader:  # an archived copy can still be read
        assert reader.table("runs") == []


def test_a_history_made_read_only_while_open_is_refused_at_the_next_record_and_recovers(read_only_view):
    path = read_only_view / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    _make_read_only(read_only_view)
    try:
        with pytest.raises(HistoryUnavailableError, match="read-only"):
            history.check_available()
        for _name, record in _every_record(history, 2.0):
            with pytest.raises(HistoryUnavailableError, match=rf"{path}: cannot record .*: read-only"):
                record()  # type: ignore[operator]
    finally:
        _make_writable(read_only_view)
    history.check_available()
    history.record_alarm(3.0, "history", "back", active=False)
    history.close()


# --------------------------------------------------------------------------- deleted or replaced


def test_a_deleted_history_is_noticed_at_once(tmp_path):
    path = tmp_path / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    history.check_available()
    path.unlink()
    with pytest.raises(HistoryUnavailableError, match=rf"{path}: the history cannot be written: deleted or replaced"):
        history.check_available()
    for _name, record in _every_record(history, 2.0):
        with pytest.raises(HistoryUnavailableError, match="deleted or replaced"):
            record()  # type: ignore[operator]
    history.close()


def test_a_replaced_history_or_lock_file_is_noticed(tmp_path):
    path = tmp_path / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).close()
    saved = tmp_path / "saved.sqlite"
    os.replace(path, saved)
    os.replace(other, path)
    with pytest.raises(HistoryUnavailableError, match="deleted or replaced"):
        history.check_available()
    os.replace(saved, path)  # the same file back under its name
    history.check_available()
    lock = path.with_name(path.name + ".lock")
    lock.unlink()
    with pytest.raises(HistoryUnavailableError, match="lock file .* deleted or replaced"):
        history.check_available()
    history.close()


def test_a_deleted_audit_trail_refuses_to_append(tmp_path):
    path = tmp_path / "h.sqlite"
    with AuditTrail(path) as trail:
        trail.append(actor="runtime", action="config_loaded", subject="runtime", details={})
        path.unlink()
        with pytest.raises(AuditError, match=r"deleted or replaced.*must not go ahead"):
            trail.append(actor="alice", action="recommendation_approved", subject="cycle 3", details={})


# --------------------------------------------------------------------------- audit trail: disk full, read-only


def test_an_audit_trail_on_a_read_only_mount_says_read_only_and_can_still_be_verified(read_only_view):
    path = read_only_view / "h.sqlite"
    with AuditTrail(path) as trail:
        trail.append(actor="runtime", action="config_loaded", subject="runtime", details={})
    _make_read_only(read_only_view)
    with pytest.raises(AuditError, match=rf"{path}: cannot open the audit trail: read-only") as raised:
        AuditTrail(path)
    assert isinstance(raised.value, HistoryUnavailableError)
    with AuditTrail(path, read_only=True) as reader:  # audit verify of an archived copy
        assert reader.verify().ok and reader.verify().records == 1


def test_an_audit_trail_made_read_only_while_open_refuses_then_recovers(read_only_view):
    path = read_only_view / "h.sqlite"
    with AuditTrail(path) as trail:
        _make_read_only(read_only_view)
        try:
            with pytest.raises(AuditError, match=r"read-only.*must not go ahead") as raised:
                trail.append(actor="runtime", action="alarm_raised", subject="history", details={})
            assert isinstance(raised.value, HistoryUnavailableError)
        finally:
            _make_writable(read_only_view)
        assert trail.append(actor="runtime", action="alarm_cleared", subject="history", details={}).seq == 1


def test_a_full_audit_trail_refuses_then_appends_once_space_is_back(tmp_path):
    path = tmp_path / "h.sqlite"
    with AuditTrail(path) as trail:
        trail.append(actor="runtime", action="config_loaded", subject="runtime", details={})
        _quota(trail, 1)
        error = _until_full(lambda: trail.append(actor="runtime", action="alarm_raised", subject="x", details={"pad": "x" * 500}))
        assert isinstance(error, AuditError) and isinstance(error, HistoryUnavailableError)
        assert str(error).startswith(f"{path}: cannot write the audit record 'alarm_raised' on 'x': disk full")
        assert str(error).endswith("the action it records must not go ahead")
        _quota(trail, 1_000_000)
        record = trail.append(actor="runtime", action="alarm_cleared", subject="x", details={})
        assert trail.verify().ok and trail.head() is not None and trail.head().seq == record.seq  # type: ignore[union-attr]


def test_a_real_full_file_system_refuses_audit_records_then_recovers(small_fs):
    path = small_fs / "h.sqlite"
    with AuditTrail(path) as trail:
        trail.append(actor="runtime", action="config_loaded", subject="runtime", details={})
        filler = _fill(small_fs)
        error = _until_full(lambda: trail.append(actor="runtime", action="alarm_raised", subject="x", details={"pad": "x" * 500}))
        assert "disk full" in str(error) and isinstance(error, HistoryUnavailableError)
        filler.unlink()
        trail.append(actor="runtime", action="alarm_cleared", subject="x", details={})
        assert trail.verify().ok


# --------------------------------------------------------------------------- writes: intent, outcome, pending


def test_a_write_is_recorded_before_it_is_sent_and_pending_ones_survive_a_restart(tmp_path):
    path = tmp_path / "h.sqlite"
    history = SqliteHistory(path)
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    done = history.record_write_intent(1.0, {"SP.FeedRate": 1.5})
    history.record_write_outcome(done, "ok")
    lost = history.record_write_intent(2.0, {"SP.FeedRate": 2.5, "SP.Temperature": math.nan})
    assert history.pending_writes("B1") == [PendingWrite(lost, 2.0, {"SP.FeedRate": 2.5, "SP.Temperature": None})]
    history.close()  # the runtime stopped between sending and recording the outcome
    history = SqliteHistory(path)
    history.start_run(batch_id="B2", requested_mode="closed-loop", config={})
    history.record_write_intent(1.0, {"SP.FeedRate": 9.0})
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    later = history.record_write_intent(3.0, {"SP.FeedRate": 3.5})
    assert [w.write_id for w in history.pending_writes("B1")] == [lost, later], "this batch's, across runs, oldest first"
    history.record_write_outcome(lost, "unknown", "the runtime stopped before the outcome was recorded")
    with pytest.raises(HistoryError, match=rf"no pending write {lost}"):
        history.record_write_outcome(lost, "ok")
    with pytest.raises(HistoryError, match="'pending' is not an outcome"):
        history.record_write_outcome(later, "pending")
    assert [w.write_id for w in history.pending_writes("B1")] == [later]
    rows = {row["id"]: row for row in history.table("writes")}
    assert (rows[lost]["outcome"], rows[lost]["detail"]) == ("unknown", "the runtime stopped before the outcome was recorded")
    assert rows[done]["outcome"] == "ok" and rows[done]["outcome_utc"] is not None
    history.close()


def test_a_version_1_history_is_migrated_in_place(tmp_path):
    path = tmp_path / "v1.sqlite"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(SCHEMA_V1)
    old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    old.execute("INSERT INTO runs (batch_id, requested_mode, config, started_utc) VALUES ('B1', 'closed-loop', '{}', '2024-01-01T00:00:00+00:00')")
    for t_h, outcome in ((1.0, "ok"), (2.0, "refused"), (3.0, "link_error")):
        old.execute("INSERT INTO writes VALUES (1, ?, '2024-01-01T00:00:00+00:00', '{\"SP.FeedRate\":1.0}', ?, '')", (t_h, outcome))
    old.close()
    with SqliteHistory(path, read_only=True) as reader:  # a reader leaves an old file as it is
        assert [row["outcome"] for row in reader.table("writes")] == ["ok", "refused", "link_error"]
        assert reader.pending_writes("B1") == []
    history = SqliteHistory(path)
    assert SCHEMA_VERSION == 2
    writes = history.table("writes")
    assert [(row["id"], row["process_time_h"], row["outcome"]) for row in writes] == [(1, 1.0, "ok"), (2, 2.0, "refused"), (3, 3.0, "link_error")]
    assert history.pending_writes("B1") == []
    history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
    assert history.record_write_intent(4.0, {"SP.FeedRate": 2.0}) == 4
    history.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    check.close()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite"
    SqliteHistory(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(HistoryError, match="history schema version 3, this runtime writes version 2"):
        SqliteHistory(path)
    SqliteHistory(path.with_name("other.sqlite")).close()
