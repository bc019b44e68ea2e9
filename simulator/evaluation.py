"""Closed-loop batches with a chosen model, scored for what the controller believed: estimator coverage and harvest-titer prediction.

The controller's kinetics (nominal or calibrated) reach the NMPC through the
estimator, so :func:`estimator_with` is all it takes to run the deployed cycle
with another parameter file. :func:`run_with_coverage` records the
estimator's belief after every cycle and holds it against the plant's
observables (the true VCD, titer, glucose and volume, whatever the plant's
structure) and against each lab result before the estimator has seen it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.estimator import ExtendedKalmanEstimator, LabNoiseSd
from controller.nmpc import StateSource
from plant_models.cho import STATE_INDEX, CultureModel
from plant_models.parameters import CultureParameters, parameter_vector
from simulator.closed_loop import ControlledBatchResult, run_controlled_batch
from simulator.config import LoadedSimulation
from simulator.plc import SimulatedPlc

Z95 = 1.959964
TRUTH_STATES: tuple[str, ...] = ("viable_cells", "titer", "glucose", "volume")
"""Model states held against the plant observable of the same name."""
LAB_CHECKS: dict[str, tuple[str, str, str]] = {
    "viable_cells": ("vcd_1e6_per_ml", "vcd_relative", "vcd_floor_1e6_per_ml"),
    "titer": ("titer_g_per_l", "titer_relative", "titer_floor_g_per_l"),
}
"""Model state → (lab field, relative-noise field, floor field of LabNoiseSd)."""

SourceFactory = Callable[[LoadedSimulation, SimulatedPlc, CultureModel], StateSource]


def estimator_with(kinetics: CultureParameters) -> SourceFactory:
    """The deployed estimator started from the inoculation record with ``kinetics`` (nominal or calibrated)."""

    def make(loaded: LoadedSimulation, plc: SimulatedPlc, model: CultureModel) -> StateSource:
        return ExtendedKalmanEstimator.from_batch(model, loaded.batch, parameter_vector(kinetics, loaded.batch.media))

    return make


def gap_closed(score: float, recipe: float, oracle: float) -> float:
    """(score − recipe) / (oracle − recipe): the share of the perfect-knowledge oracle's gain over the recipe a controller won
    (docs/oracle.md); NaN when the oracle gains nothing over the recipe."""
    span = oracle - recipe
    return (score - recipe) / span if span > 0 else math.nan


@dataclass(frozen=True)
class Coverage:
    """How often the estimator's 95 % band held the truth and the lab results (issue 12's target: ≥ 0.9)."""

    truth: dict[str, float]
    """Model state → fraction of cycles whose band held the plant's true value."""
    truth_z2: dict[str, float]
    lab: dict[str, float]
    """Model state → fraction of lab results inside the predictive band (estimate sd and assay sd together)."""
    lab_z2: dict[str, float]
    lab_count: int


@dataclass(frozen=True)
class EvaluatedBatch:
    result: ControlledBatchResult
    coverage: Coverage
    harvest_titer_error: float
    """Median relative error of the titer predicted at harvest over the cycles of the last three days (NaN when none planned the actual harvest)."""


def run_with_coverage(loaded: LoadedSimulation, kinetics: CultureParameters, **kwargs: Any) -> EvaluatedBatch:
    """One closed-loop batch through the deployed cycle with ``kinetics``, and what its estimator believed."""
    held: dict[str, ExtendedKalmanEstimator] = {}
    make = estimator_with(kinetics)

    def source(loaded_: LoadedSimulation, plc: SimulatedPlc, model: CultureModel) -> StateSource:
        estimator = make(loaded_, plc, model)
        assert isinstance(estimator, ExtendedKalmanEstimator)
        held["estimator"] = estimator
        return estimator

    beliefs: list[tuple[float, np.ndarray, np.ndarray]] = []

    def after_cycle(_: float) -> None:
        estimate = held["estimator"].estimate
        beliefs.append((held["estimator"].process_time_h, np.asarray(estimate.state).copy(), np.asarray(estimate.state_sd).copy()))

    kwargs.setdefault("envelope", kinetics.envelope)
    kwargs.setdefault("fitted", kinetics.calibrated)
    result = run_controlled_batch(loaded, make_source=source, progress=after_cycle, **kwargs)
    return EvaluatedBatch(result=result, coverage=coverage_of(result, beliefs), harvest_titer_error=harvest_titer_error(result))


def coverage_of(result: ControlledBatchResult, beliefs: list[tuple[float, np.ndarray, np.ndarray]]) -> Coverage:
    trajectory = result.batch.trajectory
    truth_z2: dict[str, list[float]] = {state: [] for state in TRUTH_STATES}
    truth = {state: trajectory.observable(state) for state in TRUTH_STATES}
    for t, mean, sd in beliefs:
        row = int(np.argmin(np.abs(trajectory.time_h - t)))
        for state in TRUTH_STATES:
            i = STATE_INDEX[state]
            truth_z2[state].append(((truth[state][row] - mean[i]) / max(sd[i], 1e-12)) ** 2)
    noise = LabNoiseSd()
    times = np.array([t for t, _, _ in beliefs])
    lab_z2: dict[str, list[float]] = {state: [] for state in LAB_CHECKS}
    for lab in result.batch.lab_results:
        k = int(np.searchsorted(times, lab.taken_at_h, side="right")) - 1
        if k < 0:
            continue
        _, mean, sd = beliefs[k]
        for state, (field, relative, floor) in LAB_CHECKS.items():
            value = getattr(lab, field)
            if math.isfinite(value):
                lab_sd = max(getattr(noise, relative) * abs(value), getattr(noise, floor))
                i = STATE_INDEX[state]
                lab_z2[state].append((value - mean[i]) ** 2 / (sd[i] ** 2 + lab_sd**2))

    def inside(values: list[float]) -> float:
        return float(np.mean(np.array(values) <= Z95**2)) if values else math.nan

    def mean_of(values: list[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    return Coverage(
        truth={s: inside(v) for s, v in truth_z2.items()},
        truth_z2={s: mean_of(v) for s, v in truth_z2.items()},
        lab={s: inside(v) for s, v in lab_z2.items()},
        lab_z2={s: mean_of(v) for s, v in lab_z2.items()},
        lab_count=len(result.batch.lab_results),
    )


def harvest_titer_error(result: ControlledBatchResult, last_h: float = 72.0) -> float:
    actual = result.batch.kpis.titer_g_per_l
    harvest_h = result.batch.kpis.harvest_time_h
    errors = [error / actual for t, error in result.harvest_titer_errors() if t >= harvest_h - last_h and actual > 0.0]
    return float(np.median(errors)) if errors else math.nan
