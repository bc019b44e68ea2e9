"""``bioreactor-mpc export`` and ``report`` on the history of a real closed loop: the runtime against the simulated PLC over OPC UA for 54 h.

The tables are checked against the history's SQLite tables read here
independently (row counts, values, times), the Parquet files against the
CSV files, and the report for being one file that names no other; the
history's bytes must not change. The cycles carry the recipe's forecast, MAC'd
with the row: the report's KPIs against the recipe are figures in closed loop too.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import json
import math
import re
import sqlite3
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import TEST_SETTINGS, run_runtime_against

from bioreactor_mpc.cli import main
from bioreactor_mpc.history_report import SECTIONS
from controller.mpc import EconomicMpc
from interfaces.audit import AuditTrail, check_history_rows
from interfaces.audit_keys import AuditKey, AuditKeyring, generate_key
from interfaces.history import SqliteHistory
from interfaces.history_export import UNIT_SLUGS
from plant_models.cho import CultureModel
from simulator.config import load_simulation

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
STOP_AT_H = 54.0
"""Long enough for three lab results (drawn at 0, 24 and 48 h) and the trust region's first check."""


@pytest.fixture(scope="module")
def audit_key() -> AuditKey:
    return generate_key()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, audit_key: AuditKey) -> Path:
    """The history (with its audit trail, both MAC'd with ``audit_key``) of a closed loop run to 54 h, closed."""
    path = tmp_path_factory.mktemp("closed-loop") / "history.sqlite"
    loaded = load_simulation(PLATFORM)
    mpc = EconomicMpc(CultureModel(), loaded.batch, TEST_SETTINGS.nmpc.mpc)
    with AuditTrail(path, key=audit_key) as trail:
        history = SqliteHistory(path, mac_key=audit_key)
        result = asyncio.run(run_runtime_against(loaded, path, mpc=mpc, stop_at_h=STOP_AT_H, audit=trail, history=history))
        result.history.close()
    return path


def _sql(path: Path, query: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(query, parameters).fetchall()
    finally:
        db.close()


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _floats(rows: list[dict[str, str]], column: str) -> list[float]:
    return [float(row[column]) if row[column] != "" else math.nan for row in rows]


def test_the_csv_export_holds_the_history_time_aligned_with_units_in_the_names(history, tmp_path):
    before = history.read_bytes()
    out = tmp_path / "csv"
    assert main(["export", "--history", str(history), "--out", str(out)]) == 0
    assert history.read_bytes() == before, "the export must not change the history"

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["batch_id"] == "BR01-DEMO-001" and manifest["run_ids"] == [1]
    assert manifest["history"]["sha256"] == hashlib.sha256(before).hexdigest()
    assert manifest["tool"]["version"] == metadata.version("bioreactor-mpc")
    assert manifest["time_range"]["first_process_time_h"] == 0.0 and manifest["time_range"]["last_process_time_h"] == STOP_AT_H
    tables = {name: _csv(out / spec["file"]) for name, spec in manifest["tables"].items()}
    assert {name: len(rows) for name, rows in tables.items()} == {name: spec["rows"] for name, spec in manifest["tables"].items()}

    # Row counts against the SQLite tables.
    scans = _sql(history, "SELECT DISTINCT process_time_h FROM readings ORDER BY process_time_h")
    assert len(tables["online"]) == len(scans) == int(STOP_AT_H) + 1
    for table, source in (("lab", "lab_results"), ("cycles", "cycles"), ("writes", "writes"), ("alarms", "alarms"), ("states", "state_changes")):
        assert len(tables[table]) == _sql(history, f"SELECT COUNT(*) FROM {source}")[0][0], table
    started, ended = _sql(history, "SELECT started_utc, ended_utc FROM runs")[0]
    assert len(tables["audit"]) == _sql(history, "SELECT COUNT(*) FROM audit WHERE wall_utc BETWEEN ? AND ?", (started, ended))[0][0] > 0
    assert len(tables["lab"]) >= 3 and len(tables["alarms"]) + len(tables["states"]) > 0

    # Units in the column names, and each column's unit in the manifest ends its name.
    online, lab, cycles, writes = tables["online"][0], tables["lab"][0], tables["cycles"][0], tables["writes"][0]
    for name in ("pv_temperature_degc", "pv_volume_l", "pv_our_mmol_per_l_h", "pv_capacitance_pf_per_cm", "sp_feed_rate_lph", "pv_temperature_degc_quality"):
        assert name in online, name
    for name in ("draw_time_h", "result_time_h", "vcd_1e6_per_ml", "titer_g_per_l", "glucose_g_per_l"):
        assert name in lab, name
    for name in (
        "estimate_viable_cells_1e6_per_ml",
        "estimate_viable_cells_sd_1e6_per_ml",
        "applied_temperature_degc",
        "planned_harvest_time_h",
        "trust_temperature_low_degc",
        "trust_glucose_error_g_per_l",
        "trust_endgame",
        "trust_widens",
    ):
        assert name in cycles, name
    assert "sp_temperature_degc" in writes and "mpc_heartbeat" in writes
    units = {c["name"]: c["unit"] for spec in manifest["tables"].values() for c in spec["columns"]}
    assert units["pv_temperature_degc"] == "°C" and units["estimate_titer_g_per_l"] == "g/L"
    for name, unit in units.items():
        if unit and UNIT_SLUGS.get(unit):
            assert name.endswith("_" + UNIT_SLUGS[unit]), f"{name} is in {unit} but its name does not say so"

    # Values: the online table against the readings, the estimate against the cycles' JSON; floats read back exactly.
    volume = [row[0] for row in _sql(history, "SELECT value FROM readings WHERE signal = 'PV.Volume' ORDER BY process_time_h")]
    assert _floats(tables["online"], "pv_volume_l") == volume
    good = _sql(history, "SELECT COUNT(*) FROM readings WHERE signal = 'PV.OUR' AND good = 1 AND problem IS NULL")[0][0]
    assert sum(row["pv_our_mmol_per_l_h_quality"] == "good" for row in tables["online"]) == good
    assert [row["status_batch_id"] for row in tables["online"]] == ["BR01-DEMO-001"] * len(scans)
    estimates = _sql(history, "SELECT json_extract(estimate, '$.state.viable_cells'), json_extract(estimate, '$.sd.viable_cells') FROM cycles ORDER BY process_time_h")
    assert _floats(tables["cycles"], "estimate_viable_cells_1e6_per_ml") == [mean for mean, _ in estimates]
    assert _floats(tables["cycles"], "estimate_viable_cells_sd_1e6_per_ml") == [sd for _, sd in estimates]
    assert all(sd > 0 for sd in _floats(tables["cycles"], "estimate_titer_sd_g_per_l"))
    draws = _sql(history, "SELECT taken_at_h, received_at_h, vcd_1e6_per_ml FROM lab_results ORDER BY received_at_h")
    assert [(float(r["draw_time_h"]), float(r["result_time_h"]), float(r["vcd_1e6_per_ml"])) for r in tables["lab"]] == draws

    # Time alignment: one scan per cycle, every write and every lab result at a cycle, every draw before its result.
    scan_times = _floats(tables["online"], "process_time_h")
    assert scan_times == sorted(scan_times) == [row[0] for row in scans]
    cycle_times = set(_floats(tables["cycles"], "process_time_h"))
    assert cycle_times == set(scan_times)
    assert set(_floats(tables["writes"], "process_time_h")) <= cycle_times
    assert set(_floats(tables["lab"], "result_time_h")) <= cycle_times
    assert all(float(r["draw_time_h"]) <= float(r["result_time_h"]) for r in tables["lab"])
    assert _floats(tables["online"], "status_process_time_h") == scan_times, "the PLC's batch clock is the time axis"


def test_the_parquet_export_holds_the_same_values_as_the_csv_with_types_and_units(history, tmp_path):
    import pyarrow.parquet as pq

    before = history.read_bytes()
    assert main(["export", "--history", str(history), "--format", "csv", "--out", str(tmp_path / "csv")]) == 0
    assert main(["export", "--history", str(history), "--format", "parquet", "--out", str(tmp_path / "parquet")]) == 0
    assert history.read_bytes() == before
    manifest = json.loads((tmp_path / "parquet" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["file_format"] == "parquet"
    for name, spec in manifest["tables"].items():
        table = pq.read_table(tmp_path / "parquet" / spec["file"])
        rows = _csv(tmp_path / "csv" / f"{name}.csv")
        assert table.num_rows == spec["rows"] == len(rows), name
        assert table.column_names == [c["name"] for c in spec["columns"]] == list(rows[0]) if rows else True
        for column in spec["columns"]:
            values = table.column(column["name"]).to_pylist()
            field = table.schema.field(column["name"])
            assert (field.metadata or {}).get(b"unit", b"").decode() == column["unit"]
            if column["type"] == "float64":
                assert [math.nan if v is None else v for v in values] == pytest.approx(_floats(rows, column["name"]), nan_ok=True, rel=0, abs=0), f"{name}.{column['name']}"
            elif column["type"] == "bool":
                assert [None if v is None else ("true" if v else "false") for v in values] == [r[column["name"]] or None for r in rows]
            else:
                assert [None if v is None else str(v) for v in values] == [r[column["name"]] or None for r in rows], f"{name}.{column['name']}"
    assert str(pq.read_table(tmp_path / "parquet" / "online.parquet").schema.field("pv_volume_l").type) == "double"
    assert str(pq.read_table(tmp_path / "parquet" / "lab.parquet").schema.field("used").type) == "bool"


def test_the_report_is_one_self_contained_file_with_every_section(history, tmp_path):
    before = history.read_bytes()
    out = tmp_path / "report.html"
    assert main(["report", "--history", str(history), "--out", str(out)]) == 0
    assert history.read_bytes() == before
    page = out.read_text(encoding="utf-8")
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links), [link[:40] for link in links if not link.startswith(("data:", "#"))]
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    for anchor, title in SECTIONS:
        assert f'id="{anchor}"' in page and f"<h2>{title}</h2>" in page
    assert "BR01-DEMO-001" in page
    images = [link for link in links if link.startswith("data:")]
    assert len(images) >= 3 and all(base64.b64decode(image.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    # The digests in force are those of the audit trail's config_loaded record.
    [[details]] = _sql(history, "SELECT details FROM audit WHERE action = 'config_loaded'")
    loaded = json.loads(details)
    for key in ("settings_sha256", "batch_sha256", "nominal_parameters_sha256", "estimator_config_sha256"):
        assert loaded[key] in page, key
    # The lab results measured are shown against the estimate: a row per quantity with the count of lab results.
    lab_results = _sql(history, "SELECT COUNT(*) FROM lab_results")[0][0]
    assert re.search(rf"<td>viable cells \[1e6/mL\]</td><td class=\"n\">{lab_results}</td>", page)


_FIGURE = r"(-?\d+\.\d+)"
_WITH_SD = rf"{_FIGURE} ± {_FIGURE}"


def test_a_closed_loop_records_the_recipes_forecast_every_cycle_and_reports_it_against_the_plan(history, audit_key, tmp_path):
    """Closed loop makes no recommendation, yet every cycle records what the recipe would give from its estimate; the report shows it ± sd."""
    assert main(["export", "--history", str(history), "--out", str(tmp_path / "csv")]) == 0
    manifest = json.loads((tmp_path / "csv" / "manifest.json").read_text(encoding="utf-8"))
    units = {c["name"]: c["unit"] for c in manifest["tables"]["cycles"]["columns"]}
    for name, unit in (("recipe_forecast_titer_g_per_l", "g/L"), ("recipe_forecast_titer_sd_g_per_l", "g/L"), ("recipe_forecast_score_g_per_day", "g/day")):
        assert units.get(name) == unit, name
    cycles = _csv(tmp_path / "csv" / "cycles.csv")
    # Without a screen, a closed loop forecasts the recipe at its first cycle and at each cycle that used a lab result.
    decided = [float(row["process_time_h"]) for row in cycles if row["source"] != "none"]
    used = {float(row["result_time_h"]) for row in _csv(tmp_path / "csv" / "lab.csv") if row["used"] == "true"}
    forecast_at = [float(row["process_time_h"]) for row in cycles if row["recipe_forecast_titer_g_per_l"]]
    assert {row["state"] for row in cycles} == {"closed_loop"} and len(used) >= 3
    assert forecast_at == sorted({decided[0]} | used), "the first cycle, and each that used a lab result"
    # The same figures as the history's MAC'd cycle rows hold, read here with SQL.
    recorded = _sql(history, "SELECT json_extract(estimate, '$.recipe_forecast.titer_g_per_l') FROM cycles ORDER BY id")
    assert _floats(cycles, "recipe_forecast_titer_g_per_l") == pytest.approx([math.nan if t is None else t for (t,) in recorded], nan_ok=True, rel=0, abs=0)
    first = next(row for row in cycles if row["recipe_forecast_titer_g_per_l"])
    harvest_h, titer, titer_sd = (float(first[f"recipe_forecast_{name}"]) for name in ("harvest_time_h", "titer_g_per_l", "titer_sd_g_per_l"))
    score, score_sd = float(first["recipe_forecast_score_g_per_day"]), float(first["recipe_forecast_score_sd_g_per_day"])
    loaded = load_simulation(PLATFORM)
    assert harvest_h <= loaded.batch.recipe.harvest_h and 0.0 < titer_sd < titer and 0.0 < score_sd < score
    # The score is the titer times the volume per occupied day (independent of the forecast's arithmetic): with the recipe's harvest
    # volume between the inoculum and the reactor's maximum, the score lies between those bounds.
    days = harvest_h / 24.0 + loaded.batch.economics.turnaround_days
    assert titer * loaded.batch.inoculation.volume_l / days < score <= titer * loaded.batch.equipment.max_working_volume_l / days

    out = tmp_path / "report.html"
    assert main(["report", "--history", str(history), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    kpis = page[page.index('id="kpis"') : page.index('id="measured-vs-predicted"')]
    assert f"recipe, forecast at {float(first['process_time_h']):.1f} h (± 1 sd)" in kpis
    titer_cell = re.search(rf"<td>titer at harvest \[g/L\]</td>(?:<td[^>]*>[^<]*</td>){{3}}<td class=\"n\">{_WITH_SD}</td>", kpis)
    score_cell = re.search(rf"<td>score: product per occupied day \[g/day\]</td>(?:<td[^>]*>[^<]*</td>){{3}}<td class=\"n\">{_WITH_SD}</td>", kpis)
    assert titer_cell and score_cell, kpis
    assert (float(titer_cell[1]), float(titer_cell[2])) == (round(titer, 2), round(titer_sd, 2))
    assert (float(score_cell[1]), float(score_cell[2])) == (round(score, 1), round(score_sd, 1))
    assert "a forecast, not a measurement" in kpis and "simulated truth" not in kpis, "the runtime's history holds no simulator's truth"

    # MAC'd with its row: the trail verifies, and a recipe forecast edited in a copy of the history is found.
    with AuditTrail(history, read_only=True) as trail:
        assert trail.verify(keys=AuditKeyring([audit_key]), checkers=[check_history_rows]).problems == []
    copy = tmp_path / "edited.sqlite"
    copy.write_bytes(history.read_bytes())
    db = sqlite3.connect(copy)
    [[row_id]] = db.execute("SELECT id FROM cycles WHERE json_extract(estimate, '$.recipe_forecast') IS NOT NULL ORDER BY id DESC LIMIT 1").fetchall()
    db.execute("UPDATE cycles SET estimate = json_set(estimate, '$.recipe_forecast.titer_g_per_l', 9.99) WHERE id = ?", (row_id,))
    db.commit()
    db.close()
    with AuditTrail(copy, read_only=True) as trail:
        problems = trail.verify(keys=AuditKeyring([audit_key]), checkers=[check_history_rows]).problems
    assert any(f"cycles row {row_id}: altered" in problem for problem in problems), problems
