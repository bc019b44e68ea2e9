"""The batch history in an embedded SQLite database: every reading, lab result, cycle, write, state change and alarm.

One file per site (or per batch, as the operator prefers), no server to
install. WAL journal with ``synchronous=FULL``: every record is committed
when it is made, so a killed process loses nothing it recorded, and a reader
(a report, the operator screen) can read while the runtime writes.

The resume state (the estimator's saved filter, the last lab result used, the
planned harvest) is committed in the same transaction as the cycle it
follows, so a restarted runtime resumes from a consistent point.

Tables: ``runs``, ``readings``, ``lab_results``, ``cycles``, ``writes``,
``state_changes``, ``alarms``, ``resume`` (see :data:`SCHEMA`). Times are
process hours (``process_time_h``) and wall-clock UTC ISO strings
(``wall_utc``).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from controller.ports import CycleRecord, Reading, ResumeState, Value
from controller.types import LabResult, json_compatible
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
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


class HistoryError(BioreactorMPCError, RuntimeError):
    """The history database cannot be opened or written."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _json(value: Any) -> str:
    """JSON with NaN and ±Inf as null (SQLite's JSON functions and other readers reject them)."""
    return json.dumps(json_compatible(value), separators=(",", ":"))


def _real(value: float) -> float | None:
    return value if math.isfinite(value) else None


class SqliteHistory:
    """:class:`controller.ports.HistoryStore` in one SQLite file (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(found[0]) != SCHEMA_VERSION:
                raise HistoryError(f"{self.path}: history schema version {found[0]}, this runtime writes version {SCHEMA_VERSION}")
        except sqlite3.Error as error:
            raise HistoryError(f"{self.path}: cannot open the history database: {error}") from error
        self._run_id: int | None = None

    @property
    def run_id(self) -> int:
        if self._run_id is None:
            raise HistoryError(f"{self.path}: no run started")
        return self._run_id

    def _execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.Error as error:
            raise HistoryError(f"{self.path}: {error} (while running {sql.split('(')[0].strip()!r})") from error

    # ------------------------------------------------------------------ HistoryStore

    def start_run(self, *, batch_id: str, requested_mode: str, config: Mapping[str, Any]) -> None:
        cursor = self._execute("INSERT INTO runs (batch_id, requested_mode, config, started_utc) VALUES (?, ?, ?, ?)", (batch_id, requested_mode, _json(config), _now()))
        self._run_id = cursor.lastrowid
        log.info("history_run_started", path=str(self.path), run_id=self._run_id, batch_id=batch_id)

    def record_scan(self, process_time_h: float, readings: Mapping[str, Reading], problems: Mapping[str, str]) -> None:
        rows = []
        for signal, reading in readings.items():
            value, text = (None, reading.value) if isinstance(reading.value, str) else (_real(float(reading.value)), None)
            stamp = reading.source_time.isoformat() if reading.source_time is not None else None
            rows.append((self.run_id, process_time_h, signal, value, text, int(reading.good), stamp, problems.get(signal)))
        self._transaction("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def record_lab(self, process_time_h: float, result: LabResult, *, used: bool) -> None:
        values = tuple(_real(v) for v in result.values().values())
        self._execute(
            "INSERT INTO lab_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (self.run_id, process_time_h, result.seq, result.taken_at_h, *values, int(used))
        )

    def record_write(self, process_time_h: float, values: Mapping[str, Value], outcome: str, detail: str = "") -> None:
        self._execute("INSERT INTO writes VALUES (?, ?, ?, ?, ?, ?)", (self.run_id, process_time_h, _now(), _json(dict(values)), outcome, detail))

    def record_state_change(self, process_time_h: float, previous: str, state: str, reason: str) -> None:
        self._execute("INSERT INTO state_changes VALUES (?, ?, ?, ?, ?, ?)", (self.run_id, _real(process_time_h), _now(), previous, state, reason))

    def record_alarm(self, process_time_h: float, code: str, message: str, *, active: bool) -> None:
        self._execute("INSERT INTO alarms VALUES (?, ?, ?, ?, ?, ?)", (self.run_id, _real(process_time_h), _now(), code, message, int(active)))

    def commit_cycle(self, record: CycleRecord, resume: ResumeState) -> None:
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
        )
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO cycles (run_id, process_time_h, wall_utc, state, reason, source, requested, applied, adjustments, harvest_time_h, "
                "predicted_titer_g_per_l, predicted_score_g_per_day, solve_time_s, estimate, wrote_setpoints, read_time_s, write_time_s) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                cycle,
            )
            self._db.execute(
                "INSERT OR REPLACE INTO resume VALUES (?, ?, ?, ?, ?, ?, ?)",
                (resume.batch_id, resume.last_cycle_h, resume.lab_seq, resume.harvest_time_h, _json(resume.estimator), _now(), resume.requested_mode),
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback()
            raise HistoryError(f"{self.path}: cannot record the cycle at {record.process_time_h:.2f} h: {error}") from error

    def load_resume(self, batch_id: str) -> ResumeState | None:
        row = self._execute("SELECT last_cycle_h, lab_seq, harvest_time_h, estimator, requested_mode FROM resume WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None:
            return None
        return ResumeState(
            batch_id=batch_id, last_cycle_h=float(row[0]), lab_seq=int(row[1]), harvest_time_h=float(row[2]), estimator=json.loads(row[3]), requested_mode=row[4]
        )

    def end_run(self, *, reason: str) -> None:
        self._execute("UPDATE runs SET ended_utc = ?, end_reason = ? WHERE id = ?", (_now(), reason, self.run_id))

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ helpers

    def _transaction(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(sql, rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback()
            raise HistoryError(f"{self.path}: cannot record {len(rows)} rows: {error}") from error

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def table(self, name: str) -> list[dict[str, Any]]:
        """Every row of one table, as dictionaries (reports and tests)."""
        if name not in {"runs", "readings", "lab_results", "cycles", "writes", "state_changes", "alarms", "resume"}:
            raise KeyError(f"no history table {name!r}")
        cursor = self._execute(f"SELECT * FROM {name}")  # noqa: S608 - the name is one of the fixed tables above
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
