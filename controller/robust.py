"""Robust multi-stage (scenario-tree) economic NMPC over the parameters the estimator or the calibration is unsure of.

:class:`RobustMpc` is :class:`~controller.mpc.EconomicMpc` solved for S
parameter vectors at once (design, measured speed and the do-mpc comparison:
``docs/robust-mpc.md``):

- Every scenario has its own states, inputs and slacks, on EconomicMpc's stage
  grid, with EconomicMpc's stage functions (RK4 substeps, scaled states and
  inputs, the per-stage glucose window) and its soft constraints and slack
  penalties. The constraints hold in every scenario.
- Robust horizon 1: the first stage's inputs are the same in all scenarios
  (non-anticipativity: they are applied before the plant reveals which
  scenario it is); later inputs are free per scenario (the controller will
  react to what it learns).
- The objective is the weighted mean of the scenarios' objectives (product at
  harvest, move penalties, slacks), with weights that are NLP parameters.
- The scenarios' parameter vectors are NLP parameters too, so new uncertainty
  needs no rebuild, and one scenario's NLP is ``map``-ped over them, so the
  generated C holds one scenario, not S. Only the number S is built in.

The scenarios come from :func:`parameter_scenarios` and its two front ends,
:func:`scenarios_from_estimate` (the estimator's parameter uncertainty) and
:func:`scenarios_from_calibration` (a calibration's 95 % intervals): the 3 × 3
combinations of the two most uncertain kinetic multipliers at
{0, −kσ, +kσ}, the centre first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from statistics import NormalDist

import casadi as ca
import numpy as np

from controller.codegen import BackgroundCompile, library_path, nlpsols, solvers_once_compiled
from controller.config import BatchConfig
from controller.estimator import StateEstimate
from controller.kpis import batch_score_g_per_day
from controller.mpc import SETTINGS_ROWS, STATE_SCALE, WINDOW_ROWS, EconomicMpc, MpcConfig, MpcSolution, PlanBounds, _solver_options, solve_with_cold_retry
from plant_models.cho import INPUT_INDEX, STATE_INDEX, CultureModel
from plant_models.errors import BioreactorMPCError
from plant_models.parameters import PARAMETER_NAMES, ModelProvenance, is_additive

DEFAULT_K_SIGMA = 1.645
"""Scenarios at ±1.645 σ of ln(multiplier): each parameter's one-sided 95 % quantile (a constraint is usually threatened from one side: faster uptake, faster death)."""
KINETIC_PREFIXES: tuple[str, ...] = ("culture.growth.", "culture.death.", "culture.metabolism.", "culture.product.", "culture.temperature.")
"""Parameters of the cells' kinetics; measurement relations and media are not (a capacitance factor moves no state)."""
Z95 = NormalDist().inv_cdf(0.975)


class ScenarioError(ValueError, BioreactorMPCError):
    """Scenarios or weights that do not fit the robust NLP."""


# --------------------------------------------------------------------------- scenarios


class ScenarioSource(str, Enum):
    """Where a scenario set's spread came from."""

    ESTIMATOR = "estimator"
    CALIBRATION = "calibration"
    GIVEN = "given"


@dataclass(frozen=True)
class ParameterScenarios:
    """The parameter vectors a robust solve plans for, and their weights."""

    parameters: np.ndarray
    """(n_parameters, S): column 0 the centre, the others the centre with two entries multiplied."""
    weights: np.ndarray
    """(S,), summing to 1."""
    names: tuple[str, ...]
    """The parameters varied (PARAMETER_NAMES entries)."""
    log_sd: tuple[float, ...]
    """Standard deviation of each one's ln(multiplier)."""
    log_offsets: np.ndarray
    """(len(names), S): each scenario's ln(multiplier) relative to the centre."""
    k_sigma: float
    source: ScenarioSource

    @property
    def multipliers(self) -> np.ndarray:
        """(len(names), S): each scenario's multiplier of the centre's value."""
        return np.exp(self.log_offsets)


def three_point_weights(k_sigma: float) -> np.ndarray:
    """Weights of {0, −kσ, +kσ} that reproduce a normal variable's mean and variance: 1 − 1/k², 1/(2k²), 1/(2k²)."""
    if k_sigma < 1.0:
        raise ScenarioError(f"k_sigma {k_sigma} < 1 gives the centre a negative weight")
    side = 1.0 / (2.0 * k_sigma**2)
    return np.array([1.0 - 2.0 * side, side, side])


def parameter_scenarios(
    centre: np.ndarray,
    log_sd: Mapping[str, float],
    *,
    k_sigma: float = DEFAULT_K_SIGMA,
    names: Sequence[str] | None = None,
    source: ScenarioSource = ScenarioSource.GIVEN,
) -> ParameterScenarios:
    """The 3 × 3 grid of two parameters' multipliers at {0, −kσ, +kσ} of their ln, around ``centre``.

    ``names`` picks the two parameters; by default the two kinetic ones
    (:data:`KINETIC_PREFIXES`) of largest ``log_sd`` (ties in ``log_sd``'s
    order). Each parameter is varied by its marginal σ: the grid is a box whose
    corners lie outside the joint kσ ellipse (conservative where the two are
    correlated). Order: the first parameter varies slowest, the centre first
    (do-mpc's ``set_uncertainty_values`` order). Weights: the product of
    :func:`three_point_weights`, which make the weighted mean objective the
    expected one to second order.
    """
    centre = np.asarray(centre, dtype=float)
    if centre.shape != (len(PARAMETER_NAMES),) or not np.all(np.isfinite(centre)):
        raise ScenarioError(f"the centre must be {len(PARAMETER_NAMES)} finite numbers")
    unknown = [name for name in log_sd if name not in PARAMETER_NAMES]
    if unknown:
        raise ScenarioError(f"unknown parameters {unknown}; names look like 'culture.growth.mu_max_per_h'")
    if names is None:
        kinetic = [name for name in log_sd if name.startswith(KINETIC_PREFIXES) and log_sd[name] > 0.0]
        names = sorted(kinetic, key=lambda name: -log_sd[name])[:2]  # sorted() is stable: ties keep their order
    names = tuple(names)
    if len(names) != 2 or len(set(names)) != 2:
        raise ScenarioError(f"two distinct uncertain parameters are needed, got {list(names)}")
    missing = [name for name in names if name not in log_sd]
    if missing:
        raise ScenarioError(
            f"no spread is known for {missing}: not fitted, not identifiable, or fitted additively (a correction or a temperature sensitivity, which the scenarios do not vary)"
        )
    sd = tuple(float(log_sd[name]) for name in names)
    if not all(math.isfinite(s) and s > 0.0 for s in sd):
        raise ScenarioError(f"the ln-multiplier sd of {list(names)} must be positive and finite, got {list(sd)}")
    steps = np.array([0.0, -k_sigma, k_sigma])
    one = three_point_weights(k_sigma)
    offsets = np.array([[a * sd[0], b * sd[1]] for a in steps for b in steps]).T
    weights = np.array([wa * wb for wa in one for wb in one])
    indices = [PARAMETER_NAMES.index(name) for name in names]
    parameters = np.tile(centre[:, None], (1, offsets.shape[1]))
    parameters[indices, :] *= np.exp(offsets)
    return ParameterScenarios(parameters, weights, names, sd, offsets, float(k_sigma), source)


def scenarios_from_estimate(estimate: StateEstimate, *, k_sigma: float = DEFAULT_K_SIGMA, names: Sequence[str] | None = None) -> ParameterScenarios:
    """Scenarios around the estimator's parameter vector, spread by the marginal sd of its ln multipliers."""
    return parameter_scenarios(estimate.parameters, estimate.multiplier_log_sd, k_sigma=k_sigma, names=names, source=ScenarioSource.ESTIMATOR)


def scenarios_from_calibration(provenance: ModelProvenance, centre: np.ndarray, *, k_sigma: float = DEFAULT_K_SIGMA, names: Sequence[str] | None = None) -> ParameterScenarios:
    """Scenarios around ``centre`` (the calibrated vector, or the estimator's current one), spread by the calibration's 95 % intervals.

    A fitted interval is lognormal: σ of ln = ln(high / low) / (2 · 1.96).
    Parameters the data could not identify carry no interval and are skipped, and so are the parameters fitted additively
    (the corrections, the temperature sensitivities): their interval is of an amount added (it may span zero), not of a
    multiplier, and the grid varies multipliers.
    """
    log_sd = {
        name: math.log(e.ci95_high / e.ci95_low) / (2.0 * Z95)
        for name, e in provenance.parameters.items()
        if e.identifiable and e.ci95_low is not None and e.ci95_high is not None and e.ci95_low > 0.0 and not is_additive(name)
    }
    return parameter_scenarios(centre, log_sd, k_sigma=k_sigma, names=names, source=ScenarioSource.CALIBRATION)


# --------------------------------------------------------------------------- solution


@dataclass(frozen=True)
class RobustMpcSolution(MpcSolution):
    """An :class:`MpcSolution` whose plan holds in every scenario.

    The inherited fields keep their meaning for the nominal scenario (column 0
    of ``scenarios``): ``states`` and ``inputs`` are its plan (``first_inputs``
    are shared by all), ``slack_max`` is the largest slack of any scenario. The
    predicted product mass, titer and score are the *weighted mean* over the
    scenarios, the objective's own figure, so comparing two plans' predictions
    (the harvest planner) compares what each optimised; the worst scenario's
    are here too.
    """

    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scenario_states: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0, 0)))
    """(S, n_states, n_stages + 1)."""
    scenario_inputs: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0, 0)))
    """(S, n_inputs, n_stages); column 0 the same in all."""
    scenario_titers_g_per_l: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Predicted titer at harvest per scenario."""
    scenario_product_mass_g: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scenario_slack_max: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Largest slack per scenario (0: that scenario meets every soft constraint)."""
    nominal_presolve_status: str = ""
    """IPOPT's status of the nominal solve that planned this cold start (EconomicMpc's); empty when a warm start needed none."""

    @property
    def worst_scenario(self) -> int:
        """The scenario predicting the least product."""
        return int(np.argmin(self.scenario_product_mass_g))

    @property
    def worst_product_mass_g(self) -> float:
        return float(np.min(self.scenario_product_mass_g))


# --------------------------------------------------------------------------- the NLP


@dataclass(frozen=True)
class _Layout:
    """One scenario's slice of the NLP's variables and constraints: EconomicMpc's own NLP layout.

    Variables: states per node, inputs per stage, four slacks per stage, two
    terminal slacks. Constraints: initial state, dynamics per stage, margins
    per stage, temperature rate down and up per stage, terminal margins.
    """

    nx: int
    nu: int
    n: int

    @property
    def n_w(self) -> int:
        return self.nx * (self.n + 1) + self.nu * self.n + 4 * self.n + 2

    @property
    def n_g(self) -> int:
        return self.nx + self.nx * self.n + 4 * self.n + 2 * self.n + 2

    @property
    def n_eq(self) -> int:
        return self.nx * (self.n + 1)

    @property
    def first_inputs(self) -> np.ndarray:
        """Indices of stage 0's inputs in a scenario's variables."""
        return self.nx * (self.n + 1) + np.arange(self.nu)

    @property
    def first_rate(self) -> tuple[int, int]:
        """Indices of stage 0's rate-limit rows (down, up) in a scenario's constraints."""
        down = self.nx + self.nx * self.n + 4 * self.n
        return down, down + self.n

    @property
    def w_blocks(self) -> tuple[tuple[int, int], ...]:
        """(rows, columns) of the blocks of a scenario's variables that move with the plan (from its start)."""
        return ((self.nx, self.n + 1), (self.nu, self.n), (4, self.n))

    @property
    def g_blocks(self) -> tuple[tuple[int, int], ...]:
        """(rows, columns) of the blocks of a scenario's constraints that move with the plan (after its initial-state rows)."""
        return ((self.nx, self.n), (4, self.n), (1, self.n), (1, self.n))


def _shift_blocks(matrix: np.ndarray, blocks: tuple[tuple[int, int], ...], start: int, fine_stages: int) -> None:
    """Move each block's first ``fine_stages`` columns one earlier, in every column of ``matrix`` (one per scenario), as EconomicMpc shifts its plan."""
    for rows, columns in blocks:
        for s in range(matrix.shape[1]):
            block = matrix[start : start + rows * columns, s].reshape((rows, columns), order="F")
            block[:, : fine_stages - 1] = block[:, 1:fine_stages].copy()
            matrix[start : start + rows * columns, s] = block.ravel(order="F")
        start += rows * columns


class RobustMpc:
    """The scenario-tree NLP, built once for S scenarios, solved each cycle for a state, S parameter vectors and a harvest time.

    A drop-in for :class:`EconomicMpc` in what :class:`~controller.nmpc.NmpcController`
    calls (``solve`` with one more argument, ``stage_grid``, ``n_stages``,
    ``config``, ``rollout``). IPOPT only: a scenario tree is no single chain of
    stages, which fatrop needs.

    Each scenario is EconomicMpc's NLP (its variables, constraints and
    objective, from the same stage functions), the S of them ``map``-ped;
    non-anticipativity is S − 1 linear equalities between the scenarios' first
    inputs. (One shared set of first inputs instead couples every scenario's
    first stage in the Hessian, whose colouring then needs a third more
    directions: each scenario's own copy keeps the Hessian block diagonal.)
    Only scenario 0's copy carries the input bounds and the first stage's rate
    limit, so that no constraint is stated twice.

    With ``background_compile``, as :class:`EconomicMpc`'s: a cache miss of
    either library (the nominal NLP's, the robust one's) starts on interpreted
    functions while it compiles in a child process, and each NLP switches to
    its library at the first robust solve after that compile ends.
    """

    def __init__(self, model: CultureModel, batch: BatchConfig, config: MpcConfig | None = None, *, n_scenarios: int = 9, background_compile: bool = False) -> None:
        self.config = config or MpcConfig()
        if self.config.solver != "ipopt":
            raise ScenarioError(f"the robust NLP is solved with IPOPT; solver {self.config.solver!r} needs a single chain of stages")
        if n_scenarios < 1:
            raise ScenarioError("at least one scenario is needed")
        self._model = model
        self._batch = batch
        self.n_scenarios = n_scenarios
        # The nominal NLP lends its stage functions, grid and bounds, and solves the nominal problem that starts a cold robust solve.
        self.nominal = EconomicMpc(model, batch, self.config, background_compile=background_compile)
        self.n_stages = self.nominal.n_stages
        self._u_scale = self.nominal._u_scale
        self._layout = _Layout(model.n_states, model.n_inputs, self.n_stages)
        self._background_compile = background_compile
        self.compile_job: BackgroundCompile | None = None
        """The robust library's compile while it runs in the background (the nominal NLP's is ``nominal.compile_job``)."""
        self._build()

    # ------------------------------------------------------------ delegated

    def stage_grid(self, process_time_h: float, harvest_time_h: float) -> tuple[np.ndarray, np.ndarray]:
        """Stage start times and durations from now to harvest (:meth:`EconomicMpc.stage_grid`)."""
        return self.nominal.stage_grid(process_time_h, harvest_time_h)

    def substeps(self, durations: np.ndarray, *, cold: bool = False) -> np.ndarray:
        return self.nominal.substeps(durations, cold=cold)

    def rollout(self, x0: np.ndarray, parameters: np.ndarray, starts: np.ndarray, durations: np.ndarray, inputs: np.ndarray, *, cold: bool = False) -> np.ndarray:
        """One scenario's states at every stage end for an input plan (:meth:`EconomicMpc.rollout`)."""
        return self.nominal.rollout(x0, parameters, starts, durations, inputs, cold=cold)

    # ----------------------------------------------------------------- build

    def _scenario_function(self, fine_stage: ca.Function, coarse_stage: ca.Function) -> ca.Function:
        """One scenario's constraints and objective: EconomicMpc's NLP for one parameter vector."""
        m, lay = self._model, self._layout
        nx, nu, n = lay.nx, lay.nu, lay.n
        ws, p = ca.MX.sym("w", lay.n_w), ca.MX.sym("p", m.n_parameters)
        x0, u_prev = ca.MX.sym("x0", nx), ca.MX.sym("u_prev", nu)
        t_start, dt, substeps, window = ca.MX.sym("t_start", 1, n), ca.MX.sym("dt", 1, n), ca.MX.sym("substeps", 1, n), ca.MX.sym("window", WINDOW_ROWS, n)
        settings = ca.MX.sym("settings", SETTINGS_ROWS)
        offset = 0

        def take(rows: int, columns: int) -> ca.MX:
            nonlocal offset
            block = ca.reshape(ws[offset : offset + rows * columns], rows, columns)
            offset += rows * columns
            return block

        X, U, S, T = take(nx, n + 1), take(nu, n), take(4, n), take(2, 1)
        g, f = self.nominal.constraints_and_objective(fine_stage, coarse_stage, X, U, S, T, p, x0, u_prev, t_start, dt, substeps, window, settings)
        return ca.Function("robust_scenario", [ws, p, x0, t_start, dt, substeps, u_prev, window, settings], [g, f])

    def _build(self) -> None:
        m, lay = self._model, self._layout
        nx, nu, n, n_s = lay.nx, lay.nu, lay.n, self.n_scenarios
        nominal = self.nominal
        # EconomicMpc's own stage functions (private for now; see docs/robust-mpc.md).
        fine_stage = nominal._stage_function(nominal._max_substeps[0], "fine_stage")
        coarse_stage = nominal._stage_function(nominal._max_substeps[1], "coarse_stage")
        scenario = self._scenario_function(fine_stage, coarse_stage)

        W = ca.MX.sym("W", lay.n_w, n_s)  # one column per scenario
        x0, P, weights = ca.MX.sym("x0", nx), ca.MX.sym("P", m.n_parameters, n_s), ca.MX.sym("weights", n_s)
        t_start, dt, substeps = ca.MX.sym("t_start", 1, n), ca.MX.sym("dt", 1, n), ca.MX.sym("substeps", 1, n)
        u_prev, window, settings = ca.MX.sym("u_prev", nu), ca.MX.sym("window", WINDOW_ROWS, n), ca.MX.sym("settings", SETTINGS_ROWS)
        G, F = scenario.map(n_s, "serial")(W, P, x0, t_start, dt, substeps, u_prev, window, settings)
        first = W[lay.first_inputs.tolist(), :]
        non_anticipative = first[:, 1:] - ca.repmat(first[:, 0], 1, n_s - 1)  # robust horizon 1: every scenario's first inputs are scenario 0's
        g = ca.vertcat(ca.vec(G), ca.vec(non_anticipative))
        params = ca.vertcat(x0, ca.vec(P), weights, t_start.T, dt.T, substeps.T, u_prev, ca.vec(window), settings)
        nlp = {"x": ca.vec(W), "p": params, "f": ca.dot(weights, F.T), "g": g}
        self._option_sets = [_solver_options(self.config), _solver_options(self.config, warm=True)]
        self.library = library_path("robust_mpc", "ipopt", nlp, self._option_sets[0])
        """Where the compiled robust NLP is cached (the nominal NLP's: ``nominal.library``)."""
        (self._solver, self._warm_solver), self.compile_job = nlpsols(
            "robust_mpc", "ipopt", nlp, self._option_sets, compile_code=self.config.compile, background=self._background_compile
        )
        lbg = np.zeros((lay.n_g, n_s))
        ubg = np.zeros((lay.n_g, n_s))
        ubg[lay.n_eq :, :] = np.inf
        lbg[list(lay.first_rate), 1:] = -np.inf  # scenario 0 states the first stage's rate limit for all
        self._lbg = np.concatenate([lbg.ravel(order="F"), np.zeros(nu * (n_s - 1))])
        self._ubg = np.concatenate([ubg.ravel(order="F"), np.zeros(nu * (n_s - 1))])
        nonnegative = np.array([name != "temperature" for name in STATE_INDEX])
        self._state_lower = np.where(np.tile(nonnegative, n + 1), 0.0, -np.inf)
        self._rollout_all = self._build_rollout(fine_stage, coarse_stage).map(n_s, "serial")

    def _build_rollout(self, fine_stage: ca.Function, coarse_stage: ca.Function) -> ca.Function:
        """One scenario's plan integrated in one call (states, margins and harvest margins at every stage end), to start the solver."""
        m, nf, nc = self._model, self.config.fine_stages, self.config.coarse_stages
        n = nf + nc
        x0, u, p = ca.MX.sym("x0", m.n_states), ca.MX.sym("u", m.n_inputs, n), ca.MX.sym("p", m.n_parameters)
        starts, durations, substeps, window = ca.MX.sym("starts", 1, n), ca.MX.sym("durations", 1, n), ca.MX.sym("substeps", 1, n), ca.MX.sym("window", WINDOW_ROWS, n)
        settings = ca.MX.sym("settings", SETTINGS_ROWS)
        fine_x, fine_margins, _ = fine_stage.mapaccum("fine_rollout", nf)(
            x0, u[:, :nf], ca.repmat(p, 1, nf), starts[:, :nf], durations[:, :nf], substeps[:, :nf], window[:, :nf], ca.repmat(settings, 1, nf)
        )
        coarse_x, coarse_margins, coarse_terminal = coarse_stage.mapaccum("coarse_rollout", nc)(
            fine_x[:, -1], u[:, nf:], ca.repmat(p, 1, nc), starts[:, nf:], durations[:, nf:], substeps[:, nf:], window[:, nf:], ca.repmat(settings, 1, nc)
        )
        return ca.Function(
            "scenario_rollout",
            [x0, u, p, starts, durations, substeps, window, settings],
            [ca.horzcat(x0, fine_x, coarse_x), ca.horzcat(fine_margins, coarse_margins), coarse_terminal[:, -1]],
        )

    @property
    def compiled(self) -> bool:
        """Both NLPs, the robust and the nominal one, run on their compiled libraries (False: interpreted, or while either compiles)."""
        return self.config.compile and self.compile_job is None and self.library.exists() and self.nominal.compiled

    @property
    def compile_jobs(self) -> tuple[BackgroundCompile, ...]:
        """The library compiles still running in the background: the nominal NLP's and the robust one's."""
        return self.nominal.compile_jobs + ((self.compile_job,) if self.compile_job is not None else ())

    def _switch_when_compiled(self) -> None:
        """Once a background compile has ended, solve on its library from now on: the robust one's here, the nominal one's in the nominal NLP."""
        self.nominal._switch_when_compiled()
        self.compile_job, solvers = solvers_once_compiled(self.compile_job, "robust_mpc", "ipopt", self._option_sets)
        if solvers is not None:
            self._solver, self._warm_solver = solvers

    # ------------------------------------------------------------ warm start

    def _shift(self, inputs: np.ndarray, lam_g: np.ndarray | None, lam_x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Every scenario's plan and multipliers (n_inputs × n_stages × S; n_g × S, n_w × S) moved one control interval earlier, as EconomicMpc moves its own."""
        nf, lay = self.config.fine_stages, self._layout
        inputs = inputs.copy()
        inputs[:, : nf - 1, :] = inputs[:, 1:nf, :].copy()
        if lam_g is None or lam_x is None:
            return inputs, None, None
        lam_g, lam_x = lam_g.copy(), lam_x.copy()
        _shift_blocks(lam_g, lay.g_blocks, lay.nx, nf)
        _shift_blocks(lam_x, lay.w_blocks, 0, nf)
        return inputs, lam_g, lam_x

    def _consolidate(self, inputs: np.ndarray, lam_g: np.ndarray | None, lam_x: np.ndarray | None, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Scenario plans and multipliers, each stated as if it had its own first stage, made non-anticipative.

        The first inputs become the scenarios' weighted mean. Each scenario's
        first-input bound and rate multipliers move to scenario 0, which alone
        states those constraints, and the same amounts become the multipliers
        of its non-anticipativity rows: the KKT conditions of every scenario's
        first inputs keep the balance they had. Returns the NLP's ``lam_g`` and
        ``lam_x`` vectors.
        """
        lay = self._layout
        inputs = inputs.copy()
        inputs[:, 0, :] = (inputs[:, 0, :] @ weights)[:, None]
        if lam_g is None or lam_x is None:
            return inputs, None, None
        lam_g, lam_x = lam_g.copy(), lam_x.copy()
        first, (down, up) = lay.first_inputs, lay.first_rate
        i_t = INPUT_INDEX["temperature_setpoint"]
        moved = lam_x[first, :].copy()
        moved[i_t, :] += lam_g[up, :] - lam_g[down, :]
        lam_x[first, 0] = lam_x[first, :].sum(axis=1)
        lam_g[down, 0], lam_g[up, 0] = lam_g[down, :].sum(), lam_g[up, :].sum()
        lam_x[first, 1:] = 0.0
        lam_g[[down, up], 1:] = 0.0
        return inputs, np.concatenate([lam_g.ravel(order="F"), moved[:, 1:].ravel(order="F")]), lam_x.ravel(order="F")

    def _start(self, warm: Mapping[str, np.ndarray] | None, shift_warm: bool) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Scenario plans (n_inputs × n_stages × S) and per-scenario multipliers (n_g × S, n_w × S) from a warm dict.

        A RobustMpc's gives both; an EconomicMpc's (the same grid) its plan for
        every scenario, without multipliers: the nominal optimum's multipliers
        are no start for scenarios that break constraints under its plan (with
        them, the warm solver's small barrier parameter settles in a point
        with large slacks).
        """
        if warm is None or warm.get("inputs") is None:
            return None, None, None
        lay, n_s = self._layout, self.n_scenarios
        lam_g, lam_x = warm.get("lam_g"), warm.get("lam_x")
        scenario_inputs = warm.get("scenario_inputs")
        if scenario_inputs is not None and np.shape(scenario_inputs) == (lay.nu, lay.n, n_s):
            inputs = np.array(scenario_inputs, dtype=float)
            if lam_g is not None and lam_x is not None and np.size(lam_g) == self._lbg.size and np.size(lam_x) == lay.n_w * n_s:
                lam_g = np.asarray(lam_g, dtype=float)[: lay.n_g * n_s].reshape((lay.n_g, n_s), order="F")
                lam_x = np.asarray(lam_x, dtype=float).reshape((lay.n_w, n_s), order="F")
            else:
                lam_g = lam_x = None
        else:
            inputs = np.repeat(np.asarray(warm["inputs"], dtype=float)[:, :, None], n_s, axis=2)
            lam_g = lam_x = None
        if shift_warm:
            return self._shift(inputs, lam_g, lam_x)
        return inputs, lam_g, lam_x

    # ---------------------------------------------------------------- solve

    def _checked_scenarios(self, parameters: np.ndarray, scenarios: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        scenarios = np.asarray(scenarios, dtype=float)
        expected = (self._model.n_parameters, self.n_scenarios)
        if scenarios.shape != expected or not np.all(np.isfinite(scenarios)):
            raise ScenarioError(f"scenarios must be {expected[0]} × {expected[1]} finite numbers (parameters × scenarios), got shape {scenarios.shape}")
        if not np.allclose(scenarios[:, 0], np.asarray(parameters, dtype=float), rtol=1e-9, atol=0.0):
            raise ScenarioError("the first scenario must be the nominal parameter vector passed as `parameters` (the builders put the centre first)")
        weights = np.full(self.n_scenarios, 1.0 / self.n_scenarios) if weights is None else np.asarray(weights, dtype=float)
        if weights.shape != (self.n_scenarios,) or not np.all(np.isfinite(weights)) or np.any(weights < 0.0) or weights.sum() <= 0.0:
            raise ScenarioError(f"weights must be {self.n_scenarios} non-negative numbers, not all zero")
        return scenarios, weights / weights.sum()

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
        scenarios: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> RobustMpcSolution:
        """Plan from ``state`` at ``process_time_h`` to ``harvest_time_h`` for every column of ``scenarios``, within ``bounds``.

        As :meth:`EconomicMpc.solve`, plus ``scenarios`` (n_parameters × S; the
        first column must be ``parameters``, the nominal) and ``weights`` (S;
        normalised to sum 1; equal by default). ``warm`` is a previous
        solution's ``warm`` dict: a RobustMpc's warm-starts every scenario
        (plans and multipliers, shifted as EconomicMpc shifts its own); an
        EconomicMpc's (the same grid) gives every scenario its plan, for a cold
        robust solve. Without either (or with ``guess_inputs``), the nominal
        problem is solved first (cold, by EconomicMpc, from ``guess_inputs``)
        and its plan starts a cold robust solve: a third of the iterations a
        cold robust solve from held inputs takes. The nominal solve's time and
        iterations are included in the solution's.
        """
        scenarios, weights = self._checked_scenarios(parameters, scenarios, weights)
        self._switch_when_compiled()
        started = time.perf_counter()
        iterations = 0
        presolve_status = ""
        inputs, lam_g, lam_x = (None, None, None) if guess_inputs is not None else self._start(warm, shift_warm)
        if inputs is None:
            nominal = self.nominal.solve(
                process_time_h=process_time_h,
                state=state,
                parameters=parameters,
                previous_inputs=previous_inputs,
                harvest_time_h=harvest_time_h,
                guess_inputs=guess_inputs,
                bounds=bounds,
            )
            iterations, presolve_status = nominal.iterations, nominal.status
            if nominal.success:
                inputs = np.repeat(nominal.inputs[:, :, None], self.n_scenarios, axis=2)
        solution = self._solve_robust(process_time_h, state, previous_inputs, harvest_time_h, bounds, scenarios, weights, inputs, lam_g, lam_x)
        elapsed = time.perf_counter() - started
        success, reason = solution.success, solution.reason
        if success and elapsed > self.config.deadline_s:
            success, reason = False, f"deadline exceeded ({elapsed:.2f} s)"
        return replace(solution, success=success, reason=reason, solve_time_s=elapsed, iterations=iterations + solution.iterations, nominal_presolve_status=presolve_status)

    def _solve_robust(
        self,
        process_time_h: float,
        state: np.ndarray,
        previous_inputs: np.ndarray,
        harvest_time_h: float,
        bounds: PlanBounds | None,
        scenarios: np.ndarray,
        weights: np.ndarray,
        inputs: np.ndarray | None,
        lam_g: np.ndarray | None,
        lam_x: np.ndarray | None,
    ) -> RobustMpcSolution:
        """One robust IPOPT solve from per-scenario plans and multipliers (warm) or plans alone (cold); a failed warm solve is retried cold."""
        lay, n_s = self._layout, self.n_scenarios
        nx, n = lay.nx, lay.n
        us = self._u_scale[:, None]
        starts, durations = self.stage_grid(process_time_h, harvest_time_h)
        u_lower, u_upper = self.nominal.input_bounds(bounds)
        equipment_lower, equipment_upper = self.nominal.input_bounds()
        previous_inputs = np.clip(np.asarray(previous_inputs, dtype=float), equipment_lower[:, 0], equipment_upper[:, 0])
        window = self.nominal.stage_window(bounds)
        settings = self.nominal.settings
        if inputs is None:
            inputs = np.repeat(np.tile(previous_inputs[:, None], (1, n))[:, :, None], n_s, axis=2)
        inputs, lam_g0, lam_x0 = self._consolidate(np.clip(inputs, u_lower[:, :, None], u_upper[:, :, None]), lam_g, lam_x, weights)
        warm_start = lam_g0 is not None and lam_x0 is not None
        substeps = self.substeps(durations, cold=not warm_start)
        states, margins, terminal = (
            np.asarray(v)
            for v in self._rollout_all(
                np.asarray(state, dtype=float) / STATE_SCALE,
                np.hstack([inputs[:, :, s] / us for s in range(n_s)]),
                scenarios,
                starts[None, :],
                durations[None, :],
                substeps[None, :],
                window,
                settings,
            )
        )
        # Slacks that make each scenario's soft constraints hold on its rolled-out guess, as EconomicMpc starts.
        w0 = np.concatenate(
            [
                np.concatenate(
                    [
                        states[:, s * (n + 1) : (s + 1) * (n + 1)].ravel(order="F"),
                        (inputs[:, :, s] / us).ravel(order="F"),
                        np.maximum(0.0, -margins[:, s * n : (s + 1) * n]).ravel(order="F"),
                        np.maximum(0.0, -terminal[:, s]),
                    ]
                )
                for s in range(n_s)
            ]
        )
        lbw = np.tile(np.concatenate([self._state_lower, (u_lower / us).ravel(order="F"), np.zeros(4 * n + 2)])[:, None], (1, n_s))
        ubw = np.tile(np.concatenate([np.full(nx * (n + 1), np.inf), (u_upper / us).ravel(order="F"), np.full(4 * n + 2, np.inf)])[:, None], (1, n_s))
        lbw[lay.first_inputs, 1:], ubw[lay.first_inputs, 1:] = -np.inf, np.inf  # scenario 0's first inputs carry the bounds for all
        params = np.concatenate([state, scenarios.ravel(order="F"), weights, starts, durations, substeps, previous_inputs, window.ravel(order="F"), settings])
        args: dict = {"x0": w0, "p": params, "lbx": lbw.ravel(order="F"), "ubx": ubw.ravel(order="F"), "lbg": self._lbg, "ubg": self._ubg}
        multipliers = (lam_g0, lam_x0) if lam_g0 is not None and lam_x0 is not None else None
        run = solve_with_cold_retry(self._solver, self._warm_solver, args, multipliers, deadline_s=self.config.deadline_s)
        return self._solution(run.result, run.stats, run.iterations, run.retried_after, harvest_time_h, starts, weights, u_lower, u_upper)

    def _solution(
        self,
        result: Mapping[str, ca.DM],
        stats: Mapping[str, object],
        iterations: int,
        retried_after: str,
        harvest_time_h: float,
        starts: np.ndarray,
        weights: np.ndarray,
        u_lower: np.ndarray,
        u_upper: np.ndarray,
    ) -> RobustMpcSolution:
        """The solver's answer checked (status, finiteness, bounds, non-anticipativity) and unpacked per scenario."""
        lay, n_s = self._layout, self.n_scenarios
        nx, nu, n = lay.nx, lay.nu, lay.n
        w = np.asarray(result["x"]).ravel().reshape((lay.n_w, n_s), order="F")
        n_x = nx * (n + 1)
        states = np.stack([w[:n_x, s].reshape((nx, n + 1), order="F") * STATE_SCALE[:, None] for s in range(n_s)])
        inputs = np.stack([w[n_x : n_x + nu * n, s].reshape((nu, n), order="F") * self._u_scale[:, None] for s in range(n_s)])
        slacks = w[n_x + nu * n :, :]
        status = str(stats.get("return_status", "unknown"))
        success = bool(stats.get("success", False))
        reason = "" if success else f"solver status {status}"
        objective = float(result["f"])
        tolerance = 1e-6 * self._u_scale[:, None]
        if success and not (np.all(np.isfinite(w)) and math.isfinite(objective)):
            success, reason = False, "non-finite solution"
        if success and np.any(np.abs(inputs[:, :, 0] - inputs[:1, :, 0]) > tolerance[:, 0]):
            success, reason = False, "the scenarios' first inputs differ"
        inputs[:, :, 0] = inputs[0, :, 0]
        if success and (np.any(inputs < u_lower[None] - tolerance) or np.any(inputs > u_upper[None] + tolerance)):
            success, reason = False, "inputs outside their bounds"
        inputs = np.clip(inputs, u_lower[None], u_upper[None])
        titers = states[:, STATE_INDEX["titer"], -1]
        masses = titers * states[:, STATE_INDEX["volume"], -1]
        mass = float(weights @ masses)
        return RobustMpcSolution(
            success=success,
            status=status,
            reason=reason,
            solve_time_s=math.nan,
            iterations=iterations,
            retried_after=retried_after,
            objective=objective,
            harvest_time_h=harvest_time_h,
            stage_times_h=starts,
            inputs=inputs[0],
            states=states[0],
            slack_max=float(np.max(slacks)) if slacks.size else 0.0,
            predicted_product_mass_g=mass,
            predicted_titer_g_per_l=float(weights @ titers),
            predicted_score_g_per_day=batch_score_g_per_day(mass, harvest_time_h, self._batch.economics.turnaround_days),
            warm={
                "inputs": inputs[0],
                "scenario_inputs": np.moveaxis(inputs, 0, 2),
                "lam_g": np.asarray(result["lam_g"]).ravel(),
                "lam_x": np.asarray(result["lam_x"]).ravel(),
            },
            weights=weights,
            scenario_states=states,
            scenario_inputs=inputs,
            scenario_titers_g_per_l=titers,
            scenario_product_mass_g=masses,
            scenario_slack_max=np.max(slacks, axis=0),
        )
