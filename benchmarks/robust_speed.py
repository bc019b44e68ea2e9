"""Robust NMPC speed: RobustMpc (compiled C) against do-mpc's multi-stage MPC on the same 9-scenario problem.

The problem: the product's NMPC configuration (``MpcConfig()``: 16 one-hour
stages and 8 that share the rest of the time to harvest at 336 h), 9 scenarios
from a fresh estimator's parameter uncertainty (:func:`controller.robust.scenarios_from_estimate`:
the two most uncertain kinetic multipliers at {0, ±1.645 σ}), robust horizon 1,
equal scenario weights (do-mpc weighs its scenarios equally), the culture
model with the platform batch's true parameters as the centre.

Windows of cycles, each from the platform recipe's true state at its start:

1. *closed loop*: the simulated plant runs our robust plan (its first inputs,
   through the safety filter) for the window's cycles; the first solve is cold
   (RobustMpc: the nominal problem first, then the robust one from its plan),
   later ones warm-started from the previous solution, as NmpcController would
   call it. do-mpc plans from the same true states in the windows it is run in.
   The last day (from 312 h) is where every stage lasts ≤ 1 h, so do-mpc's
   collocation (Radau, degree 2, one element per stage) and our RK4 are both
   accurate and the two answers must agree: objective, first inputs, each
   scenario's product at harvest. Earlier, do-mpc's one collocation element per
   coarse stage of up to 40 h is a coarser model, and the answers differ for
   that reason; its cost hardly depends on the stage lengths, ours does (more
   RK4 steps early in the batch).
2. *stress*: RobustMpc along the recipe's own states and setpoints, its plan
   not applied: every cycle the state is not where the plan put it, the worst
   case for a warm start.

do-mpc is set up as in ``benchmarks/solver_speed.py`` (scaled variables, soft
constraints with our slack weights, the temperature rate limit appended to its
NLP), plus: ``n_robust=1`` with ``set_uncertainty_values`` for the two
multipliers (parameters of its model); a clock state and a per-stage
``duration`` tvp that scales the right-hand side, so its stages are ours (a
stage of length 0 freezes the state); one extra stage of length 0 at the end,
because do-mpc puts path constraints on stage starts only and the harvest
constraints must act on the harvest state; slack weights divided by S (do-mpc
adds every scenario's slacks in full, our objective is the scenarios' weighted
mean); IPOPT ``tol`` = ours (1e-6, solver-notes), otherwise its defaults.

The whole batch: without ``--quick``, RobustMpc runs a closed loop of all 336
cycles (measured; harvest fixed at 336 h, a later-harvest candidate every 12
cycles, as NmpcController solves them, added as 1/12 more solves). Estimated
from the windows as well: ours from their warm medians interpolated over the
336 cycles plus the first, cold solve and the candidates; do-mpc's from its
mean solve time (its NLP has the same size every cycle) plus its build. Timings on this shared 2-core machine swing with the
other work on it (the load average is printed); compare ratios.

Usage: python benchmarks/robust_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import casadi as ca
import numpy as np

from bioreactor_mpc.logging import configure_logging
from controller.config import BatchConfig
from controller.estimator import ExtendedKalmanEstimator
from controller.mpc import STATE_SCALE, MpcConfig
from controller.quality import SETPOINT_SIGNALS
from controller.robust import ParameterScenarios, RobustMpc, scenarios_from_estimate
from controller.safety import filter_setpoints
from controller.types import Setpoints
from plant_models.cho import INPUT_INDEX, OUTPUT_INDEX, STATE_INDEX, CultureModel
from plant_models.parameters import PARAMETER_NAMES
from simulator.batch import build_simulated_plc
from simulator.config import LoadedSimulation, load_simulation
from simulator.plc import SimulatedPlc

PLATFORM = Path(__file__).resolve().parent.parent / "configs" / "simulate" / "platform.yaml"

HARVEST_H = 336.0
LATE_START_H = 312.0
FULL_WINDOWS_H = (0.0, 72.0, 144.0, 216.0, LATE_START_H)
QUICK_WINDOWS_H = (0.0, LATE_START_H)
DOMPC_FULL_WINDOWS_H = (144.0, LATE_START_H)
FULL_CYCLES = 16
QUICK_CYCLES = 10
LATER_HARVEST_EVERY_CYCLES = 12
CLOCK_SCALE_H = 100.0

TARGET_P95_S = 1.0
TARGET_BATCH_S = 300.0


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Solve:
    """One planner call: its time, what the solver said, and what it planned."""

    process_time_h: float
    wall_s: float
    iterations: int
    success: bool
    status: str
    cold: bool
    objective: float
    first_inputs: np.ndarray
    product_mass_g: np.ndarray
    """Per scenario, at harvest."""
    slack_max: float
    """The largest slack of any scenario: 0 when every soft constraint holds in every scenario."""


@dataclass
class Window:
    planner: str
    start_h: float
    solves: list[Solve] = field(default_factory=list)

    @property
    def warm(self) -> list[Solve]:
        return [s for s in self.solves if not s.cold]

    @property
    def cold(self) -> list[Solve]:
        return [s for s in self.solves if s.cold]


class Planner(Protocol):
    name: str

    def plan(self, process_time_h: float, state: np.ndarray, previous_inputs: np.ndarray, *, cold: bool) -> Solve: ...


def input_scale(batch: BatchConfig) -> np.ndarray:
    """What EconomicMpc divides the inputs by: their upper bounds."""
    return np.maximum(np.array([batch.equipment.feed_rate_max_lph, batch.equipment.glucose_rate_max_lph, batch.equipment.temperature_max_degc]), 1e-3)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else math.nan


# --------------------------------------------------------------------- the states


@dataclass(frozen=True)
class RecipeTrajectory:
    """The platform recipe batch's true state and applied setpoints at each cycle boundary."""

    states: dict[float, np.ndarray]
    setpoints: dict[float, np.ndarray]


def recipe_plc(loaded: LoadedSimulation, until_h: float) -> SimulatedPlc:
    """The simulated PLC running its local recipe up to ``until_h``."""
    plc, _ = build_simulated_plc(loaded)
    plc.set_operator_remote(False)
    plc.advance_to(until_h)
    return plc


def applied_inputs(plc: SimulatedPlc) -> np.ndarray:
    snapshot = plc.snapshot()
    return np.array([float(snapshot[tag].value) for tag in SETPOINT_SIGNALS])


def recipe_trajectory(loaded: LoadedSimulation, times_h: Sequence[float]) -> RecipeTrajectory:
    plc = recipe_plc(loaded, 0.0)
    states, setpoints = {}, {}
    for t in sorted(times_h):
        plc.advance_to(t)
        states[t] = plc.plant.state.copy()
        setpoints[t] = applied_inputs(plc)
    return RecipeTrajectory(states, setpoints)


# --------------------------------------------------------------------- our planner


class OurPlanner:
    """RobustMpc warm-started from its previous solution, as NmpcController would call it."""

    def __init__(self, mpc: RobustMpc, scenarios: ParameterScenarios, weights: np.ndarray) -> None:
        self.name = "RobustMpc" if mpc.config.compile else "RobustMpc (interpreted)"
        self._mpc = mpc
        self._scenarios = scenarios
        self._weights = weights
        self._warm: dict[str, np.ndarray] | None = None

    def plan(self, process_time_h: float, state: np.ndarray, previous_inputs: np.ndarray, *, cold: bool) -> Solve:
        started = time.perf_counter()
        solution = self._mpc.solve(
            process_time_h=process_time_h,
            state=state,
            parameters=self._scenarios.parameters[:, 0],
            previous_inputs=previous_inputs,
            harvest_time_h=HARVEST_H,
            warm=None if cold else self._warm,
            scenarios=self._scenarios.parameters,
            weights=self._weights,
        )
        wall = time.perf_counter() - started
        if solution.success:
            self._warm = solution.warm
        status = solution.status + (f" (warm {solution.retried_after}, retried cold)" if solution.retried_after else "")
        return Solve(
            process_time_h,
            wall,
            solution.iterations,
            solution.success,
            status,
            cold,
            solution.objective,
            solution.first_inputs,
            solution.scenario_product_mass_g,
            solution.slack_max,
        )


# ------------------------------------------------------------------ do-mpc planner


class DoMpcRobustPlanner:
    """The same robust problem in do-mpc 5.1's multi-stage MPC (collocation, IPOPT/MUMPS, its own warm start); see the module docstring."""

    def __init__(self, culture: CultureModel, batch: BatchConfig, config: MpcConfig, scenarios: ParameterScenarios, mpc_grid: RobustMpc) -> None:
        import do_mpc  # imported here: slow, noisy, and not needed by the rest of the run

        self.name = "do-mpc"
        self._grid = mpc_grid
        n = mpc_grid.n_stages
        self._n = n_horizon = n + 1  # one extra stage of length 0: path constraints reach the harvest state
        self._u_lower = np.array([0.0, 0.0, batch.equipment.temperature_min_degc])
        self._u_upper = np.array([batch.equipment.feed_rate_max_lph, batch.equipment.glucose_rate_max_lph, batch.equipment.temperature_max_degc])
        self._u_scale = input_scale(batch)
        self._durations = np.zeros(n)
        n_scenarios = scenarios.parameters.shape[1]

        model = do_mpc.model.Model("continuous", "SX")
        xs = model.set_variable("_x", "x", shape=(culture.n_states, 1))
        clock = model.set_variable("_x", "clock")
        us = model.set_variable("_u", "u", shape=(culture.n_inputs, 1))
        multipliers = [model.set_variable("_p", f"m{i}") for i in range(len(scenarios.names))]
        duration = model.set_variable("_tvp", "duration")
        model.set_variable("_tvp", "at_harvest")
        centre = scenarios.parameters[:, 0]

        def parameters(multipliers: Sequence[ca.SX]) -> ca.SX:
            """The centre with the uncertain entries multiplied by the model's parameters."""
            p = ca.SX(ca.DM(centre))
            for name, multiplier in zip(scenarios.names, multipliers, strict=True):
                p[PARAMETER_NAMES.index(name)] = centre[PARAMETER_NAMES.index(name)] * multiplier
            return p

        x, u = xs * ca.DM(STATE_SCALE), us * ca.DM(self._u_scale)
        model.set_rhs("x", duration * culture.rhs(clock * CLOCK_SCALE_H, x, u, parameters(multipliers)) / ca.DM(STATE_SCALE))
        model.set_rhs("clock", duration / CLOCK_SCALE_H)
        model.setup()
        # Objective and constraints in the symbols the set-up model holds.
        xs, us, clock, at_harvest = model.x["x"], model.u["u"], model.x["clock"], model.tvp["at_harvest"]
        x, u = xs * ca.DM(STATE_SCALE), us * ca.DM(self._u_scale)
        y = culture.outputs(clock * CLOCK_SCALE_H, x, u, parameters([model.p[f"m{i}"] for i in range(len(scenarios.names))]))

        mpc = do_mpc.controller.MPC(model)
        mpc.set_param(n_horizon=n_horizon, t_step=1.0, n_robust=1)  # time runs in stages; the duration tvp scales each
        mpc.settings.supress_ipopt_output()
        mpc.settings.nlpsol_opts["record_time"] = True
        mpc.settings.nlpsol_opts["ipopt.tol"] = config.tol
        i_p, i_v = STATE_INDEX["titer"], STATE_INDEX["volume"]
        mpc.set_objective(mterm=-(x[i_p] * x[i_v]) / 1000.0, lterm=ca.SX(0))
        mpc.set_rterm(u=np.asarray(config.move_penalty, dtype=float))
        nonnegative = np.array([name != "temperature" for name in STATE_INDEX])
        mpc.bounds["lower", "_x", "x"] = np.where(nonnegative, 0.0, -np.inf)
        mpc.bounds["lower", "_u", "u"] = self._u_lower / self._u_scale
        mpc.bounds["upper", "_u", "u"] = self._u_upper / self._u_scale
        glucose = x[STATE_INDEX["glucose"]]
        soft = {"ub": 0.0, "soft_constraint": True, "penalty_term_cons": config.slack_l1 / n_scenarios}
        mpc.set_nl_cons("glucose_low", config.glucose_min_g_per_l - glucose, **soft)
        mpc.set_nl_cons("glucose_high", glucose - config.glucose_max_g_per_l, **soft)
        osmolality_limit = batch.limits.osmolality_max_mosm_per_kg - config.osmolality_backoff_mosm_per_kg
        mpc.set_nl_cons("osmolality", (y[OUTPUT_INDEX["osmolality"]] - osmolality_limit) / 10.0, **soft)
        volume_limit = batch.equipment.max_working_volume_l - config.volume_backoff_l
        mpc.set_nl_cons("volume", (x[i_v] - volume_limit) / 10.0, **soft)
        mpc.set_nl_cons("viability", at_harvest * (config.viability_at_harvest_min_pct - y[OUTPUT_INDEX["viability"]]) / 10.0, **soft)
        mpc.set_nl_cons("quality", at_harvest * (config.galactosylated_fraction_min - y[OUTPUT_INDEX["galactosylated_fraction"]]) * 10.0, **soft)
        mpc.set_uncertainty_values(**{f"m{i}": np.exp(np.array([0.0, -scenarios.k_sigma * sd, scenarios.k_sigma * sd])) for i, sd in enumerate(scenarios.log_sd)})

        template = mpc.get_tvp_template()

        def tvp_fun(t_now: float | np.ndarray):
            for k in range(n_horizon + 1):
                template["_tvp", k, "duration"] = float(self._durations[k]) if k < n else 0.0
                template["_tvp", k, "at_harvest"] = 1.0 if k == n else 0.0
            return template

        mpc.set_tvp_fun(tvp_fun)
        mpc.prepare_nlp()
        i_t = INPUT_INDEX["temperature_setpoint"]
        rate = config.temperature_rate_max_degc_per_h / self._u_scale[i_t]
        for k in range(n_horizon):
            for s in range(1 if k == 0 else n_scenarios):  # stage 0 has one input for all scenarios; each later one its own
                previous = mpc.opt_p["_u_prev"][i_t] if k == 0 else mpc.opt_x["_u", k - 1, 0 if k == 1 else s][i_t]
                move = mpc.opt_x["_u", k, s][i_t] - previous
                allowed = rate * mpc.opt_p["_tvp", k, "duration"]
                mpc.nlp_cons.append(ca.vertcat(move - allowed, -move - allowed))
                mpc.nlp_cons_lb.append(np.full(2, -np.inf))
                mpc.nlp_cons_ub.append(np.zeros(2))
        mpc.nlp_obj = mpc.nlp_obj + config.slack_l2 / n_scenarios * ca.sumsqr(ca.vertcat(*[ca.vertcat(*row) for row in mpc.opt_x["_eps"]]))
        mpc.create_nlp()
        self._objective = ca.Function("objective", [mpc.nlp["x"], mpc.nlp["p"]], [mpc.nlp["f"]])
        self._mpc = mpc
        self._n_scenarios = n_scenarios

    def plan(self, process_time_h: float, state: np.ndarray, previous_inputs: np.ndarray, *, cold: bool) -> Solve:
        mpc = self._mpc
        _, self._durations = self._grid.stage_grid(process_time_h, HARVEST_H)
        x0 = np.append(np.asarray(state, dtype=float) / STATE_SCALE, process_time_h / CLOCK_SCALE_H)
        mpc.t0 = process_time_h
        mpc.u0 = np.clip(previous_inputs, self._u_lower, self._u_upper) / self._u_scale
        if cold:
            mpc.x0 = x0
            mpc.set_initial_guess()
            mpc.flags["initial_run"] = False  # no multipliers from another window
        started = time.perf_counter()
        mpc.make_step(x0)
        wall = time.perf_counter() - started
        stats = mpc.solver_stats
        w = np.asarray(mpc.opt_x_num.cat).ravel()
        final = [np.asarray(mpc.opt_x_num["_x", self._n, s, -1]).ravel()[: len(STATE_SCALE)] * STATE_SCALE for s in range(self._n_scenarios)]
        masses = np.array([f[STATE_INDEX["titer"]] * f[STATE_INDEX["volume"]] for f in final])
        success = bool(stats.get("success", False)) and bool(np.all(np.isfinite(w)))
        objective = float(self._objective(mpc.opt_x_num, mpc.opt_p_num))
        first = np.asarray(mpc.opt_x_num["_u", 0, 0]).ravel() * self._u_scale
        slacks = np.asarray(ca.vertcat(*[ca.vertcat(*row) for row in mpc.opt_x_num["_eps"]])).ravel()
        return Solve(
            process_time_h, wall, int(stats.get("iter_count", -1)), success, str(stats.get("return_status", "unknown")), cold, objective, first, masses, float(np.max(slacks))
        )


# ---------------------------------------------------------------------- the runs


def run_closed_loop(planners: Sequence[Planner], loaded: LoadedSimulation, start_h: float, cycles: int) -> list[Window]:
    """From the recipe's state at ``start_h``, ``cycles`` cycles on the simulated plant with the first planner's plan applied; every planner plans from the same true states."""
    plc = recipe_plc(loaded, start_h)
    plc.set_operator_remote(True)
    windows = [Window(planner.name, start_h) for planner in planners]
    rate = MpcConfig().temperature_rate_max_degc_per_h
    for k in range(cycles):
        t, state, previous = plc.process_time_h, plc.plant.state.copy(), applied_inputs(plc)
        for planner, window in zip(planners, windows, strict=True):
            window.solves.append(planner.plan(t, state, previous, cold=k == 0))
        applied = windows[0].solves[-1]
        u = applied.first_inputs if applied.success else previous
        last = Setpoints(float(previous[0]), float(previous[1]), float(previous[2]))
        filtered = filter_setpoints(Setpoints(float(u[0]), float(u[1]), float(u[2])), last, loaded.batch, temperature_rate_degc_per_h=rate, dt_h=loaded.batch.cycle_period_h)
        plc.write_heartbeat(plc.heartbeat + 1)
        plc.write_setpoints(filtered.setpoints)
        plc.advance_to(plc.next_cycle_boundary_h())
    return windows


def run_along_recipe(planner: Planner, trajectory: RecipeTrajectory, start_h: float, cycles: int) -> Window:
    """The recipe's state and setpoints every cycle, the plan not applied: to the planner, every cycle a disturbance."""
    window = Window(planner.name + " on recipe", start_h)
    for k in range(cycles):
        t = start_h + k
        window.solves.append(planner.plan(t, trajectory.states[t], trajectory.setpoints[t], cold=k == 0))
    return window


def batch_estimate_ours(windows: Sequence[Window], cold_at_inoculation_s: float) -> float:
    """Seconds in the solver over a whole batch: window warm medians interpolated over every cycle, one cold solve, a harvest candidate every 12 cycles."""
    centres = [w.start_h + 0.5 * len(w.solves) for w in windows]
    medians = [statistics.median(s.wall_s for s in w.warm) for w in windows]
    cycles = np.arange(1.0, HARVEST_H)
    warm_s = float(np.sum(np.interp(cycles, centres, medians)))
    return cold_at_inoculation_s + warm_s * (1.0 + 1.0 / LATER_HARVEST_EVERY_CYCLES)


def batch_estimate_dompc(windows: Sequence[Window], build_s: float) -> float:
    """do-mpc's NLP has the same size every cycle: its mean solve time over every cycle, its build once, a harvest candidate every 12 cycles."""
    mean = statistics.mean(s.wall_s for w in windows for s in w.solves)
    return build_s + mean * HARVEST_H * (1.0 + 1.0 / LATER_HARVEST_EVERY_CYCLES)


# -------------------------------------------------------------------------- output


def _ms(value: float) -> str:
    return f"{1000 * value:.0f}" if math.isfinite(value) else "n/a"


def print_windows(title: str, windows: Sequence[Window]) -> None:
    print(title)
    print(f"  {'':30s}" + "".join(f"{w.planner + f' @{w.start_h:.0f} h':>28s}" for w in windows))

    def line(label: str, fmt: Callable[[Window], str]) -> None:
        print(f"  {label:30s}" + "".join(f"{fmt(w):>28s}" for w in windows))

    line("solves (failed)", lambda w: f"{len(w.solves)} ({sum(not s.success for s in w.solves)})")
    line("first (cold) solve [ms] (iter.)", lambda w: f"{_ms(w.cold[0].wall_s)} ({w.cold[0].iterations})" if w.cold else "n/a")
    line("warm median [ms]", lambda w: _ms(statistics.median(s.wall_s for s in w.warm)) if w.warm else "n/a")
    line("warm p95 [ms]", lambda w: _ms(percentile([s.wall_s for s in w.warm], 95)))
    line("warm max [ms]", lambda w: _ms(max(s.wall_s for s in w.warm)) if w.warm else "n/a")
    line("largest slack, any scenario", lambda w: f"{max(s.slack_max for s in w.solves):.2g}")
    line("iterations warm median (max)", lambda w: f"{statistics.median(s.iterations for s in w.warm):.0f} ({max(s.iterations for s in w.warm)})" if w.warm else "n/a")
    for w in windows:
        typical = statistics.median(s.wall_s for s in w.solves)
        for s in w.solves:
            if not s.success:
                print(f"  failed ({w.planner}) at {s.process_time_h:.0f} h: {s.status} after {s.iterations} iterations")
            elif not s.cold and s.wall_s > 4.0 * typical:
                print(f"  slow ({w.planner}) at {s.process_time_h:.0f} h: {_ms(s.wall_s)} ms, {s.iterations} iterations, {s.status}")


def print_agreement(ours: Window, theirs: Window, u_scale: np.ndarray) -> tuple[float, float, float]:
    """Per cycle where both succeeded: objective difference, largest first-input difference (scaled), mean product difference."""
    print(f"  agreement per cycle, {ours.planner} vs {theirs.planner} (window from {ours.start_h:.0f} h):")
    print(f"    {'t [h]':>6s} {'objective ours':>15s} {'do-mpc':>10s} {'feed ours/do-mpc [L/h]':>24s} {'glucose [L/h]':>16s} {'T [°C]':>14s} {'mean product [g]':>20s}")
    worst_objective = worst_input = worst_product = 0.0
    for a, b in zip(ours.solves, theirs.solves, strict=False):
        if not (a.success and b.success):
            continue
        d_objective = abs(a.objective - b.objective) / max(abs(b.objective), 1e-9)
        d_input = float(np.max(np.abs(a.first_inputs - b.first_inputs) / u_scale))
        d_product = abs(a.product_mass_g.mean() - b.product_mass_g.mean()) / max(b.product_mass_g.mean(), 1e-9)
        worst_objective, worst_input, worst_product = max(worst_objective, d_objective), max(worst_input, d_input), max(worst_product, d_product)
        u, v = a.first_inputs, b.first_inputs
        print(
            f"    {a.process_time_h:6.0f} {a.objective:15.5f} {b.objective:10.5f} {u[0]:11.3f}/{v[0]:<12.3f} {u[1]:7.3f}/{v[1]:<8.3f} {u[2]:6.2f}/{v[2]:<7.2f}"
            f" {a.product_mass_g.mean():9.1f}/{b.product_mass_g.mean():<10.1f}"
        )
    print(
        f"    largest differences: objective {100 * worst_objective:.2f} %, first inputs {100 * worst_input:.2f} % of their range, mean product at harvest {100 * worst_product:.2f} %"
    )
    return worst_objective, worst_input, worst_product


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"windows at {QUICK_WINDOWS_H} h of {QUICK_CYCLES} cycles, do-mpc in the last one only, no whole-batch closed loop")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="do_mpc")
    warnings.filterwarnings("ignore", category=FutureWarning, module="casadi")
    configure_logging(level=logging.WARNING)
    loaded = load_simulation(PLATFORM)
    batch = loaded.batch
    model = CultureModel()
    windows_h = QUICK_WINDOWS_H if args.quick else FULL_WINDOWS_H
    dompc_windows_h = (LATE_START_H,) if args.quick else DOMPC_FULL_WINDOWS_H
    cycles = QUICK_CYCLES if args.quick else FULL_CYCLES
    print(
        f"robust speed: {'--quick, ' if args.quick else ''}platform batch, 9 scenarios, robust horizon 1, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start"
    )

    centre = np.asarray(recipe_plc(loaded, 0.0).plant.parameters, dtype=float)
    scenarios = scenarios_from_estimate(ExtendedKalmanEstimator.from_batch(model, batch, centre).estimate)
    n_scenarios = scenarios.parameters.shape[1]
    equal = np.full(n_scenarios, 1.0 / n_scenarios)
    print(f"  scenarios: {scenarios.names[0]} × {scenarios.names[1]}, ln-sd {scenarios.log_sd[0]:.2f} and {scenarios.log_sd[1]:.2f}, {{0, ±{scenarios.k_sigma} σ}}, equal weights")
    started = time.perf_counter()
    robust = RobustMpc(model, batch, MpcConfig(), n_scenarios=n_scenarios)
    print(f"  RobustMpc built in {time.perf_counter() - started:.1f} s (its compiled library from ~/.cache/bioreactor-mpc, or compiled now, once)")
    started = time.perf_counter()
    dompc = DoMpcRobustPlanner(model, batch, MpcConfig(), scenarios, robust)
    dompc_build_s = time.perf_counter() - started
    print(f"  do-mpc multi-stage built in {dompc_build_s:.1f} s")

    ours = OurPlanner(robust, scenarios, equal)
    ours_windows: list[Window] = []
    dompc_windows: list[Window] = []
    for start_h in windows_h:
        planners: list[Planner] = [ours, dompc] if start_h in dompc_windows_h else [ours]
        found = run_closed_loop(planners, loaded, start_h, cycles)
        ours_windows.append(found[0])
        dompc_windows.extend(found[1:])
    trajectory = recipe_trajectory(loaded, [t + k for t in windows_h for k in range(cycles)])
    stress_windows = [run_along_recipe(ours, trajectory, t, cycles) for t in windows_h]
    whole_batch = None if args.quick else run_closed_loop([ours], loaded, 0.0, round(HARVEST_H / batch.cycle_period_h))[0]

    print()
    print_windows(
        f"1. closed loop from the recipe's state, {cycles} cycles per window, our plan applied; every planner plans from the same true states", [*ours_windows, *dompc_windows]
    )
    print()
    print("2. the same answers where both discretisations are accurate (the last day: every stage ≤ 1 h)")
    late_ours = next(w for w in ours_windows if w.start_h == LATE_START_H)
    late_dompc = next(w for w in dompc_windows if w.start_h == LATE_START_H)
    d_objective, d_input, d_product = print_agreement(late_ours, late_dompc, input_scale(batch))
    for window in dompc_windows:
        if window.start_h != LATE_START_H:
            print(f"   and from {window.start_h:.0f} h, where do-mpc has one collocation element per coarse stage of up to 40 h (a coarser model, not the same answer):")
            print_agreement(next(w for w in ours_windows if w.start_h == window.start_h), window, input_scale(batch))
    print()
    print_windows("3. stress: RobustMpc along the recipe's own states and setpoints (its plan not applied: every cycle the state is not where it planned)", stress_windows)
    print()

    p95 = percentile([s.wall_s for w in ours_windows for s in w.warm], 95)
    stress_p95 = percentile([s.wall_s for w in stress_windows for s in w.warm], 95)
    dompc_p95 = percentile([s.wall_s for w in dompc_windows for s in w.warm], 95)
    first_cold = ours_windows[0].cold[0]
    ours_batch_s = batch_estimate_ours(ours_windows, first_cold.wall_s)
    stress_batch_s = batch_estimate_ours(stress_windows, first_cold.wall_s)
    dompc_batch_s = batch_estimate_dompc(dompc_windows, dompc_build_s)
    print(f"4. whole batch ({HARVEST_H:.0f} cycles + a later-harvest candidate every {LATER_HARVEST_EVERY_CYCLES}), from the windows")
    print(f"  RobustMpc: first (cold) solve at {ours_windows[0].start_h:.0f} h {first_cold.wall_s:.1f} s ({first_cold.iterations} iterations, nominal pre-solve included)")
    print(f"  RobustMpc: {ours_batch_s:.0f} s closed loop, {stress_batch_s:.0f} s along the recipe's states")
    if whole_batch is not None:
        walls = [s.wall_s for s in whole_batch.warm]
        retried = sum("retried cold" in s.status for s in whole_batch.solves)
        print(
            f"  RobustMpc, measured: a closed loop of all {len(whole_batch.solves)} cycles took {sum(s.wall_s for s in whole_batch.solves):.0f} s in the solver;"
            f" warm median {_ms(statistics.median(walls))} ms, p95 {_ms(percentile(walls, 95))} ms, max {_ms(max(walls))} ms;"
            f" {retried} warm solves retried cold, {sum(not s.success for s in whole_batch.solves)} failed; largest slack {max(s.slack_max for s in whole_batch.solves):.2g}"
        )
    dompc_median_s = dompc_build_s + statistics.median(s.wall_s for w in dompc_windows for s in w.solves) * HARVEST_H * (1.0 + 1.0 / LATER_HARVEST_EVERY_CYCLES)
    print(
        f"  do-mpc:    {dompc_batch_s:.0f} s from the mean of its solves {'in the last day' if args.quick else 'in its windows'}, {dompc_median_s:.0f} s from their median"
        f" (build {dompc_build_s:.0f} s; its NLP has the same size every cycle)"
    )
    print()
    print("targets")
    print(f"  p95 warm solve, RobustMpc, closed loop      {_ms(p95):>7s} ms  target <= {_ms(TARGET_P95_S)} ms: {_verdict(p95 <= TARGET_P95_S)}")
    print(f"  p95 warm solve, RobustMpc, recipe states    {_ms(stress_p95):>7s} ms  target <= {_ms(TARGET_P95_S)} ms: {_verdict(stress_p95 <= TARGET_P95_S)}")
    print(f"  p95 warm solve, do-mpc, closed loop         {_ms(dompc_p95):>7s} ms  target <= {_ms(TARGET_P95_S)} ms: {_verdict(dompc_p95 <= TARGET_P95_S)}")
    print(
        f"  whole batch, RobustMpc, closed loop         {ours_batch_s:7.0f} s   target <= {TARGET_BATCH_S:.0f} s: {_verdict(ours_batch_s <= TARGET_BATCH_S)} (estimated from the windows)"
    )
    if whole_batch is not None:
        measured_s = sum(s.wall_s for s in whole_batch.solves) * (1 + 1 / LATER_HARVEST_EVERY_CYCLES)
        print(f"  whole batch, RobustMpc, measured            {measured_s:7.0f} s   target <= {TARGET_BATCH_S:.0f} s: {_verdict(measured_s <= TARGET_BATCH_S)}")
    print(f"  whole batch, do-mpc                         {dompc_batch_s:7.0f} s   target <= {TARGET_BATCH_S:.0f} s: {_verdict(dompc_batch_s <= TARGET_BATCH_S)}")
    print(f"  agreement on the last day                   objective {100 * d_objective:.3f} %, first inputs {100 * d_input:.2f} % of range, mean product {100 * d_product:.3f} %")
    print(f"  load average at the end {os.getloadavg()[0]:.1f} (other work on the machine slows every figure alike)")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    main()
