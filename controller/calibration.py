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

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import casadi as ca
import numpy as np
import structlog
from pydantic import Field, field_validator

from controller.estimator import LAB_MEASUREMENTS, ONLINE_MEASUREMENTS
from controller.records import BatchRecord
from controller.types import LAB_FIELDS
from controller.version import tool_version
from plant_models.cho import OUTPUT_INDEX, STATE_INDEX, CultureModel
from plant_models.config_loading import FrozenConfig
from plant_models.errors import BioreactorMPCError
from plant_models.parameters import (
    PARAMETER_NAMES,
    TEMPERATURE_SENSITIVITY_SUFFIX,
    CorrectionParameters,
    CultureParameters,
    ModelProvenance,
    ParameterEstimate,
    PhaseEnvelope,
    ValueRange,
    is_additive,
    parameter_bounds,
    parameter_vector,
    replaced_parameters,
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

WITH_CORRECTIONS: tuple[str, ...] = (
    *(name for name in DEFAULT_FITTED if name not in ("culture.growth.temperature_curvature_per_degc2", "culture.product.temperature_sensitivity_per_degc")),
    *(f"culture.correction.{name}" for name in CorrectionParameters.model_fields),
)
"""The opt-in set with the model's corrections (``configs/calibration/corrections.yaml``; docs/calibration.md §2b). It leaves out
the growth's temperature curvature and the productivity's temperature sensitivity: the corrections' temperature terms are the
same functions of ΔT (exactly confounded with them) and may take either sign. Not the default: measured, the corrections fit
the titer far better and predict the glucose of batches left out worse, and the NMPC they keep in charge longer starved a
culture (docs/calibration.md §2b)."""

ADDITIVE_SCALES: dict[str, float] = {"_temperature_per_degc": 0.2, TEMPERATURE_SENSITIVITY_SUFFIX: 0.2, "_temperature2_per_degc2": 0.02, "_age": 0.5}
"""The parameters fitted additively (:func:`~plant_models.parameters.is_additive`): value = nominal + θ · scale, with the
scale by the kind of term (a temperature slope or sensitivity of 0.2/°C is a factor 2 over 3.5 °C; an age slope of 0.5 a
factor 1.6 over a week). The corrections (``culture.correction.*``) are zero in the mechanistic model and may take either
sign; a temperature sensitivity may reach zero ("no effect") and, where its schema allows, the other sign. Every other
parameter is a multiplier exp(θ) of its nominal. Either way θ has the same prior, bound and identifiability rule."""


def _values(base: np.ndarray, scale: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The parameter values at θ: nominal + θ · scale where the scale is positive (fitted additively), else nominal · exp(θ)."""
    return np.where(scale > 0.0, base + theta * scale, base * np.exp(theta))


def additive_scale(name: str) -> float:
    """θ's scale of an additively fitted parameter; 0 for a parameter fitted as a multiplier."""
    if not is_additive(name):
        return 0.0
    return next(scale for suffix, scale in ADDITIVE_SCALES.items() if name.endswith(suffix))


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

    @field_validator("measurement_sd", mode="before")
    @classmethod
    def _merge_defaults(cls, value: Any) -> Any:
        """A settings file names the quantities it changes; the others keep their defaults."""
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(DEFAULT_SD))
            if unknown:
                raise ValueError(f"unknown measured quantities {unknown}; expected some of {', '.join(DEFAULT_SD)}")
            return {**DEFAULT_SD, **value}
        return value

    @field_validator("phases")
    @classmethod
    def _ordered_phases(cls, phases: tuple[Phase, ...]) -> tuple[Phase, ...]:
        for phase in phases:
            if phase.end_h <= phase.start_h:
                raise ValueError(f"phase {phase.name!r}: end_h ({phase.end_h}) must be after start_h ({phase.start_h})")
        return phases

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
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- problem


QUANTITIES: tuple[str, ...] = (*LAB_MODEL, *ONLINE_MODEL)
"""What the fit compares with the records, in the order of the model's quantity vector."""


class _Problem:
    """The weighted residuals r(θ) of all batches and their Jacobian, by forward sensitivities.

    Each batch is one ``mapaccum`` of an SX step that carries the state and its
    sensitivity to θ, ``S ← F_x S + F_p ∂p/∂θ``: the exact Jacobian of the RK4
    discretisation at the cost of a few extra matrix products per step (an MX
    Jacobian of the unrolled batch was 30× slower than the residual).
    """

    def __init__(self, records: Sequence[BatchRecord], nominal: CultureParameters, model: CultureModel, settings: CalibrationSettings, fitted: Sequence[str]) -> None:
        self.settings = settings
        self.fitted = tuple(fitted)
        self.records = tuple(records)
        self._index = np.array([PARAMETER_NAMES.index(name) for name in self.fitted], dtype=int)
        self._scale = np.array([additive_scale(name) for name in self.fitted])
        self.nominal_values = parameter_vector(nominal, records[0].batch.media)[self._index]
        """The fitted parameters' nominal values (culture parameters: the same in every batch)."""
        self.lower, self.upper = _theta_bounds(self.fitted, self.nominal_values, self._scale, settings.log_multiplier_bound)
        n_x, n_u, n_p, n_theta = model.n_states, model.n_inputs, model.n_parameters, len(self.fitted)
        self._n_x, self._n_theta = n_x, n_theta
        t, x, u, p = ca.SX.sym("t"), ca.SX.sym("x", n_x), ca.SX.sym("u", n_u), ca.SX.sym("p", n_p)
        sensitivity = ca.SX.sym("S", n_x, n_theta)
        dp = ca.SX.sym("dp", n_p, n_theta)
        t_next, x_next = model.rk4(t, x, u, p, settings.step_h, settings.rk4_substeps)
        s_next = ca.jtimes(x_next, ca.vertcat(x, p), ca.vertcat(sensitivity, dp))
        self._step = ca.Function("step", [ca.vertcat(t, x), u, p], [ca.vertcat(t_next, x_next)])
        self._step_sensitivity = ca.Function("step_sensitivity", [ca.vertcat(t, x, ca.vec(sensitivity)), u, p, ca.vec(dp)], [ca.vertcat(t_next, x_next, ca.vec(s_next))])
        y = model.outputs(t, x, u, p)
        quantity = ca.vertcat(*[x[STATE_INDEX[name]] if kind == "state" else y[OUTPUT_INDEX[name]] for kind, name in (LAB_MODEL | ONLINE_MODEL).values()])
        d_quantity = ca.jtimes(quantity, ca.vertcat(x, p), ca.vertcat(sensitivity, dp))
        self._quantity = ca.Function("quantity", [t, x, u, p], [quantity])
        self._quantity_sensitivity = ca.Function("quantity_sensitivity", [t, x, ca.vec(sensitivity), u, p, ca.vec(dp)], [quantity, ca.vec(d_quantity)])
        self._maps: dict[tuple[str, int], ca.Function] = {}
        self.observations: list[_Observation] = []
        self.grids: list[tuple[np.ndarray, np.ndarray]] = []
        self._nominal: list[np.ndarray] = []
        self._x0: list[np.ndarray] = []
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        """Per batch: observation steps, quantity rows, values, standard deviations."""
        for b, record in enumerate(self.records):
            grid, inputs = delivered_grid(record, settings.step_h)
            self.grids.append((grid, inputs))
            self._nominal.append(parameter_vector(nominal, record.batch.media))
            self._x0.append(record.batch.inoculation.initial_state())
            found = _observations(record, b, grid, settings)
            self.observations += found
            self._rows.append(
                (
                    np.array([o.step for o in found], dtype=int),
                    np.array([QUANTITIES.index(o.name) for o in found], dtype=int),
                    np.array([o.value for o in found]),
                    np.array([o.sd for o in found]),
                )
            )
        self.n_residuals = len(self.observations)
        if not self.n_residuals:
            raise CalibrationError("the records hold no lab result or probe value to fit to")

    def _mapped(self, kind: str, n: int) -> ca.Function:
        key = (kind, n)
        if key not in self._maps:
            functions = {
                "step": lambda: self._step.mapaccum(n),
                "step_sensitivity": lambda: self._step_sensitivity.mapaccum(n),
                "quantity": lambda: self._quantity.map(n),
                "quantity_sensitivity": lambda: self._quantity_sensitivity.map(n),
            }
            self._maps[key] = functions[kind]()
        return self._maps[key]

    def _parameters(self, b: int, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batch's parameter vector at θ and ∂p/∂θ."""
        p = self._nominal[b].copy()
        fitted = self.values(theta)
        p[self._index] = fitted
        dp = np.zeros((p.size, theta.size))
        dp[self._index, np.arange(theta.size)] = np.where(self._scale > 0.0, self._scale, fitted)
        return p, dp

    def values(self, theta: np.ndarray) -> np.ndarray:
        """The fitted parameters' values at θ."""
        return _values(self.nominal_values, self._scale, theta)

    def _simulate(self, b: int, theta: np.ndarray, *, sensitivities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Quantities on the grid (n+1 × quantities) and, with ``sensitivities``, their Jacobian (n+1 × quantities × θ)."""
        grid, inputs = self.grids[b]
        n = len(grid) - 1
        p, dp = self._parameters(b, theta)
        u_steps = inputs[:n].T
        u_points = np.vstack([inputs[:n], inputs[n - 1 : n]]).T
        p_steps = np.tile(p[:, None], (1, n + 1))
        n_x, n_theta = self._n_x, self._n_theta
        if not sensitivities:
            start = np.concatenate([[0.0], self._x0[b]])
            states = np.hstack([start[:, None], np.asarray(self._mapped("step", n)(start, u_steps, p_steps[:, :n]))])[1:]
            return np.asarray(self._mapped("quantity", n + 1)(grid[None, :], states, u_points, p_steps)).T, None
        start = np.concatenate([[0.0], self._x0[b], np.zeros(n_x * n_theta)])
        dp_steps = np.tile(dp.reshape(-1, order="F")[:, None], (1, n + 1))
        augmented = np.hstack([start[:, None], np.asarray(self._mapped("step_sensitivity", n)(start, u_steps, p_steps[:, :n], dp_steps[:, :n]))])
        states, sens = augmented[1 : 1 + n_x], augmented[1 + n_x :]
        quantity, d_quantity = self._mapped("quantity_sensitivity", n + 1)(grid[None, :], states, sens, u_points, p_steps, dp_steps)
        jacobian = np.asarray(d_quantity).T.reshape(n + 1, n_theta, len(QUANTITIES)).transpose(0, 2, 1)
        return np.asarray(quantity).T, jacobian

    def residual(self, theta: np.ndarray) -> np.ndarray:
        parts = []
        for b, (steps, rows, values, sd) in enumerate(self._rows):
            quantities, _ = self._simulate(b, theta, sensitivities=False)
            parts.append((quantities[steps, rows] - values) / sd)
        return np.concatenate(parts)

    def jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        residuals, jacobians = [], []
        for b, (steps, rows, values, sd) in enumerate(self._rows):
            quantities, d_quantities = self._simulate(b, theta, sensitivities=True)
            assert d_quantities is not None
            residuals.append((quantities[steps, rows] - values) / sd)
            jacobians.append(d_quantities[steps, rows, :] / sd[:, None])
        return np.concatenate(residuals), np.vstack(jacobians)

    def trajectory(self, theta: np.ndarray, batch: int) -> dict[str, np.ndarray]:
        quantities, _ = self._simulate(batch, theta, sensitivities=False)
        return {name: quantities[:, i] for i, name in enumerate(QUANTITIES)}


def _theta_bounds(fitted: Sequence[str], base: np.ndarray, scale: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """θ's range: ±``bound``, narrowed so that no fitted value leaves the range its schema allows (a lactate yield above 1 g/g is not a fit)."""
    lower, upper = np.full(len(fitted), -bound), np.full(len(fitted), bound)
    for k, name in enumerate(fitted):
        low, high = parameter_bounds(name)
        if scale[k] > 0.0:
            lower[k], upper[k] = max(lower[k], (low - base[k]) / scale[k]), min(upper[k], (high - base[k]) / scale[k])
        elif base[k] > 0.0:
            lower[k] = max(lower[k], math.log(low) - math.log(base[k])) if low > 0.0 else lower[k]
            upper[k] = min(upper[k], math.log(high) - math.log(base[k])) if math.isfinite(high) else upper[k]
    return lower, upper


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
            cumulative = np.interp(grid, online.time_h[good], continued_total(values[good], record.batch_id, total))
            rates = np.diff(cumulative) / np.diff(grid)
            inputs[:-1, column] = np.maximum(rates, 0.0)
            inputs[-1, column] = inputs[-2, column] if len(inputs) > 1 else inputs[-1, column]
    return grid, inputs


TOTALISER_RESET_L = 1.0
"""A totaliser that falls by more than this was reset (a fall below it is rounding or noise, held flat)."""


def continued_total(values: np.ndarray, batch_id: str, name: str) -> np.ndarray:
    """A totaliser's readings made continuous: after a reset, the count goes on from where it was (the delivery between the two readings is lost)."""
    steps = np.diff(values)
    resets = np.flatnonzero(steps < -TOTALISER_RESET_L)
    if resets.size:
        log.warning("totaliser_reset", batch_id=batch_id, signal=name, resets=int(resets.size), first_drop_l=round(float(-steps[resets[0]]), 3))
    # After a reset the next reading counts from about zero: continue from the last count before it.
    offsets = np.zeros_like(values)
    for index in resets:
        offsets[index + 1 :] += values[index]
    return np.maximum.accumulate(values + offsets)


PROBE_NEAREST_H = 1.0
"""A probe value enters the fit at a grid point only if a Good reading lies within this of it: nothing is made up across a gap."""


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
        times = record.online.time_h[good]
        for k in range(every, len(grid), every):
            nearest = int(np.argmin(np.abs(times - grid[k])))
            if abs(times[nearest] - grid[k]) > PROBE_NEAREST_H:
                continue
            value = float(values[good][nearest])
            if value > 0.0:
                found.append(_Observation(batch, k, name, value, max(sd[name].relative * value, sd[name].floor)))
    return found


# --------------------------------------------------------------------------- the fit


STEP_OF_SD = 0.05
"""The fit has converged when the undamped Gauss-Newton step from the current point moves no parameter by more than this fraction of its standard error."""


def _levenberg_marquardt(problem: _Problem, theta0: np.ndarray, settings: CalibrationSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """Minimise ½|r(θ)|² + ½|θ/σ_prior|² within the bounds; returns θ, r, J, the iterations taken and whether it converged.

    Converged: a stopping rule below held, or no step lowers the cost (a minimum within the bounds); not converged:
    ``max_iterations`` ran out first.
    """
    prior = 1.0 / settings.prior_log_sd**2

    def cost(r: np.ndarray, theta: np.ndarray) -> float:
        return 0.5 * float(r @ r) + 0.5 * prior * float(theta @ theta)

    def normal_equations(theta: np.ndarray, r: np.ndarray, jacobian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The Gauss-Newton Hessian and the gradient of the cost at θ."""
        return jacobian.T @ jacobian + prior * np.eye(theta.size), jacobian.T @ r + prior * theta

    def gauss_newton(theta: np.ndarray, hessian: np.ndarray, gradient: np.ndarray, damping: float) -> np.ndarray:
        """The (damped) Gauss-Newton step of the parameters not held on a bound; 0 for those held.

        A parameter on its bound whose gradient pushes it further out is held there, and the others are stepped with it
        fixed: the step of all of them, clipped afterwards, moves a correlated neighbour as if the held one were moving too,
        and the fit crawls along the bound until its iterations run out (a sensitivity held at −0.325: 40 iterations).
        """
        held = ((theta <= problem.lower) & (gradient > 0.0)) | ((theta >= problem.upper) & (gradient < 0.0))
        free = ~held
        step = np.zeros(theta.size)
        reduced = hessian[np.ix_(free, free)]
        step[free] = -np.linalg.solve(reduced + damping * np.diag(np.diag(reduced)), gradient[free])
        return step

    theta = np.clip(theta0, problem.lower, problem.upper)
    r, jacobian = problem.jacobian(theta)
    hessian, gradient = normal_equations(theta, r, jacobian)
    current = cost(r, theta)
    damping = 1e-2
    iterations = 0
    converged = False
    for iterations in range(1, settings.max_iterations + 1):  # noqa: B007 (the count is returned)
        improved = False
        while damping < 1e8:
            step = gauss_newton(theta, hessian, gradient, damping)
            candidate = np.clip(theta + step, problem.lower, problem.upper)
            r_candidate = problem.residual(candidate)
            candidate_cost = cost(r_candidate, candidate) if np.all(np.isfinite(r_candidate)) else math.inf
            if candidate_cost < current:
                improved = True
                break
            damping *= 4.0
        if not improved:
            converged = True
            break
        current_change = current - candidate_cost
        relative_change = current_change / max(current, 1e-12)
        theta, current = candidate, candidate_cost
        damping = max(damping / 3.0, 1e-7)
        r, jacobian = problem.jacobian(theta)
        hessian, gradient = normal_equations(theta, r, jacobian)
        # Converged when the parameters have no further to go than a small fraction of their standard errors: the undamped
        # Gauss-Newton step from here (within the bounds) moves none by more than STEP_OF_SD of its sd. (A damped step can
        # be small while the optimum is still far; with two dozen correlated unknowns LM otherwise crawls along a valley
        # a hundredth of a standard error per iteration, 40 iterations at 2-4 s each.) Or the cost fell by less than a
        # hundredth of a unit of ½χ², or by a millionth of itself.
        newton = np.clip(theta + gauss_newton(theta, hessian, gradient, 0.0), problem.lower, problem.upper) - theta
        sd = np.sqrt(np.maximum(np.diag(_covariance(r, jacobian)[0]), 1e-300))
        if current_change < 1e-2 or relative_change < 1e-6 or float(np.max(np.abs(step))) < 1e-6 or float(np.max(np.abs(newton) / sd)) < STEP_OF_SD:
            converged = True
            break
    return theta, r, jacobian, iterations, converged


def _covariance(r: np.ndarray, jacobian: np.ndarray) -> tuple[np.ndarray, float]:
    """Covariance of θ from the data alone (Fisher information JᵀJ), scaled by the reduced χ² when above 1."""
    n, p = jacobian.shape
    reduced_chi2 = float(r @ r) / max(n - p, 1)
    information = jacobian.T @ jacobian
    # A direction the data do not inform has (almost) no information and must get a huge variance, not the zero a
    # pseudo-inverse gives it: a tiny ridge (relative to the best-informed direction) keeps the inverse honest.
    ridge = 1e-10 * max(float(np.max(np.diag(information))), 1e-12)
    covariance = np.linalg.inv(information + ridge * np.eye(p))
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
    check_records(records)
    fitted = list(settings.parameters)
    not_identifiable: list[str] = []
    rejected: dict[str, tuple[float, bool]] = {}
    """A parameter put back to nominal → how much worse the fit became for it (χ², scaled by the reduced χ² before), and
    whether both fits compared converged."""
    dropped: tuple[str, float, float, bool] | None = None
    start = np.zeros(len(fitted))
    while True:
        problem = _Problem(records, nominal, model, settings, fitted)
        theta, r, jacobian, iterations, converged = _levenberg_marquardt(problem, start, settings)
        if dropped is not None:
            name, chi2_fitted, scale, converged_before = dropped
            rejected[name] = ((float(r @ r) - chi2_fitted) / scale, converged_before and converged)
        covariance, reduced_chi2 = _covariance(r, jacobian)
        sd = np.sqrt(np.maximum(np.diag(covariance), 0.0))
        ratio = np.exp(np.minimum(2.0 * Z95 * sd, 700.0))  # the span of the 95 % interval as a factor (capped: no information at all is "infinite")
        worst = int(np.argmax(ratio))
        if ratio[worst] <= settings.identifiable_max_ratio or len(fitted) == 1:
            break
        log.info("calibration_not_identifiable", parameter=fitted[worst], ci95_ratio=round(float(ratio[worst]), 2))
        dropped = (fitted[worst], float(r @ r), max(1.0, reduced_chi2), converged)
        not_identifiable.append(fitted.pop(worst))
        start = np.delete(theta, worst)  # the others refitted from where they were
    nominal_vector = parameter_vector(nominal, records[0].batch.media)
    estimates: dict[str, ParameterEstimate] = {}
    values, ci95_low, ci95_high = problem.values(theta), problem.values(theta - Z95 * sd), problem.values(theta + Z95 * sd)
    for k, name in enumerate(fitted):
        # θ is bounded to the schema's range (exp and log may round a hair outside); so is the interval: a sensitivity fitted
        # to its bound of 0 has a symmetric interval about 0 in θ, and only the half the schema allows is a value.
        low, high = parameter_bounds(name)
        estimates[name] = ParameterEstimate(
            nominal=float(problem.nominal_values[k]),
            value=min(max(float(values[k]), low), high),
            ci95_low=min(max(float(ci95_low[k]), low), high),
            ci95_high=min(max(float(ci95_high[k]), low), high),
            identifiable=True,
        )
    for name in not_identifiable:
        base = float(nominal_vector[PARAMETER_NAMES.index(name)])
        estimates[name] = ParameterEstimate(nominal=base, value=base, ci95_low=None, ci95_high=None, identifiable=False)
    r0 = problem.residual(np.zeros(len(fitted)))
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
    cv = _cross_validation(records, nominal, model, settings, fitted) if cross_validate and len(records) >= 3 else {}
    per_batch = _batch_statistics(problem, theta)
    at_edge = {name: float(values[k]) for k, name in enumerate(fitted) if theta[k] <= problem.lower[k] + 1e-9 or theta[k] >= problem.upper[k] - 1e-9}
    undetermined = {
        name: (estimate.value, estimate.ci95_low, estimate.ci95_high)
        for name, estimate in estimates.items()
        if name.endswith(TEMPERATURE_SENSITIVITY_SUFFIX)
        and name not in at_edge  # the edge warning already says its interval is not a 95 % interval
        and estimate.ci95_low is not None
        and estimate.ci95_high is not None
        and estimate.ci95_low <= 0.0 <= estimate.ci95_high
    }
    fit = FitOutcome(converged=converged, max_iterations=settings.max_iterations, at_edge=at_edge, rejected_nominals=rejected, effect_undetermined=undetermined)
    warnings = review_warnings(records, statistics, per_batch, cv, cross_validate=cross_validate, fit=fit)
    for warning in warnings:
        log.warning("calibration_review", warning=warning)
    provenance = ModelProvenance(
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        tool="bioreactor-mpc calibrate",
        tool_version=tool_version(),
        based_on=based_on,
        inputs=tuple(source for record in records for source in record.sources),
        batches=tuple(record.batch_id for record in records),
        parameters=estimates,
        not_identifiable=tuple(not_identifiable),
        fit_statistics=statistics,
        cross_validation=cv,
        batch_statistics=per_batch,
        warnings=tuple(warnings),
        settings=settings.model_dump(mode="json"),
    )
    calibrated = replaced_parameters(nominal, {name.removeprefix("culture."): estimates[name].value for name in fitted}).model_copy(
        update={"provenance": provenance, "envelope": operating_envelope(records, settings)}
    )
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
        warnings=tuple(warnings),
    )


REFERENCE_QUANTITIES: tuple[str, ...] = ("vcd_1e6_per_ml", "titer_g_per_l", "glucose_g_per_l")
INOCULATION_VOLUME_TOLERANCE = 0.05
"""The batch file's inoculation volume and the first online volume may differ by this fraction."""


def _where(record: BatchRecord) -> str:
    return f"batch {record.batch_id!r}" + (f" ({record.sources[0][0]})" if record.sources else "")


def check_records(records: Sequence[BatchRecord]) -> None:
    """Refuse records the fit cannot use or would be misled by, naming the batch and its file.

    A batch without a lab VCD or titer; the same lab draw twice; two batches
    with identical data (one batch given twice under two names); a batch file
    whose inoculation volume disagrees with the online volume at the start, or
    whose inoculation VCD or viability disagrees with a lab sample drawn in the
    first two hours.
    """
    if not records:
        raise CalibrationError("no batch records to calibrate on")
    seen: dict[str, str] = {}
    for record in records:
        where = _where(record)
        if not any(sample.measured("vcd_1e6_per_ml") or sample.measured("titer_g_per_l") for sample in record.lab):
            raise CalibrationError(f"{where}: no lab VCD or titer result; a batch without lab results cannot be calibrated on")
        draws = [sample.draw_h for sample in record.lab]
        repeated = sorted({t for t in draws if draws.count(t) > 1})
        if repeated:
            raise CalibrationError(f"{where}: lab samples drawn at the same time twice ({', '.join(f'{t:g} h' for t in repeated)}): a duplicated row counts twice in the fit")
        digest = hashlib.sha256(record.online.time_h.tobytes() + b"".join(np.nan_to_num(v).tobytes() for v in record.online.values.values())).hexdigest()
        if digest in seen:
            raise CalibrationError(f"{where} holds the same online data as batch {seen[digest]!r}: one batch given twice would count twice in the fit")
        seen[digest] = record.batch_id
        inoculation = record.batch.inoculation
        volume = record.online.signal("volume_l")
        good = np.flatnonzero(np.isfinite(volume))
        if good.size and record.online.time_h[good[0]] <= 1.0:
            first = float(volume[good[0]])
            if abs(first - inoculation.volume_l) > INOCULATION_VOLUME_TOLERANCE * inoculation.volume_l:
                raise CalibrationError(
                    f"{where}: the batch file's inoculation.volume_l is {inoculation.volume_l:g} L but the online volume at "
                    f"{record.online.time_h[good[0]]:g} h reads {first:g} L: correct the batch file (the fit starts from it)"
                )
        for sample in record.lab:
            if sample.draw_h > 2.0:
                break
            vcd, viability = sample.values.get("vcd_1e6_per_ml", math.nan), sample.values.get("viability_pct", math.nan)
            if math.isfinite(vcd) and vcd > 0.0 and not 0.5 <= inoculation.viable_cell_density_1e6_per_ml / vcd <= 2.0:
                raise CalibrationError(
                    f"{where}: the batch file's inoculation.viable_cell_density_1e6_per_ml is {inoculation.viable_cell_density_1e6_per_ml:g} "
                    f"but the lab measured {vcd:g} at {sample.draw_h:g} h: correct the batch file (the fit starts from it)"
                )
            if math.isfinite(viability) and abs(inoculation.viability_pct - viability) > 20.0:
                raise CalibrationError(
                    f"{where}: the batch file's inoculation.viability_pct is {inoculation.viability_pct:g} % but the lab measured {viability:g} % "
                    f"at {sample.draw_h:g} h (a fraction written where a percentage belongs?): correct the batch file"
                )


def _batch_statistics(problem: _Problem, theta: np.ndarray) -> dict[str, dict[str, float]]:
    """Per batch: the reduced χ² of its residuals and the relative RMSE of VCD, titer and glucose at the fitted parameters."""
    r = problem.residual(theta)
    owners = np.array([o.batch for o in problem.observations])
    result: dict[str, dict[str, float]] = {}
    for b, record in enumerate(problem.records):
        mine = r[owners == b]
        row = {"reduced_chi2": float(mine @ mine) / max(mine.size, 1)}
        row.update({f"rel_rmse_{name}": value for name, value in _relative_rmse(problem, theta, [b]).items()})
        result[record.batch_id] = row
    return result


CHI2_1_DOF_95 = 3.841
"""The 95 % point of χ² with one degree of freedom: a fit this much worse with one parameter held is a significant loss."""


@dataclass(frozen=True)
class FitOutcome:
    """How the fit ended, for the review: whether it converged, the parameters it left at the edge of their range, and
    the nominals put back as not identifiable that the records reject."""

    converged: bool = True
    max_iterations: int = 0
    at_edge: Mapping[str, float] = field(default_factory=dict)
    """Fitted parameters whose θ ended on its bound (±``log_multiplier_bound`` or the schema's range) → their value."""
    rejected_nominals: Mapping[str, tuple[float, bool]] = field(default_factory=dict)
    """Parameters put back to nominal → (how much worse the refit without them is, χ² scaled by the reduced χ²; whether both
    fits compared converged). Above the 95 % point the records *reject* the nominal they keep: the interval was wide because
    the value they ask for lies at the edge of what the fit allows, not because they say nothing."""
    effect_undetermined: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    """Temperature sensitivities fitted identifiably whose 95 % interval holds 0 → (value, low, high): the records do not say
    whether the temperature acts on that rate at all, nor, where the schema allows either sign, which way."""


def review_warnings(
    records: Sequence[BatchRecord],
    statistics: Mapping[str, float],
    per_batch: Mapping[str, Mapping[str, float]],
    cv: Mapping[str, float],
    *,
    cross_validate: bool,
    fit: FitOutcome | None = None,
) -> list[str]:
    """What a reviewer must look at before deploying: an unfinished fit, a value at the fit's edge, a temperature effect the records
    cannot tell from none, a nominal the records reject,
    a misfit the model cannot explain, a batch unlike the others, no gain on unseen batches."""
    warnings: list[str] = []
    fit = fit or FitOutcome()
    if not fit.converged:
        warnings.append(
            f"the fit stopped after max_iterations ({fit.max_iterations}) without converging: the values and intervals are of an unfinished fit; "
            "raise max_iterations in the settings"
        )
    for name, value in fit.at_edge.items():
        warnings.append(
            f"{name.removeprefix('culture.')} ended at the edge of what the fit allows ({value:.4g}: log_multiplier_bound from nominal, or the "
            "parameter file's range): the records ask for a value beyond it, and its interval is not a 95 % interval"
        )
    for name, (value, low, high) in fit.effect_undetermined.items():
        which_way = ", nor which way" if low < 0.0 < high else ""
        warnings.append(
            f"{name.removeprefix('culture.')} is {value:+.3g} per °C, but its 95 % interval [{low:+.3g}, {high:+.3g}] holds 0: the records do not "
            f"say whether the temperature acts on this rate at all{which_way}. A plan that moves the temperature for it leans on the model's "
            "other temperature effects and on this value alone: run development batches further apart in temperature before trusting such plans"
        )
    for name, (chi2_worse, converged) in fit.rejected_nominals.items():
        if chi2_worse > CHI2_1_DOF_95:
            unfinished = " (one of the two fits compared did not converge: the figure is approximate)" if not converged else ""
            warnings.append(
                f"{name.removeprefix('culture.')} was put back to nominal as not identifiable, but the records reject that value "
                f"(the fit is worse by chi-square {chi2_worse:.1f} with it, against {CHI2_1_DOF_95} at 95 %){unfinished}: they ask for a value at the "
                "edge of what the fit allows, where they cannot tell values apart. Plans that lean on this parameter are not checked by these "
                "records: review the plots, and widen log_multiplier_bound or fit the model's corrections"
            )
    chi2 = statistics["reduced_chi2"]
    if chi2 > 4.0:
        warnings.append(
            f"the calibrated model still misses the data by far more than the measurement noise (reduced chi-square {chi2:.1f}): its structure differs from the plant's; "
            "the intervals are widened by it, and the model should be trusted only inside the envelope"
        )
    typical = float(np.median([row["reduced_chi2"] for row in per_batch.values()]))
    for batch_id, row in per_batch.items():
        if row["reduced_chi2"] > max(3.0 * typical, 4.0):
            warnings.append(
                f"batch {batch_id} fits far worse than the others (reduced chi-square {row['reduced_chi2']:.1f} against a median of {typical:.1f}): "
                "a failed or mis-recorded batch? Check it, and calibrate without it if it does not belong"
            )
    for record in records:
        times, viability = record.lab_series("viability_pct")
        early = viability[times < 0.6 * record.end_h]
        if early.size and float(np.min(early)) < 50.0:
            warnings.append(f"batch {record.batch_id}: lab viability fell to {float(np.min(early)):.0f} % before 60 % of the batch (a crashed culture?)")
    if not cross_validate:
        warnings.append("cross-validation was not run: whether the model predicts batches it has not seen is unknown")
    elif not cv:
        warnings.append(f"cross-validation needs at least 3 batches ({len(records)} given): whether the model predicts batches it has not seen is unknown")
    else:
        worse = [name for name in REFERENCE_QUANTITIES if f"{name}_calibrated" in cv and cv[f"{name}_calibrated"] >= cv[f"{name}_nominal"]]
        if worse:
            warnings.append(f"on batches left out, the calibrated model predicts {', '.join(worse)} no better than the nominal one: do not deploy it")
    return warnings


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


def _cross_validation(records: Sequence[BatchRecord], nominal: CultureParameters, model: CultureModel, settings: CalibrationSettings, fitted: Sequence[str]) -> dict[str, float]:
    """Leave each batch out, fit on the rest from nominal (never from a fit that saw it), predict the one left out: relative RMSE, nominal vs calibrated."""
    calibrated: dict[str, list[float]] = {}
    nominal_errors: dict[str, list[float]] = {}
    full = _Problem(records, nominal, model, settings, fitted)
    for left_out in range(len(records)):
        rest = [record for i, record in enumerate(records) if i != left_out]
        problem = _Problem(rest, nominal, model, settings, fitted)
        theta, *_ = _levenberg_marquardt(problem, np.zeros(len(fitted)), settings)  # an unconverged fold is still a prediction
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
                end_h=min(phase.end_h, max(record.end_h for record in records)),
                temperature_degc=span(temperatures),
                feed_per_volume_per_day=span(feeds),
                glucose_feed_per_volume_per_day=span(glucose_feeds),
                glucose_g_per_l=span(glucose) if glucose else ValueRange(low=0.0, high=0.0),
                batches=batches,
            )
        )
    return tuple(envelope)
