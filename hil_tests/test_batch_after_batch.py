"""Batch after batch: one runtime, started once with a batch template (no ``batch_id``), follows the simulated PLC over OPC UA.

The PLC runs short batches (harvested at :data:`BATCH_HOURS`, its latest allowed
harvest) and inoculates the next one after a turnaround
(:meth:`simulator.plc.SimulatedPlc.next_batch`). Checked: a run per batch in the
history, each with its own clock, estimator and resume state, audited; nothing
written between batches; a batch that contradicts the template refused with an
alarm and no writes, and the next matching batch picked up; restarts mid-batch
and after a batch change resume the batch the PLC runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from runtime_harness import TEST_SETTINGS, SimulatedPlant, TcpProxy, _port, _server

from bioreactor_mpc.demo import free_port
from controller.config import BatchConfig, BatchTemplate
from controller.mpc import EconomicMpc
from controller.runtime import CycleReport, RunSummary, Runtime
from interfaces.audit import AuditTrail
from interfaces.history import SqliteHistory
from plant_models.cho import CultureModel
from plant_models.parameters import parameter_vector
from simulator.batch import build_simulated_plc
from simulator.config import LoadedSimulation, load_simulation
from simulator.plc import PHASE_HARVESTED

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
BATCH_HOURS = 12
"""The PLC harvests each batch here (its latest allowed harvest): 12 cycles a batch."""
IDS = ("BR01-B0001", "BR01-B0002", "BR01-B0003")


@pytest.fixture(scope="module")
def loaded() -> LoadedSimulation:
    return load_simulation(PLATFORM)


@pytest.fixture(scope="module")
def mpc(loaded: LoadedSimulation) -> EconomicMpc:
    """One compiled NLP for the module's runtimes, from the template (a batch's id is no part of the problem)."""
    return EconomicMpc(CultureModel(), loaded.batch, TEST_SETTINGS.nmpc.mpc)


def _template() -> BatchTemplate:
    """The platform's batch file without its batch_id: the process template the runtime is started with, once."""
    data = yaml.safe_load((REPO / "configs" / "batch" / "platform.yaml").read_text())
    del data["batch_id"]
    return BatchTemplate.model_validate(data)


def _plc_batch(loaded: LoadedSimulation, batch_id: str, *, volume_l: float | None = None) -> BatchConfig:
    """A batch as the PLC runs it: the platform's, under its own id, harvested at BATCH_HOURS; ``volume_l`` another inoculation volume."""
    data = loaded.batch.model_dump()
    data["batch_id"] = batch_id
    data["recipe"]["harvest_h"] = data["limits"]["latest_harvest_h"] = float(BATCH_HOURS)
    if volume_l is not None:
        data["inoculation"]["volume_l"] = volume_l
    return BatchConfig.model_validate(data)


@contextlib.asynccontextmanager
async def _served(loaded: LoadedSimulation, first: BatchConfig) -> AsyncIterator[SimulatedPlant]:
    """The simulated PLC running ``first``, served over OPC UA in lockstep behind a cuttable proxy."""
    plc, _ = build_simulated_plc(loaded.model_copy(update={"batch": first}))
    plc.lockstep = True
    server_port = free_port()
    server = _server("opcua", plc, server_port)
    await server.start()
    proxy = TcpProxy(server_port)
    await proxy.start()
    plant = SimulatedPlant(plc, server, proxy, 10.0)
    try:
        yield plant
    finally:
        await plant.stop_clock()
        await proxy.cut()
        await server.stop()


def _runtime(plant: SimulatedPlant, history: SqliteHistory, audit: AuditTrail, mpc: EconomicMpc, on_cycle: Callable[[CycleReport], None] | None = None) -> Runtime:
    template = _template()
    nominal = parameter_vector(load_simulation(PLATFORM).nominal, template.media)
    port = _port("opcua", plant.proxy.port)
    return Runtime(port=port, history=history, batch=template, nominal_parameters=nominal, settings=TEST_SETTINGS, mpc=mpc, audit=audit, on_cycle=on_cycle)


async def _until(condition: Callable[[], bool], task: asyncio.Task[Any], *, timeout_s: float = 60.0) -> None:
    """Wait for ``condition`` while the runtime's ``task`` runs (its failure is raised here)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            if task.done():
                task.result()
                raise AssertionError("the runtime ended before the condition was met")
            await asyncio.sleep(0.01)


def _between_batches(plant: SimulatedPlant, runtime: Runtime) -> bool:
    return plant.plc.phase == PHASE_HARVESTED and runtime.batch.batch_id is None


async def _turnaround(plant: SimulatedPlant, runtime: Runtime, history: SqliteHistory, task: asyncio.Task[Any], following: BatchConfig, *, lockstep_s: float = 10.0) -> None:
    """After the PLC harvested: the runtime ends the batch's run and writes nothing (not even the heartbeat); then the next batch is inoculated."""
    await _until(lambda: _between_batches(plant, runtime), task)
    writes, heartbeat = len(history.table("writes")), plant.plc.heartbeat
    await asyncio.sleep(0.3)  # some 30 polls of the harvested PLC
    assert len(history.table("writes")) == writes and plant.plc.heartbeat == heartbeat, "nothing written between batches"
    plant.plc.next_batch(following)
    await plant.set_lockstep_timeout(lockstep_s)


def _by_run(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    runs: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault(row["run_id"], []).append(row)
    return runs


def _estimate(cycle: dict[str, Any], state: str) -> float:
    return float(json.loads(cycle["estimate"])["state"][state])


def test_three_batches_one_after_another_without_a_restart_or_a_config_edit(tmp_path, loaded, mpc):
    async def scenario() -> RunSummary:
        async with _served(loaded, _plc_batch(loaded, IDS[0])) as plant:
            runtime = _runtime(plant, history, audit, mpc)
            task = asyncio.create_task(runtime.run(stop=plant.stop))
            for batch_id in IDS[1:]:
                await _turnaround(plant, runtime, history, task, _plc_batch(loaded, batch_id))
            await _until(lambda: _between_batches(plant, runtime) and len(runtime.summary.batches) == 3, task)
            plant.request_stop()
            return await asyncio.wait_for(task, 30.0)

    history, audit = SqliteHistory(tmp_path / "h.sqlite"), AuditTrail(tmp_path / "h.sqlite")
    summary = asyncio.run(asyncio.wait_for(scenario(), 240.0))
    assert summary.batches == list(IDS) and not summary.refused_batches and summary.cycles == 3 * BATCH_HOURS
    assert summary.end_reason == "stopped" and summary.writes_failed == 0 and summary.link_losses == 0
    # One run per batch in the history, each closed at its harvest, each recording its own batch's config.
    runs = history.table("runs")
    assert [(r["batch_id"], r["end_reason"]) for r in runs] == [(batch_id, "batch harvested") for batch_id in IDS]
    assert [json.loads(r["config"])["batch"]["batch_id"] for r in runs] == list(IDS)
    # Each batch from its own clock (cycles at 0 … 11 h, not on from the last batch's hour) and its own estimator, started from the
    # inoculation record: the first estimate is the inoculum again, not where the last batch ended.
    cycles = _by_run(history.table("cycles"))
    assert sorted(cycles) == [r["id"] for r in runs]
    inoculum = loaded.batch.inoculation
    previous_last_vcd = None
    for run in runs:
        batch_cycles = cycles[run["id"]]
        assert [c["process_time_h"] for c in batch_cycles] == [float(h) for h in range(BATCH_HOURS)]
        assert {c["state"] for c in batch_cycles} == {"closed_loop"} and all(c["wrote_setpoints"] for c in batch_cycles)
        first_vcd, last_vcd = _estimate(batch_cycles[0], "viable_cells"), _estimate(batch_cycles[-1], "viable_cells")
        assert first_vcd == pytest.approx(inoculum.viable_cell_density_1e6_per_ml, rel=0.05)
        assert _estimate(batch_cycles[0], "volume") == pytest.approx(inoculum.volume_l, abs=5.0)
        assert last_vcd > 1.2 * first_vcd, "the culture grew over the batch"
        if previous_last_vcd is not None:
            assert first_vcd < previous_last_vcd / 1.2, "the estimator started afresh"
        previous_last_vcd = last_vcd
    # Writes and their setpoints belong to the run of their batch; the resume state is kept per batch.
    writes = _by_run(history.table("writes"))
    assert sorted(writes) == sorted(cycles) and all(len(w) == 2 * BATCH_HOURS for w in writes.values())
    resume = {batch_id: history.load_resume(batch_id) for batch_id in IDS}
    assert all(state is not None and state.last_cycle_h == BATCH_HOURS - 1 for state in resume.values())
    # Audited: each batch started with the PLC's id and the template's digest, and ended at its harvest.
    started = [r for r in audit.records(action="batch_started")]
    assert [r.subject for r in started] == list(IDS) and [r.details["start"] for r in started] == ["new batch"] * 3
    assert len({r.details["template_sha256"] for r in started}) == 1
    assert [(r.subject, r.details["reason"], r.details["cycles"]) for r in audit.records(action="batch_ended")] == [(b, "batch harvested", BATCH_HOURS) for b in IDS]
    assert [r.subject for r in audit.records(action="config_loaded")] == list(IDS)
    history.close()
    audit.close()


def test_a_batch_contradicting_the_template_is_refused_writing_nothing_and_the_next_is_picked_up(tmp_path, loaded, mpc):
    seen: dict[str, Any] = {}

    async def scenario() -> RunSummary:
        async with _served(loaded, _plc_batch(loaded, IDS[0])) as plant:
            runtime = _runtime(plant, history, audit, mpc)
            task = asyncio.create_task(runtime.run(stop=plant.stop))
            # The second batch is inoculated with 1050 L where the template says 1400 L: the plant runs alone (a short lockstep wait).
            await _turnaround(plant, runtime, history, task, _plc_batch(loaded, IDS[1], volume_l=1050.0), lockstep_s=0.05)
            await _until(lambda: "batch_refused" in runtime.alarms, task)
            seen["alarm"] = runtime.alarms["batch_refused"]
            writes, heartbeat = len(history.table("writes")), plant.plc.heartbeat
            await _until(lambda: plant.plc.phase == PHASE_HARVESTED, task)  # the PLC ran its recipe to the harvest
            seen["wrote_during_refused"] = len(history.table("writes")) - writes
            seen["heartbeat_moved"] = plant.plc.heartbeat != heartbeat
            seen["watchdog_tripped"] = plant.plc.watchdog_tripped
            seen["runs_during_refused"] = len(history.table("runs"))
            await _turnaround(plant, runtime, history, task, _plc_batch(loaded, IDS[2]))
            await _until(lambda: _between_batches(plant, runtime) and len(runtime.summary.batches) == 2, task)
            seen["alarms_after"] = dict(runtime.alarms)
            plant.request_stop()
            return await asyncio.wait_for(task, 30.0)

    history, audit = SqliteHistory(tmp_path / "h.sqlite"), AuditTrail(tmp_path / "h.sqlite")
    summary = asyncio.run(asyncio.wait_for(scenario(), 240.0))
    # Refused, saying why: the batch, the volume read, the template's volume and the tolerance's settings.
    assert "BR01-B0002" in seen["alarm"] and "PV.Volume reads 10" in seen["alarm"] and "inoculation.volume_l (1400 L)" in seen["alarm"]
    assert "plausibility.volume_tolerance_l" in seen["alarm"]
    # A safe state: nothing written for the whole batch, the heartbeat still, so the PLC's watchdog ran its own recipe; no run opened.
    assert seen["wrote_during_refused"] == 0 and not seen["heartbeat_moved"] and seen["watchdog_tripped"]
    assert seen["runs_during_refused"] == 1
    assert summary.refused_batches == [IDS[1]] and summary.batches == [IDS[0], IDS[2]]
    # The next batch that matches is picked up: its own run from 0 h in closed loop, and the refusal's alarm cleared in it.
    runs = history.table("runs")
    assert [(r["batch_id"], r["end_reason"]) for r in runs] == [(IDS[0], "batch harvested"), (IDS[2], "batch harvested")]
    cycles = _by_run(history.table("cycles"))
    third = cycles[runs[1]["id"]]
    assert [c["process_time_h"] for c in third] == [float(h) for h in range(BATCH_HOURS)] and all(c["wrote_setpoints"] for c in third)
    assert "batch_refused" not in seen["alarms_after"]
    cleared = [a for a in history.table("alarms") if a["code"] == "batch_refused"]
    assert [(a["run_id"], a["active"]) for a in cleared] == [(runs[1]["id"], 0)]
    refused = audit.records(action="batch_refused")
    assert [r.subject for r in refused] == [IDS[1]] and "does not match the batch template" in refused[0].details["reason"]
    assert [r.subject for r in audit.records(action="batch_started")] == [IDS[0], IDS[2]]
    history.close()
    audit.close()


def test_restarts_resume_the_batch_the_plc_runs_mid_batch_and_after_a_batch_change(tmp_path, loaded, mpc):
    """Stopped at 5 h of the first batch and restarted: it resumes that batch. Stopped at 3 h of the second: the restart resumes the second."""

    def stop_at(hours: float, stop: asyncio.Event) -> Callable[[CycleReport], None]:
        def on_cycle(report: CycleReport) -> None:
            if report.record.process_time_h >= hours:
                stop.set()

        return on_cycle

    async def scenario() -> list[RunSummary]:
        summaries = []
        async with _served(loaded, _plc_batch(loaded, IDS[0])) as plant:
            first_stop = asyncio.Event()
            first = _runtime(plant, history, audit, mpc, stop_at(5.0, first_stop))
            summaries.append(await asyncio.wait_for(first.run(stop=first_stop), 60.0))
            second_stop = asyncio.Event()

            def stop_in_the_second_batch(report: CycleReport) -> None:  # from the cycle itself: a loaded machine cannot run one more first
                if second.summary.batches[-1:] == [IDS[1]] and report.record.process_time_h >= 3.0:
                    second_stop.set()

            second = _runtime(plant, history, audit, mpc, stop_in_the_second_batch)
            task = asyncio.create_task(second.run(stop=second_stop))
            await _turnaround(plant, second, history, task, _plc_batch(loaded, IDS[1]))
            summaries.append(await asyncio.wait_for(task, 60.0))
            third = _runtime(plant, history, audit, mpc)
            task = asyncio.create_task(third.run(stop=plant.stop))
            await _until(lambda: _between_batches(plant, third) and third.summary.batches == [IDS[1]], task)
            plant.request_stop()
            summaries.append(await asyncio.wait_for(task, 30.0))
        return summaries

    history, audit = SqliteHistory(tmp_path / "h.sqlite"), AuditTrail(tmp_path / "h.sqlite")
    first, second, third = asyncio.run(asyncio.wait_for(scenario(), 240.0))
    assert first.batches == [IDS[0]] and first.resumed_from_h is None
    assert second.batches == [IDS[0], IDS[1]] and third.batches == [IDS[1]] and third.resumed_from_h == 3.0
    runs = history.table("runs")
    assert [(r["batch_id"], r["end_reason"]) for r in runs] == [
        (IDS[0], "stopped"),
        (IDS[0], "batch harvested"),
        (IDS[1], "stopped"),
        (IDS[1], "batch harvested"),
    ]
    assert [r.details["start"] for r in audit.records(action="config_loaded")] == ["new batch", "resumed", "new batch", "resumed"]
    # Every hour of each batch cycled exactly once across its runs: the restarts lost none and repeated none.
    cycles = history.table("cycles")
    for batch_id in IDS[:2]:
        run_ids = {r["id"] for r in runs if r["batch_id"] == batch_id}
        assert [c["process_time_h"] for c in cycles if c["run_id"] in run_ids] == [float(h) for h in range(BATCH_HOURS)], batch_id
    history.close()
    audit.close()
