"""The perfect-knowledge oracle for a plant of any structure: open-loop optimal control of the true plant model.

The closed-loop campaigns judge the NMPC by the share of the oracle's gain
over the recipe it reaches. On the controller's own CHO model the oracle is
the NMPC fed the true state and parameters; a plant of another structure
needs an oracle that knows *its* equations. A simulated plant is
deterministic (sampling removals and measurement noise do not change the
culture), so with perfect knowledge the best open-loop schedule is the best
closed-loop one: this module computes it from the plant's own CasADi
``rhs`` and ``observables`` (:class:`~simulator.plants.base.EquationPlant`).

Formulation (``docs/oracle.md``):

- Decisions: nutrient feed, glucose feed and temperature setpoint, piecewise
  constant on a grid of ``interval_h`` from inoculation; the harvest time, by a
  search over candidate harvest hours, each a solve of the same NLP (interval
  durations are parameters; an interval after harvest has length 0 and is
  an identity map).
- Objective: product mass at harvest (for a fixed harvest time this is the
  score, product per day of occupancy, times a constant).
- Constraints with the NMPC's meaning (:class:`~controller.mpc.MpcConfig`
  defaults): glucose window, osmolality and working-volume back-offs at every
  RK4 substep; viability and galactosylated fraction at harvest; equipment
  ranges; the temperature setpoint's rate limit. All read from the plant's
  observables, never from its states (except ``volume``'s nonnegativity, like
  every other state's).
- Transcription: multiple shooting, RK4 substeps, SX-expanded, IPOPT with
  MUMPS, warm-started from the platform recipe simulated on the same plant.

The schedule actually replayed (one setpoint triple per control cycle, the
temperature ramped at its rate limit) is simulated again on a fine grid,
checked against the hard limits, and scored. If the solver fails, a check
fails or the recipe scores higher on the plant's own model, the recipe's
schedule is returned instead, and the schedule says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import casadi as ca
import numpy as np
import structlog
from pydantic import Field

from controller.config import BatchConfig
from controller.kpis import batch_score_g_per_day
from controller.mpc import MpcConfig
from controller.recipe import PlatformRecipe
from controller.types import PHASE_RUNNING, UINT32_MAX, LabResult
from plant_models.config_loading import FrozenConfig
from simulator.batch import BatchResult, batch_result, build_simulated_plc
from simulator.closed_loop import write_group
from simulator.config import FeedLotFault, LoadedSimulation, SamplingConfig
from simulator.plants.base import OBSERVABLE_INDEX, EquationPlant

log = structlog.get_logger(__name__)

_MPC_DEFAULTS = MpcConfig()
_FEED, _GLUCOSE, _TEMPERATURE = 0, 1, 2
_Y = OBSERVABLE_INDEX


class OracleSource(str, Enum):
    """Where an oracle schedule came from."""

    OPTIMISED = "optimised"
    RECIPE = "recipe"


class OracleConfig(FrozenConfig):
    """Parametrisation and constraints of the oracle's optimal control problem."""

    interval_h: float = Field(
        default=6.0,
        gt=0.0,
        le=48.0,
        description="length of a piecewise-constant input interval, rounded to whole control cycles; 12 h scores up to 0.4 % lower on the CHO plant [h]",
    )
    max_step_h: float = Field(default=3.0, gt=0.0, le=6.0, description="longest RK4 substep in the NLP, each a shooting node; path constraints hold at every one [h]")
    glucose_margin_g_per_l: float = Field(default=0.2, ge=0.0, description="the plan keeps glucose this far above the batch's starvation limit [g/L]")
    glucose_max_g_per_l: float = Field(default=_MPC_DEFAULTS.glucose_max_g_per_l, gt=0.0, description="upper edge of the glucose window [g/L]")
    volume_backoff_l: float = Field(default=_MPC_DEFAULTS.volume_backoff_l, ge=0.0, description="the plan keeps this far below the maximum working volume [L]")
    osmolality_backoff_mosm_per_kg: float = Field(
        default=_MPC_DEFAULTS.osmolality_backoff_mosm_per_kg, ge=0.0, description="the plan keeps this far below the osmolality limit [mOsm/kg]"
    )
    viability_at_harvest_min_pct: float = Field(default=_MPC_DEFAULTS.viability_at_harvest_min_pct, ge=0.0, le=100.0, description="viability the harvest must keep [%]")
    galactosylated_fraction_min: float = Field(default=_MPC_DEFAULTS.galactosylated_fraction_min, ge=0.0, le=1.0, description="quality specification at harvest [-]")
    harvest_backoff_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=0.2,
        description="the plan keeps viability and galactosylated fraction at harvest this share of their minimum above it, for the replay's small differences [-]",
    )
    temperature_rate_max_degc_per_h: float = Field(default=_MPC_DEFAULTS.temperature_rate_max_degc_per_h, gt=0.0, description="largest setpoint change per hour [°C/h]")
    harvest_coarse_step_h: float = Field(default=24.0, gt=0.0, description="step of the scan of harvest candidates from the recipe's harvest [h]")
    harvest_resolution_h: float = Field(default=3.0, gt=0.0, description="the step around the best candidate is halved until it is below this [h]")
    earliest_harvest_h: float = Field(default=120.0, gt=0.0, description="the scan goes no earlier than this [h]")
    failures_before_giving_up: int = Field(default=3, ge=1, description="candidates that fail (solver or replay check) before any succeeds, after which the recipe is kept")
    solve_time_max_s: float = Field(default=30.0, gt=0.0, description="wall time one candidate's solve may take (IPOPT max_wall_time) [s]")
    plan_time_max_s: float = Field(default=120.0, gt=0.0, description="no candidate is started after the plan has taken this long; the best so far is kept [s]")
    check_step_h: float = Field(default=0.25, gt=0.0, le=1.0, description="RK4 step of the simulation that checks and scores the replayed schedule [h]")
    tol: float = Field(default=1e-4, gt=0.0, description="IPOPT tolerance on the scaled NLP; 1e-6 takes 1.5-1.8 times as long for the same schedules (the replay scores them)")
    max_iter: int = Field(default=300, ge=1, description="IPOPT iterations per candidate harvest (feasible candidates take 10–130)")


@dataclass(frozen=True)
class HarvestCandidate:
    """One solve of the search: a harvest hour, what IPOPT said and the predicted score."""

    harvest_time_h: float
    status: str
    success: bool
    iterations: int
    solve_time_s: float
    predicted_score_g_per_day: float


@dataclass(frozen=True)
class OracleSchedule:
    """What the oracle asks the PLC to run: one setpoint triple per control cycle, and when to harvest."""

    cycle_period_h: float
    setpoints: np.ndarray
    """(cycles, 3): nutrient feed L/h, glucose feed L/h, temperature setpoint °C from ``k·cycle`` to ``(k+1)·cycle``."""
    harvest_time_h: float
    predicted_product_mass_g: float
    predicted_score_g_per_day: float
    recipe_score_g_per_day: float
    """The platform recipe's score on the same plant model (what the oracle must not fall below)."""
    source: OracleSource
    reason: str
    """Why the recipe's schedule was returned (empty for an optimised one)."""
    plan_time_s: float
    candidates: tuple[HarvestCandidate, ...] = ()
    interval_inputs: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)
    """(intervals, 3): the optimiser's piecewise-constant inputs before the temperature ramp (empty for the recipe)."""

    def setpoints_at(self, process_time_h: float) -> np.ndarray:
        """The setpoints to write at ``process_time_h`` (the last row after the end of the schedule)."""
        index = min(int(math.floor(process_time_h / self.cycle_period_h + 1e-9)), self.setpoints.shape[0] - 1)
        return self.setpoints[max(index, 0)].copy()


@dataclass(frozen=True)
class ScheduleSimulation:
    """A per-cycle schedule integrated on a fine grid: the observables, and what the batch would score."""

    time_h: np.ndarray
    observables: np.ndarray
    """(samples, observables) in :data:`~simulator.plants.base.OBSERVABLES` order; row 0 is inoculation, the last row the harvest."""
    states: np.ndarray
    product_mass_g: float
    score_g_per_day: float

    def observable(self, name: str) -> np.ndarray:
        return self.observables[:, _Y[name]]


# ------------------------------------------------------------------ simulation


@dataclass(frozen=True)
class ParameterHistory:
    """The plant's true parameters over the batch: a vector from inoculation and the changes after it (a new feed lot, say)."""

    initial: np.ndarray
    changes: tuple[tuple[float, np.ndarray], ...] = ()
    """(process time h, the whole parameter vector from then on), in time order."""

    def at(self, process_time_h: float) -> np.ndarray:
        vector = self.initial
        for from_h, changed in self.changes:
            if from_h <= process_time_h + 1e-9:
                vector = changed
        return vector

    def over(self, times_h: np.ndarray) -> np.ndarray:
        """(parameters, len(times_h)): the vector in force at each time."""
        return np.column_stack([self.at(float(t)) for t in times_h]) if len(times_h) else np.zeros((self.initial.size, 0))


class _Simulator:
    """The plant integrated with RK4 on a fixed grid, cycle by cycle, in one CasADi call per schedule."""

    def __init__(self, plant: EquationPlant, cycle_period_h: float, step_h: float) -> None:
        self.plant = plant
        self.cycle_period_h = cycle_period_h
        self.substeps = max(1, math.ceil(cycle_period_h / step_h - 1e-9))
        step = plant.rk4_step(cycle_period_h / self.substeps)
        t, x, u, p = ca.SX.sym("t"), ca.SX.sym("x", plant.n_states), ca.SX.sym("u", plant.n_inputs), ca.SX.sym("p", plant.n_parameters)
        tk, xk = t, x
        points = []
        for _ in range(self.substeps):
            tk, xk = step(tk, xk, u, p)
            points.append(ca.vertcat(tk, xk))
        cycle = ca.Function("oracle_cycle", [ca.vertcat(t, x), u, p], [points[-1], ca.horzcat(*points)])
        self._cycle = cycle
        self._accumulators: dict[int, ca.Function] = {}

    def _accumulator(self, n_cycles: int) -> ca.Function:
        function = self._accumulators.get(n_cycles)
        if function is None:
            function = self._cycle.mapaccum("oracle_schedule", n_cycles, [0], [0])
            self._accumulators[n_cycles] = function
        return function

    def cycle(self, t_h: float, x: np.ndarray, u: np.ndarray, p: np.ndarray) -> np.ndarray:
        """The state one control cycle on."""
        end, _ = self._cycle(np.concatenate([[t_h], x]), u, p)
        return np.asarray(end).ravel()[1:]

    def run(self, x0: np.ndarray, parameters: ParameterHistory, setpoints: np.ndarray, harvest_time_h: float, turnaround_days: float) -> ScheduleSimulation:
        n_cycles = round(harvest_time_h / self.cycle_period_h)
        if n_cycles < 1 or setpoints.shape[0] < n_cycles:
            raise ValueError(f"a schedule of {setpoints.shape[0]} cycles cannot reach a harvest at {harvest_time_h} h")
        u = np.asarray(setpoints[:n_cycles], dtype=float).T
        p = parameters.over(self.cycle_period_h * np.arange(n_cycles))
        _, points = self._accumulator(n_cycles)(np.concatenate([[0.0], x0]), u, p)
        points = np.asarray(points)
        time_h = np.concatenate([[0.0], points[0]])
        states = np.hstack([x0[:, None], points[1:]])
        inputs = np.hstack([u[:, :1], np.repeat(u, self.substeps, axis=1)])
        n = time_h.size
        observed = np.asarray(self.plant.observables.map(n)(time_h[None, :], states, inputs, np.hstack([p[:, :1], np.repeat(p, self.substeps, axis=1)]))).T
        mass = float(observed[-1, _Y["titer"]] * observed[-1, _Y["volume"]])
        return ScheduleSimulation(
            time_h=time_h,
            observables=observed,
            states=states.T,
            product_mass_g=mass,
            score_g_per_day=float(batch_score_g_per_day(mass, harvest_time_h, turnaround_days)),
        )


def simulate_schedule(
    plant: EquationPlant,
    true_parameters: np.ndarray,
    batch: BatchConfig,
    setpoints: np.ndarray,
    harvest_time_h: float,
    initial_state: np.ndarray | None = None,
    *,
    parameter_changes: Sequence[tuple[float, np.ndarray]] = (),
    step_h: float = 0.25,
) -> ScheduleSimulation:
    """Per-cycle setpoints (cycles, 3) integrated on the plant up to ``harvest_time_h`` with RK4 steps of at most ``step_h``, and scored."""
    x0 = np.asarray(initial_state if initial_state is not None else plant.initial_state(batch), dtype=float)
    simulator = _Simulator(plant, batch.cycle_period_h, step_h)
    return simulator.run(x0, _history(true_parameters, parameter_changes), np.asarray(setpoints, dtype=float), harvest_time_h, batch.economics.turnaround_days)


def recipe_schedule(
    plant: EquationPlant,
    true_parameters: np.ndarray,
    batch: BatchConfig,
    initial_state: np.ndarray,
    *,
    parameter_changes: Sequence[tuple[float, np.ndarray]] = (),
    sampling: SamplingConfig | None = None,
    step_h: float = 0.25,
) -> tuple[np.ndarray, float]:
    """The platform recipe run on the plant without noise: its setpoints per control cycle and its harvest time.

    Samples are drawn on the sampling schedule (without jitter) and published
    after the middle of the result delay, so the recipe's glucose arithmetic
    sees the true glucose as the PLC's recipe sees a lab result.
    """
    sampling = sampling or SamplingConfig()
    cycle_h = batch.cycle_period_h
    simulator = _Simulator(plant, cycle_h, step_h)
    recipe = PlatformRecipe(batch.recipe, batch.media, batch.equipment, batch.inoculation.volume_l)
    history = _history(true_parameters, parameter_changes)
    x = np.asarray(initial_state, dtype=float).copy()
    delay_h = 0.5 * (sampling.result_delay_min_h + sampling.result_delay_max_h)
    next_draw_h = sampling.first_draw_h
    pending: list[tuple[float, LabResult, float, float]] = []
    feed_total_l = glucose_total_l = 0.0
    rows: list[np.ndarray] = []
    n_max = round(batch.limits.latest_harvest_h / cycle_h)
    k = 0
    seq = 0
    while k < n_max:
        t = k * cycle_h
        p = history.at(t)
        while next_draw_h <= t + 1e-9:
            seq += 1
            y = np.asarray(plant.observables(t, x, rows[-1] if rows else np.zeros(plant.n_inputs), p)).ravel()
            result = LabResult(
                seq=seq,
                taken_at_h=t,
                vcd_1e6_per_ml=float(y[_Y["viable_cells"]]),
                viability_pct=float(y[_Y["viability"]]),
                glucose_g_per_l=float(y[_Y["glucose"]]),
                lactate_g_per_l=float(y[_Y["lactate"]]),
                glutamine_mm=float(y[_Y["glutamine"]]),
                ammonia_mm=float(y[_Y["ammonia"]]),
                titer_g_per_l=float(y[_Y["titer"]]),
                osmolality_mosm_per_kg=float(y[_Y["osmolality"]]),
            )
            pending.append((t + delay_h, result, float(y[_Y["volume"]]), batch.media.glucose_delivered_g(feed_total_l, glucose_total_l)))
            next_draw_h += sampling.interval_h
        while pending and pending[0][0] <= t + 1e-9:
            _, result, volume_l, delivered_g = pending.pop(0)
            recipe.on_lab_result(result, volume_l=volume_l, glucose_delivered_g=delivered_g)
        volume_now = float(np.asarray(plant.observables(t, x, np.zeros(plant.n_inputs), p)).ravel()[_Y["volume"]])
        setpoints = recipe.setpoints(t, volume_l=volume_now)
        if setpoints.harvest and k > 0:
            break
        u = np.array([setpoints.feed_rate_lph, setpoints.glucose_rate_lph, setpoints.temperature_degc])
        rows.append(u)
        x = simulator.cycle(t, x, u, p)
        feed_total_l += u[_FEED] * cycle_h
        glucose_total_l += u[_GLUCOSE] * cycle_h
        k += 1
    return np.array(rows), k * cycle_h


def _history(true_parameters: np.ndarray, changes: Sequence[tuple[float, np.ndarray]]) -> ParameterHistory:
    vectors = [(float(t), np.asarray(v, dtype=float)) for t, v in sorted(changes, key=lambda change: change[0])]
    return ParameterHistory(np.asarray(true_parameters, dtype=float), tuple(vectors))


# ------------------------------------------------------------------ the NLP


class _OracleNlp:
    """The oracle's NLP on a fixed grid from inoculation; interval durations are parameters, so one build serves every harvest candidate."""

    def __init__(self, plant: EquationPlant, batch: BatchConfig, config: OracleConfig, x_scale: np.ndarray, mass_scale_g: float) -> None:
        self.plant, self.batch, self.config = plant, batch, config
        self.interval_h = config.interval_h
        self.n = max(1, math.ceil(batch.limits.latest_harvest_h / config.interval_h - 1e-9))
        self.substeps = max(1, math.ceil(config.interval_h / config.max_step_h - 1e-9))
        self.x_scale = np.asarray(x_scale, dtype=float)
        equipment = batch.equipment
        self.u_lower = np.array([0.0, 0.0, equipment.temperature_min_degc])
        self.u_upper = np.array([equipment.feed_rate_max_lph, equipment.glucose_rate_max_lph, equipment.temperature_max_degc])
        self.u_scale = np.maximum(np.abs(self.u_upper), 1e-3)
        self._build(mass_scale_g)

    def _step(self) -> ca.Function:
        """One RK4 substep on scaled variables: the next state and the path-constraint margins at its end."""
        plant, cfg, batch = self.plant, self.config, self.batch
        xs, us = ca.DM(self.x_scale), ca.DM(self.u_scale)
        x, u, p = ca.SX.sym("x", plant.n_states), ca.SX.sym("u", plant.n_inputs), ca.SX.sym("p", plant.n_parameters)
        t0, h = ca.SX.sym("t0"), ca.SX.sym("h")
        xk, uk = x * xs, u * us
        k1 = plant.rhs(t0, xk, uk, p)
        k2 = plant.rhs(t0 + h / 2, xk + h / 2 * k1, uk, p)
        k3 = plant.rhs(t0 + h / 2, xk + h / 2 * k2, uk, p)
        k4 = plant.rhs(t0 + h, xk + h * k3, uk, p)
        x_next = xk + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        y = plant.observables(t0 + h, x_next, uk, p)
        glucose_low = batch.limits.glucose_min_g_per_l + cfg.glucose_margin_g_per_l
        osmolality_high = batch.limits.osmolality_max_mosm_per_kg - cfg.osmolality_backoff_mosm_per_kg
        volume_high = batch.equipment.max_working_volume_l - cfg.volume_backoff_l
        margins = ca.vertcat(
            y[_Y["glucose"]] - glucose_low,
            cfg.glucose_max_g_per_l - y[_Y["glucose"]],
            (osmolality_high - y[_Y["osmolality"]]) / 10.0,
            (volume_high - y[_Y["volume"]]) / 10.0,
        )
        return ca.Function("oracle_step", [x, u, p, t0, h], [x_next / xs, margins], ["x", "u", "p", "t0", "h"], ["x_next", "margins"])

    def _build(self, mass_scale_g: float) -> None:
        plant, cfg, n, m = self.plant, self.config, self.n, self.substeps
        nx, nu = plant.n_states, plant.n_inputs
        step = self._step()
        X = ca.MX.sym("X", nx, n * m + 1)
        U = ca.MX.sym("U", nu, n)
        P = ca.MX.sym("P", plant.n_parameters, n * m)  # the parameters in force during each substep
        x0 = ca.MX.sym("x0", nx)
        starts = ca.MX.sym("starts", 1, n)
        durations = ca.MX.sym("durations", 1, n)
        t_previous = ca.MX.sym("t_previous")
        owner = [j // m for j in range(n * m)]
        h = durations[:, owner] / m
        t_step = starts[:, owner] + ca.DM([j % m for j in range(n * m)]).T * h
        x_next, margins = step.map(n * m)(X[:, : n * m], U[:, owner], P, t_step, h)
        us, xs = self.u_scale, self.x_scale
        t_sp = U[_TEMPERATURE, :] * us[_TEMPERATURE]
        moves = t_sp - ca.horzcat(t_previous, t_sp[:, : n - 1])
        harvest_time = ca.sum2(durations)
        x_end = X[:, n * m] * ca.DM(xs)
        y_end = plant.observables(harvest_time, x_end, U[:, n - 1] * ca.DM(us), P[:, n * m - 1])
        backoff = 1.0 + cfg.harvest_backoff_fraction
        terminal = ca.vertcat(
            (y_end[_Y["viability"]] - cfg.viability_at_harvest_min_pct * backoff) / 10.0,
            (y_end[_Y["galactosylated_fraction"]] - cfg.galactosylated_fraction_min * backoff) * 10.0,
        )
        g = ca.vertcat(X[:, 0] - x0 / ca.DM(xs), ca.vec(X[:, 1:] - x_next), ca.vec(margins), moves.T, terminal)
        mass = y_end[_Y["titer"]] * y_end[_Y["volume"]]
        w = ca.vertcat(ca.vec(X), ca.vec(U))
        params = ca.vertcat(x0, ca.vec(P), starts.T, durations.T, t_previous)
        self.n_w = w.shape[0]
        self.n_nodes = n * m + 1
        self.n_eq = nx * self.n_nodes
        self.n_margins = margins.shape[0] * margins.shape[1]
        options: dict = {
            "expand": True,
            "print_time": False,
            "ipopt": {
                "print_level": 0,
                "sb": "yes",
                "tol": cfg.tol,
                "max_iter": cfg.max_iter,
                "mu_strategy": "adaptive",
                "linear_solver": "mumps",
                "max_wall_time": cfg.solve_time_max_s,
            },
        }
        nlp: dict = {"x": w, "p": params, "f": -mass / mass_scale_g, "g": g}
        self.solver = ca.nlpsol("oracle", "ipopt", nlp, options)
        self._rollout = step.mapaccum("oracle_rollout", n * m)
        nonnegative = np.array([s.name in plant.nonnegative_states for s in plant.states])
        self._x_lower = np.where(nonnegative, 0.0, -np.inf)

    def grid(self, harvest_time_h: float) -> tuple[np.ndarray, np.ndarray]:
        """Interval start times and durations up to ``harvest_time_h`` (zero-length intervals after it)."""
        starts = self.interval_h * np.arange(self.n)
        durations = np.clip(harvest_time_h - starts, 0.0, self.interval_h)
        return np.minimum(starts, harvest_time_h), durations

    def substep_grid(self, harvest_time_h: float) -> tuple[np.ndarray, np.ndarray]:
        """Start times and lengths of every RK4 substep (zero-length after harvest)."""
        starts, durations = self.grid(harvest_time_h)
        m = self.substeps
        h = np.repeat(durations, m) / m
        return np.repeat(starts, m) + np.tile(np.arange(m), self.n) * h, h

    def rollout(self, x0: np.ndarray, parameters: ParameterHistory, inputs: np.ndarray, harvest_time_h: float) -> np.ndarray:
        """States at every substep node for interval inputs (nu, n), scaled."""
        t_step, h = self.substep_grid(harvest_time_h)
        x0_scaled = np.asarray(x0) / self.x_scale
        u = np.repeat(inputs / self.u_scale[:, None], self.substeps, axis=1)
        states, _ = self._rollout(x0_scaled, u, parameters.over(t_step), t_step[None, :], h[None, :])
        return np.hstack([x0_scaled[:, None], np.asarray(states)])

    def solve(self, x0: np.ndarray, parameters: ParameterHistory, inputs: np.ndarray, harvest_time_h: float, t_previous_degc: float) -> tuple[bool, str, int, np.ndarray]:
        """Solve for one harvest time, started from interval inputs (nu, n) rolled out; (success, IPOPT status, iterations, the inputs)."""
        n, nx, nu = self.n, self.plant.n_states, self.plant.n_inputs
        starts, durations = self.grid(harvest_time_h)
        active = durations > 0.0
        inputs = np.clip(inputs, self.u_lower[:, None], self.u_upper[:, None])
        states_scaled = self.rollout(x0, parameters, inputs, harvest_time_h)
        u_lower = np.tile(self.u_lower[:, None], (1, n))
        u_upper = np.tile(self.u_upper[:, None], (1, n))
        # Inputs after harvest act on nothing: fixed at their guess, so IPOPT drops them.
        u_lower[:, ~active] = u_upper[:, ~active] = inputs[:, ~active]
        lbx = np.concatenate([np.tile(self._x_lower / self.x_scale, self.n_nodes), (u_lower / self.u_scale[:, None]).ravel(order="F")])
        ubx = np.concatenate([np.full(nx * self.n_nodes, np.inf), (u_upper / self.u_scale[:, None]).ravel(order="F")])
        step = self.config.temperature_rate_max_degc_per_h * durations
        rate = np.where(active, step, np.inf)
        lbg = np.concatenate([np.zeros(self.n_eq), np.zeros(self.n_margins), -rate, np.zeros(2)])
        ubg = np.concatenate([np.zeros(self.n_eq), np.full(self.n_margins, np.inf), rate, np.full(2, np.inf)])
        w0 = np.concatenate([states_scaled.ravel(order="F"), (inputs / self.u_scale[:, None]).ravel(order="F")])
        w0 = np.clip(w0, lbx, ubx)
        params = np.concatenate([x0, parameters.over(self.substep_grid(harvest_time_h)[0]).ravel(order="F"), starts, durations, [t_previous_degc]])
        result = self.solver(x0=w0, p=params, lbx=lbx, ubx=ubx, lbg=lbg, ubg=ubg)
        stats = self.solver.stats()
        w = np.asarray(result["x"]).ravel()
        solved = w[nx * self.n_nodes :].reshape((nu, n), order="F") * self.u_scale[:, None]
        success = bool(stats.get("success", False)) and bool(np.all(np.isfinite(w)))
        return success, str(stats.get("return_status", "unknown")), int(stats.get("iter_count", -1)), np.clip(solved, self.u_lower[:, None], self.u_upper[:, None])


def _interval_average(setpoints: np.ndarray, cycles_per_interval: int, n_intervals: int) -> np.ndarray:
    """Per-cycle setpoints averaged over each interval (the last row repeated to fill the grid); (3, n_intervals)."""
    needed = cycles_per_interval * n_intervals
    padded = np.vstack([setpoints, np.repeat(setpoints[-1:], max(0, needed - setpoints.shape[0]), axis=0)])[:needed]
    return padded.reshape(n_intervals, cycles_per_interval, -1).mean(axis=1).T


def expand_to_cycles(interval_inputs: np.ndarray, interval_h: float, cycle_period_h: float, n_cycles: int, *, t_previous_degc: float, rate_degc_per_h: float) -> np.ndarray:
    """Interval inputs (3, intervals) as per-cycle setpoints, the temperature moved toward each interval's value at most at its rate limit."""
    per_interval = round(interval_h / cycle_period_h)
    rows = np.repeat(interval_inputs.T, per_interval, axis=0)
    rows = np.vstack([rows, np.repeat(rows[-1:], max(0, n_cycles - rows.shape[0]), axis=0)])[:n_cycles].copy()
    step = rate_degc_per_h * cycle_period_h
    temperature = t_previous_degc
    for k in range(rows.shape[0]):
        temperature += float(np.clip(rows[k, _TEMPERATURE] - temperature, -step, step))
        rows[k, _TEMPERATURE] = temperature
    return rows


# ------------------------------------------------------------------ the plan


def constraint_violations(simulation: ScheduleSimulation, batch: BatchConfig, config: OracleConfig | None = None) -> list[str]:
    """What a simulated schedule breaks: the batch's hard limits on the path, the specifications at harvest (empty when nothing)."""
    config = config or OracleConfig()
    if not (np.all(np.isfinite(simulation.observables)) and math.isfinite(simulation.score_g_per_day)):
        return ["the simulation is not finite"]
    broken: list[str] = []
    glucose = simulation.observable("glucose")
    if glucose.min() < batch.limits.glucose_min_g_per_l:
        broken.append(f"glucose {glucose.min():.3f} g/L below the starvation limit {batch.limits.glucose_min_g_per_l}")
    osmolality = simulation.observable("osmolality")
    if osmolality.max() > batch.limits.osmolality_max_mosm_per_kg:
        broken.append(f"osmolality {osmolality.max():.1f} mOsm/kg above the limit {batch.limits.osmolality_max_mosm_per_kg}")
    volume = simulation.observable("volume")
    if volume.max() > batch.equipment.max_working_volume_l:
        broken.append(f"volume {volume.max():.1f} L above the maximum working volume {batch.equipment.max_working_volume_l}")
    viability = float(simulation.observable("viability")[-1])
    if viability < config.viability_at_harvest_min_pct:
        broken.append(f"viability at harvest {viability:.1f} % below {config.viability_at_harvest_min_pct}")
    quality = float(simulation.observable("galactosylated_fraction")[-1])
    if quality < config.galactosylated_fraction_min:
        broken.append(f"galactosylated fraction at harvest {quality:.3f} below {config.galactosylated_fraction_min}")
    return broken


@dataclass(frozen=True)
class _Candidate:
    record: HarvestCandidate
    inputs: np.ndarray
    setpoints: np.ndarray
    simulation: ScheduleSimulation | None
    violations: tuple[str, ...]

    @property
    def usable(self) -> bool:
        return self.record.success and self.simulation is not None and not self.violations


def plan_oracle(
    plant: EquationPlant,
    true_parameters: np.ndarray,
    batch: BatchConfig,
    initial_state: np.ndarray | None = None,
    *,
    parameter_changes: Sequence[tuple[float, np.ndarray]] = (),
    config: OracleConfig | None = None,
    sampling: SamplingConfig | None = None,
) -> OracleSchedule:
    """The best schedule for ``plant`` with its true parameters, or the recipe's when the optimiser cannot beat it.

    ``initial_state`` defaults to the plant's state at inoculation;
    ``parameter_changes`` are (process time, whole parameter vector from then
    on) pairs, for a truth that changes during the batch (a new feed lot);
    ``sampling`` is the lab schedule the recipe's glucose arithmetic follows
    (the simulation's, for a score comparable with the PLC's recipe).
    """
    started = time.perf_counter()
    cfg = config or OracleConfig()
    cycle_h = batch.cycle_period_h
    per_interval = max(1, round(cfg.interval_h / cycle_h))
    if abs(per_interval * cycle_h - cfg.interval_h) > 1e-9:
        # Inputs change only at cycle boundaries: the interval becomes the nearest whole number of cycles.
        log.info("oracle_interval_rounded", interval_h=cfg.interval_h, cycle_period_h=cycle_h, used_h=per_interval * cycle_h)
        cfg = cfg.model_copy(update={"interval_h": per_interval * cycle_h})
    p = _history(true_parameters, parameter_changes)
    x0 = np.asarray(initial_state if initial_state is not None else plant.initial_state(batch), dtype=float)
    turnaround = batch.economics.turnaround_days
    checker = _Simulator(plant, cycle_h, cfg.check_step_h)
    recipe_rows, recipe_harvest_h = recipe_schedule(plant, p.initial, batch, x0, parameter_changes=p.changes, sampling=sampling, step_h=cfg.check_step_h)
    recipe = checker.run(x0, p, recipe_rows, recipe_harvest_h, turnaround)

    def recipe_schedule_because(reason: str, candidates: tuple[HarvestCandidate, ...] = ()) -> OracleSchedule:
        log.warning("oracle_recipe_fallback", plant=plant.name, reason=reason, recipe_score_g_per_day=round(recipe.score_g_per_day, 2))
        return OracleSchedule(
            cycle_period_h=cycle_h,
            setpoints=recipe_rows,
            harvest_time_h=recipe_harvest_h,
            predicted_product_mass_g=recipe.product_mass_g,
            predicted_score_g_per_day=recipe.score_g_per_day,
            recipe_score_g_per_day=recipe.score_g_per_day,
            source=OracleSource.RECIPE,
            reason=reason,
            plan_time_s=time.perf_counter() - started,
            candidates=candidates,
        )

    x_scale = np.maximum(np.abs(recipe.states).max(axis=0), 1e-3)
    try:
        nlp = _OracleNlp(plant, batch, cfg, x_scale, max(recipe.product_mass_g, 1.0))
    except RuntimeError as error:
        return recipe_schedule_because(f"the NLP could not be built: {error}")
    log.debug("oracle_nlp_built", plant=plant.name, variables=nlp.n_w, build_s=round(time.perf_counter() - started, 2))
    t_previous = float(recipe_rows[0, _TEMPERATURE])
    n_cycles_max = round(batch.limits.latest_harvest_h / cycle_h)
    tried: dict[float, _Candidate] = {}

    def solve(harvest_h: float, guess: np.ndarray) -> _Candidate:
        harvest_h = min(batch.limits.latest_harvest_h, max(cycle_h, round(harvest_h / cycle_h) * cycle_h))
        if harvest_h in tried:
            return tried[harvest_h]
        solve_started = time.perf_counter()
        try:
            success, status, iterations, inputs = nlp.solve(x0, p, guess, harvest_h, t_previous)
        except RuntimeError as error:
            success, status, iterations, inputs = False, f"solver error: {error}", 0, guess
        elapsed = time.perf_counter() - solve_started
        setpoints = expand_to_cycles(inputs, cfg.interval_h, cycle_h, n_cycles_max, t_previous_degc=t_previous, rate_degc_per_h=cfg.temperature_rate_max_degc_per_h)
        simulation: ScheduleSimulation | None = None
        violations: tuple[str, ...] = ()
        if success:
            try:
                simulation = checker.run(x0, p, setpoints, harvest_h, turnaround)
                violations = tuple(constraint_violations(simulation, batch, cfg))
            except RuntimeError as error:
                violations = (f"the replayed schedule did not integrate: {error}",)
        score = simulation.score_g_per_day if simulation is not None and not violations else math.nan
        record = HarvestCandidate(harvest_h, status if not violations else f"{status}; replay: {'; '.join(violations)}", success, iterations, elapsed, score)
        log.debug("oracle_candidate", plant=plant.name, harvest_time_h=harvest_h, status=record.status, iterations=iterations, solve_s=round(elapsed, 2), score_g_per_day=score)
        candidate = _Candidate(record, inputs, setpoints, simulation, violations)
        tried[harvest_h] = candidate
        return candidate

    def score_of(candidate: _Candidate) -> float:
        return candidate.simulation.score_g_per_day if candidate.usable and candidate.simulation is not None else -math.inf

    guess = _interval_average(recipe_rows, per_interval, nlp.n)
    latest_h = batch.limits.latest_harvest_h
    earliest_h = min(cfg.earliest_harvest_h, latest_h)
    best: _Candidate | None = None
    failures = 0

    def improves(harvest_h: float) -> bool:
        """Solve a candidate warm-started from the best so far; whether it became the best."""
        nonlocal best, failures
        candidate = solve(harvest_h, best.inputs if best is not None else guess)
        if not candidate.usable:
            failures += 1
        if score_of(candidate) > score_of(best) if best is not None else candidate.usable:
            best = candidate
            return True
        return False

    def searching() -> bool:
        return time.perf_counter() - started < cfg.plan_time_max_s and (best is not None or failures < cfg.failures_before_giving_up)

    # Scan from the recipe's harvest: later while the score rises, else earlier while it rises.
    improves(recipe_harvest_h)
    harvest_h = recipe_harvest_h
    went_later = False
    while searching() and harvest_h < latest_h - 1e-9:
        harvest_h = min(latest_h, harvest_h + cfg.harvest_coarse_step_h)
        if not improves(harvest_h):
            break
        went_later = True
    harvest_h = recipe_harvest_h
    while not went_later and searching() and harvest_h > earliest_h + 1e-9:
        harvest_h = max(earliest_h, harvest_h - cfg.harvest_coarse_step_h)
        if not improves(harvest_h) and best is not None:
            break
    # Refine around the best, halving the step down to the resolution (never finer than a control cycle).
    step_h = cfg.harvest_coarse_step_h / 2.0
    while best is not None and searching() and step_h >= max(cfg.harvest_resolution_h, cycle_h) - 1e-9:
        centre = best.record.harvest_time_h
        for harvest_h in (centre + step_h, centre - step_h):
            if earliest_h - 1e-9 <= harvest_h <= latest_h + 1e-9 and searching():
                improves(harvest_h)
        step_h /= 2.0
    records = tuple(sorted((c.record for c in tried.values()), key=lambda r: r.harvest_time_h))
    if best is None or best.simulation is None:
        statuses = sorted({c.record.status for c in tried.values()})
        return recipe_schedule_because(f"no harvest candidate was solved and feasible ({'; '.join(statuses)})", records)
    if best.simulation.score_g_per_day <= recipe.score_g_per_day:
        return recipe_schedule_because(f"the best optimised schedule scores {best.simulation.score_g_per_day:.1f} g/day, not above the recipe", records)
    n_cycles = round(best.record.harvest_time_h / cycle_h)
    schedule = OracleSchedule(
        cycle_period_h=cycle_h,
        setpoints=best.setpoints[:n_cycles],
        harvest_time_h=best.record.harvest_time_h,
        predicted_product_mass_g=best.simulation.product_mass_g,
        predicted_score_g_per_day=best.simulation.score_g_per_day,
        recipe_score_g_per_day=recipe.score_g_per_day,
        source=OracleSource.OPTIMISED,
        reason="",
        plan_time_s=time.perf_counter() - started,
        candidates=records,
        interval_inputs=best.inputs[:, : math.ceil(n_cycles / per_interval)].T.copy(),
    )
    log.info(
        "oracle_planned",
        plant=plant.name,
        harvest_time_h=schedule.harvest_time_h,
        score_g_per_day=round(schedule.predicted_score_g_per_day, 2),
        recipe_score_g_per_day=round(recipe.score_g_per_day, 2),
        solves=len(records),
        plan_s=round(schedule.plan_time_s, 2),
    )
    return schedule


# ------------------------------------------------------------------ replay


def plan_for_simulation(loaded: LoadedSimulation, *, config: OracleConfig | None = None) -> OracleSchedule:
    """The oracle's schedule for a simulated batch: its plant, the seeded truth (feed-lot changes included) and the state at inoculation."""
    plc, truth = build_simulated_plc(loaded)
    plant = plc.plant.model
    base = np.array([truth[name] for name in plant.parameter_names])
    changes = [(start_h, _feed_lot_parameters(loaded, plant, base, start_h)) for start_h in sorted({f.start_h for f in loaded.simulation.faults if isinstance(f, FeedLotFault)})]
    return plan_oracle(
        plant, _feed_lot_parameters(loaded, plant, base, 0.0), loaded.batch, plc.plant.state.copy(), parameter_changes=changes, config=config, sampling=loaded.simulation.sampling
    )


def _feed_lot_parameters(loaded: LoadedSimulation, plant: EquationPlant, base: np.ndarray, process_time_h: float) -> np.ndarray:
    """The true parameters at ``process_time_h``, with the feed lot the simulated PLC applies then (the last listed fault already started)."""
    strength = 1.0
    for fault in loaded.simulation.faults:
        if isinstance(fault, FeedLotFault) and fault.start_h <= process_time_h:
            strength = fault.strength
    vector = base.copy()
    vector[plant.parameter_index(plant.feed_strength_parameter)] *= strength
    return vector


def replay_schedule(loaded: LoadedSimulation, schedule: OracleSchedule) -> BatchResult:
    """Run ``schedule`` through the simulated PLC as a runtime would: setpoints and a heartbeat every cycle, the harvest request at its time."""
    plc, truth = build_simulated_plc(loaded)
    heartbeat = 0
    while plc.phase == PHASE_RUNNING:
        now_h = plc.process_time_h
        if now_h >= schedule.harvest_time_h - 1e-9:
            refusals = write_group(plc, {"SP.HarvestRequest": True})
            if refusals:
                log.warning("oracle_write_refused", process_time_h=now_h, refusals=refusals)
            if plc.phase != PHASE_RUNNING:
                break
        feed, glucose, temperature = schedule.setpoints_at(now_h)
        refusals = write_group(plc, {"SP.FeedRate": float(feed), "SP.GlucoseRate": float(glucose), "SP.Temperature": float(temperature)})
        if refusals:
            log.warning("oracle_write_refused", process_time_h=now_h, refusals=refusals)
        heartbeat = heartbeat % UINT32_MAX + 1
        plc.write_heartbeat(heartbeat)
        plc.advance_to(plc.next_cycle_boundary_h())
    return batch_result(plc, truth, loaded.batch)


def run_oracle_batch(loaded: LoadedSimulation, *, config: OracleConfig | None = None) -> BatchResult:
    """One batch under the perfect-knowledge oracle of the simulation's plant: planned on the truth, replayed through the simulated PLC."""
    return replay_schedule(loaded, plan_for_simulation(loaded, config=config))
