"""Forecasts from the estimator's belief: mean and uncertainty ahead, the recipe's outcome, early warnings.

:func:`forecast` takes the filter's last posterior (time, augmented mean
``z = [x, θ]`` and covariance) and runs the filter's own prediction forward
with no measurements: the mean through RK4 on the shared culture model, the
covariance as ``P ← F P Fᵀ + Q`` with the filter's process noise (times the consistency monitor's inflation now) and its
parameter uncertainty (θ keeps its random walk), so the band widens with the
horizon and with what the filter does not know. The inputs of each step come
from an :class:`InputSchedule`: the NMPC's plan (:func:`plan_schedule`), the
platform recipe (:func:`recipe_schedule`) or any function of time.

Speed and accuracy. The filter integrates with RK4 substeps of 1/6 h (its
``integration_substep_h``): a 360 h forecast that way takes about 135 ms. A
forecast uses one RK4 substep per hour (:data:`FORECAST_SUBSTEP_H`, the
Jacobian of that one substep for ``F``) and evaluates its CasADi map through a
:class:`casadi.FunctionBuffer`: about 27 ms for 360 h with a
:class:`ForecastKernel` built once (build 9 ms), most of it the Jacobian
(``benchmarks/forecast_speed.py``, 2-core machine). What the coarser substep
gives up, relative to the filter's integration, at 360 h from inoculation
(``tests/test_forecast.py``):

- under the platform recipe: mean 1.4e-6 at most (base added; VCD 7e-7,
  titer 4e-7), sd 2.3e-4 (temperature, a fast first-order lag; titer 1e-6);
- through a glucose starvation (constant glucose feed, glucose down to
  0.08 g/L on day 4, where the dynamics are least smooth): mean 5e-5
  (base added; VCD, glucose and titer 3e-6), sd 1.2e-2 (base added; titer
  5e-5, volume 4e-4).

Over a single 1 h step: mean 1e-6, sd 4e-4 (temperature). All of this is
orders of magnitude below the forecast's own sd (35 % on titer at 360 h
from a fresh filter).

:func:`early_warnings` turns a forecast into alarms raised ahead of time: a
limit whose normal-approximation probability of being crossed reaches a
threshold within a window.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import casadi as ca
import numpy as np
from pydantic import Field, model_validator

from controller.config import BatchConfig
from controller.estimator import (
    MEASUREMENT_NAMES,
    NONNEGATIVE_STATES,
    SUBSTEPS_PER_CALL,
    TIME_TOLERANCE_H,
    EkfFunctions,
    ExtendedKalmanEstimator,
    frozen_array,
)
from controller.kpis import batch_score_g_per_day
from controller.recipe import PlatformRecipe
from controller.types import LAB_FIELDS, LabResult
from plant_models.cho import STATE_INDEX, STATES, CultureModel
from plant_models.config_loading import FrozenConfig
from plant_models.errors import BioreactorMPCError
from plant_models.parameters import MediaComposition

if TYPE_CHECKING:
    from controller.mpc import MpcSolution

FORECAST_SUBSTEP_H = 1.0
"""Longest RK4 substep of a forecast [h]: 6× the filter's (accuracy in the module docstring)."""

OUTPUT_MEASUREMENTS: dict[str, str] = {"viability": "viability_pct", "osmolality": "osmolality_mosm_per_kg"}
"""Model outputs a forecast carries (the screen's) → the filter's measurement that predicts them."""

_VOLUME = STATE_INDEX["volume"]
_GLUCOSE = STATE_INDEX["glucose"]
_TITER = STATE_INDEX["titer"]
_NONNEGATIVE = np.array([STATE_INDEX[name] for name in NONNEGATIVE_STATES])


class ForecastInputError(ValueError, BioreactorMPCError):
    """A forecast was asked for something it cannot do: a horizon before the estimate, a bad step or schedule."""


class ForecastDivergedError(ArithmeticError, BioreactorMPCError):
    """The forecast became non-finite (the model was driven far outside its domain)."""


# --------------------------------------------------------------------------- the estimator's belief


@dataclass(frozen=True)
class _Belief:
    time_h: float
    z: np.ndarray
    covariance: np.ndarray
    nominal_parameters: np.ndarray
    functions: EkfFunctions


def _belief(estimator: ExtendedKalmanEstimator) -> _Belief:
    """The estimator's last posterior exactly as it holds it, with what is needed to predict from it.

    The one place this module reads the estimator's private attributes: its
    public :class:`~controller.estimator.StateEstimate` carries the
    multipliers as exp(θ) (a log round trip) and exposes neither the nominal
    parameter vector nor the compiled :class:`EkfFunctions`. Arrays are
    copies.
    """
    entry = estimator._entries[-1]
    core = estimator._core
    return _Belief(entry.time_h, entry.z.copy(), entry.covariance.copy(), core.p_nominal.copy(), core.functions)


# --------------------------------------------------------------------------- kernel


class _Buffered:
    """One CasADi function evaluated on numpy arrays bound once (no conversion per call): one input vector, one output vector."""

    def __init__(self, function: ca.Function) -> None:
        self.arg = np.zeros(function.nnz_in(0))
        self.res = np.zeros(function.nnz_out(0))
        self._buffer, self._evaluate = function.buffer()
        self._buffer.set_arg(0, memoryview(self.arg))  # type: ignore[call-arg, arg-type]  # CasADi's stubs miss the one-argument form
        self._buffer.set_res(0, memoryview(self.res))  # type: ignore[call-arg, arg-type]

    def __call__(self) -> np.ndarray:
        self._evaluate()
        if self._buffer.ret() != 0:
            raise ForecastDivergedError("CasADi evaluation of the forecast step failed")
        return self.res


class ForecastKernel:
    """The filter's prediction for one estimator, with a coarser RK4 substep, and the screen's outputs with their Jacobian.

    ``predict(t_h, z, P, u, dt_h)`` is :meth:`_FilterCore.predict`'s
    arithmetic: ``dt_h`` is cut into calls of at most ``substeps_per_call ×
    substep_h``; each call integrates ``substeps_per_call`` RK4 substeps and
    adds the filter's process noise ``Q`` (from the estimator's config) over
    the call. The default (one substep of at most 1 h per call) is about 6×
    cheaper than the filter's; :meth:`like_filter` builds the filter's own
    integration (6 substeps of 1/6 h per call) for comparison.

    Build once per estimator (about 9 ms) and pass it to :func:`forecast`
    every cycle. A kernel holds no evaluation state: each forecast evaluates
    on buffers of its own.
    """

    def __init__(
        self,
        estimator: ExtendedKalmanEstimator,
        *,
        model: CultureModel | None = None,
        substep_h: float = FORECAST_SUBSTEP_H,
        substeps_per_call: int = 1,
    ) -> None:
        if not (math.isfinite(substep_h) and substep_h > 0.0) or substeps_per_call < 1:
            raise ForecastInputError(f"substep_h must be > 0 and substeps_per_call ≥ 1, got {substep_h!r} and {substeps_per_call!r}")
        model = model or CultureModel()
        belief = _belief(estimator)
        functions = belief.functions
        config = estimator.config
        self.estimated = functions.estimated
        self.n_x = functions.n_states
        self.n_z = belief.z.size
        self.nominal_parameters = belief.nominal_parameters
        self.substep_h = float(substep_h)
        self.substeps_per_call = int(substeps_per_call)
        by_state = [config.states[s.name] for s in STATES]
        self._q_rel = np.array([s.process_relative_sd_per_sqrt_h for s in by_state])
        self._q_floor = np.array([s.process_floor_sd_per_sqrt_h for s in by_state])
        self._q_theta = np.array([p.random_walk_log_sd_per_sqrt_h for p in config.parameters]) ** 2

        t, dt = ca.SX.sym("t"), ca.SX.sym("dt")
        z = ca.SX.sym("z", self.n_z)
        u = ca.SX.sym("u", model.n_inputs)
        p_nominal = ca.SX.sym("p", model.n_parameters)
        p = functions.parameters(z, p_nominal)
        _, x_next = model.rk4(t, z[: self.n_x], u, p, dt, self.substeps_per_call)
        z_next = ca.vertcat(x_next, z[self.n_x :])
        packed = ca.vertcat(t, dt, u, z, p_nominal)
        self._step = ca.Function("forecast_step", [packed], [ca.vertcat(z_next, ca.vec(ca.densify(ca.jacobian(z_next, z))))])
        y_all, _ = functions.measure(t, z, u, p_nominal)
        rows = [MEASUREMENT_NAMES.index(name) for name in OUTPUT_MEASUREMENTS.values()]
        y = ca.vertcat(*(y_all[i] for i in rows))
        self._outputs = ca.Function("forecast_outputs", [packed], [ca.vertcat(y, ca.vec(ca.densify(ca.jacobian(y, z))))])
        self._n_u = model.n_inputs

    @classmethod
    def like_filter(cls, estimator: ExtendedKalmanEstimator, *, model: CultureModel | None = None) -> ForecastKernel:
        """The filter's own integration (its substep, :data:`SUBSTEPS_PER_CALL` per call): the reference for accuracy."""
        return cls(estimator, model=model, substep_h=estimator.config.integration_substep_h, substeps_per_call=SUBSTEPS_PER_CALL)

    def _fits(self, belief: _Belief) -> bool:
        return belief.functions.estimated == self.estimated and np.array_equal(belief.nominal_parameters, self.nominal_parameters)

    def _session(self, noise_scale: np.ndarray | None = None) -> _KernelSession:
        """Evaluation buffers for one forecast; ``noise_scale`` multiplies the process noise of each element of z (the consistency monitor's inflation)."""
        return _KernelSession(self, _Buffered(self._step), _Buffered(self._outputs), noise_scale)


class _KernelSession:
    """A kernel's functions bound to buffers of their own: what one forecast evaluates, step by step."""

    def __init__(self, kernel: ForecastKernel, step: _Buffered, outputs: _Buffered, noise_scale: np.ndarray | None = None) -> None:
        self._k = kernel
        self._noise_scale = None if noise_scale is None else np.asarray(noise_scale, dtype=float).copy()
        self._step = step
        self._outputs = outputs
        n_u, n_z = kernel._n_u, kernel.n_z
        for buffered in (step, outputs):
            buffered.arg[2 + n_u + n_z :] = kernel.nominal_parameters
        self._u = slice(2, 2 + n_u)
        self._z = slice(2 + n_u, 2 + n_u + n_z)
        self._q = np.zeros(n_z)

    def predict(self, t_h: float, z: np.ndarray, covariance: np.ndarray, u: np.ndarray, dt_h: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance ``dt_h`` ahead with inputs ``u`` held (the filter's predict on the kernel's substeps).

        Only the mean is checked for finiteness here; :func:`forecast` checks
        the covariances once at the end.
        """
        k = self._k
        n_calls = max(1, math.ceil(dt_h / (k.substeps_per_call * k.substep_h) - 1e-9))
        h = dt_h / n_calls
        n_x, n_z = k.n_x, k.n_z
        arg = self._step.arg
        arg[1] = h
        arg[self._u] = u
        q = self._q
        for _ in range(n_calls):
            np.maximum(k._q_rel * np.abs(z[:n_x]), k._q_floor, out=q[:n_x])
            q[:n_x] **= 2
            q[n_x:] = k._q_theta
            if self._noise_scale is not None:
                q *= self._noise_scale
            arg[0] = t_h
            arg[self._z] = z
            res = self._step()
            z = res[:n_z].copy()
            jacobian = res[n_z:].reshape((n_z, n_z), order="F")
            covariance = jacobian @ covariance @ jacobian.T
            covariance.flat[:: n_z + 1] += q * h
            t_h += h
        if not np.isfinite(z).all():
            raise ForecastDivergedError(f"forecast became non-finite at process time {t_h:.3f} h")
        return z, 0.5 * (covariance + covariance.T)

    def outputs(self, t_h: float, z: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means of :data:`OUTPUT_MEASUREMENTS` and their Jacobian with respect to z (the filter's measurement map)."""
        arg = self._outputs.arg
        arg[0] = t_h
        arg[self._u] = u
        arg[self._z] = z
        res = self._outputs()
        n_y = len(OUTPUT_MEASUREMENTS)
        return res[:n_y].copy(), res[n_y:].reshape((n_y, self._k.n_z), order="F").copy()


# --------------------------------------------------------------------------- input schedules

InputFunction = Callable[[float, np.ndarray], "Sequence[float] | np.ndarray"]
"""(start time of a step [h], forecast mean of the 12 states then) → (feed L/h, glucose feed L/h, temperature setpoint °C)."""


@runtime_checkable
class InputSchedule(Protocol):
    """The inputs a forecast applies. ``begin`` gives a fresh input function for one forecast that starts at ``start_h``.

    The input function is called once per step, in time order, with the
    forecast's mean state at the step's start, so a schedule may react to the
    forecast as its real counterpart would react to the plant (the recipe's
    feed stop and glucose arithmetic do).
    """

    def begin(self, start_h: float) -> InputFunction: ...


@dataclass(frozen=True)
class _TimeSchedule:
    """A plain function of time as a schedule."""

    inputs_at: Callable[[float], Sequence[float] | np.ndarray]

    def begin(self, start_h: float) -> InputFunction:
        return lambda t_h, _state: self.inputs_at(t_h)


@dataclass(frozen=True)
class PlanSchedule:
    """An NMPC plan's inputs, piecewise constant over its stages, the last stage's held after it."""

    stage_starts_h: np.ndarray
    inputs: np.ndarray
    """(3, stages): the inputs of each stage of positive length."""

    def begin(self, start_h: float) -> InputFunction:
        return self.inputs_at

    def inputs_at(self, t_h: float, _state: np.ndarray | None = None) -> np.ndarray:
        index = int(np.searchsorted(self.stage_starts_h, t_h + TIME_TOLERANCE_H, side="right")) - 1
        return self.inputs[:, min(max(index, 0), self.inputs.shape[1] - 1)]


def plan_schedule(solution: MpcSolution, *, glucose_max_lph: float = math.inf, limited_until_h: float = math.inf) -> PlanSchedule:
    """The plan of a successful solve as a schedule (stages of zero length after the harvest are dropped).

    ``glucose_max_lph``: the glucose feed of every stage that starts before ``limited_until_h`` is at most this: the plan as it is
    written while the NMPC's glucose limit holds (:meth:`controller.nmpc.NmpcController.glucose_ceiling_lph`; the next lab
    results move the ceiling, so it is held over the window a forecast warns in, not to the harvest). NaN or inf: no limit.

    Raises :class:`ForecastInputError` for a failed solve or a plan that is
    not finite: the solver's answer is not trusted blindly.
    """
    if not solution.success:
        raise ForecastInputError(f"cannot forecast a failed plan ({solution.reason or solution.status})")
    starts = np.asarray(solution.stage_times_h, dtype=float)
    inputs = np.asarray(solution.inputs, dtype=float)
    if starts.ndim != 1 or inputs.shape != (3, starts.size) or starts.size == 0:
        raise ForecastInputError(f"plan has {starts.shape} stage times and inputs of shape {inputs.shape}; expected (n,) and (3, n)")
    if not (np.all(np.isfinite(starts)) and np.all(np.isfinite(inputs)) and math.isfinite(solution.harvest_time_h)):
        raise ForecastInputError("plan has non-finite stage times, inputs or harvest time")
    durations = np.diff(np.append(starts, solution.harvest_time_h))
    keep = durations > TIME_TOLERANCE_H
    keep[0] = True
    stage_starts, stage_inputs = starts[keep].copy(), inputs[:, keep].copy()
    if math.isfinite(glucose_max_lph):
        limited = stage_starts < limited_until_h
        stage_inputs[1, limited] = np.minimum(stage_inputs[1, limited], glucose_max_lph)
    stage_starts.setflags(write=False)
    stage_inputs.setflags(write=False)
    return PlanSchedule(stage_starts, stage_inputs)


class LabSampling(FrozenConfig):
    """When the lab samples are drawn and their results published, as a forecast of the recipe assumes."""

    first_draw_h: float = Field(default=0.0, ge=0.0, description="process time of the first draw [h]")
    interval_h: float = Field(default=24.0, gt=0.0, description="time between draws [h]")
    result_delay_h: float = Field(default=4.0, ge=0.0, description="draw to published result; the platform's results take 3–5 h [h]")

    @model_validator(mode="after")
    def _published_before_next(self) -> LabSampling:
        if self.result_delay_h >= self.interval_h:
            raise ValueError("result_delay_h must be below interval_h")
        return self


@dataclass(frozen=True)
class RecipeSchedule:
    """The platform recipe's setpoints from the forecast's start on, reacting to the forecast as the PLC's recipe reacts to the plant.

    Each forecast works on a copy of the live recipe as it is when the
    forecast begins (what it has learned from lab results so far); the live
    object is never changed. On the copy:

    - the high-level feed stop sees the forecast's mean volume;
    - the daily lab samples are emulated: drawn at the :class:`LabSampling`
      times at or after the start (the forecast's mean glucose, viability and
      volume at the first step at or after the draw), published
      ``result_delay_h`` later into the copy's glucose arithmetic, with the
      glucose both feeds delivered counted from ``glucose_delivered_g`` at
      the start. A low emulated viability makes the copy's harvest due.

    A sample drawn before the start and not yet published is not emulated:
    the live recipe receives it when it is published, the forecast's copy
    only the next emulated one.
    """

    recipe: PlatformRecipe
    media: MediaComposition
    glucose_delivered_g: float
    sampling: LabSampling

    def begin(self, start_h: float) -> RecipeRun:
        return RecipeRun(copy.deepcopy(self.recipe), self.media, self.glucose_delivered_g, self.sampling, start_h)


class RecipeRun:
    """One forecast's recipe: the copy, the emulated samples, and the first time the recipe called for harvest."""

    def __init__(self, recipe: PlatformRecipe, media: MediaComposition, glucose_delivered_g: float, sampling: LabSampling, start_h: float) -> None:
        self._recipe = recipe
        self._media = media
        self._delivered_g = glucose_delivered_g
        self._sampling = sampling
        draws_before = math.ceil((start_h - sampling.first_draw_h - TIME_TOLERANCE_H) / sampling.interval_h)
        self._next_draw_h = sampling.first_draw_h + max(0, draws_before) * sampling.interval_h
        self._pending: list[tuple[float, LabResult, float, float]] = []
        self._seq = 0
        self._previous: tuple[float, np.ndarray] | None = None
        self.harvest_due_h: float | None = None
        """The first step start at which the copy's setpoints asked for harvest (a low emulated viability), if any."""

    def __call__(self, t_h: float, state: np.ndarray) -> np.ndarray:
        if self._previous is not None:
            previous_h, u = self._previous
            self._delivered_g += self._media.glucose_delivered_g(u[0] * (t_h - previous_h), u[1] * (t_h - previous_h))
        while self._pending and self._pending[0][0] <= t_h + TIME_TOLERANCE_H:
            _, result, volume_l, delivered_g = self._pending.pop(0)
            self._recipe.on_lab_result(result, volume_l=volume_l, glucose_delivered_g=delivered_g)
        if self._next_draw_h <= t_h + TIME_TOLERANCE_H:
            self._draw(t_h, state)
            while self._next_draw_h <= t_h + TIME_TOLERANCE_H:
                self._next_draw_h += self._sampling.interval_h
        setpoints = self._recipe.setpoints(t_h, volume_l=float(state[_VOLUME]))
        if setpoints.harvest and self.harvest_due_h is None:
            self.harvest_due_h = t_h
        u = np.array([setpoints.feed_rate_lph, setpoints.glucose_rate_lph, setpoints.temperature_degc])
        self._previous = (t_h, u)
        return u

    def _draw(self, t_h: float, state: np.ndarray) -> None:
        self._seq += 1
        viable, dead = state[STATE_INDEX["viable_cells"]], state[STATE_INDEX["dead_cells"]]
        values = dict.fromkeys(LAB_FIELDS, math.nan)
        values["glucose_g_per_l"] = float(state[_GLUCOSE])
        # The model's viability output (plant_models.cho): viable share of all cells.
        values["viability_pct"] = float(100.0 * viable / (viable + dead)) if viable + dead > 0.0 else math.nan
        result = LabResult(seq=self._seq, taken_at_h=t_h, **values)
        self._pending.append((t_h + self._sampling.result_delay_h, result, float(state[_VOLUME]), self._delivered_g))


def recipe_schedule(recipe: PlatformRecipe, *, media: MediaComposition, glucose_delivered_g: float, sampling: LabSampling | None = None) -> RecipeSchedule:
    """The platform recipe from now on (see :class:`RecipeSchedule`); ``recipe`` is the live object, copied per forecast.

    ``glucose_delivered_g``: nominal glucose both feeds delivered since
    inoculation, now (``media.glucose_delivered_g`` of the two totalisers, as the live recipe
    is told with each lab result); 0 at inoculation.
    """
    if not math.isfinite(glucose_delivered_g) or glucose_delivered_g < 0.0:
        raise ForecastInputError(f"glucose_delivered_g must be finite and ≥ 0, got {glucose_delivered_g!r}")
    return RecipeSchedule(recipe, media, float(glucose_delivered_g), sampling or LabSampling())


@dataclass(frozen=True)
class StartedSchedule:
    """A schedule whose single run was begun by the caller (to read the run afterwards)."""

    run: InputFunction

    def begin(self, start_h: float) -> InputFunction:
        return self.run


# --------------------------------------------------------------------------- forecast


@dataclass(frozen=True)
class HarvestOutcome:
    """Titer, product and score at one harvest time, with first-order sds."""

    harvest_time_h: float
    titer_g_per_l: float
    titer_sd_g_per_l: float
    volume_l: float
    product_mass_g: float
    product_mass_sd_g: float
    score_g_per_day: float
    """Product per day of reactor occupancy, turnaround included (:func:`controller.kpis.batch_score_g_per_day`)."""
    score_sd_g_per_day: float


@dataclass(frozen=True)
class Forecast:
    """Mean and sd from the estimate's time (the first column) ahead; arrays are read-only.

    Names: the 12 model states (``plant_models.cho.STATES``) and the outputs
    of :data:`OUTPUT_MEASUREMENTS` (``viability`` %, ``osmolality``
    mOsm/kg).
    """

    times_h: np.ndarray
    """(k,): the estimate's time, then every ``step_h``, the last one at ``until_h``."""
    state_mean: np.ndarray
    """(12, k)."""
    state_sd: np.ndarray
    """(12, k)."""
    output_mean: Mapping[str, np.ndarray]
    """Output name → (k,)."""
    output_sd: Mapping[str, np.ndarray]
    inputs: np.ndarray
    """(3, k − 1): feed L/h, glucose feed L/h, temperature setpoint °C applied over each step."""
    covariance: np.ndarray
    """(k, n_z, n_z): covariance of the augmented state [x, ln multipliers]."""

    def value(self, name: str) -> np.ndarray:
        """Mean of a state or output over the forecast, (k,)."""
        if name in STATE_INDEX:
            return self.state_mean[STATE_INDEX[name]]
        if name in self.output_mean:
            return self.output_mean[name]
        raise KeyError(f"unknown forecast quantity {name!r}; expected a state ({', '.join(STATE_INDEX)}) or an output ({', '.join(self.output_mean)})")

    def sd(self, name: str) -> np.ndarray:
        """Standard deviation of a state or output over the forecast, (k,)."""
        if name in STATE_INDEX:
            return self.state_sd[STATE_INDEX[name]]
        if name in self.output_sd:
            return self.output_sd[name]
        raise KeyError(f"unknown forecast quantity {name!r}; expected a state ({', '.join(STATE_INDEX)}) or an output ({', '.join(self.output_sd)})")

    def index_at(self, time_h: float) -> int:
        """Index of the first forecast time at or after ``time_h``."""
        if not (self.times_h[0] - TIME_TOLERANCE_H <= time_h <= self.times_h[-1] + TIME_TOLERANCE_H):
            raise ForecastInputError(f"time {time_h!r} h is outside the forecast ({self.times_h[0]:.3f}–{self.times_h[-1]:.3f} h)")
        return min(int(np.searchsorted(self.times_h, time_h - TIME_TOLERANCE_H, side="left")), self.times_h.size - 1)

    def at_harvest(self, turnaround_days: float, *, harvest_h: float | None = None) -> HarvestOutcome:
        """Titer, product mass (titer × volume) and score at harvest: the forecast's end, or the first forecast time at or after ``harvest_h``."""
        k = self.times_h.size - 1 if harvest_h is None else self.index_at(harvest_h)
        time_h = float(self.times_h[k])
        titer, volume = float(self.state_mean[_TITER, k]), float(self.state_mean[_VOLUME, k])
        cov = self.covariance[k]
        mass = titer * volume
        mass_variance = volume**2 * cov[_TITER, _TITER] + titer**2 * cov[_VOLUME, _VOLUME] + 2.0 * titer * volume * cov[_TITER, _VOLUME]
        mass_sd = math.sqrt(max(0.0, float(mass_variance)))
        if time_h <= 0.0 and turnaround_days <= 0.0:
            raise ForecastInputError("the score needs a harvest time or a turnaround above zero")
        score = batch_score_g_per_day(mass, time_h, turnaround_days)
        return HarvestOutcome(
            harvest_time_h=time_h,
            titer_g_per_l=titer,
            titer_sd_g_per_l=float(self.state_sd[_TITER, k]),
            volume_l=volume,
            product_mass_g=mass,
            product_mass_sd_g=mass_sd,
            score_g_per_day=score,
            score_sd_g_per_day=score * mass_sd / mass if mass > 0.0 else 0.0,
        )


def _grid(start_h: float, until_h: float, step_h: float) -> np.ndarray:
    """``start_h``, every ``step_h`` after it, and ``until_h`` (a shorter last step if needed)."""
    times = start_h + step_h * np.arange(math.floor((until_h - start_h) / step_h + 1e-9) + 1)
    if until_h - times[-1] > TIME_TOLERANCE_H:
        return np.append(times, until_h)
    if times.size > 1:
        times[-1] = until_h
    return times


def _checked_inputs(value: Sequence[float] | np.ndarray, t_h: float) -> np.ndarray:
    u = np.asarray(value, dtype=float)
    # Comparisons with NaN are false: this also rejects NaN.
    if u.shape != (3,) or not (0.0 <= u[0] < math.inf and 0.0 <= u[1] < math.inf and -math.inf < u[2] < math.inf):
        raise ForecastInputError(f"schedule gave {value!r} at {t_h:.3f} h; expected (feed L/h ≥ 0, glucose L/h ≥ 0, temperature °C), finite")
    return u


def forecast(
    estimator: ExtendedKalmanEstimator,
    schedule: Callable[[float], Sequence[float] | np.ndarray] | InputSchedule,
    *,
    until_h: float,
    step_h: float = 1.0,
    kernel: ForecastKernel | None = None,
) -> Forecast:
    """Propagate the estimator's current belief to ``until_h`` in steps of ``step_h`` with the schedule's inputs.

    Each step holds the inputs the schedule gives for its start time. The
    mean goes through RK4 and the covariance through ``F P Fᵀ + Q``, the
    filter's own prediction on the kernel's substeps (default one per hour,
    see the module docstring for the accuracy); negative concentrations are
    set to zero after each step, as the filter does after each cycle.
    Viability and osmolality come from the filter's measurement map and its
    Jacobian. The estimator is not changed.

    ``kernel``: a :class:`ForecastKernel` built once for this estimator;
    without one, a kernel is built for this call (about 9 ms more).
    """
    belief = _belief(estimator)
    if not math.isfinite(until_h) or until_h < belief.time_h - TIME_TOLERANCE_H:
        raise ForecastInputError(f"until_h {until_h!r} is before the estimate at {belief.time_h:.3f} h")
    if not math.isfinite(step_h) or step_h <= 0.0:
        raise ForecastInputError(f"step_h must be finite and > 0, got {step_h!r}")
    if kernel is None:
        kernel = ForecastKernel(estimator)
    elif not kernel._fits(belief):
        raise ForecastInputError("the kernel was built for another estimator (estimated parameters or nominal vector differ)")
    run = (schedule if isinstance(schedule, InputSchedule) else _TimeSchedule(schedule)).begin(belief.time_h)
    # The forecast widens as the filter does: where the consistency monitor found the model at odds with the data, its inflation holds ahead too.
    session = kernel._session(estimator.process_noise_scale())
    times = _grid(belief.time_h, max(float(until_h), belief.time_h), float(step_h))
    n, n_x, n_z = times.size, kernel.n_x, kernel.n_z
    z_all = np.empty((n, n_z))
    p_all = np.empty((n, n_z, n_z))
    u_all = np.empty((n - 1, 3))
    y_all = np.empty((n, len(OUTPUT_MEASUREMENTS)))
    y_jacobian = np.empty((n, len(OUTPUT_MEASUREMENTS), n_z))
    z, covariance = belief.z, belief.covariance
    z_all[0], p_all[0] = z, covariance
    for k in range(n - 1):
        t_h = float(times[k])
        u = _checked_inputs(run(t_h, z[:n_x].copy()), t_h)
        u_all[k] = u
        y_all[k], y_jacobian[k] = session.outputs(t_h, z, u)
        z, covariance = session.predict(t_h, z, covariance, u, float(times[k + 1]) - t_h)
        z[_NONNEGATIVE] = np.maximum(z[_NONNEGATIVE], 0.0)
        z_all[k + 1], p_all[k + 1] = z, covariance
    last_u = u_all[-1] if n > 1 else np.array([0.0, 0.0, float(z[STATE_INDEX["temperature"]])])
    y_all[-1], y_jacobian[-1] = session.outputs(float(times[-1]), z, last_u)
    if not np.isfinite(p_all).all():
        raise ForecastDivergedError(f"forecast covariance became non-finite before {float(times[-1]):.3f} h")
    sd = np.sqrt(np.clip(np.diagonal(p_all, axis1=1, axis2=2), 0.0, None))
    y_sd_all = np.sqrt(np.clip(np.einsum("kij,kjl,kil->ki", y_jacobian, p_all, y_jacobian), 0.0, None))
    names = tuple(OUTPUT_MEASUREMENTS)
    return Forecast(
        times_h=frozen_array(times),
        state_mean=frozen_array(z_all[:, :n_x].T),
        state_sd=frozen_array(sd[:, :n_x].T),
        output_mean=MappingProxyType({name: frozen_array(y_all[:, i]) for i, name in enumerate(names)}),
        output_sd=MappingProxyType({name: frozen_array(y_sd_all[:, i]) for i, name in enumerate(names)}),
        inputs=frozen_array(u_all.T),
        covariance=frozen_array(p_all),
    )


def recipe_outcome(
    estimator: ExtendedKalmanEstimator,
    recipe: PlatformRecipe,
    batch: BatchConfig,
    *,
    glucose_delivered_g: float,
    sampling: LabSampling | None = None,
    step_h: float = 1.0,
    kernel: ForecastKernel | None = None,
) -> HarvestOutcome:
    """What the platform recipe would give from the current estimate: titer and score at its harvest.

    The harvest is the recipe's (``batch.recipe.harvest_h``, or the latest
    allowed harvest if earlier), or earlier where an emulated lab viability
    makes the recipe's harvest due; never before now. The recipe is
    forecast as :class:`RecipeSchedule` describes; ``recipe`` itself is not
    changed. This is what the screen shows next to the NMPC's prediction.
    """
    start_h = estimator.process_time_h
    harvest_h = max(start_h, min(batch.recipe.harvest_h, batch.limits.latest_harvest_h))
    run = recipe_schedule(recipe, media=batch.media, glucose_delivered_g=glucose_delivered_g, sampling=sampling).begin(start_h)
    result = forecast(estimator, StartedSchedule(run), until_h=harvest_h, step_h=step_h, kernel=kernel)
    due_h = run.harvest_due_h
    return result.at_harvest(batch.economics.turnaround_days, harvest_h=due_h if due_h is not None else harvest_h)


# --------------------------------------------------------------------------- early warnings


class EarlyWarningConfig(FrozenConfig):
    """When a forecast raises an early warning: which limits, how far ahead, how likely."""

    window_h: float = Field(default=24.0, gt=0.0, le=360.0, description="only crossings within this time from now count [h]")
    probability: float = Field(default=0.2, gt=0.0, lt=1.0, description="warn once the probability of being beyond a limit reaches this [-]")
    viability_min_pct: float = Field(default=70.0, ge=0.0, le=100.0, description="viability below this is a crossing; default the recipe's harvest viability [%]")
    glucose_low: bool = Field(default=True, description="warn of glucose below limits.glucose_min_g_per_l (starvation)")
    osmolality_high: bool = Field(default=True, description="warn of osmolality above limits.osmolality_max_mosm_per_kg")
    viability_low: bool = Field(default=True, description="warn of viability below viability_min_pct")
    volume_high: bool = Field(default=True, description="warn of volume above equipment.max_working_volume_l")


@dataclass(frozen=True)
class EarlyWarning:
    """A limit likely to be crossed within the window, raised ``lead_h`` before the predicted crossing."""

    code: str
    """``early_warning.<quantity>_<low|high>``."""
    message: str
    quantity: str
    """Forecast name of the quantity (``glucose``, ``osmolality``, ``viability``, ``volume``)."""
    limit: float
    first_crossing_h: float
    """First forecast time within the window at which the probability of being beyond the limit reaches the threshold."""
    lead_h: float
    """``first_crossing_h`` minus now."""
    probability: float
    """Largest probability of being beyond the limit over the window (normal approximation)."""


@dataclass(frozen=True)
class _LimitCheck:
    enabled: str
    quantity: str
    below: bool
    label: str
    unit: str
    limit: Callable[[BatchConfig, EarlyWarningConfig], float]


_CHECKS: tuple[_LimitCheck, ...] = (
    _LimitCheck("glucose_low", "glucose", True, "glucose", "g/L", lambda b, c: b.limits.glucose_min_g_per_l),
    _LimitCheck("osmolality_high", "osmolality", False, "osmolality", "mOsm/kg", lambda b, c: b.limits.osmolality_max_mosm_per_kg),
    _LimitCheck("viability_low", "viability", True, "viability", "%", lambda b, c: c.viability_min_pct),
    _LimitCheck("volume_high", "volume", False, "working volume", "L", lambda b, c: b.equipment.max_working_volume_l),
)


def probability_beyond(mean: np.ndarray, sd: np.ndarray, limit: float, *, below: bool) -> np.ndarray:
    """Normal-approximation probability of being below (``below``) or above ``limit``: Φ((limit − μ)/σ) or its complement.

    Where σ is 0 the answer is 1 beyond the limit and 0 otherwise.
    """
    mean, sd = np.asarray(mean, dtype=float), np.asarray(sd, dtype=float)
    beyond = (mean < limit) if below else (mean > limit)
    positive = sd > 0.0
    z = np.divide(limit - mean, sd, out=np.zeros_like(mean), where=positive)
    if not below:
        z = -z
    phi = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z.ravel()]).reshape(z.shape)
    return np.where(positive, phi, beyond.astype(float))


def early_warnings(forecast: Forecast, batch: BatchConfig, config: EarlyWarningConfig, *, now_h: float) -> list[EarlyWarning]:
    """The limits likely to be crossed within ``(now_h, now_h + window_h]``, earliest first.

    A limit warns when, at some forecast time in the window, the probability
    of being beyond it reaches ``config.probability``. Forecast times outside
    the window do not count; a forecast that ends before the window does
    (harvest) is judged on what it covers.
    """
    if not math.isfinite(now_h):
        raise ForecastInputError(f"now_h must be finite, got {now_h!r}")
    times = forecast.times_h
    window = (times > now_h + TIME_TOLERANCE_H) & (times <= now_h + config.window_h + TIME_TOLERANCE_H)
    warnings: list[EarlyWarning] = []
    if not np.any(window):
        return warnings
    for check in _CHECKS:
        if not getattr(config, check.enabled):
            continue
        limit = float(check.limit(batch, config))
        probability = probability_beyond(forecast.value(check.quantity)[window], forecast.sd(check.quantity)[window], limit, below=check.below)
        likely = np.flatnonzero(probability >= config.probability)
        if likely.size == 0:
            continue
        first_h = float(times[window][likely[0]])
        lead_h = first_h - now_h
        worst = float(np.max(probability))
        side = "below" if check.below else "above"
        message = (
            f"{check.label} likely {side} its limit {limit:g} {check.unit} from {first_h:.1f} h, {lead_h:.1f} h ahead: "
            f"probability {probability[likely[0]]:.0%} then, up to {worst:.0%} within {config.window_h:g} h"
        )
        warnings.append(
            EarlyWarning(
                code=f"early_warning.{check.enabled}",
                message=message,
                quantity=check.quantity,
                limit=limit,
                first_crossing_h=first_h,
                lead_h=lead_h,
                probability=worst,
            )
        )
    return sorted(warnings, key=lambda w: w.first_crossing_h)
