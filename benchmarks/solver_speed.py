"""Solver speed: our compiled multiple-shooting NMPC against a do-mpc 5.1.2 default formulation, in one run.

Measured side by side, on the same machine and in one run:

1. N = 48, the last 48 h of a recipe batch (true state at 312 h, harvest at
   360 h): a closed loop of warm-started cycles on the simulated PLC, once with
   ``EconomicMpc(MpcConfig(fine_stages=48, coarse_stages=1))`` (compiled C) and
   once with do-mpc's defaults (orthogonal collocation, IPOPT with MUMPS) on the
   same model, objective, bounds and soft constraints. Both see the true state
   and the true parameters; the achieved product mass is compared.
2. The whole batch: our default NMPC oracle closed loop (shrinking horizon to
   the planned harvest, harvest planning on), and without ``--quick`` do-mpc's
   defaults with the horizon capped at 168 h.
3. The first-cycle latency of our MPC (construction with the compiled library
   already cached, plus the first, cold solve), in a fresh process.

The per-cycle time is the wall time of the whole call the controller makes
(``EconomicMpc.solve`` / ``MPC.make_step``), the solver-only time is ours
``MpcSolution.solve_time_s`` (the IPOPT call, or both calls when a failed warm
solve was retried cold) and do-mpc's ``t_wall_total``. Every solve's success is checked; a failed solve is never
applied (the previous plan, shifted, is used instead, as the runtime does).

Usage: python benchmarks/solver_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import casadi as ca
import numpy as np

from bioreactor_mpc.logging import configure_logging
from controller.config import BatchConfig
from controller.mpc import STATE_SCALE, EconomicMpc, MpcConfig
from controller.quality import SETPOINT_SIGNALS
from controller.safety import filter_setpoints
from controller.types import Setpoints
from plant_models.cho import OUTPUT_INDEX, STATE_INDEX, CultureModel
from simulator.batch import build_simulated_plc, kpis_of
from simulator.closed_loop import oracle_source, run_controlled_batch
from simulator.config import LoadedSimulation, load_simulation
from simulator.plc import PHASE_RUNNING, SimulatedPlc

PLATFORM = Path(__file__).resolve().parent.parent / "configs" / "simulate" / "platform.yaml"

LATE_START_H = 312.0
LATE_HARVEST_H = 360.0
LATE_STAGES = 48
DOMPC_FULL_HORIZON_CAP = 168
DOMPC_FULL_BUDGET_S = 600.0
DOMPC_FULL_CAPPED_CYCLES = 72
QUICK_LATE_CYCLES = 24
QUICK_FULL_CYCLES = 48

TARGET_SPEEDUP = 8.0
TARGET_OBJECTIVE_REL = 0.005
TARGET_P95_N48_S = 0.050
TARGET_P95_FULL_S = 0.250
TARGET_FIRST_CYCLE_S = 10.0


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CycleRecord:
    """One controller call: how long it took, what the solver said, what it predicted."""

    process_time_h: float
    wall_s: float
    solver_s: float
    iterations: int
    success: bool
    status: str
    predicted_product_mass_g: float


@dataclass(frozen=True)
class Plan:
    """A solve's answer as the loop uses it: the plan (inputs per 1-h stage from ``start_h``) and its record."""

    start_h: float
    inputs: np.ndarray
    record: CycleRecord


@dataclass
class LoopResult:
    name: str
    records: list[CycleRecord] = field(default_factory=list)
    product_mass_g: float = math.nan
    score_g_per_day: float = math.nan
    harvest_h: float = math.nan
    violation_h: float = math.nan
    loop_wall_s: float = math.nan
    setup_s: float = math.nan
    notes: list[str] = field(default_factory=list)

    @property
    def walls(self) -> list[float]:
        return [r.wall_s for r in self.records]

    @property
    def failures(self) -> int:
        return sum(not r.success for r in self.records)


class Planner(Protocol):
    def plan(self, process_time_h: float, state: np.ndarray, parameters: np.ndarray, previous_inputs: np.ndarray, harvest_h: float) -> Plan: ...


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


# --------------------------------------------------------------------- our planner


class OurPlanner:
    """``EconomicMpc`` warm-started from its previous plan, as ``NmpcController`` calls it."""

    def __init__(self, mpc: EconomicMpc) -> None:
        self._mpc = mpc
        self._warm: dict[str, np.ndarray] | None = None

    def plan(self, process_time_h: float, state: np.ndarray, parameters: np.ndarray, previous_inputs: np.ndarray, harvest_h: float) -> Plan:
        started = time.perf_counter()
        solution = self._mpc.solve(process_time_h=process_time_h, state=state, parameters=parameters, previous_inputs=previous_inputs, harvest_time_h=harvest_h, warm=self._warm)
        wall = time.perf_counter() - started
        if solution.success:
            self._warm = solution.warm
        record = CycleRecord(
            process_time_h, wall, solution.solve_time_s, solution.iterations, solution.success, solution.status or solution.reason, solution.predicted_product_mass_g
        )
        return Plan(process_time_h, solution.inputs, record)


# ------------------------------------------------------------------ do-mpc planner


class DoMpcPlanner:
    """The same economic OCP in do-mpc 5.1.2 with its defaults (collocation, IPOPT/MUMPS, its own warm start).

    Same as ours: the culture model with the parameters as numbers, states and
    inputs scaled by the same factors (so the NLP sees numbers of order one and
    the move penalty ``rterm`` weighs the same scaled moves), −product mass at
    the end of the horizon (kg), input and state bounds, the glucose window,
    osmolality and volume limits with our back-offs as soft constraints with our
    L1 weight (the L2 part added to ``nlp_obj``), the temperature rate limit
    (added to ``nlp_cons``), viability and quality at harvest (soft, switched on
    by a tvp at the harvest stage).

    Different, because do-mpc works that way: process time is a tvp held at the
    stage midpoint (ours integrates it exactly); path constraints act at the
    stage starts k = 0..N−1 (ours at stage ends); there is no shrinking horizon,
    so the horizon keeps N stages of ``t_step`` and an ``active`` tvp freezes the
    dynamics after harvest; when the horizon ends exactly at harvest the
    harvest constraints act one stage early; IPOPT keeps its defaults (tol 1e-8).
    """

    def __init__(self, culture: CultureModel, batch: BatchConfig, parameters: np.ndarray, config: MpcConfig, n_horizon: int) -> None:
        import do_mpc  # imported here: slow, noisy, and not needed by the rest of the run

        self._n = n_horizon
        self._u_lower = np.array([0.0, 0.0, batch.equipment.temperature_min_degc])
        self._u_upper = np.array([batch.equipment.feed_rate_max_lph, batch.equipment.glucose_rate_max_lph, batch.equipment.temperature_max_degc])
        self._u_scale = np.maximum(self._u_upper, 1e-3)
        self._harvest_h = math.inf

        model = do_mpc.model.Model("continuous", "SX")
        xs = model.set_variable("_x", "x", shape=(culture.n_states, 1))
        us = model.set_variable("_u", "u", shape=(culture.n_inputs, 1))
        time_h = model.set_variable("_tvp", "time_h")
        active = model.set_variable("_tvp", "active")
        at_harvest = model.set_variable("_tvp", "at_harvest")
        x, u = xs * ca.DM(STATE_SCALE), us * ca.DM(self._u_scale)
        p = ca.DM(np.asarray(parameters, dtype=float))
        model.set_rhs("x", active * culture.rhs(time_h, x, u, p) / ca.DM(STATE_SCALE))
        model.setup()
        # Objective and constraints must be written in the symbols the set-up model holds.
        xs, us, time_h, at_harvest = model.x["x"], model.u["u"], model.tvp["time_h"], model.tvp["at_harvest"]
        x, u = xs * ca.DM(STATE_SCALE), us * ca.DM(self._u_scale)
        y = culture.outputs(time_h, x, u, p)

        mpc = do_mpc.controller.MPC(model)
        mpc.set_param(n_horizon=n_horizon, t_step=batch.cycle_period_h)
        mpc.settings.supress_ipopt_output()
        mpc.settings.nlpsol_opts["record_time"] = True  # only so that IPOPT's own t_wall_total is reported
        i_p, i_v = STATE_INDEX["titer"], STATE_INDEX["volume"]
        mpc.set_objective(mterm=-(x[i_p] * x[i_v]) / 1000.0, lterm=ca.SX(0))
        mpc.set_rterm(u=np.asarray(config.move_penalty, dtype=float))
        nonnegative = np.array([name != "temperature" for name in STATE_INDEX])
        mpc.bounds["lower", "_x", "x"] = np.where(nonnegative, 0.0, -np.inf)
        mpc.bounds["lower", "_u", "u"] = self._u_lower / self._u_scale
        mpc.bounds["upper", "_u", "u"] = self._u_upper / self._u_scale
        glucose = x[STATE_INDEX["glucose"]]
        soft = {"ub": 0.0, "soft_constraint": True, "penalty_term_cons": config.slack_l1}
        mpc.set_nl_cons("glucose_low", config.glucose_min_g_per_l - glucose, **soft)
        mpc.set_nl_cons("glucose_high", glucose - config.glucose_max_g_per_l, **soft)
        osmolality_limit = batch.limits.osmolality_max_mosm_per_kg - config.osmolality_backoff_mosm_per_kg
        mpc.set_nl_cons("osmolality", (y[OUTPUT_INDEX["osmolality"]] - osmolality_limit) / 10.0, **soft)
        volume_limit = batch.equipment.max_working_volume_l - config.volume_backoff_l
        mpc.set_nl_cons("volume", (x[i_v] - volume_limit) / 10.0, **soft)
        mpc.set_nl_cons("viability", at_harvest * (config.viability_at_harvest_min_pct - y[OUTPUT_INDEX["viability"]]) / 10.0, **soft)
        mpc.set_nl_cons("quality", at_harvest * (config.galactosylated_fraction_min - y[OUTPUT_INDEX["galactosylated_fraction"]]) * 10.0, **soft)

        template = mpc.get_tvp_template()

        def tvp_fun(t_now: float | np.ndarray):
            t_now = float(np.asarray(t_now).ravel()[0])
            # The stage that starts at harvest (its start state is the harvest state); none if harvest lies beyond the horizon.
            stages_to_harvest = (self._harvest_h - t_now) / batch.cycle_period_h
            harvest_stage = max(0, math.ceil(stages_to_harvest - 1e-9)) if math.isfinite(stages_to_harvest) else n_horizon + 1
            if harvest_stage == n_horizon:
                harvest_stage = n_horizon - 1  # do-mpc puts no path constraint on the final state: one stage early
            for k in range(n_horizon + 1):
                start = t_now + k * batch.cycle_period_h
                template["_tvp", k, "time_h"] = start + 0.5 * batch.cycle_period_h
                template["_tvp", k, "active"] = float(np.clip((self._harvest_h - start) / batch.cycle_period_h, 0.0, 1.0))
                template["_tvp", k, "at_harvest"] = 1.0 if k == harvest_stage else 0.0
            return template

        mpc.set_tvp_fun(tvp_fun)
        mpc.prepare_nlp()
        i_t = culture.input_index("temperature_setpoint")
        rate = config.temperature_rate_max_degc_per_h * batch.cycle_period_h / self._u_scale[i_t]
        for k in range(n_horizon):
            previous = mpc.opt_p["_u_prev"][i_t] if k == 0 else mpc.opt_x["_u", k - 1, 0][i_t]
            move = mpc.opt_x["_u", k, 0][i_t] - previous
            allowed = rate * mpc.opt_p["_tvp", k, "active"]
            mpc.nlp_cons.append(ca.vertcat(move - allowed, -move - allowed))
            mpc.nlp_cons_lb.append(np.full(2, -np.inf))
            mpc.nlp_cons_ub.append(np.zeros(2))
        mpc.nlp_obj = mpc.nlp_obj + config.slack_l2 * ca.sumsqr(ca.vertcat(*[ca.vertcat(*row) for row in mpc.opt_x["_eps"]]))
        mpc.create_nlp()
        self._mpc = mpc
        self._guess_set = False

    def plan(self, process_time_h: float, state: np.ndarray, parameters: np.ndarray, previous_inputs: np.ndarray, harvest_h: float) -> Plan:
        mpc = self._mpc
        self._harvest_h = harvest_h
        x0 = np.asarray(state, dtype=float) / STATE_SCALE
        mpc.t0 = process_time_h
        mpc.u0 = np.clip(previous_inputs, self._u_lower, self._u_upper) / self._u_scale
        if not self._guess_set:
            mpc.x0 = x0
            mpc.set_initial_guess()
            self._guess_set = True
        started = time.perf_counter()
        mpc.make_step(x0)
        wall = time.perf_counter() - started
        stats = mpc.solver_stats
        n = self._n
        inputs = np.array([np.asarray(mpc.opt_x_num["_u", k, 0]).ravel() for k in range(n)]).T * self._u_scale[:, None]
        final = np.asarray(mpc.opt_x_num["_x", n, 0, -1]).ravel() * STATE_SCALE
        w = np.asarray(mpc.opt_x_num.cat).ravel()
        success = bool(stats.get("success", False)) and bool(np.all(np.isfinite(w)))
        status = str(stats.get("return_status", "unknown"))
        record = CycleRecord(
            process_time_h,
            wall,
            float(stats.get("t_wall_total", math.nan)),
            int(stats.get("iter_count", -1)),
            success,
            status,
            float(final[STATE_INDEX["titer"]] * final[STATE_INDEX["volume"]]),
        )
        return Plan(process_time_h, np.clip(inputs, self._u_lower[:, None], self._u_upper[:, None]), record)


# ---------------------------------------------------------------------- the loops


def plc_at(loaded: LoadedSimulation, model: CultureModel, start_h: float) -> SimulatedPlc:
    """The simulated PLC under its local recipe up to ``start_h``, then switched to remote."""
    plc, _ = build_simulated_plc(loaded, model)
    plc.set_operator_remote(False)
    plc.advance_to(start_h)
    if plc.phase != PHASE_RUNNING:
        raise RuntimeError(f"the recipe batch ended before {start_h} h: {plc.harvest_reason}")
    plc.set_operator_remote(True)
    plc.write_heartbeat(plc.heartbeat + 1)
    return plc


def applied_inputs(plc: SimulatedPlc) -> np.ndarray:
    snapshot = plc.snapshot()
    return np.array([float(snapshot[tag].value) for tag in SETPOINT_SIGNALS])


def run_fixed_harvest_loop(
    name: str,
    planner: Planner,
    plc: SimulatedPlc,
    batch: BatchConfig,
    harvest_h: float,
    *,
    max_cycles: int,
    rate_degc_per_h: float,
    setup_s: float,
    budget_s: float = math.inf,
    capped_cycles: int = 0,
) -> LoopResult:
    """Warm-started cycles on the true plant to a fixed harvest; after ``max_cycles`` the last good plan runs open loop.

    If the first 8 solves project a loop longer than ``budget_s``, only ``capped_cycles`` are solved.
    """
    result = LoopResult(name=name, setup_s=setup_s)
    cycle_h = batch.cycle_period_h
    good: Plan | None = None
    cycles = 0
    started = time.perf_counter()
    while plc.phase == PHASE_RUNNING and plc.process_time_h < harvest_h - 0.5 * cycle_h:
        t = plc.process_time_h
        previous = applied_inputs(plc)
        if len(result.records) == 8 and math.isfinite(budget_s):
            remaining = round((harvest_h - t) / cycle_h)
            projected_s = sum(result.walls) + statistics.mean(result.walls) * min(remaining, max_cycles - 8)
            if projected_s > budget_s and capped_cycles < max_cycles:
                max_cycles = capped_cycles
                result.notes.append(f"projected {projected_s:.0f} s > {budget_s:.0f} s: only the first {capped_cycles} cycles solved; product and score not comparable")
        if len(result.records) < max_cycles:
            plan = planner.plan(t, plc.plant.state.copy(), plc.plant.parameters, previous, harvest_h)
            result.records.append(plan.record)
            if plan.record.success:
                good = plan
        if good is not None:
            index = min(int(round((t - good.start_h) / cycle_h)), good.inputs.shape[1] - 1)
            u = good.inputs[:, index]
        else:
            u = previous
        requested = Setpoints(float(u[0]), float(u[1]), float(u[2]))
        last = Setpoints(float(previous[0]), float(previous[1]), float(previous[2]))
        filtered = filter_setpoints(requested, last, batch, temperature_rate_degc_per_h=rate_degc_per_h, dt_h=cycle_h)
        plc.write_heartbeat(plc.heartbeat + 1)
        plc.write_setpoints(filtered.setpoints)
        plc.advance_to(plc.next_cycle_boundary_h())
        cycles += 1
    if plc.phase == PHASE_RUNNING:
        plc.write_heartbeat(plc.heartbeat + 1)
        plc.request_harvest(True)
    result.loop_wall_s = time.perf_counter() - started
    kpis = kpis_of(plc.plant.trajectory(), batch)
    result.product_mass_g, result.score_g_per_day = kpis.product_mass_g, kpis.score_g_per_day
    result.harvest_h, result.violation_h = kpis.harvest_time_h, kpis.violation_h
    if len(result.records) < cycles:
        result.notes.append(f"{len(result.records)} of {cycles} cycles solved, then the last good plan ran open loop to harvest")
    return result


def run_ours_full(loaded: LoadedSimulation, model: CultureModel, max_cycles: int | None) -> LoopResult:
    """Our default NMPC with the oracle; the whole batch via ``run_controlled_batch``, or its first cycles."""
    result = LoopResult(name="ours, full horizon")
    started = time.perf_counter()
    if max_cycles is None:
        controlled = run_controlled_batch(loaded, make_source=oracle_source, model=model)
        result.loop_wall_s = time.perf_counter() - started
        kpis = controlled.batch.kpis
        result.product_mass_g, result.score_g_per_day, result.harvest_h, result.violation_h = kpis.product_mass_g, kpis.score_g_per_day, kpis.harvest_time_h, kpis.violation_h
        result.records = [CycleRecord(math.nan, s, s, -1, True, "", math.nan) for s in controlled.solve_times_s]
        result.notes.append(
            f"{controlled.solver_failures} failed solves, {controlled.solver_cold_retries} warm solves retried cold; decisions by source {controlled.decisions_by_source}"
        )
        result.notes.append(_SOLVE_TIME_NOTE)
        return result
    # The first cycles only, through the same cycle as the whole batch.
    controlled = run_controlled_batch(loaded, make_source=oracle_source, model=model, max_cycles=max_cycles)
    result.loop_wall_s = time.perf_counter() - started
    result.records = [CycleRecord(math.nan, s, s, -1, True, "", math.nan) for s in controlled.solve_times_s]
    result.notes.append(f"first {max_cycles} cycles only (--quick); {controlled.solver_failures} failed solves, {controlled.solver_cold_retries} warm solves retried cold")
    result.notes.append(_SOLVE_TIME_NOTE)
    return result


_SOLVE_TIME_NOTE = "times are EconomicMpc's solve_time_s (the IPOPT calls, without the warm-start rollout); iterations are not reported by run_controlled_batch"


def run_dompc_full(loaded: LoadedSimulation, model: CultureModel, harvest_h: float, budget_s: float) -> LoopResult:
    """do-mpc defaults over the batch, horizon capped at 168 h, harvest fixed where our loop harvested."""
    plc, _ = build_simulated_plc(loaded, model)
    plc.write_heartbeat(plc.heartbeat + 1)
    started = time.perf_counter()
    planner = DoMpcPlanner(model, loaded.batch, plc.plant.parameters, MpcConfig(), DOMPC_FULL_HORIZON_CAP)
    setup_s = time.perf_counter() - started
    result = run_fixed_harvest_loop(
        "do-mpc, horizon 168 h",
        planner,
        plc,
        loaded.batch,
        harvest_h,
        max_cycles=round(harvest_h / loaded.batch.cycle_period_h),
        rate_degc_per_h=MpcConfig().temperature_rate_max_degc_per_h,
        setup_s=setup_s,
        budget_s=budget_s,
        capped_cycles=DOMPC_FULL_CAPPED_CYCLES,
    )
    result.notes.insert(
        0, f"horizon capped at {DOMPC_FULL_HORIZON_CAP} h ('active' tvp freezes the dynamics after harvest); harvest fixed at {harvest_h:.0f} h, where our loop harvested"
    )
    return result


# ------------------------------------------------------------ first-cycle latency


def first_cycle_probe(platform: str) -> tuple[float, float, bool, int]:
    """In a fresh process: build the default MPC (library cached) and solve its first cycle cold."""
    loaded = load_simulation(platform)
    plc, _ = build_simulated_plc(loaded)
    state, parameters = plc.plant.state.copy(), plc.plant.parameters
    inputs = applied_inputs(plc)
    started = time.perf_counter()
    mpc = EconomicMpc(CultureModel(), loaded.batch, MpcConfig())
    built = time.perf_counter() - started
    solution = mpc.solve(process_time_h=0.0, state=state, parameters=parameters, previous_inputs=inputs, harvest_time_h=loaded.batch.recipe.harvest_h)
    total = time.perf_counter() - started
    return built, total, solution.success, solution.iterations


# -------------------------------------------------------------------------- output


def _ms(value: float) -> str:
    return f"{1000 * value:8.1f}" if math.isfinite(value) else "     n/a"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_loop_table(title: str, rows: list[LoopResult]) -> None:
    print(title)
    header = f"  {'':26s}" + "".join(f"{r.name:>24s}" for r in rows)
    print(header)

    def line(label: str, fmt: Callable[[LoopResult], str]) -> None:
        print(f"  {label:26s}" + "".join(f"{fmt(r):>24s}" for r in rows))

    line("solves (failed)", lambda r: f"{len(r.records)} ({r.failures})")
    line("solve wall median [ms]", lambda r: _ms(statistics.median(r.walls)) if r.records else "n/a")
    line("solve wall p95 [ms]", lambda r: _ms(percentile(r.walls, 95)))
    line("solve wall max [ms]", lambda r: _ms(max(r.walls)) if r.records else "n/a")
    line("IPOPT only median [ms]", lambda r: _ms(statistics.median([c.solver_s for c in r.records])) if r.records else "n/a")
    line("iterations median", lambda r: f"{statistics.median([c.iterations for c in r.records]):.0f}" if r.records and r.records[0].iterations >= 0 else "n/a")
    line("iterations max", lambda r: f"{max(c.iterations for c in r.records)}" if r.records and r.records[0].iterations >= 0 else "n/a")
    line("solve time total [s]", lambda r: f"{sum(r.walls):.1f}")
    line("loop wall time [s]", lambda r: f"{r.loop_wall_s:.1f}")
    line("setup [s]", lambda r: f"{r.setup_s:.1f}" if math.isfinite(r.setup_s) else "n/a")
    line("harvest [h]", lambda r: f"{r.harvest_h:.0f}" if math.isfinite(r.harvest_h) else "n/a")
    line("product mass [g]", lambda r: f"{r.product_mass_g:.1f}" if math.isfinite(r.product_mass_g) else "n/a")
    line("score [g/day]", lambda r: f"{r.score_g_per_day:.2f}" if math.isfinite(r.score_g_per_day) else "n/a")
    line("violation [h]", lambda r: f"{r.violation_h:.2f}" if math.isfinite(r.violation_h) else "n/a")
    for r in rows:
        for note in r.notes:
            print(f"  note ({r.name}): {note}")
        failed = [c for c in r.records if not c.success]
        for c in failed[:5]:
            print(f"  failed ({r.name}) at {c.process_time_h:.0f} h: {c.status} after {c.iterations} iterations")
        if len(failed) > 5:
            print(f"  ... and {len(failed) - 5} more failed solves ({r.name})")


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_LATE_CYCLES} cycles at N = 48, our full-horizon loop cut to {QUICK_FULL_CYCLES} cycles, no do-mpc full horizon"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="do_mpc")  # its notices about optional extras
    warnings.filterwarnings("ignore", category=FutureWarning, module="casadi")  # do-mpc calls numpy on casadi values
    configure_logging(level=logging.WARNING)  # the table on stdout; failed solves and rejected writes still on stderr
    loaded = load_simulation(PLATFORM)
    batch = loaded.batch
    model = CultureModel()
    late_cycles = QUICK_LATE_CYCLES if args.quick else LATE_STAGES
    rate = MpcConfig().temperature_rate_max_degc_per_h
    print(f"solver speed: {'--quick, ' if args.quick else ''}platform batch, seed {loaded.simulation.seed}, {multiprocessing.cpu_count()} CPUs")

    # Compile (or load from the cache) both of our configurations before anything is timed.
    started = time.perf_counter()
    ours_late = EconomicMpc(model, batch, MpcConfig(fine_stages=LATE_STAGES, coarse_stages=1))
    late_setup_s = time.perf_counter() - started
    started = time.perf_counter()
    EconomicMpc(model, batch, MpcConfig())
    default_setup_s = time.perf_counter() - started
    print(f"  our NLPs built (compiled or loaded from the cache): N = 48 in {late_setup_s:.1f} s, default in {default_setup_s:.1f} s")

    # 3. First-cycle latency in a fresh process (library cached by now).
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        built_s, first_s, first_ok, first_iterations = pool.submit(first_cycle_probe, str(PLATFORM)).result()

    # 1. N = 48 from the true state at 312 h to harvest at 360 h.
    ours_n48 = run_fixed_harvest_loop(
        "ours N=48",
        OurPlanner(ours_late),
        plc_at(loaded, model, LATE_START_H),
        batch,
        LATE_HARVEST_H,
        max_cycles=late_cycles,
        rate_degc_per_h=rate,
        setup_s=late_setup_s,
    )
    plc = plc_at(loaded, model, LATE_START_H)
    started = time.perf_counter()
    dompc_planner = DoMpcPlanner(model, batch, plc.plant.parameters, MpcConfig(), LATE_STAGES)
    dompc_setup_s = time.perf_counter() - started
    dompc_n48 = run_fixed_harvest_loop("do-mpc N=48", dompc_planner, plc, batch, LATE_HARVEST_H, max_cycles=late_cycles, rate_degc_per_h=rate, setup_s=dompc_setup_s)

    # 2. Whole batch.
    ours_full = run_ours_full(loaded, model, QUICK_FULL_CYCLES if args.quick else None)
    full_rows = [ours_full]
    if not args.quick:
        full_rows.append(run_dompc_full(loaded, model, ours_full.harvest_h, DOMPC_FULL_BUDGET_S))

    print()
    print_loop_table(f"1. N = 48: true state at {LATE_START_H:.0f} h, harvest at {LATE_HARVEST_H:.0f} h, {late_cycles} warm-started closed-loop cycles", [ours_n48, dompc_n48])
    print()
    print_loop_table("2. whole batch, shrinking horizon (ours: default NmpcConfig, oracle, harvest planning on)", full_rows)
    print()

    speedup = statistics.median(dompc_n48.walls) / statistics.median(ours_n48.walls)
    relative = (ours_n48.product_mass_g - dompc_n48.product_mass_g) / dompc_n48.product_mass_g
    all_ok_n48 = ours_n48.failures == 0 and dompc_n48.failures == 0
    p95_n48 = percentile(ours_n48.walls, 95)
    p95_full = percentile(ours_full.walls, 95)
    print("3. first cycle of our MPC (fresh process, compiled library cached)")
    print(f"  construction {built_s:.2f} s + first cold solve = {first_s:.2f} s ({first_iterations} iterations, {'success' if first_ok else 'FAILED'})")
    print()
    print("targets")
    print(
        f"  speed-up vs do-mpc defaults at N = 48 (median)  {speedup:6.1f}x   target >= {TARGET_SPEEDUP:.0f}x at equal objective: "
        f"{_verdict(speedup >= TARGET_SPEEDUP and abs(relative) <= TARGET_OBJECTIVE_REL and all_ok_n48)}"
    )
    print(
        f"  product mass ours vs do-mpc                     {100 * relative:+6.2f} %  target within ±{100 * TARGET_OBJECTIVE_REL:.1f} %: {_verdict(abs(relative) <= TARGET_OBJECTIVE_REL)}"
    )
    print(f"  every N = 48 solve succeeded                    {'yes' if all_ok_n48 else 'no'}")
    print(f"  p95 solve at N = 48                             {_ms(p95_n48)} ms  target <= {1000 * TARGET_P95_N48_S:.0f} ms: {_verdict(p95_n48 <= TARGET_P95_N48_S)}")
    full_label = "p95 solve, full horizon" + (f" (first {QUICK_FULL_CYCLES} cycles)" if args.quick else "")
    print(f"  {full_label:46s}  {_ms(p95_full)} ms  target <= {1000 * TARGET_P95_FULL_S:.0f} ms: {_verdict(p95_full <= TARGET_P95_FULL_S)}")
    print(f"  first cycle                                     {first_s:8.2f} s   target <= {TARGET_FIRST_CYCLE_S:.0f} s: {_verdict(first_s <= TARGET_FIRST_CYCLE_S and first_ok)}")


if __name__ == "__main__":
    main()
