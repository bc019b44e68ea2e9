"""The audit trail: append-only records of who did what, hash-chained and MAC'd with a key kept outside the history's SQLite file.

Every record names its actor (a user name, or ``runtime``), its action, what
it is about (``subject``) and a JSON object of details, with the wall-clock
time (UTC) and the process time when there is one. Records are numbered 1, 2,
3 … without gaps, and each carries the SHA-256 of its own content and of the
record before it (:func:`record_hash`); the number and hash of the last
record (the **head**) are kept in a second table, updated in the same
transaction. The chain needs no key: anyone can check it.

**Against someone who can write the file**, three things more
(docs/audit-and-users.md, section 1, has the threat model):

- **a key outside the history** (:mod:`interfaces.audit_keys`): with one,
  every record carries the key's id and an HMAC-SHA256 over its number and
  content (:func:`record_mac_content`), so a record altered, renumbered,
  forged or appended without the key is named even when the chain was
  recomputed. Once a trail is MAC'd, appends without its key are refused.
  :meth:`AuditTrail.rotate_key` records a rotation (MAC'd by the old key,
  naming the new); :meth:`AuditTrail.replace_key` starts a new key after a
  loss, saying why;
- **checkpoints outside** (:mod:`interfaces.audit_export`):
  :meth:`AuditTrail.checkpoint` exports the head, MAC'd, to a file on another
  path, syslog or an HTTP endpoint; a trail made with ``checkpoint_every``
  does so every that many records and at :meth:`AuditTrail.close`. They are
  what finds a trail truncated with its head rewound, an older copy of the
  file, or a trail rewritten by someone who holds the key;
- **the process history covered** (:mod:`interfaces.audit_coverage`): each
  checkpoint first appends a ``history_checkpoint`` record with the count and
  digest, per table, of the history rows written since the last one; each
  row carries its own MAC (:class:`interfaces.history.SqliteHistory`).

:meth:`AuditTrail.verify` runs a list of checkers (:data:`DEFAULT_CHECKERS`,
:func:`checkpoints_checker`, and any other :data:`Checker`: a function of a
:class:`VerifyContext` returning :class:`Findings`) on one snapshot, and
fails when the trail is missing or empty for a history that has runs.
Without keys it checks the chain, the digests and the checkpoints, and its
notes say which MACs it did not check. Triggers refuse ``UPDATE`` and
``DELETE`` on the table: an honest barrier against mistakes, not the
security mechanism.

**The contract for callers**: record first, then act. When
:meth:`AuditTrail.append` raises :class:`AuditError` the record was not
written, and the action it records must not go ahead (an approval is refused,
a mode change is refused, a user is not added). An action that then fails is
recorded by a record of its own (``setpoint_write`` then
``setpoint_write_result``).

**For records about a stored row** (a user, a session): put
:func:`row_digest` of the row in the details (``row_digest("users", name,
role, …)``), and add a :data:`Checker` that recomputes it from the row as
stored and compares it with the last record's (:meth:`VerifyContext.audit_records`).

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
``history_checkpoint``          the process history's rows since the last one, counted and digested per table
``audit_key_rotated``           the audit key rotated: MAC'd by the old key, naming the new one
``audit_key_replaced``          a new audit key after the old one was lost, with the reason
==============================  ==============================================================

Tables: ``audit`` (one row per record, with ``key_id`` and ``mac``) and
``audit_head`` (one row: the last record's number and hash).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from controller.ports import HistoryUnavailableError
from interfaces.audit_coverage import HISTORY_CHECKPOINT, Findings, check_history, history_checkpoint_details
from interfaces.audit_export import Checkpoint, CheckpointSink, ReadCheckpoint, check_checkpoints, export_checkpoint, make_checkpoint
from interfaces.audit_keys import AuditKey, AuditKeyError, AuditKeyring, canonical_json, load_key_file, plain, row_digest
from interfaces.history import read_only_uri, sqlite_problem, storage_problem
from plant_models.errors import BioreactorMPCError

__all__ = [
    "GENESIS_HASH",
    "HISTORY_CHECKPOINT",
    "KEY_REPLACED",
    "KEY_ROTATED",
    "AuditError",
    "AuditHead",
    "AuditRecord",
    "AuditTrail",
    "AuditUnavailableError",
    "AuditVerification",
    "Checker",
    "Findings",
    "VerifyContext",
    "canonical_json",
    "check_chain",
    "check_history_rows",
    "check_macs",
    "check_presence",
    "checkpoints_checker",
    "record_hash",
    "row_digest",
]

log = structlog.get_logger(__name__)

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first record."""
HEAD_LOG_EVERY = 100
"""The head (last number and hash) is logged as ``audit_head`` at every record whose number is a multiple of this."""
KEY_ROTATED = "audit_key_rotated"
"""The audit action of a key rotation: MAC'd by the old key, naming the new one (``details.to_key_id``); every later record carries the new key."""
KEY_REPLACED = "audit_key_replaced"
"""The audit action that starts a new key after the old one was lost: MAC'd by the new key, naming the lost one (``details.lost_key_id``)."""
_MAC_PURPOSE = "audit-record"

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, wall_utc TEXT NOT NULL, process_time_h REAL, actor TEXT NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, key_id TEXT, mac TEXT);
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
    key_id: str | None = None
    """The id of the audit key that MAC'd the record; None for a record written without a key."""
    mac: str | None = None
    """HMAC-SHA256 (hex) by that key over the record's number and content (:func:`record_mac_content`)."""


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
    """One line per problem, starting with what it concerns (``seq 12``, ``cycles row 7``, a checkpoints file's line)."""
    head: AuditHead | None = None
    """The head stored in the file (compare it with one exported earlier)."""
    notes: list[str] = field(default_factory=list)
    """What was not checked, or could not be (no key, rows that predate the MACs), one line each; not problems."""


def record_hash(seq: int, wall_utc: str, process_time_h: float | None, actor: str, action: str, subject: str, details: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) over the canonical JSON of ``[seq, wall_utc, process_time_h, actor, action, subject, details, prev_hash]``."""
    content = canonical_json([seq, wall_utc, process_time_h, actor, action, subject, details, prev_hash])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def record_mac_matches(record: AuditRecord, key: AuditKey) -> bool:
    """Whether ``record`` carries a MAC by ``key`` that matches its number and content (False for a record MAC'd by another key or none)."""
    if record.key_id != key.key_id or not record.mac:
        return False
    content = record_mac_content(record.seq, record.wall_utc, record.process_time_h, record.actor, record.action, record.subject, record.details, key.key_id)
    return key.matches(_MAC_PURPOSE, content, record.mac)


def record_mac_content(seq: int, wall_utc: str, process_time_h: float | None, actor: str, action: str, subject: str, details: Any, key_id: str) -> list[Any]:
    """What a record's MAC is computed over: its number, its content and the key's id (not ``prev_hash``: a MAC names the one record altered)."""
    return [seq, wall_utc, process_time_h, actor, action, subject, details, key_id]


def key_after(action: str, details: Any, key_id: str | None) -> str | None:
    """The id of the key the record after this one must carry: the new one after a rotation or replacement, else this record's (None: any key, or none)."""
    if action in (KEY_ROTATED, KEY_REPLACED) and isinstance(details, Mapping) and isinstance(details.get("to_key_id"), str):
        return str(details["to_key_id"])
    return key_id


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class StoredRecord:
    """A record as read back for checking: its details as stored text, which may no longer be JSON."""

    seq: Any
    wall_utc: Any
    process_time_h: Any
    actor: Any
    action: Any
    subject: Any
    details_text: Any
    prev_hash: Any
    hash: Any
    key_id: Any
    mac: Any

    @cached_property
    def details(self) -> Any | None:
        """The details, or None when they are not JSON any more."""
        try:
            return json.loads(self.details_text)
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class VerifyContext:
    """What every checker is given: the trail and the history, read in one snapshot."""

    path: Path
    db: sqlite3.Connection
    """The history file, inside a read transaction: every checker sees the same snapshot."""
    records: Sequence[StoredRecord]
    """Every record, by ``seq``."""
    head: AuditHead | None
    keys: AuditKeyring | None
    """The keys to check MACs with; None when verifying without a key."""
    has_trail: bool
    """Whether the ``audit`` table exists."""

    def audit_records(self) -> list[AuditRecord]:
        """The records whose details are still JSON, as :class:`AuditRecord` (for a checker that reads what they say, e.g. of users and sessions)."""
        return [
            AuditRecord(r.seq, r.wall_utc, r.process_time_h, r.actor, r.action, r.subject, r.details, r.prev_hash, r.hash, r.key_id, r.mac)
            for r in self.records
            if isinstance(r.details, Mapping)
        ]


Checker = Callable[[VerifyContext], Findings]
"""One check of :meth:`AuditTrail.verify`: returns problems (not intact) and notes (not checked). Add one to check more (users, sessions)."""


def check_chain(context: VerifyContext) -> Findings:
    """The hash chain and the head: records altered, deleted, reordered, a broken genesis, a head that does not match the last record."""
    position_of = {str(r.hash): int(r.seq) for r in context.records if isinstance(r.seq, int)}
    problems: list[str] = []
    expected = 1
    previous_hash = GENESIS_HASH
    last: AuditHead | None = None
    for r in context.records:
        seq = r.seq
        if not isinstance(seq, int) or seq < 1:
            problems.append(f"seq {seq}: not a valid sequence number (the trail starts at 1)")
            continue
        found: list[str] = []
        if seq > expected:
            problems.append(_missing(expected, seq - 1, "deleted"))
        elif r.prev_hash != previous_hash:
            came_after = position_of.get(r.prev_hash)
            if came_after is not None:
                found.append(f"out of order: it was written after the record now at seq {came_after}, not after seq {seq - 1} (records reordered)")
            elif seq == 1:
                found.append(f"broken genesis: its prev_hash is {str(r.prev_hash)[:16]}…, the first record's must be 64 zeros")
            else:
                found.append(f"its prev_hash does not match the hash of seq {seq - 1} (seq {seq - 1} was altered and its hash recomputed, or records were removed and renumbered)")
        try:
            recomputed = None if r.details is None else record_hash(seq, r.wall_utc, r.process_time_h, r.actor, r.action, r.subject, r.details, r.prev_hash)
        except (TypeError, ValueError):
            recomputed = None
        if recomputed != r.hash:
            found.append("altered: its content does not match its hash")
        if found:
            problems.append(f"seq {seq}: " + "; ".join(found))
        expected = seq + 1
        previous_hash = str(r.hash)
        last = AuditHead(seq, str(r.hash))
    if context.has_trail:
        problems.extend(_head_problems(context.head, last))
    return Findings(problems)


def check_macs(context: VerifyContext) -> Findings:
    """Each record's MAC, by the key it names, and the keys' order (rotations); records without a MAC after MAC'd ones.

    Without keys, says how many MACs it could not check. A trail with no MAC
    at all is a problem when keys are given (written, or rewritten, without
    the key), a note otherwise.
    """
    findings = Findings()
    records = [r for r in context.records if isinstance(r.seq, int)]
    if not records:
        return findings
    keyed = [r for r in records if r.key_id and r.mac]
    if not keyed:
        span = _seq_span(records[0].seq, records[-1].seq)
        if context.keys is not None:
            findings.problems.append(f"{span}: no record carries a MAC: the trail was written without a key, or rewritten by someone without it")
        else:
            findings.notes.append(f"{span}: no record carries a MAC (written without an audit key): whoever can write the file could have rewritten them")
        return findings
    first = keyed[0].seq
    if first > records[0].seq:
        findings.notes.append(f"{_seq_span(records[0].seq, first - 1)}: written before the trail had an audit key: checked by the hash chain (and checkpoints) only")
    no_mac, altered, unknown, unchecked = [], [], [], 0
    expected: str | None = None
    expected_since = first
    for r in records:
        if r.seq < first:
            continue
        if not (r.key_id and r.mac):
            no_mac.append(r.seq)
            continue
        if expected is not None and r.key_id != expected and r.action != KEY_REPLACED:
            findings.problems.append(f"seq {r.seq}: MAC'd with key {r.key_id}, but the trail uses key {expected} since seq {expected_since}")
        if r.action == KEY_REPLACED:
            lost = r.details.get("lost_key_id") if isinstance(r.details, Mapping) else None
            reason = r.details.get("reason") if isinstance(r.details, Mapping) else None
            findings.notes.append(
                f"seq {r.seq}: the audit key {lost} was replaced by {r.key_id} without it (reason: {reason}); the records before are checked with key {lost} if given"
            )
        if context.keys is None:
            unchecked += 1
        else:
            key = context.keys.get(str(r.key_id))
            content = record_mac_content(r.seq, r.wall_utc, r.process_time_h, r.actor, r.action, r.subject, r.details, str(r.key_id))
            if key is None:
                unknown.append(r.seq)
            elif r.details is None or not key.matches(_MAC_PURPOSE, content, str(r.mac)):
                altered.append(r.seq)
        following = key_after(str(r.action), r.details, str(r.key_id))
        if following != expected:
            expected, expected_since = following, r.seq
    findings.problems.extend(_seq_lines(no_mac, "no MAC, though the records before it have one: appended without the key, or its MAC removed"))
    findings.problems.extend(_seq_lines(altered, "altered: its MAC does not match (changed, or renumbered, by someone without the key)"))
    if unknown:
        missing = sorted({str(r.key_id) for r in records if r.seq in set(unknown)})
        given = context.keys.describe() if context.keys is not None else "none"
        findings.problems.extend(_seq_lines(unknown, f"MAC not checked: key {', '.join(missing)} is not among the keys given ({given})"))
    if unchecked:
        findings.notes.append(f"{unchecked} record MACs NOT checked: no key given; the hash chain and the checkpoints were checked")
    return findings


def check_presence(context: VerifyContext) -> Findings:
    """A history that has runs, cycles or writes must have an audit trail with records: missing or empty tables are a problem."""
    if context.records:
        return Findings()
    tables = {str(row[0]) for row in context.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    counts = {name: int(context.db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]) for name in ("runs", "cycles", "writes") if name in tables}  # fixed names
    held = [f"{count} {name}" for name, count in counts.items() if count]
    if not held:
        return Findings()
    state = "empty" if context.has_trail else "missing (no audit table)"
    return Findings([f"the audit trail is {state}, but the history holds {', '.join(held)}: its records were deleted"])


def check_history_rows(context: VerifyContext) -> Findings:
    """The process history's rows against their MACs and the ``history_checkpoint`` records (:mod:`interfaces.audit_coverage`)."""
    checkpoints = [(int(r.seq), r.details) for r in context.records if r.action == HISTORY_CHECKPOINT and isinstance(r.details, Mapping)]
    return check_history(context.db, checkpoints, context.keys)


def checkpoints_checker(read: Sequence[ReadCheckpoint], read_problems: Sequence[str] = ()) -> Checker:
    """A checker comparing exported checkpoints (:func:`interfaces.audit_export.read_checkpoints`) with the trail."""

    def check(context: VerifyContext) -> Findings:
        hashes = {int(r.seq): str(r.hash) for r in context.records if isinstance(r.seq, int)}
        found = check_checkpoints(read, history=context.path.name, hashes=hashes, keys=context.keys)
        return Findings([*read_problems, *found.problems], found.notes)

    return check


DEFAULT_CHECKERS: tuple[Checker, ...] = (check_chain, check_macs, check_presence, check_history_rows)
"""What :meth:`AuditTrail.verify` checks unless told otherwise."""


# --------------------------------------------------------------------------- the trail


class AuditTrail:
    """The audit trail in the SQLite file at ``path`` (the history's file; created if missing, unless ``read_only``).

    ``read_only`` opens the file without writing to it (``audit verify`` of an
    archived copy); appends then raise :class:`AuditError`. ``timeout_s`` is
    how long an append waits for another writer (the runtime, the screen)
    before it gives up. Safe to share between threads.

    ``key`` MACs every record appended; once a trail has MAC'd records, an
    append without the key (or with another one) is refused. ``sinks`` and
    ``checkpoint_every`` make the trail checkpoint itself (:meth:`checkpoint`)
    every that many records and at :meth:`close`; ``export_in_background``
    sends the checkpoints to the sinks from a worker thread (the runtime: an
    endpoint that is slow to answer must not hold up a cycle), which
    :meth:`close` waits for.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        timeout_s: float = 10.0,
        head_log_every: int = HEAD_LOG_EVERY,
        key: AuditKey | None = None,
        sinks: Sequence[CheckpointSink] = (),
        checkpoint_every: int | None = None,
        export_in_background: bool = False,
    ) -> None:
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
        self.path = Path(path)
        self.read_only = read_only
        self._head_log_every = head_log_every
        self._key = key
        self._sinks = tuple(sinks)
        self._exporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-checkpoints") if export_in_background and self._sinks else None
        self._checkpoint_every = checkpoint_every
        self._last_checkpoint_seq = 0
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
                self._refuse_a_deleted_trail()
                self._db.executescript(SCHEMA)
                for column in ("key_id", "mac"):  # a trail written before the audit key
                    if column not in self._audit_columns():
                        self._db.execute(f"ALTER TABLE audit ADD COLUMN {column} TEXT")
            self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            found = os.stat(self.path)
        except sqlite3.Error as error:
            self._discard_connection()
            problem = None if read_only else storage_problem(self.path) or sqlite_problem(error)
            if problem is not None:
                raise AuditUnavailableError(f"{self.path}: cannot open the audit trail: {problem}") from error
            raise AuditError(f"{self.path}: cannot open the audit trail: {error}") from error
        except AuditError:
            self._discard_connection()
            raise
        except OSError as error:
            self._discard_connection()
            raise AuditError(f"{self.path}: cannot open the audit trail: {error}") from error
        self._identity = (found.st_dev, found.st_ino)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()

    @property
    def key_id(self) -> str | None:
        """The id of the key this trail MACs its appends with (None without one)."""
        return self._key.key_id if self._key is not None else None

    # ------------------------------------------------------------------ writing

    def append(self, *, actor: str, action: str, subject: str, details: Mapping[str, Any], process_time_h: float | None = None) -> AuditRecord:
        """Append one record, atomically, and return it as written.

        Raises :class:`AuditError`, naming the file and why, when the record
        cannot be written (the file is read-only or full, another writer held
        it beyond the timeout, the details are not JSON, the trail is MAC'd
        and this trail has no key or another one): **the caller must then
        refuse the action the record was for**. Nothing is written in that
        case.

        The record continues the chain from the stored head. Normally that is
        the last record; if the last records were deleted, the new record
        keeps their number and hash as its predecessor (logged as
        ``audit_chain_break``), so the deletion stays visible to
        :meth:`verify` rather than being covered by the next append.
        """
        if not isinstance(details, Mapping):
            raise AuditError(f"{self.path}: cannot record {action!r} on {subject!r}: details must be a mapping, got a {type(details).__name__}")
        record = self._append(actor=actor, action=action, subject=subject, details=lambda _db, _expected: details, process_time_h=process_time_h)
        if self._checkpoint_every is not None and record.seq - self._last_checkpoint_seq >= self._checkpoint_every:
            self._checkpoint_quietly(f"every {self._checkpoint_every} records")
        return record

    def checkpoint(self, reason: str = "requested", *, actor: str = "runtime") -> Checkpoint:
        """Record a ``history_checkpoint`` (the process history's rows since the last one), then export the head, that record, to every sink.

        Raises :class:`AuditError` when the record cannot be written; a sink
        that fails is logged (``audit_checkpoint_export_failed``) and does not
        raise. Returns the checkpoint as exported.
        """

        def details(db: sqlite3.Connection, _expected: str | None) -> Mapping[str, Any]:
            previous = db.execute("SELECT details FROM audit WHERE action = ? ORDER BY seq DESC LIMIT 1", (HISTORY_CHECKPOINT,)).fetchone()
            try:
                earlier = json.loads(previous[0]) if previous is not None else None
            except ValueError:
                earlier = None
            return history_checkpoint_details(db, earlier)

        record = self._append(actor=actor, action=HISTORY_CHECKPOINT, subject="history", details=details, process_time_h=None)
        key = self._key if self._key is not None and self._key.key_id == record.key_id else None
        exported = make_checkpoint(history=self.path.name, seq=record.seq, hash=record.hash, wall_utc=record.wall_utc, reason=reason, key=key)
        if self._exporter is not None:
            self._exporter.submit(export_checkpoint, exported, self._sinks)  # a slow endpoint must not hold up the control cycle
        else:
            export_checkpoint(exported, self._sinks)
        self._last_checkpoint_seq = record.seq
        log.info("audit_checkpoint", path=str(self.path), seq=record.seq, hash=record.hash, reason=reason, sinks=len(self._sinks))
        return exported

    def rotate_key(self, new_key: AuditKey, *, actor: str) -> AuditRecord:
        """Append the rotation record (MAC'd by the current key, naming ``new_key``), then MAC every later append with ``new_key``."""
        old = self._key
        if old is None:
            raise AuditError(f"{self.path}: cannot rotate the audit key: this trail was opened without one (give the current key)")
        record = self._append(
            actor=actor,
            action=KEY_ROTATED,
            subject="audit key",
            details=lambda _db, expected: {"from_key_id": expected or old.key_id, "to_key_id": new_key.key_id},
            process_time_h=None,
        )
        with self._lock:
            self._key = new_key
        return record

    def replace_key(self, new_key: AuditKey, *, actor: str, reason: str) -> AuditRecord:
        """Start MAC'ing with ``new_key`` when the trail's key was lost: a record MAC'd by ``new_key`` naming the lost key and why.

        The records before it stay checkable by their hash chain, by the
        checkpoints exported outside, and by their MACs for whoever still has
        the lost key. A verifier trusts ``new_key`` only if given it.
        """
        if not reason.strip():
            raise AuditError(f"{self.path}: a key replacement needs a reason (it goes in the audit trail)")
        record = self._append(
            actor=actor,
            action=KEY_REPLACED,
            subject="audit key",
            details=lambda _db, expected: {"lost_key_id": expected, "to_key_id": new_key.key_id, "reason": reason},
            process_time_h=None,
            signing_key=new_key,
        )
        with self._lock:
            self._key = new_key
        return record

    def _append(
        self,
        *,
        actor: str,
        action: str,
        subject: str,
        details: Callable[[sqlite3.Connection, str | None], Mapping[str, Any]],
        process_time_h: float | None,
        signing_key: AuditKey | None = None,
    ) -> AuditRecord:
        """Append one record whose details are made inside the transaction (``details(db, expected_key_id)``); ``signing_key`` overrides the key check (a replacement)."""
        what = f"{action!r} on {subject!r}"
        for name, text in (("actor", actor), ("action", action), ("subject", subject)):
            if not isinstance(text, str) or not text.strip():
                raise AuditError(f"{self.path}: cannot record {what}: the {name} is empty")
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
                last = self._db.execute(f"SELECT seq, hash, action, details, {self._key_columns()} FROM audit ORDER BY seq DESC LIMIT 1").fetchone()  # fixed columns
                stored_head = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
                head = AuditHead(int(stored_head[0]), str(stored_head[1])) if stored_head is not None else AuditHead(0, GENESIS_HASH)
                last_seq, last_hash = (int(last[0]), str(last[1])) if last is not None else (0, GENESIS_HASH)
                expected = key_after(str(last[2]), _json_or_none(last[3]), last[4]) if last is not None else None
                key = signing_key if signing_key is not None else self._signing_key(expected, what)
                try:
                    plain_details = plain(details(self._db, expected))
                    details_text = canonical_json(plain_details)
                except (TypeError, ValueError) as error:
                    raise AuditError(f"{self.path}: cannot record {what}: details: {error}") from error
                if (head.seq, head.hash) != (last_seq, last_hash):
                    log.error("audit_chain_break", path=str(self.path), head_seq=head.seq, head_hash=head.hash, last_seq=last_seq, last_hash=last_hash)
                seq = max(head.seq, last_seq) + 1
                wall_utc = _now()
                digest = record_hash(seq, wall_utc, time_h, actor, action, subject, plain_details, head.hash)
                key_id = key.key_id if key is not None else None
                mac = key.mac(_MAC_PURPOSE, record_mac_content(seq, wall_utc, time_h, actor, action, subject, plain_details, key.key_id)) if key is not None else None
                self._db.execute(
                    f"INSERT INTO audit ({_COLUMNS}, key_id, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # a fixed column list
                    (seq, wall_utc, time_h, actor, action, subject, details_text, head.hash, digest, key_id, mac),
                )
                self._db.execute(
                    "INSERT INTO audit_head (id, seq, hash, wall_utc) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, wall_utc = excluded.wall_utc",
                    (seq, digest, wall_utc),
                )
                self._db.execute("COMMIT")
            except AuditError:
                self._rollback()
                raise
            except sqlite3.Error as error:
                self._rollback()
                problem = sqlite_problem(error) if self.read_only else storage_problem(self.path, self._identity) or sqlite_problem(error)
                if problem is None:
                    raise AuditError(f"{self.path}: cannot write the audit record {what}: {error}; the action it records must not go ahead") from error
                raise AuditUnavailableError(f"{self.path}: cannot write the audit record {what}: {problem}; the action it records must not go ahead") from error
        if seq % self._head_log_every == 0:
            log.info("audit_head", path=str(self.path), seq=seq, hash=digest)
        return AuditRecord(seq, wall_utc, time_h, actor, action, subject, plain_details, head.hash, digest, key_id, mac)

    def _signing_key(self, expected: str | None, what: str) -> AuditKey | None:
        """The key to MAC the next record with, given the key the trail expects (re-read from its file after a rotation elsewhere); raises when there is none."""
        key = self._key
        if expected is None or (key is not None and key.key_id == expected):
            return key
        if key is None:
            raise AuditError(
                f"{self.path}: cannot record {what}: the trail is MAC'd with audit key {expected} and no key was given "
                f"(--audit-key, or the environment variable BIOREACTOR_MPC_AUDIT_KEY); the action it records must not go ahead"
            )
        if key.path is not None:
            try:
                reread = load_key_file(key.path)
            except AuditKeyError as error:
                raise AuditError(f"{self.path}: cannot record {what}: {error}; the action it records must not go ahead") from error
            if reread.key_id == expected:
                log.info("audit_key_reloaded", path=str(self.path), key_file=str(key.path), key_id=expected)
                self._key = reread
                return reread
        where = f" (from {key.path})" if key.path is not None else ""
        raise AuditError(
            f"{self.path}: cannot record {what}: the trail is MAC'd with audit key {expected}, the key given{where} is {key.key_id}; the action it records must not go ahead"
        )

    def _checkpoint_quietly(self, reason: str) -> None:
        try:
            self.checkpoint(reason)
        except AuditError as error:  # the record that triggered it is written; the next one tries again
            log.warning("audit_checkpoint_failed", path=str(self.path), reason=reason, error=str(error))

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
                    f"SELECT {_COLUMNS}, {self._key_columns()} FROM audit WHERE seq > ? AND (? IS NULL OR action = ?) ORDER BY seq LIMIT ?",  # a fixed column list
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
            records.append(AuditRecord(row[0], row[1], row[2], row[3], row[4], row[5], details, row[7], row[8], row[9], row[10]))
        return records

    def verify(self, *, keys: AuditKeyring | None = None, checkers: Sequence[Checker] = DEFAULT_CHECKERS) -> AuditVerification:
        """Run every checker on one snapshot of the trail and the history; every problem names what it concerns.

        The default checkers (:data:`DEFAULT_CHECKERS`) find: a record
        altered (its hash, and with ``keys`` its MAC), deleted, reordered or
        renumbered; a head that does not match; records without a MAC after
        MAC'd ones, or MAC'd by a key other than the trail's; a trail missing
        or empty in a history that has runs; history rows altered, inserted or
        deleted. Without ``keys`` the MACs are not checked, and the notes say
        so. Add :func:`checkpoints_checker` to compare checkpoints exported
        outside, which is what finds a trail truncated with its head rewound,
        or rewritten whole.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN")  # one snapshot, while others append
                try:
                    context = self._context(keys)
                    problems: list[str] = []
                    notes: list[str] = []
                    for checker in checkers:
                        found = checker(context)
                        problems.extend(found.problems)
                        notes.extend(found.notes)
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise AuditError(f"{self.path}: cannot read the audit trail: {error}") from error
        return AuditVerification(ok=not problems, records=len(context.records), problems=problems, head=context.head, notes=notes)

    def _context(self, keys: AuditKeyring | None) -> VerifyContext:
        tables = {str(row[0]) for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        records: list[StoredRecord] = []
        if "audit" in tables:
            rows = self._db.execute(f"SELECT {_COLUMNS}, {self._key_columns()} FROM audit ORDER BY seq")  # a fixed column list
            records = [StoredRecord(*row) for row in rows]
        head = None
        if "audit_head" in tables:
            stored = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            head = AuditHead(int(stored[0]), str(stored[1])) if stored is not None else None
        return VerifyContext(self.path, self._db, records, head, keys, "audit" in tables)

    def close(self) -> None:
        """Close the file; a trail that checkpoints itself (``checkpoint_every``) checkpoints once more first (``shutdown``)."""
        if self._checkpoint_every is not None and not self.read_only:
            self._checkpoint_quietly("shutdown")
        if self._exporter is not None:
            self._exporter.shutdown(wait=True)  # the exports queued, each bounded by its sink's timeout
        for sink in self._sinks:
            sink.close()
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers

    def _refuse_a_deleted_trail(self) -> None:
        """Refuse to start a new trail (at seq 1) in a history whose runs were MAC'd: its trail was there, and was deleted.

        Appending would make a fresh chain that verifies, and hide the deletion.
        A history from before the audit key (no MACs) may start its trail.
        """
        tables = {str(row[0]) for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" not in tables or "audit_mac" not in {str(row[1]) for row in self._db.execute("PRAGMA table_info(runs)")}:
            return
        if "audit" in tables and self._db.execute("SELECT 1 FROM audit LIMIT 1").fetchone() is not None:
            return
        sealed = int(self._db.execute("SELECT COUNT(*) FROM runs WHERE audit_mac IS NOT NULL").fetchone()[0])
        if sealed:
            state = "is empty" if "audit" in tables else "is missing"
            raise AuditError(
                f"{self.path}: the audit trail {state}, but the history holds {sealed} runs MAC'd with an audit key: the trail was deleted. "
                "Nothing is appended (a new chain would hide that); keep this file as evidence, and restore the history from a backup or start a new history file"
            )

    def _audit_columns(self) -> set[str]:
        return {str(row[1]) for row in self._db.execute("PRAGMA table_info(audit)")}

    def _key_columns(self) -> str:
        """``key_id, mac``, or NULLs for a trail written before the audit key and opened read-only."""
        columns = self._audit_columns()
        return ", ".join(name if name in columns else "NULL" for name in ("key_id", "mac"))

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


def _json_or_none(text: Any) -> Any | None:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _seq_span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first} to {last}"


def _seq_lines(seqs: list[int], message: str) -> list[str]:
    """One line per run of consecutive numbers: ``seq 4 to 9: message``."""
    lines = []
    ordered = sorted(set(seqs))
    while ordered:
        first = last = ordered.pop(0)
        while ordered and ordered[0] == last + 1:
            last = ordered.pop(0)
        lines.append(f"{_seq_span(first, last)}: {message}")
    return lines


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
