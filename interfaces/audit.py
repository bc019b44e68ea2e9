"""The audit trail: append-only, hash-chained records of who did what, in the history's SQLite file.

Every record names its actor (a user name, or ``runtime``), its action, what
it is about (``subject``) and a JSON object of details, with the wall-clock
time (UTC) and the process time when there is one. Records are numbered 1, 2,
3 … without gaps, and each carries the SHA-256 of its own content and of the
record before it (:func:`record_hash`), so that ``bioreactor-mpc audit verify``
(:meth:`AuditTrail.verify`) finds any record altered, deleted or reordered
since it was written. The number and hash of the last record (the **head**)
are kept in a second table, updated in the same transaction, so a deletion of
the last records is found too.

What it cannot do: whoever can rewrite the whole file can recompute every hash
and the head, and the result verifies. The chain makes tampering evident only
against a head hash kept somewhere else: the runtime logs it (event
``audit_head``) every :data:`HEAD_LOG_EVERY` records, and
:meth:`AuditTrail.head` gives it to whoever exports it (a daily log line, a
ticket, a printed batch record). Triggers refuse ``UPDATE`` and ``DELETE`` on
the table: an honest barrier against mistakes, not the security mechanism
(they can be dropped; the chain still finds what was changed after).

**The contract for callers**: record first, then act. When
:meth:`AuditTrail.append` raises :class:`AuditError` the record was not
written, and the action it records must not go ahead (an approval is refused,
a mode change is refused, a user is not added). An action that then fails is
recorded by a record of its own (``setpoint_write`` then
``setpoint_write_result``).

Actions the runtime, the operator screen and the admin command record (the
field is a free string; these are the ones in use):

==============================  ==============================================================
``recommendation_approved``     an operator's electronic signature approving a recommendation
``recommendation_rejected``     an operator's electronic signature rejecting one, with the reason
``mode_requested``              an engineer requested off, advisory or closed loop
``state_changed``               the runtime's state changed (the reason in the details)
``setpoint_write``              setpoints about to be written to the PLC
``setpoint_write_result``       the outcome of that write (ok, refused, mismatch, link_error)
``alarm_raised``                an alarm was raised
``alarm_cleared``               an alarm was cleared
``config_loaded``               the runtime loaded its configuration and model (files and their digests)
``nmpc_reenabled``              an engineer put the NMPC back in charge after it stood down for the recipe
``model_approved``              ``bioreactor-mpc model approve``: an engineer approved a calibrated parameter file (its sha256)
``user_added``                  ``bioreactor-mpc users add``
``user_add_failed``             a user recorded as added could not be stored
``password_changed``            ``bioreactor-mpc users passwd``
``role_changed``                ``bioreactor-mpc users role``
``user_disabled``               ``bioreactor-mpc users disable``
==============================  ==============================================================

Tables: ``audit`` (one row per record) and ``audit_head`` (one row: the last
record's number and hash).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from controller.ports import HistoryUnavailableError
from interfaces.history import read_only_uri, sqlite_problem, storage_problem
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first record."""
HEAD_LOG_EVERY = 100
"""The head (last number and hash) is logged as ``audit_head`` at every record whose number is a multiple of this."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, wall_utc TEXT NOT NULL, process_time_h REAL, actor TEXT NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL, wall_utc TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: DELETE refused'); END;
CREATE TRIGGER IF NOT EXISTS audit_head_no_delete BEFORE DELETE ON audit_head
    BEGIN SELECT RAISE(ABORT, 'the audit trail head cannot be deleted'); END;
"""

_COLUMNS = "seq, wall_utc, process_time_h, actor, action, subject, details, prev_hash, hash"


class AuditError(BioreactorMPCError, RuntimeError):
    """The audit trail cannot be opened, written or read; when raised by an append, the action it records must be refused."""


class AuditUnavailableError(AuditError, HistoryUnavailableError):
    """The history file cannot be written now (disk full, read-only, deleted or replaced, busy); the trail stays usable and appends again once the cause is gone."""


@dataclass(frozen=True)
class AuditRecord:
    """One record of the audit trail, as written."""

    seq: int
    """1, 2, 3 … without gaps."""
    wall_utc: str
    """When it was written: ISO 8601, UTC."""
    process_time_h: float | None
    """The batch's process time, when the record belongs to a running batch."""
    actor: str
    """A user name, ``runtime`` or ``admin-cli``."""
    action: str
    subject: str
    """What it is about: ``cycle 42``, ``SP.*``, ``user alice``."""
    details: Mapping[str, Any]
    prev_hash: str
    """The previous record's ``hash`` (:data:`GENESIS_HASH` for the first)."""
    hash: str
    """SHA-256 (hex) of this record's content and ``prev_hash`` (:func:`record_hash`)."""


@dataclass(frozen=True)
class AuditHead:
    """The number and hash of the last record: what to keep outside the file to detect a rewrite of it."""

    seq: int
    hash: str


@dataclass(frozen=True)
class AuditVerification:
    """What :meth:`AuditTrail.verify` found."""

    ok: bool
    """No problem found."""
    records: int
    problems: list[str] = field(default_factory=list)
    """One line per problem, starting with the sequence number it concerns."""
    head: AuditHead | None = None
    """The head stored in the file (compare it with one exported earlier)."""


def canonical_json(value: Any) -> str:
    """The JSON the hashes are computed over: sorted keys, no whitespace, UTF-8 text, NaN and ±Inf as null.

    Raises :class:`TypeError` for a value JSON cannot represent.
    """
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(seq: int, wall_utc: str, process_time_h: float | None, actor: str, action: str, subject: str, details: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) over the canonical JSON of ``[seq, wall_utc, process_time_h, actor, action, subject, details, prev_hash]``."""
    content = canonical_json([seq, wall_utc, process_time_h, actor, action, subject, details, prev_hash])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as JSON types: non-finite floats to None, tuples to lists, enums to their values, numpy scalars to Python's."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {(str(k.value) if isinstance(k, Enum) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item())
    raise TypeError(f"a value of type {type(value).__name__} cannot be recorded as JSON")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class AuditTrail:
    """The audit trail in the SQLite file at ``path`` (the history's file; created if missing, unless ``read_only``).

    ``read_only`` opens the file without writing to it (``audit verify`` of an
    archived copy); appends then raise :class:`AuditError`. ``timeout_s`` is
    how long an append waits for another writer (the runtime, the screen)
    before it gives up. Safe to share between threads.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False, timeout_s: float = 10.0, head_log_every: int = HEAD_LOG_EVERY) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._head_log_every = head_log_every
        self._lock = threading.Lock()
        try:
            if read_only:
                if not self.path.is_file():
                    raise AuditError(f"{self.path}: no such history file")
                self._db = sqlite3.connect(read_only_uri(self.path), uri=True, isolation_level=None, timeout=timeout_s, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                problem = storage_problem(self.path)  # before SQLite maps anything of a file it cannot write
                if problem is not None:
                    raise AuditUnavailableError(f"{self.path}: cannot open the audit trail: {problem}")  # an OSError too: passed on below
                self._db = sqlite3.connect(self.path, isolation_level=None, timeout=timeout_s, check_same_thread=False)
                self._db.execute("PRAGMA mmap_size=0")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(SCHEMA)
            self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            found = os.stat(self.path)
        except sqlite3.Error as error:
            self._discard_connection()
            problem = None if read_only else storage_problem(self.path) or sqlite_problem(error)
            if problem is not None:
                raise AuditUnavailableError(f"{self.path}: cannot open the audit trail: {problem}") from error
            raise AuditError(f"{self.path}: cannot open the audit trail: {error}") from error
        except AuditError:
            raise
        except OSError as error:
            self._discard_connection()
            raise AuditError(f"{self.path}: cannot open the audit trail: {error}") from error
        self._identity = (found.st_dev, found.st_ino)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def append(self, *, actor: str, action: str, subject: str, details: Mapping[str, Any], process_time_h: float | None = None) -> AuditRecord:
        """Append one record, atomically, and return it as written.

        Raises :class:`AuditError`, naming the file and why, when the record
        cannot be written (the file is read-only or full, another writer held
        it beyond the timeout, the details are not JSON): **the caller must
        then refuse the action the record was for**. Nothing is written in
        that case.

        The record continues the chain from the stored head. Normally that is
        the last record; if the last records were deleted, the new record
        keeps their number and hash as its predecessor (logged as
        ``audit_chain_break``), so the deletion stays visible to
        :meth:`verify` rather than being covered by the next append.
        """
        what = f"{action!r} on {subject!r}"
        for name, text in (("actor", actor), ("action", action), ("subject", subject)):
            if not isinstance(text, str) or not text.strip():
                raise AuditError(f"{self.path}: cannot record {what}: the {name} is empty")
        if not isinstance(details, Mapping):
            raise AuditError(f"{self.path}: cannot record {what}: details must be a mapping, got a {type(details).__name__}")
        try:
            plain_details = _plain(details)
            details_text = canonical_json(plain_details)
        except (TypeError, ValueError) as error:
            raise AuditError(f"{self.path}: cannot record {what}: details: {error}") from error
        try:
            time_h = None if process_time_h is None or not math.isfinite(float(process_time_h)) else float(process_time_h)
        except (TypeError, ValueError):
            raise AuditError(f"{self.path}: cannot record {what}: process_time_h {process_time_h!r} is not a number") from None
        with self._lock:
            problem = None if self.read_only else storage_problem(self.path, self._identity)
            if problem is not None:
                raise AuditUnavailableError(f"{self.path}: cannot write the audit record {what}: {problem}; the action it records must not go ahead")
            try:
                self._rollback()  # a transaction left open by an earlier failure
                self._db.execute("BEGIN IMMEDIATE")
                last = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                stored_head = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
                head = AuditHead(int(stored_head[0]), str(stored_head[1])) if stored_head is not None else AuditHead(0, GENESIS_HASH)
                last_seq, last_hash = (int(last[0]), str(last[1])) if last is not None else (0, GENESIS_HASH)
                if (head.seq, head.hash) != (last_seq, last_hash):
                    log.error("audit_chain_break", path=str(self.path), head_seq=head.seq, head_hash=head.hash, last_seq=last_seq, last_hash=last_hash)
                seq = max(head.seq, last_seq) + 1
                wall_utc = _now()
                digest = record_hash(seq, wall_utc, time_h, actor, action, subject, plain_details, head.hash)
                self._db.execute(
                    f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # a fixed column list
                    (seq, wall_utc, time_h, actor, action, subject, details_text, head.hash, digest),
                )
                self._db.execute(
                    "INSERT INTO audit_head (id, seq, hash, wall_utc) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, wall_utc = excluded.wall_utc",
                    (seq, digest, wall_utc),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                problem = sqlite_problem(error) if self.read_only else storage_problem(self.path, self._identity) or sqlite_problem(error)
                if problem is None:
                    raise AuditError(f"{self.path}: cannot write the audit record {what}: {error}; the action it records must not go ahead") from error
                raise AuditUnavailableError(f"{self.path}: cannot write the audit record {what}: {problem}; the action it records must not go ahead") from error
        if seq % self._head_log_every == 0:
            log.info("audit_head", path=str(self.path), seq=seq, hash=digest)
        return AuditRecord(seq, wall_utc, time_h, actor, action, subject, plain_details, head.hash, digest)

    # ------------------------------------------------------------------ reading

    def head(self) -> AuditHead | None:
        """The stored head (the last record's number and hash), or None before the first record."""
        with self._lock:
            try:
                if not self._has_tables():
                    return None
                row = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            except sqlite3.Error as error:
                raise AuditError(f"{self.path}: cannot read the audit trail's head: {error}") from error
        return AuditHead(int(row[0]), str(row[1])) if row is not None else None

    def records(self, *, since_seq: int = 0, limit: int | None = None, action: str | None = None) -> list[AuditRecord]:
        """Records after ``since_seq``, oldest first, at most ``limit`` of them; only those of ``action`` when given."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        with self._lock:
            try:
                if not self._has_tables():
                    return []
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM audit WHERE seq > ? AND (? IS NULL OR action = ?) ORDER BY seq LIMIT ?",  # a fixed column list
                    (since_seq, action, action, -1 if limit is None else limit),
                ).fetchall()
            except sqlite3.Error as error:
                raise AuditError(f"{self.path}: cannot read the audit trail: {error}") from error
        records = []
        for row in rows:
            try:
                details = json.loads(row[6])
            except ValueError as error:
                raise AuditError(f"{self.path}: audit record seq {row[0]}: details are not JSON ({error})") from error
            records.append(AuditRecord(row[0], row[1], row[2], row[3], row[4], row[5], details, row[7], row[8]))
        return records

    def verify(self) -> AuditVerification:
        """Check the whole chain and the head; every problem found names the sequence number it concerns.

        Finds a record whose content was altered (its hash no longer matches),
        deleted records (a gap in the numbers; at the end, the head ahead of
        the last record), a record altered with its hash recomputed (the next
        record's ``prev_hash`` no longer matches), reordered records, a first
        record that does not start from :data:`GENESIS_HASH`, and a head that
        does not match the last record. It cannot find a rewrite of the whole
        file that recomputes every hash and the head: compare ``head`` with
        one kept elsewhere for that.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN")  # one snapshot, while others append
                try:
                    if not self._has_tables():
                        return AuditVerification(ok=True, records=0)
                    return self._verify()
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise AuditError(f"{self.path}: cannot read the audit trail: {error}") from error

    def _verify(self) -> AuditVerification:
        position_of = {str(digest): int(seq) for seq, digest in self._db.execute("SELECT seq, hash FROM audit")}
        stored_head = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        head = AuditHead(int(stored_head[0]), str(stored_head[1])) if stored_head is not None else None
        problems: list[str] = []
        count = 0
        expected = 1
        previous_hash = GENESIS_HASH
        last: AuditHead | None = None
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq"):  # a fixed column list
            seq, wall_utc, time_h, actor, action, subject, details_text, prev_hash, digest = row
            count += 1
            if not isinstance(seq, int) or seq < 1:
                problems.append(f"seq {seq}: not a valid sequence number (the trail starts at 1)")
                continue
            found: list[str] = []
            if seq > expected:
                problems.append(_missing(expected, seq - 1, "deleted"))
            elif prev_hash != previous_hash:
                came_after = position_of.get(prev_hash)
                if came_after is not None:
                    found.append(f"out of order: it was written after the record now at seq {came_after}, not after seq {seq - 1} (records reordered)")
                elif seq == 1:
                    found.append(f"broken genesis: its prev_hash is {str(prev_hash)[:16]}…, the first record's must be 64 zeros")
                else:
                    found.append(
                        f"its prev_hash does not match the hash of seq {seq - 1} (seq {seq - 1} was altered and its hash recomputed, or records were removed and renumbered)"
                    )
            try:
                recomputed = record_hash(seq, wall_utc, time_h, actor, action, subject, json.loads(details_text), prev_hash)
            except (TypeError, ValueError):
                recomputed = None
            if recomputed != digest:
                found.append("altered: its content does not match its hash")
            if found:
                problems.append(f"seq {seq}: " + "; ".join(found))
            expected = seq + 1
            previous_hash = str(digest)
            last = AuditHead(seq, str(digest))
        problems.extend(_head_problems(head, last))
        return AuditVerification(ok=not problems, records=count, problems=problems, head=head)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers

    def _has_tables(self) -> bool:
        found = self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('audit', 'audit_head')").fetchone()
        return int(found[0]) == 2

    def _discard_connection(self) -> None:
        """Close the connection of an open that failed (an open connection would keep the file, and its file system, busy)."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()

    def _rollback(self) -> None:
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as error:  # the error that led here is the one reported; the next append rolls back first
            log.warning("audit_rollback_failed", path=str(self.path), error=str(error))


def _missing(first: int, last: int, why: str) -> str:
    if first == last:
        return f"seq {first}: missing ({why})"
    return f"seq {first} to {last}: missing ({last - first + 1} records {why})"


def _head_problems(head: AuditHead | None, last: AuditHead | None) -> list[str]:
    """How the stored head disagrees with the last record, if it does."""
    if head is None:
        return [] if last is None else [f"seq {last.seq}: the head (audit_head) is missing, so deletions at the end cannot be checked"]
    if last is None:
        return [_missing(1, head.seq, "deleted: the head records them, the trail is empty")]
    if head.seq > last.seq:
        return [_missing(last.seq + 1, head.seq, f"deleted from the end: the head records seq {head.seq}, the last record is seq {last.seq}")]
    if head.seq < last.seq:
        return [f"seq {head.seq + 1} to {last.seq}: written after the head (seq {head.seq}): not appended through the audit trail"]
    if head.hash != last.hash:
        return [f"seq {last.seq}: the last record's hash does not match the head's (the last record was replaced)"]
    return []
