"""The NMPC controller: each cycle, estimate → plan → choose harvest → fall back when the solver fails.

One :meth:`NmpcController.cycle` per control interval. The state comes from a
:class:`StateSource` (the estimator in production; the simulator's truth for
the perfect-knowledge oracle), the plan from :class:`~controller.mpc.EconomicMpc`.

Harvest: the planned harvest time starts at the recipe's and moves by
comparison of predicted scores: every cycle, if the current plan predicts a
better score at an earlier stage end, the harvest moves there (the plan proves
that score reachable); every ``later_harvest_every_cycles`` a later candidate
is solved and adopted if it predicts a better score.

Failures: a failed, non-finite or out-of-bounds solve is never applied. The
previous plan, shifted to now, is used for up to ``max_shifted_cycles``
cycles; after that the platform recipe runs until a solve succeeds again.

Trust: every plan, and the harvest time, stay inside the trust region
(:mod:`controller.trust`); each new lab result is held against the plan in
force a lead time before its draw, which widens or narrows the region, and
after repeated misses the NMPC stands down for the platform recipe until
:meth:`NmpcController.reenable`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import structlog
from pydantic import Field

from controller.config import BatchConfig
from controller.estimator import ExtendedKalmanEstimator
from controller.forecast import ForecastDivergedError, ForecastInputError, ForecastKernel, forecast, plan_schedule
from controller.kpis import batch_score_g_per_day
from controller.mpc import EconomicMpc, MpcConfig, MpcSolution, PlanBounds
from controller.recipe import PlatformRecipe
from controller.replay import ReplayMemory
from controller.robust import DEFAULT_K_SIGMA, RobustMpc, RobustMpcSolution, ScenarioError, scenarios_from_estimate
from controller.trust import MONITORED, Replay, TrustRegion, TrustRegionConfig
from controller.types import LabResult, Setpoints
from plant_models.cho import STATE_INDEX, CultureModel
from plant_models.config_loading import FrozenConfig
from plant_models.parameters import PhaseEnvelope

log = structlog.get_logger(__name__)


class RobustConfig(FrozenConfig):
    """The multi-stage NMPC over the estimator's parameter uncertainty (controller.robust, docs/robust-mpc.md)."""

    enabled: bool = Field(default=False, description="plan for 9 scenarios of the two most uncertain kinetic multipliers at once (robust horizon 1)")
    k_sigma: float = Field(default=DEFAULT_K_SIGMA, ge=1.0, le=4.0, description="the scenarios lie this many standard deviations of ln(multiplier) out [-]")


class NmpcConfig(FrozenConfig):
    mpc: MpcConfig = MpcConfig()
    max_shifted_cycles: int = Field(default=3, ge=0, description="cycles the shifted previous plan may stand in for failed solves")
    later_harvest_step_h: float = Field(default=12.0, gt=0.0, description="how much later a harvest candidate lies [h]")
    later_harvest_every_cycles: int = Field(default=12, ge=1, description="how often a later harvest is tried")
    harvest_improvement_min: float = Field(default=0.002, ge=0.0, description="relative score gain needed to move the harvest [-]")
    initial_harvest_h: float | None = Field(default=None, description="first planned harvest; default the recipe's [h]")
    glucose_feed_headroom_g_per_l_day: float | None = Field(
        default=3.0,
        ge=0.0,
        le=50.0,
        description=(
            "the NMPC's glucose feed is at most the platform recipe's own rate (the consumption the last two accepted lab glucose results"
            " measured, and the deficit to the target, less the glucose of the recipe's nutrient feed) plus this times the trust region's"
            " width (at width 0 the recipe's own rate, as the band then holds the recipe's temperature and feed), as glucose per litre of"
            " culture per day, once two such results have measured the consumption; 0: never above the recipe's rate; None: no such limit. Glucose fed cannot be taken back, and between daily lab results the estimator's glucose is"
            " the model's: on the blind plant `pco2` a model that over-estimated the uptake fed the culture from 4.5 to 10 g/L in a day and"
            " lost 11.7 % against the recipe (docs/closed-loop.md) [g/L/day]"
        ),
    )
    trust: TrustRegionConfig = TrustRegionConfig()
    robust: RobustConfig = RobustConfig()


def build_mpc(model: CultureModel, batch: BatchConfig, config: NmpcConfig, *, background_compile: bool = False) -> EconomicMpc | RobustMpc:
    """The NLP the NMPC plans on: the robust multi-stage one with ``robust.enabled``, else the economic one; one place for every caller."""
    if config.robust.enabled:
        return RobustMpc(model, batch, config.mpc, background_compile=background_compile)
    return EconomicMpc(model, batch, config.mpc, background_compile=background_compile)


@dataclass(frozen=True)
class CycleObservation:
    """What one cycle knows: the batch clock, validated signals and any new lab result."""

    process_time_h: float
    online: dict[str, float]
    feed_total_l: float
    glucose_feed_total_l: float
    applied: Setpoints
    lab_result: LabResult | None = None


class DecisionSource(str, Enum):
    """Who decided a cycle's setpoints."""

    MPC = "mpc"
    """This cycle's solve."""
    SHIFTED_PLAN = "shifted_plan"
    """The last successful plan, shifted to now: the solve failed."""
    RECIPE = "recipe"
    """The platform recipe: the solves kept failing."""
    STOOD_DOWN = "stood_down"
    """The platform recipe: the lab results kept missing the plans' predictions, and the NMPC stood down until an operator re-enables it."""
    HARVEST = "harvest"
    """The planned harvest time has come."""
    NONE = "none"
    """Nothing decided: the cycle could not run (fault)."""

    @property
    def is_fallback(self) -> bool:
        """The solver failed: the shifted plan or the recipe stands in (a stand-down is not a failure: the trust region alarms it)."""
        return self in (DecisionSource.SHIFTED_PLAN, DecisionSource.RECIPE)


@dataclass(frozen=True)
class Decision:
    setpoints: Setpoints
    source: DecisionSource
    harvest_time_h: float
    predicted_titer_g_per_l: float
    predicted_score_g_per_day: float
    solution: MpcSolution | None = field(default=None, repr=False)
    solve_time_s: float = math.nan
    """Time this cycle spent in the solver (the plan and any harvest candidate); NaN when nothing was solved."""


class StateSource(Protocol):
    """Gives the state and parameter vector to plan from at the observation's time."""

    def observe(self, observation: CycleObservation) -> tuple[np.ndarray, np.ndarray]: ...


class NmpcController:
    def __init__(
        self,
        model: CultureModel,
        batch: BatchConfig,
        source: StateSource,
        config: NmpcConfig | None = None,
        mpc: EconomicMpc | RobustMpc | None = None,
        *,
        envelope: tuple[PhaseEnvelope, ...] = (),
        fitted: bool = False,
    ) -> None:
        """``envelope``: the operating envelope of the model's calibration data (empty for an uncalibrated model: the recipe band).
        ``fitted``: the kinetics were calibrated on the plant's records (:class:`~controller.trust.TrustRegion`)."""
        self.config = config or NmpcConfig()
        self._batch = batch
        self._source = source
        self.mpc: EconomicMpc | RobustMpc = mpc or build_mpc(model, batch, self.config)
        # The recipe the NMPC falls back to and plans around: its temperature shift as the setpoint rate limit lets the runtime write it.
        self.recipe = PlatformRecipe(
            batch.recipe,
            batch.media,
            batch.equipment,
            batch.inoculation.volume_l,
            temperature_rate_degc_per_h=self.config.mpc.temperature_rate_max_degc_per_h,
            cycle_h=batch.cycle_period_h,
        )
        # The glucose feed limit's own copy of the recipe's arithmetic, fed only the glucose results the estimator's gate accepted
        # (the fallback recipe, as the PLC's, takes every published one): a swapped sample must not set the NMPC's ceiling.
        self._glucose_reference = copy.deepcopy(self.recipe)
        self.trust = TrustRegion(batch, self.recipe, envelope, self.config.trust, fitted=fitted)
        self._replays = ReplayMemory(model, keep_h=self.config.trust.long_lead_h + 48.0, max_gap_h=2.0 * batch.cycle_period_h)
        self._last_totals: tuple[float, float, float] | None = None
        """(process time, nutrient feed total L, glucose feed total L) at the previous cycle: what was delivered since."""
        self.harvest_time_h = self.config.initial_harvest_h or batch.recipe.harvest_h
        self._plan: MpcSolution | None = None
        self._plan_time_h = 0.0
        self._failures = 0
        self._cycles = 0
        self._forecast_kernel: ForecastKernel | None = None
        self._recipe_glucose_at_draw: list[tuple[float, float, float]] = []
        self.solve_times_s: list[float] = []
        self.failures_total = 0
        self._cycle_first_solve = 0
        self._glucose_ceiling_applied_lph = math.nan
        """The glucose feed's ceiling this cycle's decision was held to (NaN: none, or the recipe decided)."""
        self.cold_retries_total = 0
        """Warm solves that failed and were retried with the cold solver (see :class:`~controller.mpc.MpcSolution`)."""

    def _feed_recipe(self, observation: CycleObservation, recipe: PlatformRecipe | None = None) -> None:
        """Keep the fallback recipe's glucose arithmetic current, as the PLC's would be (``recipe``: another copy to feed)."""
        if observation.lab_result is None:
            return
        delivered = self._batch.media.glucose_delivered_g(observation.feed_total_l, observation.glucose_feed_total_l)
        volume = observation.online.get("volume_l", math.nan)
        if not math.isfinite(volume):
            return
        (recipe or self.recipe).on_lab_result(observation.lab_result, volume_l=volume, glucose_delivered_g=delivered)

    def resume_dict(self) -> dict[str, Any]:
        """What a restart needs of the controller: the trust region's state (:meth:`TrustRegion.to_dict`) and, under
        ``recipe_glucose``, what the fallback recipe and the glucose limit's copy have learned from the lab results."""
        return {**self.trust.to_dict(), "recipe_glucose": {"fallback": self.recipe.glucose_state(), "limit": self._glucose_reference.glucose_state()}}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take up :meth:`resume_dict` (a state saved before ``recipe_glucose`` existed restores the trust region only)."""
        self.trust.restore(dict(data))
        saved = data.get("recipe_glucose")
        if isinstance(saved, Mapping):
            for recipe, key in ((self.recipe, "fallback"), (self._glucose_reference, "limit")):
                if isinstance(saved.get(key), Mapping):
                    recipe.restore_glucose_state(saved[key])

    def _accepted_fields(self, lab: LabResult) -> frozenset[str] | None:
        """The fields of ``lab`` the estimator's gate accepted (None: a source with no gate, or one that accepted all)."""
        accepted = getattr(self._source, "lab_fields_accepted", None)
        return accepted(lab.seq) if accepted is not None else None

    def _feed_glucose_reference(self, observation: CycleObservation) -> None:
        """Feed the glucose limit's recipe copy the new result, if the estimator's gate accepted its glucose (a source with no gate accepts all)."""
        lab = observation.lab_result
        if lab is None or not lab.measured("glucose_g_per_l"):
            return
        fields = self._accepted_fields(lab)
        if fields is not None and "glucose_g_per_l" not in fields:
            log.info("nmpc_glucose_limit_ignores_result", seq=lab.seq, glucose_g_per_l=lab.glucose_g_per_l, reason="the estimator's gate rejected it")
            return
        self._feed_recipe(observation, self._glucose_reference)

    def cycle(self, observation: CycleObservation) -> Decision:
        t = observation.process_time_h
        self._cycles += 1
        self._cycle_first_solve = len(self.solve_times_s)
        self._glucose_ceiling_applied_lph = math.nan
        self._feed_recipe(observation)
        latest = self._batch.limits.latest_harvest_h
        self.harvest_time_h = min(max(self.harvest_time_h, t), latest)
        cycle_h = self._batch.cycle_period_h
        if self.harvest_time_h - t < 0.5 * cycle_h:
            return self._decision(observation.applied, DecisionSource.HARVEST, harvest=True)
        state, parameters = self._source.observe(observation)
        self._feed_glucose_reference(observation)
        if self.trust.active:
            delivered, totalled = self._delivered(observation)
            # Across a gap (a lost connection: the PLC ran its local recipe) the totals say what went in; without them the read-back says nothing of it.
            self._replays.record(t, delivered, state, parameters, bridge_h=self.config.trust.replay_gap_h if totalled else None)
            self.trust.ran(t, observation.applied)
        if observation.lab_result is not None:
            lab = observation.lab_result
            replay, day_replay = self._lab_replays(lab.taken_at_h)
            check = self.trust.check(lab, self._accepted_fields(lab), replay=replay, day_replay=day_replay)
            if check is not None:
                log.info("plan_checked_against_lab", process_time_h=t, check=check.describe(), width=self.trust.width, stood_down=self.trust.stood_down)
        if self.trust.stood_down:
            recipe = self.recipe.setpoints(t, volume_l=observation.online.get("volume_l"))
            self.harvest_time_h = max(t, self._batch.recipe.harvest_h)
            return self._decision(recipe, DecisionSource.STOOD_DOWN, harvest=recipe.harvest)
        earliest, latest_allowed = self.trust.harvest_window_h(t)
        self.harvest_time_h = min(max(self.harvest_time_h, earliest), latest_allowed)
        if self.harvest_time_h - t < 0.5 * cycle_h:
            return self._decision(observation.applied, DecisionSource.HARVEST, harvest=True)
        previous = np.array([observation.applied.feed_rate_lph, observation.applied.glucose_rate_lph, observation.applied.temperature_degc])
        solution = self._solve(
            process_time_h=t,
            state=state,
            parameters=parameters,
            previous_inputs=previous,
            harvest_time_h=self.harvest_time_h,
            warm=self._plan.warm if self._plan is not None else None,
        )
        if solution.success:
            solution = self._improve_harvest(solution, t, state, parameters, previous)
            self._plan, self._plan_time_h, self._failures = solution, t, 0
            times = _stage_ends(solution, with_start=True)
            self.trust.remember(t, times, solution.states, self._prediction_sd(solution, times))
            u = solution.first_inputs
            return self._decision(Setpoints(float(u[0]), self._glucose_within_headroom(float(u[1]), observation), float(u[2])), DecisionSource.MPC, solution=solution)
        self._failures += 1
        self.failures_total += 1
        log.warning("mpc_solve_failed", process_time_h=t, reason=solution.reason, consecutive=self._failures)
        if self._plan is not None and self._failures <= self.config.max_shifted_cycles:
            index = int(np.searchsorted(self._plan.stage_times_h, t, side="right") - 1)
            u = self._plan.inputs[:, max(0, min(index, self._plan.inputs.shape[1] - 1))]
            return self._decision(Setpoints(float(u[0]), self._glucose_within_headroom(float(u[1]), observation), float(u[2])), DecisionSource.SHIFTED_PLAN, solution=self._plan)
        recipe = self.recipe.setpoints(t, volume_l=observation.online.get("volume_l"))
        return self._decision(Setpoints(recipe.feed_rate_lph, recipe.glucose_rate_lph, recipe.temperature_degc), DecisionSource.RECIPE)

    def _prediction_sd(self, solution: MpcSolution, times_h: np.ndarray) -> np.ndarray | None:
        """The estimator's forecast sd of every state along the plan, on the plan's times, as far as the monitor looks; None without an estimator."""
        if not (self.trust.active and self.trust.config.prediction_sigmas > 0.0 and isinstance(self._source, ExtendedKalmanEstimator)):
            return None
        until_h = min(float(times_h[-1]), float(times_h[0]) + self.trust.config.lead_h + 2.0 * self._batch.cycle_period_h + 24.0)
        try:
            if self._forecast_kernel is None:
                self._forecast_kernel = ForecastKernel.like_filter(self._source)
            ahead = forecast(self._source, plan_schedule(solution), until_h=until_h, kernel=self._forecast_kernel)
        except (ForecastInputError, ForecastDivergedError) as error:
            log.warning("plan_uncertainty_unavailable", error=str(error))
            return None
        return np.array([np.interp(times_h, ahead.times_h, row) for row in ahead.state_sd])

    def _bounds(self, t: float, harvest_time_h: float, state: np.ndarray, previous: np.ndarray) -> PlanBounds | None:
        """The trust region on the stage grid from ``t`` to ``harvest_time_h`` (volumes per stage from the last plan, else now's; the first stage's now's)."""
        starts, durations = self.mpc.stage_grid(t, harvest_time_h)
        i_v = STATE_INDEX["volume"]
        volume = np.full(len(starts), float(state[i_v]))
        if self._plan is not None:
            volume = np.interp(starts, _stage_ends(self._plan, with_start=True), self._plan.states[i_v])
            volume[0] = float(state[i_v])
        return self.trust.bounds(starts, durations, volume_l=volume, previous_inputs=previous, temperature_rate_degc_per_h=self.config.mpc.temperature_rate_max_degc_per_h)

    def _scenarios(self, parameters: np.ndarray, n_scenarios: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The robust solve's parameter scenarios: from the estimator's uncertainty; all nominal when the source states none."""
        estimate = getattr(self._source, "estimate", None)
        if estimate is not None:
            try:
                scenarios = scenarios_from_estimate(estimate, k_sigma=self.config.robust.k_sigma)
            except ScenarioError as error:
                log.warning("robust_scenarios_unavailable", error=str(error))
            else:
                scenarios.parameters[:, 0] = parameters  # the nominal scenario is what the source gave to plan with
                return scenarios.parameters, scenarios.weights
        return np.tile(np.asarray(parameters, dtype=float)[:, None], (1, n_scenarios)), None

    def _delivered(self, observation: CycleObservation) -> tuple[np.ndarray, bool]:
        """What the plant was given since the previous cycle: the feed rates the flow totals show, and the temperature setpoint read back; and whether both rates came from totals.

        The setpoints read back are not what went in when the PLC stopped a pump (its high-level stop, a pump fault): the totals
        are. Where a total is unknown, went backwards (a reset) or this is the first cycle, the read-back rate stands in.
        """
        applied = observation.applied
        rates = [applied.feed_rate_lph, applied.glucose_rate_lph]
        totalled = [False, False]
        now = (observation.process_time_h, observation.feed_total_l, observation.glucose_feed_total_l)
        if self._last_totals is not None:
            then_h, *then_totals = self._last_totals
            dt = now[0] - then_h
            for i, (before, after) in enumerate(zip(then_totals, now[1:], strict=True)):
                if dt > 0.0 and math.isfinite(before) and math.isfinite(after) and after >= before:
                    rates[i] = (after - before) / dt
                    totalled[i] = True
        self._last_totals = now
        return np.array([rates[0], rates[1], applied.temperature_degc]), all(totalled)

    def replay(self, taken_at_h: float, lead_h: float | None = None) -> Replay | None:
        """The model run to ``taken_at_h`` from the estimate ``lead_h`` (default ``long_lead_h``) before, with the setpoints the plant ran since (:mod:`controller.replay`); None without one."""
        if not self.trust.active:
            return None
        ran = self._replays.replay(taken_at_h - (self.trust.config.long_lead_h if lead_h is None else lead_h), taken_at_h)
        if ran is None:
            return None
        from_h, state = ran
        return Replay(from_h, taken_at_h, {name: float(state[STATE_INDEX[state_name]]) for name, state_name in MONITORED})

    def _lab_replays(self, taken_at_h: float) -> tuple[Replay | None, Replay | None]:
        """The model runs a lab result is held against: from ``long_lead_h`` and from ``lead_h`` before its draw. Stood down, they
        are only the engineer's evidence: a numeric failure there is logged and skipped, and the recipe's cycle runs."""
        try:
            return self.replay(taken_at_h), self.replay(taken_at_h, self.trust.config.lead_h)
        except (ArithmeticError, ValueError, RuntimeError) as error:
            if not self.trust.stood_down:
                raise
            log.warning("shadow_check_skipped", taken_at_h=taken_at_h, error=str(error))
            return None, None

    def reenable(self) -> None:
        """An operator puts the NMPC back in charge after it stood down (see :meth:`controller.trust.TrustRegion.reenable`)."""
        self.trust.reenable()
        self.harvest_time_h = self.config.initial_harvest_h or self._batch.recipe.harvest_h

    def _solve(self, **arguments: Any) -> MpcSolution:
        """One :meth:`EconomicMpc.solve` (same arguments) inside the trust region, its time and any cold retry recorded."""
        arguments["bounds"] = self._bounds(arguments["process_time_h"], arguments["harvest_time_h"], arguments["state"], arguments["previous_inputs"])
        if isinstance(self.mpc, RobustMpc):
            arguments["scenarios"], arguments["weights"] = self._scenarios(arguments["parameters"], self.mpc.n_scenarios)
        solution = self.mpc.solve(**arguments)
        self.solve_times_s.append(solution.solve_time_s)
        if solution.retried_after:
            self.cold_retries_total += 1
            log.info(
                "mpc_warm_solve_retried_cold",
                process_time_h=arguments["process_time_h"],
                harvest_time_h=solution.harvest_time_h,
                warm_status=solution.retried_after,
                status=solution.status,
                iterations=solution.iterations,
            )
        return solution

    def _improve_harvest(self, solution: MpcSolution, t: float, state: np.ndarray, parameters: np.ndarray, previous: np.ndarray) -> MpcSolution:
        config = self.config
        earliest, latest = self.trust.harvest_window_h(t)
        ends = _stage_ends(solution)
        i_p, i_v = STATE_INDEX["titer"], STATE_INDEX["volume"]
        if isinstance(solution, RobustMpcSolution) and solution.scenario_states.size:  # what the robust plan's prediction is: the scenarios' weighted mean
            masses = solution.weights @ (solution.scenario_states[:, i_p, 1:] * solution.scenario_states[:, i_v, 1:])
        else:
            masses = solution.states[i_p, 1:] * solution.states[i_v, 1:]
        scores = np.where(ends >= earliest - 1e-9, batch_score_g_per_day(masses, ends, self._batch.economics.turnaround_days), -np.inf)
        best = int(np.argmax(scores))
        if scores[best] > solution.predicted_score_g_per_day * (1.0 + config.harvest_improvement_min) and ends[best] < solution.harvest_time_h:
            log.info("harvest_moved_earlier", process_time_h=t, from_h=solution.harvest_time_h, to_h=float(ends[best]))
            self.harvest_time_h = float(ends[best])
        elif self._cycles % config.later_harvest_every_cycles == 0 and self.harvest_time_h < latest:
            later_h = min(self.harvest_time_h + config.later_harvest_step_h, latest)
            candidate = self._solve(process_time_h=t, state=state, parameters=parameters, previous_inputs=previous, harvest_time_h=later_h, warm=solution.warm, shift_warm=False)
            if candidate.success and candidate.predicted_score_g_per_day > solution.predicted_score_g_per_day * (1.0 + config.harvest_improvement_min):
                log.info("harvest_moved_later", process_time_h=t, from_h=self.harvest_time_h, to_h=later_h)
                self.harvest_time_h = later_h
                return candidate
        return solution

    def glucose_ceiling_lph(self, volume_l: float) -> float:
        """The most glucose feed the NMPC may write [L/h]: the recipe's own rate plus ``glucose_feed_headroom_g_per_l_day`` times the
        trust region's width (inf: no limit configured, or the consumption not yet measured by two lab results). An unknown volume
        counts as the inoculum's, the smallest the culture has been: the lowest ceiling. The width counts because a region its results
        narrowed is one whose model they contradicted: measured on the blind plant `clonal`, three misses narrowed the band to 0.1
        while the full headroom let the plan hold glucose 1-2 g/L above the recipe's culture (docs/closed-loop.md §1)."""
        headroom, reference = self.config.glucose_feed_headroom_g_per_l_day, self._glucose_reference
        if headroom is None or not reference.glucose_consumption_seen:
            return math.inf
        volume = volume_l if math.isfinite(volume_l) else self._batch.inoculation.volume_l
        width = self.trust.width if self.trust.active else 1.0  # at width 0 the recipe's own glucose feed, as its temperature and feed
        return reference.glucose_rate_lph + width * headroom * volume / self._batch.media.glucose_feed_g_per_l / 24.0

    @property
    def glucose_ceiling_applied_lph(self) -> float:
        """The glucose feed's ceiling this cycle's decision was held to (NaN: none, or the recipe decided)."""
        return self._glucose_ceiling_applied_lph

    def region_summary(self, now_h: float, volume_l: float | None) -> dict[str, Any]:
        """The trust region as the cycle record and the screen show it (:meth:`~controller.trust.TrustRegion.summary`), and the
        glucose feed's ceiling (:meth:`glucose_ceiling_lph`) this cycle's decision was held to, where one was: the plan's or the
        shifted plan's, with the volume read that cycle. None is shown when the recipe decided (stood down, solves failing, the
        harvest): its own rate is not limited."""
        data = self.trust.summary(now_h, volume_l)
        if math.isfinite(self._glucose_ceiling_applied_lph):
            data["glucose_feed_max_lph"] = self._glucose_ceiling_applied_lph
        return data

    def _glucose_within_headroom(self, rate_lph: float, observation: CycleObservation) -> float:
        ceiling = self._glucose_ceiling_applied_lph = self.glucose_ceiling_lph(observation.online.get("volume_l", math.nan))
        if rate_lph > ceiling:
            log.info(
                "nmpc_glucose_feed_limited",
                process_time_h=observation.process_time_h,
                planned_lph=rate_lph,
                ceiling_lph=ceiling,
                recipe_lph=self._glucose_reference.glucose_rate_lph,
            )
            return ceiling
        return rate_lph

    def _decision(self, setpoints: Setpoints, source: DecisionSource, *, harvest: bool = False, solution: MpcSolution | None = None) -> Decision:
        plan = solution or self._plan
        return Decision(
            setpoints=Setpoints(setpoints.feed_rate_lph, setpoints.glucose_rate_lph, setpoints.temperature_degc, harvest=harvest),
            source=source,
            harvest_time_h=self.harvest_time_h,
            predicted_titer_g_per_l=plan.predicted_titer_g_per_l if plan is not None else math.nan,
            predicted_score_g_per_day=plan.predicted_score_g_per_day if plan is not None else math.nan,
            solution=solution,
            solve_time_s=float(sum(self.solve_times_s[self._cycle_first_solve :])) if len(self.solve_times_s) > self._cycle_first_solve else math.nan,
        )


def _stage_ends(solution: MpcSolution, *, with_start: bool = False) -> np.ndarray:
    """The plan's stage-end times (with the plan's start first: one time per column of ``solution.states``)."""
    ends = solution.stage_times_h + np.diff(np.append(solution.stage_times_h, solution.harvest_time_h))
    return np.concatenate([solution.stage_times_h[:1], ends]) if with_start else ends
