"""``bioreactor-mpc export`` and ``report``: bad input, the choice of batch and runs, the column names' units (hil_tests/test_export_report.py
runs both on the history of a real closed loop).

The histories here are written through :class:`interfaces.history.SqliteHistory` and :class:`interfaces.audit.AuditTrail`, as the runtime writes them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bioreactor_mpc.cli import EXIT_USER_ERROR, main
from controller.ports import CycleRecord, Reading
from controller.types import LabResult
from interfaces.audit import AuditTrail
from interfaces.history import SqliteHistory
from interfaces.history_export import SIMULATION_REFERENCE, UNIT_SLUGS, signal_column
from interfaces.signals import SIGNALS
from plant_models.cho import STATES

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _cycle(t_h: float, glucose_g_per_l: float) -> CycleRecord:
    return CycleRecord(
        process_time_h=t_h,
        state="closed_loop",
        reason="ok",
        source="mpc",
        requested={"feed_rate_lph": 1.0, "glucose_rate_lph": 0.1, "temperature_degc": 36.5, "harvest": False},
        applied={"feed_rate_lph": 0.9, "glucose_rate_lph": 0.1, "temperature_degc": 36.5, "harvest": False},
        adjustments=("feed rate limited",),
        harvest_time_h=336.0,
        predicted_titer_g_per_l=5.0,
        predicted_score_g_per_day=520.0,
        solve_time_s=0.05,
        estimate={"state": {"glucose": glucose_g_per_l, "viable_cells": 1.0}, "sd": {"glucose": 0.2, "viable_cells": 0.1}, "multipliers": {"culture.growth.mu_max_per_h": 1.01}},
        wrote_setpoints=True,
        trust=(
            {"source": "recipe_band", "width": 0.6, "feed_width": 0.3, "misses": 0, "stood_down": False, "feed_rate_lph": [1.5, 2.0], "glucose_feed_max_lph": 0.25}
            if glucose_g_per_l == 5.0
            else {}
        ),
    )


def _run(history: SqliteHistory, trail: AuditTrail | None, batch_id: str, times_h: list[float]) -> None:
    """One run of ``batch_id``: a scan, a cycle and a write at each time, a lab result at the second, an alarm raised at the first and cleared at the last."""
    history.start_run(batch_id=batch_id, requested_mode="closed-loop", config={"batch": {"batch_id": batch_id}})
    if trail is not None:
        trail.append(actor="runtime", action="config_loaded", subject=batch_id, details={"settings_sha256": f"settings-of-{batch_id}"}, process_time_h=times_h[0])
    for i, t_h in enumerate(times_h):
        readings = {
            "PV.Volume": Reading(1400.0 + t_h, True, NOW),
            "PV.OUR": Reading(math.nan if i == 1 else 0.5, i != 2, NOW),
            "Status.ProcessTime": Reading(t_h, True, NOW),
            "Status.BatchId": Reading(batch_id, True, None),
        }
        history.record_scan(t_h, readings, {"PV.OUR": "Bad status"} if i == 2 else {})
        if i == 1:
            history.record_lab(t_h, LabResult(1, t_h - 0.5, 1.1, 97.0, 4.0, 0.2, 6.0, 0.5, math.nan, 300.0), used=True)
        history.record_write(t_h, {"SP.FeedRate": 0.9, "MPC.Heartbeat": i}, "ok")
        if i == 0:
            history.record_alarm(t_h, "quality.PV.OUR", "Bad status", active=True)
        history.commit_cycle(_cycle(t_h, 4.0 + t_h), None)
    history.record_alarm(times_h[-1], "quality.PV.OUR", "Bad status", active=False)
    history.end_run(reason="stopped")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A history of three runs: B1 (0–2 h), B2 (0–1 h), B1 again after a restart (3–4 h)."""
    path = tmp_path / "site.sqlite"
    with AuditTrail(path) as trail, SqliteHistory(path) as history:
        _run(history, trail, "B1", [0.0, 1.0, 2.0])
        _run(history, trail, "B2", [0.0, 1.0])
        _run(history, trail, "B1", [3.0, 4.0])
    return path


def _export(path: Path, out: Path, *extra: str) -> dict:
    assert main(["export", "--history", str(path), "--out", str(out), *extra]) == 0
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_export_takes_the_last_runs_batch_unless_told_and_merges_its_runs(site, tmp_path):
    manifest = _export(site, tmp_path / "default")
    assert (manifest["batch_id"], manifest["run_ids"]) == ("B1", [1, 3]), "the batch of the last run, with all its runs"
    online = _rows(tmp_path / "default" / "online.csv")
    assert [(row["process_time_h"], row["run_id"]) for row in online] == [("0.0", "1"), ("1.0", "1"), ("2.0", "1"), ("3.0", "3"), ("4.0", "3")]
    assert manifest["time_range"]["first_process_time_h"] == 0.0 and manifest["time_range"]["last_process_time_h"] == 4.0
    audit = _rows(tmp_path / "default" / "audit.csv")
    assert [json.loads(row["details"])["settings_sha256"] for row in audit if row["action"] == "config_loaded"] == ["settings-of-B1"] * 2, "B2's records are not B1's"

    manifest = _export(site, tmp_path / "b2", "--batch", "B2")
    assert (manifest["batch_id"], manifest["run_ids"]) == ("B2", [2])
    manifest = _export(site, tmp_path / "run3", "--run", "3")
    assert (manifest["batch_id"], manifest["run_ids"]) == ("B1", [3])
    assert [row["process_time_h"] for row in _rows(tmp_path / "run3" / "cycles.csv")] == ["3.0", "4.0"]


def test_quality_empty_values_and_the_cycle_columns(site, tmp_path):
    _export(site, tmp_path / "out", "--run", "1")
    online = _rows(tmp_path / "out" / "online.csv")
    assert [row["pv_our_mmol_per_l_h_quality"] for row in online] == ["good", "good", "bad"]
    assert online[1]["pv_our_mmol_per_l_h"] == "", "NaN is an empty cell"
    assert [row["pv_volume_l"] for row in online] == ["1400.0", "1401.0", "1402.0"]
    assert {row["status_batch_id"] for row in online} == {"B1"}
    [lab] = _rows(tmp_path / "out" / "lab.csv")
    assert (lab["draw_time_h"], lab["result_time_h"], lab["titer_g_per_l"], lab["used"]) == ("0.5", "1.0", "", "true")
    cycles = _rows(tmp_path / "out" / "cycles.csv")
    assert [row["estimate_glucose_g_per_l"] for row in cycles] == ["4.0", "5.0", "6.0"]
    assert cycles[0]["estimate_glucose_sd_g_per_l"] == "0.2" and cycles[0]["estimate_viable_cells_1e6_per_ml"] == "1.0"
    assert (cycles[0]["requested_feed_rate_lph"], cycles[0]["applied_feed_rate_lph"], cycles[0]["adjustments"]) == ("1.0", "0.9", "feed rate limited")
    assert cycles[0]["multiplier_culture_growth_mu_max_per_h"] == "1.01" and cycles[0]["trust_source"] == ""
    trust = {key: cycles[1][key] for key in ("trust_source", "trust_width", "trust_feed_width", "trust_feed_rate_high_lph", "trust_glucose_feed_max_lph")}
    assert trust == {"trust_source": "recipe_band", "trust_width": "0.6", "trust_feed_width": "0.3", "trust_feed_rate_high_lph": "2.0", "trust_glucose_feed_max_lph": "0.25"}
    assert cycles[2]["trust_glucose_feed_max_lph"] == "", "none applied: an empty cell"
    writes = _rows(tmp_path / "out" / "writes.csv")
    assert [(row["sp_feed_rate_lph"], row["mpc_heartbeat"], row["outcome"]) for row in writes] == [("0.9", "0", "ok"), ("0.9", "1", "ok"), ("0.9", "2", "ok")]
    assert [(row["code"], row["event"], row["process_time_h"]) for row in _rows(tmp_path / "out" / "alarms.csv")] == [
        ("quality.PV.OUR", "raised", "0.0"),
        ("quality.PV.OUR", "cleared", "2.0"),
    ]


def test_every_unit_of_the_signal_contract_and_the_model_names_a_column():
    """A new unit in the contract needs its column suffix: the export refuses to guess one."""
    for signal, contract in SIGNALS.items():
        column = signal_column(signal)
        assert column.unit == contract.unit
        assert column.name.endswith("_" + UNIT_SLUGS[contract.unit]) if UNIT_SLUGS[contract.unit] else True, column.name
    for state in STATES:
        assert state.unit in UNIT_SLUGS, state.name
    assert signal_column("PV.GlucoseFeedTotal").name == "pv_glucose_feed_total_l"
    assert signal_column("PV.pH").name == "pv_ph" and signal_column("MPC.Rec.HarvestTime").name == "mpc_rec_harvest_time_h"
    assert signal_column("Sample.VCD").name == "sample_vcd_1e6_per_ml"


def test_a_report_of_a_history_without_estimates_or_audit_trail_still_has_every_section(tmp_path):
    path = tmp_path / "bare.sqlite"
    with SqliteHistory(path) as history:
        _run(history, None, "B9", [0.0, 1.0, 2.0])
    before = path.read_bytes()
    out = tmp_path / "report.html"
    assert main(["report", "--history", str(path), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert path.read_bytes() == before
    assert "B9" in page and "no config_loaded record" in page and "http" not in page


def _not_a_history(tmp_path: Path) -> Path:
    path = tmp_path / "notes.sqlite"
    path.write_text("batch notes, not a database\n" * 100)
    return path


def _other_database(tmp_path: Path) -> Path:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id INTEGER)")
    db.commit()
    db.close()
    return path


def _no_runs(tmp_path: Path) -> Path:
    path = tmp_path / "empty.sqlite"
    SqliteHistory(path).close()
    return path


@pytest.mark.parametrize("command", ["export", "report"])
@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda tmp, site: tmp / "missing.sqlite", [], r"missing\.sqlite: no such history file"),
        (lambda tmp, site: tmp, [], r": not a history file \(a directory"),
        (lambda tmp, site: _not_a_history(tmp), [], r"notes\.sqlite: not a runtime history: not an SQLite database"),
        (lambda tmp, site: _other_database(tmp), [], r"other\.db: not a runtime history: it has no readings, lab_results, cycles, writes, state_changes, alarms tables"),
        (lambda tmp, site: _no_runs(tmp), [], r"empty\.sqlite: the history holds no runs"),
        (lambda tmp, site: site, ["--run", "9"], r"site\.sqlite: no run 9 in this history; its runs: 1 \(B1, started .*\); 2 \(B2, .*\); 3 \(B1, "),
        (lambda tmp, site: site, ["--batch", "B7"], r"site\.sqlite: no run of batch 'B7' in this history; its batches: B1, B2"),
        (lambda tmp, site: site, ["--run", "1", "--run", "2"], r"site\.sqlite: runs 1, 2 belong to several batches \(B1, B2\)"),
    ],
    ids=["missing", "directory", "not-sqlite", "other-database", "no-runs", "no-such-run", "no-such-batch", "two-batches"],
)
def test_bad_input_is_named_with_exit_status_2_and_leaves_the_file_alone(command, make, extra, message, site, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = make(inputs, site)
    before = path.read_bytes() if path.is_file() else None
    listing = sorted(p.name for p in path.parent.iterdir())
    out = tmp_path / ("out.html" if command == "report" else "out")
    assert main([command, "--history", str(path), "--out", str(out), *extra]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.startswith(f"bioreactor-mpc {command}: error: {path}"), error
    assert re.search(message, error), error
    assert not out.exists(), "nothing written"
    if before is not None:
        assert path.read_bytes() == before
    made = {p.name for p in path.parent.iterdir()} - set(listing)
    assert made <= {f"{path.name}-wal", f"{path.name}-shm"}, "nothing made beside the history but SQLite's reader files"
    assert not (path.parent / f"{path.name}-wal").exists() or (path.parent / f"{path.name}-wal").stat().st_size == 0, "nothing written to its journal"


def test_the_report_refuses_to_overwrite_the_history(site, capsys):
    before = site.read_bytes()
    assert main(["report", "--history", str(site), "--out", str(site)]) == EXIT_USER_ERROR
    assert "the report would replace the history" in capsys.readouterr().err
    assert site.read_bytes() == before


def test_the_report_compares_with_the_recipes_forecast_of_a_signed_recommendation_and_names_each_start(tmp_path):
    path = tmp_path / "advisory.sqlite"
    with AuditTrail(path) as trail, SqliteHistory(path) as history:
        _run(history, trail, "B1", [0.0, 1.0])
        _run(history, trail, "B1", [2.0, 3.0])
        history.start_run(batch_id="B1", requested_mode="advisory", config={})
        recommendation = {"made_at_h": 4.0, "predicted_score_g_per_day": 612.5, "recipe_titer_g_per_l": 4.04, "recipe_score_g_per_day": 496.9}
        trail.append(actor="alice", action="recommendation_approved", subject="recommendation made at 4.00 h", details={"recommendation": recommendation}, process_time_h=4.0)
        history.end_run(reason="stopped")
    out = tmp_path / "report.html"
    assert main(["report", "--history", str(path), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    kpis = page[page.index('id="kpis"') : page.index('id="measured-vs-predicted"')]
    assert re.search(r"<td>titer at harvest \[g/L\]</td>(<td[^>]*>[^<]*</td>){3}<td class=\"n\">4\.04</td>", kpis), kpis
    assert re.search(r"<td>score: product per occupied day \[g/day\]</td>(<td[^>]*>[^<]*</td>){3}<td class=\"n\">496\.9</td>", kpis), kpis
    configuration = page[page.index('id="configuration"') :]
    assert configuration.count("settings-of-B1") == 2, "one column per start of the runtime on the batch"


def test_the_report_shows_the_recipes_forecast_recorded_with_the_cycles_and_a_simulated_batchs_truth_labelled_as_such(tmp_path):
    path = tmp_path / "simulated.sqlite"
    with AuditTrail(path) as trail, SqliteHistory(path) as history:
        history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
        for t_h, titer in ((0.0, 4.1234), (1.0, 4.2)):
            recipe = {"harvest_time_h": 336.0, "titer_g_per_l": titer, "titer_sd_g_per_l": 0.876, "score_g_per_day": 480.04, "score_sd_g_per_day": 101.26}
            history.commit_cycle(dataclasses.replace(_cycle(t_h, 4.0), estimate={**_cycle(t_h, 4.0).estimate, "recipe_forecast": recipe}), None)
        history.commit_cycle(_cycle(2.0, 4.0), None)  # a cycle that forecast nothing for the recipe
        history.end_run(reason="stopped")
        kpis = {"harvest_time_h": 312.0, "titer_g_per_l": 5.43, "product_mass_g": 9876.0, "score_g_per_day": 611.1, "peak_vcd_1e6_per_ml": 21.0, "viability_at_harvest_pct": 81.0}
        recipe_kpis = {**kpis, "titer_g_per_l": 4.32, "score_g_per_day": 470.2}
        details = {"scenario": "platform.yaml", "seed": 1, "batch_kpis": kpis, "recipe_kpis": recipe_kpis}
        trail.append(actor="demo", action=SIMULATION_REFERENCE, subject="B1", details=details, process_time_h=312.0)
    manifest = _export(path, tmp_path / "out")
    units = {c["name"]: c["unit"] for c in manifest["tables"]["cycles"]["columns"]}
    assert units["recipe_forecast_titer_sd_g_per_l"] == "g/L" and units["recipe_forecast_score_g_per_day"] == "g/day"
    cycles = _rows(tmp_path / "out" / "cycles.csv")
    assert [row["recipe_forecast_titer_g_per_l"] for row in cycles] == ["4.1234", "4.2", ""]
    assert "simulation_reference" not in {row["action"] for row in _rows(tmp_path / "out" / "audit.csv")}, "written after the run: not one of its records"
    out = tmp_path / "report.html"
    assert main(["report", "--history", str(path), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    kpis_html = page[page.index('id="kpis"') : page.index('id="measured-vs-predicted"')]
    assert "<th>recipe, forecast at 0.0 h (± 1 sd)</th><th>this batch, simulated truth</th><th>recipe on the same batch, simulated truth</th>" in kpis_html
    titer = r"<td>titer at harvest \[g/L\]</td>(<td[^>]*>[^<]*</td>){3}<td class=\"n\">4\.12 ± 0\.88</td><td class=\"n\">5\.43</td><td class=\"n\">4\.32</td>"
    score = r"<td>score: product per occupied day \[g/day\]</td>(<td[^>]*>[^<]*</td>){3}<td class=\"n\">480\.0 ± 101\.3</td><td class=\"n\">611\.1</td><td class=\"n\">470\.2</td>"
    assert re.search(titer, kpis_html) and re.search(score, kpis_html), kpis_html
    assert "a forecast, not a measurement" in kpis_html and "not a measurement and not a forecast" in kpis_html


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("not a forecast", r"estimate\.recipe_forecast is 'not a forecast', not an object of numbers"),
        ([4.0, 0.5], r"estimate\.recipe_forecast is \[4\.0, 0\.5\], not an object of numbers"),
        ({"titer_g_per_l": "4.0abc"}, r"estimate\.recipe_forecast\.titer_g_per_l is '4\.0abc', not a number"),
        ({"titer_g_per_l": 4.0, "score_sd_g_per_day": True}, r"estimate\.recipe_forecast\.score_sd_g_per_day is True, not a number"),
    ],
)
def test_a_recipe_forecast_the_runtime_did_not_write_is_named_by_export_and_report_not_crashed_on_or_exported_as_text(recipe, message, tmp_path, capsys):
    """Found by editing a history's cycles.estimate: export and report failed with AttributeError ('str' object has no attribute 'get'),
    or ValueError in the report; export wrote '4.0abc' into the REAL column recipe_forecast_titer_g_per_l."""
    path = tmp_path / "edited.sqlite"
    with AuditTrail(path), SqliteHistory(path) as history:
        history.start_run(batch_id="B1", requested_mode="closed-loop", config={})
        history.commit_cycle(dataclasses.replace(_cycle(3.0, 4.0), estimate={**_cycle(3.0, 4.0).estimate, "recipe_forecast": recipe}), None)
        history.end_run(reason="stopped")
    before = path.read_bytes()
    for command in (["export", "--history", str(path), "--out", str(tmp_path / "out")], ["report", "--history", str(path), "--out", str(tmp_path / "report.html")]):
        assert main(command) == EXIT_USER_ERROR, command
        error = capsys.readouterr().err
        assert "cycles row at 3.0 h (run 1)" in error and re.search(message, error) and "audit verify" in error, error
    assert path.read_bytes() == before and not (tmp_path / "report.html").exists()
