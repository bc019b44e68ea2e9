"""Closed-loop batches in-process: a controller drives the simulated PLC over its tag interface.

The loop does what the runtime will do against a real PLC, minus the network:
at every cycle boundary it scans the tags, keeps only good and finite values,
notices a new lab result by ``Sample.Seq``, asks the controller, passes the
answer through the safety filter, writes it while remote is enabled, and moves
the heartbeat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from controller.estimator import ExtendedKalmanEstimator
from controller.nmpc import CycleObservation, NmpcConfig, NmpcController, StateSource
from controller.safety import filter_setpoints
from controller.types import LAB_FIELDS, LabResult, Setpoints
from plant_models.cho import CultureModel
from plant_models.errors import SetpointRejectedError
from plant_models.parameters import parameter_vector
from simulator.batch import BatchResult, build_simulated_plc, kpis_of
from simulator.config import LoadedSimulation
from simulator.plc import PHASE_RUNNING, SAMPLE_TAGS, SETPOINT_TAGS, SimulatedPlc, TagReading

log = structlog.get_logger(__name__)

ONLINE_SIGNALS = {
    "PV.OUR": "our_mmol_per_l_h",
    "PV.CER": "cer_mmol_per_l_h",
    "PV.Capacitance": "capacitance_pf_per_cm",
    "PV.Volume": "volume_l",
    "PV.Temperature": "temperature_degc",
    "PV.BaseTotal": "base_total_l",
}


@dataclass(frozen=True)
class ControlledBatchResult:
    batch: BatchResult
    solve_times_s: tuple[float, ...]
    decisions_by_source: dict[str, int]
    solver_failures: int
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


def _usable(reading: TagReading) -> bool:
    return reading.good and isinstance(reading.value, int | float) and math.isfinite(float(reading.value))


def observe(snapshot: dict[str, TagReading], last_seq: int) -> CycleObservation:
    """The controller's view of one scan: good, finite values only; a lab result only when ``Sample.Seq`` moved."""
    online = {name: float(snapshot[tag].value) for tag, name in ONLINE_SIGNALS.items() if _usable(snapshot[tag])}
    lab = None
    seq = int(snapshot["Sample.Seq"].value)
    if seq != last_seq and _usable(snapshot["Sample.TakenAt"]):
        values = {name: float(snapshot[tag].value) if snapshot[tag].good else math.nan for tag, name in zip(SAMPLE_TAGS, LAB_FIELDS, strict=True)}
        lab = LabResult(seq=seq, taken_at_h=float(snapshot["Sample.TakenAt"].value), **values)
    applied = Setpoints(*(float(snapshot[tag].value) for tag in SETPOINT_TAGS))
    return CycleObservation(
        process_time_h=float(snapshot["Status.ProcessTime"].value),
        online=online,
        feed_total_l=float(snapshot["PV.FeedTotal"].value),
        glucose_feed_total_l=float(snapshot["PV.GlucoseFeedTotal"].value),
        applied=applied,
        lab_result=lab,
    )


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
    last_seq = 0
    last_applied: Setpoints | None = None
    sources: dict[str, int] = {}
    predictions: list[tuple[float, float, float]] = []
    snapshots: list[tuple[float, np.ndarray, np.ndarray]] = []
    rate = controller.config.mpc.temperature_rate_max_degc_per_h
    while plc.phase == PHASE_RUNNING:
        observation = observe(plc.snapshot(), last_seq)
        if observation.lab_result is not None:
            last_seq = observation.lab_result.seq
        decision = controller.cycle(observation)
        sources[decision.source] = sources.get(decision.source, 0) + 1
        predictions.append((observation.process_time_h, decision.harvest_time_h, decision.predicted_titer_g_per_l))
        plan = decision.solution
        if plan is not None and decision.source == "mpc" and observation.process_time_h >= len(snapshots) * snapshot_every_h:
            ends = plan.stage_times_h + np.diff(np.append(plan.stage_times_h, plan.harvest_time_h))
            snapshots.append((observation.process_time_h, np.concatenate([[observation.process_time_h], ends]), plan.states.copy()))
        applied = last_applied or observation.applied
        filtered = filter_setpoints(decision.setpoints, applied, loaded.batch, temperature_rate_degc_per_h=rate, dt_h=loaded.batch.cycle_period_h)
        if filtered.adjustments:
            log.info("setpoints_filtered", process_time_h=observation.process_time_h, adjustments=list(filtered.adjustments))
        plc.write_heartbeat(plc.heartbeat + 1)
        try:
            if filtered.setpoints.harvest:
                plc.request_harvest(True)
                break
            for tag, value in zip(SETPOINT_TAGS, (filtered.setpoints.feed_rate_lph, filtered.setpoints.glucose_rate_lph, filtered.setpoints.temperature_degc), strict=True):
                plc.write_setpoint(tag, value)
            last_applied = filtered.setpoints
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
