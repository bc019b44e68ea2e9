"""The control cycle: one scan in, what to write, record and alarm out; no I/O of its own.

The runtime beside a PLC (:mod:`controller.runtime`) and the in-process closed
loop (:mod:`simulator.closed_loop`) drive this one object, so what a campaign
measures is what runs beside the PLC. A cycle has two halves around the writes
the caller makes:

1. :meth:`ControlCycle.decide` (scan → :class:`CyclePlan`): data-quality
   checks → the batch clock's verdict → the mode machine → physical cross-checks
   (:mod:`controller.plausibility`) → estimator and NMPC (atomic: a failure
   leaves the estimator as it was and the lab result unconsumed) → the safety
   filter against what the PLC runs now → the writes for the state
   (``MPC.Mode``; ``MPC.Rec.*`` in advisory, held and closed loop; ``SP.*`` in
   closed loop; ``SP.HarvestRequest`` after the setpoints) → the look-ahead
   (early warnings) → the alarms. :meth:`ControlCycle.resume_state` gives the
   state to resume from, which the runtime commits before it writes.
2. :meth:`ControlCycle.conclude` (the writes' outcome → :class:`CycleOutcome`):
   the write-failure count, the cycle record, the alarms raised and cleared,
   and whether to move the heartbeat (last, after every write).

A fault (an unusable or contradictory clock, a failed critical input, a
physical contradiction, another writer of the heartbeat, an estimator that
refused the data, failing writes) writes no setpoints and no recommendations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog

from controller.advisory import Recommendation, RecommendationStatus
from controller.alarms import AlarmBoard, AlarmChange
from controller.clock import BatchClock, ClockVerdict, Tick, process_time_of
from controller.config import BatchConfig
from controller.estimator import ExtendedKalmanEstimator
from controller.forecast import Forecast, ForecastKernel, HarvestOutcome, early_warnings, forecast, plan_schedule, recipe_outcome
from controller.modes import Conditions, ModeMachine, State, StateChange
from controller.nmpc import CycleObservation, Decision, DecisionSource, NmpcController
from controller.plausibility import PlausibilityChecker
from controller.ports import CycleRecord, ResumeState, ScannedValue, Value
from controller.quality import DataQualityChecker, QualityReport
from controller.runtime_config import RuntimeSettings
from controller.safety import filter_setpoints
from controller.types import PHASE_IDLE, PHASE_RUNNING, UINT32_MAX, LabResult
from plant_models.cho import STATE_INDEX, STATES
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

RECOMMENDATION_SIGNALS = ("MPC.Rec.FeedRate", "MPC.Rec.GlucoseRate", "MPC.Rec.Temperature")
LOOK_AHEAD_ERRORS: tuple[type[Exception], ...] = (BioreactorMPCError, ArithmeticError, ValueError)
"""What the look-ahead may fail with (a diverged forecast, a singular covariance: numpy's LinAlgError is a ValueError): it only
warns, so its failure costs the cycle its early warnings, never its control."""
CONTROLLER_ERRORS: tuple[type[Exception], ...] = (BioreactorMPCError, ArithmeticError, ValueError, RuntimeError)
"""What the estimator and the NMPC may fail with: the refusals they raise on purpose, and numeric failures (numpy's LinAlgError is a
ValueError, CasADi's evaluation errors RuntimeErrors). Any of them costs the cycle its plan (rolled back, a fault), never the runtime."""
LAB_ATTEMPTS = 2
"""Cycles a lab result may make the estimator fail before it is set aside (recorded as not used, alarmed)."""


@dataclass(frozen=True)
class WriteGroup:
    """Signals written in one request; a group that fails stops the groups after it."""

    values: Mapping[str, Value]
    setpoints: bool
    """Holds ``SP.*``: recorded in the audit trail first, and counted as a setpoint write."""


@dataclass(frozen=True)
class CyclePlan:
    """What :meth:`ControlCycle.decide` found and wants done."""

    verdict: ClockVerdict
    report: QualityReport
    state: State
    changes: tuple[StateChange, ...]
    decision: Decision | None
    applied: Mapping[str, float | bool] | None
    """The setpoints after the safety filter (written only in closed loop)."""
    adjustments: tuple[str, ...]
    writes: tuple[WriteGroup, ...]
    lab: LabResult | None
    lab_used: bool
    alarms: Mapping[str, str]
    recommendation: Recommendation | None
    checkpoint: object
    """The estimator before this cycle: :meth:`ControlCycle.abandon` returns to it."""
    lab_seq_before: int
    before: tuple[State, str, int, int]
    """The state, its reason, the fault cycles and the write failures before this cycle: :meth:`ControlCycle.abandon` returns to them."""
    recipe_forecast: HarvestOutcome | None = None
    """What the platform recipe would give from this cycle's estimate on (titer and score at its harvest, ± sd): recorded with the cycle,
    the report's KPIs against the recipe. None without an estimate or a decision, or from the recipe's harvest on."""

    @property
    def process_time_h(self) -> float:
        return self.verdict.process_time_h


@dataclass(frozen=True)
class CycleOutcome:
    record: CycleRecord
    alarm_changes: tuple[AlarmChange, ...]
    beat: bool
    """Move the heartbeat now (False: the fault has lasted ``fault_hand_over_cycles`` and the PLC's watchdog should take over)."""
    hand_over_started: bool = False
    """This cycle is the first to withhold the heartbeat."""


def estimate_summary(estimator: ExtendedKalmanEstimator) -> dict[str, Any]:
    """States with their standard deviations, the parameter multipliers and the consistency monitor's inflation per signal, as plain data."""
    estimate = estimator.estimate
    names = [s.name for s in STATES]
    return {
        "state": dict(zip(names, map(float, estimate.state), strict=True)),
        "sd": dict(zip(names, map(float, estimate.state_sd), strict=True)),
        "multipliers": {k: float(v) for k, v in estimate.multipliers.items()},
        "inflation": {k: float(v) for k, v in estimator.inflation.items() if v != 1.0},
    }


class ControlCycle:
    """One batch's cycles, from the first scan to harvest; the runtime and the in-process loop drive it alike."""

    def __init__(
        self,
        *,
        batch: BatchConfig,
        settings: RuntimeSettings,
        modes: ModeMachine,
        quality: DataQualityChecker,
        estimator: ExtendedKalmanEstimator | None,
        controller: NmpcController,
        clock: BatchClock,
        heartbeat: int = 0,
        full_forecast: bool = False,
        held_contradictions: Mapping[str, str] | None = None,
        fault_cycles: int = 0,
    ) -> None:
        self.batch = batch
        self.settings = settings
        self.modes = modes
        self.quality = quality
        self.estimator = estimator
        """The runtime's estimator; None when the controller plans from another source (the perfect-knowledge oracle in simulation)."""
        self.controller = controller
        self.clock = clock
        self.plausibility = PlausibilityChecker(batch, settings.plausibility)
        self.alarms = AlarmBoard()
        self.heartbeat = heartbeat
        """The last value written to ``MPC.Heartbeat`` (or found at the PLC at start)."""
        self.heartbeat_uncertain = True
        """Whether the PLC's heartbeat may differ from :attr:`heartbeat` without another writer (at start, after a failed write)."""
        self.write_failures = 0
        self.fault_cycles = fault_cycles
        """Cycles in fault in a row (carried over a restart, so a fault hand-over goes on)."""
        self.full_forecast = full_forecast
        self.forecast: Forecast | None = None
        self._kernel: ForecastKernel | None = None
        self._recipe_forecast_due = True
        """Forecast the recipe at the next cycle with a decision even in closed loop without a screen: the first one, and after a lab result."""
        self._lab_attempts: dict[int, int] = {}
        self._contradictions: dict[str, str] = dict(held_contradictions or {})
        """Physical contradictions found (code → message): held, with the cycle in fault, until :meth:`acknowledge`."""

    # ------------------------------------------------------------------ first half

    def clock_verdict(self, readings: Mapping[str, ScannedValue], *, wall_s: float) -> ClockVerdict:
        """The batch clock's verdict on a scan: its ``Status.ProcessTime`` if good, finite and within the clock's plausible range, else unusable."""
        now_h = process_time_of(readings)
        check = self.quality.config.check_of("Status.ProcessTime")
        if check is not None and math.isfinite(now_h) and check.outside(now_h):
            now_h = math.nan
        return self.clock.read(now_h, wall_s=wall_s)

    def decide(self, readings: Mapping[str, ScannedValue], verdict: ClockVerdict, *, wall_now: datetime | None = None) -> CyclePlan:
        """Check the scan, run the estimator and the NMPC when the state allows, and say what to write."""
        if verdict.tick is Tick.WAIT:
            raise ValueError("decide() needs a CYCLE or FAULT verdict from the clock")
        now_h = verdict.process_time_h
        checkpoint = self.estimator.checkpoint() if self.estimator is not None else None
        lab_seq_before = self.quality.last_lab_seq
        before = (self.modes.state, self.modes.reason, self.fault_cycles, self.write_failures)
        report = self.quality.check(readings, wall_now=wall_now)
        status = report.accepted
        alarms: dict[str, str] = {f"quality.{signal}": problem for signal, problem in report.problems.items()}
        critical = list(report.critical)
        if verdict.tick is Tick.FAULT:
            alarms["batch_clock"] = verdict.problem
            critical.append("Status.ProcessTime (batch clock)")
        elif verdict.problem:
            alarms["batch_clock"] = verdict.problem
        heartbeat_code, heartbeat_problem = self._heartbeat_check(readings)
        if heartbeat_code == "heartbeat_foreign":
            alarms[heartbeat_code] = heartbeat_problem
            critical.append("MPC.Heartbeat (another writer)")
        elif heartbeat_code:
            alarms[heartbeat_code] = heartbeat_problem
        if status.get("Status.Phase") == PHASE_IDLE and math.isfinite(self.clock.last_cycle_h):
            alarms["phase_idle"] = f"Status.Phase reads idle after cycles ran (the last at {self.clock.last_cycle_h:.2f} h): a PLC restarted or reset?"
            critical.append("Status.Phase (idle mid-batch)")
        if report.critical:
            alarms["data_quality"] = f"critical inputs failed their checks: {', '.join(report.critical)}; no setpoints written"
        if status.get("Status.WatchdogTripped"):
            alarms["plc_watchdog"] = "the PLC's watchdog tripped: it runs its local recipe"
        observation: CycleObservation | None = None
        if not critical:
            observation = report.observation()
            for contradiction in self.plausibility.check(observation):
                self._contradictions[str(contradiction.code)] = f"{contradiction.message} (held until an engineer acknowledges it)"
            alarms.update(self._contradictions)
            critical.extend(f"physical contradiction: {code}" for code in sorted(self._contradictions))
        changes: list[StateChange] = []
        self._evaluate(changes, status, tuple(critical))
        decision: Decision | None = None
        lab_used = False
        if observation is not None and not critical:
            decision, lab_used = self._run_controller(observation, report, alarms, changes, status, checkpoint)
        self.fault_cycles = self.fault_cycles + 1 if self.modes.state is State.FAULT else 0
        if self.modes.state is State.FAULT and self.write_failures >= self.settings.max_write_failures and self.fault_cycles >= self.settings.write_retry_cycles:
            self.write_failures = self.settings.max_write_failures - 1  # one more try next cycle; one more failure and back here
        applied: dict[str, float | bool] | None = None
        adjustments: tuple[str, ...] = ()
        alarms.update(self.controller.trust.alarms())
        if decision is not None and observation is not None:
            if decision.source.is_fallback:
                alarms["solver_fallback"] = f"the MPC failed; running the {decision.source.value.replace('_', ' ')}"
            filtered = filter_setpoints(
                decision.setpoints,
                observation.applied,
                self.batch,
                temperature_rate_degc_per_h=self.settings.nmpc.mpc.temperature_rate_max_degc_per_h,
                dt_h=self.batch.cycle_period_h,
                volume_readings_l=self._volume_readings(observation),
            )
            adjustments = filtered.adjustments
            if adjustments:
                log.info("setpoints_filtered", process_time_h=now_h, adjustments=list(adjustments))
            applied = filtered.setpoints.as_dict()
        state = self.modes.state
        recommendation = self._recommendation(now_h, state, decision, applied, observation)
        recipe_forecast: HarvestOutcome | None = None
        self._recipe_forecast_due |= lab_used  # also on a cycle without a decision (held): forecast at the next one that has one
        if decision is not None and recommendation is not None:
            lookahead, recommendation, recipe_forecast = self._look_ahead(now_h, decision, state, status, recommendation)
            alarms.update(lookahead)
        else:
            self.forecast = None
        return CyclePlan(
            verdict=verdict,
            report=report,
            state=state,
            changes=tuple(changes),
            decision=decision,
            applied=applied,
            adjustments=adjustments,
            writes=self._writes(now_h, state, decision, applied),
            lab=report.lab_result,
            lab_used=lab_used,
            alarms=alarms,
            recommendation=recommendation,
            checkpoint=checkpoint,
            lab_seq_before=lab_seq_before,
            before=before,
            recipe_forecast=recipe_forecast,
        )

    def abandon(self, plan: CyclePlan) -> None:
        """The plan's cycle did not happen (its records could not be written before any write): the estimator, the lab sequence,
        the state and the counters return to before it, so the cycle's state changes are made and recorded when it runs again."""
        if self.estimator is not None:
            self.estimator.rollback(plan.checkpoint)
        self.quality.commit_lab(plan.lab_seq_before)
        self.modes.state, self.modes.reason, self.fault_cycles, self.write_failures = plan.before
        self._recipe_forecast_due |= plan.recipe_forecast is not None  # its record was not written: forecast again

    # ------------------------------------------------------------------ second half

    def conclude(
        self,
        plan: CyclePlan,
        *,
        setpoints_written: bool,
        setpoint_write_failed: bool,
        extra_alarms: Mapping[str, str] | None = None,
        read_time_s: float = math.nan,
        write_time_s: float = math.nan,
    ) -> CycleOutcome:
        """The writes' outcome: count failures, record the cycle, raise and clear alarms, and decide the heartbeat."""
        if plan.state.writes_setpoints:
            self.write_failures = self.write_failures + 1 if setpoint_write_failed else 0
        elif plan.state is not State.FAULT:
            self.write_failures = 0  # held, advisory or off: the failures were about closed loop
        alarms = dict(plan.alarms)
        if self.write_failures:
            alarms["write_failed"] = f"{self.write_failures} setpoint writes in a row failed"
        alarms.update(extra_alarms or {})
        changes = self.alarms.update(alarms)
        self.clock.cycle_done(plan.verdict)
        decision = plan.decision
        record = CycleRecord(
            process_time_h=plan.process_time_h,
            state=plan.state.value,
            reason=self.modes.reason,
            source=(decision.source if decision is not None else DecisionSource.NONE).value,
            requested=decision.setpoints.as_dict() if decision is not None else None,
            applied=plan.applied,
            adjustments=plan.adjustments,
            harvest_time_h=decision.harvest_time_h if decision is not None else math.nan,
            predicted_titer_g_per_l=decision.predicted_titer_g_per_l if decision is not None else math.nan,
            predicted_score_g_per_day=decision.predicted_score_g_per_day if decision is not None else math.nan,
            solve_time_s=decision.solve_time_s if decision is not None else math.nan,
            estimate=_with_recipe_forecast(estimate_summary(self.estimator), plan.recipe_forecast) if self.estimator is not None else {},
            wrote_setpoints=setpoints_written,
            read_time_s=read_time_s,
            write_time_s=write_time_s,
            trust=self.controller.region_summary(plan.process_time_h, self._volume_estimate()),
        )
        hand_over = self.settings.fault_hand_over_cycles
        withhold = plan.state is State.FAULT and hand_over is not None and self.fault_cycles >= hand_over
        if withhold and self.fault_cycles == hand_over:
            log.warning("heartbeat_withheld", process_time_h=plan.process_time_h, reason=self.modes.reason, fault_cycles=self.fault_cycles)
        return CycleOutcome(record, tuple(changes), beat=not withhold, hand_over_started=withhold and self.fault_cycles == hand_over)

    @property
    def contradictions(self) -> dict[str, str]:
        return dict(self._contradictions)

    def acknowledge(self, code: str) -> None:
        """An engineer has checked the signals of a physical contradiction (a tag map fixed, a probe replaced): control may resume.

        The capacitance/OUR reference is learned afresh. A contradiction still
        there is found again at the next cycle.
        """
        if code not in self._contradictions:
            raise KeyError(f"no physical contradiction {code!r} is held; held: {', '.join(sorted(self._contradictions)) or 'none'}")
        del self._contradictions[code]
        self.plausibility.relearn()

    def next_heartbeat(self) -> int:
        return (self.heartbeat + 1) & UINT32_MAX

    def heartbeat_written(self, value: int | None) -> None:
        """The heartbeat write's outcome: the value now at the PLC, or None when the write failed (the PLC may hold either value)."""
        if value is None:
            self.heartbeat_uncertain = True
            return
        self.heartbeat, self.heartbeat_uncertain = value, False

    # ------------------------------------------------------------------ parts

    def _evaluate(self, changes: list[StateChange], status: Mapping[str, Any], critical: tuple[str, ...]) -> None:
        change = self.modes.evaluate(
            Conditions(
                link_up=True,
                critical_failures=critical,
                write_failures=self.write_failures,
                batch_running=status.get("Status.Phase") == PHASE_RUNNING,
                remote_enabled=bool(status.get("Status.RemoteEnabled", False)),
                watchdog_tripped=bool(status.get("Status.WatchdogTripped", False)),
            )
        )
        if change is not None:
            changes.append(change)

    def _heartbeat_check(self, readings: Mapping[str, ScannedValue]) -> tuple[str, str]:
        """What ``MPC.Heartbeat`` at the PLC says: ('', '') when it is this runtime's; an alarm code and message otherwise.

        Ahead of the value last written: another writer (``heartbeat_foreign``, a fault). Behind it: the PLC
        restarted and reset it (``heartbeat_reset``, an alarm; the runtime counts on from the PLC's value).
        Two runtimes beating in step write the same values and cannot be told apart: a claim tag at the PLC
        can (docs/runtime.md, section 7).
        """
        reading = readings.get("MPC.Heartbeat")
        if reading is None or not reading.good or isinstance(reading.value, str | bool):
            return "", ""
        value = int(reading.value)
        if self.heartbeat_uncertain or value == self.heartbeat:
            self.heartbeat, self.heartbeat_uncertain = value, False
            return "", ""
        last = self.heartbeat
        if (value - last) % (UINT32_MAX + 1) > (UINT32_MAX + 1) // 2:  # behind (modulo the counter's wrap)
            self.heartbeat = value
            return "heartbeat_reset", f"MPC.Heartbeat reads {value}, behind the {last} this runtime last wrote: the PLC restarted or reset it"
        return "heartbeat_foreign", f"MPC.Heartbeat reads {value}, but this runtime last wrote {last}: another runtime (or a person) writes to this PLC"

    def _run_controller(
        self,
        observation: CycleObservation,
        report: QualityReport,
        alarms: dict[str, str],
        changes: list[StateChange],
        status: Mapping[str, Any],
        checkpoint: object,
    ) -> tuple[Decision | None, bool]:
        """The estimator and the NMPC, all or nothing; the decision and whether the lab result was used."""
        lab = report.lab_result
        try:
            decision = self.controller.cycle(observation)
        except CONTROLLER_ERRORS as error:  # the estimator refused the data (diverged, inconsistent inputs), or a numeric failure: no plan this cycle
            if self.estimator is not None:
                self.estimator.rollback(checkpoint)
            expected = isinstance(error, BioreactorMPCError)
            log.error("cycle_failed", process_time_h=observation.process_time_h, error=str(error), kind=type(error).__name__, exc_info=not expected)
            alarms["estimator_failed"] = f"the estimator or the NMPC failed on this cycle's data ({type(error).__name__}): {error}"
            self._evaluate(changes, status, (f"estimator: {type(error).__name__}",))
            if lab is not None:
                attempts = self._lab_attempts.get(lab.seq, 0) + 1
                self._lab_attempts[lab.seq] = attempts
                if attempts >= LAB_ATTEMPTS:  # the result itself is the trouble: set it aside, so the next cycles run without it
                    alarms["lab_result_set_aside"] = f"lab result {lab.seq} (drawn at {lab.taken_at_h:.2f} h) made the estimator fail {attempts} times: not used"
                    self.quality.commit_lab(lab.seq)
            return None, False
        if lab is not None:
            self.quality.commit_lab(lab.seq)
            self._lab_attempts.pop(lab.seq, None)
        return decision, lab is not None

    def _volume_estimate(self) -> float | None:
        return float(self.estimator.estimate.state[STATE_INDEX["volume"]]) if self.estimator is not None else None

    def _volume_readings(self, observation: CycleObservation) -> dict[str, float]:
        """Every figure the cycle has for the working volume: the safety filter feeds toward none of them beyond the limit."""
        estimate = self._volume_estimate()
        readings = {
            "PV.Volume": observation.online.get("volume_l", math.nan),
            "the estimate": estimate if estimate is not None else math.nan,
            "the volume balance": self.plausibility.expected_volume_l(observation),
        }
        return {name: value for name, value in readings.items() if math.isfinite(value)}

    def _recommendation(
        self, now_h: float, state: State, decision: Decision | None, applied: Mapping[str, float | bool] | None, observation: CycleObservation | None
    ) -> Recommendation | None:
        if decision is None or applied is None or observation is None:
            return None
        return Recommendation(
            made_at_h=now_h,
            status=RecommendationStatus.PENDING if state is State.ADVISORY else RecommendationStatus.INFORMATION,
            basis_sample_seq=self.quality.last_lab_seq,
            basis_setpoints=(observation.applied.feed_rate_lph, observation.applied.glucose_rate_lph, observation.applied.temperature_degc),
            expires_at_h=self.clock.boundary_after(now_h),
            feed_rate_lph=float(applied["feed_rate_lph"]),
            glucose_rate_lph=float(applied["glucose_rate_lph"]),
            temperature_degc=float(applied["temperature_degc"]),
            harvest_now=bool(decision.setpoints.harvest),
            harvest_time_h=float(now_h if decision.setpoints.harvest else decision.harvest_time_h),
            predicted_titer_g_per_l=float(decision.predicted_titer_g_per_l),
            predicted_score_g_per_day=float(decision.predicted_score_g_per_day),
            source=decision.source.value,
        )

    def _writes(self, now_h: float, state: State, decision: Decision | None, applied: Mapping[str, float | bool] | None) -> tuple[WriteGroup, ...]:
        values: dict[str, Value] = {"MPC.Mode": state.plc_mode}
        if decision is None or applied is None:
            return (WriteGroup(values, setpoints=False),)
        if state.writes_recommendations:
            recommended = (applied["feed_rate_lph"], applied["glucose_rate_lph"], applied["temperature_degc"])
            values.update(zip(RECOMMENDATION_SIGNALS, map(float, recommended), strict=True))
            values["MPC.Rec.HarvestTime"] = float(now_h if decision.setpoints.harvest else decision.harvest_time_h)
            if math.isfinite(decision.predicted_titer_g_per_l):
                values["MPC.Pred.HarvestTiter"] = float(decision.predicted_titer_g_per_l)
        if not state.writes_setpoints:
            return (WriteGroup(values, setpoints=False),)
        values.update({"SP.FeedRate": float(applied["feed_rate_lph"]), "SP.GlucoseRate": float(applied["glucose_rate_lph"]), "SP.Temperature": float(applied["temperature_degc"])})
        groups = [WriteGroup(values, setpoints=True)]
        if decision.setpoints.harvest:
            groups.append(WriteGroup({"SP.HarvestRequest": True}, setpoints=True))
        return tuple(groups)

    def resume_state(self, plan: CyclePlan) -> ResumeState | None:
        """The state to resume from after ``plan``'s cycle (call before :meth:`conclude`; built only when asked: it copies the estimator).

        None while no control cycle has run (fault cycles of an unusable clock only): there is nothing to resume, and a
        restart must decide afresh (a new batch, or a take-over), never resume an estimate from inoculation.
        """
        last_cycle_h = plan.process_time_h if plan.verdict.tick is Tick.CYCLE else self.clock.last_cycle_h
        if not math.isfinite(last_cycle_h):
            return None
        return ResumeState(
            batch_id=self.batch.batch_id,
            last_cycle_h=last_cycle_h,
            estimator=self.estimator.to_dict() if self.estimator is not None else {},
            lab_seq=self.quality.last_lab_seq,
            harvest_time_h=self.controller.harvest_time_h,
            requested_mode=self.modes.requested.value,
            held_contradictions=dict(self._contradictions),
            fault_cycles=self.fault_cycles,
            trust=self.controller.resume_dict(),
        )

    def _look_ahead(
        self, now_h: float, decision: Decision, state: State, status: Mapping[str, Any], recommendation: Recommendation
    ) -> tuple[dict[str, str], Recommendation, HarvestOutcome | None]:
        """Early warnings from the plan's forecast; with a screen or in advisory mode, the forecast to harvest too, and the recipe's
        outcome beside the recommendation. The recipe's outcome is also forecast for the record (the report's KPIs against the recipe)
        in closed loop without a screen, at the first cycle and at each cycle that used a lab result: about 30 ms each
        (docs/export-and-report.md), which every cycle would add to the cycle's time for little news between lab results."""
        if self.estimator is None:
            self.forecast = None
            return {}, recommendation, None
        if self._kernel is None:
            self._kernel = ForecastKernel(self.estimator)
        full = self.full_forecast or state is State.ADVISORY
        recipe = self._recipe_forecast(now_h, status) if full or self._recipe_forecast_due else None
        if recipe is not None:
            self._recipe_forecast_due = False
        if full and recipe is not None:
            recommendation = replace(recommendation, recipe_titer_g_per_l=recipe.titer_g_per_l, recipe_score_g_per_day=recipe.score_g_per_day)
        solution = decision.solution
        if solution is None:
            self.forecast = None
            return {}, recommendation, recipe
        config = self.settings.early_warning
        until_h = max(decision.harvest_time_h, now_h + config.window_h) if full else now_h + config.window_h
        try:
            # The plan as written: its glucose feed held at the ceiling this cycle's decision was held to, over the warnings' window.
            schedule = plan_schedule(solution, glucose_max_lph=self.controller.glucose_ceiling_applied_lph, limited_until_h=now_h + config.window_h)
            predicted = forecast(self.estimator, schedule, until_h=until_h, kernel=self._kernel)
        except LOOK_AHEAD_ERRORS as error:  # a failed plan or a diverged forecast: no warnings this cycle, and the log says so
            log.warning("forecast_failed", process_time_h=now_h, error=str(error), kind=type(error).__name__)
            self.forecast = None
            return {}, recommendation, recipe
        self.forecast = predicted if full else None
        warnings = {warning.code: warning.message for warning in early_warnings(predicted, self.batch, config, now_h=now_h)}
        return warnings, recommendation, recipe

    def _recipe_forecast(self, now_h: float, status: Mapping[str, Any]) -> HarvestOutcome | None:
        """The platform recipe's titer and score at its harvest, forecast from the estimate now (None from the recipe's harvest on, or when the forecast fails)."""
        if self.estimator is None or self._kernel is None or now_h >= min(self.batch.recipe.harvest_h, self.batch.limits.latest_harvest_h):
            return None
        delivered = self.batch.media.glucose_delivered_g(float(status.get("PV.FeedTotal", 0.0)), float(status.get("PV.GlucoseFeedTotal", 0.0)))
        try:
            return recipe_outcome(self.estimator, self.controller.recipe, self.batch, glucose_delivered_g=delivered, kernel=self._kernel)
        except LOOK_AHEAD_ERRORS as error:
            log.warning("recipe_forecast_failed", process_time_h=now_h, error=str(error), kind=type(error).__name__)
            return None


def _with_recipe_forecast(estimate: dict[str, Any], recipe: HarvestOutcome | None) -> dict[str, Any]:
    """The cycle's estimate with what it forecasts for the recipe (``recipe_forecast``), when there is such a forecast.

    Kept in the estimate (the history's ``cycles.estimate``) because it is a forecast from that estimate, and so covered by the row's MAC
    without a new column; docs/export-and-report.md.
    """
    if recipe is None:
        return estimate
    return estimate | {
        "recipe_forecast": {
            "harvest_time_h": recipe.harvest_time_h,
            "titer_g_per_l": recipe.titer_g_per_l,
            "titer_sd_g_per_l": recipe.titer_sd_g_per_l,
            "score_g_per_day": recipe.score_g_per_day,
            "score_sd_g_per_day": recipe.score_sd_g_per_day,
        }
    }
