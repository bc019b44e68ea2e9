"""A batch's runtime history as time-aligned wide tables with units in the column names, written as CSV or Parquet (``bioreactor-mpc export``).

The history (:mod:`interfaces.history`) keeps one row per signal per scan and
its plans and estimates as JSON; this module turns one batch of it (its runs)
into the tables a process engineer opens in a spreadsheet or a data lake:

==========  ===============================================================================
``online``  one row per scan: every signal's value and quality (``<column>_quality``)
``lab``     one row per lab result: draw and result times, the values, used or not
``cycles``  one row per cycle: state, setpoints asked and applied, the plan (harvest, titer,
            score), the estimate ± sd, the parameter multipliers, the trust region
``writes``  one row per PLC write: the values written (columns as in ``online``), outcome
``alarms``  one row per alarm raised or cleared
``states``  one row per change of the runtime's state
``audit``   the audit trail's records written during the batch's runs
==========  ===============================================================================

Every table's time is ``process_time_h`` (hours since inoculation, the
batch clock the PLC reports) where the record has one, and ``wall_utc``
(ISO 8601, UTC) where it was recorded: tables join on them. Units are the
last part of a column's name (:data:`UNIT_SLUGS`); the manifest
(``manifest.json``) names each column's unit, the batch, its runs, the time
range, the row counts, the history's sha256 and the tool's version
(docs/export-and-report.md).

The history is opened read-only (SQLite ``mode=ro``, no lock): a running
runtime's file can be exported, and nothing in it changes.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from controller.types import LAB_FIELDS
from controller.version import tool_version
from interfaces.audit import AuditError, AuditRecord, AuditTrail
from interfaces.batch_records import sha256_of
from interfaces.history import SCHEMA_VERSION, read_only_uri
from interfaces.signals import SIGNALS, Kind
from plant_models.cho import STATES
from plant_models.errors import BioreactorMPCError

EXPORT_FORMAT = "bioreactor-mpc-history-export"
"""The ``format`` of ``manifest.json``."""
MANIFEST_FILE = "manifest.json"
SIMULATION_REFERENCE = "simulation_reference"
"""The audit action of a simulated batch's true outcome, and the platform recipe's on the same simulated batch (``details``: ``batch_kpis``,
``recipe_kpis`` as :class:`controller.kpis.BatchKpis` fields, ``scenario``, ``seed``), appended by the demo after harvest; subject: the batch id."""
HISTORY_TABLES = ("runs", "readings", "lab_results", "cycles", "writes", "state_changes", "alarms")
"""The tables a runtime history has (:data:`interfaces.history.SCHEMA`); a file without them is not one."""

UNIT_SLUGS: Mapping[str, str] = {
    "°C": "degc",
    "degC": "degc",
    "L": "l",
    "L/h": "lph",
    "mmol/L/h": "mmol_per_l_h",
    "pF/cm": "pf_per_cm",
    "1e6 cells/mL": "1e6_per_ml",
    "%": "pct",
    "% air saturation": "pct_air_sat",
    "g/L": "g_per_l",
    "mM": "mm",
    "mOsm/kg": "mosm_per_kg",
    "h": "h",
    "rpm": "rpm",
    "pH": "",
    "-": "",
    "": "",
}
"""A unit as the signal contract and the model write it → the suffix of a column name (the same suffixes as the batch-record layout, docs/batch-records.md).
``pH`` and dimensionless values have none."""


class ExportFormat(str, Enum):
    CSV = "csv"
    PARQUET = "parquet"


class ColumnKind(str, Enum):
    """What a column holds; CSV writes it as text, Parquet with this type."""

    REAL = "float64"
    INTEGER = "int64"
    BOOLEAN = "bool"
    TEXT = "string"


class HistoryReadError(BioreactorMPCError, ValueError):
    """The history cannot be exported or reported: no such file, not a runtime history, no runs, no such run or batch. The message names the file and what is wrong."""


class ExportError(BioreactorMPCError, RuntimeError):
    """The tables cannot be written: the output directory is the history's, or a format's library is missing."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind
    unit: str = ""
    """The unit its values are in, as people write it (``°C``, ``g/L``); empty for text, flags, counts and dimensionless values."""
    description: str = ""


@dataclass(frozen=True)
class Table:
    """A table by column: ``data[name]`` is one column's values, None where there is none."""

    name: str
    columns: tuple[Column, ...]
    data: Mapping[str, list[Any]]

    @property
    def rows(self) -> int:
        return len(self.data[self.columns[0].name]) if self.columns else 0

    def column(self, name: str) -> list[Any]:
        if name not in self.data:
            raise KeyError(f"table {self.name} has no column {name!r}; it has {', '.join(c.name for c in self.columns)}")
        return self.data[name]

    def numbers(self, name: str) -> list[float]:
        """A numeric column as floats, NaN where empty (for plots)."""
        return [float("nan") if value is None else float(value) for value in self.column(name)]


@dataclass(frozen=True)
class Run:
    run_id: int
    batch_id: str
    requested_mode: str
    started_utc: str
    ended_utc: str | None
    end_reason: str | None
    config: Mapping[str, Any]
    """The runtime's settings at the run's start, with its ``batch`` file (recorded by the runtime with every run)."""

    def describe(self) -> str:
        return f"{self.run_id} ({self.batch_id}, started {self.started_utc[:16].replace('T', ' ')} UTC)"


@dataclass(frozen=True)
class HistoryBatch:
    """One batch of a history file: its runs, its tables, and what the report needs besides."""

    path: Path
    batch_id: str
    runs: tuple[Run, ...]
    tables: Mapping[str, Table]
    audit: tuple[AuditRecord, ...]
    trust: tuple[tuple[float, Mapping[str, Any]], ...]
    """Each cycle's process time and trust region record (``TrustRegion.summary``), empty dicts where none was recorded."""
    history_sha256: str
    wal_sha256: str | None = None
    """The ``-wal`` file's sha256, when it holds records not yet checkpointed into the history file."""
    simulation: tuple[AuditRecord, ...] = ()
    """The audit trail's :data:`SIMULATION_REFERENCE` records of this batch (a simulated batch only), wherever they are in the trail."""

    @property
    def run_ids(self) -> tuple[int, ...]:
        return tuple(run.run_id for run in self.runs)

    @property
    def batch_config(self) -> Mapping[str, Any] | None:
        """The batch file in force at the last run's start (the runtime records it with every run); None for a history written before that."""
        for run in reversed(self.runs):
            batch = run.config.get("batch")
            if isinstance(batch, Mapping):
                return batch
        return None

    def time_range_h(self) -> tuple[float, float] | None:
        """The first and last process time recorded (scans and cycles)."""
        times = [t for name in ("online", "cycles") for t in self.tables[name].column("process_time_h") if t is not None]
        return (min(times), max(times)) if times else None


# ---------------------------------------------------------------------- naming


def unit_slug(unit: str) -> str:
    """A unit's column-name suffix (:data:`UNIT_SLUGS`); a unit not listed there is an error, not a guess."""
    try:
        return UNIT_SLUGS[unit]
    except KeyError:
        raise KeyError(f"no column suffix for the unit {unit!r}: add it to interfaces.history_export.UNIT_SLUGS") from None


def _snake(name: str) -> str:
    """``PV.GlucoseFeedTotal`` → ``pv_glucose_feed_total``, ``PV.pH`` → ``pv_ph``, ``MPC.Rec.HarvestTime`` → ``mpc_rec_harvest_time``."""
    parts = [re.sub(r"(?<=[a-z0-9])(?=[A-Z][a-z])", "_", part) for part in re.split(r"[.\s]+", name)]
    return re.sub(r"[^0-9a-z]+", "_", "_".join(parts).lower()).strip("_")


def with_unit(base: str, unit: str) -> str:
    slug = unit_slug(unit)
    return f"{base}_{slug}" if slug else base


def signal_column(signal: str) -> Column:
    """The column of a PLC signal's value, named from the signal and its unit in the contract (:data:`interfaces.signals.SIGNALS`)."""
    contract = SIGNALS.get(signal)
    if contract is None:
        return Column(_snake(signal), ColumnKind.REAL, "", f"{signal} (not in the reference interface)")
    kind = {Kind.REAL: ColumnKind.REAL, Kind.UNSIGNED: ColumnKind.INTEGER, Kind.INTEGER: ColumnKind.INTEGER, Kind.BOOLEAN: ColumnKind.BOOLEAN, Kind.TEXT: ColumnKind.TEXT}[
        contract.kind
    ]
    return Column(with_unit(_snake(signal), contract.unit), kind, contract.unit, signal)


def _signal_order(signals: Iterable[str]) -> list[str]:
    """The reference interface's order, then any other signal by name."""
    found = set(signals)
    return [s for s in SIGNALS if s in found] + sorted(found - set(SIGNALS))


_STATE_UNITS = {state.name: state.unit for state in STATES}


# ---------------------------------------------------------------------- reading


def read_history_batch(path: str | Path, *, batch_id: str | None = None, run_ids: Sequence[int] = ()) -> HistoryBatch:
    """One batch of the history at ``path``, read-only: the runs ``run_ids`` (all of one batch), else every run of ``batch_id``, else every run of the last run's batch.

    Raises :class:`HistoryReadError` naming the file and what is wrong: no
    such file, not a runtime history, no runs, no such run or batch, runs of
    several batches.
    """
    path = Path(path)
    with _reading(path) as db:
        runs = _select_runs(path, _runs(db), batch_id, run_ids)
        selected = tuple(run.run_id for run in runs)
        tables = {
            "online": _online(db, selected),
            "lab": _lab(db, selected),
            "cycles": (cycles := _cycles(db, selected))[0],
            "writes": _writes(db, selected),
            "alarms": _alarms(db, selected),
            "states": _states(db, selected),
        }
    audit, simulation = _audit_of(path, runs)
    tables["audit"] = _audit_table(audit)
    digest, wal_digest = history_digests(path)
    return HistoryBatch(
        path=path,
        batch_id=runs[0].batch_id,
        runs=runs,
        tables=tables,
        audit=audit,
        trust=cycles[1],
        history_sha256=digest,
        wal_sha256=wal_digest,
        simulation=simulation,
    )


@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.exists():
        raise HistoryReadError(f"{path}: no such history file")
    if not path.is_file():
        raise HistoryReadError(f"{path}: not a history file (a directory or a device): give the runtime's SQLite history file (its config's 'history:')")
    try:
        db = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
    except sqlite3.Error as error:
        raise HistoryReadError(f"{path}: cannot open the history for reading: {error}") from error
    with closing(db):
        try:
            names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if "meta" in names else None
        except sqlite3.DatabaseError as error:
            raise HistoryReadError(f"{path}: not a runtime history: not an SQLite database ({error})") from error
        missing = [name for name in HISTORY_TABLES if name not in names]
        if missing:
            raise HistoryReadError(
                f"{path}: not a runtime history: it has no {', '.join(missing)} table{'s' if len(missing) > 1 else ''} "
                f"(a history written by 'bioreactor-mpc run' has {', '.join(HISTORY_TABLES)})"
            )
        if version is not None and int(version[0]) > SCHEMA_VERSION:
            raise HistoryReadError(f"{path}: history schema version {version[0]}; this tool reads versions up to {SCHEMA_VERSION}: use a newer bioreactor-mpc")
        try:
            yield db
        except sqlite3.Error as error:
            raise HistoryReadError(f"{path}: cannot read the history: {error}") from error


def _rows(db: sqlite3.Connection, sql: str, parameters: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cursor = db.execute(sql, tuple(parameters))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _in(run_ids: Sequence[int]) -> str:
    return f"run_id IN ({', '.join('?' * len(run_ids))})"


def _runs(db: sqlite3.Connection) -> list[Run]:
    runs = []
    for row in _rows(db, "SELECT id, batch_id, requested_mode, config, started_utc, ended_utc, end_reason FROM runs ORDER BY id"):
        try:
            config = json.loads(row["config"])
        except ValueError:
            config = {}
        runs.append(
            Run(int(row["id"]), row["batch_id"], row["requested_mode"], row["started_utc"], row["ended_utc"], row["end_reason"], config if isinstance(config, dict) else {})
        )
    return runs


def _select_runs(path: Path, runs: list[Run], batch_id: str | None, run_ids: Sequence[int]) -> tuple[Run, ...]:
    if not runs:
        raise HistoryReadError(f"{path}: the history holds no runs: nothing was recorded in it yet (a runtime that stopped before its first cycle?)")
    listed = "; ".join(run.describe() for run in runs)
    if run_ids:
        by_id = {run.run_id: run for run in runs}
        unknown = [n for n in run_ids if n not in by_id]
        if unknown:
            raise HistoryReadError(f"{path}: no run {', '.join(map(str, unknown))} in this history; its runs: {listed}")
        chosen = tuple(by_id[n] for n in sorted(set(run_ids)))
        batches = sorted({run.batch_id for run in chosen})
        if len(batches) > 1:
            raise HistoryReadError(f"{path}: runs {', '.join(str(run.run_id) for run in chosen)} belong to several batches ({', '.join(batches)}): give the runs of one batch")
        if batch_id is not None and batches != [batch_id]:
            raise HistoryReadError(f"{path}: run {chosen[0].run_id} is of batch {batches[0]}, not {batch_id}")
        return chosen
    wanted = batch_id if batch_id is not None else runs[-1].batch_id
    chosen = tuple(run for run in runs if run.batch_id == wanted)
    if not chosen:
        known = ", ".join(dict.fromkeys(run.batch_id for run in runs))
        raise HistoryReadError(f"{path}: no run of batch {wanted!r} in this history; its batches: {known}")
    return chosen


def _json(text: Any) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _table(name: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> Table:
    return Table(name, tuple(columns), {column.name: [row.get(column.name) for row in rows] for column in columns})


def _typed(kind: ColumnKind, value: Any) -> Any:
    """A value as its column's kind (the history stores flags and counts as REAL), None for none or NaN."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if kind is ColumnKind.REAL:
        return float(value)
    if kind is ColumnKind.INTEGER:
        return int(value)
    if kind is ColumnKind.BOOLEAN:
        return bool(value)
    return str(value)


_TIME = Column("process_time_h", ColumnKind.REAL, "h", "process time: hours since inoculation, the PLC's batch clock")
_RUN = Column("run_id", ColumnKind.INTEGER, "", "the run of the runtime that recorded the row (runs in manifest.json)")
_WALL = Column("wall_utc", ColumnKind.TEXT, "", "when the row was recorded, ISO 8601 UTC")


def _quality(good: Any, problem: Any) -> str:
    """``good``; ``bad`` when the PLC's status was not Good; ``rejected: …`` when the runtime's data-quality check refused a Good value."""
    if not good:
        return "bad"
    return f"rejected: {problem}" if problem else "good"


def _online(db: sqlite3.Connection, run_ids: Sequence[int]) -> Table:
    readings = _rows(db, f"SELECT run_id, process_time_h, signal, value, text, good, problem FROM readings WHERE {_in(run_ids)} ORDER BY process_time_h, run_id, rowid", run_ids)
    signals = _signal_order(row["signal"] for row in readings)
    value_columns = {signal: signal_column(signal) for signal in signals}
    columns: list[Column] = [_TIME, _RUN]
    for signal in signals:
        value = value_columns[signal]
        columns += [value, Column(f"{value.name}_quality", ColumnKind.TEXT, "", f"{signal}: good, bad (the PLC's status) or rejected: why (the runtime's check)")]
    scans: dict[tuple[float, int], dict[str, Any]] = {}
    for row in readings:
        scan = scans.setdefault((row["process_time_h"], row["run_id"]), {"process_time_h": row["process_time_h"], "run_id": row["run_id"]})
        column = value_columns[row["signal"]]
        scan[column.name] = _typed(column.kind, row["text"] if row["text"] is not None else row["value"])
        scan[f"{column.name}_quality"] = _quality(row["good"], row["problem"])
    return _table("online", columns, list(scans.values()))


def _lab(db: sqlite3.Connection, run_ids: Sequence[int]) -> Table:
    rows = _rows(db, f"SELECT * FROM lab_results WHERE {_in(run_ids)} ORDER BY received_at_h, run_id, rowid", run_ids)
    columns = [
        Column("draw_time_h", ColumnKind.REAL, "h", "when the sample was drawn (process time)"),
        Column("result_time_h", ColumnKind.REAL, "h", "the cycle that received the result (process time)"),
        _RUN,
        Column("seq", ColumnKind.INTEGER, "", "the PLC's Sample.Seq"),
        *(Column(name, ColumnKind.REAL, _lab_unit(name), f"lab result: {name}") for name in LAB_FIELDS),
        Column("used", ColumnKind.BOOLEAN, "", "the estimator used the result"),
    ]
    out = [
        {"draw_time_h": r["taken_at_h"], "result_time_h": r["received_at_h"], "run_id": r["run_id"], "seq": r["seq"], **{n: r[n] for n in LAB_FIELDS}, "used": bool(r["used"])}
        for r in rows
    ]
    return _table("lab", columns, out)


def _lab_unit(name: str) -> str:
    for unit, slug in sorted(UNIT_SLUGS.items(), key=lambda item: -len(item[1])):
        if slug and name.endswith("_" + slug):
            return unit
    return ""


_CYCLE_PLAN = (
    Column("planned_harvest_time_h", ColumnKind.REAL, "h", "the harvest time the plan aims for"),
    Column("predicted_titer_g_per_l", ColumnKind.REAL, "g/L", "the plan's titer at its harvest"),
    Column("predicted_score_g_per_day", ColumnKind.REAL, "g/day", "the plan's score: product per day of reactor occupancy"),
    Column("solve_time_s", ColumnKind.REAL, "s", "the NMPC's solve time"),
    Column("read_time_s", ColumnKind.REAL, "s", "the PLC read's time"),
    Column("write_time_s", ColumnKind.REAL, "s", "the PLC write's time"),
)
_RECIPE_FORECAST = (
    Column("recipe_forecast_harvest_time_h", ColumnKind.REAL, "h", "the platform recipe's harvest, forecast from this cycle's estimate"),
    Column("recipe_forecast_titer_g_per_l", ColumnKind.REAL, "g/L", "the recipe's titer at its harvest, forecast from this cycle's estimate (not measured)"),
    Column("recipe_forecast_titer_sd_g_per_l", ColumnKind.REAL, "g/L", "its standard deviation"),
    Column("recipe_forecast_score_g_per_day", ColumnKind.REAL, "g/day", "the recipe's score (product per day of occupancy), forecast from this cycle's estimate (not measured)"),
    Column("recipe_forecast_score_sd_g_per_day", ColumnKind.REAL, "g/day", "its standard deviation"),
)
"""What the platform recipe would give from each cycle's estimate on (``cycles.estimate.recipe_forecast``; empty where the cycle made none)."""
_TRUST = (
    Column("trust_source", ColumnKind.TEXT, "", "where the trust region comes from: calibration_envelope, recipe_band or off"),
    Column("trust_width", ColumnKind.REAL, "", "the trust region's width, a fraction of its full width (0–1)"),
    Column("trust_feed_width", ColumnKind.REAL, "", "the nutrient feed's own width (0–1, at most the region's): only lab results of the fed culture widen it"),
    Column(
        "trust_widens",
        ColumnKind.BOOLEAN,
        "",
        "confirming lab results widen the region and earn reach; false: a band held at its start (a calibrated model not shown to rank its records)",
    ),
    Column("trust_misses", ColumnKind.INTEGER, "", "lab checks missed in a row"),
    Column("trust_stood_down", ColumnKind.BOOLEAN, "", "the NMPC stood down for the recipe"),
    Column("trust_shadow_confirmations", ColumnKind.INTEGER, "", "stood down: lab results in a row the model run with what the recipe gave predicted within tolerance"),
    Column("trust_temperature_low_degc", ColumnKind.REAL, "°C", "the lowest temperature the plan may ask for"),
    Column("trust_temperature_high_degc", ColumnKind.REAL, "°C", "the highest temperature the plan may ask for"),
    Column("trust_feed_rate_low_lph", ColumnKind.REAL, "L/h", "the lowest nutrient feed rate the plan may ask for"),
    Column("trust_feed_rate_high_lph", ColumnKind.REAL, "L/h", "the highest nutrient feed rate the plan may ask for"),
    Column("trust_glucose_min_g_per_l", ColumnKind.REAL, "g/L", "the lowest glucose the plan may plan for"),
    Column(
        "trust_glucose_max_g_per_l", ColumnKind.REAL, "g/L", "the region's glucose ceiling: the highest glucose the plan may plan for, unless the configured window's top is lower"
    ),
    Column(
        "trust_glucose_error_g_per_l",
        ColumnKind.REAL,
        "g/L",
        "one day-ahead glucose error, of which the glucose floor keeps two above the starvation limit: the tolerance's floor, or the batch's largest recent shortfall",
    ),
    Column("trust_endgame", ColumnKind.BOOLEAN, "", "the end-game: the plan's temperature and feed held within what the batch ran since the shift"),
    Column("trust_harvest_earliest_h", ColumnKind.REAL, "h", "the earliest harvest the plan may choose"),
    Column("trust_harvest_latest_h", ColumnKind.REAL, "h", "the latest harvest the plan may choose"),
    Column("trust_last_check", ColumnKind.TEXT, "", "the last lab check of the plan's predictions"),
    Column(
        "trust_glucose_feed_max_lph",
        ColumnKind.REAL,
        "L/h",
        "the glucose feed's ceiling the cycle's decision was held to: the recipe's lab-driven rate plus the headroom times the width",
    ),
)


def _recipe_forecast_values(recipe: Any, row: Mapping[str, Any]) -> dict[str, float | None]:
    """The :data:`_RECIPE_FORECAST` columns of a cycle from its ``estimate.recipe_forecast`` (numbers or null; absent: empty).

    Anything else was not written by the runtime (an edited or foreign history): refused, naming the cycle and the field, rather than
    exported as text in a number column or left out unnoticed.
    """
    where = f"cycles row at {row.get('process_time_h')} h (run {row.get('run_id')}): estimate.recipe_forecast"
    if recipe is None:
        return {column.name: None for column in _RECIPE_FORECAST}
    if not isinstance(recipe, Mapping):
        raise HistoryReadError(f"{where} is {recipe!r}, not an object of numbers: the runtime did not write it ('bioreactor-mpc audit verify' checks the rows)")
    values: dict[str, float | None] = {}
    for column in _RECIPE_FORECAST:
        key = column.name.removeprefix("recipe_forecast_")
        value = recipe.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise HistoryReadError(f"{where}.{key} is {value!r}, not a number: the runtime did not write it ('bioreactor-mpc audit verify' checks the rows)")
        values[column.name] = _typed(ColumnKind.REAL, value)
    return values


def _setpoint_columns(prefix: str, keys: Iterable[str], what: str) -> list[Column]:
    """``requested_feed_rate_lph`` …: the setpoint keys (``controller.types.Setpoints``) carry their unit already."""
    units = {"lph": "L/h", "degc": "°C"}
    columns = []
    for key in keys:
        kind = ColumnKind.BOOLEAN if key == "harvest" else ColumnKind.REAL
        columns.append(Column(f"{prefix}_{key}", kind, units.get(key.rsplit("_", 1)[-1], ""), f"{key} {what}"))
    return columns


def _cycles(db: sqlite3.Connection, run_ids: Sequence[int]) -> tuple[Table, tuple[tuple[float, Mapping[str, Any]], ...]]:
    rows = _rows(db, f"SELECT * FROM cycles WHERE {_in(run_ids)} ORDER BY process_time_h, run_id, rowid", run_ids)
    parsed = [{**row, **{key: _json(row.get(key)) for key in ("requested", "applied", "adjustments", "estimate", "trust")}} for row in rows]
    setpoint_keys = list(dict.fromkeys(k for row in parsed for part in ("requested", "applied") for k in (row[part] or {})))
    states = list(dict.fromkeys(k for row in parsed for k in ((row["estimate"] or {}).get("state") or {})))
    multipliers = list(dict.fromkeys(k for row in parsed for k in ((row["estimate"] or {}).get("multipliers") or {})))
    inflations = list(dict.fromkeys(k for row in parsed for k in ((row["estimate"] or {}).get("inflation") or {})))
    columns = [
        _TIME,
        _RUN,
        _WALL,
        Column("state", ColumnKind.TEXT, "", "the runtime's state: closed_loop, advisory, off, held, fault"),
        Column("reason", ColumnKind.TEXT, "", "why the runtime is in that state"),
        Column("source", ColumnKind.TEXT, "", "who decided the setpoints: mpc, recipe, fallback, none"),
        *_setpoint_columns("requested", setpoint_keys, "asked for by the decision"),
        *_setpoint_columns("applied", setpoint_keys, "after the safety filter: what was written (or recommended)"),
        Column("adjustments", ColumnKind.TEXT, "", "what the safety filter changed, '; ' between items"),
        Column("wrote_setpoints", ColumnKind.BOOLEAN, "", "the cycle wrote its setpoints to the PLC"),
        *_CYCLE_PLAN,
        *_RECIPE_FORECAST,
    ]
    for name in states:
        unit = _STATE_UNITS.get(name, "")
        columns.append(Column(with_unit(f"estimate_{name}", unit), ColumnKind.REAL, unit, f"the estimator's {name}"))
        columns.append(Column(with_unit(f"estimate_{name}_sd", unit), ColumnKind.REAL, unit, "its standard deviation"))
    columns += [Column(f"multiplier_{_snake(name)}", ColumnKind.REAL, "", f"the estimated multiplier of {name} (1 = nominal)") for name in multipliers]
    columns += [Column(f"inflation_{_snake(name)}", ColumnKind.REAL, "", f"the consistency monitor's noise inflation of {name} (1 when absent)") for name in inflations]
    columns += _TRUST
    out = []
    trust_records: list[tuple[float, Mapping[str, Any]]] = []
    for row in parsed:
        requested, applied, estimate, trust = row["requested"] or {}, row["applied"] or {}, row["estimate"] or {}, row["trust"] or {}
        values: dict[str, Any] = {
            "process_time_h": row["process_time_h"],
            "run_id": row["run_id"],
            "wall_utc": row["wall_utc"],
            "state": row["state"],
            "reason": row["reason"],
            "source": row["source"],
            "adjustments": "; ".join(map(str, row["adjustments"] or [])) or None,
            "wrote_setpoints": bool(row["wrote_setpoints"]),
            "planned_harvest_time_h": row["harvest_time_h"],
            "predicted_titer_g_per_l": row["predicted_titer_g_per_l"],
            "predicted_score_g_per_day": row["predicted_score_g_per_day"],
            "solve_time_s": row["solve_time_s"],
            "read_time_s": row.get("read_time_s"),
            "write_time_s": row.get("write_time_s"),
        }
        values |= _recipe_forecast_values(estimate.get("recipe_forecast"), row)
        for key in setpoint_keys:
            for prefix, part in (("requested", requested), ("applied", applied)):
                values[f"{prefix}_{key}"] = _typed(ColumnKind.BOOLEAN if key == "harvest" else ColumnKind.REAL, part.get(key))
        for name in states:
            unit = _STATE_UNITS.get(name, "")
            values[with_unit(f"estimate_{name}", unit)] = (estimate.get("state") or {}).get(name)
            values[with_unit(f"estimate_{name}_sd", unit)] = (estimate.get("sd") or {}).get(name)
        for name in multipliers:
            values[f"multiplier_{_snake(name)}"] = (estimate.get("multipliers") or {}).get(name)
        for name in inflations:
            values[f"inflation_{_snake(name)}"] = (estimate.get("inflation") or {}).get(name, 1.0)
        values.update(_trust_values(trust))
        out.append(values)
        trust_records.append((float(row["process_time_h"]), trust))
    return _table("cycles", columns, out), tuple(trust_records)


def _trust_values(trust: Mapping[str, Any]) -> dict[str, Any]:
    if not trust:
        return {}

    def pair(key: str) -> tuple[Any, Any]:
        value = trust.get(key)
        return (value[0], value[1]) if isinstance(value, list) and len(value) == 2 else (None, None)

    (t_low, t_high), (f_low, f_high), (h_low, h_high) = pair("temperature_degc"), pair("feed_rate_lph"), pair("harvest_h")
    return {
        "trust_source": trust.get("source"),
        "trust_width": trust.get("width"),
        "trust_feed_width": trust.get("feed_width"),
        "trust_widens": trust.get("widens"),
        "trust_misses": trust.get("misses"),
        "trust_stood_down": trust.get("stood_down"),
        "trust_shadow_confirmations": trust.get("shadow_confirmations"),
        "trust_temperature_low_degc": t_low,
        "trust_temperature_high_degc": t_high,
        "trust_feed_rate_low_lph": f_low,
        "trust_feed_rate_high_lph": f_high,
        "trust_glucose_min_g_per_l": trust.get("glucose_min_g_per_l"),
        "trust_glucose_max_g_per_l": trust.get("glucose_max_g_per_l"),
        "trust_glucose_error_g_per_l": trust.get("glucose_error_g_per_l"),
        "trust_endgame": trust.get("endgame"),
        "trust_harvest_earliest_h": h_low,
        "trust_harvest_latest_h": h_high,
        "trust_last_check": trust.get("last_check"),
        "trust_glucose_feed_max_lph": trust.get("glucose_feed_max_lph"),
    }


def _writes(db: sqlite3.Connection, run_ids: Sequence[int]) -> Table:
    rows = _rows(db, f'SELECT id, run_id, process_time_h, wall_utc, "values", outcome, detail, outcome_utc FROM writes WHERE {_in(run_ids)} ORDER BY id', run_ids)
    written = [(row, _json(row["values"]) or {}) for row in rows]
    signals = _signal_order(signal for _, values in written for signal in values)
    value_columns = [signal_column(signal) for signal in signals]
    columns = [
        _TIME,
        _RUN,
        _WALL,
        Column("write_id", ColumnKind.INTEGER, "", "the write's id in the history"),
        Column("outcome", ColumnKind.TEXT, "", "ok, refused, mismatch, link_error, or pending (sent, outcome never recorded)"),
        Column("detail", ColumnKind.TEXT, "", "the PLC's answer when not ok"),
        Column("outcome_utc", ColumnKind.TEXT, "", "when the outcome was recorded, ISO 8601 UTC"),
        *value_columns,
    ]
    out = []
    for row, values in written:
        entry = {"process_time_h": row["process_time_h"], "run_id": row["run_id"], "wall_utc": row["wall_utc"], "write_id": row["id"]}
        entry |= {"outcome": row["outcome"], "detail": row["detail"] or None, "outcome_utc": row["outcome_utc"]}
        entry |= {column.name: _typed(column.kind, values.get(signal)) for signal, column in zip(signals, value_columns, strict=True)}
        out.append(entry)
    return _table("writes", columns, out)


_ALARM_COLUMNS = (
    _TIME,
    _RUN,
    _WALL,
    Column("code", ColumnKind.TEXT, "", "the alarm's code"),
    Column("event", ColumnKind.TEXT, "", "raised or cleared"),
    Column("message", ColumnKind.TEXT, "", "what the alarm says"),
)
_STATE_COLUMNS = (
    _TIME,
    _RUN,
    _WALL,
    Column("previous", ColumnKind.TEXT, "", "the state before"),
    Column("state", ColumnKind.TEXT, "", "the state after"),
    Column("reason", ColumnKind.TEXT, "", "why"),
)


def _events(db: sqlite3.Connection, run_ids: Sequence[int], source: str, selected: str) -> list[dict[str, Any]]:
    """The rows of an event table (``alarms``, ``state_changes``: fixed names) of the runs, in the order recorded."""
    return _rows(db, f"SELECT run_id, process_time_h, wall_utc, {selected} FROM {source} WHERE {_in(run_ids)} ORDER BY rowid", run_ids)


def _alarms(db: sqlite3.Connection, run_ids: Sequence[int]) -> Table:
    rows = [{**row, "event": "raised" if row["active"] else "cleared"} for row in _events(db, run_ids, "alarms", "code, message, active")]
    return _table("alarms", _ALARM_COLUMNS, rows)


def _states(db: sqlite3.Connection, run_ids: Sequence[int]) -> Table:
    return _table("states", _STATE_COLUMNS, _events(db, run_ids, "state_changes", "previous, state, reason"))


def _audit_of(path: Path, runs: Sequence[Run]) -> tuple[tuple[AuditRecord, ...], tuple[AuditRecord, ...]]:
    """The audit trail's records written during the runs, each from its start to its end (to now, for a run not ended);
    and the batch's :data:`SIMULATION_REFERENCE` records, written after its runs."""
    try:
        with AuditTrail(path, read_only=True) as trail:
            records = trail.records()
    except AuditError as error:
        raise HistoryReadError(f"{path}: cannot read the audit trail: {error}") from error
    windows = [(_instant(run.started_utc), _instant(run.ended_utc) if run.ended_utc is not None else None) for run in runs]
    during = tuple(r for r in records if any(start <= _instant(r.wall_utc) and (end is None or _instant(r.wall_utc) <= end) for start, end in windows))
    simulation = tuple(r for r in records if r.action == SIMULATION_REFERENCE and r.subject == runs[0].batch_id)
    return during, simulation


def _instant(utc: str) -> datetime:
    found = datetime.fromisoformat(utc)
    return found if found.tzinfo is not None else found.replace(tzinfo=UTC)


def _audit_table(records: Sequence[AuditRecord]) -> Table:
    columns = [
        Column("seq", ColumnKind.INTEGER, "", "the record's number in the trail"),
        _WALL,
        Column("process_time_h", ColumnKind.REAL, "h", "process time, when the record belongs to a running batch"),
        Column("actor", ColumnKind.TEXT, "", "a user name, runtime or admin-cli"),
        Column("action", ColumnKind.TEXT, "", "what was done (interfaces/audit.py lists the actions)"),
        Column("subject", ColumnKind.TEXT, "", "what it is about"),
        Column("details", ColumnKind.TEXT, "", "the record's details, JSON"),
        Column("hash", ColumnKind.TEXT, "", "the record's SHA-256 in the hash chain"),
        Column("key_id", ColumnKind.TEXT, "", "the audit key that MAC'd it, if any"),
    ]
    rows = [
        {
            "seq": r.seq,
            "wall_utc": r.wall_utc,
            "process_time_h": r.process_time_h,
            "actor": r.actor,
            "action": r.action,
            "subject": r.subject,
            "details": json.dumps(r.details, sort_keys=True, ensure_ascii=False),
            "hash": r.hash,
            "key_id": r.key_id,
        }
        for r in records
    ]
    return _table("audit", columns, rows)


def history_digests(path: Path) -> tuple[str, str | None]:
    """The sha256 of the history file, and of its ``-wal`` file when that holds anything (records not yet checkpointed into the file)."""
    wal = path.with_name(path.name + "-wal")
    return sha256_of(path), sha256_of(wal) if wal.is_file() and wal.stat().st_size > 0 else None


# ---------------------------------------------------------------------- writing


def export_batch(batch: HistoryBatch, out_dir: Path, export_format: ExportFormat) -> dict[str, Any]:
    """Write each table as ``<table>.csv`` or ``<table>.parquet`` in ``out_dir`` (created; files of the same names replaced) and ``manifest.json``; the manifest."""
    targets = [out_dir / f"{name}.{export_format.value}" for name in batch.tables] + [out_dir / MANIFEST_FILE]
    if any(target.resolve() == batch.path.resolve() for target in targets):
        raise ExportError(f"{out_dir}: an export file would replace the history {batch.path}: export to another directory")
    write = _write_csv if export_format is ExportFormat.CSV else _parquet_writer()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, table in batch.tables.items():
            target = out_dir / f"{name}.{export_format.value}"
            write(target, table)
            files[name] = target
        manifest = _manifest(batch, export_format, files)
        (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as error:
        raise ExportError(f"{out_dir}: cannot write the export: {error.strerror or error}") from error
    return manifest


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value == value else ""
    return str(value)


def _write_csv(path: Path, table: Table) -> None:
    """UTF-8, ',' between cells, '.' as the decimal point, the shortest text that reads back to the same float, an empty cell where there is no value."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([column.name for column in table.columns])
        columns = [table.data[column.name] for column in table.columns]
        for i in range(table.rows):
            writer.writerow([_csv_cell(values[i]) for values in columns])


def _parquet_writer() -> Any:
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError as error:
        raise ExportError(
            "--format parquet needs pyarrow, an optional part of bioreactor-mpc: pip install 'bioreactor-mpc[parquet]' (or pyarrow); --format csv needs nothing more"
        ) from error
    types = {ColumnKind.REAL: pa.float64(), ColumnKind.INTEGER: pa.int64(), ColumnKind.BOOLEAN: pa.bool_(), ColumnKind.TEXT: pa.string()}

    def write(path: Path, table: Table) -> None:
        fields = [pa.field(c.name, types[c.kind], metadata={"unit": c.unit, "description": c.description}) for c in table.columns]
        arrays = [pa.array(table.data[c.name], type=types[c.kind]) for c in table.columns]
        pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)

    return write


def _manifest(batch: HistoryBatch, export_format: ExportFormat, files: Mapping[str, Path]) -> dict[str, Any]:
    time_range = batch.time_range_h()
    return {
        "format": EXPORT_FORMAT,
        "tool": {"name": "bioreactor-mpc", "version": tool_version()},
        "exported_utc": datetime.now(UTC).isoformat(),
        "history": {"path": str(batch.path), "sha256": batch.history_sha256, "wal_sha256": batch.wal_sha256},
        "batch_id": batch.batch_id,
        "run_ids": list(batch.run_ids),
        "runs": [{"run_id": r.run_id, "requested_mode": r.requested_mode, "started_utc": r.started_utc, "ended_utc": r.ended_utc, "end_reason": r.end_reason} for r in batch.runs],
        "time_range": {
            "first_process_time_h": time_range[0] if time_range else None,
            "last_process_time_h": time_range[1] if time_range else None,
            "first_wall_utc": batch.runs[0].started_utc,
            "last_wall_utc": batch.runs[-1].ended_utc,
        },
        "file_format": export_format.value,
        "time_columns": "process_time_h: hours since inoculation (the PLC's batch clock); wall_utc: ISO 8601 UTC; tables join on them",
        "tables": {
            name: {
                "file": files[name].name,
                "rows": table.rows,
                "columns": [{"name": c.name, "type": c.kind.value, "unit": c.unit, "description": c.description} for c in table.columns],
            }
            for name, table in batch.tables.items()
        },
    }
