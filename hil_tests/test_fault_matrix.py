"""The fault matrix: every fault a probe found, against the runtime over OPC UA in lockstep.

Each test injects one fault class and checks the same four things: no unsafe
write (no setpoints while the runtime cannot trust what it sees), the alarm
raised and recorded (and audited where the audit trail can be written), no
record lost, and recovery within the stated cycles. Faults of the PLC's data
are injected by a :class:`~runtime_harness.TamperingPort` between the runtime
and the PLC (what a faulty PLC program or a mis-scaled tag map delivers);
faults of the plant by the simulated PLC itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import structlog
from runtime_harness import TEST_SETTINGS, SimulatedPlant, TamperingPort, _port, run_runtime_against

from controller.advisory import Signer
from controller.ports import PlcAuthError, Reading
from controller.runtime import CycleReport, Runtime
from controller.takeover import RuntimeStartError, TakeoverApproval
from interfaces.audit import AuditTrail
from interfaces.history import SqliteHistory
from plant_models.cho import STATE_INDEX
from plant_models.parameters import parameter_vector
from simulator.config import load_simulation

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
SP_SIGNALS = ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature", "SP.HarvestRequest")
ENGINEER = TakeoverApproval(Signer("erin", "Erin Engineer", "engineer"), "history disk replaced", "2026-12-06T00:00:00+00:00")


@pytest.fixture(scope="module")
def mpc() -> Any:
    from controller.mpc import EconomicMpc
    from plant_models.cho import CultureModel

    return EconomicMpc(CultureModel(), load_simulation(PLATFORM).batch, TEST_SETTINGS.nmpc.mpc)


def _sp_writes(rows: list[dict[str, Any]], *, outcome: str | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if set(json.loads(r["values"])) & set(SP_SIGNALS) and (outcome is None or r["outcome"] == outcome)]


def _alarms(rows: list[dict[str, Any]], code: str) -> list[tuple[float | None, int]]:
    return [(a["process_time_h"], a["active"]) for a in rows if a["code"] == code]


def _scaled(signal: str, factor: float) -> Any:
    def tamper(readings: dict[str, Reading]) -> dict[str, Reading]:
        reading = readings[signal]
        readings[signal] = dataclasses.replace(reading, value=float(reading.value) * factor)
        return readings

    return tamper


def test_a_running_batch_without_its_history_is_refused_and_a_signed_take_over_starts_from_todays_state(tmp_path, mpc):
    loaded = load_simulation(PLATFORM)
    with pytest.raises(RuntimeStartError, match="no record of it"):
        asyncio.run(run_runtime_against(loaded, tmp_path / "empty.sqlite", mpc=mpc, start_at_h=200.0, stop_at_h=202.0))
    refused = SqliteHistory(tmp_path / "empty.sqlite", read_only=True)
    assert not refused.table("writes") and not refused.table("cycles"), "nothing written, nothing computed"
    refused.close()

    audit = AuditTrail(tmp_path / "taken.sqlite")
    truth: dict[str, float] = {}

    def note_truth(report: CycleReport, plant: SimulatedPlant) -> None:
        if not truth:
            truth.update(time_h=report.record.process_time_h, vcd=float(plant.plc.plant.state[STATE_INDEX["viable_cells"]]))

    result = asyncio.run(run_runtime_against(loaded, tmp_path / "taken.sqlite", mpc=mpc, start_at_h=200.0, stop_at_h=206.0, takeover=ENGINEER, audit=audit, on_cycle=note_truth))
    cycles = result.rows("cycles")
    first = cycles[0]
    assert first["process_time_h"] == pytest.approx(200.0) == truth["time_h"], "the first cycle runs at take-over, not from inoculation"
    estimate = json.loads(first["estimate"])
    assert estimate["state"]["viable_cells"] == pytest.approx(truth["vcd"], rel=0.25)
    assert estimate["state"]["volume"] > loaded.batch.inoculation.volume_l + 20.0, "today's volume, not the inoculation record's"
    assert all(c["harvest_time_h"] >= 300.0 for c in cycles if c["harvest_time_h"] is not None), "no harvest planned from an out-of-date estimate"
    assert json.loads(first["trust"])["width"] == pytest.approx(0.3), "taken over, the region starts narrow: nothing says what the batch's results earned"
    assert [r.action for r in audit.records() if r.action == "batch_taken_over"] == ["batch_taken_over"]
    assert cycles[-1]["state"] == "closed_loop" and _sp_writes(result.rows("writes"), outcome="ok")
    audit.close()


def test_a_mis_scaled_volume_tag_is_a_fault_with_no_setpoints_and_the_plcs_recipe_keeps_the_vessel_safe(tmp_path, mpc):
    """The probe's case: PV.Volume read at a tenth of the truth (a tag map with scale 0.1) from the start."""
    loaded = load_simulation(PLATFORM)
    result = asyncio.run(run_runtime_against(loaded, tmp_path / "h.sqlite", mpc=mpc, stop_at_h=8.0, lockstep_timeout_s=0.3, port=lambda p: _tampered(p, _scaled("PV.Volume", 0.1))))
    cycles = result.rows("cycles")
    assert cycles and {c["state"] for c in cycles} == {"fault"}
    assert not _sp_writes(result.rows("writes")), "no setpoint is written while a reading contradicts the balance"
    times = [c["process_time_h"] for c in cycles]
    assert _alarms(result.rows("alarms"), "volume_balance")[0] == (times[0], 1), "raised at the first cycle"
    heartbeats = [w["process_time_h"] for w in result.rows("writes") if "MPC.Heartbeat" in json.loads(w["values"])]
    assert heartbeats == times[:2], f"moved for the first two fault cycles, withheld from the third on: {heartbeats}, cycles {times}"
    assert result.plc.watchdog_tripped, "the withheld heartbeat handed control to the PLC's recipe"


def _tampered(port: Any, tamper: Any) -> TamperingPort:
    wrapped = TamperingPort(port)
    wrapped.tamper = tamper
    return wrapped


def test_clock_glitch_jump_and_reset_are_alarmed_and_never_stall_the_cycles(tmp_path, mpc):
    """One scan at 1e9 h at 5 h; a PLC restarted at 12 h (its clock from 0 again): fault cycles with the alarm at every boundary of the new clock."""
    loaded = load_simulation(PLATFORM)
    state = {"glitched": False}

    def clock(readings: dict[str, Reading]) -> dict[str, Reading]:
        t = float(readings["Status.ProcessTime"].value)
        if 5.0 <= t < 6.0 and not state["glitched"]:
            state["glitched"] = True
            readings["Status.ProcessTime"] = dataclasses.replace(readings["Status.ProcessTime"], value=1.0e9)
        elif t >= 12.0:
            readings["Status.ProcessTime"] = dataclasses.replace(readings["Status.ProcessTime"], value=t - 12.0)
        return readings

    settings = TEST_SETTINGS.model_copy(update={"fault_hand_over_cycles": None})
    with structlog.testing.capture_logs():
        result = asyncio.run(
            run_runtime_against(
                loaded, tmp_path / "h.sqlite", mpc=mpc, settings=settings, port=lambda p: _tampered(p, clock), stop_at_h=19.5, wall_timeout_s=120.0, on_cycle=_stop_at_true_h(18.0)
            )
        )
    cycles = result.rows("cycles")
    by_state = [(c["process_time_h"], c["state"]) for c in cycles]
    assert "closed_loop" in {s for t, s in by_state if 6.0 <= t < 12.0}, "the glitch did not stop the cycles"
    reset_at = min(
        c["wall_utc"]
        for c in cycles
        if c["process_time_h"] < 12.0 and c["wall_utc"] > max(c2["wall_utc"] for c2 in cycles if c2["process_time_h"] >= 11.0 and c2["state"] == "closed_loop")
    )
    after_reset = [c for c in cycles if c["wall_utc"] >= reset_at]
    assert len(after_reset) >= 5 and {c["state"] for c in after_reset} == {"fault"}, "a fault cycle at every boundary of the reset clock"
    assert not [w for w in _sp_writes(result.rows("writes")) if w["wall_utc"] >= reset_at], "no setpoints after the reset"
    raised = [a["message"] for a in result.rows("alarms") if a["code"] == "batch_clock" and a["active"]]
    assert any("unusable" in m for m in raised) and any("went back" in m for m in raised), f"the glitch and the reset are both alarmed: {raised}"


def _stop_at_true_h(hours: float) -> Any:
    def stop(report: CycleReport, plant: SimulatedPlant) -> None:
        if plant.plc.process_time_h >= hours:
            plant.request_stop()

    return stop


def test_every_tag_bad_for_three_hours_is_alarmed_unhealthy_and_recovers(tmp_path, mpc):
    loaded = load_simulation(PLATFORM)
    seen: dict[str, Any] = {"unhealthy": [], "bad_cycles": 0}

    def all_bad(readings: dict[str, Reading]) -> dict[str, Reading]:
        t = float(readings["Status.ProcessTime"].value)
        if 6.0 <= t < 9.0:
            return {name: dataclasses.replace(r, good=False) for name, r in readings.items()}
        return readings

    def watch(report: CycleReport, plant: SimulatedPlant) -> None:
        if 6.0 <= plant.plc.process_time_h < 9.0:
            seen["bad_cycles"] += 1
            seen["unhealthy"].append(not seen["runtime"]().health()[0])

    settings = TEST_SETTINGS.model_copy(update={"safeguards": TEST_SETTINGS.safeguards.model_copy(update={"clock_lost_cycle_every_s": 0.2})})
    holder: dict[str, Runtime] = {}
    seen["runtime"] = lambda: holder["runtime"]
    result = asyncio.run(
        run_runtime_against(loaded, tmp_path / "h.sqlite", mpc=mpc, settings=settings, port=lambda p: _tampered(p, all_bad), stop_at_h=12.0, on_cycle=watch, runtime_ref=holder)
    )
    assert seen["bad_cycles"] >= 2 and all(seen["unhealthy"]), "fault cycles run and /healthz reports the runtime unhealthy"
    codes = {a["code"] for a in result.rows("alarms") if a["active"]}
    assert {"batch_clock", "data_quality"} <= codes
    assert not [w for w in _sp_writes(result.rows("writes")) if 6.0 <= w["process_time_h"] < 9.0]
    cycles = result.rows("cycles")
    assert cycles[-1]["state"] == "closed_loop" and cycles[-1]["process_time_h"] >= 11.0, "back in control after the tags recover"


def test_a_history_deleted_while_running_is_noticed_at_once_nothing_is_written_and_the_plcs_recipe_takes_over(tmp_path, mpc):
    loaded = load_simulation(PLATFORM)
    path = tmp_path / "h.sqlite"
    seen: dict[str, Any] = {}

    async def delete(report: CycleReport, plant: SimulatedPlant) -> None:
        if report.record.process_time_h == 4.0 and "deleted_at_h" not in seen:
            os.unlink(path)
            seen["deleted_at_h"], seen["heartbeat"] = plant.plc.process_time_h, plant.plc.heartbeat
            await plant.set_lockstep_timeout(0.2)
            await asyncio.sleep(2.5)
            seen["health"] = seen["runtime"]().health()
            seen["heartbeat_after"], seen["tripped"] = plant.plc.heartbeat, plant.plc.watchdog_tripped
            plant.request_stop()

    holder: dict[str, Runtime] = {}
    seen["runtime"] = lambda: holder["runtime"]
    with structlog.testing.capture_logs() as logs:
        result = asyncio.run(run_runtime_against(loaded, path, mpc=mpc, on_cycle=delete, runtime_ref=holder, wall_timeout_s=60.0))
    assert not seen["health"][0] and "deleted or replaced" in seen["health"][1]
    assert seen["heartbeat_after"] == seen["heartbeat"] + 1 and seen["tripped"], "the 4-h heartbeat went out, then none: the recipe took over"
    assert any(e["event"] == "alarm_raised" and e.get("code") == "history_unavailable" for e in logs)
    writes = result.history.table("writes")  # the open connection still reads the unlinked file
    assert not [w for w in writes if w["process_time_h"] > 4.0], "nothing written to the PLC without a record"


def test_a_full_disk_stops_writes_withholds_the_heartbeat_and_recovers_by_itself(tmp_path, mpc):
    loaded = load_simulation(PLATFORM)
    path = tmp_path / "h.sqlite"
    history = SqliteHistory(path)
    seen: dict[str, Any] = {}

    class WatchedPort(TamperingPort):
        """Notes every write the PLC is sent while the disk is full."""

        async def write(self, values: Any) -> None:
            if seen.get("full"):
                seen.setdefault("written_while_full", []).append(values)
            await super().write(values)

    async def disk(report: CycleReport, plant: SimulatedPlant) -> None:
        if report.record.process_time_h == 4.0 and "full_at" not in seen:
            pages = history._db.execute("PRAGMA page_count").fetchone()[0]  # fault injection: SQLite answers SQLITE_FULL beyond this
            history._db.execute(f"PRAGMA max_page_count = {pages}")
            seen["full"], seen["full_at"] = True, plant.plc.process_time_h
            await plant.set_lockstep_timeout(0.2)
            await asyncio.sleep(2.0)
            seen["tripped"], seen["during_h"] = plant.plc.watchdog_tripped, plant.plc.process_time_h
            seen["full"] = False
            history._db.execute("PRAGMA max_page_count = 1073741823")
            await plant.set_lockstep_timeout(10.0)
        if "during_h" in seen and report.record.process_time_h >= seen["during_h"] + 3.0:
            plant.request_stop()

    settings = TEST_SETTINGS.model_copy(update={"safeguards": TEST_SETTINGS.safeguards.model_copy(update={"storage_retry_s": 0.2})})
    result = asyncio.run(run_runtime_against(loaded, path, mpc=mpc, settings=settings, on_cycle=disk, history=history, port=WatchedPort, wall_timeout_s=90.0))
    assert seen["tripped"], "no heartbeat while nothing can be recorded: the PLC's watchdog handed control to its recipe"
    # Sent to the PLC, not read from the history (a write that lost its record is not in it); a cycle that began while the disk was
    # full may write once its records are in, so the process time of a write says nothing about when it was sent.
    assert not seen.get("written_while_full"), "no write without its record"
    writes = result.rows("writes")
    alarms = _alarms(result.rows("alarms"), "history_unavailable")
    assert [active for _, active in alarms] == [1, 0], "raised and cleared, both recorded once storage was back"
    cycles = result.rows("cycles")
    assert cycles[-1]["state"] == "closed_loop" and cycles[-1]["wrote_setpoints"], "back in control by itself"
    assert all(w["outcome"] != "pending" for w in writes)


def test_a_second_runtime_refuses_a_plc_whose_heartbeat_another_runtime_moves(tmp_path, mpc):
    loaded = load_simulation(PLATFORM)
    outcome: dict[str, Any] = {}

    async def second(report: CycleReport, plant: SimulatedPlant) -> None:
        if report.record.process_time_h == 3.0 and "error" not in outcome:
            other = Runtime(
                port=_port("opcua", plant.proxy.port),
                history=SqliteHistory(tmp_path / "second.sqlite"),
                batch=loaded.batch,
                nominal_parameters=parameter_vector(loaded.nominal, loaded.batch.media),
                settings=TEST_SETTINGS.model_copy(update={"safeguards": TEST_SETTINGS.safeguards.model_copy(update={"claim_watch_s": 2.0})}),
                mpc=mpc,
            )
            try:
                await other.run()
            except RuntimeStartError as error:
                outcome["error"] = str(error)

    result = asyncio.run(run_runtime_against(loaded, tmp_path / "first.sqlite", mpc=mpc, stop_at_h=10.0, on_cycle=second, lockstep_timeout_s=10.0))
    assert "another runtime holds this PLC" in outcome["error"]
    second_history = SqliteHistory(tmp_path / "second.sqlite", read_only=True)
    assert not second_history.table("writes") and not second_history.table("runs"), "the refused runtime wrote nothing and opened no run"
    assert {c["state"] for c in result.rows("cycles")} == {"closed_loop"}, "the first runtime went on undisturbed"


def test_a_plc_that_refuses_the_credentials_is_retried_after_minutes_not_seconds(tmp_path, mpc):
    """A wrong password: the port says PlcAuthError with retry_after_s; the runtime waits that long (a real PLC would lock the account)."""
    loaded = load_simulation(PLATFORM)
    attempts: list[float] = []

    class RefusingPort:
        connected = False

        async def connect(self) -> None:
            attempts.append(asyncio.get_running_loop().time())
            raise PlcAuthError("BadUserAccessDenied: the PLC refused user 'mpc'", retry_after_s=1.5)

        async def close(self) -> None:
            return None

        async def read(self) -> dict[str, Reading]:
            raise AssertionError("never connected")

        async def write(self, values: Any) -> None:
            raise AssertionError("never connected")

    async def scenario() -> None:
        runtime = Runtime(
            port=RefusingPort(),
            history=SqliteHistory(tmp_path / "h.sqlite"),
            batch=loaded.batch,
            nominal_parameters=parameter_vector(loaded.nominal, loaded.batch.media),
            settings=TEST_SETTINGS,
            mpc=mpc,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(stop=stop))
        await asyncio.sleep(3.2)
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)

    asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert 2 <= len(attempts) <= 3 and all(gap >= 1.45 for gap in gaps), f"attempts {len(attempts)}, gaps {gaps}"


def test_a_link_lost_during_the_writes_uses_up_that_boundary_the_setpoints_are_not_recomputed_and_sent_again(tmp_path, mpc):
    """The PLC applies the 5-h setpoints and the answer is lost: the cycle is recorded once, and the next write is at a later boundary."""
    loaded = load_simulation(PLATFORM)

    class LosingAnswers(TamperingPort):
        lost = False

        async def write(self, values: Any) -> None:
            await self.port.write(values)
            if "SP.FeedRate" in values and not self.lost and self.port_time_h >= 5.0:
                self.lost = True
                await self.port.close()
                from controller.ports import PlcLinkError

                raise PlcLinkError("the answer to the write was lost (simulated)")

        async def read(self) -> dict[str, Reading]:
            readings = await super().read()
            self.port_time_h = float(readings["Status.ProcessTime"].value)
            return readings

    result = asyncio.run(run_runtime_against(loaded, tmp_path / "h.sqlite", mpc=mpc, stop_at_h=9.0, port=LosingAnswers))
    writes = _sp_writes(result.rows("writes"))
    boundaries = [w["process_time_h"] for w in writes]
    assert len(boundaries) == len(set(boundaries)), f"a boundary's setpoints sent twice: {boundaries}"
    assert [w["outcome"] for w in writes if w["process_time_h"] == 5.0] == ["link_error"]
    cycles = [c["process_time_h"] for c in result.rows("cycles")]
    assert cycles.count(5.0) == 1 and cycles[-1] >= 8.0, "the 5-h cycle recorded once, and control went on"


def test_a_clock_that_stops_while_good_is_a_fault_not_a_silent_stall(tmp_path, mpc):
    loaded = load_simulation(PLATFORM)
    state: dict[str, Any] = {}

    def stuck(readings: dict[str, Reading]) -> dict[str, Reading]:
        t = float(readings["Status.ProcessTime"].value)
        if t >= 4.0:
            readings["Status.ProcessTime"] = dataclasses.replace(readings["Status.ProcessTime"], value=4.0)
        return readings

    safeguards = TEST_SETTINGS.safeguards.model_copy(update={"clock_frozen_after_periods": 0.0005, "clock_lost_cycle_every_s": 0.5})  # 1.8 s of wall time
    settings = TEST_SETTINGS.model_copy(update={"safeguards": safeguards})
    holder: dict[str, Runtime] = {}

    def on_cycle(report: CycleReport, plant: SimulatedPlant) -> None:
        alarms = holder["runtime"].alarms
        if "stopped" in alarms.get("batch_clock", ""):
            state["message"] = alarms["batch_clock"]
            plant.request_stop()

    result = asyncio.run(
        run_runtime_against(
            loaded,
            tmp_path / "h.sqlite",
            mpc=mpc,
            settings=settings,
            port=lambda p: _tampered(p, stuck),
            on_cycle=on_cycle,
            runtime_ref=holder,
            lockstep_timeout_s=0.2,
            wall_timeout_s=60.0,
        )
    )
    assert "has read 4.00 h" in state["message"]
    cycles = result.rows("cycles")
    assert cycles[-1]["state"] == "fault" and cycles[-1]["process_time_h"] == 4.0
    first_fault_utc = next(c for c in cycles if c["state"] == "fault")["wall_utc"]
    assert not [w for w in _sp_writes(result.rows("writes")) if w["wall_utc"] > first_fault_utc], "no setpoints once the clock stopped"


def test_an_acknowledged_contradiction_gives_control_back_once_the_tag_is_fixed(tmp_path, mpc):
    """The volume tag mis-scaled until 3 h, then fixed; the contradiction is held until an engineer acknowledges it (audited), then closed loop again."""
    loaded = load_simulation(PLATFORM)
    audit = AuditTrail(tmp_path / "h.sqlite")
    holder: dict[str, Runtime] = {}
    seen: dict[str, Any] = {}

    def until_three(readings: dict[str, Reading]) -> dict[str, Reading]:
        if float(readings["Status.ProcessTime"].value) < 3.0:
            return _scaled("PV.Volume", 0.1)(readings)
        return readings

    async def engineer(report: CycleReport, plant: SimulatedPlant) -> None:
        t = report.record.process_time_h
        seen.setdefault("states", []).append((t, report.record.state))
        if t >= 10.0:
            plant.request_stop()
        if t >= 5.0 and "acknowledged_at_h" not in seen:
            seen["acknowledged_at_h"] = t
            await holder["runtime"].acknowledge("volume_balance", user="erin", reason="the tag map's scale corrected")  # waits for the cycle to end

    asyncio.run(
        run_runtime_against(
            loaded,
            tmp_path / "h.sqlite",
            mpc=mpc,
            port=lambda p: _tampered(p, until_three),
            on_cycle=engineer,
            runtime_ref=holder,
            audit=audit,
            lockstep_timeout_s=0.5,
            wall_timeout_s=90.0,
        )
    )
    held = [s for t, s in seen["states"] if t <= seen["acknowledged_at_h"]]
    assert held and set(held) == {"fault"}, "held after the tag was fixed, until acknowledged"
    assert seen["states"][-1][1] == "closed_loop", "control back after the acknowledgement"
    records = [(r.actor, r.subject) for r in audit.records() if r.action == "contradiction_acknowledged"]
    assert records == [("erin", "volume_balance")]
    audit.close()
