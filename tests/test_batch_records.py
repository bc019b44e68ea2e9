"""Batch records: the CSV layout read and written, runtime history files read, simulated and process-development batches recorded."""

from __future__ import annotations

import csv
import hashlib
import math
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from controller.config import BatchConfig
from controller.ports import Reading
from controller.records import ONLINE_FIELDS, BatchRecord
from controller.types import LAB_FIELDS, LabResult
from interfaces.batch_records import (
    LAB_FILE,
    ONLINE_FILE,
    SETPOINTS_FILE,
    RecordError,
    RecordProblem,
    read_batch_directory,
    read_history,
    read_records,
    write_batch_directory,
)
from interfaces.history import SqliteHistory
from simulator.batch import build_simulated_plc, run_recipe_batch
from simulator.config import LoadedSimulation, load_simulation
from simulator.records import development_batches, development_recipes, record_batch

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = Path(__file__).resolve().parent / "data" / "records" / "BR01-EX-001"


@pytest.fixture(scope="module")
def loaded() -> LoadedSimulation:
    return load_simulation(REPO / "configs" / "simulate" / "platform.yaml")


@pytest.fixture(scope="module")
def short_record(loaded: LoadedSimulation) -> BatchRecord:
    """Four days of the platform batch, as a historian recorded them."""
    return record_batch(loaded, until_h=96.0)


def assert_same_record(read: BatchRecord, written: BatchRecord) -> None:
    """Everything but the sources, exactly (NaN where NaN)."""
    assert read.batch_id == written.batch_id
    assert read.batch == written.batch
    assert read.end_h == written.end_h
    np.testing.assert_array_equal(read.online.time_h, written.online.time_h)
    assert set(read.online.values) == set(written.online.values)
    for name, values in written.online.values.items():
        np.testing.assert_array_equal(read.online.values[name], values, err_msg=name)
    assert len(read.lab) == len(written.lab)
    for got, want in zip(read.lab, written.lab, strict=True):
        assert (got.draw_h, got.result_h) == (want.draw_h, want.result_h)
        np.testing.assert_array_equal([got.values[n] for n in LAB_FIELDS], [want.values[n] for n in LAB_FIELDS])
    np.testing.assert_array_equal(read.setpoints.time_h, written.setpoints.time_h)
    np.testing.assert_array_equal(read.setpoints.values, written.setpoints.values)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- the CSV layout: round trip


def test_a_simulated_record_written_as_csv_reads_back_the_same(short_record, tmp_path):
    directory = write_batch_directory(short_record, tmp_path / "batch")
    read = read_batch_directory(directory)
    assert_same_record(read, short_record)
    files = ["batch.yaml", ONLINE_FILE, LAB_FILE, SETPOINTS_FILE]
    assert read.sources == tuple((str(directory / name), sha256(directory / name)) for name in files)
    with pytest.raises(FileExistsError):
        write_batch_directory(short_record, directory)
    write_batch_directory(short_record, directory, overwrite=True)


def test_the_example_directory_reads_with_its_bad_values_as_nan():
    record = read_batch_directory(EXAMPLE)
    assert record.batch_id == "BR01-EX-001"
    assert record.end_h == 48.0
    assert record.online.time_h[0] == 0.0 and np.all(np.diff(record.online.time_h) > 0)
    rows = list(csv.DictReader(EXAMPLE.joinpath(ONLINE_FILE).read_text(encoding="utf-8").splitlines()))
    bad = [i for i, row in enumerate(rows) if row["capacitance_pf_per_cm_status"].lower().startswith(("bad", "uncertain"))]
    assert bad, "the example shows a Bad probe"
    capacitance = record.online.signal("capacitance_pf_per_cm")
    assert np.isnan(capacitance[bad]).all() and np.isfinite(np.delete(capacitance, bad)).all()
    assert [(s.draw_h, s.result_h) for s in record.lab] == [(0.0, 4.2), (23.87, 27.32)]
    assert not record.lab[1].measured("titer_g_per_l"), "an empty cell is not measured"
    assert record.setpoints.at(30.0)[0] == 0.0 and record.setpoints.at(47.0)[1] > 0.0


# ---------------------------------------------------------------------- the CSV layout: errors


def rewrite(path: Path, change) -> None:
    """Apply ``change`` to the file's rows (lists of cells; index 0 is row 1, the header)."""
    with path.open(encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file))
    change(rows)
    with path.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)


def set_cell(rows: list[list[str]], row: int, column: str, value: str) -> None:
    rows[row - 1][rows[0].index(column)] = value


def rename(rows: list[list[str]], old: str, new: str) -> None:
    rows[0][rows[0].index(old)] = new


def drop(rows: list[list[str]], column: str) -> None:
    index = rows[0].index(column)
    for row in rows:
        del row[index]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    copy = tmp_path / "BR01-EX-001"
    shutil.copytree(EXAMPLE, copy)
    return copy


def _swap_times(rows: list[list[str]]) -> None:
    rows[3][0], rows[4][0] = rows[4][0], rows[3][0]


ERROR_CASES = {
    "missing column": (ONLINE_FILE, lambda rows: drop(rows, "volume_l"), RecordProblem.MISSING_COLUMN, 1, "volume_l"),
    "missing time column": (SETPOINTS_FILE, lambda rows: drop(rows, "process_time_h"), RecordProblem.MISSING_COLUMN, 1, "process_time_h"),
    "unit mismatch (glucose in mM)": (LAB_FILE, lambda rows: rename(rows, "glucose_g_per_l", "glucose_mm"), RecordProblem.UNIT_MISMATCH, 1, "glucose_mm"),
    "unit mismatch (volume in mL)": (ONLINE_FILE, lambda rows: rename(rows, "volume_l", "volume_ml"), RecordProblem.UNIT_MISMATCH, 1, "volume_ml"),
    "unit mismatch (°F)": (SETPOINTS_FILE, lambda rows: rename(rows, "temperature_degc", "temperature_degf"), RecordProblem.UNIT_MISMATCH, 1, "temperature_degf"),
    "unit mismatch (status)": (ONLINE_FILE, lambda rows: rename(rows, "temperature_degc_status", "temperature_k_status"), RecordProblem.UNIT_MISMATCH, 1, "temperature_k_status"),
    "unit mismatch (minutes)": (ONLINE_FILE, lambda rows: rename(rows, "process_time_h", "Process_Time_Min"), RecordProblem.UNIT_MISMATCH, 1, "Process_Time_Min"),
    "non-number": (ONLINE_FILE, lambda rows: set_cell(rows, 5, "our_mmol_per_l_h", "n/a"), RecordProblem.NOT_A_NUMBER, 5, "our_mmol_per_l_h"),
    "infinite": (LAB_FILE, lambda rows: set_cell(rows, 2, "vcd_1e6_per_ml", "inf"), RecordProblem.NOT_A_NUMBER, 2, "vcd_1e6_per_ml"),
    "non-monotone time": (ONLINE_FILE, _swap_times, RecordProblem.TIME_NOT_INCREASING, 5, "process_time_h"),
    "repeated time": (SETPOINTS_FILE, lambda rows: set_cell(rows, 3, "process_time_h", rows[1][0]), RecordProblem.TIME_NOT_INCREASING, 3, "process_time_h"),
    "negative time": (ONLINE_FILE, lambda rows: set_cell(rows, 2, "process_time_h", "-1"), RecordProblem.OUT_OF_RANGE, 2, "process_time_h"),
    "empty time": (ONLINE_FILE, lambda rows: set_cell(rows, 7, "process_time_h", ""), RecordProblem.MISSING_VALUE, 7, "process_time_h"),
    "result before draw": (LAB_FILE, lambda rows: set_cell(rows, 3, "result_time_h", "23.5"), RecordProblem.RESULT_BEFORE_DRAW, 3, "result_time_h"),
    "draw after the end": (LAB_FILE, lambda rows: set_cell(rows, 3, "draw_time_h", "48.5"), RecordProblem.AFTER_END, 3, "draw_time_h"),
    "setpoint after the end": (SETPOINTS_FILE, lambda rows: rows.append(["49.0", "1", "0", "33"]), RecordProblem.AFTER_END, 4, "process_time_h"),
    "negative lab value": (LAB_FILE, lambda rows: set_cell(rows, 2, "lactate_g_per_l", "-0.1"), RecordProblem.OUT_OF_RANGE, 2, "lactate_g_per_l"),
    "implausible temperature": (ONLINE_FILE, lambda rows: set_cell(rows, 4, "temperature_degc", "97.7"), RecordProblem.OUT_OF_RANGE, 4, "temperature_degc"),
    "unknown status": (ONLINE_FILE, lambda rows: set_cell(rows, 6, "volume_l_status", "OK"), RecordProblem.BAD_STATUS, 6, "volume_l_status"),
    "first setpoint row incomplete": (SETPOINTS_FILE, lambda rows: set_cell(rows, 2, "glucose_rate_lph", ""), RecordProblem.MISSING_VALUE, 2, "glucose_rate_lph"),
    "duplicate column": (LAB_FILE, lambda rows: rename(rows, "lactate_g_per_l", "titer_g_per_l"), RecordProblem.DUPLICATE_COLUMN, 1, "titer_g_per_l"),
    "decimal comma": (ONLINE_FILE, lambda rows: rows[9].append("5"), RecordProblem.EXTRA_CELLS, 10, None),
    "quantity without its unit": (LAB_FILE, lambda rows: rename(rows, "glucose_g_per_l", "Glucose"), RecordProblem.UNIT_MISMATCH, 1, "Glucose"),
    "unit mismatch spelled [mM]": (LAB_FILE, lambda rows: rename(rows, "glucose_g_per_l", "Glucose [mM]"), RecordProblem.UNIT_MISMATCH, 1, "Glucose [mM]"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_bad_input_names_the_file_row_and_column(example, case):
    name, change, problem, row, column = ERROR_CASES[case]
    rewrite(example / name, change)
    with pytest.raises(RecordError) as raised:
        read_batch_directory(example)
    error = raised.value
    assert (error.problem, error.path, error.row, error.column) == (problem, example / name, row, column), str(error)
    assert str(error).startswith(f"{example / name}, row {row}")
    if column is not None:
        assert f"column {column!r}" in str(error)


@pytest.mark.parametrize("header", ["Glucose [g/L]", "glucose_g/l", "GLUCOSE (g/L)"])
def test_a_column_in_a_historians_spelling_is_read_as_its_quantity(example, header):
    expected = read_batch_directory(example).lab_series("glucose_g_per_l")
    rewrite(example / LAB_FILE, lambda rows: rename(rows, "glucose_g_per_l", header))
    times, values = read_batch_directory(example).lab_series("glucose_g_per_l")
    np.testing.assert_array_equal(times, expected[0])
    np.testing.assert_array_equal(values, expected[1])


def test_a_unit_mismatch_names_the_expected_column(example):
    rewrite(example / LAB_FILE, lambda rows: rename(rows, "glucose_g_per_l", "glucose_mm"))
    with pytest.raises(RecordError, match=r"lab.csv, row 1, column 'glucose_mm': unit mismatch: .*in g/L, in the column 'glucose_g_per_l'"):
        read_batch_directory(example)


def test_an_unknown_column_is_ignored_not_a_mismatch(example):
    rewrite(example / ONLINE_FILE, lambda rows: [row.append("7.01" if i else "ph_units") for i, row in enumerate(rows)])
    read_batch_directory(example)


def test_a_batch_without_lab_results_is_refused(example):
    rewrite(example / LAB_FILE, lambda rows: [set_cell(rows, i, name, "") for i in range(2, len(rows) + 1) for name in LAB_FIELDS if name in rows[0]])
    with pytest.raises(RecordError, match=r"lab.csv: no lab results: none of its 2 rows has a measured value") as raised:
        read_batch_directory(example)
    assert raised.value.problem is RecordProblem.NO_LAB_RESULTS
    rewrite(example / LAB_FILE, lambda rows: rows.__delitem__(slice(1, None)))
    with pytest.raises(RecordError, match=r"no lab results: the file has no rows after the header"):
        read_batch_directory(example)


@pytest.mark.parametrize("name", [ONLINE_FILE, LAB_FILE, SETPOINTS_FILE])
def test_an_empty_or_missing_file_is_refused(example, name):
    (example / name).write_bytes(b"")
    with pytest.raises(RecordError, match=rf"{name}: the file is empty: expected a header row \(row 1\)") as raised:
        read_batch_directory(example)
    assert raised.value.problem is RecordProblem.EMPTY_FILE
    (example / name).unlink()
    with pytest.raises(RecordError, match=rf"{name}: no such file") as raised:
        read_batch_directory(example)
    assert raised.value.problem is RecordProblem.MISSING_FILE


def test_a_semicolon_export_is_told_to_use_commas(example):
    text = (example / SETPOINTS_FILE).read_text(encoding="utf-8").replace(",", ";")
    (example / SETPOINTS_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(RecordError, match=r"setpoints.csv, row 1: the columns are separated by ';'"):
        read_batch_directory(example)


def test_an_excel_export_with_crlf_and_a_byte_order_mark_reads_the_same(example):
    record = read_batch_directory(example)
    for name in (ONLINE_FILE, LAB_FILE, SETPOINTS_FILE):
        text = (example / name).read_text(encoding="utf-8")
        (example / name).write_bytes("\ufeff".encode() + text.replace("\n", "\r\n").encode())
    assert_same_record(read_batch_directory(example), record)


def test_a_single_path_is_not_taken_for_a_list_of_paths():
    with pytest.raises(TypeError, match="a list of paths"):
        read_records(str(EXAMPLE))


def test_statuses_in_opc_ua_words_and_codes(example):
    def statuses(rows: list[list[str]]) -> None:
        set_cell(rows, 2, "volume_l_status", "GoodClamped")
        set_cell(rows, 3, "volume_l_status", "BadSensorFailure")
        set_cell(rows, 4, "volume_l_status", "0x40000000")  # Uncertain
        set_cell(rows, 5, "volume_l_status", "0")  # Good
        set_cell(rows, 6, "volume_l_status", "")  # no status: the value counts

    rewrite(example / ONLINE_FILE, statuses)
    volume = read_batch_directory(example).online.signal("volume_l")
    assert np.isfinite(volume[[0, 3, 4]]).all()
    assert np.isnan(volume[[1, 2]]).all()


def test_a_setpoint_cell_left_empty_keeps_the_value_before(example):
    def changes(rows: list[list[str]]) -> None:
        set_cell(rows, 2, "temperature_degc", "36.0")
        set_cell(rows, 3, "temperature_degc", "")

    rewrite(example / SETPOINTS_FILE, changes)
    setpoints = read_batch_directory(example).setpoints
    assert list(setpoints.values[:, 2]) == [36.0, 36.0]
    assert list(setpoints.values[:, 1]) == [0.0, 0.02195]


def test_a_bad_batch_file_is_a_config_error_naming_the_field(example):
    text = (example / "batch.yaml").read_text(encoding="utf-8").replace("volume_l: 1400.0", "volume_l: -5.0")
    (example / "batch.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"batch.yaml.*inoculation.volume_l"):
        read_batch_directory(example)


# ---------------------------------------------------------------------- simulated records


def test_the_historian_does_not_disturb_the_batch_and_sees_what_the_plc_did(loaded):
    record = record_batch(loaded)
    reference = run_recipe_batch(loaded)
    draws = [(s.draw_h, *(s.values[name] for name in LAB_FIELDS)) for s in record.lab]
    assert draws == [(r.taken_at_h, *(getattr(r, name) for name in LAB_FIELDS)) for r in reference.lab_results if r.taken_at_h <= record.end_h]
    assert all(s.draw_h < s.result_h <= s.draw_h + loaded.simulation.sampling.result_delay_max_h + 1e-9 for s in record.lab)
    assert record.end_h == reference.trajectory.time_h[-1] - loaded.batch.cycle_period_h, "the last scan before harvest"
    # Mass balance: the feed setpoints recorded, integrated over time, give the PLC's feed totaliser.
    t = record.online.time_h
    applied = record.setpoints.at(t[:-1])
    for column, total in ((0, "feed_total_l"), (1, "glucose_feed_total_l")):
        integral = float(np.sum(applied[:, column] * np.diff(t)))
        measured = float(record.online.signal(total)[-1])
        assert integral == pytest.approx(measured, rel=0.02), total
    assert set(record.online.values) == set(ONLINE_FIELDS)


def test_a_bad_probe_is_nan_in_the_record(make_simulation):
    loaded = make_simulation(faults=[{"kind": "probe", "tag": "PV.OUR", "mode": "bad", "start_h": 10.0, "end_h": 20.0}])
    record = record_batch(loaded, until_h=30.0)
    our = record.online.signal("our_mmol_per_l_h")
    inside = (record.online.time_h >= 10.0) & (record.online.time_h < 20.0)
    assert np.isnan(our[inside]).all() and np.isfinite(our[~inside]).all()


def test_development_recipes_are_valid_distinct_and_within_the_equipment(loaded):
    batches = development_recipes(loaded.batch, 30, np.random.default_rng(5))
    equipment = loaded.batch.equipment
    recipes = [b.recipe for b in batches]
    assert len({r.model_dump_json() for r in recipes}) == 30
    for recipe in recipes:
        BatchConfig.model_validate(loaded.batch.model_dump() | {"recipe": recipe.model_dump()})
        assert equipment.temperature_min_degc <= recipe.temperature_shifted_degc <= recipe.temperature_initial_degc <= equipment.temperature_max_degc
        assert recipe.temperature_shift_h < recipe.harvest_h
        assert recipe.feed_fraction_of_initial_volume_per_day * loaded.batch.inoculation.volume_l / 24.0 <= equipment.feed_rate_max_lph
    for name in ("temperature_shift_h", "temperature_shifted_degc", "feed_fraction_of_initial_volume_per_day", "glucose_target_g_per_l", "feed_start_h"):
        assert len({getattr(r, name) for r in recipes}) >= 4, f"{name} is varied"


def test_development_batches_run_their_own_recipes_and_seeds(loaded, tmp_path):
    records = development_batches(loaded, 3, rng_seed=11, until_h=200.0)
    assert len({r.batch_id for r in records}) == 3
    assert all(r.batch.batch_id == r.batch_id for r in records)
    assert len({r.batch.recipe.model_dump_json() for r in records}) == 3
    assert len({r.lab[0].values["vcd_1e6_per_ml"] for r in records}) == 3, "each batch has its own noise"
    for record in records:
        recipe = record.batch.recipe
        temperature = record.setpoints.at(np.array([recipe.temperature_shift_h - 1.0, recipe.temperature_shift_h + 1.0]))[:, 2]
        assert list(temperature) == [recipe.temperature_initial_degc, recipe.temperature_shifted_degc], "the recipe the record says is the one run"
        assert record.setpoints.at(recipe.feed_start_h - 1.0)[0] == 0.0 and record.setpoints.at(recipe.feed_start_h + 1.0)[0] > 0.0
    again = development_batches(loaded, 3, rng_seed=11, until_h=200.0)
    assert [r.batch for r in again] == [r.batch for r in records], "reproducible from the seed"
    assert read_records(write_batch_directory(r, tmp_path / r.batch_id) for r in records)[0].batch_id == records[0].batch_id


# ---------------------------------------------------------------------- runtime history files


def write_history(loaded: LoadedSimulation, path: Path, *, until_h: float, restart_at_h: float | None = None, config: dict | None = None) -> None:
    """A history as the runtime records it (interfaces.history's API): a scan per cycle, each new lab result, setpoint writes with their outcomes.

    The PLC runs its recipe; at 30 h a write the PLC accepted moves the
    temperature setpoint, and one it refused (outcome ``refused``) must not count.
    ``restart_at_h``: the runtime restarts there (a second run of the batch, the last scan recorded again).
    """
    plc, _ = build_simulated_plc(loaded)
    plc.set_operator_remote(False)
    history = SqliteHistory(path)
    history.start_run(batch_id=loaded.batch.batch_id, requested_mode="advisory", config=config if config is not None else {"mode": "advisory"})
    seq = 0
    while True:
        now_h = plc.process_time_h
        scan = plc.snapshot()
        readings = {tag: Reading(r.value, r.good, datetime.now(UTC)) for tag, r in scan.items()}
        problems = {"PV.OUR": "spike: 0.2 -> 0.4 in one cycle (limit 0.1)"} if now_h == 10.0 else {}
        history.record_scan(now_h, readings, problems)
        values = [float(scan[f"Sample.{tag}"].value) for tag in ("VCD", "Viability", "Glucose", "Lactate", "Glutamine", "Ammonia", "Titer", "Osmolality")]
        if scan["Sample.Seq"].value != seq:
            seq = int(scan["Sample.Seq"].value)
            history.record_lab(now_h, LabResult(seq, float(scan["Sample.TakenAt"].value), *values), used=True)
        if restart_at_h is not None and now_h == restart_at_h:
            history.end_run(reason="restart")
            history.start_run(batch_id=loaded.batch.batch_id, requested_mode="advisory", config={})
            history.record_scan(now_h, readings, problems)
            history.record_lab(now_h, LabResult(seq, float(scan["Sample.TakenAt"].value), *values), used=False)  # the last result, seen again
        if now_h == 30.0:
            history.record_write(now_h, {"SP.Temperature": 35.0}, "refused", "BadOutOfRange")
            write_id = history.record_write_intent(now_h, {"SP.Temperature": 34.0, "MPC.Heartbeat": 3})
            history.record_write_outcome(write_id, "ok")
        history.record_write(now_h, {"MPC.Heartbeat": int(now_h)}, "ok")
        if now_h >= until_h:
            break
        plc.advance_to(plc.next_cycle_boundary_h())
    history.end_run(reason="stopped")
    history.close()


def test_a_history_file_reads_as_the_records_it_holds(loaded, tmp_path):
    path = tmp_path / "history.sqlite"
    write_history(loaded, path, until_h=60.0, restart_at_h=20.0)
    before = path.read_bytes()
    [record] = read_history(path, batch_files=[REPO / "configs" / "batch" / "platform.yaml"])
    assert path.read_bytes() == before, "read-only"
    reference = record_batch(loaded, until_h=60.0)  # the same scans of the same seed, by the simulator's own historian
    assert record.batch == loaded.batch and record.end_h == 60.0
    np.testing.assert_array_equal(record.online.time_h, reference.online.time_h)
    rejected = record.online.time_h == 10.0
    assert np.isnan(record.online.values["our_mmol_per_l_h"][rejected]).all(), "a value the runtime's quality check rejected is not used"
    reference.online.values["our_mmol_per_l_h"][rejected] = math.nan
    for name in ONLINE_FIELDS:
        np.testing.assert_array_equal(record.online.values[name], reference.online.values[name], err_msg=name)
    assert [(s.draw_h, s.values) for s in record.lab] == [(s.draw_h, s.values) for s in reference.lab if s.result_h <= 60.0]
    for got, published in zip(record.lab, reference.lab, strict=False):
        assert published.result_h <= got.result_h < published.result_h + loaded.batch.cycle_period_h, "received at the first cycle after publication"
    # Setpoints: the PLC's read-backs, plus the accepted write at 30 h (34 °C until the recipe's next change), never the refused one.
    assert record.setpoints.at(30.0)[2] == 34.0
    np.testing.assert_array_equal(record.setpoints.at(np.array([29.0, 31.0])), reference.setpoints.at(np.array([29.0, 31.0])))
    assert 35.0 not in record.setpoints.values[:, 2]
    assert {name for name, _ in record.sources} == {str(path), str(REPO / "configs" / "batch" / "platform.yaml")}
    assert dict(record.sources)[str(path)] == hashlib.sha256(before).hexdigest()


def test_a_history_is_read_for_the_batches_asked(loaded, tmp_path):
    path = tmp_path / "history.sqlite"
    write_history(loaded, path, until_h=30.0)
    assert [r.batch_id for r in read_history(path, batch_files=[loaded.batch], batch_ids=["BR01-DEMO-001"])] == ["BR01-DEMO-001"]
    with pytest.raises(RecordError, match=r"no run of batch BR01-NONE in this history \(it holds BR01-DEMO-001\)"):
        read_history(path, batch_files=[loaded.batch], batch_ids=["BR01-NONE"])
    (tmp_path / "notes.db").write_text("not a database " * 200)
    with pytest.raises(RecordError, match=r"notes.db") as raised:
        read_history(tmp_path / "notes.db")
    assert raised.value.problem is RecordProblem.UNREADABLE


def test_a_history_without_its_batch_file_says_what_to_give(loaded, tmp_path):
    path = tmp_path / "history.sqlite"
    write_history(loaded, path, until_h=30.0)
    with pytest.raises(RecordError, match=r"batch BR01-DEMO-001: the history does not hold its batch file.*--batch") as raised:
        read_history(path)
    assert raised.value.problem is RecordProblem.NO_BATCH_CONFIG
    other = loaded.batch.model_copy(update={"batch_id": "BR01-OTHER"})
    with pytest.raises(
        RecordError, match=r"no batch file given has batch_id BR01-DEMO-001 \(given: BR01-OTHER\); give the batch file of BR01-DEMO-001 \(--batch\), with batch_id: BR01-DEMO-001"
    ):
        read_history(path, batch_files=[other])


def test_a_history_whose_run_config_holds_the_batch_file_needs_no_other(loaded, tmp_path):
    path = tmp_path / "history.sqlite"
    write_history(loaded, path, until_h=30.0, config={"mode": "advisory", "batch": loaded.batch.model_dump(mode="json")})
    [record] = read_history(path)
    assert record.batch == loaded.batch
    assert [name for name, _ in record.sources] == [str(path)]


def test_a_history_without_lab_results_is_refused(loaded, tmp_path):
    path = tmp_path / "history.sqlite"
    write_history(loaded, path, until_h=3.0)  # the first result is published after 3 h
    with pytest.raises(RecordError, match=r"history.sqlite: batch BR01-DEMO-001: no lab results recorded") as raised:
        read_history(path, batch_files=[loaded.batch])
    assert raised.value.problem is RecordProblem.NO_LAB_RESULTS


def test_records_from_directories_and_histories_together(loaded, short_record, tmp_path):
    history = tmp_path / "site.sqlite"
    write_history(loaded, history, until_h=30.0)
    records_dir = tmp_path / "records"
    for batch_id in ("BR01-A", "BR01-B"):
        write_batch_directory(BatchRecord(**{**short_record.__dict__, "batch_id": batch_id}), records_dir / batch_id)
    records = read_records([records_dir, EXAMPLE, history], batch_files=[REPO / "configs" / "batch" / "platform.yaml"])
    assert [r.batch_id for r in records] == ["BR01-A", "BR01-B", "BR01-EX-001", "BR01-DEMO-001"]
    with pytest.raises(RecordError, match=r"batch BR01-A is read twice") as raised:
        read_records([records_dir, records_dir / "BR01-A"])
    assert raised.value.problem is RecordProblem.DUPLICATE_BATCH
    with pytest.raises(RecordError, match=r"no batch record here"):
        read_records([tmp_path])
    with pytest.raises(RecordError, match=r"batch BR01-OTHER is not among the batches read"):
        read_records([history], batch_files=[loaded.batch, loaded.batch.model_copy(update={"batch_id": "BR01-OTHER"})])
    assert math.isfinite(records[-1].end_h)
