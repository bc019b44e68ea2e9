"""Hardware-in-the-loop with three processes: the runtime, the soft PLC and plant-sim (docs/hil.md).

The score of a batch run across the field I/O is held against the same batch
run in one process by the very control cycle (:func:`simulator.closed_loop.run_controlled_batch`):
the split, the scaling to 4–20 mA counts and back, the PLC's own totalisers
and the LIMS may cost no more than 1 %. Each class of I/O fault is injected
into one batch and its mark found in the runtime's history.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hil_processes import HilRun, run_three_processes, scenario

from simulator.closed_loop import estimator_source, run_controlled_batch
from simulator.config import load_simulation

pytestmark = pytest.mark.hil


def _in_process_score(simulation: Path) -> float:
    loaded = load_simulation(simulation)
    return run_controlled_batch(loaded, make_source=estimator_source, envelope=loaded.nominal.envelope, fitted=loaded.nominal.calibrated).batch.kpis.score_g_per_day


def _score_agrees(run: HilRun, simulation: Path) -> None:
    assert run.plant is not None and run.soft_plc is not None
    hil_score = run.plant["kpis"]["score_g_per_day"]
    in_process = _in_process_score(simulation)
    assert hil_score == pytest.approx(in_process, rel=0.01), f"three processes {hil_score:.2f} g/day, in one process {in_process:.2f} g/day"
    assert run.plant["timing"]["missed_exchanges"] == 0 and run.soft_plc["missed_scans"] == 0, "virtual time misses nothing"


@pytest.mark.hil_long  # 100-125 s of a 2-core machine: out of the default run (CI's 15 minutes), run with ./dev.sh test -m hil_long
@pytest.mark.timeout(480)  # about 100 s with the NLP compiled; its first compile after a change to the NLP costs minutes more
def test_three_process_batch_scores_as_the_all_in_one_simulation(tmp_path):
    """The whole platform batch in virtual time: about a minute of wall time (the runtime's solves set the pace)."""
    simulation = scenario(tmp_path)
    run = run_three_processes(tmp_path, simulation, timeout_s=300.0)
    assert run.plant is not None and run.soft_plc is not None
    assert run.plant["kpis"]["harvest_time_h"] > 300.0
    assert run.soft_plc["lab_results"] == 15, "every lab result released before harvest reached the PLC through the LIMS tags"
    _score_agrees(run, simulation)


@pytest.mark.hil_long  # 83-91 s each on a loaded 2-core machine (docs/hil.md, section 6)
@pytest.mark.timeout(480)
@pytest.mark.parametrize("reference", ["opcua", "modbus"])
def test_three_process_batch_over_modbus_field_io_scores_as_the_all_in_one_simulation(tmp_path, reference):
    """The whole platform batch with the soft PLC's field I/O a Modbus TCP I/O device (configs/io/soft-plc-modbus.yaml).

    S7 counts, scaled integers with wire-break coils, float32 pairs in three
    word orders and the LIMS in float32 registers between plant-sim and the
    PLC; the runtime reaches the soft PLC over OPC UA or over Modbus TCP.
    """
    simulation = scenario(tmp_path)
    run = run_three_processes(tmp_path, simulation, timeout_s=300.0, protocol=reference, field_io="modbus")
    assert run.plant is not None and run.soft_plc is not None
    assert "against 127.0.0.1:" in (tmp_path / "plant-sim.log").read_text(encoding="utf-8"), "plant-sim reached the PLC's I/O over Modbus TCP, not OPC UA"
    assert run.plant["kpis"]["harvest_time_h"] > 300.0
    assert run.soft_plc["lab_results"] == 15, "every lab result released before harvest reached the PLC through the LIMS registers"
    _score_agrees(run, simulation)


@pytest.mark.hil_long
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_three_process_batches_of_other_truths_score_as_the_all_in_one_simulation(tmp_path, seed):
    """Batches whose true kinetics differ from the controller's (the perturbed scenario): the agreement does not depend on a nominal plant."""
    simulation = scenario(tmp_path, seed=seed, name="perturbed")
    _score_agrees(run_three_processes(tmp_path, simulation, timeout_s=600.0), simulation)


def test_the_soft_plc_serves_the_runtime_over_modbus_too(tmp_path):
    run = run_three_processes(tmp_path, scenario(tmp_path), timeout_s=120.0, stop_at_h=12.0, protocol="modbus")
    with sqlite3.connect(run.history) as db:
        states = [state for (state,) in db.execute("SELECT state FROM cycles WHERE process_time_h >= 1 ORDER BY process_time_h")]
        outcomes = {outcome for (outcome,) in db.execute("SELECT outcome FROM writes")}
    assert len(states) >= 11 and set(states) == {"closed_loop"} and outcomes == {"ok"}, "every write accepted by the soft PLC"


# ------------------------------------------------------------------ I/O faults

FAULTS = (
    "wire_break:temperature_degc:3.6@10-14",
    "wire_break:volume_l:0@18-20",
    "stuck_actuator:glucose_pump_lph@3-8",
    "frozen_input:capacitance_pf_per_cm@24-34",
    "pump_degraded:feed_pump_lph:0.8@50",
)
FAULTS_END_H = 56.0
"""The platform batch is stopped here: the faults' windows are in its first days, where the runtime's writes are in the history."""


@pytest.fixture(scope="module")
def faulted(tmp_path_factory: pytest.TempPathFactory) -> HilRun:
    """One batch with every I/O fault class, each in its own window or on its own channel, stopped at :data:`FAULTS_END_H`.

    The runtime plans in the recipe band's whole reach from the first hour, where it moves the glucose feed (the default band starts
    at 30 % of its reach and holds the glucose below the medium's own at first, so its glucose rate is 0 while the pump is stuck):
    these tests are of the I/O faults, and a stuck pump shows only when the runtime asks it for another rate."""
    directory = tmp_path_factory.mktemp("faulted")
    whole_band = {"initial_width": 1.0, "feed_lead_h": 240.0, "glucose_reach_above_g_per_l": 10.0}
    return run_three_processes(directory, scenario(directory), faults=FAULTS, timeout_s=180.0, stop_at_h=FAULTS_END_H, nmpc_trust=whole_band)


def _readings(run: HilRun, signal: str) -> list[sqlite3.Row]:
    with sqlite3.connect(run.history) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT process_time_h, value, good, problem FROM readings WHERE signal = ? ORDER BY process_time_h", (signal,)).fetchall()


def _alarm_edges(run: HilRun, code: str) -> list[tuple[float, int]]:
    with sqlite3.connect(run.history) as db:
        return [(float(t), int(active)) for t, active in db.execute("SELECT process_time_h, active FROM alarms WHERE code = ? ORDER BY rowid", (code,))]


def _at(rows: list[sqlite3.Row], time_h: float) -> sqlite3.Row:
    return next(row for row in rows if abs(row["process_time_h"] - time_h) < 1e-6)


def _delivered_lph(totals: list[sqlite3.Row], start_h: float, end_h: float) -> float:
    """Mean flow the PLC totalised between two scans (its totaliser integrates the flow meter)."""
    return (_at(totals, end_h)["value"] - _at(totals, start_h)["value"]) / (end_h - start_h)


def test_wire_break_at_3_6_ma_reads_bad_and_raises_the_runtime_s_alarm(faulted):
    rows = _readings(faulted, "PV.Temperature")
    assert all(not row["good"] for row in rows if 10.0 <= row["process_time_h"] < 14.0), "3.6 mA is below NE 43's measuring range: the PLC serves it Bad"
    assert all(row["good"] for row in rows if row["process_time_h"] < 10.0 or 14.0 <= row["process_time_h"] < FAULTS_END_H)
    assert _alarm_edges(faulted, "quality.PV.Temperature") == [(10.0, 1), (14.0, 0)]


def test_wire_break_at_0_ma_reads_bad_and_raises_the_runtime_s_alarm(faulted):
    rows = _readings(faulted, "PV.Volume")
    assert [row["process_time_h"] for row in rows if not row["good"]] == [18.0, 19.0], "0 mA underflows the module (S7: -32768): Bad"
    assert _alarm_edges(faulted, "quality.PV.Volume") == [(18.0, 1), (20.0, 0)]


def test_frozen_input_is_found_frozen_by_the_runtime(faulted):
    rows = _readings(faulted, "PV.Capacitance")
    window = [row for row in rows if 24.0 <= row["process_time_h"] < 34.0]
    assert len({row["value"] for row in window}) == 1 and all(row["good"] for row in window), "the PLC passes the frozen value on as Good: only its history tells"
    assert window[3]["problem"].startswith("frozen"), "the runtime's quality check names it after frozen_cycles (4)"
    assert _alarm_edges(faulted, "quality.PV.Capacitance")[:2] == [(27.0, 1), (34.0, 0)]


def test_stuck_actuator_delivers_what_it_did_when_it_stuck(faulted):
    setpoints = _readings(faulted, "SP.GlucoseRate")
    totals = _readings(faulted, "PV.GlucoseFeedTotal")
    # A scan at h reads back the setpoint written at h - 1, the one the pump had over the hour before h: it sticks at 3 h with that one,
    # in the first hours, while the runtime brings the glucose up to its target and then moves the rate down.
    stuck_lph = _at(setpoints, 3.0)["value"]
    commanded = [_at(setpoints, float(h))["value"] for h in range(5, 9)]
    assert max(abs(value - stuck_lph) for value in commanded) > 0.1, "the runtime moved the glucose rate while the pump was stuck"
    assert _delivered_lph(totals, 3.0, 8.0) == pytest.approx(stuck_lph, rel=0.01, abs=1e-3), "the flow meter, and so the PLC's totaliser, show the stuck pump"
    assert _delivered_lph(totals, 1.0, 2.0) == pytest.approx(_at(setpoints, 2.0)["value"], rel=0.01, abs=1e-3), "before it stuck the pump followed"


def test_degraded_pump_delivers_a_fifth_less(faulted):
    setpoints = _readings(faulted, "SP.FeedRate")
    totals = _readings(faulted, "PV.FeedTotal")
    for end_h in range(40, 51):
        assert _delivered_lph(totals, end_h - 1.0, float(end_h)) == pytest.approx(_at(setpoints, float(end_h))["value"], rel=0.01)
    for end_h in range(51, int(FAULTS_END_H)):
        commanded = _at(setpoints, float(end_h))["value"]
        assert commanded > 0.1 and _delivered_lph(totals, end_h - 1.0, float(end_h)) == pytest.approx(0.8 * commanded, rel=0.01)
