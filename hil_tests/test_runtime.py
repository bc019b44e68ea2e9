"""The runtime against the simulated PLC over the network in lockstep: whole batches, modes and faults, nothing lost.

Whole batches take about a minute (360 cycles); the fault scenarios run the
first day or two of a batch, which is where they are placed.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import yaml
from runtime_harness import TEST_SETTINGS, SimulatedPlant, run_runtime_against

from controller.kpis import BatchKpis
from controller.mpc import EconomicMpc
from controller.runtime import CycleReport
from interfaces.signals import SIGNALS
from plant_models.cho import STATE_INDEX, CultureModel
from simulator.batch import kpis_of, run_recipe_batch
from simulator.closed_loop import estimator_source, run_controlled_batch
from simulator.config import load_simulation

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
SP_SIGNALS = ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature", "SP.HarvestRequest")


@pytest.fixture(scope="module")
def mpc() -> EconomicMpc:
    """One compiled NLP for the module's runtimes (loading it is the slow part of a start)."""
    loaded = load_simulation(PLATFORM)
    return EconomicMpc(CultureModel(), loaded.batch, TEST_SETTINGS.nmpc.mpc)


def _scenario(tmp_path: Path, name: str, *, faults: list[dict[str, Any]] | None = None, batch_changes: dict[str, Any] | None = None) -> Path:
    """A simulation config beside the platform's, with faults and batch-file changes."""
    config = yaml.safe_load(PLATFORM.read_text())
    config["model"] = str(REPO / "configs" / "model" / "cho_nominal.yaml")
    config["batch"] = str(REPO / "configs" / "batch" / "platform.yaml")
    if faults:
        config["faults"] = faults
    if batch_changes:
        batch = yaml.safe_load((REPO / "configs" / "batch" / "platform.yaml").read_text())
        for section, values in batch_changes.items():
            batch[section].update(values)
        batch_path = tmp_path / f"{name}-batch.yaml"
        batch_path.write_text(yaml.safe_dump(batch))
        config["batch"] = str(batch_path)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _writes_with(rows: list[dict[str, Any]], signals: tuple[str, ...]) -> list[dict[str, Any]]:
    return [row for row in rows if set(json.loads(row["values"])) & set(signals)]


@pytest.fixture(scope="module")
def in_process_kpis() -> BatchKpis:
    return run_controlled_batch(load_simulation(PLATFORM), make_source=estimator_source).batch.kpis


@pytest.mark.parametrize("protocol", ["opcua", "modbus"])
def test_closed_loop_batch_over_the_network_scores_as_in_process(protocol, tmp_path, mpc, in_process_kpis):
    """The protocol adds nothing: the same seed scores within 1 % over OPC UA and over Modbus as in-process."""
    loaded = load_simulation(PLATFORM)
    result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", protocol=protocol, mpc=mpc))
    over_the_network = kpis_of(result.plc.plant.trajectory(), loaded.batch)
    assert over_the_network.score_g_per_day == pytest.approx(in_process_kpis.score_g_per_day, rel=0.01)
    assert over_the_network.violation_h == 0.0
    summary = result.summary
    assert summary.end_reason == "batch harvested" and summary.writes_failed == 0 and summary.link_losses == 0
    # Nothing lost: every cycle, every scan of every signal, every write is in the history.
    cycles = result.rows("cycles")
    assert len(cycles) == summary.cycles == 360
    assert [c["process_time_h"] for c in cycles] == [float(h) for h in range(360)]
    assert {c["state"] for c in cycles} == {"closed_loop"} and all(c["wrote_setpoints"] for c in cycles)
    assert len(result.rows("readings")) == 360 * len(SIGNALS)
    writes = result.rows("writes")
    assert len(writes) == summary.writes_ok == 720 and {w["outcome"] for w in writes} == {"ok"}
    assert len(result.rows("lab_results")) == len(result.plc.published)
    assert result.rows("runs")[0]["end_reason"] == "batch harvested"
    # Late in the batch the NMPC brings viability down to about 70 % (its harvest limit is 60 %): the early warning comes ahead of the
    # crossing, or (in the trust region, which keeps this batch just above) ahead of the closest approach.
    trajectory = result.plc.plant.trajectory()
    viability = trajectory.observable("viability")
    below = viability < 70.0
    crossed_h = float(trajectory.time_h[np.argmax(below)] if below.any() else trajectory.time_h[np.argmin(viability)])
    assert viability.min() < 72.0, f"the batch stayed far from the limit (lowest viability {viability.min():.1f} %): nothing to warn of"
    warnings = [a for a in result.rows("alarms") if a["code"] == "early_warning.viability_low" and a["active"]]
    assert warnings and warnings[0]["process_time_h"] < crossed_h, f"warned at {warnings[0]['process_time_h'] if warnings else None} h, crossed at {crossed_h} h"
    assert "ahead" in warnings[0]["message"]


def test_a_whole_advisory_batch_over_modbus_recommends_and_leaves_the_plant_to_its_recipe(tmp_path, mpc):
    """Advisory mode with the PLC in local: the runtime writes only MPC.*, and the batch is the recipe's, to the gram."""
    from controller.modes import RequestedMode

    loaded = load_simulation(_scenario(tmp_path, "advisory", batch_changes=None))
    settings = TEST_SETTINGS.model_copy(update={"mode": RequestedMode.ADVISORY})

    def operator_in_local(report: CycleReport, plant: SimulatedPlant) -> None:
        plant.plc.set_operator_remote(False)

    result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", protocol="modbus", mpc=mpc, settings=settings, on_cycle=operator_in_local))
    recipe = run_recipe_batch(loaded).kpis
    advisory = kpis_of(result.plc.plant.trajectory(), loaded.batch)
    assert advisory.score_g_per_day == pytest.approx(recipe.score_g_per_day, rel=1e-9)
    writes = result.rows("writes")
    assert writes and not _writes_with(writes, SP_SIGNALS) and {w["outcome"] for w in writes} == {"ok"}
    cycles = result.rows("cycles")
    assert {c["state"] for c in cycles} == {"advisory"} and len(cycles) == result.summary.cycles >= 330
    snapshot = result.plc.snapshot()
    last = cycles[-1]
    applied = json.loads(last["applied"])
    assert snapshot["MPC.Rec.Temperature"].value == pytest.approx(applied["temperature_degc"], abs=1e-4)  # float32 registers
    assert snapshot["MPC.Mode"].value == 1
    assert all(math.isfinite(c["predicted_titer_g_per_l"]) for c in cycles[:-1] if c["source"] == "mpc")


def test_operator_remote_off_holds_the_runtime_and_it_resumes(tmp_path, mpc):
    loaded = load_simulation(_scenario(tmp_path, "local", faults=[{"kind": "operator_local", "start_h": 10.0, "end_h": 16.0}]))
    result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", mpc=mpc, stop_at_h=24.0))
    states = {c["process_time_h"]: c["state"] for c in result.rows("cycles")}
    assert all(states[float(h)] == "held" for h in range(10, 16))
    assert all(states[float(h)] == "closed_loop" for h in [*range(0, 10), *range(16, 25)])
    setpoint_writes = _writes_with(result.rows("writes"), SP_SIGNALS)
    assert not [w for w in setpoint_writes if 10.0 <= w["process_time_h"] < 16.0]
    assert {w["outcome"] for w in setpoint_writes} == {"ok"}
    changes = [(c["previous"], c["state"], c["process_time_h"]) for c in result.rows("state_changes")]
    assert ("closed_loop", "held", 10.0) in changes and ("held", "closed_loop", 16.0) in changes


def test_lost_link_raises_an_alarm_writes_nothing_and_resumes(tmp_path, mpc):
    loaded = load_simulation(PLATFORM)
    cut: dict[str, float] = {}

    async def pull_the_cable(report: CycleReport, plant: SimulatedPlant) -> None:
        if report.record.process_time_h == 12.0:
            await asyncio.sleep(0.05)  # after this cycle's heartbeat
            await plant.proxy.cut()
            cut["at_h"] = plant.plc.process_time_h
            await plant.set_lockstep_timeout(0.3)  # the plant goes on without the runtime, as a real one would
            await asyncio.sleep(2.0)
            cut["until_h"] = plant.plc.process_time_h
            await plant.set_lockstep_timeout(10.0)
            await plant.proxy.start()

    with structlog.testing.capture_logs() as logs:
        result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", mpc=mpc, stop_at_h=36.0, on_cycle=pull_the_cable))
    assert cut["until_h"] >= cut["at_h"] + 3.0, "the link must stay down for several cycles"
    alarms = [a for a in result.rows("alarms") if a["code"] == "plc_link"]
    assert [a["active"] for a in alarms] == [1, 0]
    assert alarms[0]["process_time_h"] <= cut["at_h"] + 2.0
    cycles = result.rows("cycles")
    down = [c for c in cycles if cut["at_h"] < c["process_time_h"] < cut["until_h"]]
    assert not down, "no cycle runs while the PLC cannot be read"
    assert not [w for w in result.rows("writes") if cut["at_h"] < w["process_time_h"] < cut["until_h"] and w["outcome"] == "ok"]
    # Back: the PLC's watchdog tripped while the runtime was away; the heartbeat re-enables remote and closed loop resumes.
    after = [c for c in cycles if c["process_time_h"] >= cut["until_h"]]
    assert after and after[-1]["state"] == "closed_loop" and after[-1]["wrote_setpoints"]
    assert any(entry["event"] == "alarm_raised" and entry.get("code") == "plc_link" for entry in logs)
    assert result.summary.link_losses == 1


def test_bad_nan_stale_and_frozen_probes_and_a_lab_typo_are_rejected_not_used(tmp_path, mpc):
    faults = [
        {"kind": "probe", "tag": "PV.Capacitance", "mode": "bad", "start_h": 4.0},
        {"kind": "probe", "tag": "PV.OUR", "mode": "nan", "start_h": 4.0, "end_h": 10.0},
        {"kind": "probe", "tag": "PV.CER", "mode": "frozen", "start_h": 4.0},
        {"kind": "probe", "tag": "PV.Temperature", "mode": "stale", "start_h": 4.0},
        {"kind": "lab_value", "draw_index": 1, "field": "glucose_g_per_l", "factor": 10.0},
    ]
    loaded = load_simulation(_scenario(tmp_path, "probes", faults=faults))
    quality = TEST_SETTINGS.quality.model_copy(update={"stale_after_s": 1.5})
    settings = TEST_SETTINGS.model_copy(update={"quality": quality})
    with structlog.testing.capture_logs() as logs:
        result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", mpc=mpc, settings=settings, stop_at_h=40.0))
    raised = {a["code"]: a["message"] for a in result.rows("alarms") if a["active"]}
    assert raised["quality.PV.Capacitance"] == "Bad status"
    assert raised["quality.PV.OUR"].startswith("non-finite")
    assert raised["quality.PV.CER"].startswith("frozen")
    assert raised["quality.PV.Temperature"].startswith("stale")
    cleared = {a["code"] for a in result.rows("alarms") if not a["active"]}
    assert "quality.PV.OUR" in cleared  # the NaN fault ended at 10 h
    # A failed probe is not a critical input: the runtime kept control and the estimate stayed sane.
    cycles = result.rows("cycles")
    assert {c["state"] for c in cycles} == {"closed_loop"}, {(c["process_time_h"], c["reason"]) for c in cycles if c["state"] != "closed_loop"}
    last = json.loads(cycles[-1]["estimate"])
    true_vcd = result.plc.plant.state[0]
    assert last["state"]["viable_cells"] == pytest.approx(true_vcd, rel=0.25)
    assert last["state"]["glucose"] < 10.0
    rejected = [entry for entry in logs if entry["event"] == "lab_value_rejected" and entry.get("field") == "glucose_g_per_l"]
    assert rejected, "the glucose typo must be rejected, and say so"
    # The history keeps the rejected probe values and their verdicts.
    readings = result.rows("readings")
    assert any(r["signal"] == "PV.Capacitance" and r["good"] == 0 and r["problem"] == "Bad status" for r in readings)


def test_a_write_refused_as_out_of_range_is_reported_and_leads_to_fault(tmp_path, mpc):
    """The PLC's temperature range is 30-36.6 °C, its recipe at 36.5 °C; the runtime's batch file says up to 38 °C and it asks for more than 36.6."""
    narrow = {"equipment": {"temperature_max_degc": 36.6}, "recipe": {"temperature_shifted_degc": 36.5}}
    loaded = load_simulation(_scenario(tmp_path, "narrow", batch_changes=narrow))
    runtime_loaded = load_simulation(PLATFORM)
    result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", mpc=mpc, runtime_loaded=runtime_loaded, stop_at_h=14.0, lockstep_timeout_s=1.0))
    refused = [w for w in result.rows("writes") if w["outcome"] == "refused"]
    assert refused and all("SP.Temperature" in w["detail"] for w in refused)
    assert result.plc.snapshot()["SP.Temperature"].value == loaded.batch.recipe.temperature_initial_degc, "the old setpoint stays"
    states = [c["state"] for c in result.rows("cycles")]
    assert states[:3] == ["closed_loop"] * 3 and states[3] == "fault"
    assert "closed_loop" in states[4:], "after a few cycles in fault the runtime tries once more"
    assert any(a["code"] == "write_failed" and a["active"] for a in result.rows("alarms"))
    assert math.isfinite(result.summary.last_process_time_h)


def test_runtime_killed_mid_batch_the_watchdog_takes_over_and_a_restart_resumes(tmp_path):
    """kill -9 at 20 h: the PLC's watchdog trips and its recipe runs; restarted, the runtime resumes from its history."""
    import signal
    import sys

    from runtime_harness import TAG_MAPS, SimulatedPlant, TcpProxy, free_port

    from interfaces.history import SqliteHistory
    from simulator.batch import build_simulated_plc
    from simulator.opcua_server import OpcUaPlcServer
    from simulator.plc import PHASE_RUNNING

    history_path = tmp_path / "history.sqlite"
    config = yaml.safe_load((REPO / "configs" / "runtime" / "reference-opcua.yaml").read_text())
    for key in ("tag_map", "batch", "model"):
        config[key] = str((REPO / "configs" / "runtime" / config[key]).resolve())
    # monitoring on a free port: the reference's 9108 collides with a runtime of a test running beside this one (pytest-xdist)
    config.update(history=str(history_path), poll_interval_s=0.01, reconnect_initial_s=0.05, reconnect_max_s=0.3, monitoring={"port": 0})
    config_path = tmp_path / "runtime.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runtime_command = [sys.executable, "-m", "bioreactor_mpc", "--log-json", "run", "--config", str(config_path)]
    seen: dict[str, float] = {}

    async def wait_until(condition: Any, timeout_s: float, what: str) -> None:
        for _ in range(int(timeout_s / 0.05)):
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        plc.lockstep = True
        port = free_port()
        server = OpcUaPlcServer(plc, TAG_MAPS["opcua"], endpoint=f"opc.tcp://127.0.0.1:{port}/bioreactor-mpc/")
        await server.start()
        plant = SimulatedPlant(plc, server, TcpProxy(port), lockstep_timeout_s=30.0)
        command = [*runtime_command, "--endpoint", server.endpoint]
        try:
            with (tmp_path / "run1.log").open("wb") as log1:
                first = await asyncio.create_subprocess_exec(*command, stdout=log1, stderr=asyncio.subprocess.STDOUT)
                await wait_until(lambda: plc.process_time_h >= 20.0, 120.0, "the first runtime to reach 20 h")
                first.send_signal(signal.SIGKILL)
                await first.wait()
            seen["killed_h"] = plc.process_time_h
            await plant.set_lockstep_timeout(0.2)  # the runtime is gone: the plant goes on, as a real one would
            await wait_until(lambda: plc.process_time_h >= seen["killed_h"] + 4.0, 30.0, "the plant to run on")
            await plant.set_lockstep_timeout(30.0)
            assert plc.watchdog_tripped and not plc.remote_enabled
            recipe = plc.recipe.setpoints(plc.process_time_h, volume_l=float(plc.plant.state[STATE_INDEX["volume"]]))
            scan = plc.snapshot()
            assert scan["SP.Temperature"].value == pytest.approx(recipe.temperature_degc) and scan["SP.FeedRate"].value == pytest.approx(recipe.feed_rate_lph)
            seen["restarted_h"] = plc.process_time_h
            with (tmp_path / "run2.log").open("wb") as log2:
                second = await asyncio.create_subprocess_exec(*command, stdout=log2, stderr=asyncio.subprocess.STDOUT)
                await wait_until(lambda: plc.process_time_h >= seen["restarted_h"] + 8.0 and plc.remote_enabled, 120.0, "the second runtime to take over")
                second.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(second.wait(), 30.0) == 0
            assert plc.phase == PHASE_RUNNING
        finally:
            await plant.stop_clock()
            await server.stop()

    asyncio.run(scenario())
    history = SqliteHistory(history_path, read_only=True)
    runs = history.table("runs")
    assert len(runs) == 2 and runs[0]["end_reason"] is None and runs[1]["end_reason"] == "stopped"
    cycles = history.table("cycles")
    times = [c["process_time_h"] for c in cycles]
    assert times == sorted(set(times)), "every boundary at most once, in order"
    first_run = [c for c in cycles if c["run_id"] == 1]
    second_run = [c for c in cycles if c["run_id"] == 2]
    assert first_run[-1]["process_time_h"] >= 19.0, "the cycles before the kill are all in the history"
    assert second_run[0]["process_time_h"] >= seen["restarted_h"], "nothing computed before the restart is sent after it"
    assert not [w for w in history.table("writes") if w["run_id"] == 2 and w["process_time_h"] < seen["restarted_h"]]
    before, after = json.loads(first_run[-1]["estimate"])["multipliers"], json.loads(second_run[0]["estimate"])["multipliers"]
    assert any(abs(m - 1.0) > 1e-3 for m in before.values()), "the first run must have adapted its parameters"
    assert after == pytest.approx(before, rel=0.05), "the restarted runtime resumes the estimator, not a fresh one"
    assert second_run[0]["state"] == "held" and second_run[-1]["state"] == "closed_loop" and second_run[-1]["wrote_setpoints"]
    log_text = (tmp_path / "run2.log").read_text()
    assert "runtime_resumed" in log_text
    writes = history.table("writes")
    assert writes and all(w["outcome"] != "pending" for w in writes), "every write has an outcome (reconciled at the restart if the kill cut it off)"
    setpoint_boundaries = [w["process_time_h"] for w in writes if "SP.FeedRate" in json.loads(w["values"])]
    assert len(setpoint_boundaries) == len(set(setpoint_boundaries)), "no boundary's setpoints written twice"
    from interfaces.audit import AuditTrail

    with AuditTrail(history_path, read_only=True) as trail:
        records = trail.records()
    sent = {r.details["write_id"] for r in records if r.action == "setpoint_write"}
    answered = {r.details["write_id"] for r in records if r.action == "setpoint_write_result"}
    assert sent and sent <= answered, f"every audited setpoint write has its result: {sorted(sent - answered)} have none"
    started = [r.details for r in records if r.action == "config_loaded"]
    assert [d["start"] for d in started] == ["new batch", "resumed"] and started[1]["resumed_from_h"] == first_run[-1]["process_time_h"]
    history.close()


def test_a_setpoint_write_whose_audit_record_cannot_be_written_is_not_sent(tmp_path, mpc):
    """The audit trail fails from 5 h (a full disk, a lock): the runtime sends no setpoints, raises an alarm, and resumes when it works again."""
    from interfaces.audit import AuditError, AuditTrail

    class FailingAudit:
        def __init__(self, trail: AuditTrail) -> None:
            self.trail = trail
            self.failing = False

        def append(self, **record: Any) -> Any:
            if self.failing:
                raise AuditError("disk full (simulated)")
            return self.trail.append(**record)

    audit = FailingAudit(AuditTrail(tmp_path / "history.sqlite"))

    def disk(report: CycleReport, plant: SimulatedPlant) -> None:
        audit.failing = 5.0 <= report.record.process_time_h < 8.0

    loaded = load_simulation(PLATFORM)
    result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", mpc=mpc, stop_at_h=12.0, on_cycle=disk, audit=audit))
    setpoint_writes = _writes_with(result.rows("writes"), SP_SIGNALS)
    unaudited = [w for w in setpoint_writes if 6.0 <= w["process_time_h"] < 9.0]
    assert unaudited and all(w["outcome"] == "refused" and "audit" in w["detail"] for w in unaudited), "nothing is sent without its record"
    assert all(w["outcome"] == "ok" for w in setpoint_writes if w["process_time_h"] >= 9.0)
    alarms = [(a["code"], a["active"]) for a in result.rows("alarms")]
    assert ("audit_unavailable", 1) in alarms and ("audit_unavailable", 0) in alarms
    records = audit.trail.records()
    sent = {r.process_time_h for r in records if r.action == "setpoint_write"}
    assert sent == {w["process_time_h"] for w in setpoint_writes if w["outcome"] == "ok"}, "every write sent has its record"
    assert audit.trail.verify().ok
    audit.trail.close()


def test_a_lasting_fault_can_hand_control_to_the_plcs_recipe(tmp_path, mpc):
    """With fault_hand_over_cycles set, a Bad feed totaliser (a critical input) stops the heartbeat; the watchdog trips, the recipe runs; then back."""
    loaded = load_simulation(_scenario(tmp_path, "totaliser", faults=[{"kind": "probe", "tag": "PV.FeedTotal", "mode": "bad", "start_h": 6.0, "end_h": 12.0}]))
    settings = TEST_SETTINGS.model_copy(update={"fault_hand_over_cycles": 2})
    seen: dict[float, tuple[bool, bool]] = {}

    async def watch(report: CycleReport, plant: SimulatedPlant) -> None:
        seen[report.record.process_time_h] = (plant.plc.watchdog_tripped, plant.plc.remote_enabled)
        if report.record.process_time_h == 1.0:
            await plant.set_lockstep_timeout(1.0)  # after the cold first solve: a withheld heartbeat costs a second, not ten

    result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", mpc=mpc, settings=settings, stop_at_h=18.0, on_cycle=watch))
    states = {c["process_time_h"]: c["state"] for c in result.rows("cycles")}
    assert all(states[float(h)] == "fault" for h in range(6, 12))
    assert not _writes_with([w for w in result.rows("writes") if 6.0 <= w["process_time_h"] < 12.0], SP_SIGNALS), "no setpoints in fault"
    heartbeats = [w["process_time_h"] for w in result.rows("writes") if "MPC.Heartbeat" in json.loads(w["values"])]
    assert 6.0 in heartbeats and 7.0 not in heartbeats and 11.0 not in heartbeats, f"withheld from the second fault cycle: {heartbeats}, {states}"
    assert any(tripped and not remote for t, (tripped, remote) in seen.items() if 9.0 <= t < 12.0), "the PLC's watchdog took over"
    assert states[12.0] == "held" and states[13.0] == "closed_loop", "back: held while the watchdog is tripped, then closed loop"
    assert any(a["code"] == "quality.PV.FeedTotal" for a in result.rows("alarms"))


def test_run_starts_with_an_approved_calibrated_model_audits_its_sha256_and_plans_in_its_envelope(tmp_path, mpc, monkeypatch):
    """``bioreactor-mpc run``'s runtime with a calibrated kinetics file an engineer approved (tests/test_model_approval.py has the refusals)."""
    import argparse
    import hashlib

    from argon2 import PasswordHasher
    from rich.console import Console
    from runtime_harness import run_command_runtime

    from bioreactor_mpc.admin_cli import add_parsers, dispatch
    from controller.runtime_config import load_runtime_config
    from interfaces.audit import AuditTrail
    from interfaces.history import SqliteHistory
    from interfaces.users import Role, UserStore
    from plant_models.parameters import CultureParameters, ModelProvenance, ParameterEstimate, PhaseEnvelope, ValueRange

    nominal = CultureParameters.from_yaml(REPO / "configs" / "model" / "cho_nominal.yaml")
    estimate = ParameterEstimate(nominal=nominal.growth.mu_max_per_h, value=nominal.growth.mu_max_per_h, ci95_low=0.03, ci95_high=0.06, identifiable=True)
    provenance = ModelProvenance(
        created_utc="2026-12-06T08:00:00+00:00",
        tool="test",
        based_on="cho_nominal.yaml",
        inputs=(),
        batches=("BR01-101",),
        parameters={"growth.mu_max_per_h": estimate},
        not_identifiable=(),
        fit_statistics={},
    )
    phase = PhaseEnvelope(
        phase="all",
        start_h=0.0,
        end_h=340.0,
        temperature_degc=ValueRange(low=33.0, high=36.5),
        feed_per_volume_per_day=ValueRange(low=0.0, high=0.04),
        glucose_feed_per_volume_per_day=ValueRange(low=0.0, high=0.01),
        glucose_g_per_l=ValueRange(low=2.0, high=6.5),
        batches=1,
    )
    model = tmp_path / "site.yaml"
    model.write_text(yaml.safe_dump(nominal.model_copy(update={"provenance": provenance, "envelope": (phase,)}).model_dump(mode="json"), sort_keys=False))
    history_path = tmp_path / "history.sqlite"
    with UserStore(history_path, password_hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)) as users:
        users.add_user("erik", full_name="Erik Lind", role=Role.ENGINEER, password="engineer-password-1")
    monkeypatch.setenv("ERIK_PASSWORD", "engineer-password-1")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    approve = ["model", "approve", str(model), "--history", str(history_path), "--user", "erik", "--reason", "report reviewed", "--password-env", "ERIK_PASSWORD"]
    assert dispatch(parser.parse_args(approve), Console(file=None, quiet=True)) == 0
    config = yaml.safe_load((REPO / "configs" / "runtime" / "reference-opcua.yaml").read_text())
    for key in ("tag_map", "batch"):
        config[key] = str((REPO / "configs" / "runtime" / config[key]).resolve())
    config.update(
        model=str(model), history=str(history_path), poll_interval_s=0.01, reconnect_initial_s=0.05, safeguards={"claim_watch_s": 0.2}, monitoring={"port": 0}
    )  # monitoring on a free port: never collides with a runtime or test running beside this one
    config_path = tmp_path / "runtime.yaml"
    config_path.write_text(yaml.safe_dump(config))
    loaded = load_runtime_config(config_path)

    asyncio.run(run_command_runtime(loaded, load_simulation(PLATFORM), until_h=2.0, mpc=mpc, wall_timeout_s=30.0))
    with AuditTrail(history_path, read_only=True) as trail:
        (approval,) = trail.records(action="model_approved")
        (started,) = trail.records(action="config_loaded")
    assert started.details["model_file"] == {"path": str(model), "sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "calibrated": True, "approval_seq": approval.seq}
    history = SqliteHistory(history_path, read_only=True)
    cycles = history.table("cycles")
    history.close()
    assert len(cycles) >= 2 and {json.loads(c["trust"])["source"] for c in cycles} == {"calibration_envelope"}


def test_the_deployed_runtime_plans_robustly_when_the_config_says_so(tmp_path):
    """``nmpc.robust.enabled`` reaches the runtime that runs against a PLC, not only the in-process simulation.

    (The runtime built an EconomicMpc whatever the config said: robust mode was silently ignored by ``run`` and the demo.)
    Interpreted and on a short horizon, so that no compile is needed: the choice of NLP is what this test is about.
    """
    from controller.mpc import MpcConfig
    from controller.nmpc import NmpcConfig, RobustConfig
    from controller.robust import RobustMpc

    nmpc = NmpcConfig(mpc=MpcConfig(fine_stages=4, coarse_stages=3, compile=False, deadline_s=600.0), robust=RobustConfig(enabled=True))
    settings = TEST_SETTINGS.model_copy(update={"nmpc": nmpc})
    holder: dict[str, Any] = {}
    result = asyncio.run(run_runtime_against(load_simulation(PLATFORM), tmp_path / "h.sqlite", settings=settings, stop_at_h=1.0, runtime_ref=holder))
    assert isinstance(holder["runtime"]._mpc, RobustMpc)
    cycles = result.rows("cycles")
    assert cycles and all(c["source"] == "mpc" for c in cycles), [(c["source"], c["reason"]) for c in cycles]
