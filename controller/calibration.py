"""Calibration: fit the culture model to a site's batch records by dynamic parameter estimation.

All batches are fitted at once. The unknowns are the natural logs of
multipliers of a chosen set of kinetic and measurement parameters (nominal =
0). Each batch is simulated from its inoculation record with the feeds its
totalisers say were delivered and the temperature setpoints applied (RK4 on
the shared CasADi model, one ``mapaccum`` per batch); the residuals are the
lab results at their draw times and the capacitance and OUR probes every few
hours, each divided by its standard deviation. A Levenberg–Marquardt loop on
the CasADi Jacobian minimises them, with a weak Gaussian prior on each log
multiplier so that a parameter the data hardly see cannot run away.

After the fit, the Fisher information ``JᵀJ`` of the data alone (no prior)
gives each parameter's standard error, scaled by the reduced χ² when the fit
is worse than the noise (model error is then part of the uncertainty). A
parameter whose 95 % interval spans more than a factor ``identifiable_max_ratio``
is not identifiable from these data: it is put back to nominal and the rest
refitted. Design and measured performance: ``docs/calibration.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import casadi as ca
import numpy as np
import structlog
from pydantic import Field, field_validator

from controller.estimator import LAB_MEASUREMENTS, ONLINE_MEASUREMENTS
from controller.records import BatchRecord
from controller.types import LAB_FIELDS
from plant_models.cho import OUTPUT_INDEX, STATE_INDEX, CultureModel
from plant_models.config_loading import FrozenConfig
from plant_models.errors import BioreactorMPCError
from plant_models.parameters import (
    PARAMETER_NAMES,
    CultureParameters,
    ModelProvenance,
    ParameterEstimate,
    PhaseEnvelope,
    ValueRange,
    parameter_vector,
    scaled_parameters,
)

log = structlog.get_logger(__name__)

Z95 = 1.959964

DEFAULT_FITTED: tuple[str, ...] = (
    "culture.growth.mu_max_per_h",
    "culture.growth.temperature_curvature_per_degc2",
    "culture.growth.age_half_h",
    "culture.death.kd_min_per_h",
    "culture.death.kd_ammonia_max_per_h",
    "culture.metabolism.yield_cells_per_glucose_1e9_per_g",
    "culture.metabolism.glucose_maintenance_g_per_1e9_cells_h",
    "culture.metabolism.yield_cells_per_glutamine_1e9_per_mmol",
    "culture.metabolism.lactate_yield_from_glucose_g_per_g",
    "culture.metabolism.lactate_uptake_max_g_per_1e9_cells_h",
    "culture.product.q_product_pg_per_cell_day",
    "culture.product.temperature_sensitivity_per_degc",
    "culture.measurement.capacitance_pf_per_cm_per_1e6_cells_ml",
    "culture.measurement.o2_maintenance_mmol_per_1e9_cells_h",
)
"""Parameters fitted by default: the growth, death, metabolism, productivity and probe parameters batch records inform."""

LAB_MODEL: dict[str, tuple[str, str]] = LAB_MEASUREMENTS
"""Lab fields and what the model predicts for them (the estimator's own map)."""
ONLINE_MODEL: dict[str, tuple[str, str]] = {name: ONLINE_MEASUREMENTS[name] for name in ("capacitance_pf_per_cm", "our_mmol_per_l_h")}
"""The probes the fit uses: the ones whose relation to the cells it calibrates."""


class MeasurementSd(FrozenConfig):
    """Standard deviation of one measured quantity in the fit: relative with an absolute floor."""

    relative: float = Field(ge=0.0, le=1.0)
    floor: float = Field(gt=0.0)


DEFAULT_SD: dict[str, MeasurementSd] = {
    "vcd_1e6_per_ml": MeasurementSd(relative=0.08, floor=0.05),
    "viability_pct": MeasurementSd(relative=0.0, floor=2.0),
    "glucose_g_per_l": MeasurementSd(relative=0.05, floor=0.1),
    "lactate_g_per_l": MeasurementSd(relative=0.06, floor=0.05),
    "glutamine_mm": MeasurementSd(relative=0.08, floor=0.2),
    "ammonia_mm": MeasurementSd(relative=0.08, floor=0.2),
    "titer_g_per_l": MeasurementSd(relative=0.05, floor=0.02),
    "osmolality_mosm_per_kg": MeasurementSd(relative=0.02, floor=3.0),
    "capacitance_pf_per_cm": MeasurementSd(relative=0.10, floor=0.1),
    "our_mmol_per_l_h": MeasurementSd(relative=0.15, floor=0.05),
}
"""A little above the assays' and probes' own noise: each residual also carries model error, and the probes' are correlated in time."""


class Phase(FrozenConfig):
    name: str = Field(min_length=1)
    start_h: float = Field(ge=0.0)
    end_h: float = Field(gt=0.0)


class CalibrationSettings(FrozenConfig):
    """What to fit and how."""

    parameters: tuple[str, ...] = Field(default=DEFAULT_FITTED, min_length=1, description="model parameters to fit (PARAMETER_NAMES)")
    prior_log_sd: float = Field(default=0.7, gt=0.0, le=5.0, description="weak prior sd of each ln(multiplier) about nominal [-]")
    log_multiplier_bound: float = Field(default=2.3, gt=0.0, le=5.0, description="multipliers stay within exp(±this) of nominal [-]")
    identifiable_max_ratio: float = Field(default=4.0, gt=1.0, description="a parameter whose 95 % interval spans more than this factor is not identifiable [-]")
    step_h: float = Field(default=1.0, gt=0.0, le=4.0, description="simulation grid of the fit [h]")
    rk4_substeps: int = Field(default=3, ge=1, le=20)
    online_every_h: float = Field(default=6.0, gt=0.0, description="probe values enter the fit this often [h]")
    measurement_sd: dict[str, MeasurementSd] = Field(default_factory=lambda: dict(DEFAULT_SD))
    max_iterations: int = Field(default=40, ge=1, le=500)
    phases: tuple[Phase, ...] = Field(
        default=(Phase(name="growth", start_h=0.0, end_h=96.0), Phase(name="transition", start_h=96.0, end_h=168.0), Phase(name="production", start_h=168.0, end_h=8760.0)),
        description="process phases of the operating envelope",
    )

    @field_validator("parameters")
    @classmethod
    def _known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in names if name not in PARAMETER_NAMES or not name.startswith("culture.")]
        if unknown:
            raise ValueError(f"not culture parameters of the model: {unknown}; names look like 'culture.growth.mu_max_per_h'")
        if len(set(names)) != len(names):
            raise ValueError("a parameter is named twice")
        return names


class CalibrationError(ValueError, BioreactorMPCError):
    """The records cannot be calibrated on (no usable lab results, a batch the model cannot simulate, ...)."""


@dataclass(frozen=True)
class _Observation:
    batch: int
    step: int
    name: str
    value: float
    sd: float


@dataclass(frozen=True)
class BatchFit:
    """One batch: the grid, the delivered inputs, the observations, and the model's trajectories at nominal and fitted parameters."""

    batch_id: str
    time_h: np.ndarray
    inputs: np.ndarray
    observations: dict[str, tuple[np.ndarray, np.ndarray]]
    """Measured quantity → (times, values)."""
    nominal: dict[str, np.ndarray]
    fitted: dict[str, np.ndarray]
    """Model quantity (the lab and probe names) → values on the grid."""


@dataclass(frozen=True)
class CalibrationResult:
    parameters: CultureParameters
    """The calibrated set, with provenance and envelope."""
    estimates: dict[str, ParameterEstimate]
    not_identifiable: tuple[str, ...]
    fit_statistics: dict[str, float]
    batches: tuple[BatchFit, ...]
    cross_validation: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


# --------------------------------------------------------------------------- problem


class _Problem:
    """The residual function r(θ) of all batches, and its Jacobian, as CasADi functions."""

    def __init__(self, records: Sequence[BatchRecord], nominal: CultureParameters, model: CultureModel, settings: CalibrationSettings, fitted: Sequence[str]) -> None:
        self.settings = settings
        self.fitted = tuple(fitted)
        self.records = tuple(records)
        index = [PARAMETER_NAMES.index(name) for name in self.fitted]
        theta = ca.MX.sym("theta", len(self.fitted))
        h = settings.step_h
        step = model.rk4_step(h, settings.rk4_substeps)
        t_sym, x_sym, u_sym, p_sym = ca.SX.sym("t"), ca.SX.sym("x", model.n_states), ca.SX.sym("u", model.n_inputs), ca.SX.sym("p", model.n_parameters)
        t_next, x_next = step(t_sym, x_sym, u_sym, p_sym)
        augmented = ca.Function("step", [ca.vertcat(t_sym, x_sym), u_sym, p_sym], [ca.vertcat(t_next, x_next)])
        residuals: list[ca.MX] = []
        trajectories: list[ca.MX] = []
        self.observations: list[_Observation] = []
        self.grids: list[tuple[np.ndarray, np.ndarray]] = []
        for b, record in enumerate(self.records):
            grid, inputs = delivered_grid(record, h)
            self.grids.append((grid, inputs))
            p_nominal = parameter_vector(nominal, record.batch.media)
            scale = [ca.MX(1.0)] * model.n_parameters
            for k, i in enumerate(index):
                scale[i] = ca.exp(theta[k])
            p = ca.DM(p_nominal) * ca.vertcat(*scale)
            n = len(grid) - 1
            accumulated = augmented.mapaccum(f"batch{b}", n)
            x0 = np.concatenate([[0.0], record.batch.inoculation.initial_state()])
            states = accumulated(x0, ca.DM(inputs[:n].T), ca.repmat(p, 1, n))
            states = ca.horzcat(ca.DM(x0), states)[1:, :]
            outputs = model.outputs.map(n + 1)(ca.DM(grid).T, states, ca.DM(np.vstack([inputs[:n], inputs[n - 1 : n]]).T), ca.repmat(p, 1, n + 1))
            quantities = {name: _quantity(states, outputs, where) for name, where in {**LAB_MODEL, **ONLINE_MODEL}.items()}
            trajectories.append(ca.horzcat(*[quantities[name] for name in (*LAB_MODEL, *ONLINE_MODEL)]))
            for observation in _observations(record, b, grid, settings):
                self.observations.append(observation)
                residuals.append((quantities[observation.name][observation.step] - observation.value) / observation.sd)
        if not residuals:
            raise CalibrationError("the records hold no lab result or probe value to fit to")
        r = ca.vertcat(*residuals)
        self.residual = ca.Function("residuals", [theta], [r])
        self.jacobian = ca.Function("jacobian", [theta], [r, ca.jacobian(r, theta)])
        self.trajectories = ca.Function("trajectories", [theta], trajectories)
        self.n_residuals = r.numel()

    def trajectory(self, theta: np.ndarray, batch: int) -> dict[str, np.ndarray]:
        values = np.asarray(self.trajectories(theta)[batch])
        return {name: values[:, i] for i, name in enumerate((*LAB_MODEL, *ONLINE_MODEL))}


def _quantity(states: ca.MX, outputs: ca.MX, where: tuple[str, str]) -> ca.MX:
    kind, name = where
    return states[STATE_INDEX[name], :].T if kind == "state" else outputs[OUTPUT_INDEX[name], :].T


def delivered_grid(record: BatchRecord, step_h: float) -> tuple[np.ndarray, np.ndarray]:
    """The fit's time grid and the inputs delivered over each step (row k holds over [t_k, t_k+1)).

    Feed rates come from the totalisers where they were recorded (what the
    pumps delivered), else from the setpoints; the temperature is the
    setpoint in force.
    """
    n = max(1, math.ceil(record.end_h / step_h - 1e-9))
    grid = np.arange(n + 1) * step_h
    grid[-1] = min(grid[-1], max(record.end_h, step_h))
    setpoints = record.setpoints.at(grid)
    inputs = setpoints.astype(float).copy()
    online = record.online
    for column, total in ((0, "feed_total_l"), (1, "glucose_feed_total_l")):
        values = online.signal(total)
        good = np.isfinite(values)
        if good.sum() >= 2:
            cumulative = np.interp(grid, online.time_h[good], np.maximum.accumulate(values[good]))
            rates = np.diff(cumulative) / np.diff(grid)
            inputs[:-1, column] = np.maximum(rates, 0.0)
            inputs[-1, column] = inputs[-2, column] if len(inputs) > 1 else inputs[-1, column]
    return grid, inputs


def _observations(record: BatchRecord, batch: int, grid: np.ndarray, settings: CalibrationSettings) -> list[_Observation]:
    sd = settings.measurement_sd
    step_h = settings.step_h
    found: list[_Observation] = []
    for sample in record.lab:
        k = int(round(sample.draw_h / step_h))
        if not 0 <= k < len(grid):
            continue
        for name in LAB_FIELDS:
            value = sample.values.get(name, math.nan)
            if math.isfinite(value) and name in sd:
                found.append(_Observation(batch, k, name, value, max(sd[name].relative * abs(value), sd[name].floor)))
    every = max(1, round(settings.online_every_h / step_h))
    for name in ONLINE_MODEL:
        values = record.online.signal(name)
        good = np.isfinite(values)
        if not good.any() or name not in sd:
            continue
        on_grid = np.interp(grid, record.online.time_h[good], values[good], left=math.nan, right=math.nan)
        for k in range(every, len(grid), every):
            value = float(on_grid[k])
            if math.isfinite(value) and value > 0.0:
                found.append(_Observation(batch, k, name, value, max(sd[name].relative * value, sd[name].floor)))
    return found


# --------------------------------------------------------------------------- the fit


def _levenberg_marquardt(problem: _Problem, theta0: np.ndarray, settings: CalibrationSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Minimise ½|r(θ)|² + ½|θ/σ_prior|² within the bounds; returns θ, r, J and the iterations taken."""
    bound = settings.log_multiplier_bound
    prior = 1.0 / settings.prior_log_sd**2

    def cost(r: np.ndarray, theta: np.ndarray) -> float:
        return 0.5 * float(r @ r) + 0.5 * prior * float(theta @ theta)

    theta = np.clip(theta0, -bound, bound)
    r_dm, j_dm = problem.jacobian(theta)
    r, jacobian = np.asarray(r_dm).ravel(), np.asarray(j_dm)
    current = cost(r, theta)
    damping = 1e-2
    iterations = 0
    for iterations in range(1, settings.max_iterations + 1):  # noqa: B007 (the count is returned)
        hessian = jacobian.T @ jacobian + prior * np.eye(theta.size)
        gradient = jacobian.T @ r + prior * theta
        improved = False
        while damping < 1e8:
            step = -np.linalg.solve(hessian + damping * np.diag(np.diag(hessian)), gradient)
            candidate = np.clip(theta + step, -bound, bound)
            r_candidate = np.asarray(problem.residual(candidate)).ravel()
            candidate_cost = cost(r_candidate, candidate) if np.all(np.isfinite(r_candidate)) else math.inf
            if candidate_cost < current:
                improved = True
                break
            damping *= 4.0
        if not improved:
            break
        relative_change = (current - candidate_cost) / max(current, 1e-12)
        theta, current = candidate, candidate_cost
        damping = max(damping / 3.0, 1e-7)
        r_dm, j_dm = problem.jacobian(theta)
        r, jacobian = np.asarray(r_dm).ravel(), np.asarray(j_dm)
        if relative_change < 1e-7 or float(np.max(np.abs(step))) < 1e-6:
            break
    return theta, r, jacobian, iterations


def _covariance(r: np.ndarray, jacobian: np.ndarray) -> tuple[np.ndarray, float]:
    """Covariance of θ from the data alone (Fisher information JᵀJ), scaled by the reduced χ² when above 1."""
    n, p = jacobian.shape
    reduced_chi2 = float(r @ r) / max(n - p, 1)
    information = jacobian.T @ jacobian
    covariance = np.linalg.pinv(information, rcond=1e-10, hermitian=True)
    return covariance * max(1.0, reduced_chi2), reduced_chi2


def calibrate(
    records: Sequence[BatchRecord],
    nominal: CultureParameters,
    *,
    settings: CalibrationSettings | None = None,
    model: CultureModel | None = None,
    based_on: str = "",
    cross_validate: bool = True,
) -> CalibrationResult:
    """Fit the model to ``records``; parameters the data cannot determine stay nominal. Optionally leave-one-batch-out cross-validation."""
    started = time.perf_counter()
    settings = settings or CalibrationSettings()
    model = model or CultureModel()
    if not records:
        raise CalibrationError("no batch records to calibrate on")
    for record in records:
        if not any(sample.measured("vcd_1e6_per_ml") or sample.measured("titer_g_per_l") for sample in record.lab):
            raise CalibrationError(f"batch {record.batch_id!r}: no lab VCD or titer result; a batch without lab results cannot be calibrated on")
    fitted = list(settings.parameters)
    not_identifiable: list[str] = []
    while True:
        problem = _Problem(records, nominal, model, settings, fitted)
        theta, r, jacobian, iterations = _levenberg_marquardt(problem, np.zeros(len(fitted)), settings)
        covariance, reduced_chi2 = _covariance(r, jacobian)
        sd = np.sqrt(np.maximum(np.diag(covariance), 0.0))
        ratio = np.exp(2.0 * Z95 * sd)
        worst = int(np.argmax(ratio))
        if ratio[worst] <= settings.identifiable_max_ratio or len(fitted) == 1:
            break
        log.info("calibration_not_identifiable", parameter=fitted[worst], ci95_ratio=round(float(ratio[worst]), 2))
        not_identifiable.append(fitted.pop(worst))
    nominal_vector = parameter_vector(nominal, records[0].batch.media)
    estimates: dict[str, ParameterEstimate] = {}
    for k, name in enumerate(fitted):
        base = float(nominal_vector[PARAMETER_NAMES.index(name)])
        estimates[name] = ParameterEstimate(
            nominal=base,
            value=base * math.exp(theta[k]),
            ci95_low=base * math.exp(theta[k] - Z95 * sd[k]),
            ci95_high=base * math.exp(theta[k] + Z95 * sd[k]),
            identifiable=True,
        )
    for name in not_identifiable:
        base = float(nominal_vector[PARAMETER_NAMES.index(name)])
        estimates[name] = ParameterEstimate(nominal=base, value=base, ci95_low=base, ci95_high=base, identifiable=False)
    r0 = np.asarray(problem.residual(np.zeros(len(fitted)))).ravel()
    statistics = {
        "batches": float(len(records)),
        "residuals": float(problem.n_residuals),
        "iterations": float(iterations),
        "reduced_chi2": reduced_chi2,
        "reduced_chi2_nominal": float(r0 @ r0) / max(problem.n_residuals - len(fitted), 1),
        **{f"rel_rmse_{name}": value for name, value in _relative_rmse(problem, theta).items()},
        **{f"rel_rmse_{name}_nominal": value for name, value in _relative_rmse(problem, np.zeros(len(fitted))).items()},
    }
    batches = tuple(
        BatchFit(
            batch_id=record.batch_id,
            time_h=problem.grids[b][0],
            inputs=problem.grids[b][1],
            observations=_observed(problem, b),
            nominal=problem.trajectory(np.zeros(len(fitted)), b),
            fitted=problem.trajectory(theta, b),
        )
        for b, record in enumerate(records)
    )
    cv = _cross_validation(records, nominal, model, settings, fitted, theta) if cross_validate and len(records) >= 3 else {}
    factors = {name.removeprefix("culture."): estimates[name].value / estimates[name].nominal for name in fitted}
    provenance = ModelProvenance(
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        tool="bioreactor-mpc calibrate",
        based_on=based_on,
        inputs=tuple(source for record in records for source in record.sources),
        batches=tuple(record.batch_id for record in records),
        parameters=estimates,
        not_identifiable=tuple(not_identifiable),
        fit_statistics=statistics,
        cross_validation=cv,
    )
    calibrated = scaled_parameters(nominal, factors).model_copy(update={"provenance": provenance, "envelope": operating_envelope(records, settings)})
    wall = time.perf_counter() - started
    log.info("calibrated", batches=len(records), fitted=len(fitted), not_identifiable=len(not_identifiable), reduced_chi2=round(reduced_chi2, 3), wall_s=round(wall, 1))
    return CalibrationResult(
        parameters=calibrated,
        estimates=estimates,
        not_identifiable=tuple(not_identifiable),
        fit_statistics=statistics,
        batches=batches,
        cross_validation=cv,
        wall_s=wall,
    )


def _observed(problem: _Problem, batch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    grid = problem.grids[batch][0]
    by_name: dict[str, list[tuple[float, float]]] = {}
    for o in problem.observations:
        if o.batch == batch:
            by_name.setdefault(o.name, []).append((float(grid[o.step]), o.value))
    return {name: (np.array([t for t, _ in rows]), np.array([v for _, v in rows])) for name, rows in by_name.items()}


def _relative_rmse(problem: _Problem, theta: np.ndarray, batches: Sequence[int] | None = None) -> dict[str, float]:
    """Root-mean-square relative error per lab field (VCD, titer, glucose) over the observations of ``batches``."""
    errors: dict[str, list[float]] = {}
    cache: dict[int, dict[str, np.ndarray]] = {}
    for o in problem.observations:
        if o.name not in ("vcd_1e6_per_ml", "titer_g_per_l", "glucose_g_per_l") or (batches is not None and o.batch not in batches):
            continue
        if o.batch not in cache:
            cache[o.batch] = problem.trajectory(theta, o.batch)
        predicted = cache[o.batch][o.name][o.step]
        # Relative to the value, but not below ten assay floors: early titer near zero would dominate otherwise.
        errors.setdefault(o.name, []).append((predicted - o.value) / max(abs(o.value), 10.0 * problem.settings.measurement_sd[o.name].floor))
    return {name: float(np.sqrt(np.mean(np.square(values)))) for name, values in errors.items()}


def _cross_validation(
    records: Sequence[BatchRecord], nominal: CultureParameters, model: CultureModel, settings: CalibrationSettings, fitted: Sequence[str], theta_all: np.ndarray
) -> dict[str, float]:
    """Leave each batch out, fit on the rest (from the full fit), predict the one left out: relative RMSE, nominal vs calibrated."""
    quick = settings.model_copy(update={"max_iterations": min(settings.max_iterations, 15)})
    calibrated: dict[str, list[float]] = {}
    nominal_errors: dict[str, list[float]] = {}
    full = _Problem(records, nominal, model, settings, fitted)
    for left_out in range(len(records)):
        rest = [record for i, record in enumerate(records) if i != left_out]
        problem = _Problem(rest, nominal, model, quick, fitted)
        theta, *_ = _levenberg_marquardt(problem, theta_all, quick)
        for name, value in _relative_rmse(full, theta, [left_out]).items():
            calibrated.setdefault(name, []).append(value)
        for name, value in _relative_rmse(full, np.zeros(len(fitted)), [left_out]).items():
            nominal_errors.setdefault(name, []).append(value)
    result: dict[str, float] = {}
    for name in calibrated:
        result[f"{name}_calibrated"] = float(np.sqrt(np.mean(np.square(calibrated[name]))))
        result[f"{name}_nominal"] = float(np.sqrt(np.mean(np.square(nominal_errors[name]))))
    return result


# --------------------------------------------------------------------------- the envelope


def operating_envelope(records: Sequence[BatchRecord], settings: CalibrationSettings) -> tuple[PhaseEnvelope, ...]:
    """The temperatures, feed rates per volume and glucose levels the records covered, per process phase."""
    envelope: list[PhaseEnvelope] = []
    for phase in settings.phases:
        temperatures: list[float] = []
        feeds: list[float] = []
        glucose_feeds: list[float] = []
        glucose: list[float] = []
        batches = 0
        for record in records:
            grid, inputs = delivered_grid(record, settings.step_h)
            inside = (grid >= phase.start_h) & (grid < min(phase.end_h, record.end_h))
            if not inside.any():
                continue
            batches += 1
            volume = record.online.signal("volume_l")
            good = np.isfinite(volume)
            volume_on_grid = np.interp(grid, record.online.time_h[good], volume[good]) if good.any() else np.full(grid.shape, record.batch.inoculation.volume_l)
            temperatures.extend(inputs[inside, 2])
            feeds.extend(inputs[inside, 0] * 24.0 / volume_on_grid[inside])
            glucose_feeds.extend(inputs[inside, 1] * 24.0 / volume_on_grid[inside])
            times, values = record.lab_series("glucose_g_per_l")
            glucose.extend(values[(times >= phase.start_h) & (times < phase.end_h)])
        if not batches:
            continue

        def span(values: list[float]) -> ValueRange:
            return ValueRange(low=float(np.min(values)), high=float(np.max(values))) if values else ValueRange(low=0.0, high=0.0)

        envelope.append(
            PhaseEnvelope(
                phase=phase.name,
                start_h=phase.start_h,
                end_h=phase.end_h,
                temperature_degc=span(temperatures),
                feed_per_volume_per_day=span(feeds),
                glucose_feed_per_volume_per_day=span(glucose_feeds),
                glucose_g_per_l=span(glucose) if glucose else ValueRange(low=0.0, high=0.0),
                batches=batches,
            )
        )
    return tuple(envelope)
