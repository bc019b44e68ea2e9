"""The runtime beside the PLC: one cycle whenever the batch clock crosses a cycle boundary, for the whole batch.

A cycle (docs/runtime.md):

read every tag → data-quality checks (:mod:`controller.quality`) → the mode
machine decides the state (:mod:`controller.modes`) → estimator and NMPC
(:class:`~controller.nmpc.NmpcController`) → safety filter against what the
PLC runs now → writes for the state (setpoints in closed loop while remote is
enabled; ``MPC.Rec.*`` in advisory, held and closed loop; ``MPC.Mode``) →
history → ``MPC.Heartbeat``.

The cycle runs when ``Status.ProcessTime`` reaches the next multiple of the
cycle period, so the same code runs a real PLC on the wall clock and a
simulated one in lockstep. The runtime talks to the PLC only through a
:class:`~controller.ports.PlcPort` and records through a
:class:`~controller.ports.HistoryStore`; it cannot tell OPC UA from Modbus.

Link loss: the runtime drops to ``fault``, raises an alarm, writes nothing,
and reconnects with a bounded exponential backoff. A write is never retried;
the next cycle reads the PLC again and decides afresh.

Restart: the estimator's state, the last lab result used and the planned
harvest are committed with every cycle. A runtime started on a batch it has
history for resumes from there, re-reads the PLC, and runs its next cycle at
the next boundary from fresh readings: it never re-sends setpoints computed
before it stopped. Bumpless start: setpoints are always filtered against what
the PLC reads back now, so the first written ones start from what the PLC is
running.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import structlog

from controller.advisory import ApprovalRefusedError, Meaning, Recommendation, RecommendationStatus, Signature, Signer, now_utc
from controller.config import BatchConfig
from controller.estimator import ExtendedKalmanEstimator
from controller.forecast import Forecast, ForecastKernel, early_warnings, forecast, plan_schedule, recipe_outcome
from controller.modes import Conditions, ModeMachine, RequestedMode, State, StateChange
from controller.mpc import EconomicMpc
from controller.nmpc import CycleObservation, Decision, NmpcController
from controller.ports import AuditLog, CycleRecord, HistoryStore, PlcLinkError, PlcPort, PlcWriteMismatchError, PlcWriteRefusedError, Reading, ResumeState, Value
from controller.quality import SETPOINT_SIGNALS, DataQualityChecker
from controller.runtime_config import RuntimeSettings
from controller.safety import filter_setpoints
from controller.types import PHASE_HARVESTED, PHASE_IDLE, PHASE_RUNNING, UINT32_MAX
from plant_models.cho import STATES, CultureModel
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

TIME_TOLERANCE_H = 1e-6
RECOMMENDATION_SIGNALS = ("MPC.Rec.FeedRate", "MPC.Rec.GlucoseRate", "MPC.Rec.Temperature")
AUTO_APPROVER = Signer("auto-approver", "Automatic approver (lockstep tests and demos only)", "operator")


class RuntimeStartError(BioreactorMPCError, RuntimeError):
    """The runtime cannot start on this PLC with this history (wrong batch, history ahead of the PLC)."""


@dataclass(frozen=True)
class CycleReport:
    """What one cycle did, for a live display."""

    record: CycleRecord
    problems: Mapping[str, str]
    alarms: tuple[str, ...]


@dataclass
class RunSummary:
    cycles: int = 0
    end_reason: str = ""
    last_process_time_h: float = math.nan
    states: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    writes_ok: int = 0
    writes_failed: int = 0
    link_losses: int = 0
    solve_times_s: list[float] = field(default_factory=list)
    cycle_times_s: list[float] = field(default_factory=list)
    """Wall time of each cycle, from its read to its heartbeat."""
    resumed_from_h: float | None = None


def _estimate_summary(estimator: ExtendedKalmanEstimator) -> dict[str, Any]:
    estimate = estimator.estimate
    names = [s.name for s in STATES]
    return {
        "state": dict(zip(names, map(float, estimate.state), strict=True)),
        "sd": dict(zip(names, map(float, estimate.state_sd), strict=True)),
        "multipliers": {k: float(v) for k, v in estimate.multipliers.items()},
    }


class Runtime:
    """One batch beside one PLC."""

    def __init__(
        self,
        *,
        port: PlcPort,
        history: HistoryStore,
        batch: BatchConfig,
        nominal_parameters: np.ndarray,
        settings: RuntimeSettings,
        model: CultureModel | None = None,
        mpc: EconomicMpc | None = None,
        on_cycle: Callable[[CycleReport], None] | None = None,
        audit: AuditLog | None = None,
        mode_override: RequestedMode | None = None,
    ) -> None:
        self.port = port
        self.history = history
        self.batch = batch
        self.settings = settings
        self._model = model or CultureModel()
        self._nominal = np.asarray(nominal_parameters, dtype=float)
        self._mpc = mpc or EconomicMpc(self._model, batch, settings.nmpc.mpc)
        self._on_cycle = on_cycle
        self.modes = ModeMachine(settings.mode, max_write_failures=settings.max_write_failures)
        self.quality = DataQualityChecker(settings.quality)
        self.estimator: ExtendedKalmanEstimator | None = None
        self.controller: NmpcController | None = None
        self.summary = RunSummary()
        self._alarms: dict[str, str] = {}
        self._heartbeat = 0
        self._write_failures = 0
        self._fault_cycles = 0
        self._next_cycle_h = 0.0
        self._last_time_h = math.nan
        self._link_up = False
        self._read_time_s = math.nan
        self._write_time_s = 0.0
        self._started = False
        self._io = asyncio.Lock()
        self._audit = audit
        self._audit_problem: str | None = None
        self._mode_override = mode_override
        self._mode_source = "config"
        self.recommendation: Recommendation | None = None
        self.last_report: CycleReport | None = None
        self.forecast: Forecast | None = None
        """The plan's forecast to harvest with its uncertainty (computed when the screen is served or in advisory mode)."""
        self._kernel: ForecastKernel | None = None

    # ------------------------------------------------------------------ the loop

    async def run(self, *, stop: asyncio.Event | None = None) -> RunSummary:
        """Run until the batch is harvested (or ``stop`` is set); returns what happened."""
        stop = stop or asyncio.Event()
        backoff_s = self.settings.reconnect_initial_s
        try:
            while not stop.is_set():
                async with self._io:  # one PLC conversation at a time: a cycle, or an operator's approval
                    outcome = await self._poll()
                if outcome == "ended":
                    break
                if outcome == "link_down":
                    await _sleep_or_stop(stop, backoff_s)
                    backoff_s = min(2.0 * backoff_s, self.settings.reconnect_max_s)
                    continue
                backoff_s = self.settings.reconnect_initial_s
                if outcome == "waiting":
                    await _sleep_or_stop(stop, self.settings.poll_interval_s)
            else:
                self.summary.end_reason = self.summary.end_reason or "stopped"
        finally:
            try:
                if self._started:
                    self.history.end_run(reason=self.summary.end_reason or "interrupted")
            finally:
                await self.port.close()
        log.info("runtime_ended", reason=self.summary.end_reason, cycles=self.summary.cycles, process_time_h=self.summary.last_process_time_h)
        return self.summary

    async def _poll(self) -> str:
        """Read the PLC once and run the cycle if the batch clock says so: ``ended``, ``link_down``, ``cycled`` or ``waiting``."""
        try:
            if not self.port.connected:
                await self.port.connect()
            read_started = time.perf_counter()
            readings = await self.port.read()
            self._read_time_s = time.perf_counter() - read_started
        except PlcLinkError as error:
            self._link_lost(error)
            return "link_down"
        if not self._link_up:
            self._link_restored()
        if not self._started:
            try:
                await self._start(readings)
            except PlcLinkError as error:  # the start is tried again with the next reading
                self._link_lost(error)
                return "link_down"
            self._started = True
        phase = readings["Status.Phase"]
        if phase.good and int(phase.value) == PHASE_HARVESTED:  # type: ignore[arg-type]
            self.summary.end_reason = "batch harvested"
            self._expire_recommendation()
            return "ended"
        if phase.good and int(phase.value) == PHASE_IDLE:  # type: ignore[arg-type]
            return "waiting"  # not inoculated yet: nothing to control
        now_h = _process_time_h(readings)
        if not (math.isfinite(now_h) and now_h >= self._next_cycle_h - TIME_TOLERANCE_H):
            return "waiting"
        started = time.perf_counter() - self._read_time_s
        try:
            await self._cycle(readings, now_h)
        except PlcLinkError as error:
            self._link_lost(error)
            return "link_down"
        self.summary.cycle_times_s.append(time.perf_counter() - started)
        return "cycled"

    async def _start(self, readings: Mapping[str, Reading]) -> None:
        """Check the PLC runs our batch, resume from the history if it has this batch, and take over the heartbeat."""
        batch_id = readings["Status.BatchId"]
        if not batch_id.good or str(batch_id.value) != self.batch.batch_id:
            raise RuntimeStartError(
                f"the PLC runs batch {batch_id.value!r} (status {'Good' if batch_id.good else 'Bad'}) but this runtime is configured for "
                f"{self.batch.batch_id!r}; nothing written"
            )
        heartbeat = readings["MPC.Heartbeat"]
        self._heartbeat = int(heartbeat.value) if heartbeat.good else 0  # type: ignore[arg-type]
        if self.settings.auto_approve and not (readings.get("Sim.Lockstep") is not None and readings["Sim.Lockstep"].value is True):
            raise RuntimeStartError("auto_approve is for simulated PLCs in lockstep only (Sim.Lockstep is not true); nothing written")
        resume = self.history.load_resume(self.batch.batch_id)
        now_h = _process_time_h(readings)
        if resume is not None and math.isfinite(now_h) and resume.last_cycle_h > now_h + TIME_TOLERANCE_H:
            raise RuntimeStartError(
                f"the history has batch {resume.batch_id} up to {resume.last_cycle_h:.2f} h but the PLC's batch clock reads {now_h:.2f} h: "
                "a new batch with a reused id? Start with a new history file; nothing written"
            )
        self._choose_mode(resume)
        self.history.start_run(batch_id=self.batch.batch_id, requested_mode=self.modes.requested.value, config=self.settings.model_dump(mode="json"))
        if resume is None:
            self.estimator = ExtendedKalmanEstimator.from_batch(self._model, self.batch, self._nominal, self.settings.estimator)
            self._next_cycle_h = 0.0
        else:
            self.estimator = ExtendedKalmanEstimator.from_dict(resume.estimator, self._model)
            self.quality.commit_lab(resume.lab_seq)
            totalisers = resume.estimator.get("totalisers") or {}
            for signal, key in (("PV.FeedTotal", "feed_total_l"), ("PV.GlucoseFeedTotal", "glucose_feed_total_l")):
                if key in totalisers:
                    self.quality.expect_at_least(signal, float(totalisers[key]))  # a totaliser reset while away is a critical input, not a crash
            self._next_cycle_h = self._boundary_after(resume.last_cycle_h)
            self.summary.resumed_from_h = resume.last_cycle_h
            log.info("runtime_resumed", batch_id=resume.batch_id, last_cycle_h=resume.last_cycle_h, next_cycle_h=self._next_cycle_h, process_time_h=now_h)
        self.controller = NmpcController(self._model, self.batch, self.estimator, self.settings.nmpc, mpc=self._mpc)
        if resume is not None:
            self.controller.harvest_time_h = resume.harvest_time_h
            if math.isfinite(now_h) and now_h < self._next_cycle_h - TIME_TOLERANCE_H:
                # The cycle of this boundary was done before the restart; its heartbeat may not have gone out.
                await self._beat(resume.last_cycle_h)
        settings = self.settings.model_dump(mode="json")
        configuration = {
            "settings_sha256": _sha256(settings),
            "batch_sha256": _sha256(self.batch.model_dump(mode="json")),
            "nominal_parameters_sha256": _sha256(self._nominal.tolist()),
            "mode": self.modes.requested.value,
            "mode_from": self._mode_source,
            "auto_approve": self.settings.auto_approve,
            "resumed_from_h": self.summary.resumed_from_h,
        }
        if not self._audited(now_h, actor="runtime", action="config_loaded", subject=self.batch.batch_id, details=configuration):
            raise RuntimeStartError(f"the audit trail cannot be written ({self._audit_problem}); the runtime does not start")
        if self.settings.auto_approve:
            log.warning("auto_approve_enabled", reason="every advisory recommendation is approved at once: lockstep tests and demos only")
        log.info("runtime_started", batch_id=self.batch.batch_id, mode=self.modes.requested.value, heartbeat=self._heartbeat, first_cycle_h=self._next_cycle_h)

    def _choose_mode(self, resume: ResumeState | None) -> None:
        """The requested mode: the command line's, else the one in force when the runtime stopped, else the config's."""
        if self._mode_override is not None:
            mode, self._mode_source = self._mode_override, "command line"
        elif resume is not None and resume.requested_mode is not None:
            mode, self._mode_source = RequestedMode(resume.requested_mode), "history (in force when the runtime stopped)"
        else:
            mode, self._mode_source = self.settings.mode, "config"
        if mode is not self.modes.requested:
            log.warning("mode_restored", requested=mode.value, config=self.settings.mode.value, source=self._mode_source)
        self.modes.requested = mode

    def _boundary_after(self, t_h: float) -> float:
        period = self.batch.cycle_period_h
        return (math.floor(t_h / period + TIME_TOLERANCE_H) + 1) * period

    # ------------------------------------------------------------------ one cycle

    async def _cycle(self, readings: Mapping[str, Reading], now_h: float) -> None:
        if self.controller is None or self.estimator is None:
            raise RuntimeError("a cycle ran before the runtime started")
        report = self.quality.check(readings, wall_now=datetime.now(UTC))
        self.history.record_scan(now_h, readings, report.problems)
        self._last_time_h = now_h
        status = report.accepted
        change = self.modes.evaluate(
            Conditions(
                link_up=True,
                critical_failures=report.critical,
                write_failures=self._write_failures,
                batch_running=status.get("Status.Phase") == PHASE_RUNNING,
                remote_enabled=bool(status.get("Status.RemoteEnabled", False)),
                watchdog_tripped=bool(status.get("Status.WatchdogTripped", False)),
            )
        )
        self._record_change(now_h, change)
        state = self.modes.state
        self._fault_cycles = self._fault_cycles + 1 if state is State.FAULT else 0
        if state is State.FAULT and self._write_failures >= self.settings.max_write_failures and self._fault_cycles >= self.settings.write_retry_cycles:
            self._write_failures = self.settings.max_write_failures - 1  # one more try next cycle; one more failure and back here
        alarms = {f"quality.{signal}": problem for signal, problem in report.problems.items()}
        if status.get("Status.WatchdogTripped"):
            alarms["plc_watchdog"] = "the PLC's watchdog tripped: it runs its local recipe"

        decision: Decision | None = None
        observation: CycleObservation | None = None
        applied: dict[str, float | bool] | None = None
        adjustments: tuple[str, ...] = ()
        wrote_setpoints = False
        if report.usable:
            observation = report.observation()
            try:
                decision = await asyncio.to_thread(self.controller.cycle, observation)
            except BioreactorMPCError as error:  # the estimator refused the data (diverged, inconsistent inputs): no plan this cycle
                log.error("cycle_failed", process_time_h=now_h, error=str(error))
                alarms["estimator_failed"] = f"the estimator refused this cycle's data: {error}"
                self._record_change(now_h, self.modes.evaluate(Conditions(link_up=True, critical_failures=(f"estimator: {type(error).__name__}",))))
                state = self.modes.state
            if report.lab_result is not None:
                self.history.record_lab(now_h, report.lab_result, used=decision is not None)
                self.quality.commit_lab(report.lab_result.seq)
        elif report.lab_result is not None:
            self.history.record_lab(now_h, report.lab_result, used=False)
        if decision is not None and observation is not None:
            if decision.source in ("shifted_plan", "recipe"):
                alarms["solver_fallback"] = f"the MPC failed; running the {decision.source.replace('_', ' ')}"
            filtered = filter_setpoints(
                decision.setpoints,
                observation.applied,
                self.batch,
                temperature_rate_degc_per_h=self.settings.nmpc.mpc.temperature_rate_max_degc_per_h,
                dt_h=self.batch.cycle_period_h,
            )
            adjustments = filtered.adjustments
            if adjustments:
                log.info("setpoints_filtered", process_time_h=now_h, adjustments=list(adjustments))
            applied = filtered.setpoints.as_dict()
        self._expire_recommendation()
        if decision is not None and applied is not None and observation is not None:
            self.recommendation = Recommendation(
                made_at_h=now_h,
                status=RecommendationStatus.PENDING if state is State.ADVISORY else RecommendationStatus.INFORMATION,
                basis_sample_seq=self.quality.last_lab_seq,
                basis_setpoints=(observation.applied.feed_rate_lph, observation.applied.glucose_rate_lph, observation.applied.temperature_degc),
                expires_at_h=self._boundary_after(now_h),
                feed_rate_lph=float(applied["feed_rate_lph"]),
                glucose_rate_lph=float(applied["glucose_rate_lph"]),
                temperature_degc=float(applied["temperature_degc"]),
                harvest_now=bool(decision.setpoints.harvest),
                harvest_time_h=float(now_h if decision.setpoints.harvest else decision.harvest_time_h),
                predicted_titer_g_per_l=float(decision.predicted_titer_g_per_l),
                predicted_score_g_per_day=float(decision.predicted_score_g_per_day),
                source=decision.source,
            )
        if decision is not None and applied is not None and self.recommendation is not None:
            alarms.update(self._look_ahead(now_h, decision, state, report.accepted))
        link_error: PlcLinkError | None = None
        self._write_time_s = 0.0
        try:
            if decision is not None and applied is not None:
                wrote_setpoints = await self._write_outputs(now_h, state, decision, applied)
                plc_accepts = status.get("Status.RemoteEnabled") is True and status.get("Status.WatchdogTripped") is False
                if state is State.ADVISORY and self.settings.auto_approve and self.recommendation is not None and plc_accepts:
                    try:
                        wrote_setpoints = await self._sign(self.recommendation, AUTO_APPROVER, Meaning.APPROVED, "automatic approval (lockstep tests and demos)", now_h)
                    except ApprovalRefusedError as error:
                        log.warning("auto_approval_refused", process_time_h=now_h, reason=str(error))
            else:
                await self._write(now_h, {"MPC.Mode": state.plc_mode})
        except PlcLinkError as error:
            link_error = error  # the estimator has seen this cycle: it is recorded, then the link is handled
        if self._write_failures:
            alarms["write_failed"] = f"{self._write_failures} setpoint writes in a row failed"
        if self._audit_problem is not None:
            alarms["audit_unavailable"] = self._audit_problem
        self._update_alarms(now_h, alarms)

        record = CycleRecord(
            process_time_h=now_h,
            state=state.value,
            reason=self.modes.reason,
            source=decision.source if decision is not None else "none",
            requested=decision.setpoints.as_dict() if decision is not None else None,
            applied=applied,
            adjustments=adjustments,
            harvest_time_h=decision.harvest_time_h if decision is not None else math.nan,
            predicted_titer_g_per_l=decision.predicted_titer_g_per_l if decision is not None else math.nan,
            predicted_score_g_per_day=decision.predicted_score_g_per_day if decision is not None else math.nan,
            solve_time_s=decision.solve_time_s if decision is not None else math.nan,
            estimate=_estimate_summary(self.estimator),
            wrote_setpoints=wrote_setpoints,
            read_time_s=self._read_time_s,
            write_time_s=self._write_time_s,
        )
        resume = ResumeState(
            batch_id=self.batch.batch_id,
            last_cycle_h=now_h,
            estimator=self.estimator.to_dict(),
            lab_seq=self.quality.last_lab_seq,
            harvest_time_h=self.controller.harvest_time_h,
            requested_mode=self.modes.requested.value,
        )
        self.history.commit_cycle(record, resume)
        self._count(record, decision)
        self._next_cycle_h = self._boundary_after(now_h)
        self.last_report = CycleReport(record, report.problems, tuple(sorted(self._alarms)))
        if self._on_cycle is not None:
            self._on_cycle(self.last_report)
        if link_error is not None:
            raise link_error
        hand_over = self.settings.fault_hand_over_cycles
        if state is State.FAULT and hand_over is not None and self._fault_cycles >= hand_over:
            if self._fault_cycles == hand_over:
                log.warning("heartbeat_withheld", process_time_h=now_h, reason=self.modes.reason, fault_cycles=self._fault_cycles)
                self._audited(now_h, actor="runtime", action="heartbeat_withheld", subject="MPC.Heartbeat", details={"reason": self.modes.reason})
            return  # the PLC's watchdog will hand control to its local recipe
        await self._beat(now_h)

    async def _write_outputs(self, now_h: float, state: State, decision: Decision, applied: Mapping[str, float | bool]) -> bool:
        """The writes of this state; whether setpoints were written and verified."""
        values: dict[str, Value] = {"MPC.Mode": state.plc_mode}
        if state.writes_recommendations:
            recommended = (applied["feed_rate_lph"], applied["glucose_rate_lph"], applied["temperature_degc"])
            values.update(zip(RECOMMENDATION_SIGNALS, map(float, recommended), strict=True))
            values["MPC.Rec.HarvestTime"] = float(now_h if decision.setpoints.harvest else decision.harvest_time_h)
            if math.isfinite(decision.predicted_titer_g_per_l):
                values["MPC.Pred.HarvestTiter"] = float(decision.predicted_titer_g_per_l)
        if not state.writes_setpoints:
            await self._write(now_h, values)
            if state is not State.FAULT:
                self._write_failures = 0  # held, advisory or off: the failures were about closed loop
            return False
        values.update({"SP.FeedRate": float(applied["feed_rate_lph"]), "SP.GlucoseRate": float(applied["glucose_rate_lph"]), "SP.Temperature": float(applied["temperature_degc"])})
        ok = await self._write(now_h, values)
        if ok and decision.setpoints.harvest:
            log.info("harvest_requested", process_time_h=now_h, predicted_titer_g_per_l=decision.predicted_titer_g_per_l)
            ok = await self._write(now_h, {"SP.HarvestRequest": True})
        self._write_failures = 0 if ok else self._write_failures + 1
        return ok

    async def _write(self, now_h: float, values: Mapping[str, Value], *, actor: str = "runtime") -> bool:
        """One write request, recorded whatever its outcome; never retried. A lost link propagates.

        A setpoint write is recorded in the audit trail first; if that record
        cannot be written, the write is refused (not sent).
        """
        setpoints = {name: value for name, value in values.items() if name.startswith("SP.")}
        if setpoints and not self._audited(now_h, actor=actor, action="setpoint_write", subject="SP.*", details=setpoints):
            self.history.record_write(now_h, values, "refused", "the audit record could not be written; nothing sent")
            self.summary.writes_failed += 1
            return False
        started = time.perf_counter()
        try:
            await self.port.write(values)
        except (PlcWriteRefusedError, PlcWriteMismatchError, PlcLinkError) as error:
            self._write_time_s += time.perf_counter() - started
            self.summary.writes_failed += 1
            outcome = "link_error" if isinstance(error, PlcLinkError) else "refused" if isinstance(error, PlcWriteRefusedError) else "mismatch"
            self.history.record_write(now_h, values, outcome, str(error))
            if setpoints:
                self._audited(now_h, actor=actor, action="setpoint_write_result", subject="SP.*", details={"outcome": outcome, "detail": str(error)})
            if isinstance(error, PlcLinkError):
                raise
            if isinstance(error, PlcWriteRefusedError):
                log.warning("write_refused", process_time_h=now_h, refusals=error.refusals)
            else:
                log.error("write_mismatch", process_time_h=now_h, error=str(error))
            return False
        self._write_time_s += time.perf_counter() - started
        self.history.record_write(now_h, values, "ok")
        if setpoints:
            self._audited(now_h, actor=actor, action="setpoint_write_result", subject="SP.*", details={"outcome": "ok"})
        self.summary.writes_ok += 1
        return True

    async def _beat(self, now_h: float) -> None:
        self._heartbeat = (self._heartbeat + 1) & UINT32_MAX
        await self._write(now_h, {"MPC.Heartbeat": self._heartbeat})

    # ------------------------------------------------------------------ the operator (advisory mode)

    def view(self) -> dict[str, Any]:
        """What the operator screen shows now, as JSON-compatible data."""
        report = self.last_report
        estimate = _estimate_summary(self.estimator) if self.estimator is not None else None
        return {
            "batch_id": self.batch.batch_id,
            "process_time_h": self._last_time_h if math.isfinite(self._last_time_h) else None,
            "next_cycle_h": self._next_cycle_h,
            "state": self.modes.state.value,
            "reason": self.modes.reason,
            "requested_mode": self.modes.requested.value,
            "link_up": self._link_up,
            "data_quality": dict(report.problems) if report is not None else {},
            "alarms": dict(self._alarms),
            "recommendation": self.recommendation.as_dict() if self.recommendation is not None else None,
            "estimate": estimate,
            "cycles": self.summary.cycles,
            "decisions": dict(self.summary.decisions),
        }

    async def approve(self, made_at_h: float, *, signer: Signer, reason: str) -> Recommendation:
        """Sign and apply the current recommendation: its setpoints are written now, while remote is enabled."""
        return await self._operator_sign(made_at_h, signer, Meaning.APPROVED, reason)

    async def reject(self, made_at_h: float, *, signer: Signer, reason: str) -> Recommendation:
        """Sign a rejection of the current recommendation; nothing is written to the PLC."""
        return await self._operator_sign(made_at_h, signer, Meaning.REJECTED, reason)

    def request_mode(self, mode: RequestedMode, *, user: str, reason: str) -> None:
        """Change the requested mode (it takes effect at the next cycle); refused if the audit record cannot be written."""
        if not reason.strip():
            raise ApprovalRefusedError("a mode change needs a reason")
        details = {"from": self.modes.requested.value, "to": mode.value, "reason": reason}
        if not self._audited(self._last_time_h, actor=user, action="mode_requested", subject="mode", details=details):
            raise ApprovalRefusedError("the audit record could not be written; the mode is unchanged")
        self.modes.request(mode)

    async def _operator_sign(self, made_at_h: float, signer: Signer, meaning: Meaning, reason: str) -> Recommendation:
        if not reason.strip():
            raise ApprovalRefusedError(f"a signature ({meaning.value}) needs a reason")
        async with self._io:
            current = self.recommendation
            if current is None or abs(current.made_at_h - made_at_h) > TIME_TOLERANCE_H:
                raise ApprovalRefusedError(f"the recommendation made at {made_at_h:.2f} h is not the current one: it has expired")
            if current.status is RecommendationStatus.INFORMATION:
                raise ApprovalRefusedError(f"the recommendation made at {made_at_h:.2f} h was made in {self.modes.state.value}, not advisory: nothing to sign")
            if current.status is not RecommendationStatus.PENDING:
                raise ApprovalRefusedError(f"the recommendation made at {made_at_h:.2f} h is already {current.status.value}")
            if self.modes.state is not State.ADVISORY or self.modes.requested is not RequestedMode.ADVISORY:
                raise ApprovalRefusedError(f"signatures apply in advisory mode; the runtime is {self.modes.state.value}, {self.modes.requested.value} requested")
            try:
                readings = await self.port.read()
            except PlcLinkError as error:
                raise ApprovalRefusedError(f"the PLC cannot be read, nothing written: {error}") from error
            now_h, remote = _process_time_h(readings), readings["Status.RemoteEnabled"]
            if not math.isfinite(now_h) or now_h >= current.expires_at_h - TIME_TOLERANCE_H:
                self._expire_recommendation()
                raise ApprovalRefusedError(f"the recommendation made at {made_at_h:.2f} h has expired: the batch clock reads {now_h:.2f} h")
            moved = self._moved_on(current, readings)
            if moved:
                self._expire_recommendation()
                raise ApprovalRefusedError(f"the recommendation made at {made_at_h:.2f} h has expired: {moved}")
            if meaning is Meaning.APPROVED and not (remote.good and remote.value is True):
                raise ApprovalRefusedError("the PLC does not accept setpoints (Status.RemoteEnabled is false); nothing written")
            try:
                await self._sign(current, signer, meaning, reason, now_h)
            except PlcLinkError as error:
                self._link_lost(error)
                raise ApprovalRefusedError(f"the PLC link failed during the write; read the PLC before acting again: {error}") from error
            return self.recommendation  # type: ignore[return-value]

    async def _sign(self, recommendation: Recommendation, signer: Signer, meaning: Meaning, reason: str, now_h: float) -> bool:
        """Record the signature (refused if it cannot be), then, for an approval, write its setpoints; whether they were written."""
        signature = Signature(signer, meaning, reason, now_utc(), recommendation.made_at_h)
        details = {"signature": signature.as_dict(), "recommendation": recommendation.as_dict()}
        subject = f"recommendation made at {recommendation.made_at_h:.2f} h"
        if not self._audited(now_h, actor=signer.name, action=f"recommendation_{meaning.value}", subject=subject, details=details):
            raise ApprovalRefusedError("the signature could not be recorded in the audit trail; nothing done")
        self.recommendation = recommendation.signed(signature)
        log.info("recommendation_signed", meaning=meaning.value, signer=signer.name, made_at_h=recommendation.made_at_h, reason=reason)
        if meaning is not Meaning.APPROVED:
            return False
        written = await self._write(now_h, recommendation.setpoint_values(), actor=signer.name)
        if written and recommendation.harvest_now:
            written = await self._write(now_h, {"SP.HarvestRequest": True}, actor=signer.name)
        if not written:
            raise ApprovalRefusedError("the approval is recorded but the PLC refused the setpoints; see the history's writes")
        return True

    def _look_ahead(self, now_h: float, decision: Decision, state: State, status: Mapping[str, Any]) -> dict[str, str]:
        """Early warnings from the plan's forecast; with a screen or in advisory mode, the forecast to harvest and the recipe's outcome too."""
        estimator, controller, solution = self.estimator, self.controller, decision.solution
        if estimator is None or controller is None or solution is None:
            return {}
        config = self.settings.early_warning
        full = self.settings.screen is not None or state is State.ADVISORY
        until_h = max(decision.harvest_time_h, now_h + config.window_h) if full else now_h + config.window_h
        if self._kernel is None:
            self._kernel = ForecastKernel(estimator)
        try:
            predicted = forecast(estimator, plan_schedule(solution), until_h=until_h, kernel=self._kernel)
        except BioreactorMPCError as error:  # a failed plan or a diverged forecast: no warnings this cycle, and the log says so
            log.warning("forecast_failed", process_time_h=now_h, error=str(error))
            self.forecast = None
            return {}
        self.forecast = predicted if full else None
        if full and self.recommendation is not None and now_h < min(self.batch.recipe.harvest_h, self.batch.limits.latest_harvest_h):
            delivered = self.batch.media.glucose_delivered_g(float(status.get("PV.FeedTotal", 0.0)), float(status.get("PV.GlucoseFeedTotal", 0.0)))
            try:
                recipe = recipe_outcome(estimator, controller.recipe, self.batch, glucose_delivered_g=delivered, kernel=self._kernel)
            except BioreactorMPCError as error:
                log.warning("recipe_forecast_failed", process_time_h=now_h, error=str(error))
            else:
                self.recommendation = replace(self.recommendation, recipe_titer_g_per_l=recipe.titer_g_per_l, recipe_score_g_per_day=recipe.score_g_per_day)
        return {warning.code: warning.message for warning in early_warnings(predicted, self.batch, config, now_h=now_h)}

    @staticmethod
    def _moved_on(recommendation: Recommendation, readings: Mapping[str, Reading]) -> str:
        """Why the data a recommendation was computed from has moved on ('' if it has not): a new lab result, other setpoints at the PLC."""
        seq = readings.get("Sample.Seq")
        if seq is not None and seq.good and int(seq.value) != recommendation.basis_sample_seq:  # type: ignore[arg-type]
            return f"a new lab result (Sample.Seq {seq.value}) arrived since"
        for signal, basis in zip(SETPOINT_SIGNALS, recommendation.basis_setpoints, strict=True):
            reading = readings.get(signal)
            if reading is None or not reading.good or not math.isclose(float(reading.value), basis, rel_tol=1e-6, abs_tol=1e-6):  # type: ignore[arg-type]
                return f"the PLC's {signal} changed since (now {reading.value if reading is not None else None!r}, was {basis:.6g})"
        return ""

    def _expire_recommendation(self) -> None:
        if self.recommendation is not None and self.recommendation.status is RecommendationStatus.PENDING:
            self.recommendation = self.recommendation.expired()

    def _audited(self, now_h: float, *, actor: str, action: str, subject: str, details: Mapping[str, Any]) -> bool:
        """Append to the audit trail; False (with an alarm) when it cannot be written. No audit trail configured: True."""
        if self._audit is None:
            return True
        try:
            self._audit.append(actor=actor, action=action, subject=subject, details=details, process_time_h=now_h if math.isfinite(now_h) else None)
        except BioreactorMPCError as error:
            log.error("audit_write_failed", action=action, error=str(error))
            self._audit_problem = f"the audit trail cannot be written ({action} refused): {error}"
            return False
        self._audit_problem = None
        return True

    # ------------------------------------------------------------------ bookkeeping

    def _count(self, record: CycleRecord, decision: Decision | None) -> None:
        summary = self.summary
        summary.cycles += 1
        summary.last_process_time_h = record.process_time_h
        summary.states[record.state] = summary.states.get(record.state, 0) + 1
        summary.decisions[record.source] = summary.decisions.get(record.source, 0) + 1
        if decision is not None and math.isfinite(record.solve_time_s):
            summary.solve_times_s.append(record.solve_time_s)

    def _record_change(self, now_h: float, change: StateChange | None) -> None:
        if change is not None:
            self.history.record_state_change(now_h, change.previous.value, change.state.value, change.reason)
            details = {"from": change.previous.value, "to": change.state.value, "reason": change.reason, "requested": self.modes.requested.value}
            self._audited(now_h, actor="runtime", action="state_changed", subject="state", details=details)

    def _update_alarms(self, now_h: float, current: Mapping[str, str]) -> None:
        """Raise the alarms that are new and clear the ones that are gone, each once, in the log and the history."""
        for code, message in current.items():
            if code not in self._alarms:
                log.warning("alarm_raised", code=code, message=message, process_time_h=now_h)
                self.history.record_alarm(now_h, code, message, active=True)
                self._audited(now_h, actor="runtime", action="alarm_raised", subject=code, details={"message": message})
        for code in [c for c in self._alarms if c not in current and c != "plc_link"]:
            log.info("alarm_cleared", code=code, process_time_h=now_h)
            message = self._alarms.pop(code)
            self.history.record_alarm(now_h, code, message, active=False)
            self._audited(now_h, actor="runtime", action="alarm_cleared", subject=code, details={"message": message})
        self._alarms.update(current)

    def _link_lost(self, error: PlcLinkError) -> None:
        if self._link_up or "plc_link" not in self._alarms:
            self.summary.link_losses += 1
            message = f"PLC link lost: {error}"
            log.error("alarm_raised", code="plc_link", message=message, process_time_h=self._last_time_h)
            self._alarms["plc_link"] = message
            if self._history_ready():
                self.history.record_alarm(self._last_time_h, "plc_link", message, active=True)
                self._audited(self._last_time_h, actor="runtime", action="alarm_raised", subject="plc_link", details={"message": message})
                self._record_change(self._last_time_h, self.modes.evaluate(Conditions(link_up=False)))
            else:
                self.modes.evaluate(Conditions(link_up=False))
        self._link_up = False

    def _link_restored(self) -> None:
        self._link_up = True
        if "plc_link" in self._alarms:
            message = self._alarms.pop("plc_link")
            log.info("alarm_cleared", code="plc_link", process_time_h=self._last_time_h)
            if self._history_ready():
                self.history.record_alarm(self._last_time_h, "plc_link", message, active=False)
                self._audited(self._last_time_h, actor="runtime", action="alarm_cleared", subject="plc_link", details={"message": message})

    def _history_ready(self) -> bool:
        return self.controller is not None


def _process_time_h(readings: Mapping[str, Reading]) -> float:
    """The batch clock of a scan; NaN when it is Bad or not a number."""
    clock = readings["Status.ProcessTime"]
    if not clock.good or isinstance(clock.value, str):
        return math.nan
    return float(clock.value)


def _sha256(data: Any) -> str:
    """A digest of JSON-compatible data, to see in the audit trail when a configuration or a model changed."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
