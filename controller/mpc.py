"""Economic NMPC: feeds and temperature that maximise product per day of occupancy, to harvest.

Formulation (multiple shooting, one CasADi NLP built once):

- The horizon always reaches the planned harvest (a shrinking horizon). It is
  cut into a fixed number of stages whose durations are *parameters*: the
  first ``fine_stages`` last one control interval each, the rest share the
  time left to harvest. A stage of duration 0 is an identity map, so the same
  NLP serves every remaining batch length and every candidate harvest time.
- Dynamics: RK4 with ``substeps`` per stage on the shared culture model.
- Objective: the product mass at harvest (the score's numerator: for a fixed
  harvest time the occupancy is fixed), minus quadratic move penalties and
  L1 + L2 penalties on slacks.
- Constraints: input bounds; temperature setpoint rate limit; glucose window,
  osmolality limit and maximum volume at every stage end (softened by
  slacks); viability and galactosylated fraction at harvest (softened).
  The input bounds, the glucose window and the volume ceiling are per stage and per solve
  (:class:`PlanBounds`, arrays handed to the solver, not built into it): the
  trust region (:mod:`controller.trust`) narrows them without a rebuild.
  The other values a site config sets (input scales, osmolality ceiling,
  harvest minima, rate limit, penalty weights) are one more parameter
  (:meth:`EconomicMpc.settings_vector`): the compiled NLP depends on the model
  and the horizon's layout only, and another site loads the same library.
- Harvest time: candidate harvest times are solved and compared by score
  (:class:`HarvestPlanner`).

The solver's answer is untrusted: status, finiteness and bounds are checked and
reported in :class:`MpcSolution`; callers decide what to do with a failure.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import casadi as ca
import numpy as np
import structlog
from pydantic import Field

from controller.codegen import BackgroundCompile, library_path, nlpsols, solvers_once_compiled
from controller.config import BatchConfig
from controller.kpis import batch_score_g_per_day
from plant_models.cho import INPUT_INDEX, OUTPUT_INDEX, STATE_INDEX, CultureModel
from plant_models.config_loading import FrozenConfig

log = structlog.get_logger(__name__)

STATE_SCALE = np.array([15.0, 5.0, 5.0, 5.0, 3.0, 8.0, 400.0, 5.0, 5.0, 2000.0, 37.0, 50.0])
"""Typical magnitudes of the 12 states, so the NLP sees numbers of order one."""


class MpcConfig(FrozenConfig):
    """Tuning of the economic NMPC."""

    fine_stages: int = Field(default=16, ge=1, le=200, description="stages of one control interval at the start of the horizon")
    coarse_stages: int = Field(default=8, ge=1, le=200, description="stages that share the rest of the time to harvest")
    max_step_h: float = Field(default=3.0, gt=0.0, le=4.0, description="longest RK4 step of a warm-started solve; 4 h made some take 80–140 iterations [h]")
    cold_max_step_h: float = Field(
        default=2.0,
        gt=0.0,
        le=4.0,
        description="longest RK4 step of a solve started without a previous plan, whose iterates cross stiff, depleted-substrate states; 3 h took up to 240 iterations [h]",
    )
    glucose_min_g_per_l: float = Field(default=1.0, ge=0.0, description="lower edge of the glucose window [g/L]")
    glucose_max_g_per_l: float = Field(default=8.0, gt=0.0, description="upper edge of the glucose window [g/L]")
    volume_backoff_l: float = Field(default=10.0, ge=0.0, description="the plan keeps this far below the maximum working volume [L]")
    osmolality_backoff_mosm_per_kg: float = Field(default=10.0, ge=0.0, description="the plan keeps this far below the osmolality limit [mOsm/kg]")
    viability_at_harvest_min_pct: float = Field(default=60.0, ge=0.0, le=100.0, description="viability the harvest must keep [%]")
    galactosylated_fraction_min: float = Field(default=0.5, ge=0.0, le=1.0, description="quality specification at harvest [-]")
    temperature_rate_max_degc_per_h: float = Field(default=0.5, gt=0.0, description="largest setpoint change per hour [°C/h]")
    move_penalty: tuple[float, float, float] = Field(default=(1e-3, 1e-3, 1e-3), description="weights of squared scaled input moves (feed, glucose, temperature)")
    slack_l1: float = Field(default=10.0, ge=0.0, description="linear slack weight (per scaled unit)")
    slack_l2: float = Field(default=100.0, ge=0.0, description="quadratic slack weight (per scaled unit squared)")
    solver: str = Field(default="ipopt", pattern="^(ipopt|fatrop)$")
    tol: float = Field(default=1e-6, gt=0.0, description="IPOPT tolerance on the scaled NLP error; 1e-4 is 10 % faster over a batch but doubles the p95 solve at N = 48")
    max_iter: int = Field(default=300, ge=1)
    warm_max_iter: int = Field(default=40, ge=1, description="iterations a warm-started solve may take before the cold solver is tried instead")
    deadline_s: float = Field(default=20.0, gt=0.0, description="a solve that takes longer counts as failed [s]")
    compile: bool = Field(default=True, description="generate C for the NLP's functions, compile it once and cache it on disk")


@dataclass(frozen=True)
class PlanBounds:
    """Per-stage bounds of one solve: the inputs', the glucose window's and the volume ceiling (the trust region, :mod:`controller.trust`).

    Within the equipment's input range and the configured glucose window; the
    solve intersects them with both.
    """

    inputs_lower: np.ndarray
    """(n_inputs, n_stages): feed rate [L/h], glucose rate [L/h], temperature setpoint [°C]."""
    inputs_upper: np.ndarray
    glucose_lower: np.ndarray
    """(n_stages,) [g/L]; soft, like the configured window."""
    glucose_upper: np.ndarray
    volume_upper: np.ndarray | None = None
    """(n_stages,) [L]; soft, like the maximum working volume it lowers (None: that maximum less the configured back-off)."""


WINDOW_ROWS = 3
"""Rows of the per-stage window the NLP takes as a parameter: glucose low, glucose high [g/L], volume ceiling [L]."""

SETTINGS_ROWS = 12
"""Rows of the NLP's settings parameter (:meth:`EconomicMpc.settings_vector`): the site's equipment, limits and the MPC's tuning, so that none is in the compiled code."""
_SETTING: dict[str, int | slice] = {
    "input_scale": slice(0, 3),
    "osmolality_ceiling": 3,
    "viability_min": 4,
    "galactosylated_min": 5,
    "temperature_rate_max": 6,
    "move_penalty": slice(7, 10),
    "slack_l1": 10,
    "slack_l2": 11,
}
SUBSTEP_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
"""A stage is built with the smallest of these that holds its substeps, so nearby cycle periods and latest harvest times share one compiled NLP."""


def substep_bucket(needed: int) -> int:
    """The number of RK4 substeps a stage that needs ``needed`` is built with: the next :data:`SUBSTEP_BUCKETS` entry (beyond the last, ``needed`` itself).

    Substeps beyond those a stage's duration needs are switched off at run time
    and cost nothing in a solve, so rounding up changes no answer.
    """
    return next((bucket for bucket in SUBSTEP_BUCKETS if bucket >= needed), needed)


@dataclass(frozen=True)
class MpcSolution:
    """One solve: the plan, its prediction and what the solver said about it."""

    success: bool
    status: str
    reason: str
    solve_time_s: float
    iterations: int
    """IPOPT iterations, both attempts' when the warm solve was retried cold."""
    objective: float
    harvest_time_h: float
    stage_times_h: np.ndarray
    inputs: np.ndarray
    states: np.ndarray
    slack_max: float
    predicted_product_mass_g: float
    predicted_titer_g_per_l: float
    predicted_score_g_per_day: float
    warm: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    retried_after: str = ""
    """The warm solve's IPOPT status when it failed and the cold solver was run instead; empty otherwise."""

    @property
    def first_inputs(self) -> np.ndarray:
        return self.inputs[:, 0]


class EconomicMpc:
    """The NLP, built once, solved each cycle for a given state, parameters and harvest time.

    The compiled code depends only on the model and the horizon's layout (stage
    counts, substeps per stage); the site's equipment and limits and the tuning
    are the NLP's settings parameter (:meth:`settings_vector`), so another
    site's config loads the same cached library. With ``background_compile``
    a cache miss does not hold up the first solve: it runs on interpreted
    functions while the library compiles in a child process
    (:class:`~controller.codegen.BackgroundCompile`), and the first solve
    after the compile ends switches to the compiled solvers.
    """

    def __init__(self, model: CultureModel, batch: BatchConfig, config: MpcConfig | None = None, *, background_compile: bool = False) -> None:
        self._model = model
        self._batch = batch
        self.config = config or MpcConfig()
        self.n_stages = self.config.fine_stages + self.config.coarse_stages
        self._u_lower = np.array([0.0, 0.0, batch.equipment.temperature_min_degc])
        self._u_upper = np.array([batch.equipment.feed_rate_max_lph, batch.equipment.glucose_rate_max_lph, batch.equipment.temperature_max_degc])
        self._u_scale = np.maximum(self._u_upper, 1e-3)
        self._settings = self.settings_vector()
        self._background_compile = background_compile
        self.compile_job: BackgroundCompile | None = None
        """The library's compile while it runs in the background (None: the solvers are final)."""
        self._step = self._rk4_step()
        """The one RK4 step every stage function calls: built once, so that the generated C holds it and its derivatives once (one per stage function made 11817 KiB of C, 73 s to compile with -O1; shared, 8063 KiB, 40 s)."""
        self._build()

    # ------------------------------------------------------------------ NLP

    def _rk4_step(self) -> ca.Function:
        """One RK4 step of length ``h`` on unscaled variables (SX: small, fast, its derivatives generated once)."""
        m = self._model
        x, u, p = ca.SX.sym("x", m.n_states), ca.SX.sym("u", m.n_inputs), ca.SX.sym("p", m.n_parameters)
        t, h = ca.SX.sym("t"), ca.SX.sym("h")
        _, x_next = m.rk4(t, x, u, p, h)
        return ca.Function("rk4_step", [x, u, p, t, h], [x_next])

    def _stage_function(self, max_substeps: int, name: str) -> ca.Function:
        """One stage on scaled variables: next state, path-constraint margins and outputs at its end.

        The stage integrates ``dt`` in ``n`` equal RK4 substeps, ``n ≤ max_substeps``
        a parameter (``ceil(dt / max_step_h)``, 0 for a zero-length stage).
        Substeps beyond ``n`` are switched off by a conditional, which skips
        their evaluation and that of their derivatives, so a solve costs what
        the remaining horizon needs, not what the longest possible stage would.
        Built in MX from calls of one RK4 step so that generated code holds the
        step (and its derivatives) once.
        """
        m = self._model
        x, u, p = ca.MX.sym("x", m.n_states), ca.MX.sym("u", m.n_inputs), ca.MX.sym("p", m.n_parameters)
        t0, dt, n, window = ca.MX.sym("t0"), ca.MX.sym("dt"), ca.MX.sym("n"), ca.MX.sym("window", WINDOW_ROWS)
        settings = ca.MX.sym("settings", SETTINGS_ROWS)
        step = self._step
        xi, ui, pi, ti, hi = (ca.MX.sym(name, *v.shape) for name, v in (("x", x), ("u", u), ("p", p), ("t", t0), ("h", dt)))
        skip = ca.Function("skip", [xi, ui, pi, ti, hi], [xi])
        step_or_skip = ca.Function.conditional("step_or_skip", [skip], step)
        xs, us = ca.DM(STATE_SCALE), settings[_SETTING["input_scale"]]
        h = dt / ca.fmax(n, 1)
        xk, uk = x * xs, u * us
        for i in range(max_substeps):
            xk = step_or_skip(n > i, xk, uk, p, t0 + i * h, h)
        y = m.outputs(t0 + dt, xk, uk, p)
        glucose = xk[STATE_INDEX["glucose"]]
        margins = ca.vertcat(
            glucose - window[0],
            window[1] - glucose,
            (settings[_SETTING["osmolality_ceiling"]] - y[OUTPUT_INDEX["osmolality"]]) / 10.0,
            (window[2] - xk[STATE_INDEX["volume"]]) / 10.0,
        )
        terminal = ca.vertcat(
            (y[OUTPUT_INDEX["viability"]] - settings[_SETTING["viability_min"]]) / 10.0,
            (y[OUTPUT_INDEX["galactosylated_fraction"]] - settings[_SETTING["galactosylated_min"]]) * 10.0,
        )
        return ca.Function(
            name,
            [x, u, p, t0, dt, n, window, settings],
            [xk / xs, margins, terminal],
            ["x", "u", "p", "t0", "dt", "n", "window", "settings"],
            ["x_next", "margins", "terminal"],
        )

    def constraints_and_objective(
        self,
        fine_stage: ca.Function,
        coarse_stage: ca.Function,
        X: ca.MX,
        U: ca.MX,
        S: ca.MX,
        T: ca.MX,
        p: ca.MX,
        x0: ca.MX,
        u_prev: ca.MX,
        t_start: ca.MX,
        dt: ca.MX,
        substeps: ca.MX,
        window: ca.MX,
        settings: ca.MX,
    ) -> tuple[ca.MX, ca.MX]:
        """The NLP's constraints ``g`` (equalities first: the initial state and the shooting gaps; then the soft margins, the rate limits
        and the harvest margins, all ≥ 0) and its objective, for scaled states ``X``, inputs ``U`` and slacks ``S``, ``T`` under parameters
        ``p`` and ``settings`` (:meth:`settings_vector`). One place for both this NLP and each scenario of the robust one (:mod:`controller.robust`)."""
        n, nf, nc = self.n_stages, self.config.fine_stages, self.config.coarse_stages
        us = settings[_SETTING["input_scale"]]
        fine_next, fine_margins, _fine_terminal = fine_stage.map(nf, "serial")(
            X[:, :nf], U[:, :nf], ca.repmat(p, 1, nf), t_start[:, :nf], dt[:, :nf], substeps[:, :nf], window[:, :nf], ca.repmat(settings, 1, nf)
        )
        coarse_next, coarse_margins, coarse_terminal = coarse_stage.map(nc, "serial")(
            X[:, nf:n], U[:, nf:], ca.repmat(p, 1, nc), t_start[:, nf:], dt[:, nf:], substeps[:, nf:], window[:, nf:], ca.repmat(settings, 1, nc)
        )
        x_next = ca.horzcat(fine_next, coarse_next)
        margins = ca.horzcat(fine_margins, coarse_margins)
        i_t = INPUT_INDEX["temperature_setpoint"]
        moves = U - ca.horzcat(u_prev / us, U[:, : n - 1])
        rate = settings[_SETTING["temperature_rate_max"]] * dt / us[i_t]
        g = ca.vertcat(
            X[:, 0] - x0 / STATE_SCALE,
            ca.vec(X[:, 1:] - x_next),
            ca.vec(margins + S),
            ca.vec(rate - moves[i_t, :]),
            ca.vec(rate + moves[i_t, :]),
            coarse_terminal[:, -1] + T,
        )
        weights = settings[_SETTING["move_penalty"]]
        slack_l1, slack_l2 = settings[_SETTING["slack_l1"]], settings[_SETTING["slack_l2"]]
        i_p, i_v = STATE_INDEX["titer"], STATE_INDEX["volume"]
        product_kg = X[i_p, n] * STATE_SCALE[i_p] * X[i_v, n] * STATE_SCALE[i_v] / 1000.0
        objective = -product_kg + ca.sum1(ca.sum2(ca.repmat(weights, 1, n) * moves**2)) + slack_l1 * (ca.sum1(ca.vec(S)) + ca.sum1(T)) + slack_l2 * (ca.sumsqr(S) + ca.sumsqr(T))
        return g, objective

    def _build(self) -> None:
        m, cfg = self._model, self.config
        n, nx, nu = self.n_stages, m.n_states, m.n_inputs
        nf, nc = cfg.fine_stages, cfg.coarse_stages
        cycle = self._batch.cycle_period_h
        longest_coarse_h = max(0.0, self._batch.limits.latest_harvest_h - nf * cycle) / nc
        finest_h = min(cfg.max_step_h, cfg.cold_max_step_h)
        self._max_substeps = (substep_bucket(math.ceil(cycle / finest_h - 1e-9)), substep_bucket(math.ceil(longest_coarse_h / finest_h - 1e-9)))
        fine_stage = self._stage_function(self._max_substeps[0], "fine_stage")
        coarse_stage = self._stage_function(self._max_substeps[1], "coarse_stage")
        us = self._u_scale

        X = ca.MX.sym("X", nx, n + 1)  # scaled states
        U = ca.MX.sym("U", nu, n)  # scaled inputs
        S = ca.MX.sym("S", 4, n)  # slacks: glucose low, glucose high, osmolality, volume (scaled)
        T = ca.MX.sym("T", 2)  # terminal slacks: viability, quality
        x0 = ca.MX.sym("x0", nx)
        p = ca.MX.sym("p", m.n_parameters)
        t_start = ca.MX.sym("t_start", 1, n)
        dt = ca.MX.sym("dt", 1, n)
        substeps = ca.MX.sym("substeps", 1, n)
        window = ca.MX.sym("window", WINDOW_ROWS, n)  # per stage: glucose window, volume ceiling
        u_prev = ca.MX.sym("u_prev", nu)
        settings = ca.MX.sym("settings", SETTINGS_ROWS)  # the site's equipment and limits, the tuning: values, not code

        g, objective = self.constraints_and_objective(fine_stage, coarse_stage, X, U, S, T, p, x0, u_prev, t_start, dt, substeps, window, settings)
        n_eq = nx * (n + 1)
        n_ineq = g.shape[0] - n_eq
        w = ca.vertcat(ca.vec(X), ca.vec(U), ca.vec(S), T)
        params = ca.vertcat(x0, p, t_start.T, dt.T, substeps.T, u_prev, ca.vec(window), settings)
        nlp = {"x": w, "p": params, "f": objective, "g": g}
        option_sets = [_solver_options(cfg)] + ([_solver_options(cfg, warm=True)] if cfg.solver == "ipopt" else [])
        self._option_sets = option_sets
        self.library = library_path("economic_mpc", cfg.solver, nlp, option_sets[0])
        """Where the compiled NLP is cached; its name holds the cache key, which depends on the model and the horizon's layout only."""
        solvers, self.compile_job = nlpsols("economic_mpc", cfg.solver, nlp, option_sets, compile_code=cfg.compile, background=self._background_compile)
        self._solver = solvers[0]
        self._warm_solver = solvers[1] if len(solvers) > 1 else None
        self._lbg = np.concatenate([np.zeros(n_eq), np.zeros(n_ineq)])
        self._ubg = np.concatenate([np.zeros(n_eq), np.full(n_ineq, np.inf)])
        nx_total = nx * (n + 1)
        nonnegative = np.array([name != "temperature" for name in STATE_INDEX])
        lbw = np.concatenate([np.where(np.tile(nonnegative, n + 1), 0.0, -np.inf), np.tile(self._u_lower / us, n), np.zeros(4 * n), np.zeros(2)])
        ubw = np.concatenate([np.full(nx_total, np.inf), np.tile(self._u_upper / us, n), np.full(4 * n, np.inf), np.full(2, np.inf)])
        self._lbw, self._ubw = lbw, ubw
        self._n_w = w.shape[0]
        self._rollout_function = self._build_rollout(fine_stage, coarse_stage)

    @property
    def settings(self) -> np.ndarray:
        """The settings vector built once with the NLP (:meth:`settings_vector`), as every solve passes it."""
        return self._settings

    def settings_vector(self) -> np.ndarray:
        """(SETTINGS_ROWS,): the values the NLP takes as its settings parameter, so that a new site's equipment, limits or tuning needs no compile.

        The input scales (the equipment's input ranges), the osmolality ceiling
        (the limit less the back-off), the viability and quality minima at
        harvest, the temperature rate limit, the move penalties and the slack
        weights. (The glucose window and the volume ceiling are per stage:
        :meth:`stage_window`.)
        """
        cfg = self.config
        return np.concatenate(
            [
                self._u_scale,
                [
                    self._batch.limits.osmolality_max_mosm_per_kg - cfg.osmolality_backoff_mosm_per_kg,
                    cfg.viability_at_harvest_min_pct,
                    cfg.galactosylated_fraction_min,
                    cfg.temperature_rate_max_degc_per_h,
                ],
                cfg.move_penalty,
                [cfg.slack_l1, cfg.slack_l2],
            ]
        ).astype(float)

    @property
    def compiled(self) -> bool:
        """The solvers run on the compiled library (False: interpreted, by ``compile: False``, for want of a compiler, or while it compiles)."""
        return self.config.compile and self.compile_job is None and self.library.exists()

    @property
    def compile_jobs(self) -> tuple[BackgroundCompile, ...]:
        """The library compiles still running in the background (one at most here; a robust NLP has two)."""
        return (self.compile_job,) if self.compile_job is not None else ()

    def _switch_when_compiled(self) -> None:
        """Once the background compile has ended, solve on its library from now on (or, if it failed, keep the interpreted solvers)."""
        self.compile_job, solvers = solvers_once_compiled(self.compile_job, "economic_mpc", self.config.solver, self._option_sets)
        if solvers is not None:
            self._solver = solvers[0]
            self._warm_solver = solvers[1] if len(solvers) > 1 else None

    # ----------------------------------------------------------------- grid

    def stage_grid(self, process_time_h: float, harvest_time_h: float) -> tuple[np.ndarray, np.ndarray]:
        """Stage start times and durations from now to harvest (zero-length stages after it)."""
        remaining = max(0.0, harvest_time_h - process_time_h)
        cycle = self._batch.cycle_period_h
        fine = np.minimum(cycle, np.maximum(0.0, remaining - cycle * np.arange(self.config.fine_stages)))
        rest = max(0.0, remaining - float(np.sum(fine)))
        coarse = np.full(self.config.coarse_stages, rest / self.config.coarse_stages)
        durations = np.concatenate([fine, coarse])
        starts = process_time_h + np.concatenate([[0.0], np.cumsum(durations)[:-1]])
        return starts, durations

    def _shift_multipliers(self, lam_g: np.ndarray, lam_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The previous plan's multipliers moved one fine stage earlier, block by block, to match the shifted inputs."""
        nx, nu, n, nf = self._model.n_states, self._model.n_inputs, self.n_stages, self.config.fine_stages

        def shifted(vector: np.ndarray, layout: tuple[tuple[int, int], ...], start: int = 0) -> np.ndarray:
            out = vector.copy()
            for rows, columns in layout:
                block = out[start : start + rows * columns].reshape((rows, columns), order="F")
                block[:, : nf - 1] = block[:, 1:nf].copy()
                start += rows * columns
            return out

        # g: initial state, dynamics per node, margins (4 per stage), rate limits down and up, terminal (2, unshifted).
        lam_g = shifted(lam_g, ((nx, n), (4, n), (1, n), (1, n)), start=nx)
        # w: states per node, inputs per stage, slacks per stage, terminal slacks (unshifted).
        lam_x = shifted(lam_x, ((nx, n + 1), (nu, n), (4, n)))
        return lam_g, lam_x

    def substeps(self, durations: np.ndarray, *, cold: bool = False) -> np.ndarray:
        """RK4 substeps each stage takes: the fewest that keep steps ≤ ``max_step_h`` (``cold_max_step_h`` for a cold solve; 0 for a zero-length stage).

        ``durations`` covers all stages in order; the stage grid never asks a
        stage for more substeps than it was built with.
        """
        durations = np.asarray(durations, dtype=float)
        step_h = self.config.cold_max_step_h if cold else self.config.max_step_h
        needed = np.ceil(durations / step_h - 1e-9).clip(min=0.0)
        built = np.repeat(self._max_substeps, (self.config.fine_stages, self.config.coarse_stages))
        if np.any(needed > built):
            raise ValueError(f"stage durations {durations[needed > built]} h need more RK4 substeps than the NLP was built with")
        return needed

    def rollout(self, x0: np.ndarray, parameters: np.ndarray, starts: np.ndarray, durations: np.ndarray, inputs: np.ndarray, *, cold: bool = False) -> np.ndarray:
        """States at every stage end for a given input plan, integrated with a warm (or ``cold``) solve's RK4 steps."""
        return self._rollout(x0, parameters, starts, durations, self.substeps(durations, cold=cold), inputs, self.stage_window())[0]

    def stage_window(self, bounds: PlanBounds | None = None) -> np.ndarray:
        """(WINDOW_ROWS, n_stages): the configured glucose window and the volume ceiling (maximum working volume less the back-off), narrowed per stage by ``bounds``."""
        cfg = self.config
        ceiling = self._batch.equipment.max_working_volume_l - cfg.volume_backoff_l
        lower = np.full(self.n_stages, cfg.glucose_min_g_per_l)
        upper = np.full(self.n_stages, cfg.glucose_max_g_per_l)
        volume = np.full(self.n_stages, ceiling)
        if bounds is not None:
            lower = np.clip(np.asarray(bounds.glucose_lower, dtype=float), cfg.glucose_min_g_per_l, cfg.glucose_max_g_per_l)
            upper = np.clip(np.asarray(bounds.glucose_upper, dtype=float), lower, cfg.glucose_max_g_per_l)
            if bounds.volume_upper is not None:
                volume = np.clip(np.asarray(bounds.volume_upper, dtype=float), 0.0, ceiling)
        return np.vstack([lower, upper, volume])

    def input_bounds(self, bounds: PlanBounds | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n_inputs, n_stages) lower and upper input bounds: the equipment's range, narrowed per stage by ``bounds``."""
        n = self.n_stages
        lower = np.tile(self._u_lower[:, None], (1, n))
        upper = np.tile(self._u_upper[:, None], (1, n))
        if bounds is not None:
            lower = np.clip(np.asarray(bounds.inputs_lower, dtype=float), lower, upper)
            upper = np.clip(np.asarray(bounds.inputs_upper, dtype=float), lower, upper)
        return lower, upper

    def _rollout(
        self, x0: np.ndarray, parameters: np.ndarray, starts: np.ndarray, durations: np.ndarray, substeps: np.ndarray, inputs: np.ndarray, window: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """States at every stage end, the soft constraints' margins per stage and the harvest margins."""
        x0_scaled = np.asarray(x0, dtype=float) / STATE_SCALE
        states, margins, terminal = self._rollout_function(x0_scaled, inputs / self._u_scale[:, None], parameters, starts, durations, substeps, window, self._settings)
        states = np.hstack([x0_scaled[:, None], np.asarray(states)])
        return states * STATE_SCALE[:, None], np.asarray(margins), np.asarray(terminal)[:, -1]

    def _build_rollout(self, fine_stage: ca.Function, coarse_stage: ca.Function) -> ca.Function:
        """The whole plan integrated in one call (the stages chained by ``mapaccum``): one call per warm start, not one per stage."""
        m, nf, nc = self._model, self.config.fine_stages, self.config.coarse_stages
        n = nf + nc
        x0, u, p = ca.MX.sym("x0", m.n_states), ca.MX.sym("u", m.n_inputs, n), ca.MX.sym("p", m.n_parameters)
        starts, durations, substeps = ca.MX.sym("starts", 1, n), ca.MX.sym("durations", 1, n), ca.MX.sym("substeps", 1, n)
        window, settings = ca.MX.sym("window", WINDOW_ROWS, n), ca.MX.sym("settings", SETTINGS_ROWS)
        fine_x, fine_margins, fine_terminal = fine_stage.mapaccum("fine_rollout", nf)(
            x0, u[:, :nf], ca.repmat(p, 1, nf), starts[:, :nf], durations[:, :nf], substeps[:, :nf], window[:, :nf], ca.repmat(settings, 1, nf)
        )
        coarse_x, coarse_margins, coarse_terminal = coarse_stage.mapaccum("coarse_rollout", nc)(
            fine_x[:, -1], u[:, nf:], ca.repmat(p, 1, nc), starts[:, nf:], durations[:, nf:], substeps[:, nf:], window[:, nf:], ca.repmat(settings, 1, nc)
        )
        return ca.Function(
            "rollout",
            [x0, u, p, starts, durations, substeps, window, settings],
            [ca.horzcat(fine_x, coarse_x), ca.horzcat(fine_margins, coarse_margins), ca.horzcat(fine_terminal, coarse_terminal)],
        )

    # ---------------------------------------------------------------- solve

    def solve(
        self,
        *,
        process_time_h: float,
        state: np.ndarray,
        parameters: np.ndarray,
        previous_inputs: np.ndarray,
        harvest_time_h: float,
        warm: dict[str, np.ndarray] | None = None,
        guess_inputs: np.ndarray | None = None,
        shift_warm: bool = True,
        bounds: PlanBounds | None = None,
    ) -> MpcSolution:
        """Plan from ``state`` at ``process_time_h`` to ``harvest_time_h``, within ``bounds`` per stage (the equipment's range and the configured window without).

        ``warm`` is a previous solution's ``warm`` dict: its inputs (shifted by
        one control interval when ``shift_warm``, as for the previous cycle's
        plan; as they are for a candidate harvest solved at the same time) and
        its multipliers start the solver. ``guess_inputs`` alone starts it cold.
        """
        self._switch_when_compiled()
        n, nx, nu = self.n_stages, self._model.n_states, self._model.n_inputs
        starts, durations = self.stage_grid(process_time_h, harvest_time_h)
        previous_inputs = np.clip(np.asarray(previous_inputs, dtype=float), self._u_lower, self._u_upper)
        lam_g0 = lam_x0 = None
        if guess_inputs is None and warm is not None and warm.get("inputs") is not None:
            guess_inputs = warm["inputs"].copy()
            if shift_warm:
                # The previous cycle's plan: shift it by one control interval.
                fine = self.config.fine_stages
                guess_inputs[:, : fine - 1] = warm["inputs"][:, 1:fine]
            lam_g0, lam_x0 = warm.get("lam_g"), warm.get("lam_x")
            if shift_warm and lam_g0 is not None and lam_x0 is not None:
                lam_g0, lam_x0 = self._shift_multipliers(lam_g0, lam_x0)
        u_lower, u_upper = self.input_bounds(bounds)
        window = self.stage_window(bounds)
        inputs = guess_inputs if guess_inputs is not None else np.tile(previous_inputs[:, None], (1, n))
        inputs = np.clip(inputs, u_lower, u_upper)
        warm_start = lam_g0 is not None and lam_x0 is not None and self._warm_solver is not None
        substeps = self.substeps(durations, cold=not warm_start)
        states, margins, terminal = self._rollout(state, parameters, starts, durations, substeps, inputs, window)
        # Slacks that make the soft constraints hold on the rolled-out guess: a guess that starts
        # feasible (a plant already past a back-off, say) saves the solver several iterations.
        slacks = np.concatenate([np.maximum(0.0, -margins).ravel(order="F"), np.maximum(0.0, -terminal)])
        w0 = np.concatenate([(states / STATE_SCALE[:, None]).ravel(order="F"), (inputs / self._u_scale[:, None]).ravel(order="F"), slacks])
        params = np.concatenate([state, parameters, starts, durations, substeps, previous_inputs, window.ravel(order="F"), self._settings])
        lbw, ubw = self._lbw.copy(), self._ubw.copy()
        n_x = nx * (n + 1)
        lbw[n_x : n_x + nu * n] = (u_lower / self._u_scale[:, None]).ravel(order="F")
        ubw[n_x : n_x + nu * n] = (u_upper / self._u_scale[:, None]).ravel(order="F")
        args: dict = {"x0": w0, "p": params, "lbx": lbw, "ubx": ubw, "lbg": self._lbg, "ubg": self._ubg}
        multipliers = (lam_g0, lam_x0) if warm_start and lam_g0 is not None and lam_x0 is not None else None
        run = solve_with_cold_retry(self._solver, self._warm_solver, args, multipliers, deadline_s=self.config.deadline_s)
        result, stats, iterations, retried_after, elapsed = run.result, run.stats, run.iterations, run.retried_after, run.elapsed_s
        w = np.asarray(result["x"]).ravel()
        states = w[:n_x].reshape((nx, n + 1), order="F") * STATE_SCALE[:, None]
        inputs = w[n_x : n_x + nu * n].reshape((nu, n), order="F") * self._u_scale[:, None]
        slacks = w[n_x + nu * n :]
        status = str(stats.get("return_status", "unknown"))
        success = bool(stats.get("success", False))
        reason = "" if success else f"solver status {status}"
        if success and not (np.all(np.isfinite(w)) and math.isfinite(float(result["f"]))):
            success, reason = False, "non-finite solution"
        tolerance = 1e-6 * self._u_scale[:, None]
        if success and (np.any(inputs < u_lower - tolerance) or np.any(inputs > u_upper + tolerance)):
            success, reason = False, "inputs outside their bounds"
        if success and elapsed > self.config.deadline_s:
            success, reason = False, f"deadline exceeded ({elapsed:.2f} s)"
        titer = float(states[STATE_INDEX["titer"], -1])
        volume = float(states[STATE_INDEX["volume"], -1])
        mass = titer * volume
        return MpcSolution(
            success=success,
            status=status,
            reason=reason,
            solve_time_s=elapsed,
            iterations=iterations,
            retried_after=retried_after,
            objective=float(result["f"]),
            harvest_time_h=harvest_time_h,
            stage_times_h=starts,
            inputs=np.clip(inputs, u_lower, u_upper),
            states=states,
            slack_max=float(np.max(slacks)) if slacks.size else 0.0,
            predicted_product_mass_g=mass,
            predicted_titer_g_per_l=titer,
            predicted_score_g_per_day=batch_score_g_per_day(mass, harvest_time_h, self._batch.economics.turnaround_days),
            warm={
                "inputs": np.clip(inputs, u_lower, u_upper),
                "lam_g": np.asarray(result["lam_g"]).ravel(),
                "lam_x": np.asarray(result["lam_x"]).ravel(),
            },
        )


@dataclass(frozen=True)
class SolverRun:
    """One NLP solve as the solver answered it, with the cold retry of a failed warm start (:func:`solve_with_cold_retry`)."""

    result: dict[str, Any]
    stats: dict[str, Any]
    iterations: int
    """Both attempts' iterations when the warm solve was retried."""
    retried_after: str
    """The warm solve's status when it failed and the cold solver was run instead; empty otherwise."""
    elapsed_s: float


def solve_with_cold_retry(cold: ca.Function, warm: ca.Function | None, args: dict[str, Any], multipliers: tuple[np.ndarray, np.ndarray] | None, *, deadline_s: float) -> SolverRun:
    """Solve with ``warm`` from ``multipliers`` (``(lam_g0, lam_x0)``) when both are given, else with ``cold``; a failed warm solve is retried cold.

    The warm start's small barrier parameter can jam against the bounds when the
    optimum has moved far; the cold solver's adaptive barrier, from the same
    guess (and on the same grid), gets there (see docs/solver.md). No retry once
    ``deadline_s`` has passed: the deadline covers both attempts.
    """
    solver = cold
    if warm is not None and multipliers is not None:
        args = {**args, "lam_g0": multipliers[0], "lam_x0": multipliers[1]}
        solver = warm
    started = time.perf_counter()
    result = solver(**args)
    stats = solver.stats()
    iterations = int(stats.get("iter_count", -1))
    retried_after = ""
    if solver is warm and not stats.get("success", False) and time.perf_counter() - started < deadline_s:
        retried_after = str(stats.get("return_status", "unknown"))
        cold_args = {key: value for key, value in args.items() if key not in ("lam_g0", "lam_x0")}
        result = cold(**cold_args)
        stats = cold.stats()
        iterations += int(stats.get("iter_count", -1))
    return SolverRun(result, stats, iterations, retried_after, time.perf_counter() - started)


def _solver_options(cfg: MpcConfig, *, warm: bool = False) -> dict:
    if cfg.solver == "ipopt":
        ipopt: dict = {
            "print_level": 0,
            "tol": cfg.tol,
            "max_iter": cfg.max_iter,
            "max_cpu_time": cfg.deadline_s,
            "sb": "yes",
            "mu_strategy": "adaptive",
        }
        if warm:
            ipopt |= {
                "max_iter": cfg.warm_max_iter,
                "warm_start_init_point": "yes",
                "warm_start_bound_push": 1e-9,
                "warm_start_mult_bound_push": 1e-9,
                "mu_strategy": "monotone",
                "mu_init": 1e-7,
            }
        return {"print_time": False, "ipopt": ipopt}
    return {"print_time": False, "fatrop": {"print_level": 0, "tol": cfg.tol, "max_iter": cfg.max_iter}}
