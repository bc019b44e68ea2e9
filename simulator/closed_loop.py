"""Closed-loop batches in-process: a controller drives the simulated PLC over its tag interface.

The loop does what the runtime (:mod:`controller.runtime`) does against a PLC,
minus the network, the modes and the history: at every cycle boundary it scans
the tags through the same data-quality checks, asks the controller, passes the
answer through the safety filter against what the PLC runs, writes it while
remote is enabled, and moves the heartbeat. Over OPC UA or Modbus in lockstep
the runtime scores the same batch the same (``hil_tests/test_runtime.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import structlog

from controller.estimator import ExtendedKalmanEstimator
from controller.nmpc import CycleObservation, NmpcConfig, NmpcController, StateSource
from controller.quality import DataQualityChecker
from controller.safety import filter_setpoints
from plant_models.cho import CultureModel
from plant_models.errors import SetpointRejectedError
from plant_models.parameters import parameter_vector
from simulator.batch import BatchResult, build_simulated_plc, kpis_of
from simulator.config import LoadedSimulation
from simulator.plc import PHASE_RUNNING, SimulatedPlc, TagReading

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


def observe(checker: DataQualityChecker, snapshot: Mapping[str, TagReading]) -> CycleObservation | None:
    """The controller's view of one scan, through the runtime's data-quality checks; None when a critical signal failed."""
    report = checker.check(snapshot)
    if not report.usable:
        log.warning("cycle_skipped", reason="critical signals failed their checks", problems={k: report.problems[k] for k in report.critical})
        return None
    observation = report.observation()
    if observation.lab_result is not None:
        checker.commit_lab(observation.lab_result.seq)
    return observation


def run_controlled_batch(
    loaded: LoadedSimulation,
    *,
    make_source: Callable[[LoadedSimulation, SimulatedPlc, CultureModel], StateSource],
    config: NmpcConfig | None = None,
    progress: Callable[[float], None] | None = None,
    model: CultureModel | None = None,
    snapshot_every_h: float = 72.0,
) -> ControlledBatchResult:
    """One batch with the NMPC in the loop; ``make_source`` chooses the estimator or the truth."""
    model = model or CultureModel()
    plc, truth = build_simulated_plc(loaded, model)
    controller = NmpcController(model, loaded.batch, make_source(loaded, plc, model), config)
    checker = DataQualityChecker()
    sources: dict[str, int] = {}
    predictions: list[tuple[float, float, float]] = []
    snapshots: list[tuple[float, np.ndarray, np.ndarray]] = []
    rate = controller.config.mpc.temperature_rate_max_degc_per_h
    while plc.phase == PHASE_RUNNING:
        observation = observe(checker, plc.snapshot())
        if observation is None:
            plc.write_heartbeat(plc.heartbeat + 1)
            plc.advance_to(plc.next_cycle_boundary_h())
            continue
        decision = controller.cycle(observation)
        sources[decision.source] = sources.get(decision.source, 0) + 1
        predictions.append((observation.process_time_h, decision.harvest_time_h, decision.predicted_titer_g_per_l))
        plan = decision.solution
        if plan is not None and decision.source == "mpc" and observation.process_time_h >= len(snapshots) * snapshot_every_h:
            ends = plan.stage_times_h + np.diff(np.append(plan.stage_times_h, plan.harvest_time_h))
            snapshots.append((observation.process_time_h, np.concatenate([[observation.process_time_h], ends]), plan.states.copy()))
        filtered = filter_setpoints(decision.setpoints, observation.applied, loaded.batch, temperature_rate_degc_per_h=rate, dt_h=loaded.batch.cycle_period_h)
        if filtered.adjustments:
            log.info("setpoints_filtered", process_time_h=observation.process_time_h, adjustments=list(filtered.adjustments))
        plc.write_heartbeat(plc.heartbeat + 1)
        try:
            if filtered.setpoints.harvest:
                plc.request_harvest(True)
                break
            plc.write_setpoints(filtered.setpoints)
        except SetpointRejectedError as error:
            log.warning("setpoint_rejected", process_time_h=observation.process_time_h, tag=error.tag, reason=error.reason)
        plc.advance_to(plc.next_cycle_boundary_h())
        if progress is not None:
            progress(plc.process_time_h)
    trajectory = plc.plant.trajectory()
    batch = BatchResult(
        trajectory=trajectory,
        lab_results=tuple(plc.published),
        kpis=kpis_of(trajectory, loaded.batch),
        harvest_reason=plc.harvest_reason or "",
        true_culture=truth,
    )
    return ControlledBatchResult(
        batch=batch,
        solve_times_s=tuple(controller.solve_times_s),
        decisions_by_source=sources,
        solver_failures=controller.failures_total,
        solver_cold_retries=controller.cold_retries_total,
        harvest_time_predictions=tuple(predictions),
        plan_snapshots=tuple(snapshots),
    )


def oracle_source(loaded: LoadedSimulation, plc: SimulatedPlc, model: CultureModel) -> StateSource:
    """Perfect knowledge: the simulator's true state and parameters (the oracle, an upper bound)."""
    return TruthSource(plc)


def estimator_source(loaded: LoadedSimulation, plc: SimulatedPlc, model: CultureModel) -> StateSource:
    """What a real controller has: the EKF started from the inoculation record with the nominal kinetics."""
    nominal = parameter_vector(loaded.nominal, loaded.batch.media)
    return ExtendedKalmanEstimator.from_batch(model, loaded.batch, nominal)
