"""Closed-loop batches in-process: the runtime's own control cycle drives the simulated PLC over its tag interface.

At every cycle boundary the loop scans the simulated PLC and hands the scan to
:class:`controller.cycle.ControlCycle`, the very object the runtime drives
beside a real PLC (checks, modes, cross-checks, estimator, NMPC, safety filter,
what to write); it writes what the cycle asks, in its order, and moves the
heartbeat last. Only the network, the history and the audit trail are missing.
Over OPC UA or Modbus in lockstep the runtime scores the same batch the same
(``hil_tests/test_runtime.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from controller.clock import BatchClock, Tick
from controller.cycle import ControlCycle
from controller.estimator import ExtendedKalmanEstimator
from controller.modes import ModeMachine, RequestedMode
from controller.nmpc import CycleObservation, DecisionSource, NmpcConfig, NmpcController, StateSource
from controller.ports import Value
from controller.quality import DataQualityChecker
from controller.records import BatchRecord
from controller.runtime_config import RuntimeSettings
from plant_models.cho import CultureModel
from plant_models.errors import SetpointRejectedError
from plant_models.parameters import PhaseEnvelope, parameter_vector
from simulator.batch import BatchResult, batch_result, build_simulated_plc
from simulator.config import LoadedSimulation
from simulator.plc import PHASE_RUNNING, SimulatedPlc
from simulator.records import Historian

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ControlledBatchResult:
    batch: BatchResult
    solve_times_s: tuple[float, ...]
    decisions_by_source: dict[str, int]
    solver_failures: int
    solver_cold_retries: int
    """Warm solves that failed and were solved again by the cold solver."""
    harvest_time_predictions: tuple[tuple[float, float, float], ...]
    """(process time, planned harvest time, predicted titer at harvest) per cycle."""
    plan_snapshots: tuple[tuple[float, np.ndarray, np.ndarray], ...]
    """(process time the plan was made, stage-end times, predicted states at stage ends) every ``snapshot_every_h``."""
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    """Cycles per runtime state (closed_loop, held while the operator had local control, fault, ...)."""
    record: BatchRecord | None = None
    """The batch as a historian recorded it (with ``record=True``): what the next calibration fits."""
    trust: tuple[tuple[float, dict[str, Any]], ...] = ()
    """(process time, the trust region then: ``TrustRegion.summary``) after every cycle."""

    def harvest_titer_errors(self) -> list[tuple[float, float]]:
        """(process time, predicted − actual titer at harvest, g/L) for cycles that planned the actual harvest time."""
        actual_h = self.batch.kpis.harvest_time_h
        actual_titer = self.batch.kpis.titer_g_per_l
        return [(t, titer - actual_titer) for t, planned_h, titer in self.harvest_time_predictions if abs(planned_h - actual_h) < 0.5 and math.isfinite(titer)]


class TruthSource:
    """The oracle's state source: the simulator's true state and parameters."""

    def __init__(self, plc: SimulatedPlc) -> None:
        self._plc = plc

    def observe(self, observation: CycleObservation) -> tuple[np.ndarray, np.ndarray]:
        return self._plc.plant.state.copy(), self._plc.plant.parameters


def write_group(plc: SimulatedPlc, values: Mapping[str, Value]) -> dict[str, str]:
    """Write one group of signals as a PLC port would (each checked by the PLC, the others still written); the refusals."""
    refusals: dict[str, str] = {}
    for name, value in values.items():
        try:
            plc.write(name, value)
        except SetpointRejectedError as error:
            refusals[name] = error.reason
    return refusals


def run_controlled_batch(
    loaded: LoadedSimulation,
    *,
    make_source: Callable[[LoadedSimulation, SimulatedPlc, CultureModel], StateSource],
    config: NmpcConfig | None = None,
    progress: Callable[[float], None] | None = None,
    model: CultureModel | None = None,
    snapshot_every_h: float = 72.0,
    settings: RuntimeSettings | None = None,
    max_cycles: int | None = None,
    envelope: tuple[PhaseEnvelope, ...] = (),
    fitted: bool = False,
    record: bool = False,
) -> ControlledBatchResult:
    """One batch with the NMPC in the loop through the runtime's own cycle (:class:`~controller.cycle.ControlCycle`); ``make_source`` chooses the estimator or the truth.

    ``envelope``: the calibration envelope of the controller's kinetics (empty: the trust region is the recipe band).
    ``fitted``: the controller's kinetics were calibrated on the plant's records (controller.trust.TrustRegion).
    ``record``: scan the PLC at every cycle as a historian would, and return the batch record.
    """
    model = model or CultureModel()
    settings = settings or RuntimeSettings()
    if config is not None:
        settings = settings.model_copy(update={"nmpc": config})
    plc, truth = build_simulated_plc(loaded, model)
    source = make_source(loaded, plc, model)
    nmpc = settings.nmpc
    if isinstance(source, TruthSource):  # perfect knowledge needs no trust region nor glucose limit: the oracle is the upper bound the controller is measured against
        nmpc = nmpc.model_copy(update={"trust": nmpc.trust.model_copy(update={"enabled": False}), "glucose_feed_headroom_g_per_l_day": None})
    controller = NmpcController(model, loaded.batch, source, nmpc, envelope=envelope, fitted=fitted)
    cycle = ControlCycle(
        batch=loaded.batch,
        settings=settings,
        modes=ModeMachine(RequestedMode.CLOSED_LOOP, max_write_failures=settings.max_write_failures),
        quality=DataQualityChecker(settings.quality),
        estimator=source if isinstance(source, ExtendedKalmanEstimator) else None,
        controller=controller,
        clock=BatchClock(loaded.batch.cycle_period_h),
        heartbeat=plc.heartbeat,
    )
    sources: dict[str, int] = {}
    states: dict[str, int] = {}
    predictions: list[tuple[float, float, float]] = []
    snapshots: list[tuple[float, np.ndarray, np.ndarray]] = []
    trust: list[tuple[float, dict[str, Any]]] = []
    historian = Historian() if record else None
    cycles = 0
    while plc.phase == PHASE_RUNNING and (max_cycles is None or cycles < max_cycles):
        cycles += 1
        readings = plc.snapshot()
        if historian is not None:
            historian.scan(plc, readings)
        verdict = cycle.clock_verdict(readings, wall_s=plc.process_time_h * 3600.0)
        if verdict.tick is Tick.WAIT:
            plc.advance_to(plc.next_cycle_boundary_h())
            continue
        plan = cycle.decide(readings, verdict)
        written = failed = False
        for group in plan.writes:
            refusals = write_group(plc, group.values)
            if refusals:
                log.warning("write_refused", process_time_h=plan.process_time_h, refusals=refusals)
            if group.setpoints:
                written, failed = not refusals, bool(refusals)
            if refusals:
                break
        outcome = cycle.conclude(plan, setpoints_written=written, setpoint_write_failed=failed)
        trust.append((plan.process_time_h, dict(outcome.record.trust)))
        states[plan.state.value] = states.get(plan.state.value, 0) + 1
        decision = plan.decision
        if decision is not None:
            sources[decision.source.value] = sources.get(decision.source.value, 0) + 1
            predictions.append((plan.process_time_h, decision.harvest_time_h, decision.predicted_titer_g_per_l))
            solution = decision.solution
            if solution is not None and decision.source is DecisionSource.MPC and plan.process_time_h >= len(snapshots) * snapshot_every_h:
                ends = solution.stage_times_h + np.diff(np.append(solution.stage_times_h, solution.harvest_time_h))
                snapshots.append((plan.process_time_h, np.concatenate([[plan.process_time_h], ends]), solution.states.copy()))
        else:
            sources[DecisionSource.NONE.value] = sources.get(DecisionSource.NONE.value, 0) + 1
        if plc.phase != PHASE_RUNNING:
            break
        if outcome.beat:
            value = cycle.next_heartbeat()
            plc.write_heartbeat(value)
            cycle.heartbeat_written(value)
        plc.advance_to(plc.next_cycle_boundary_h())
        if progress is not None:
            progress(plc.process_time_h)
    batch = batch_result(plc, truth, loaded.batch)
    return ControlledBatchResult(
        batch=batch,
        solve_times_s=tuple(controller.solve_times_s),
        decisions_by_source=sources,
        solver_failures=controller.failures_total,
        solver_cold_retries=controller.cold_retries_total,
        harvest_time_predictions=tuple(predictions),
        plan_snapshots=tuple(snapshots),
        states=states,
        record=historian.record(loaded, plc) if historian is not None and historian.time_h else None,
        trust=tuple(trust),
    )


def oracle_source(loaded: LoadedSimulation, plc: SimulatedPlc, model: CultureModel) -> StateSource:
    """Perfect knowledge: the simulator's true state and parameters (the oracle, an upper bound)."""
    return TruthSource(plc)


def estimator_source(loaded: LoadedSimulation, plc: SimulatedPlc, model: CultureModel) -> StateSource:
    """What a real controller has: the EKF started from the inoculation record with the nominal kinetics."""
    nominal = parameter_vector(loaded.nominal, loaded.batch.media)
    return ExtendedKalmanEstimator.from_batch(model, loaded.batch, nominal)
