"""Batch records in and out: the CSV layout a plant engineer exports from a historian, and the runtime's own history files.

Both produce :class:`controller.records.BatchRecord`, what ``bioreactor-mpc
calibrate`` consumes. The layout, one directory per batch (docs/batch-records.md):

- ``batch.yaml`` (or ``batch.json``): the batch file the runtime reads
  (:class:`controller.config.BatchConfig`), the inoculation edited for this batch;
- ``online.csv``: ``process_time_h``, then per signal a value column and an
  optional ``<name>_status`` column (Good, Uncertain, Bad);
- ``lab.csv``: ``draw_time_h``, ``result_time_h``, then the lab fields (an
  empty cell: not measured);
- ``setpoints.csv``: ``process_time_h`` and the three setpoints applied from
  that time on.

Comma-separated, a header row (row 1), '.' as the decimal point, UTF-8 (a BOM
is accepted), units in the column names. Anything wrong is a
:class:`RecordError` naming the file, the row as a spreadsheet numbers it
(the header is row 1) and the column.

A history file (:mod:`interfaces.history`) is read read-only: one record per
batch id, its runs merged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import yaml

from controller.config import BatchConfig
from controller.quality import ONLINE_SIGNALS, SETPOINT_SIGNALS, TOTAL_SIGNALS, DataQualityConfig
from controller.records import ONLINE_FIELDS, SETPOINT_FIELDS, BatchRecord, LabSample, OnlineSeries, SetpointSeries
from controller.types import LAB_FIELDS
from interfaces.history import SCHEMA_VERSION, read_only_uri
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

BATCH_FILES = ("batch.yaml", "batch.json")
ONLINE_FILE = "online.csv"
LAB_FILE = "lab.csv"
SETPOINTS_FILE = "setpoints.csv"
HISTORY_SUFFIXES = (".sqlite", ".sqlite3", ".db")
"""A path with one of these suffixes is read as a runtime history file."""

TIME_COLUMN = "process_time_h"
DRAW_COLUMN = "draw_time_h"
RESULT_COLUMN = "result_time_h"
STATUS_SUFFIX = "_status"
REQUIRED_ONLINE: tuple[str, ...] = ("volume_l", "temperature_degc")
"""Online signals every record must have a column for (with ``process_time_h``)."""

ONLINE_TAGS: dict[str, str] = {
    **ONLINE_SIGNALS,
    TOTAL_SIGNALS[0]: "feed_total_l",
    TOTAL_SIGNALS[1]: "glucose_feed_total_l",
}
"""PLC signal → online record field (:data:`~controller.records.ONLINE_FIELDS`)."""
SETPOINT_TAGS: dict[str, str] = dict(zip(SETPOINT_SIGNALS, SETPOINT_FIELDS, strict=True))
"""PLC setpoint signal → setpoint record field."""
if set(ONLINE_TAGS.values()) != set(ONLINE_FIELDS):  # pragma: no cover - a module that disagrees with the contract does not load
    raise ImportError(f"online tags {sorted(ONLINE_TAGS.values())} do not cover the record's fields {sorted(ONLINE_FIELDS)}")

_UNIT_SUFFIXES: dict[str, str] = {
    "h": "h",
    "l": "L",
    "degc": "°C",
    "lph": "L/h",
    "mmol_per_l_h": "mmol/L/h",
    "pf_per_cm": "pF/cm",
    "1e6_per_ml": "10⁶ cells/mL",
    "pct": "%",
    "g_per_l": "g/L",
    "mm": "mM",
    "mosm_per_kg": "mOsm/kg",
}
"""The unit suffixes the layout uses, with the unit they stand for."""

_UNIT_WORDS = frozenset(
    """
    h hr hrs hour hours min mins minute minutes s sec secs second seconds d day days wk week weeks
    l ml ul dl cl m3 gal kg g mg ug ng lb degc degf degk c f k celsius fahrenheit kelvin
    m mm um nm mol mmol umol osm mosm per x pct percent frac fraction ppm
    pf nf ff uf cm mpm lph lpm lpd mlph mlpm mlpd gpl mgpl mgph gph cells cell vc
    1e3 1e5 1e6 1e7 1e8 1e9 e5 e6 e9 10e6 10e5 x106 x105
    """.split()
)
"""Words a unit suffix is made of: a column of a known quantity followed by only these is a unit mismatch, not an unknown column."""


class RecordProblem(str, Enum):
    """What is wrong with a batch record (:attr:`RecordError.problem`)."""

    MISSING_FILE = "missing_file"
    UNREADABLE = "unreadable"
    EMPTY_FILE = "empty_file"
    SEPARATOR = "separator"
    MISSING_COLUMN = "missing_column"
    DUPLICATE_COLUMN = "duplicate_column"
    UNIT_MISMATCH = "unit_mismatch"
    EXTRA_CELLS = "extra_cells"
    MISSING_VALUE = "missing_value"
    NOT_A_NUMBER = "not_a_number"
    BAD_STATUS = "bad_status"
    OUT_OF_RANGE = "out_of_range"
    TIME_NOT_INCREASING = "time_not_increasing"
    NO_LAB_RESULTS = "no_lab_results"
    RESULT_BEFORE_DRAW = "result_before_draw"
    AFTER_END = "after_end"
    NO_BATCH_CONFIG = "no_batch_config"
    DUPLICATE_BATCH = "duplicate_batch"
    NOT_A_RECORD = "not_a_record"


class RecordError(ValueError, BioreactorMPCError):
    """A batch record cannot be read. The message names the file, the row (1-based, the header is row 1) and the column."""

    def __init__(self, path: str | Path, problem: RecordProblem, message: str, *, row: int | None = None, column: str | None = None) -> None:
        self.path = Path(path)
        self.problem = problem
        self.row = row
        self.column = column
        where = [str(path)]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass(frozen=True)
class ColumnSpec:
    """A column of the layout: its name, the quantity it names (the name without its unit) and the unit."""

    name: str
    quantity: str
    unit: str

    @classmethod
    def of(cls, name: str) -> ColumnSpec:
        for suffix in sorted(_UNIT_SUFFIXES, key=len, reverse=True):
            if name.endswith("_" + suffix):
                return cls(name, name[: -len(suffix) - 1], _UNIT_SUFFIXES[suffix])
        raise ValueError(f"column {name!r} has no known unit suffix")


ONLINE_COLUMNS: tuple[ColumnSpec, ...] = tuple(ColumnSpec.of(name) for name in (TIME_COLUMN, *ONLINE_FIELDS))
LAB_COLUMNS: tuple[ColumnSpec, ...] = tuple(ColumnSpec.of(name) for name in (DRAW_COLUMN, RESULT_COLUMN, *LAB_FIELDS))
SETPOINT_COLUMNS: tuple[ColumnSpec, ...] = tuple(ColumnSpec.of(name) for name in (TIME_COLUMN, *SETPOINT_FIELDS))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- CSV tables


@dataclass(frozen=True)
class _Table:
    """A CSV file's cells by column (names normalised to lower case), with the spreadsheet row number of each row."""

    path: Path
    columns: dict[str, int]
    header: tuple[str, ...]
    rows: tuple[tuple[int, tuple[str, ...]], ...]

    def has(self, column: str) -> bool:
        return column in self.columns

    def cell(self, row: tuple[str, ...], column: str) -> str:
        index = self.columns[column]
        return row[index].strip() if index < len(row) else ""

    def original(self, column: str) -> str:
        """The column's name as the file spells it."""
        return self.header[self.columns[column]]

    def error(self, problem: RecordProblem, message: str, *, row: int | None = None, column: str | None = None) -> RecordError:
        return RecordError(self.path, problem, message, row=row, column=self.original(column) if column is not None and column in self.columns else column)


def spec_words(spec: ColumnSpec) -> str:
    return spec.quantity.replace("_", " ")


def canonical_column(cell: str) -> str:
    """A header cell in the layout's spelling: ``Glucose [g/L]`` and ``glucose_g/l`` are ``glucose_g_per_l``, ``Temperature (°C)`` is ``temperature_degc``."""
    name = cell.strip().lower().replace("°", "deg").replace("%", "pct")
    for old, new in (("[", " "), ("]", " "), ("(", " "), (")", " "), ("/", " per "), ("-", " "), (" ", "_")):
        name = name.replace(old, new)
    return "_".join(part for part in name.split("_") if part)


def _read_table(path: Path, expected: Sequence[ColumnSpec], required: Sequence[str], *, with_status: bool) -> _Table:
    """Read one CSV file of the layout and check its header: required columns present, no unit mismatch, no duplicate."""
    if not path.is_file():
        raise RecordError(path, RecordProblem.MISSING_FILE, f"no such file: a batch directory holds {', '.join((BATCH_FILES[0], ONLINE_FILE, LAB_FILE, SETPOINTS_FILE))}")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise RecordError(path, RecordProblem.UNREADABLE, f"cannot read the file ({error.strerror})") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RecordError(path, RecordProblem.UNREADABLE, f"not UTF-8 text: byte 0x{raw[error.start]:02x} cannot be decoded; export as UTF-8", row=line) from None
    names = ", ".join(spec.name for spec in expected)
    if not text.strip():
        raise RecordError(path, RecordProblem.EMPTY_FILE, f"the file is empty: expected a header row (row 1) with the columns {names}")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = tuple(next(reader))
        records = [(reader.line_num, tuple(cells)) for cells in reader]
    except csv.Error as error:
        raise RecordError(path, RecordProblem.UNREADABLE, f"not a readable CSV file: {error}", row=reader.line_num) from None
    if not any(cell.strip() for cell in header):
        raise RecordError(path, RecordProblem.EMPTY_FILE, f"row 1 is empty: the header must be row 1, with the columns {names}", row=1)
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        separator = "';'" if ";" in header[0] else "a tab"
        raise RecordError(path, RecordProblem.SEPARATOR, f"the columns are separated by {separator}: export with ',' between columns and '.' as the decimal point", row=1)

    columns: dict[str, int] = {}
    for index, cell in enumerate(header):
        name = canonical_column(cell)
        if not name:
            filled = next((number for number, cells in records if index < len(cells) and cells[index].strip()), None)
            if filled is not None:
                raise RecordError(path, RecordProblem.MISSING_COLUMN, f"column {index + 1} has no name in the header but holds values", row=filled)
            continue
        if name in columns:
            raise RecordError(path, RecordProblem.DUPLICATE_COLUMN, f"the column appears twice (columns {columns[name] + 1} and {index + 1})", row=1, column=cell.strip())
        columns[name] = index
    table = _Table(path, columns, tuple(cell.strip() for cell in header), tuple(records))

    by_name = {spec.name: spec for spec in expected}
    quantities = sorted(expected, key=lambda spec: len(spec.quantity), reverse=True)
    for name in columns:
        base = name.removesuffix(STATUS_SUFFIX) if with_status else name
        if base in by_name:
            continue
        for spec in quantities:
            unit = base.removeprefix(spec.quantity + "_")
            if unit != base and unit and all(word in _UNIT_WORDS for word in unit.split("_")):
                raise table.error(
                    RecordProblem.UNIT_MISMATCH,
                    f"unit mismatch: the layout has {spec.quantity.replace('_', ' ')} in {spec.unit}, in the column {spec.name!r}"
                    f"{' (its status in ' + repr(spec.name + STATUS_SUFFIX) + ')' if base != name else ''}; convert the values to {spec.unit} and rename the column",
                    row=1,
                    column=name,
                )
        bare = next((spec for spec in quantities if base == spec.quantity), None)
        if bare is not None:
            raise table.error(
                RecordProblem.UNIT_MISMATCH,
                f"the column names {spec_words(bare)} without its unit: the layout has it in {bare.unit}, in the column {bare.name!r}",
                row=1,
                column=name,
            )
        log.warning("batch_record_column_ignored", file=str(path), column=table.original(name), known=", ".join(by_name))
    for name in required:
        if name not in columns:
            found = ", ".join(header) if any(header) else "none"
            raise RecordError(path, RecordProblem.MISSING_COLUMN, f"missing column {name!r} (the header has: {found})", row=1, column=name)
    if with_status:
        for name in columns:
            base = name.removesuffix(STATUS_SUFFIX)
            if base != name and base in by_name and base not in columns:
                raise table.error(RecordProblem.MISSING_COLUMN, f"a status column without its value column {base!r}", row=1, column=name)
    for number, cells in table.rows:
        if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header) :]):
            raise RecordError(
                path,
                RecordProblem.EXTRA_CELLS,
                f"{len(cells)} cells where the header has {len(header)} columns (a decimal comma? use '.' as the decimal point)",
                row=number,
            )
    return table


def _data_rows(table: _Table) -> list[tuple[int, tuple[str, ...]]]:
    """The rows that hold anything (blank lines skipped)."""
    return [(number, cells) for number, cells in table.rows if any(cell.strip() for cell in cells)]


def _number(table: _Table, number: int, cells: tuple[str, ...], column: str, *, required: bool = False) -> float:
    """A cell as a float: empty (or NaN) is NaN, unless ``required``; anything else that is not a finite number is an error."""
    text = table.cell(cells, column)
    if not text:
        if required:
            raise table.error(RecordProblem.MISSING_VALUE, "empty cell: a value is required here", row=number, column=column)
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise table.error(
            RecordProblem.NOT_A_NUMBER, f"{text!r} is not a number (use '.' as the decimal point, no thousands separators, no units)", row=number, column=column
        ) from None
    if math.isinf(value):
        raise table.error(RecordProblem.NOT_A_NUMBER, f"{text!r} is not a finite number", row=number, column=column)
    if math.isnan(value) and required:
        raise table.error(RecordProblem.MISSING_VALUE, f"{text!r}: a value is required here", row=number, column=column)
    return value


def _time(table: _Table, number: int, cells: tuple[str, ...], column: str, previous: float | None, *, strict: bool) -> float:
    value = _number(table, number, cells, column, required=True)
    if value < 0.0:
        raise table.error(RecordProblem.OUT_OF_RANGE, f"{value:g} h is before inoculation: process time counts hours from inoculation (0)", row=number, column=column)
    if previous is not None and (value < previous or (strict and value == previous)):
        relation = "not after" if value == previous else "before"
        raise table.error(
            RecordProblem.TIME_NOT_INCREASING, f"time {value:g} h is {relation} the previous row's {previous:g} h: rows must be in increasing time", row=number, column=column
        )
    return value


_STATUS_WORDS = {"good": True, "uncertain": False, "bad": False}


def _good(table: _Table, number: int, cells: tuple[str, ...], column: str) -> bool:
    """Whether a status cell says Good: a word starting Good, Uncertain or Bad (OPC UA's names such as GoodClamped, BadSensorFailure), or an OPC UA StatusCode number."""
    text = table.cell(cells, column)
    if not text:
        return True
    lowered = text.lower()
    for word, good in _STATUS_WORDS.items():
        if lowered.startswith(word):
            return good
    try:
        code = int(lowered, 0)
    except ValueError:
        raise table.error(
            RecordProblem.BAD_STATUS, f"status {text!r} is not Good, Uncertain or Bad (or an OPC UA StatusCode such as 0 or 0x80000000)", row=number, column=column
        ) from None
    if not 0 <= code <= 0xFFFFFFFF:
        raise table.error(RecordProblem.BAD_STATUS, f"status {text!r} is not a 32-bit OPC UA StatusCode", row=number, column=column)
    return code >> 30 == 0


_QUALITY = DataQualityConfig()
_ONLINE_RANGES = {field: _QUALITY.check_of(tag) for tag, field in ONLINE_TAGS.items()}
_SETPOINT_RANGES = {field: _QUALITY.check_of(tag) for tag, field in SETPOINT_TAGS.items()}
_LAB_HIGH = {"viability_pct": 100.0}


def _check_range(table: _Table, number: int, column: str, value: float, ranges: Mapping[str, Any]) -> None:
    check = ranges.get(column)
    if check is not None and math.isfinite(value) and check.outside(value):
        raise table.error(
            RecordProblem.OUT_OF_RANGE,
            f"{value:g} is outside the plausible range [{check.low}, {check.high}] {ColumnSpec.of(column).unit}: is the unit right? "
            "(a value the instrument got wrong: set its status to Bad)",
            row=number,
            column=column,
        )


# ---------------------------------------------------------------------- one batch directory


def read_batch_directory(path: str | Path) -> BatchRecord:
    """One batch from a directory of the CSV layout (docs/batch-records.md)."""
    directory = Path(path)
    if not directory.is_dir():
        raise RecordError(directory, RecordProblem.NOT_A_RECORD, "not a directory: a batch record is a directory holding batch.yaml, online.csv, lab.csv and setpoints.csv")
    batch_path = _batch_file(directory)
    batch = BatchConfig.from_yaml(batch_path)
    online_path, lab_path, setpoints_path = directory / ONLINE_FILE, directory / LAB_FILE, directory / SETPOINTS_FILE
    online = _read_online(online_path)
    end_h = float(online.time_h[-1])
    setpoints = _read_setpoints(setpoints_path, end_h)
    lab = _read_lab(lab_path, end_h)
    sources = tuple((str(file.resolve()), sha256_of(file)) for file in (batch_path, online_path, lab_path, setpoints_path))
    return BatchRecord(batch_id=batch.batch_id, batch=batch, online=online, lab=lab, setpoints=setpoints, end_h=end_h, sources=sources)


def _batch_file(directory: Path) -> Path:
    found = [directory / name for name in BATCH_FILES if (directory / name).is_file()]
    if not found:
        raise RecordError(
            directory / BATCH_FILES[0],
            RecordProblem.MISSING_FILE,
            "no such file: each batch directory needs the batch file (inoculation, media, equipment, recipe, limits, economics): copy the site's batch file and edit it for this batch",
        )
    if len(found) > 1:
        raise RecordError(directory, RecordProblem.NOT_A_RECORD, f"both {found[0].name} and {found[1].name}: keep one batch file")
    return found[0]


def _read_online(path: Path) -> OnlineSeries:
    table = _read_table(path, ONLINE_COLUMNS, (TIME_COLUMN, *REQUIRED_ONLINE), with_status=True)
    rows = _data_rows(table)
    if not rows:
        raise RecordError(path, RecordProblem.EMPTY_FILE, "no data rows after the header: the batch has no online record")
    present = [name for name in ONLINE_FIELDS if table.has(name)]
    times = np.empty(len(rows))
    values = {name: np.empty(len(rows)) for name in present}
    previous: float | None = None
    for i, (number, cells) in enumerate(rows):
        times[i] = previous = _time(table, number, cells, TIME_COLUMN, previous, strict=True)
        for name in present:
            value = _number(table, number, cells, name)
            status = name + STATUS_SUFFIX
            good = _good(table, number, cells, status) if table.has(status) else True
            if good:
                _check_range(table, number, name, value, _ONLINE_RANGES)
            values[name][i] = value if good else math.nan
    return OnlineSeries(time_h=times, values=values)


def _read_setpoints(path: Path, end_h: float) -> SetpointSeries:
    table = _read_table(path, SETPOINT_COLUMNS, (TIME_COLUMN, *SETPOINT_FIELDS), with_status=False)
    rows = _data_rows(table)
    if not rows:
        raise RecordError(path, RecordProblem.EMPTY_FILE, "no data rows after the header: the setpoints applied from inoculation on are needed")
    times = np.empty(len(rows))
    values = np.empty((len(rows), len(SETPOINT_FIELDS)))
    previous: float | None = None
    for i, (number, cells) in enumerate(rows):
        times[i] = previous = _time(table, number, cells, TIME_COLUMN, previous, strict=True)
        if previous > end_h:
            raise table.error(
                RecordProblem.AFTER_END, f"a setpoint change at {previous:g} h, after the batch's end ({end_h:g} h, the last row of {ONLINE_FILE})", row=number, column=TIME_COLUMN
            )
        for j, name in enumerate(SETPOINT_FIELDS):
            value = _number(table, number, cells, name, required=i == 0)
            if math.isnan(value):  # unchanged from the row before
                value = values[i - 1, j]
            elif name != "temperature_degc" and value < 0.0:
                raise table.error(RecordProblem.OUT_OF_RANGE, f"{value:g}: a feed rate cannot be negative", row=number, column=name)
            _check_range(table, number, name, value, _SETPOINT_RANGES)
            values[i, j] = value
    return SetpointSeries(time_h=times, values=values)


def _read_lab(path: Path, end_h: float) -> tuple[LabSample, ...]:
    table = _read_table(path, LAB_COLUMNS, (DRAW_COLUMN, RESULT_COLUMN), with_status=False)
    present = [name for name in LAB_FIELDS if table.has(name)]
    if not present:
        raise RecordError(path, RecordProblem.MISSING_COLUMN, f"no lab column: expected at least one of {', '.join(LAB_FIELDS)}", row=1)
    samples: list[LabSample] = []
    previous: float | None = None
    for number, cells in _data_rows(table):
        draw_h = previous = _time(table, number, cells, DRAW_COLUMN, previous, strict=False)
        if draw_h > end_h:
            raise table.error(RecordProblem.AFTER_END, f"drawn at {draw_h:g} h, after the batch's end ({end_h:g} h, the last row of {ONLINE_FILE})", row=number, column=DRAW_COLUMN)
        result_h = _number(table, number, cells, RESULT_COLUMN, required=True)
        if result_h < draw_h:
            raise table.error(RecordProblem.RESULT_BEFORE_DRAW, f"the result ({result_h:g} h) is before the draw ({draw_h:g} h)", row=number, column=RESULT_COLUMN)
        values = dict.fromkeys(LAB_FIELDS, math.nan)
        for name in present:
            value = _number(table, number, cells, name)
            if value < 0.0 or value > _LAB_HIGH.get(name, math.inf):
                bound = f"[0, {_LAB_HIGH[name]:g}]" if name in _LAB_HIGH else "0 or more"
                raise table.error(
                    RecordProblem.OUT_OF_RANGE, f"{value:g} {ColumnSpec.of(name).unit}: must be {bound} (leave the cell empty when not measured)", row=number, column=name
                )
            values[name] = value
        samples.append(LabSample(draw_h=draw_h, result_h=result_h, values=values))
    if not any(any(sample.measured(name) for name in LAB_FIELDS) for sample in samples):
        what = "the file has no rows after the header" if not samples else f"none of its {len(samples)} rows has a measured value"
        raise RecordError(path, RecordProblem.NO_LAB_RESULTS, f"no lab results: {what}; calibration needs the batch's lab results")
    return tuple(samples)


# ---------------------------------------------------------------------- writing


def write_batch_directory(record: BatchRecord, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``record`` in the CSV layout into the directory ``path`` (created); refuses to replace a record's files unless ``overwrite``.

    Numbers are written with the shortest text that reads back to the same
    float, so reading the directory gives the record back; a value that is NaN
    is written as an empty cell with status Bad.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    names = (*BATCH_FILES, ONLINE_FILE, LAB_FILE, SETPOINTS_FILE)
    existing = [name for name in names if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{directory}: holds {', '.join(existing)} already; nothing written")
    for name in existing:
        (directory / name).unlink()
    batch = record.batch if record.batch.batch_id == record.batch_id else record.batch.model_copy(update={"batch_id": record.batch_id})
    text = f"# Batch file of the record {record.batch_id} (docs/batch-records.md)\n" + yaml.safe_dump(batch.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    (directory / BATCH_FILES[0]).write_text(text, encoding="utf-8")

    present = [name for name in ONLINE_FIELDS if name in record.online.values]
    online_rows = []
    for i, time_h in enumerate(record.online.time_h):
        row = [_text(time_h)]
        for name in present:
            value = float(record.online.values[name][i])
            row += [_text(value), "Good" if math.isfinite(value) else "Bad"]
        online_rows.append(row)
    _write_csv(directory / ONLINE_FILE, [TIME_COLUMN, *(column for name in present for column in (name, name + STATUS_SUFFIX))], online_rows)
    lab_rows = [[_text(s.draw_h), _text(s.result_h), *(_text(s.values.get(name, math.nan)) for name in LAB_FIELDS)] for s in record.lab]
    _write_csv(directory / LAB_FILE, [DRAW_COLUMN, RESULT_COLUMN, *LAB_FIELDS], lab_rows)
    setpoint_rows = [[_text(t), *(_text(v) for v in values)] for t, values in zip(record.setpoints.time_h, record.setpoints.values, strict=True)]
    _write_csv(directory / SETPOINTS_FILE, [TIME_COLUMN, *SETPOINT_FIELDS], setpoint_rows)
    return directory


def _text(value: float) -> str:
    number = float(value)
    return repr(number) if math.isfinite(number) else ""


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------------- runtime history files


_WRITE_APPLIED = "ok"
"""The outcome (``writes.outcome``) of a write the PLC accepted and read back (controller.recorder)."""


def read_history(path: str | Path, *, batch_files: Iterable[str | Path | BatchConfig] = (), batch_ids: Iterable[str] | None = None) -> list[BatchRecord]:
    """One record per batch in a runtime history file (its runs merged), read-only.

    - online: the ``PV.*`` readings of every cycle's scan; NaN where the PLC's
      status was not Good or the runtime's data-quality check rejected the
      value (its ``problem`` column: spike, frozen, stale, out of range);
    - lab: ``lab_results`` (``taken_at_h`` the draw, ``received_at_h`` the result);
    - setpoints: the ``SP.*`` read-backs of every scan (in force at that time)
      and the writes the PLC accepted (outcome ``ok``: in force from the write on);
    - the batch file: the run's ``config`` when it holds one (a ``batch``
      section, which the runtime writes at the start of every run), else the one
      of ``batch_files`` whose ``batch_id`` is the batch's (histories written
      before the runtime stored its batch file need it).

    ``batch_ids`` reads only those batches. ``sources`` holds the history
    file's sha-256 (and its ``-wal`` file's, when there is one) and the batch file's.
    """
    history = Path(path)
    if not history.is_file():
        raise RecordError(history, RecordProblem.MISSING_FILE, "no such history file")
    configs = _batch_configs(batch_files)
    wanted = set(batch_ids) if batch_ids is not None else None
    sources = [(str(history.resolve()), sha256_of(history))]
    wal = history.with_name(history.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        sources.append((str(wal), sha256_of(wal)))
    with _open_history(history) as db:
        runs = db.execute("SELECT id, batch_id, config FROM runs ORDER BY id").fetchall()
        by_batch: dict[str, list[tuple[int, str]]] = {}
        for run_id, batch_id, config in runs:
            by_batch.setdefault(batch_id, []).append((int(run_id), config))
        if wanted is not None:
            unknown = sorted(wanted - set(by_batch))
            if unknown:
                raise RecordError(history, RecordProblem.NOT_A_RECORD, f"no run of batch {', '.join(unknown)} in this history (it holds {', '.join(by_batch) or 'no run'})")
        records = []
        for batch_id, batch_runs in by_batch.items():
            if wanted is not None and batch_id not in wanted:
                continue
            batch, batch_sources = _history_batch(history, batch_id, batch_runs, configs)
            records.append(_history_record(db, history, batch_id, [run for run, _ in batch_runs], batch, (*sources, *batch_sources)))
    if not records:
        raise RecordError(history, RecordProblem.NOT_A_RECORD, "the history holds no run: no batch to read")
    return records


def _batch_configs(batch_files: Iterable[str | Path | BatchConfig]) -> list[tuple[BatchConfig, tuple[tuple[str, str], ...]]]:
    loaded: list[tuple[BatchConfig, tuple[tuple[str, str], ...]]] = []
    for item in batch_files:
        if isinstance(item, BatchConfig):
            loaded.append((item, ()))
        else:
            file = Path(item)
            loaded.append((BatchConfig.from_yaml(file), ((str(Path(file).resolve()), sha256_of(Path(file))),)))
    return loaded


@contextmanager
def _open_history(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a history file, closed afterwards; errors as :class:`RecordError`."""
    try:
        db = sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as error:
        raise RecordError(path, RecordProblem.UNREADABLE, f"cannot open the history for reading: {error}") from error
    try:
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if "meta" in tables else None
        except sqlite3.Error as error:
            raise RecordError(path, RecordProblem.UNREADABLE, f"cannot read the history: {error}") from error
        missing = sorted({"runs", "readings", "lab_results", "writes"} - tables)
        if missing:
            raise RecordError(path, RecordProblem.NOT_A_RECORD, f"not a runtime history: no table {', '.join(missing)}")
        if version is not None and int(version[0]) > SCHEMA_VERSION:
            raise RecordError(path, RecordProblem.NOT_A_RECORD, f"history schema version {version[0]}; this version reads up to {SCHEMA_VERSION}")
        yield db
    finally:
        db.close()


def _history_batch(
    history: Path, batch_id: str, runs: list[tuple[int, str]], configs: list[tuple[BatchConfig, tuple[tuple[str, str], ...]]]
) -> tuple[BatchConfig, tuple[tuple[str, str], ...]]:
    """The batch file of ``batch_id``: from the latest run's config if it holds one, else the given batch file with that id."""
    for _, text in reversed(runs):
        try:
            stored = json.loads(text).get("batch")
        except (ValueError, AttributeError):
            stored = None
        if isinstance(stored, Mapping):
            try:
                return BatchConfig.model_validate(stored), ()
            except ValueError:
                break
    matches = [(config, sources) for config, sources in configs if config.batch_id == batch_id]
    if matches:
        return matches[0]
    given = ""
    if configs:
        ids = ", ".join(f"{sources[0][0]}: {config.batch_id}" if sources else config.batch_id for config, sources in configs)
        given = f", and no batch file given has batch_id {batch_id} (given: {ids})"
    raise RecordError(
        history,
        RecordProblem.NO_BATCH_CONFIG,
        f"batch {batch_id}: the history does not hold its batch file (written before the runtime stored it with each run){given}; "
        f"give the batch file of {batch_id} (--batch), with batch_id: {batch_id}",
    )


def _history_record(db: sqlite3.Connection, history: Path, batch_id: str, run_ids: list[int], batch: BatchConfig, sources: tuple[tuple[str, str], ...]) -> BatchRecord:
    marks = ",".join("?" * len(run_ids))
    tags = [*ONLINE_TAGS, *SETPOINT_TAGS]
    try:
        readings = db.execute(
            f"SELECT process_time_h, signal, value, good, problem FROM readings WHERE run_id IN ({marks}) AND signal IN ({','.join('?' * len(tags))}) ORDER BY rowid",
            (*run_ids, *tags),
        ).fetchall()
        lab_rows = db.execute(
            f"SELECT seq, taken_at_h, received_at_h, {', '.join(LAB_FIELDS)} FROM lab_results WHERE run_id IN ({marks}) ORDER BY rowid",
            run_ids,
        ).fetchall()
        writes = db.execute(f'SELECT process_time_h, "values" FROM writes WHERE run_id IN ({marks}) AND outcome = ? ORDER BY id', (*run_ids, _WRITE_APPLIED)).fetchall()
    except sqlite3.Error as error:
        raise RecordError(history, RecordProblem.UNREADABLE, f"batch {batch_id}: cannot read the history: {error}") from error
    if not readings:
        raise RecordError(history, RecordProblem.NOT_A_RECORD, f"batch {batch_id}: no scan recorded (table readings): nothing to calibrate on")

    # Online: one row per scan time; a scan repeated at the same time (a restart) replaces the earlier one.
    scans: dict[float, dict[str, float]] = {}
    setpoint_events: list[tuple[float, int, dict[str, float]]] = []
    for time_h, signal, value, good, problem in readings:
        usable = bool(good) and value is not None and math.isfinite(value)
        if signal in ONLINE_TAGS:
            scans.setdefault(float(time_h), {})[ONLINE_TAGS[signal]] = float(value) if usable and problem is None else math.nan
        elif usable:
            setpoint_events.append((float(time_h), 0, {SETPOINT_TAGS[signal]: float(value)}))
    times = np.array(sorted(scans))
    online_values = {name: np.array([scans[t].get(name, math.nan) for t in times]) for name in ONLINE_FIELDS if any(name in scan for scan in scans.values())}
    online = OnlineSeries(time_h=times, values=online_values)
    end_h = float(times[-1])

    for time_h, text in writes:
        written = {SETPOINT_TAGS[tag]: float(value) for tag, value in json.loads(text).items() if tag in SETPOINT_TAGS and isinstance(value, int | float)}
        if written:
            setpoint_events.append((float(time_h), 1, written))
    setpoints = _setpoint_series(setpoint_events)
    if setpoints is None:
        raise RecordError(history, RecordProblem.NOT_A_RECORD, f"batch {batch_id}: no setpoint recorded (SP.* readings or accepted writes)", column="readings.signal")

    lab: list[LabSample] = []
    seen: set[tuple[int, float]] = set()
    for seq, taken_h, received_h, *values in lab_rows:
        if (seq, taken_h) in seen:  # the same result recorded again after a restart
            continue
        seen.add((seq, taken_h))
        sample = LabSample(
            draw_h=float(taken_h), result_h=float(received_h), values={name: math.nan if v is None else float(v) for name, v in zip(LAB_FIELDS, values, strict=True)}
        )
        if sample.result_h < sample.draw_h:
            raise RecordError(
                history,
                RecordProblem.RESULT_BEFORE_DRAW,
                f"batch {batch_id}: lab result {seq} received at {received_h:g} h, before its draw at {taken_h:g} h",
                column="lab_results.received_at_h",
            )
        if sample.draw_h > end_h:
            raise RecordError(
                history, RecordProblem.AFTER_END, f"batch {batch_id}: lab result {seq} drawn at {taken_h:g} h, after the last scan ({end_h:g} h)", column="lab_results.taken_at_h"
            )
        lab.append(sample)
    lab.sort(key=lambda sample: sample.draw_h)
    if not any(any(sample.measured(name) for name in LAB_FIELDS) for sample in lab):
        raise RecordError(history, RecordProblem.NO_LAB_RESULTS, f"batch {batch_id}: no lab results recorded (table lab_results); calibration needs the batch's lab results")
    return BatchRecord(batch_id=batch_id, batch=batch, online=online, lab=tuple(lab), setpoints=setpoints, end_h=end_h, sources=sources)


def _setpoint_series(events: list[tuple[float, int, dict[str, float]]]) -> SetpointSeries | None:
    """Setpoint rows from read-backs and writes in time order (at one time, the write after the scan); a row only where something changed."""
    current = dict.fromkeys(SETPOINT_FIELDS, math.nan)
    times: list[float] = []
    rows: list[list[float]] = []
    events.sort(key=lambda event: (event[0], event[1]))
    for i, (time_h, _, values) in enumerate(events):
        current.update(values)
        if i + 1 < len(events) and events[i + 1][0] == time_h:
            continue  # the last event at this time decides
        row = [current[name] for name in SETPOINT_FIELDS]
        if not all(math.isfinite(v) for v in row) or (rows and rows[-1] == row):
            continue
        if times and times[-1] == time_h:
            rows[-1] = row
        else:
            times.append(time_h)
            rows.append(row)
    if not rows:
        return None
    return SetpointSeries(time_h=np.array(times), values=np.array(rows))


# ---------------------------------------------------------------------- many records


def read_records(paths: Iterable[str | Path], *, batch_files: Iterable[str | Path | BatchConfig] = ()) -> list[BatchRecord]:
    """Records from batch directories, directories of batch directories and history files (``.sqlite``, ``.sqlite3``, ``.db``).

    ``batch_files`` are the batch files of the batches in history files,
    matched by ``batch_id``; one that matches no batch is an error, and so is
    the same batch id read twice.
    """
    if isinstance(paths, str | Path):
        raise TypeError(f"read_records takes a list of paths, got the single path {str(paths)!r}")
    configs = list(batch_files)
    records: list[BatchRecord] = []
    for item in paths:
        path = Path(item)
        if path.is_file() and path.suffix.lower() in HISTORY_SUFFIXES:
            records += read_history(path, batch_files=configs)
        elif path.is_dir() and _is_batch_directory(path):
            records.append(read_batch_directory(path))
        elif path.is_dir():
            found = sorted(child for child in path.iterdir() if child.is_dir() and _is_batch_directory(child))
            if not found:
                raise RecordError(
                    path,
                    RecordProblem.NOT_A_RECORD,
                    f"no batch record here: neither a batch directory ({BATCH_FILES[0]}, {ONLINE_FILE}, {LAB_FILE}, {SETPOINTS_FILE}) nor a directory of them",
                )
            records += [read_batch_directory(child) for child in found]
        elif path.exists():
            raise RecordError(
                path, RecordProblem.NOT_A_RECORD, f"not a batch record: give a batch directory, a directory of them, or a history file ({', '.join(HISTORY_SUFFIXES)})"
            )
        else:
            raise RecordError(path, RecordProblem.MISSING_FILE, "no such file or directory")
    first: dict[str, BatchRecord] = {}
    for record in records:
        if record.batch_id in first:
            raise RecordError(
                record.sources[0][0] if record.sources else record.batch_id,
                RecordProblem.DUPLICATE_BATCH,
                f"batch {record.batch_id} is read twice (also from {first[record.batch_id].sources[0][0] if first[record.batch_id].sources else 'another source'}): give each batch once",
            )
        first[record.batch_id] = record
    read_ids = {record.batch_id for record in records}
    for config, sources in _batch_configs(configs):
        if config.batch_id not in read_ids:
            where = sources[0][0] if sources else config.batch_id
            raise RecordError(
                where, RecordProblem.NO_BATCH_CONFIG, f"batch {config.batch_id} is not among the batches read ({', '.join(sorted(read_ids)) or 'none'}): check its batch_id"
            )
    return records


def _is_batch_directory(path: Path) -> bool:
    return any((path / name).is_file() for name in (*BATCH_FILES, ONLINE_FILE))
