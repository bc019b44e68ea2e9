"""State and parameter estimation for the MPC: an extended Kalman filter with out-of-sequence lab results.

The filter runs on the augmented state ``z = [x, θ]``: the 12 model states and
the natural logs of multipliers (nominal 0) of the few uncertain parameters
that matter for planning. The parameter vector the model sees is the nominal
one with those entries multiplied by ``exp(θ)``.

Each control cycle :meth:`ExtendedKalmanEstimator.step` predicts from the last
estimate to now with the inputs actually delivered (RK4 on the shared model,
Jacobian by CasADi), then applies the online measurements that are present.
Lab results arrive hours after their draw; they are applied *at the draw
time*: the filter goes back to the stored estimate at or before the draw,
predicts to the draw, applies the result and re-runs the stored inputs and
online measurements forward to now. Every scalar innovation is gated.

The model is never exactly the plant. Two measurement relations that differ
between probes and cell lines and drift in a batch (capacitance and oxygen
uptake per cell) are estimated as slowly varying factors that the lab VCD
pins. A consistency monitor (:class:`ConsistencyMonitor`) tests each signal's
recent innovations and, where they keep disagreeing with the model, inflates
the process noise of what that signal observes instead of rejecting the data.

Design, noise settings, limits and measured performance: ``docs/estimator.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import casadi as ca
import numpy as np
import structlog
from pydantic import Field, field_validator, model_validator

from controller.config import BatchConfig
from controller.types import LAB_FIELDS, LabResult
from plant_models.cho import STATE_INDEX, STATES, CultureModel
from plant_models.config_loading import FrozenConfig
from plant_models.errors import BioreactorMPCError
from plant_models.parameters import PARAMETER_NAMES, is_additive, is_correction

if TYPE_CHECKING:
    from controller.nmpc import CycleObservation

log = structlog.get_logger(__name__)

SUBSTEPS_PER_CALL = 6
"""RK4 substeps in one call of the compiled step; longer intervals are cut into several calls."""
TIME_TOLERANCE_H = 1e-6
SERIAL_FORMAT_VERSION = 2
"""2 added the consistency monitor and the process-noise scale of each interval; version-1 dicts are still read."""
READABLE_FORMAT_VERSIONS = (1, 2)

NONNEGATIVE_STATES: tuple[str, ...] = tuple(s.name for s in STATES if s.name != "temperature")

ONLINE_MEASUREMENTS: dict[str, tuple[str, str]] = {
    "our_mmol_per_l_h": ("output", "our"),
    "cer_mmol_per_l_h": ("output", "cer"),
    "capacitance_pf_per_cm": ("output", "capacitance"),
    "volume_l": ("state", "volume"),
    "temperature_degc": ("state", "temperature"),
    "base_total_l": ("state", "base_added"),
}
"""Online signal names (as the runtime's data-quality layer names them) → what the model predicts for them."""

LAB_MEASUREMENTS: dict[str, tuple[str, str]] = {
    "vcd_1e6_per_ml": ("state", "viable_cells"),
    "viability_pct": ("output", "viability"),
    "glucose_g_per_l": ("state", "glucose"),
    "lactate_g_per_l": ("state", "lactate"),
    "glutamine_mm": ("state", "glutamine"),
    "ammonia_mm": ("state", "ammonia"),
    "titer_g_per_l": ("state", "titer"),
    "osmolality_mosm_per_kg": ("output", "osmolality"),
}
"""Lab fields (:data:`~controller.types.LAB_FIELDS`) → what the model predicts for them."""

MEASUREMENT_NAMES: tuple[str, ...] = (*ONLINE_MEASUREMENTS, *LAB_MEASUREMENTS)

MU_MAX = "culture.growth.mu_max_per_h"
Q_PRODUCT = "culture.product.q_product_pg_per_cell_day"
DEATH = "culture.death.kd_min_per_h"
CAPACITANCE_PER_CELL = "culture.measurement.capacitance_pf_per_cm_per_1e6_cells_ml"
O2_MAINTENANCE_PER_CELL = "culture.measurement.o2_maintenance_mmol_per_1e9_cells_h"
O2_PER_GROWTH = "culture.measurement.o2_per_growth_mmol_per_1e9_cells"

INFLATED_BY: dict[str, tuple[str, ...]] = {
    "our_mmol_per_l_h": ("viable_cells", O2_MAINTENANCE_PER_CELL, O2_PER_GROWTH),
    "cer_mmol_per_l_h": ("viable_cells", O2_MAINTENANCE_PER_CELL, O2_PER_GROWTH),
    "capacitance_pf_per_cm": ("viable_cells", CAPACITANCE_PER_CELL),
    "volume_l": ("volume",),
    "temperature_degc": ("temperature",),
    "base_total_l": ("base_added",),
    "vcd_1e6_per_ml": ("viable_cells", MU_MAX, DEATH, CAPACITANCE_PER_CELL, O2_MAINTENANCE_PER_CELL, O2_PER_GROWTH),
    "viability_pct": ("viable_cells", "dead_cells", DEATH),
    "glucose_g_per_l": (
        "glucose",
        "culture.metabolism.yield_cells_per_glucose_1e9_per_g",
        "culture.metabolism.glucose_maintenance_g_per_1e9_cells_h",
        "media.nutrient_feed_strength",
    ),
    "lactate_g_per_l": ("lactate",),
    "glutamine_mm": ("glutamine",),
    "ammonia_mm": ("ammonia",),
    "titer_g_per_l": ("titer", "galactosylated_titer", Q_PRODUCT),
    "osmolality_mosm_per_kg": ("other_osmolytes",),
}
"""Signal → the states and parameters whose process noise (random walk) its consistency monitor inflates.

A signal that disagrees with the model for longer than chance says that what it
observes moves more than the model allows: the states it measures, the
measurement relation between them (a capacitance or oxygen factor per cell),
and the kinetics that drive them. Parameters that are not estimated are skipped.
"""


# --------------------------------------------------------------------------- configuration


class EstimatedParameter(FrozenConfig):
    """One model parameter the filter estimates, as the log of a multiplier of its nominal value."""

    name: str = Field(description="an entry of PARAMETER_NAMES, e.g. 'culture.growth.mu_max_per_h'")
    prior_log_sd: float = Field(gt=0.0, le=2.0, description="prior standard deviation of ln(multiplier), about the relative sd [-]")
    random_walk_log_sd_per_sqrt_h: float = Field(ge=0.0, le=0.5, description="random-walk standard deviation of ln(multiplier) over one hour [-/√h]")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PARAMETER_NAMES:
            raise ValueError(f"{value!r} is not a model parameter; names look like 'culture.growth.mu_max_per_h'")
        if is_correction(value):
            raise ValueError(f"{value!r} is a correction: zero in the model and of either sign, so it has no multiplier to estimate (calibrate fits it)")
        if is_additive(value):
            raise ValueError(
                f"{value!r} is a temperature sensitivity: it may be 0 (no effect) or, for the productivity, negative, where a multiplier"
                " cannot move it or would turn it the wrong way, so it has no multiplier to estimate (calibrate fits it)"
            )
        return value


DEFAULT_ESTIMATED_PARAMETERS: tuple[EstimatedParameter, ...] = (
    EstimatedParameter(name=MU_MAX, prior_log_sd=0.25, random_walk_log_sd_per_sqrt_h=0.004),
    EstimatedParameter(name=Q_PRODUCT, prior_log_sd=0.3, random_walk_log_sd_per_sqrt_h=0.03),
    EstimatedParameter(name="culture.metabolism.yield_cells_per_glucose_1e9_per_g", prior_log_sd=0.2, random_walk_log_sd_per_sqrt_h=0.003),
    EstimatedParameter(name=DEATH, prior_log_sd=0.5, random_walk_log_sd_per_sqrt_h=0.01),
    EstimatedParameter(name="media.nutrient_feed_strength", prior_log_sd=0.1, random_walk_log_sd_per_sqrt_h=0.005),
    EstimatedParameter(name="culture.metabolism.glucose_maintenance_g_per_1e9_cells_h", prior_log_sd=0.3, random_walk_log_sd_per_sqrt_h=0.003),
    # Measurement relations that differ between probes, cell lines and cell sizes, and drift in a batch:
    # the probe informs the product (factor × VCD), the lab VCD pins the factor.
    EstimatedParameter(name=CAPACITANCE_PER_CELL, prior_log_sd=0.5, random_walk_log_sd_per_sqrt_h=0.03),
    EstimatedParameter(name=O2_MAINTENANCE_PER_CELL, prior_log_sd=0.4, random_walk_log_sd_per_sqrt_h=0.03),
)


class StateUncertainty(FrozenConfig):
    """Initial and process uncertainty of one model state; floors are in the state's own unit."""

    initial_relative_sd: float = Field(ge=0.0, le=2.0, description="initial sd relative to the inoculation value [-]")
    initial_floor_sd: float = Field(gt=0.0, description="smallest initial sd [state unit]")
    process_relative_sd_per_sqrt_h: float = Field(ge=0.0, le=1.0, description="model error per hour relative to the state [-/√h]")
    process_floor_sd_per_sqrt_h: float = Field(gt=0.0, description="smallest model error per hour [state unit/√h]")


def _uncertainty(initial_rel: float, initial_floor: float, process_rel: float, process_floor: float) -> StateUncertainty:
    return StateUncertainty(
        initial_relative_sd=initial_rel,
        initial_floor_sd=initial_floor,
        process_relative_sd_per_sqrt_h=process_rel,
        process_floor_sd_per_sqrt_h=process_floor,
    )


DEFAULT_STATE_UNCERTAINTY: dict[str, StateUncertainty] = {
    "viable_cells": _uncertainty(0.10, 0.02, 0.02, 0.002),
    "dead_cells": _uncertainty(0.30, 0.01, 0.01, 0.002),
    "glucose": _uncertainty(0.05, 0.05, 0.03, 0.01),
    "glutamine": _uncertainty(0.10, 0.1, 0.01, 0.01),
    "lactate": _uncertainty(0.10, 0.05, 0.01, 0.005),
    "ammonia": _uncertainty(0.10, 0.1, 0.01, 0.005),
    "other_osmolytes": _uncertainty(0.03, 2.0, 0.002, 0.2),
    "titer": _uncertainty(0.10, 0.005, 0.025, 0.0005),
    "galactosylated_titer": _uncertainty(0.10, 0.005, 0.005, 0.0005),
    "volume": _uncertainty(0.005, 1.0, 0.0005, 0.05),
    "temperature": _uncertainty(0.0, 0.2, 0.0, 0.02),
    "base_added": _uncertainty(0.0, 0.01, 0.005, 0.001),
}


class OnlineNoiseSd(FrozenConfig):
    """Standard deviations of the online measurements, a little above the sensors' own noise."""

    our_relative: float = Field(default=0.04, gt=0.0, le=1.0, description="oxygen uptake rate [-]")
    our_floor_mmol_per_l_h: float = Field(default=0.02, gt=0.0, description="[mmol/L/h]")
    cer_relative: float = Field(default=0.04, gt=0.0, le=1.0, description="CO2 evolution rate [-]")
    cer_floor_mmol_per_l_h: float = Field(default=0.02, gt=0.0, description="[mmol/L/h]")
    capacitance_relative: float = Field(default=0.03, gt=0.0, le=1.0, description="viable-biomass capacitance [-]")
    capacitance_floor_pf_per_cm: float = Field(default=0.02, gt=0.0, description="[pF/cm]")
    volume_l: float = Field(default=1.5, gt=0.0, description="load cell [L]")
    temperature_degc: float = Field(default=0.05, gt=0.0, description="culture temperature [°C]")
    base_total_l: float = Field(default=0.015, gt=0.0, description="base totaliser [L]")


class LabNoiseSd(FrozenConfig):
    """Standard deviations of the offline assays: relative with absolute floors (viability absolute)."""

    vcd_relative: float = Field(default=0.08, gt=0.0, le=1.0)
    vcd_floor_1e6_per_ml: float = Field(default=0.02, gt=0.0)
    viability_pct: float = Field(default=1.5, gt=0.0)
    glucose_relative: float = Field(default=0.04, gt=0.0, le=1.0)
    glucose_floor_g_per_l: float = Field(default=0.03, gt=0.0)
    lactate_relative: float = Field(default=0.05, gt=0.0, le=1.0)
    lactate_floor_g_per_l: float = Field(default=0.03, gt=0.0)
    glutamine_relative: float = Field(default=0.08, gt=0.0, le=1.0)
    glutamine_floor_mm: float = Field(default=0.1, gt=0.0)
    ammonia_relative: float = Field(default=0.08, gt=0.0, le=1.0)
    ammonia_floor_mm: float = Field(default=0.1, gt=0.0)
    titer_relative: float = Field(default=0.05, gt=0.0, le=1.0)
    titer_floor_g_per_l: float = Field(default=0.005, gt=0.0)
    osmolality_relative: float = Field(default=0.015, gt=0.0, le=1.0)
    osmolality_floor_mosm_per_kg: float = Field(default=2.0, gt=0.0)


class ConsistencyConfig(FrozenConfig):
    """The consistency monitor: each signal's normalised innovations over a window, and the model uncertainty they inflate.

    A normalised innovation z = ν/√S is N(0, 1), and its square (the NIS)
    χ²(1), when the stated uncertainty is right. Each signal's latest values
    are tested twice at the signal's level: Σz² against the χ² quantile (too
    confident) and Σz/√n against the normal quantile (a persistent bias,
    which a few daily lab results of the same sign show before their
    squares do). A value beyond the gate is left out of its window's tests
    while it is the window's largest, so one outlier cannot fail them. When a
    test fails, the process noise of what the signal observes
    (:data:`INFLATED_BY`) is multiplied by a factor that grows by the
    window's mean NIS per failed test, bounded by ``max_inflation``; while the
    tests pass, the factor decays back to 1. Rejected values enter the window
    too: the gate cannot lock out a signal the model disagrees with for
    good. ``max_inflation = 1`` turns the monitor off.
    """

    online_level: float = Field(default=0.99, gt=0.5, lt=1.0, description="confidence level of the tests of an online signal's window (hourly: few false alarms) [-]")
    lab_level: float = Field(
        default=0.95, gt=0.5, lt=1.0, description="confidence level of the tests of a lab field's window (daily: a persistent disagreement is found sooner) [-]"
    )
    online_window: int = Field(default=6, ge=2, le=48, description="latest innovations of an online signal in its window [-]")
    lab_window: int = Field(default=3, ge=2, le=14, description="latest innovations of a lab field in its window [-]")
    max_inflation: float = Field(default=100.0, ge=1.0, le=1.0e4, description="largest factor on the process noise of what one signal observes [-]")
    max_growth_per_test: float = Field(
        default=10.0, gt=1.0, le=100.0, description="largest increase of a signal's factor at one failed test (it grows by the window's mean NIS) [-]"
    )
    half_life_h: float = Field(default=12.0, gt=0.0, le=1000.0, description="while a signal's window passes, its factor's excess over 1 halves in this time [h]")


class EstimatorConfig(FrozenConfig):
    """Tuning of the extended Kalman filter."""

    parameters: tuple[EstimatedParameter, ...] = Field(default=DEFAULT_ESTIMATED_PARAMETERS, description="parameters estimated as log multipliers")
    states: dict[str, StateUncertainty] = Field(
        default_factory=lambda: dict(DEFAULT_STATE_UNCERTAINTY),
        description="initial and process uncertainty by state name; states not named keep their defaults",
    )
    online_noise: OnlineNoiseSd = OnlineNoiseSd()
    lab_noise: LabNoiseSd = LabNoiseSd()
    gate_sigma: float = Field(default=4.0, gt=1.0, le=50.0, description="innovations beyond this many standard deviations are rejected [-]")
    online_gate_release_count: int = Field(default=6, ge=1, description="after this many rejections in a row an online signal is believed again [-]")
    lab_gate_release_count: int = Field(default=1, ge=1, description="after this many rejections in a row a lab field is believed again [-]")
    history_h: float = Field(default=48.0, gt=0.0, le=240.0, description="estimates kept for re-processing late lab results; longer than the longest lab delay [h]")
    integration_substep_h: float = Field(default=1.0 / 6.0, gt=0.0, le=1.0, description="longest RK4 substep of the prediction [h]")
    multiplier_min: float = Field(default=0.2, gt=0.0, lt=1.0, description="estimated multipliers are kept at or above this [-]")
    multiplier_max: float = Field(default=5.0, gt=1.0, description="estimated multipliers are kept at or below this [-]")
    consistency: ConsistencyConfig = Field(default=ConsistencyConfig(), description="the consistency monitor that inflates the model's uncertainty when the data disagree")

    @field_validator("states", mode="before")
    @classmethod
    def _merge_defaults(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {**DEFAULT_STATE_UNCERTAINTY, **value}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EstimatorConfig:
        unknown = sorted(set(self.states) - set(STATE_INDEX))
        if unknown:
            raise ValueError(f"states: unknown state names {unknown}; expected some of {', '.join(STATE_INDEX)}")
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError("parameters: a parameter is named twice")
        return self


# --------------------------------------------------------------------------- errors and results


class EstimatorDivergedError(ArithmeticError, BioreactorMPCError):
    """The filter produced a non-finite estimate; the previous estimate is kept unchanged.

    The caller should plan from the last good estimate (or fall back) and may
    keep calling :meth:`ExtendedKalmanEstimator.step`: the next call predicts
    from the kept estimate over the longer interval.
    """

    def __init__(self, message: str, *, process_time_h: float) -> None:
        super().__init__(message)
        self.process_time_h = process_time_h


class EstimatorInputError(ValueError, BioreactorMPCError):
    """The caller passed something the filter cannot use: time running backwards, non-finite inputs, a totaliser going down."""


def frozen_array(values: np.ndarray) -> np.ndarray:
    array = np.array(values, dtype=float)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class StateEstimate:
    """The filter's belief at one process time (arrays are read-only copies)."""

    process_time_h: float
    state: np.ndarray
    """The 12 model states, in ``plant_models.cho.STATES`` order."""
    state_sd: np.ndarray
    multipliers: Mapping[str, float]
    """Estimated parameter name → multiplier of its nominal value."""
    multiplier_log_sd: Mapping[str, float]
    """Standard deviation of ln(multiplier), about the relative uncertainty."""
    parameters: np.ndarray
    """The full model parameter vector to plan with (nominal × multipliers)."""
    covariance: np.ndarray
    """Covariance of the augmented state [x, ln multipliers]."""
    rejected_online: int
    rejected_lab: int

    def value(self, state_name: str) -> float:
        return float(self.state[STATE_INDEX[state_name]])

    def sd(self, state_name: str) -> float:
        return float(self.state_sd[STATE_INDEX[state_name]])


# --------------------------------------------------------------------------- CasADi kernel


class EkfFunctions:
    """The CasADi maps the filter evaluates, built once (SX, a few ms per cycle).

    ``step(t, z, u, p_nominal, dt_h) -> (z_next, ∂z_next/∂z)`` integrates
    :data:`SUBSTEPS_PER_CALL` RK4 substeps of ``dt_h / SUBSTEPS_PER_CALL``;
    ``measure(t, z, u, p_nominal) -> (y, ∂y/∂z)`` predicts every measurement of
    :data:`MEASUREMENT_NAMES`; ``parameters(z, p_nominal)`` is the scaled
    parameter vector. Instances can be shared by estimators with the same
    estimated parameters (tests, restarts).
    """

    def __init__(self, model: CultureModel, estimated: Sequence[str]) -> None:
        self.estimated = tuple(estimated)
        self.n_states = model.n_states
        indices = [PARAMETER_NAMES.index(name) for name in self.estimated]
        n_z = model.n_states + len(indices)
        t, dt = ca.SX.sym("t"), ca.SX.sym("dt")
        z = ca.SX.sym("z", n_z)
        u = ca.SX.sym("u", model.n_inputs)
        p_nominal = ca.SX.sym("p", model.n_parameters)
        x, theta = z[: model.n_states], z[model.n_states :]
        p = ca.SX(p_nominal)
        for j, index in enumerate(indices):
            p[index] = p_nominal[index] * ca.exp(theta[j])

        _, xk = model.rk4(t, x, u, p, dt, SUBSTEPS_PER_CALL)
        z_next = ca.vertcat(xk, theta)
        self.step = ca.Function("ekf_step", [t, z, u, p_nominal, dt], [z_next, ca.jacobian(z_next, z)])

        y_all = model.outputs(t, x, u, p)
        rows = []
        for kind, name in (*ONLINE_MEASUREMENTS.values(), *LAB_MEASUREMENTS.values()):
            rows.append(x[STATE_INDEX[name]] if kind == "state" else y_all[model.output_index(name)])
        y = ca.vertcat(*rows)
        self.measure = ca.Function("ekf_measure", [t, z, u, p_nominal], [y, ca.jacobian(y, z)])
        self.parameters = ca.Function("ekf_parameters", [z, p_nominal], [p])


def delivered_inputs(
    *,
    previous_feed_total_l: float,
    feed_total_l: float,
    previous_glucose_feed_total_l: float,
    glucose_feed_total_l: float,
    dt_h: float,
    temperature_setpoint_degc: float,
) -> np.ndarray:
    """The input vector actually delivered over an interval, from the PLC's totalisers.

    Feed rates are the totaliser increments over ``dt_h`` (what the pumps
    delivered, whatever the setpoints said); the temperature setpoint is the
    one that was active, as the caller knows it.
    """
    values = (previous_feed_total_l, feed_total_l, previous_glucose_feed_total_l, glucose_feed_total_l, dt_h, temperature_setpoint_degc)
    if not all(math.isfinite(v) for v in values) or dt_h <= 0.0:
        raise EstimatorInputError(f"totalisers, interval and temperature setpoint must be finite with dt_h > 0, got {values!r}")
    feed_l = feed_total_l - previous_feed_total_l
    glucose_l = glucose_feed_total_l - previous_glucose_feed_total_l
    if feed_l < 0.0 or glucose_l < 0.0:
        raise EstimatorInputError(f"a feed totaliser went down (feed {feed_l:+.4f} L, glucose {glucose_l:+.4f} L): reset or bad reading")
    return np.array([feed_l / dt_h, glucose_l / dt_h, temperature_setpoint_degc])


# --------------------------------------------------------------------------- consistency monitor


def chi_square_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of the χ² distribution with ``dof`` degrees of freedom (bisection on its CDF, the regularised incomplete gamma series)."""
    if not (0.0 < probability < 1.0) or dof < 1:
        raise ValueError(f"need 0 < probability < 1 and dof >= 1, got {probability!r}, {dof!r}")
    a = 0.5 * dof

    def cdf(x: float) -> float:
        half = 0.5 * x
        if half <= 0.0:
            return 0.0
        term, total, n = 1.0, 1.0, 0
        while term > 1e-17 * total:
            n += 1
            term *= half / (a + n)
            total += term
        return min(1.0, math.exp(-half + a * math.log(half) - math.lgamma(a + 1.0)) * total)

    low, high = 0.0, dof + 40.0 * math.sqrt(2.0 * dof) + 60.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if cdf(middle) < probability:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return 0.5 * (low + high)


RESTORED_EXCESS = 0.01
"""A decaying inflation factor within this of 1 is set back to 1 (and logged as restored)."""


@dataclass(frozen=True)
class SignalConsistency:
    """One signal's latest normalised innovations and the factor it puts on the process noise of what it observes."""

    window: tuple[float, ...] = ()
    """Normalised innovations ν/√S of the latest values (rejected ones too), oldest first."""
    inflation: float = 1.0
    tested_at_h: float | None = None
    """Process time of the last test (the factor decays from there)."""


@dataclass(frozen=True)
class ConsistencyTest:
    """A window's two statistics against their thresholds (ratios above 1 fail)."""

    nis_sum: float
    """Σ z² over the kept values; χ²(kept) when the model is right (at most that when an outlier was left out)."""
    nis_ratio: float
    bias: float
    """Σ z / √kept over the kept values; N(0, 1) when the model is right."""
    bias_ratio: float
    kept: int
    """Values the statistics are over: the window, less its largest when that one is beyond the gate."""

    @property
    def failed(self) -> bool:
        return self.nis_ratio > 1.0 or self.bias_ratio > 1.0

    @property
    def mean_nis(self) -> float:
        """Mean NIS of the kept values (1 when the stated uncertainty is right), at least 1 plus the squared mean innovation (a bias)."""
        return max(self.nis_sum / self.kept, 1.0 + (self.bias * self.bias) / self.kept)


class ConsistencyMonitor:
    """Windowed innovation tests per signal (:class:`ConsistencyConfig`) and the inflation factors they drive.

    Two tests on the same window of normalised innovations z = ν/√S: Σz²
    against the χ² quantile (the stated uncertainty is too small) and Σz/√n
    against the normal quantile (a persistent bias: a few daily lab results
    of the same sign say more than their squares). The window's largest value
    is left out when it is beyond the gate, so one outlier cannot fail
    either. Values are recorded when
    the filter first sees them (at the cycle for online values, at arrival
    for lab results); replays of stored values record nothing. The factors
    change the process noise from the next prediction on; the filter's history
    keeps the scale each interval used, so a replay after a late lab result
    repeats it exactly.
    """

    def __init__(self, config: ConsistencyConfig, gate_sigma: float) -> None:
        self.config = config
        self.gate_sigma = gate_sigma
        self._nis_threshold = {
            online: {dof: chi_square_quantile(level, dof) for dof in range(1, length + 1)}
            for online, level, length in ((True, config.online_level, config.online_window), (False, config.lab_level, config.lab_window))
        }
        self._bias_threshold = {online: NormalDist().inv_cdf(0.5 + 0.5 * level) for online, level in ((True, config.online_level), (False, config.lab_level))}
        self.signals: dict[str, SignalConsistency] = dict.fromkeys(MEASUREMENT_NAMES, SignalConsistency())

    @property
    def inflation(self) -> Mapping[str, float]:
        return MappingProxyType({name: state.inflation for name, state in self.signals.items()})

    def test(self, window: Sequence[float], *, online: bool) -> ConsistencyTest:
        """Both statistics of a window of at least two normalised innovations, at the level of an online signal or a lab field."""
        largest = max(range(len(window)), key=lambda i: abs(window[i]))
        kept = [v for i, v in enumerate(window) if i != largest or abs(v) <= self.gate_sigma]
        nis_sum = math.fsum(v * v for v in kept)
        bias = math.fsum(kept) / math.sqrt(len(kept))
        return ConsistencyTest(nis_sum, nis_sum / self._nis_threshold[online][len(kept)], bias, (bias / self._bias_threshold[online]) ** 2, len(kept))

    def record(self, name: str, normalised_innovation: float, t_h: float) -> None:
        """Add one value's ν/√S to ``name``'s window, test the window, and grow or decay its factor."""
        config = self.config
        state = self.signals[name]
        online = name in ONLINE_MEASUREMENTS
        window = (*state.window, float(normalised_innovation))[-(config.online_window if online else config.lab_window) :]
        if len(window) < 2:
            self.signals[name] = replace(state, window=window)
            return
        test = self.test(window, online=online)
        latest = window[-1]
        inflation = state.inflation
        if test.failed:
            # Grow only while the latest value still disagrees, so a window of old evidence does not compound.
            if (test.nis_ratio > 1.0 and latest * latest > 1.0) or (test.bias_ratio > 1.0 and latest * math.copysign(1.0, test.bias) > 0.5):
                inflation = min(config.max_inflation, inflation * min(config.max_growth_per_test, test.mean_nis))
        elif inflation > 1.0 and state.tested_at_h is not None:
            excess = (inflation - 1.0) * 0.5 ** (max(t_h - state.tested_at_h, 0.0) / config.half_life_h)
            inflation = 1.0 + excess if excess > RESTORED_EXCESS else 1.0
        if inflation > state.inflation:
            log.warning(
                "model_uncertainty_inflated",
                signal=name,
                inflation=round(inflation, 3),
                previous=round(state.inflation, 3),
                window_nis=round(test.nis_sum, 3),
                nis_ratio=round(test.nis_ratio, 3),
                window_bias=round(test.bias, 3),
                bias_ratio=round(test.bias_ratio, 3),
                process_time_h=t_h,
            )
        elif inflation == 1.0 < state.inflation:
            log.info("model_uncertainty_restored", signal=name, process_time_h=t_h)
        self.signals[name] = SignalConsistency(window, inflation, t_h)

    def to_dict(self) -> dict[str, Any]:
        return {name: {"window": list(s.window), "inflation": s.inflation, "tested_at_h": s.tested_at_h} for name, s in self.signals.items() if s != SignalConsistency()}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take over the windows and factors of :meth:`to_dict` (names not saved start afresh)."""
        unknown = sorted(set(data) - set(MEASUREMENT_NAMES))
        if unknown:
            raise EstimatorInputError(f"saved consistency monitor names unknown signals {unknown}")
        self.signals = dict.fromkeys(MEASUREMENT_NAMES, SignalConsistency())
        for name, saved in data.items():
            tested = saved.get("tested_at_h")
            self.signals[name] = SignalConsistency(tuple(float(v) for v in saved["window"]), float(saved["inflation"]), None if tested is None else float(tested))


# --------------------------------------------------------------------------- the filter


@dataclass(frozen=True)
class _Entry:
    """The posterior at one cycle time, what was applied there, and the inputs of the following interval."""

    time_h: float
    z: np.ndarray
    covariance: np.ndarray
    online: Mapping[str, float]
    inputs: np.ndarray | None = None
    noise_scale: np.ndarray | None = None
    """Factors on the process noise over the following interval (the consistency monitor's); None: all 1."""


@dataclass(frozen=True)
class _AppliedLab:
    result: LabResult
    accepted: tuple[str, ...]


@dataclass(frozen=True)
class _Totalisers:
    """What :meth:`ExtendedKalmanEstimator.observe` last read: the reference for the next delivered inputs."""

    process_time_h: float
    feed_total_l: float
    glucose_feed_total_l: float


@dataclass(frozen=True)
class _Update:
    z: np.ndarray
    covariance: np.ndarray
    accepted: dict[str, float]
    rejected: list[tuple[str, float, float, float]]
    """(name, value, predicted, innovation sigma) of each value beyond the gate."""
    released: list[str]
    normalised: dict[str, float]
    """Normalised innovation ν/√S of every gated value, accepted or rejected (its square is the NIS)."""


def _check_finite(t_h: float, z: np.ndarray, covariance: np.ndarray) -> None:
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(covariance))):
        raise EstimatorDivergedError(f"estimate became non-finite at process time {t_h:.3f} h; previous estimate kept", process_time_h=t_h)


class _FilterCore:
    """The filter's arithmetic: predict, scalar updates with gating, projection. Holds no history."""

    def __init__(self, config: EstimatorConfig, functions: EkfFunctions, nominal_parameters: np.ndarray) -> None:
        self.config = config
        self.functions = functions
        self.names = functions.estimated
        self.n_x = functions.n_states
        self.p_nominal = nominal_parameters
        self._prepare_noise()

    def initial_covariance(self, x0: np.ndarray) -> np.ndarray:
        sd = np.concatenate([np.maximum(self._init_rel * np.abs(x0), self._init_floor), [p.prior_log_sd for p in self.config.parameters]])
        return np.diag(sd**2)

    def _prepare_noise(self) -> None:
        config = self.config
        by_state = [config.states[s.name] for s in STATES]
        self._init_rel = np.array([s.initial_relative_sd for s in by_state])
        self._init_floor = np.array([s.initial_floor_sd for s in by_state])
        self._q_rel = np.array([s.process_relative_sd_per_sqrt_h for s in by_state])
        self._q_floor = np.array([s.process_floor_sd_per_sqrt_h for s in by_state])
        self._q_theta = np.array([p.random_walk_log_sd_per_sqrt_h for p in config.parameters]) ** 2
        on, lab = config.online_noise, config.lab_noise
        noise = {
            "our_mmol_per_l_h": (on.our_relative, on.our_floor_mmol_per_l_h),
            "cer_mmol_per_l_h": (on.cer_relative, on.cer_floor_mmol_per_l_h),
            "capacitance_pf_per_cm": (on.capacitance_relative, on.capacitance_floor_pf_per_cm),
            "volume_l": (0.0, on.volume_l),
            "temperature_degc": (0.0, on.temperature_degc),
            "base_total_l": (0.0, on.base_total_l),
            "vcd_1e6_per_ml": (lab.vcd_relative, lab.vcd_floor_1e6_per_ml),
            "viability_pct": (0.0, lab.viability_pct),
            "glucose_g_per_l": (lab.glucose_relative, lab.glucose_floor_g_per_l),
            "lactate_g_per_l": (lab.lactate_relative, lab.lactate_floor_g_per_l),
            "glutamine_mm": (lab.glutamine_relative, lab.glutamine_floor_mm),
            "ammonia_mm": (lab.ammonia_relative, lab.ammonia_floor_mm),
            "titer_g_per_l": (lab.titer_relative, lab.titer_floor_g_per_l),
            "osmolality_mosm_per_kg": (lab.osmolality_relative, lab.osmolality_floor_mosm_per_kg),
        }
        self._r_rel = np.array([noise[name][0] for name in MEASUREMENT_NAMES])
        self._r_floor = np.array([noise[name][1] for name in MEASUREMENT_NAMES])
        self._row = {name: i for i, name in enumerate(MEASUREMENT_NAMES)}
        slots = {**{s.name: i for i, s in enumerate(STATES)}, **{name: self.n_x + j for j, name in enumerate(self.names)}}
        self._inflated_slots = {signal: np.array([slots[n] for n in names if n in slots], dtype=int) for signal, names in INFLATED_BY.items()}
        self._theta_min = math.log(config.multiplier_min)
        self._theta_max = math.log(config.multiplier_max)

    def parameters_of(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(self.functions.parameters(z, self.p_nominal), dtype=float).ravel()

    def noise_scale(self, inflation: Mapping[str, float]) -> np.ndarray | None:
        """Per element of z, the largest inflation of the signals that observe it (:data:`INFLATED_BY`); None when all are 1."""
        if all(factor == 1.0 for factor in inflation.values()):
            return None
        scale = np.ones(self.n_x + len(self.names))
        for signal, factor in inflation.items():
            slots = self._inflated_slots[signal]
            scale[slots] = np.maximum(scale[slots], factor)
        return scale

    def predict(self, t_h: float, z: np.ndarray, covariance: np.ndarray, u: np.ndarray, dt_h: float, noise_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Propagate the mean through RK4 and the covariance through its Jacobian: P ← F P Fᵀ + Q (Q times ``noise_scale``)."""
        n_calls = max(1, math.ceil(dt_h / (SUBSTEPS_PER_CALL * self.config.integration_substep_h) - 1e-9))
        h = dt_h / n_calls
        for _ in range(n_calls):
            x = z[: self.n_x]
            q = np.concatenate([np.maximum(self._q_rel * np.abs(x), self._q_floor) ** 2, self._q_theta]) * h
            if noise_scale is not None:
                q = q * noise_scale
            z_next, jacobian = self.functions.step(t_h, z, u, self.p_nominal, h)
            z = np.asarray(z_next, dtype=float).ravel()
            jacobian = np.asarray(jacobian, dtype=float)
            covariance = jacobian @ covariance @ jacobian.T + np.diag(q)
            t_h += h
        _check_finite(t_h, z, covariance)
        return z, 0.5 * (covariance + covariance.T)

    def update(
        self, t_h: float, z: np.ndarray, covariance: np.ndarray, u: np.ndarray, values: Mapping[str, float], *, gated: bool, gate_open: frozenset[str] = frozenset()
    ) -> _Update:
        """Sequential scalar updates linearised at the prior (equivalent to one batch update), Joseph form.

        ``gated``: reject values beyond ``gate_sigma`` unless their name is in
        ``gate_open`` (released after repeated rejections); replays of values
        accepted before are not gated.
        """
        accepted: dict[str, float] = {}
        rejected: list[tuple[str, float, float, float]] = []
        released: list[str] = []
        normalised: dict[str, float] = {}
        if not values:
            return _Update(z, covariance, accepted, rejected, released, normalised)
        y0, jacobian = self.functions.measure(t_h, z, u, self.p_nominal)
        y0 = np.asarray(y0, dtype=float).ravel()
        jacobian = np.asarray(jacobian, dtype=float)
        z0, z = z, z.copy()
        identity = np.eye(z.size)
        for name, value in values.items():
            i = self._row[name]
            h = jacobian[i]
            predicted = y0[i] + h @ (z - z0)
            r = max(self._r_rel[i] * abs(y0[i]), self._r_floor[i]) ** 2
            s = float(h @ covariance @ h + r)
            innovation = value - predicted
            sigma = math.sqrt(s) if s > 0.0 else math.inf
            if gated:
                normalised[name] = float(innovation / sigma)
            if gated and abs(innovation) > self.config.gate_sigma * sigma:
                if name not in gate_open:
                    rejected.append((name, float(value), float(predicted), sigma))
                    continue
                released.append(name)
            gain = covariance @ h / s
            z = z + gain * innovation
            a = identity - np.outer(gain, h)
            covariance = a @ covariance @ a.T + r * np.outer(gain, gain)
            accepted[name] = float(value)
        return _Update(z, 0.5 * (covariance + covariance.T), accepted, rejected, released, normalised)

    def project(self, t_h: float, z: np.ndarray, *, log_changes: bool) -> np.ndarray:
        """Project onto the physical domain: no negative concentrations, multipliers within bounds."""
        z = z.copy()
        negative = [name for name in NONNEGATIVE_STATES if z[STATE_INDEX[name]] < 0.0]
        for name in negative:
            z[STATE_INDEX[name]] = 0.0
        theta = z[self.n_x :]
        clipped = [name for name, v in zip(self.names, theta, strict=True) if not self._theta_min <= v <= self._theta_max]
        z[self.n_x :] = np.clip(theta, self._theta_min, self._theta_max)
        if log_changes and (negative or clipped):
            log.info("estimate_projected", process_time_h=t_h, negative_states=negative, multipliers_at_bound=clipped)
        return z


class ExtendedKalmanEstimator:
    """Extended Kalman filter on [states, ln parameter multipliers] with out-of-sequence lab results."""

    def __init__(
        self,
        model: CultureModel,
        nominal_parameters: np.ndarray,
        initial_state: np.ndarray,
        config: EstimatorConfig | None = None,
        *,
        start_time_h: float = 0.0,
        functions: EkfFunctions | None = None,
    ) -> None:
        self.config = config or EstimatorConfig()
        names = tuple(p.name for p in self.config.parameters)
        if functions is None or functions.estimated != names:
            functions = EkfFunctions(model, names)
        p_nominal = np.asarray(nominal_parameters, dtype=float).copy()
        if p_nominal.shape != (model.n_parameters,) or not np.all(np.isfinite(p_nominal)):
            raise EstimatorInputError(f"nominal parameters must be {model.n_parameters} finite numbers")
        x0 = np.asarray(initial_state, dtype=float)
        if x0.shape != (model.n_states,) or not np.all(np.isfinite(x0)):
            raise EstimatorInputError(f"initial state must be {model.n_states} finite numbers")
        self._core = _FilterCore(self.config, functions, p_nominal)
        z0 = np.concatenate([x0, np.zeros(len(names))])
        self._entries: list[_Entry] = [_Entry(float(start_time_h), z0, self._core.initial_covariance(x0), {})]
        self._labs: list[_AppliedLab] = []
        self._rejected: dict[str, int] = dict.fromkeys(MEASUREMENT_NAMES, 0)
        self._consecutive: dict[str, int] = dict.fromkeys(MEASUREMENT_NAMES, 0)
        self._totalisers: _Totalisers | None = None
        self._monitor = ConsistencyMonitor(self.config.consistency, self.config.gate_sigma)

    @classmethod
    def from_batch(
        cls,
        model: CultureModel,
        batch: BatchConfig,
        nominal_parameters: np.ndarray,
        config: EstimatorConfig | None = None,
        *,
        functions: EkfFunctions | None = None,
    ) -> ExtendedKalmanEstimator:
        """A filter that starts at inoculation (process time 0) from the batch record."""
        return cls(model, nominal_parameters, batch.inoculation.initial_state(), config, functions=functions)

    # ------------------------------------------------------------------ public

    @property
    def process_time_h(self) -> float:
        return self._entries[-1].time_h

    @property
    def estimate(self) -> StateEstimate:
        entry = self._entries[-1]
        return self._estimate_of(entry.time_h, entry.z, entry.covariance)

    def parameter_vector(self) -> np.ndarray:
        """The full model parameter vector to plan with: nominal × estimated multipliers."""
        return self._core.parameters_of(self._entries[-1].z)

    def multipliers(self) -> dict[str, float]:
        theta = self._entries[-1].z[self._core.n_x :]
        return {name: float(math.exp(v)) for name, v in zip(self._core.names, theta, strict=True)}

    @property
    def inflation(self) -> Mapping[str, float]:
        """Signal → the factor its consistency monitor puts on the process noise of what it observes now (1: the data agree with the model)."""
        return self._monitor.inflation

    def process_noise_scale(self) -> np.ndarray:
        """The factor on each element of z's process noise now (:data:`INFLATED_BY`, the largest where signals overlap), a read-only array; for a forecast that should grow as the filter does."""
        scale = self._core.noise_scale(self._monitor.inflation)
        return frozen_array(np.ones(self._entries[-1].z.size) if scale is None else scale)

    def step(
        self,
        process_time_h: float,
        inputs: Sequence[float] | np.ndarray,
        online: Mapping[str, float] | None = None,
        lab_results: Iterable[LabResult] = (),
    ) -> StateEstimate:
        """One cycle: predict to ``process_time_h`` with ``inputs`` delivered since the last call, then update.

        ``inputs`` are (feed L/h, glucose feed L/h, temperature setpoint °C)
        held over the interval (see :func:`delivered_inputs`). ``online`` holds
        the measurements of :data:`ONLINE_MEASUREMENTS` that passed the
        caller's checks; missing and non-finite values are skipped. Lab
        results are applied at their draw times (:meth:`apply_lab_result`).
        Raises :class:`EstimatorDivergedError` with the estimate unchanged if
        the filter breaks down numerically.
        """
        last = self._entries[-1]
        dt_h = float(process_time_h) - last.time_h
        if not math.isfinite(dt_h) or dt_h < -TIME_TOLERANCE_H:
            raise EstimatorInputError(f"process time {process_time_h!r} h is before the last estimate at {last.time_h} h")
        u = np.asarray(inputs, dtype=float)
        if u.shape != (3,) or not np.all(np.isfinite(u)) or u[0] < 0.0 or u[1] < 0.0:
            raise EstimatorInputError(f"inputs must be (feed L/h ≥ 0, glucose L/h ≥ 0, temperature °C), finite, got {inputs!r}")
        values = self._online_values(online or {})
        z, covariance = last.z, last.covariance
        now_h = last.time_h
        noise_scale = self._core.noise_scale(self._monitor.inflation)
        if dt_h > TIME_TOLERANCE_H:
            now_h = float(process_time_h)
            z, covariance = self._core.predict(last.time_h, z, covariance, u, dt_h, noise_scale)
        update = self._core.update(now_h, z, covariance, u, values, gated=True, gate_open=self._gate_open())
        z = self._core.project(now_h, update.z, log_changes=True)
        _check_finite(now_h, z, update.covariance)
        self._count(update, "online_value_rejected", now_h)
        self._test_consistency(update, now_h)
        if dt_h > TIME_TOLERANCE_H:
            self._entries[-1] = replace(last, inputs=u, noise_scale=noise_scale)
            self._entries.append(_Entry(now_h, z, update.covariance, update.accepted))
        else:
            self._entries[-1] = replace(last, z=z, covariance=update.covariance, online={**last.online, **update.accepted})
        self._prune()
        for result in lab_results:
            self.apply_lab_result(result)
        return self.estimate

    def lab_fields_accepted(self, seq: int) -> frozenset[str] | None:
        """The fields of lab result ``seq`` the gate accepted (LabResult field names); None when no such result was applied."""
        for lab in reversed(self._labs):
            if lab.result.seq == seq:
                return frozenset(lab.accepted)
        return None

    def apply_lab_result(self, result: LabResult) -> StateEstimate:
        """Apply one lab result at its draw time and bring the estimate forward to now.

        A result already applied (same ``seq`` and draw time) is ignored. A
        result drawn before the oldest kept estimate (``history_h``) or after
        now is rejected and logged: applying it at another time would be wrong.
        """
        now_h = self.process_time_h
        taken_h = float(result.taken_at_h)
        if any(lab.result.seq == result.seq and lab.result.taken_at_h == taken_h for lab in self._labs):
            log.info("lab_result_duplicate", seq=result.seq, taken_at_h=taken_h)
            return self.estimate
        if not math.isfinite(taken_h) or taken_h > now_h + TIME_TOLERANCE_H:
            log.warning("lab_result_rejected", reason="drawn after the current estimate", seq=result.seq, taken_at_h=taken_h, process_time_h=now_h)
            return self.estimate
        start = self._entry_at_or_before(taken_h)
        if start is None:
            log.warning("lab_result_rejected", reason="drawn before the kept history", seq=result.seq, taken_at_h=taken_h, oldest_h=self._entries[0].time_h)
            return self.estimate
        entries, update = self._reprocess(start, result)
        self._count(update, "lab_value_rejected", taken_h, seq=result.seq)
        self._test_consistency(update, now_h)
        self._entries[start:] = entries
        self._labs.append(_AppliedLab(result, tuple(update.accepted)))
        log.info(
            "lab_result_applied",
            seq=result.seq,
            taken_at_h=taken_h,
            delay_h=round(now_h - taken_h, 3),
            reprocessed_cycles=len(entries) - 1,
            fields=sorted(update.accepted),
        )
        self._prune()
        return self.estimate

    def observe(self, observation: CycleObservation) -> tuple[np.ndarray, np.ndarray]:
        """:class:`~controller.nmpc.StateSource`: one cycle from the runtime's observation, state and parameters to plan with.

        Feed rates come from the totaliser increments since the previous
        observation. The temperature setpoint of an interval is the one this
        observation reads back: the runtime writes its setpoints right after a
        cycle's read, so they are in force over the interval that ends now (a
        change the PLC makes itself exactly at a boundary thus shows one
        interval early, which the temperature measurement corrects). The totaliser reference is saved with
        :meth:`to_dict`, so a restored filter resumes across a gap exactly.
        The first call of a new filter only sets that reference; it should
        come at the filter's own time (inoculation).
        """
        previous = self._totalisers
        if previous is None:
            if observation.process_time_h > self.process_time_h + TIME_TOLERANCE_H:
                log.warning("inputs_unknown", reason="first observation after the estimate; feeds taken as zero", from_h=self.process_time_h, to_h=observation.process_time_h)
            u = np.array([0.0, 0.0, observation.applied.temperature_degc])
        else:
            u = delivered_inputs(
                previous_feed_total_l=previous.feed_total_l,
                feed_total_l=observation.feed_total_l,
                previous_glucose_feed_total_l=previous.glucose_feed_total_l,
                glucose_feed_total_l=observation.glucose_feed_total_l,
                dt_h=max(observation.process_time_h - previous.process_time_h, TIME_TOLERANCE_H),
                temperature_setpoint_degc=observation.applied.temperature_degc,
            )
        labs = (observation.lab_result,) if observation.lab_result is not None else ()
        estimate = self.step(observation.process_time_h, u, observation.online, labs)
        self._totalisers = _Totalisers(observation.process_time_h, observation.feed_total_l, observation.glucose_feed_total_l)
        return np.array(estimate.state), np.array(estimate.parameters)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-compatible plain data (NaN lab fields become None)."""

        def lab_dict(lab: _AppliedLab) -> dict[str, Any]:
            values = {name: (v if math.isfinite(v) else None) for name, v in lab.result.values().items()}
            return {"seq": lab.result.seq, "taken_at_h": lab.result.taken_at_h, "values": values, "accepted": list(lab.accepted)}

        return {
            "version": SERIAL_FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "nominal_parameters": self._core.p_nominal.tolist(),
            "entries": [
                {
                    "time_h": e.time_h,
                    "z": e.z.tolist(),
                    "covariance": e.covariance.tolist(),
                    "online": dict(e.online),
                    "inputs": None if e.inputs is None else e.inputs.tolist(),
                    "noise_scale": None if e.noise_scale is None else e.noise_scale.tolist(),
                }
                for e in self._entries
            ],
            "labs": [lab_dict(lab) for lab in self._labs],
            "rejected": dict(self._rejected),
            "consecutive_rejections": dict(self._consecutive),
            "totalisers": None if self._totalisers is None else asdict(self._totalisers),
            "consistency": self._monitor.to_dict(),
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        model: CultureModel,
        *,
        functions: EkfFunctions | None = None,
        config: EstimatorConfig | None = None,
        nominal_parameters: np.ndarray | None = None,
    ) -> ExtendedKalmanEstimator:
        """Resume a filter saved by :meth:`to_dict`.

        ``config`` and ``nominal_parameters``, when given, replace the saved
        ones: a restarted runtime filters with the settings it was started
        with (and audits), not the ones in force before. The estimated
        parameters must be the same ones (the saved state has their slots).
        """
        if data.get("version") not in READABLE_FORMAT_VERSIONS:
            raise EstimatorInputError(f"saved estimator has format version {data.get('version')!r}, expected one of {READABLE_FORMAT_VERSIONS}")
        saved_config = EstimatorConfig.model_validate(data["config"])
        config = config or saved_config
        saved_names = [p.name for p in saved_config.parameters]
        if [p.name for p in config.parameters] != saved_names:
            raise EstimatorInputError(
                f"the saved estimator estimates {', '.join(saved_names)}; the configured one estimates {', '.join(p.name for p in config.parameters)}: it cannot resume this filter"
            )
        nominal = np.asarray(data["nominal_parameters"] if nominal_parameters is None else nominal_parameters, dtype=float)
        first = data["entries"][0]
        estimator = cls(model, nominal, np.asarray(first["z"])[: model.n_states], config, functions=functions)
        estimator._entries = [
            _Entry(
                float(e["time_h"]),
                np.asarray(e["z"], dtype=float),
                np.asarray(e["covariance"], dtype=float),
                {k: float(v) for k, v in e["online"].items()},
                None if e["inputs"] is None else np.asarray(e["inputs"], dtype=float),
                None if e.get("noise_scale") is None else np.asarray(e["noise_scale"], dtype=float),
            )
            for e in data["entries"]
        ]
        estimator._labs = [
            _AppliedLab(
                LabResult(
                    seq=int(lab["seq"]),
                    taken_at_h=float(lab["taken_at_h"]),
                    **{name: (math.nan if lab["values"][name] is None else float(lab["values"][name])) for name in LAB_FIELDS},
                ),
                tuple(lab["accepted"]),
            )
            for lab in data["labs"]
        ]
        estimator._rejected.update({k: int(v) for k, v in data["rejected"].items()})
        estimator._consecutive.update({k: int(v) for k, v in data["consecutive_rejections"].items()})
        if data.get("totalisers") is not None:
            estimator._totalisers = _Totalisers(**{k: float(v) for k, v in data["totalisers"].items()})
        estimator._monitor.restore(data.get("consistency") or {})
        return estimator

    def widen(self, sd_scale: float) -> None:
        """Multiply the current state's standard deviations by ``sd_scale`` (a take-over from readings knows less than a batch record)."""
        if not (math.isfinite(sd_scale) and sd_scale >= 1.0):
            raise EstimatorInputError(f"sd_scale must be a finite number >= 1, got {sd_scale!r}")
        last = self._entries[-1]
        n_x = self._core.n_x
        covariance = last.covariance.copy()
        covariance[:n_x, :] *= sd_scale
        covariance[:, :n_x] *= sd_scale
        self._entries[-1] = replace(last, covariance=covariance)

    def checkpoint(self) -> object:
        """The filter's state now, for :meth:`rollback` (an opaque token).

        Shallow copies: entries, applied lab results and totalisers are frozen
        and replaced, never changed in place.
        """
        return (list(self._entries), list(self._labs), dict(self._rejected), dict(self._consecutive), self._totalisers, dict(self._monitor.signals))

    def rollback(self, token: object) -> None:
        """Return to a :meth:`checkpoint`: a cycle whose update failed half-way leaves no trace."""
        saved: tuple[list[_Entry], list[_AppliedLab], dict[str, int], dict[str, int], _Totalisers | None, dict[str, SignalConsistency]] = token  # type: ignore[assignment]
        entries, labs, rejected, consecutive, totalisers, consistency = saved
        self._entries, self._labs, self._rejected, self._consecutive, self._totalisers = list(entries), list(labs), dict(rejected), dict(consecutive), totalisers
        self._monitor.signals = dict(consistency)

    # ------------------------------------------------------------------ bookkeeping

    def _online_values(self, online: Mapping[str, float]) -> dict[str, float]:
        unknown = sorted(set(online) - set(ONLINE_MEASUREMENTS))
        if unknown:
            raise KeyError(f"unknown online measurements {unknown}; expected some of {', '.join(ONLINE_MEASUREMENTS)}")
        return {name: float(v) for name, v in online.items() if v is not None and math.isfinite(float(v))}

    def _gate_open(self) -> frozenset[str]:
        """Signals rejected often enough in a row to be believed again: the estimate, not the sensor, is then likely wrong."""
        config = self.config
        return frozenset(
            name for name, count in self._consecutive.items() if count >= (config.online_gate_release_count if name in ONLINE_MEASUREMENTS else config.lab_gate_release_count)
        )

    def _count(self, update: _Update, event: str, t_h: float, **context: Any) -> None:
        """Commit rejection counters and log each rejection and each gate release."""
        for name, value, predicted, sigma in update.rejected:
            self._rejected[name] += 1
            self._consecutive[name] += 1
            log.warning(event, field=name, value=value, predicted=round(predicted, 6), sigma=round(sigma, 6), process_time_h=t_h, **context)
        for name in update.released:
            log.warning("gate_released", field=name, after_rejections=self._consecutive[name], process_time_h=t_h, **context)
        for name in update.accepted:
            self._consecutive[name] = 0

    def _test_consistency(self, update: _Update, t_h: float) -> None:
        """Hand every gated value's NIS to the consistency monitor (rejected values too: a persistent disagreement inflates, never locks out)."""
        for name, value in update.normalised.items():
            self._monitor.record(name, value, t_h)

    def _entry_at_or_before(self, t_h: float) -> int | None:
        for index in range(len(self._entries) - 1, -1, -1):
            if self._entries[index].time_h <= t_h + TIME_TOLERANCE_H:
                return index
        return None

    def _reprocess(self, start: int, new: LabResult) -> tuple[list[_Entry], _Update]:
        """Re-run the filter from entry ``start`` with ``new`` applied at its draw time.

        Lab results applied before and drawn after the start entry are
        re-applied with the fields accepted then; stored online values are
        re-applied ungated. Returns the rewritten entries and the new result's
        update; nothing is committed, so a failure leaves the filter as it was.
        """
        old = self._entries[start:]
        t_start = old[0].time_h
        pending = sorted(
            [(lab.result.taken_at_h, lab.result, lab.accepted, False) for lab in self._labs if lab.result.taken_at_h > t_start + TIME_TOLERANCE_H],
            key=lambda item: item[0],
        )
        pending.append((float(new.taken_at_h), new, (), True))
        pending.sort(key=lambda item: item[0])
        z, covariance = old[0].z, old[0].covariance
        t_h = t_start
        new_update: _Update | None = None
        rewritten: list[_Entry] = []
        for k, entry in enumerate(old):
            if k > 0:
                u = self._inputs_or_hold(old[k - 1].inputs)
                while pending and pending[0][0] < entry.time_h - TIME_TOLERANCE_H:
                    draw_h = pending[0][0]
                    if draw_h > t_h + TIME_TOLERANCE_H:
                        z, covariance = self._core.predict(t_h, z, covariance, u, draw_h - t_h, old[k - 1].noise_scale)
                        t_h = draw_h
                    z, covariance, new_update = self._apply_pending(t_h, z, covariance, u, pending.pop(0), new_update)
                if entry.time_h > t_h + TIME_TOLERANCE_H:
                    z, covariance = self._core.predict(t_h, z, covariance, u, entry.time_h - t_h, old[k - 1].noise_scale)
                t_h = entry.time_h
                update = self._core.update(t_h, z, covariance, u, entry.online, gated=False)
                z, covariance = update.z, update.covariance
            while pending and pending[0][0] <= t_h + TIME_TOLERANCE_H:
                z, covariance, new_update = self._apply_pending(t_h, z, covariance, entry.inputs, pending.pop(0), new_update)
            z = self._core.project(t_h, z, log_changes=False)
            _check_finite(t_h, z, covariance)
            rewritten.append(replace(entry, z=z, covariance=covariance))
        if new_update is None or pending:
            raise EstimatorDivergedError("lab result could not be replayed within the kept history", process_time_h=t_h)
        return rewritten, new_update

    def _apply_pending(
        self,
        t_h: float,
        z: np.ndarray,
        covariance: np.ndarray,
        inputs: np.ndarray | None,
        item: tuple[float, LabResult, tuple[str, ...], bool],
        new_update: _Update | None,
    ) -> tuple[np.ndarray, np.ndarray, _Update | None]:
        _, result, accepted, is_new = item
        u = self._inputs_or_hold(inputs)
        if is_new:
            values = {name: float(v) for name, v in result.values().items() if math.isfinite(v)}
            update = self._core.update(t_h, z, covariance, u, values, gated=True, gate_open=self._gate_open())
            return self._core.project(t_h, update.z, log_changes=False), update.covariance, update
        values = {name: float(getattr(result, name)) for name in accepted}
        update = self._core.update(t_h, z, covariance, u, values, gated=False)
        return self._core.project(t_h, update.z, log_changes=False), update.covariance, new_update

    def _inputs_or_hold(self, inputs: np.ndarray | None) -> np.ndarray:
        if inputs is not None:
            return inputs
        held = self._entries[-2].inputs if len(self._entries) > 1 else None
        return held if held is not None else np.array([0.0, 0.0, float(self._entries[-1].z[STATE_INDEX["temperature"]])])

    def _prune(self) -> None:
        oldest_h = self.process_time_h - self.config.history_h
        keep_from = 0
        while keep_from < len(self._entries) - 1 and self._entries[keep_from + 1].time_h <= oldest_h:
            keep_from += 1
        del self._entries[:keep_from]
        first_h = self._entries[0].time_h
        self._labs = [lab for lab in self._labs if lab.result.taken_at_h > first_h - TIME_TOLERANCE_H]

    def _estimate_of(self, t_h: float, z: np.ndarray, covariance: np.ndarray) -> StateEstimate:
        sd = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
        n_x = self._core.n_x
        return StateEstimate(
            process_time_h=t_h,
            state=frozen_array(z[:n_x]),
            state_sd=frozen_array(sd[:n_x]),
            multipliers=MappingProxyType({name: float(math.exp(v)) for name, v in zip(self._core.names, z[n_x:], strict=True)}),
            multiplier_log_sd=MappingProxyType({name: float(v) for name, v in zip(self._core.names, sd[n_x:], strict=True)}),
            parameters=frozen_array(self._core.parameters_of(z)),
            covariance=frozen_array(covariance),
            rejected_online=sum(self._rejected[name] for name in ONLINE_MEASUREMENTS),
            rejected_lab=sum(self._rejected[name] for name in LAB_MEASUREMENTS),
        )
