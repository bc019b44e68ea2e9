"""The batch history in an embedded SQLite database: every reading, lab result, cycle, write, state change and alarm.

One file per site (or per batch, as the operator prefers), no server to
install. WAL journal with ``synchronous=FULL``: every record is committed
when it is made, so a killed process loses nothing it recorded, and a reader
(a report, the operator screen) can read while the runtime writes.

The resume state (the estimator's saved filter, the last lab result used, the
planned harvest) is committed in the same transaction as the cycle it
follows, so a restarted runtime resumes from a consistent point.

**One writer per file.** A :class:`SqliteHistory` holds an exclusive lock
(``flock``) on the sidecar file ``<history>.lock``, which holds its pid, for
as long as it is open; a second one on the same file raises
:class:`HistoryLockedError` naming that pid. The operating system releases
the lock when the process ends, however it ends. Readers do not take it:
``SqliteHistory(path, read_only=True)``, the audit trail, the screen.

**When the storage fails** (disk full, file system read-only, the file
deleted or replaced, another connection holding it too long), every record
raises :class:`HistoryWriteError`, a
:class:`controller.ports.HistoryUnavailableError`, that says which; nothing
of that record was written and the history stays usable, so the next record
succeeds once the cause is gone, without reopening.
:meth:`SqliteHistory.check_available` tells the same from a few ``stat``
calls, without writing. A file deleted or replaced under a running history is
found at once: SQLite itself would go on writing to the deleted file.

**Covered by the audit trail.** Given the audit key (``mac_key``), every row
of the tables in :data:`COVERED_COLUMNS` carries its HMAC in ``audit_mac``
(``key_id:hmac``), written in the transaction that writes the row, and again
when a write's outcome or a run's end changes it; ``checkpoint`` (the audit
trail's :meth:`interfaces.audit.AuditTrail.checkpoint`) is called every
``checkpoint_every_cycles`` committed cycles, and records the rows' count and
digest in the trail (:mod:`interfaces.audit_coverage`, docs/audit-and-users.md).

Tables: ``runs``, ``readings``, ``lab_results``, ``cycles``, ``writes``,
``state_changes``, ``alarms``, ``resume`` (see :data:`SCHEMA`). Times are
process hours (``process_time_h``) and wall-clock UTC ISO strings
(``wall_utc``). A write is recorded before it is sent (outcome ``pending``,
:meth:`SqliteHistory.record_write_intent`) and its outcome after; a write
refused before sending is recorded once (:meth:`SqliteHistory.record_write`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import sqlite3
import weakref
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from controller.ports import CycleRecord, HistoryUnavailableError, PendingWrite, Reading, ResumeState, Value
from controller.types import LabResult, json_compatible
from interfaces.audit_keys import AuditKey
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2
"""2: ``writes`` has an ``id`` (the handle of a write recorded before it is sent) and ``outcome_utc``. A version-1 file is migrated in place."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, batch_id TEXT NOT NULL, requested_mode TEXT NOT NULL, config TEXT NOT NULL,
    started_utc TEXT NOT NULL, ended_utc TEXT, end_reason TEXT, audit_mac TEXT);
CREATE TABLE IF NOT EXISTS readings (
    run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, signal TEXT NOT NULL, value REAL, text TEXT,
    good INTEGER NOT NULL, source_utc TEXT, problem TEXT, audit_mac TEXT);
CREATE INDEX IF NOT EXISTS readings_by_time ON readings (process_time_h, signal);
CREATE TABLE IF NOT EXISTS lab_results (
    run_id INTEGER NOT NULL, received_at_h REAL NOT NULL, seq INTEGER NOT NULL, taken_at_h REAL NOT NULL,
    vcd_1e6_per_ml REAL, viability_pct REAL, glucose_g_per_l REAL, lactate_g_per_l REAL, glutamine_mm REAL,
    ammonia_mm REAL, titer_g_per_l REAL, osmolality_mosm_per_kg REAL, used INTEGER NOT NULL, audit_mac TEXT);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, wall_utc TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL, source TEXT NOT NULL, requested TEXT, applied TEXT, adjustments TEXT,
    harvest_time_h REAL, predicted_titer_g_per_l REAL, predicted_score_g_per_day REAL, solve_time_s REAL,
    estimate TEXT, wrote_setpoints INTEGER NOT NULL, read_time_s REAL, write_time_s REAL, trust TEXT, audit_mac TEXT);
CREATE TABLE IF NOT EXISTS writes (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, wall_utc TEXT NOT NULL, "values" TEXT NOT NULL,
    outcome TEXT NOT NULL, detail TEXT, outcome_utc TEXT, audit_mac TEXT);
CREATE TABLE IF NOT EXISTS state_changes (
    run_id INTEGER NOT NULL, process_time_h REAL, wall_utc TEXT NOT NULL, previous TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL, audit_mac TEXT);
CREATE TABLE IF NOT EXISTS alarms (
    run_id INTEGER NOT NULL, process_time_h REAL, wall_utc TEXT NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL,
    active INTEGER NOT NULL, audit_mac TEXT);
CREATE TABLE IF NOT EXISTS resume (
    batch_id TEXT PRIMARY KEY, last_cycle_h REAL NOT NULL, lab_seq INTEGER NOT NULL, harvest_time_h REAL NOT NULL,
    estimator TEXT NOT NULL, wall_utc TEXT NOT NULL, requested_mode TEXT, held TEXT, fault_cycles INTEGER, trust TEXT);
"""


_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("resume", "held", "TEXT"),
    ("resume", "fault_cycles", "INTEGER"),
    ("resume", "trust", "TEXT"),
    ("cycles", "trust", "TEXT"),
    *((table, "audit_mac", "TEXT") for table in ("runs", "readings", "lab_results", "cycles", "writes", "state_changes", "alarms")),
)
"""Columns added after a table was first written (table, column, type): ``resume.held`` (the physical contradictions held until
acknowledged), ``resume.fault_cycles``, the trust region (``resume.trust``, ``cycles.trust``), and the rows' MACs (``audit_mac``)."""

COVERED_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "runs": ("batch_id", "requested_mode", "config", "started_utc", "ended_utc", "end_reason"),
    "readings": ("run_id", "process_time_h", "signal", "value", "text", "good", "source_utc", "problem"),
    "lab_results": (
        "run_id", "received_at_h", "seq", "taken_at_h", "vcd_1e6_per_ml", "viability_pct", "glucose_g_per_l", "lactate_g_per_l",
        "glutamine_mm", "ammonia_mm", "titer_g_per_l", "osmolality_mosm_per_kg", "used",
    ),
    "cycles": (
        "run_id", "process_time_h", "wall_utc", "state", "reason", "source", "requested", "applied", "adjustments", "harvest_time_h",
        "predicted_titer_g_per_l", "predicted_score_g_per_day", "solve_time_s", "estimate", "wrote_setpoints", "read_time_s", "write_time_s", "trust",
    ),
    "writes": ("run_id", "process_time_h", "wall_utc", "values", "outcome", "detail", "outcome_utc"),
    "state_changes": ("run_id", "process_time_h", "wall_utc", "previous", "state", "reason"),
    "alarms": ("run_id", "process_time_h", "wall_utc", "code", "message", "active"),
}  # fmt: skip
"""The tables the audit trail covers, and the columns of a row that its MAC and digest are computed over, in this order (the rowid first).

``resume`` is not covered: it is the state to resume from, replaced at every
cycle, not a record. A column added later must be added at the end, and old
checkpoints then recomputed without it (a new version of this list)."""
OPEN_ROWS: Mapping[str, str] = {"runs": "ended_utc IS NULL", "writes": "outcome = 'pending'"}
"""The rows that may still change, by table (an SQL condition): a run not ended, a write awaiting its outcome. Every other row is final once inserted."""
ROW_MAC_PURPOSE = "history-row"
"""The purpose a row's MAC is made for (:meth:`interfaces.audit_keys.AuditKey.mac`)."""


def row_content(table: str, rowid: int, values: tuple[Any, ...]) -> list[Any]:
    """What a row's MAC and digest are computed over: ``[table, rowid, *values]`` (values as SQLite returns them, in :data:`COVERED_COLUMNS` order)."""
    return [table, rowid, *values]


def quoted_columns(table: str) -> str:
    """The covered columns of ``table`` as an SQL list (``"values"`` is a keyword)."""
    return ", ".join(f'"{name}"' for name in COVERED_COLUMNS[table])


def _add_held_column(db: sqlite3.Connection) -> None:
    """The columns of :data:`_ADDED_COLUMNS` a file written before them lacks."""
    for table, name, kind in _ADDED_COLUMNS:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if name not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


_PENDING_INDEX = "CREATE INDEX IF NOT EXISTS writes_pending ON writes (run_id) WHERE outcome = 'pending'"
_TABLES = frozenset({"runs", "readings", "lab_results", "cycles", "writes", "state_changes", "alarms", "resume"})
PENDING = "pending"
"""The outcome of a write recorded before it was sent, until its outcome is recorded."""


class HistoryError(BioreactorMPCError, RuntimeError):
    """The history database cannot be opened, written or read, or was used wrongly (no run started, opened read-only)."""


class HistoryWriteError(HistoryError, HistoryUnavailableError):
    """The history cannot be written now: disk full, read-only, deleted or replaced, busy, failing.

    Nothing of the record was written, and the history stays usable: the next
    record succeeds once the cause is gone, without reopening.
    """


class HistoryLockedError(HistoryWriteError):
    """Another :class:`SqliteHistory` (another runtime) holds this history open for writing."""

    def __init__(self, path: Path, lock_path: Path, holder_pid: int | None) -> None:
        self.path = path
        self.lock_path = lock_path
        self.holder_pid = holder_pid
        holder = f"pid {holder_pid}" if holder_pid is not None else "pid unknown"
        super().__init__(f"{path}: the history is locked by another runtime ({holder}, lock file {lock_path}): one runtime per history file")


def storage_problem(path: Path, identity: tuple[int, int] | None = None) -> str | None:
    """Why a file at ``path`` cannot be written now, from ``stat`` calls only; None when it can.

    ``identity`` is the file's ``(st_dev, st_ino)`` when it was opened: a
    different file at the path, or none, means it was deleted or replaced.
    The answer starts with the plain cause: ``deleted or replaced``,
    ``read-only``, ``disk full``.
    """
    directory = path.parent
    try:
        found = os.stat(path)
    except FileNotFoundError:
        found = None
    except OSError as error:
        return f"cannot be checked: {error.strerror}"
    if identity is not None:
        if found is None:
            return "deleted or replaced: there is no file at this path any more"
        if (found.st_dev, found.st_ino) != identity:
            return "deleted or replaced: another file now has this path"
    try:
        space = os.statvfs(directory)
    except OSError as error:
        return f"cannot be checked: {error.strerror}"
    if space.f_flag & os.ST_RDONLY:
        return "read-only: the file system is mounted read-only"
    if found is not None and not os.access(path, os.W_OK):
        return "read-only: the file is not writable"
    if not os.access(directory, os.W_OK):
        return f"read-only: the directory {directory} is not writable (SQLite keeps its -wal and -shm files there)"
    free_blocks = space.f_bfree if os.geteuid() == 0 else space.f_bavail  # root may use the reserved blocks
    if free_blocks == 0:
        return "disk full: no space left on the file system"
    return None


def sqlite_problem(error: sqlite3.Error) -> str | None:
    """The plain cause of an SQLite error that means the storage cannot be written now; None for any other error (a bug, a damaged schema).

    Starts with ``disk full``, ``read-only``, ``deleted or replaced``,
    ``busy``, ``I/O error`` or ``damaged``, followed by SQLite's own name and text.
    """
    code = getattr(error, "sqlite_errorcode", None)
    name = getattr(error, "sqlite_errorname", "SQLITE_ERROR")
    if code is None:
        return None
    primary = code & 0xFF
    said = f"({name}: {error})"
    if primary == sqlite3.SQLITE_FULL:
        return f"disk full {said}"
    if code == sqlite3.SQLITE_READONLY_DBMOVED:
        return f"deleted or replaced {said}"
    if primary == sqlite3.SQLITE_READONLY:
        return f"read-only {said}"
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"busy: another connection held the database too long {said}"
    if primary == sqlite3.SQLITE_IOERR:
        return f"I/O error: the disk failed, was removed or is full {said}"
    if primary == sqlite3.SQLITE_CANTOPEN:
        return f"cannot open the database or its -wal/-shm files {said}"
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return f"damaged: not a valid SQLite database {said}"
    if primary in (sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        return f"permission denied {said}"
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _json(value: Any) -> str:
    """JSON with NaN and ±Inf as null (SQLite's JSON functions and other readers reject them)."""
    return json.dumps(json_compatible(value), separators=(",", ":"))


def _real(value: float) -> float | None:
    return value if math.isfinite(value) else None


class SqliteHistory:
    """:class:`controller.ports.HistoryStore` in one SQLite file (created if missing), held for writing by this object alone.

    ``read_only=True`` opens an existing file for reading only, without the
    lock, without creating, migrating or writing anything: reports, tests and
    tools reading the history of a runtime that is running (or archived on
    read-only media). Its record methods raise :class:`HistoryError`.

    Raises :class:`HistoryLockedError` when another one holds the file,
    :class:`HistoryWriteError` when it cannot be written (read-only, disk
    full), :class:`HistoryError` for anything else (not a database, a newer
    schema).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        timeout_s: float = 10.0,
        mac_key: AuditKey | None = None,
        checkpoint: Callable[[], object] | None = None,
        checkpoint_every_cycles: int = 60,
    ) -> None:
        if checkpoint_every_cycles < 1:
            raise ValueError(f"checkpoint_every_cycles must be at least 1, got {checkpoint_every_cycles}")
        self.path = Path(path)
        self.read_only = read_only
        self._mac_key = mac_key
        self._checkpoint = checkpoint
        self._checkpoint_every_cycles = checkpoint_every_cycles
        self._cycles_since_checkpoint = 0
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._run_id: int | None = None
        self._release_lock: Callable[[], Any] = lambda: None
        self._identity: tuple[int, int] | None = None
        self._lock_identity: tuple[int, int] | None = None
        self._closed = False
        if read_only:
            self._db = self._open_for_reading(timeout_s)
        else:
            self._db = self._open_for_writing(timeout_s)

    def _open_for_writing(self, timeout_s: float) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HistoryWriteError(f"{self.path}: cannot open the history: {_os_problem(error)}") from error
        problem = storage_problem(self.path)  # before SQLite maps anything of a file it cannot write
        if problem is not None:
            raise HistoryWriteError(f"{self.path}: cannot open the history: {problem}")
        self._take_lock()
        db: sqlite3.Connection | None = None
        opened = False
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=timeout_s)
            db.execute("PRAGMA mmap_size=0")  # no mapping of the database file (a truncated mapping is a SIGBUS, not an error)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            self._schema_version = self._migrate(db)
            found = os.stat(self.path)
            opened = True
        except sqlite3.Error as error:
            problem = storage_problem(self.path) or sqlite_problem(error)
            if problem is None:
                raise HistoryError(f"{self.path}: cannot open the history database: {error}") from error
            raise HistoryWriteError(f"{self.path}: cannot open the history: {problem}") from error
        finally:
            if not opened:
                if db is not None:
                    db.close()
                self._release_lock()
        self._identity = (found.st_dev, found.st_ino)
        return db

    def _open_for_reading(self, timeout_s: float) -> sqlite3.Connection:
        if not self.path.is_file():
            raise HistoryError(f"{self.path}: no such history file")
        uri = read_only_uri(self.path)
        db: sqlite3.Connection | None = None
        opened = False
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout_s)
            self._schema_version = _schema_version(db, self.path)
            opened = True
        except sqlite3.Error as error:
            raise HistoryError(f"{self.path}: cannot open the history database for reading: {error}") from error
        finally:
            if not opened and db is not None:
                db.close()
        return db

    def _take_lock(self) -> None:
        """Lock the sidecar lock file exclusively and write our pid in it; raises :class:`HistoryLockedError` when another holds it.

        The descriptor is closed (which releases the lock) by :meth:`close`,
        or when this object is collected, or by the OS when the process ends.
        It is not inherited by programs this process starts.
        """
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise HistoryWriteError(f"{self.path}: cannot open the history: cannot create its lock file {self.lock_path}: {_os_problem(error)}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd)
            os.close(fd)
            raise HistoryLockedError(self.path, self.lock_path, holder) from None
        except OSError as error:
            os.close(fd)
            raise HistoryWriteError(f"{self.path}: cannot open the history: cannot lock {self.lock_path}: {_os_problem(error)}") from error
        self._release_lock = weakref.finalize(self, os.close, fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as error:  # the lock holds without the pid; a second runtime is told "pid unknown"
            log.warning("history_lock_pid_not_written", path=str(self.lock_path), error=str(error))
        found = os.fstat(fd)
        self._lock_identity = (found.st_dev, found.st_ino)

    def _migrate(self, db: sqlite3.Connection) -> int:
        """The file's schema brought to :data:`SCHEMA_VERSION` in one transaction; refuses a newer one."""
        found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if found is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute(_PENDING_INDEX)
            return SCHEMA_VERSION
        version = int(found[0])
        if version == 1:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    'CREATE TABLE writes_v2 (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, process_time_h REAL NOT NULL, wall_utc TEXT NOT NULL, "values" TEXT NOT NULL, '
                    "outcome TEXT NOT NULL, detail TEXT, outcome_utc TEXT)"
                )
                db.execute(
                    'INSERT INTO writes_v2 (id, run_id, process_time_h, wall_utc, "values", outcome, detail, outcome_utc) '
                    'SELECT rowid, run_id, process_time_h, wall_utc, "values", outcome, detail, wall_utc FROM writes ORDER BY rowid'
                )
                db.execute("DROP TABLE writes")
                db.execute("ALTER TABLE writes_v2 RENAME TO writes")
                db.execute(_PENDING_INDEX)
                _add_held_column(db)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            log.info("history_migrated", path=str(self.path), from_version=1, to_version=SCHEMA_VERSION)
            return SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise HistoryError(f"{self.path}: history schema version {version}, this runtime writes version {SCHEMA_VERSION}")
        db.execute(_PENDING_INDEX)
        _add_held_column(db)
        return version

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    @property
    def run_id(self) -> int:
        """The run records go to; raises :class:`HistoryError` before :meth:`start_run` (and on a history opened for reading)."""
        if self.read_only:
            raise HistoryError(f"{self.path}: cannot record: read-only: the history was opened for reading")
        if self._run_id is None:
            raise HistoryError(f"{self.path}: no run started")
        return self._run_id

    # ------------------------------------------------------------------ HistoryStore

    def check_available(self) -> None:
        """Raise :class:`HistoryWriteError` unless the file is still the one opened, with its lock file, and can be written now.

        A few ``stat`` calls and no write: cheap enough for every poll. Finds
        the file deleted or replaced, the lock file deleted or replaced (a
        second runtime could then take it), a read-only file, directory or
        file system, and a full file system.
        """
        if self.read_only:
            raise HistoryWriteError(f"{self.path}: the history cannot be written: read-only: opened for reading")
        problem = self._storage_problem()
        if problem is not None:
            raise HistoryWriteError(f"{self.path}: the history cannot be written: {problem}")

    def _storage_problem(self) -> str | None:
        """Why this history cannot be written now (:func:`storage_problem` of its file, or its lock file gone); None when it can."""
        return storage_problem(self.path, self._identity) or self._lock_problem()

    def _lock_problem(self) -> str | None:
        try:
            found = os.stat(self.lock_path)
        except FileNotFoundError:
            found = None
        except OSError as error:
            return f"its lock file {self.lock_path} cannot be checked: {error.strerror}"
        if found is None or (found.st_dev, found.st_ino) != self._lock_identity:
            return f"its lock file {self.lock_path} was deleted or replaced: another runtime could open this history too"
        return None

    def start_run(self, *, batch_id: str, requested_mode: str, config: Mapping[str, Any]) -> None:
        with self._recording(f"the start of a run of {batch_id}") as db:
            run_id = self._insert(db, "runs", ("batch_id", "requested_mode", "config", "started_utc"), [(batch_id, requested_mode, _json(config), _now())])
        self._run_id = run_id
        log.info("history_run_started", path=str(self.path), run_id=self._run_id, batch_id=batch_id)

    def record_scan(self, process_time_h: float, readings: Mapping[str, Reading], problems: Mapping[str, str]) -> None:
        run_id = self.run_id
        rows = []
        for signal, reading in readings.items():
            value, text = (None, reading.value) if isinstance(reading.value, str) else (_real(float(reading.value)), None)
            stamp = reading.source_time.isoformat() if reading.source_time is not None else None
            rows.append((run_id, process_time_h, signal, value, text, int(reading.good), stamp, problems.get(signal)))
        with self._recording(f"the scan at {process_time_h:.2f} h") as db:
            self._insert(db, "readings", COVERED_COLUMNS["readings"], rows)

    def record_lab(self, process_time_h: float, result: LabResult, *, used: bool) -> None:
        run_id = self.run_id
        values = tuple(_real(v) for v in result.values().values())
        with self._recording(f"lab result {result.seq} at {process_time_h:.2f} h") as db:
            self._insert(db, "lab_results", COVERED_COLUMNS["lab_results"], [(run_id, process_time_h, result.seq, result.taken_at_h, *values, int(used))])

    def record_write(self, process_time_h: float, values: Mapping[str, Value], outcome: str, detail: str = "") -> None:
        """A write refused before it was sent (or any write recorded at once with its outcome)."""
        run_id = self.run_id
        now = _now()
        with self._recording(f"the write at {process_time_h:.2f} h") as db:
            self._insert(db, "writes", COVERED_COLUMNS["writes"], [(run_id, process_time_h, now, _json(dict(values)), outcome, detail, now)])

    def record_write_intent(self, process_time_h: float, values: Mapping[str, Value]) -> int:
        """Record a write before it is sent, outcome ``pending``; its id, for :meth:`record_write_outcome`."""
        run_id = self.run_id
        with self._recording(f"the write intent at {process_time_h:.2f} h") as db:
            return self._insert(
                db, "writes", ("run_id", "process_time_h", "wall_utc", "values", "outcome", "detail"), [(run_id, process_time_h, _now(), _json(dict(values)), PENDING, "")]
            )

    def record_write_outcome(self, write_id: int, outcome: str, detail: str = "") -> None:
        """The outcome of a write recorded by :meth:`record_write_intent` (in this run or an earlier one); once per write."""
        if outcome == PENDING:
            raise HistoryError(f"{self.path}: {PENDING!r} is not an outcome (write {write_id})")
        with self._recording(f"the outcome of write {write_id}") as db:
            cursor = db.execute("UPDATE writes SET outcome = ?, detail = ?, outcome_utc = ? WHERE id = ? AND outcome = ?", (outcome, detail, _now(), write_id, PENDING))
            if cursor.rowcount != 1:
                raise HistoryError(f"{self.path}: no pending write {write_id}: unknown, or its outcome is already recorded")
            self._seal(db, "writes", write_id - 1, last_rowid=write_id)

    def pending_writes(self, batch_id: str) -> list[PendingWrite]:
        """This batch's writes recorded as intents whose outcome was not recorded, across runs, oldest first."""
        if self._schema_version < 2:  # version 1 recorded no intents
            return []
        rows = self._read(
            'SELECT w.id, w.process_time_h, w."values" FROM writes w JOIN runs r ON r.id = w.run_id WHERE r.batch_id = ? AND w.outcome = ? ORDER BY w.id',
            (batch_id, PENDING),
        ).fetchall()
        return [PendingWrite(int(row[0]), float(row[1]), json.loads(row[2])) for row in rows]

    def record_state_change(self, process_time_h: float, previous: str, state: str, reason: str) -> None:
        run_id = self.run_id
        with self._recording(f"the state change to {state}") as db:
            self._insert(db, "state_changes", COVERED_COLUMNS["state_changes"], [(run_id, _real(process_time_h), _now(), previous, state, reason)])

    def record_alarm(self, process_time_h: float, code: str, message: str, *, active: bool) -> None:
        run_id = self.run_id
        with self._recording(f"the alarm {code}") as db:
            self._insert(db, "alarms", COVERED_COLUMNS["alarms"], [(run_id, _real(process_time_h), _now(), code, message, int(active))])

    def commit_cycle(self, record: CycleRecord, resume: ResumeState | None) -> None:
        cycle = (
            self.run_id,
            record.process_time_h,
            _now(),
            record.state,
            record.reason,
            record.source,
            _json(record.requested) if record.requested is not None else None,
            _json(record.applied) if record.applied is not None else None,
            _json(list(record.adjustments)),
            _real(record.harvest_time_h),
            _real(record.predicted_titer_g_per_l),
            _real(record.predicted_score_g_per_day),
            _real(record.solve_time_s),
            _json(record.estimate),
            int(record.wrote_setpoints),
            _real(record.read_time_s),
            _real(record.write_time_s),
            _json(record.trust) if record.trust else None,
        )
        with self._recording(f"the cycle at {record.process_time_h:.2f} h") as db:
            self._insert(db, "cycles", COVERED_COLUMNS["cycles"], [cycle])
            if resume is not None:
                self._write_resume(db, resume)
        self._cycles_since_checkpoint += 1
        if self._checkpoint is not None and self._cycles_since_checkpoint >= self._checkpoint_every_cycles:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Have the audit trail record a ``history_checkpoint`` now (the ``checkpoint`` given at construction); a failure is logged, not raised.

        Called every ``checkpoint_every_cycles`` committed cycles. The cycle is
        committed whatever happens here: a checkpoint that fails is tried
        again at the next cycle.
        """
        if self._checkpoint is None:
            return
        try:
            self._checkpoint()
        except BioreactorMPCError as error:
            log.warning("history_checkpoint_failed", path=str(self.path), error=str(error))
            return
        self._cycles_since_checkpoint = 0

    def save_resume(self, resume: ResumeState) -> None:
        with self._recording(f"the state to resume from at {resume.last_cycle_h:.2f} h") as db:
            self._write_resume(db, resume)

    @staticmethod
    def _write_resume(db: sqlite3.Connection, resume: ResumeState) -> None:
        db.execute(
            "INSERT OR REPLACE INTO resume (batch_id, last_cycle_h, lab_seq, harvest_time_h, estimator, wall_utc, requested_mode, held, fault_cycles, trust) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                resume.batch_id,
                resume.last_cycle_h,
                resume.lab_seq,
                resume.harvest_time_h,
                _json(resume.estimator),
                _now(),
                resume.requested_mode,
                _json(dict(resume.held_contradictions)),
                resume.fault_cycles,
                _json(dict(resume.trust)),
            ),
        )

    def load_resume(self, batch_id: str) -> ResumeState | None:
        cursor = self._read("SELECT * FROM resume WHERE batch_id = ?", (batch_id,))
        found = cursor.fetchone()
        if found is None:
            return None
        row = dict(zip([d[0] for d in cursor.description], found, strict=True))
        held = json.loads(row["held"]) if row.get("held") else {}  # a version-1 file opened read-only has no such column
        return ResumeState(
            batch_id=batch_id,
            last_cycle_h=float(row["last_cycle_h"]),
            lab_seq=int(row["lab_seq"]),
            harvest_time_h=float(row["harvest_time_h"]),
            estimator=json.loads(row["estimator"]),
            requested_mode=row["requested_mode"],
            held_contradictions=held,
            fault_cycles=int(row.get("fault_cycles") or 0),
            trust=json.loads(row["trust"]) if row.get("trust") else {},
        )

    def end_run(self, *, reason: str) -> None:
        run_id = self.run_id
        with self._recording("the end of the run") as db:
            db.execute("UPDATE runs SET ended_utc = ?, end_reason = ? WHERE id = ?", (_now(), reason, run_id))
            self._seal(db, "runs", run_id - 1, last_rowid=run_id)

    def close(self) -> None:
        """Close the database, then release the lock (in that order: nothing is written once another runtime can open it)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._db.close()
        finally:
            self._release_lock()  # closing the descriptor releases the flock

    # ------------------------------------------------------------------ reading

    def table(self, name: str) -> list[dict[str, Any]]:
        """Every row of one table, as dictionaries (reports and tests)."""
        if name not in _TABLES:
            raise KeyError(f"no history table {name!r}")
        cursor = self._read(f"SELECT * FROM {name}")  # the name is one of the fixed tables above
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _recording(self, what: str) -> Iterator[sqlite3.Connection]:
        """One transaction recording ``what``; raises :class:`HistoryWriteError` saying why it could not be written, leaving nothing of it."""
        if self.read_only:
            raise HistoryError(f"{self.path}: cannot record {what}: read-only: the history was opened for reading")
        problem = self._storage_problem()
        if problem is not None:
            raise HistoryWriteError(f"{self.path}: cannot record {what}: {problem}")
        try:
            try:
                self._rollback()  # a transaction left open by an earlier failure
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            finally:
                self._rollback()  # nothing to do after COMMIT
        except sqlite3.Error as error:
            problem = storage_problem(self.path, self._identity) or sqlite_problem(error)
            if problem is None:
                raise HistoryError(f"{self.path}: cannot record {what}: {error}") from error
            raise HistoryWriteError(f"{self.path}: cannot record {what}: {problem}") from error

    def _insert(self, db: sqlite3.Connection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> int:
        """Insert ``rows`` into ``table`` (inside a :meth:`_recording` transaction) and MAC them; the rowid of the last one."""
        before = int(db.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}").fetchone()[0])  # a fixed table name; the write lock is held
        names = ", ".join(f'"{name}"' for name in columns)
        db.executemany(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})", rows)  # fixed names
        last = int(db.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}").fetchone()[0])
        self._seal(db, table, before, last_rowid=last)
        return last

    def _seal(self, db: sqlite3.Connection, table: str, after_rowid: int, *, last_rowid: int) -> None:
        """Store the MAC of each row of ``table`` in ``(after_rowid, last_rowid]`` as it now reads (``key_id:mac`` in ``audit_mac``); nothing without a key."""
        if self._mac_key is None:
            return
        key = self._mac_key
        rows = db.execute(f"SELECT rowid, {quoted_columns(table)} FROM {table} WHERE rowid > ? AND rowid <= ?", (after_rowid, last_rowid)).fetchall()  # fixed names
        seals = [(f"{key.key_id}:{key.mac(ROW_MAC_PURPOSE, row_content(table, int(row[0]), tuple(row[1:])))}", row[0]) for row in rows]
        db.executemany(f"UPDATE {table} SET audit_mac = ? WHERE rowid = ?", seals)

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.Error as error:
            raise HistoryError(f"{self.path}: {error} (while running {sql.split('(')[0].strip()!r})") from error

    def _rollback(self) -> None:
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as error:  # the next record tries again; the error that led here is the one reported
            log.warning("history_rollback_failed", path=str(self.path), error=str(error))


def read_only_uri(path: Path) -> str:
    """The SQLite URI that opens ``path`` for reading only, also on read-only media.

    On read-only media a WAL file left without its ``-shm`` cannot be opened
    plainly (SQLite wants to create the ``-shm``); nobody can be writing it
    there, so it is opened as immutable.
    """
    uri = path.absolute().as_uri() + "?mode=ro"
    if not os.access(path.parent, os.W_OK) and not path.with_name(path.name + "-shm").exists():
        uri += "&immutable=1"
    return uri


def _schema_version(db: sqlite3.Connection, path: Path) -> int:
    """The version of a file opened for reading: 1 or 2 are read, a newer one is refused, none (no history tables yet) counts as the current one."""
    has_meta = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()[0]
    found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
    version = int(found[0]) if found is not None else SCHEMA_VERSION
    if version > SCHEMA_VERSION:
        raise HistoryError(f"{path}: history schema version {version}, this runtime reads versions up to {SCHEMA_VERSION}")
    return version


def _pid_in(fd: int) -> int | None:
    """The pid the lock's holder wrote, if it did."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _os_problem(error: OSError) -> str:
    """An operating system error in the words of :func:`storage_problem`."""
    if error.errno == errno.ENOSPC:
        return f"disk full ({error.strerror})"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"read-only ({error.strerror})"
    return error.strerror or str(error)
