"""The control cycle without I/O: faults end in a plan that writes nothing unsafe, alarms, and leaves the estimator as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.clock import BatchClock, Tick
from controller.cycle import ControlCycle, CyclePlan
from controller.estimator import EstimatorDivergedError, ExtendedKalmanEstimator
from controller.modes import ModeMachine, RequestedMode, State
from controller.mpc import EconomicMpc
from controller.nmpc import CycleObservation, NmpcController
from controller.quality import DataQualityChecker
from controller.runtime_config import RuntimeSettings
from plant_models.cho import CultureModel
from plant_models.parameters import parameter_vector
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.plc import TagReading

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
SETTINGS = RuntimeSettings()


@pytest.fixture(scope="module")
def model() -> CultureModel:
    return CultureModel()


@pytest.fixture(scope="module")
def mpc(model) -> EconomicMpc:
    return EconomicMpc(model, load_simulation(PLATFORM).batch, SETTINGS.nmpc.mpc)


class FailingOnce:
    """The estimator as the controller's state source, failing half-way through chosen cycles (after it has updated, as a failed lab replay would)."""

    def __init__(self, estimator: ExtendedKalmanEstimator, fail_at_h: set[float]) -> None:
        self.estimator = estimator
        self.fail_at_h = fail_at_h

    def observe(self, observation: CycleObservation) -> tuple[np.ndarray, np.ndarray]:
        result = self.estimator.observe(observation)
        if any(abs(observation.process_time_h - t) < 1e-6 for t in self.fail_at_h):
            raise EstimatorDivergedError("lab result could not be replayed within the kept history", process_time_h=observation.process_time_h)
        return result


class Loop:
    """The simulated PLC and one ControlCycle, stepped by hand; the writes of each plan are applied as the runtime would."""

    def __init__(self, model: CultureModel, mpc: EconomicMpc, *, fail_at_h: set[float] | None = None) -> None:
        self.loaded = load_simulation(PLATFORM)
        self.plc, _ = build_simulated_plc(self.loaded, model)
        batch = self.loaded.batch
        self.estimator = ExtendedKalmanEstimator.from_batch(model, batch, parameter_vector(self.loaded.nominal, batch.media))
        source: Any = FailingOnce(self.estimator, fail_at_h) if fail_at_h is not None else self.estimator
        self.cycle = ControlCycle(
            batch=batch,
            settings=SETTINGS,
            modes=ModeMachine(RequestedMode.CLOSED_LOOP),
            quality=DataQualityChecker(SETTINGS.quality),
            estimator=self.estimator,
            controller=NmpcController(model, batch, source, SETTINGS.nmpc, mpc=mpc),
            clock=BatchClock(batch.cycle_period_h),
            heartbeat=self.plc.heartbeat,
        )

    def step(self, scan: dict[str, TagReading] | None = None) -> CyclePlan:
        readings = scan if scan is not None else self.plc.snapshot()
        verdict = self.cycle.clock_verdict(readings, wall_s=self.plc.process_time_h * 3600.0)
        assert verdict.tick is not Tick.WAIT
        plan = self.cycle.decide(readings, verdict)
        for group in plan.writes:
            for name, value in group.values.items():
                self.plc.write(name, value)
        outcome = self.cycle.conclude(plan, setpoints_written=any(g.setpoints for g in plan.writes), setpoint_write_failed=False)
        if outcome.beat:
            value = self.cycle.next_heartbeat()
            self.plc.write_heartbeat(value)
            self.cycle.heartbeat_written(value)
        self.plc.advance_to(self.plc.next_cycle_boundary_h())
        return plan


def _setpoint_writes(plan: CyclePlan) -> list[str]:
    return [name for group in plan.writes for name in group.values if name.startswith("SP.")]


def test_a_cycle_whose_estimator_fails_half_way_leaves_no_trace_and_keeps_the_lab_result(model, mpc):
    loop = Loop(model, mpc, fail_at_h=set())
    for _ in range(6):
        loop.step()
    seq_before = loop.cycle.quality.last_lab_seq
    while loop.plc.snapshot()["Sample.Seq"].value == seq_before:  # run to the cycle where the next lab result arrives
        loop.step()
    failing: FailingOnce = loop.cycle.controller._source  # type: ignore[assignment]  # the test's own double
    arrival_h = loop.plc.process_time_h
    failing.fail_at_h = {arrival_h, arrival_h + 1.0}
    saved = loop.estimator.to_dict()
    plan = loop.step()
    assert plan.state is State.FAULT and plan.decision is None and not _setpoint_writes(plan)
    assert "estimator_failed" in plan.alarms
    assert plan.lab is not None and not plan.lab_used
    assert loop.cycle.quality.last_lab_seq == seq_before, "the lab result is not consumed by a failed cycle"
    assert loop.estimator.to_dict()["entries"] == saved["entries"] and loop.estimator.to_dict()["labs"] == saved["labs"], "rolled back"
    second = loop.step()  # the same result fails again: set aside, so the batch goes on without it
    assert "lab_result_set_aside" in second.alarms and loop.cycle.quality.last_lab_seq == plan.lab.seq
    third = loop.step()
    assert third.state is State.CLOSED_LOOP and third.decision is not None and _setpoint_writes(third)


def test_a_mis_scaled_volume_tag_is_a_physical_contradiction_and_nothing_is_written(model, mpc):
    """The probe's case: PV.Volume mapped with scale 0.1 from the start of the batch."""
    loop = Loop(model, mpc)

    def mis_scaled() -> dict[str, TagReading]:
        scan = loop.plc.snapshot()
        scan["PV.Volume"] = dataclasses.replace(scan["PV.Volume"], value=0.1 * float(scan["PV.Volume"].value))
        return scan

    plans = [loop.step(mis_scaled()) for _ in range(3)]
    for plan in plans:
        assert plan.state is State.FAULT and not _setpoint_writes(plan)
        assert "volume_balance" in plan.alarms and "PV.Volume" in plan.alarms["volume_balance"]
        assert [g.values for g in plan.writes] == [{"MPC.Mode": 0}]


def test_another_writer_of_the_heartbeat_is_a_fault(model, mpc):
    loop = Loop(model, mpc)
    loop.step()
    loop.plc.write_heartbeat(loop.cycle.heartbeat + 7)  # another runtime's beat
    plan = loop.step()
    assert plan.state is State.FAULT and "heartbeat_foreign" in plan.alarms and not _setpoint_writes(plan)


def test_every_tag_bad_is_a_fault_cycle_with_a_data_quality_alarm(model, mpc):
    loop = Loop(model, mpc)
    loop.step()
    scan = {name: dataclasses.replace(reading, good=False) for name, reading in loop.plc.snapshot().items()}
    verdict = loop.cycle.clock_verdict(scan, wall_s=1e6)
    assert verdict.tick is Tick.FAULT and "unusable" in verdict.problem
    plan = loop.cycle.decide(scan, verdict)
    assert plan.state is State.FAULT and not _setpoint_writes(plan)
    assert {"batch_clock", "data_quality", "quality.PV.Volume"} <= set(plan.alarms)


def test_the_harvest_request_follows_the_setpoints_in_a_group_of_its_own(model, mpc):
    loop = Loop(model, mpc)
    loop.step()
    loop.cycle.controller.harvest_time_h = loop.plc.process_time_h  # the planned harvest has come
    plan = loop.step()
    assert [set(g.values) for g in plan.writes][1] == {"SP.HarvestRequest"}
    assert {"SP.FeedRate", "SP.GlucoseRate", "SP.Temperature"} <= set(plan.writes[0].values)
    assert loop.plc.harvest_reason == "harvest requested by the runtime"


def test_a_heartbeat_the_plc_reset_is_alarmed_and_adopted_not_taken_for_another_writer(model, mpc):
    loop = Loop(model, mpc)
    for _ in range(3):
        loop.step()
    loop.plc.write_heartbeat(0)  # the PLC restarted and zeroed it
    plan = loop.step()
    assert "heartbeat_reset" in plan.alarms and "heartbeat_foreign" not in plan.alarms
    assert plan.state is State.CLOSED_LOOP and _setpoint_writes(plan)
    assert "heartbeat_reset" not in loop.step().alarms, "counting on from the PLC's value, the next cycle is clean"


def test_a_held_contradiction_survives_a_restart_until_acknowledged(model, mpc):
    loop = Loop(model, mpc)

    def mis_scaled() -> dict[str, TagReading]:
        scan = loop.plc.snapshot()
        scan["PV.Volume"] = dataclasses.replace(scan["PV.Volume"], value=0.1 * float(scan["PV.Volume"].value))
        return scan

    plan = loop.step(mis_scaled())
    assert "volume_balance" in plan.alarms
    resume = loop.cycle.resume_state(plan)
    assert resume is not None and set(resume.held_contradictions) == {"volume_balance"}
    restarted = Loop(model, mpc)
    restarted.plc = loop.plc
    restarted.cycle = ControlCycle(
        batch=loop.loaded.batch,
        settings=SETTINGS,
        modes=ModeMachine(RequestedMode.CLOSED_LOOP),
        quality=DataQualityChecker(SETTINGS.quality),
        estimator=loop.estimator,
        controller=loop.cycle.controller,
        clock=loop.cycle.clock,
        heartbeat=loop.plc.heartbeat,
        held_contradictions=resume.held_contradictions,
    )
    after = restarted.step()  # the tag is fixed (true volume again), but nobody acknowledged
    assert after.state is State.FAULT and "volume_balance" in after.alarms and not _setpoint_writes(after)
    restarted.cycle.acknowledge("volume_balance")
    assert restarted.step().state is State.CLOSED_LOOP


def test_a_look_ahead_that_fails_numerically_costs_the_warnings_not_the_control(model, mpc, monkeypatch):
    import controller.cycle

    def singular(*args: Any, **kwargs: Any) -> Any:
        raise np.linalg.LinAlgError("singular covariance (injected)")

    loop = Loop(model, mpc)
    loop.step()
    monkeypatch.setattr(controller.cycle, "forecast", singular)
    plan = loop.step()
    assert plan.state is State.CLOSED_LOOP and _setpoint_writes(plan), "control went on"
    assert not [code for code in plan.alarms if code.startswith("early_warning")] and loop.cycle.forecast is None


def test_the_warnings_look_ahead_follows_the_glucose_feed_as_written_under_the_limit(model, mpc, monkeypatch):
    """The early warnings' forecast holds the plan's glucose feed at the ceiling the cycle's decision was held to, over the window."""
    import controller.cycle

    loop = Loop(model, mpc)
    loop.step()
    calls: list[dict[str, float]] = []
    real = controller.cycle.plan_schedule

    def spy(solution: Any, **limits: float) -> Any:
        calls.append(limits)
        return real(solution, **limits)

    monkeypatch.setattr(controller.cycle, "plan_schedule", spy)
    monkeypatch.setattr(NmpcController, "glucose_ceiling_applied_lph", property(lambda self: 0.05))
    now_h = loop.plc.process_time_h
    plan = loop.step()
    assert plan.state is State.CLOSED_LOOP and calls
    assert calls[-1]["glucose_max_lph"] == 0.05
    assert calls[-1]["limited_until_h"] == pytest.approx(now_h + SETTINGS.early_warning.window_h, abs=1.0)


def test_a_numeric_failure_inside_the_controller_is_a_fault_for_the_cycle_not_the_end_of_the_runtime(model, mpc, monkeypatch):
    loop = Loop(model, mpc)
    loop.step()
    saved = loop.estimator.to_dict()["entries"]

    def casadi_failure(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Error in Function::call for 'solver' (injected)")

    monkeypatch.setattr(loop.cycle.controller.mpc, "solve", casadi_failure)
    plan = loop.step()
    assert plan.state is State.FAULT and plan.decision is None and not _setpoint_writes(plan)
    assert "RuntimeError" in plan.alarms["estimator_failed"]
    assert loop.estimator.to_dict()["entries"] == saved, "rolled back"


def test_an_idle_phase_after_cycles_ran_is_a_fault(model, mpc):
    loop = Loop(model, mpc)
    loop.step()
    scan = loop.plc.snapshot()
    scan["Status.Phase"] = dataclasses.replace(scan["Status.Phase"], value=0)  # a PLC that reset its batch state
    plan = loop.step(scan)
    assert plan.state is State.FAULT and "phase_idle" in plan.alarms and not _setpoint_writes(plan)
