"""The process history in the audit trail: ``history_checkpoint`` records, and the check of the history's rows against them.

Each row of the covered tables (:data:`interfaces.history.COVERED_COLUMNS`:
runs, readings, lab results, cycles, writes, state changes, alarms) carries
its own MAC (``audit_mac``, ``key_id:hmac``) written in the transaction that
wrote the row. A record per reading would swamp the trail, so instead a
``history_checkpoint`` audit record carries, per table, what was added since
the previous one: the rowid range, the count of rows and a SHA-256 over the
rows' digests (:func:`interfaces.audit_keys.row_digest` of
:func:`interfaces.history.row_content`). Rows that may still change (a run
not ended, a write awaiting its outcome, :data:`interfaces.history.OPEN_ROWS`)
are listed as ``open`` and digested by the first checkpoint after they are
final (``closed``).

:func:`check_history` then names, table by table: a row whose MAC does not
match (altered), a row without a MAC after MAC'd ones (inserted without the
key), rows missing from a checkpointed range (deleted), a range whose
content no longer gives the checkpoint's digest (altered, checkable without
the key), and says which rows predate coverage (no MAC, before the first
checkpoint) and which are covered by their MACs only (after the last).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from interfaces.audit_keys import AuditKeyring, row_digest
from interfaces.history import COVERED_COLUMNS, OPEN_ROWS, ROW_MAC_PURPOSE, row_content

HISTORY_CHECKPOINT = "history_checkpoint"
"""The audit action of a checkpoint of the process history."""
COVERAGE_VERSION = 1
"""The version of :data:`interfaces.history.COVERED_COLUMNS` a checkpoint was computed with."""


@dataclass(frozen=True)
class Findings:
    """What one check found: problems (the trail or history is not intact) and notes (what was not or could not be checked)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def covered_tables(db: sqlite3.Connection) -> list[str]:
    """The covered tables present in the file, in :data:`COVERED_COLUMNS` order."""
    present = {str(row[0]) for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [table for table in COVERED_COLUMNS if table in present]


def _selection(db: sqlite3.Connection, table: str) -> str:
    """The SQL list ``rowid, <covered columns>, audit_mac, <open>`` for ``table``, with NULL for a column an old file lacks."""
    present = {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}  # a fixed table name
    columns = [f'"{name}"' if name in present else "NULL" for name in COVERED_COLUMNS[table]]
    mac = "audit_mac" if "audit_mac" in present else "NULL"
    is_open = f"({OPEN_ROWS[table]})" if table in OPEN_ROWS else "0"
    return ", ".join(["rowid", *columns, mac, is_open])


def _rows(db: sqlite3.Connection, table: str, where: str = "1", parameters: tuple[Any, ...] = ()) -> Iterator[tuple[int, tuple[Any, ...], str | None, bool]]:
    """``(rowid, values, audit_mac, open)`` of the rows of ``table`` matching ``where``, by rowid."""
    width = len(COVERED_COLUMNS[table])
    for row in db.execute(f"SELECT {_selection(db, table)} FROM {table} WHERE {where} ORDER BY rowid", parameters):  # fixed names and conditions
        yield int(row[0]), tuple(row[1 : 1 + width]), row[1 + width], bool(row[2 + width])


def _digest_line(table: str, rowid: int, values: tuple[Any, ...]) -> bytes:
    return row_digest(*row_content(table, rowid, values)).encode("ascii") + b"\n"


def history_checkpoint_details(db: sqlite3.Connection, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The details of a new ``history_checkpoint`` record, continuing from the ``previous`` one's details (None for the first).

    Run inside the transaction that appends the record, so the rows counted
    are the rows as the record is written.
    """
    before = previous.get("tables", {}) if isinstance(previous, Mapping) else {}
    tables: dict[str, Any] = {}
    for table in covered_tables(db):
        mark = before.get(table) if isinstance(before.get(table), Mapping) else None
        after = int(mark["last_rowid"]) if mark is not None else 0
        earlier_open = sorted(int(r) for r in mark.get("open", [])) if mark is not None else []
        digest = hashlib.sha256()
        closed, still_open, new_open = [], [], []
        rows = 0
        found = {rowid: (values, is_open) for rowid, values, _mac, is_open in _rows(db, table, "rowid IN (SELECT value FROM json_each(?))", (json.dumps(earlier_open),))}
        for rowid in earlier_open:
            if rowid not in found:
                continue  # vanished: found by check_history as a deleted row
            values, is_open = found[rowid]
            if is_open:
                still_open.append(rowid)
            else:
                closed.append(rowid)
                digest.update(_digest_line(table, rowid, values))
        last = after
        for rowid, values, _mac, is_open in _rows(db, table, "rowid > ?", (after,)):
            rows += 1
            last = rowid
            if is_open:
                new_open.append(rowid)
            else:
                digest.update(_digest_line(table, rowid, values))
        tables[table] = {"after_rowid": after, "last_rowid": last, "rows": rows, "open": still_open + new_open, "closed": closed, "sha256": digest.hexdigest()}
    return {"version": COVERAGE_VERSION, "tables": tables}


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class CheckpointMark:
    """What one ``history_checkpoint`` record says of one table."""

    seq: int
    after_rowid: int
    last_rowid: int
    rows: int
    open: frozenset[int]
    closed: tuple[int, ...]
    sha256: str


def _marks(checkpoints: Sequence[tuple[int, Mapping[str, Any]]], table: str) -> tuple[list[CheckpointMark], list[str]]:
    marks, problems = [], []
    for seq, details in checkpoints:
        mark = details.get("tables", {}).get(table) if isinstance(details.get("tables"), Mapping) else None
        if mark is None:
            continue
        try:
            marks.append(
                CheckpointMark(
                    seq,
                    int(mark["after_rowid"]),
                    int(mark["last_rowid"]),
                    int(mark["rows"]),
                    frozenset(int(r) for r in mark["open"]),
                    tuple(sorted(int(r) for r in mark["closed"])),
                    str(mark["sha256"]),
                )
            )
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"seq {seq}: the history checkpoint of {table} cannot be read ({error})")
    return marks, problems


def check_history(db: sqlite3.Connection, checkpoints: Sequence[tuple[int, Mapping[str, Any]]], keys: AuditKeyring | None) -> Findings:
    """Check every covered table of the history against its rows' MACs (with ``keys``) and the ``history_checkpoint`` records (``(seq, details)``, in order).

    The records themselves are vouched for by the chain and MAC checks; this
    check trusts what they say.
    """
    findings = Findings()
    rows = sum(_check_table(db, table, checkpoints, keys, findings) for table in covered_tables(db))
    if keys is None and rows:
        findings.notes.append("history rows' MACs NOT checked (no key given): the rows after each table's last history checkpoint are not checked at all")
    return findings


def _check_table(db: sqlite3.Connection, table: str, checkpoints: Sequence[tuple[int, Mapping[str, Any]]], keys: AuditKeyring | None, findings: Findings) -> int:
    """Check one table, adding to ``findings``; the number of rows it has."""
    marks, problems = _marks(checkpoints, table)
    findings.problems.extend(problems)
    ranges = _TableRanges(table, marks, findings)
    altered, no_mac, unknown_key, predating = _Ranges(), _Ranges(), _Ranges(), _Ranges()
    first_mac: int | None = None
    count = 0
    for rowid, values, mac, _is_open in _rows(db, table):
        count += 1
        ranges.add(rowid, values)
        if mac is None:
            (predating if first_mac is None else no_mac).ids.append(rowid)
            continue
        if first_mac is None:
            first_mac = rowid
        if keys is None:
            continue
        key_id, _, code = str(mac).partition(":")
        key = keys.get(key_id)
        if key is None:
            unknown_key.ids.append(rowid)
        elif not key.matches(ROW_MAC_PURPOSE, row_content(table, rowid, values), code):
            altered.ids.append(rowid)
    ranges.finish()
    findings.problems.extend(altered.lines(table, "altered: its MAC does not match"))
    findings.problems.extend(no_mac.lines(table, "no MAC, though rows before it have one: inserted (or rewritten) without the key"))
    findings.problems.extend(ranges.deleted.lines(table, "deleted: a history checkpoint counted it, the history no longer has it"))
    if keys is not None:
        findings.notes.extend(unknown_key.lines(table, "MAC not checked: its key is not among the keys given"))
    findings.notes.extend(predating.lines(table, "no MAC: written before the history was MAC'd (covered by the history checkpoints only)"))
    if ranges.tail_rows:
        since = f"the last history checkpoint (seq {marks[-1].seq})" if marks else "no history checkpoint yet"
        findings.notes.append(f"{table}: {ranges.tail_rows} rows after {since}, covered by their MACs only")
    return count


class _TableRanges:
    """One table's rows, taken in rowid order, checked against its checkpoints' ranges: counts, gaps, digests."""

    def __init__(self, table: str, marks: list[CheckpointMark], findings: Findings) -> None:
        self.table = table
        self.marks = marks
        self.findings = findings
        self.deleted = _Ranges()
        self.tail_rows = 0
        self._ever_open = set().union(*(m.open for m in marks)) if marks else set()
        self._kept: dict[int, bytes] = {}  # the digest lines of rows open at some checkpoint, for the one that closes them
        self._index = 0
        self._expected_next = 1
        self._start()

    def _start(self) -> None:
        self._digest = hashlib.sha256()
        self._count = 0
        if self._index < len(self.marks):
            for rowid in self.marks[self._index].closed:
                line = self._kept.get(rowid)
                if line is None:
                    self.deleted.ids.append(rowid)
                else:
                    self._digest.update(line)

    def add(self, rowid: int, values: tuple[Any, ...]) -> None:
        while self._index < len(self.marks) and rowid > self.marks[self._index].last_rowid:
            self._close()
        if rowid > self._expected_next:
            if self._index < len(self.marks):
                self.deleted.ids.extend(range(self._expected_next, rowid))
            else:
                span = f"row {self._expected_next}" if rowid - 1 == self._expected_next else f"rows {self._expected_next}–{rowid - 1}"
                self.findings.problems.append(f"{self.table} {span}: missing (deleted: the rowids of a table run without gaps)")
        self._expected_next = rowid + 1
        line = _digest_line(self.table, rowid, values)
        if rowid in self._ever_open:
            self._kept[rowid] = line
        if self._index < len(self.marks):
            self._count += 1
            if rowid not in self.marks[self._index].open:
                self._digest.update(line)
        else:
            self.tail_rows += 1

    def finish(self) -> None:
        while self._index < len(self.marks):
            self._close()

    def _close(self) -> None:
        mark = self.marks[self._index]
        previous = self.marks[self._index - 1] if self._index > 0 else None
        if mark.after_rowid != (previous.last_rowid if previous is not None else 0):
            self.findings.problems.append(f"seq {mark.seq}: the history checkpoint of {self.table} starts after row {mark.after_rowid}, not where the previous one ended")
        missing_before = len(self.deleted.ids)
        if self._expected_next <= mark.last_rowid:
            self.deleted.ids.extend(range(self._expected_next, mark.last_rowid + 1))
        for rowid in sorted((previous.open if previous is not None else frozenset()) - set(mark.closed) - mark.open):
            self.deleted.ids.append(rowid)
        where = f"{self.table} {_rows_named(mark)}"
        if self._count != mark.rows and len(self.deleted.ids) == missing_before:
            self.findings.problems.append(f"{where}: the history checkpoint at seq {mark.seq} counted {mark.rows} rows, the history has {self._count} (rows inserted)")
        elif self._count == mark.rows and self._digest.hexdigest() != mark.sha256:
            self.findings.problems.append(f"{where}: their content no longer gives the digest of the history checkpoint at seq {mark.seq} (a row altered or replaced)")
        self._expected_next = max(self._expected_next, mark.last_rowid + 1)
        self._index += 1
        self._start()


def _rows_named(mark: CheckpointMark) -> str:
    """The rows a checkpoint digested: its new range, and the rows it closed (final since the checkpoint before)."""
    parts = []
    if mark.last_rowid > mark.after_rowid:
        first, last = mark.after_rowid + 1, mark.last_rowid
        parts.append(f"row {first}" if first == last else f"rows {first}–{last}")
    if mark.closed:
        parts.append(f"row{'s' if len(mark.closed) > 1 else ''} {', '.join(str(r) for r in mark.closed)} (final since the checkpoint before)")
    return " and ".join(parts) or "(no rows)"


class _Ranges:
    """Row ids collected under one message, reported as ranges (``rows 4–9``)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def lines(self, table: str, message: str) -> list[str]:
        out = []
        for first, last in _spans(self.ids):
            rows = f"row {first}" if first == last else f"rows {first}–{last}"
            out.append(f"{table} {rows}: {message}")
        return out


def _spans(ids: list[int]) -> Iterator[tuple[int, int]]:
    ordered = sorted(set(ids))
    if not ordered:
        return
    start = previous = ordered[0]
    for rowid in ordered[1:]:
        if rowid != previous + 1:
            yield start, previous
            start = rowid
        previous = rowid
    yield start, previous
