"""The runtime beside the PLC: a thin async shell that moves data between the PLC, the control cycle, the history and the audit trail.

The cycle itself (checks, state, estimator, NMPC, safety filter, what to
write) is :class:`controller.cycle.ControlCycle`, which does no I/O; the same
object runs the in-process closed loop. This shell:

- polls the PLC and asks the batch clock (:mod:`controller.clock`) whether a
  cycle is due; reconnects with a bounded exponential backoff (minutes after
  the PLC refused the credentials or certificate: a real PLC locks accounts);
- starts once (:mod:`controller.takeover`: new batch, resume, or an engineer's
  signed take-over), after watching ``MPC.Heartbeat`` for another runtime;
  reconciles the writes a killed predecessor left without an outcome;
- follows the PLC from batch to batch when the batch file is a template (no
  ``batch_id``): a run per batch, each with a fresh estimator, trust region,
  recipe, clock and data checks, started when ``Status.BatchId`` names a new
  batch and ``Status.Phase`` says it runs, ended at harvest (or when the PLC
  names another batch); a batch whose inoculation contradicts the template is
  refused with an alarm, writing nothing, until the next one. A pinned batch
  file runs that batch only, and the runtime ends at its harvest;
- runs a cycle: records the scan, the lab result and the state changes, and
  commits the state to resume from *before* the writes; every write is
  recorded as an intent first, setpoint writes in the audit trail too (no
  record, no write); then records the cycle, raises and clears alarms, and
  moves the heartbeat last;
- when the history cannot be written (disk full, read-only, deleted or
  replaced), writes nothing, withholds the heartbeat so that the PLC's watchdog
  hands control to its recipe, alarms, and tries again every
  ``safeguards.storage_retry_s`` until storage is back;
- serves the operator's signatures in advisory mode (:mod:`controller.signing`),
  an engineer's acknowledgement of a held contradiction and an engineer's
  re-enabling of the NMPC after it stood down (each audited first).
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
from enum import Enum
from typing import Any

import numpy as np
import structlog

from controller.advisory import ApprovalRefusedError, Meaning, Recommendation, Signature, Signer, now_utc
from controller.alarms import AlarmBoard, AlarmChange
from controller.clock import ClockVerdict, Tick, process_time_of
from controller.config import BatchConfig, BatchTemplate, batch_id_problem
from controller.cycle import ControlCycle, CyclePlan, estimate_summary
from controller.forecast import Forecast
from controller.modes import Conditions, ModeMachine, RequestedMode, State
from controller.mpc import EconomicMpc
from controller.nmpc import NmpcController, build_mpc
from controller.ports import (
    AuditLog,
    CycleRecord,
    HistoryStore,
    HistoryUnavailableError,
    PlcAuthError,
    PlcLinkError,
    PlcMappingError,
    PlcPort,
    Reading,
    good_number,
)
from controller.quality import DataQualityChecker
from controller.recorder import Recorder, WriteCounts
from controller.robust import RobustMpc
from controller.runtime_config import RuntimeSettings
from controller.signing import AUTO_APPROVER, AdvisoryDesk
from controller.takeover import BatchRefusedError, RuntimeStartError, StartDeferredError, StartPlan, TakeoverApproval, plan_start
from controller.types import PHASE_HARVESTED, PHASE_IDLE, PHASE_RUNNING
from plant_models.cho import CultureModel
from plant_models.parameters import PhaseEnvelope

log = structlog.get_logger(__name__)

__all__ = ["CycleReport", "ModelFile", "PollOutcome", "RunSummary", "Runtime", "RuntimeStartError"]


class PollOutcome(str, Enum):
    ENDED = "ended"
    LINK_DOWN = "link_down"
    STORAGE_DOWN = "storage_down"
    CYCLED = "cycled"
    WAITING = "waiting"


@dataclass(frozen=True)
class ModelFile:
    """The parameter file the kinetics came from, as the ``config_loaded`` audit record names it."""

    path: str
    sha256: str
    """Of the file's bytes: what ``bioreactor-mpc model approve`` signed."""
    calibrated: bool
    """The file carries a calibration's provenance (and needs an engineer's approval to run)."""
    approval_seq: int | None = None
    """The ``model_approved`` audit record of a calibrated file; None for the nominal file."""

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "calibrated": self.calibrated, "approval_seq": self.approval_seq}


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
    writes: WriteCounts = field(default_factory=WriteCounts)
    link_losses: int = 0
    storage_losses: int = 0
    solve_times_s: list[float] = field(default_factory=list)
    cycle_times_s: list[float] = field(default_factory=list)
    """Wall time of each cycle, from its read to its heartbeat."""
    read_times_s: list[float] = field(default_factory=list)
    """Wall time of each cycle's scan request."""
    write_times_s: list[float] = field(default_factory=list)
    """Wall time of each cycle's write requests before the heartbeat, read-backs included."""
    resumed_from_h: float | None = None
    taken_over_at_h: float | None = None
    batches: list[str] = field(default_factory=list)
    """The batches a run was started for, in order (one per run in the history)."""
    refused_batches: list[str] = field(default_factory=list)
    """The PLC's batches refused as not matching the template (a runtime that follows the PLC)."""

    @property
    def writes_ok(self) -> int:
        return self.writes.ok

    @property
    def writes_failed(self) -> int:
        return self.writes.failed


class Runtime:
    """Beside one PLC: one batch (a pinned batch file), or batch after batch (a template that follows the PLC's ``Status.BatchId``)."""

    def __init__(
        self,
        *,
        port: PlcPort,
        history: HistoryStore,
        batch: BatchTemplate,
        nominal_parameters: np.ndarray,
        settings: RuntimeSettings,
        model: CultureModel | None = None,
        mpc: EconomicMpc | RobustMpc | None = None,
        on_cycle: Callable[[CycleReport], None] | None = None,
        audit: AuditLog | None = None,
        mode_override: RequestedMode | None = None,
        takeover: TakeoverApproval | None = None,
        envelope: tuple[PhaseEnvelope, ...] = (),
        fitted: bool = False,
        model_file: ModelFile | None = None,
    ) -> None:
        """``batch``: a batch file with ``batch_id`` (a :class:`BatchConfig`) runs that batch only; a template without one follows the PLC.

        ``envelope``: the operating envelope of the model's calibration (``CultureParameters.envelope``; empty: the NMPC plans in the recipe band).
        ``fitted``: the parameters were calibrated on the plant's records (``CultureParameters.provenance``; controller.trust).

        ``model_file``: the parameter file of ``nominal_parameters``, for the start's audit record (checked for approval by the caller).
        """
        self.port = port
        self.history = history
        self.template = batch
        self.settings = settings
        self._model = model or CultureModel()
        self._nominal = np.asarray(nominal_parameters, dtype=float)
        self._envelope = envelope
        self._fitted = fitted
        self._model_file = model_file
        self._mpc = mpc or build_mpc(self._model, batch.for_batch(), settings.nmpc)
        self._on_cycle = on_cycle
        self.summary = RunSummary()
        self._run_batch: BatchConfig | None = batch.for_batch() if batch.pinned else None
        """The batch of the run in hand (pinned: always that batch); None between batches of a runtime that follows the PLC."""
        self._run_cycles = 0
        self._refused: tuple[str, str] | None = None
        """The PLC's batch id last refused and why: not tried again until the PLC names another batch."""
        self._carried_mode: RequestedMode | None = None
        """The mode requested when the previous batch ended: the next batch starts in it (an engineer's choice outlives the batch)."""
        self.recorder = Recorder(port=port, history=history, audit=audit, batch_id=batch.batch_id or "", counts=self.summary.writes)
        """Replaced at each batch of a runtime that follows the PLC (:meth:`_recorder`)."""
        self._mode_override = mode_override
        self._takeover = takeover
        self.modes = ModeMachine(settings.mode, max_write_failures=settings.max_write_failures)
        self.quality = DataQualityChecker(settings.quality)
        self.desk = AdvisoryDesk()
        self.cycle: ControlCycle | None = None
        self.last_report: CycleReport | None = None
        self._start_plan: StartPlan | None = None
        self._claimed = False
        self._run_started = False
        self._start_recorded = False
        self._deferred = ""
        self._unrecorded_alarms: list[tuple[float, AlarmChange]] = []
        self._resume_beat_due = False
        self._link_up = False
        self._link_alarms = AlarmBoard()
        """Alarms of the link and the storage, raised between cycles (before a cycle exists too)."""
        self._auth_wait_s = 0.0
        self._storage_problem: str | None = None
        self._storage_lost_at_h = math.nan
        self._last_time_h = math.nan
        self._last_cycle_wall_s: float | None = None
        self._read_time_s = math.nan
        self.running = False
        """Whether :meth:`run` is running (the monitoring's /healthz)."""
        self._io = asyncio.Lock()

    # ------------------------------------------------------------------ views for the screen

    @property
    def batch(self) -> BatchTemplate:
        """The batch of the run in hand; between batches (following the PLC), the template."""
        return self._run_batch if self._run_batch is not None else self.template

    @property
    def recommendation(self) -> Recommendation | None:
        return self.desk.recommendation

    @property
    def forecast(self) -> Forecast | None:
        """The plan's forecast to harvest with its uncertainty (computed when the screen is served or in advisory mode)."""
        return self.cycle.forecast if self.cycle is not None else None

    @property
    def alarms(self) -> dict[str, str]:
        active = self.cycle.alarms.active if self.cycle is not None else {}
        return {**active, **self._link_alarms.active}

    def health(self) -> tuple[bool, str]:
        """Whether the runtime is healthy (linked, storing, not in fault, cycling on time), and why not."""
        if not self._link_up:
            return False, "the PLC link is down"
        if self._storage_problem is not None:
            return False, f"the history cannot be written: {self._storage_problem}"
        if self.modes.state is State.FAULT:
            return False, f"fault: {self.modes.reason}"
        if self._last_cycle_wall_s is not None:
            stall_s = self.settings.safeguards.stall_after_cycles * self.batch.cycle_period_h * 3600.0
            idle_s = time.monotonic() - self._last_cycle_wall_s
            if idle_s > stall_s:
                return False, f"no cycle for {idle_s:.0f} s (limit {stall_s:.0f} s): the loop has stalled"
        return True, "ok"

    @property
    def last_cycle_wall_s(self) -> float | None:
        """``time.monotonic()`` at the end of the last cycle (at the start of :meth:`run` before the first); None before :meth:`run`."""
        return self._last_cycle_wall_s

    def view(self) -> dict[str, Any]:
        """What the operator screen shows now, as JSON-compatible data."""
        report = self.last_report
        healthy, why = self.health()
        return {
            "batch_id": self.batch.batch_id,
            "process_time_h": self._last_time_h if math.isfinite(self._last_time_h) else None,
            "next_cycle_h": self.cycle.clock.next_cycle_h if self.cycle is not None else None,
            "state": self.modes.state.value,
            "reason": self.modes.reason,
            "requested_mode": self.modes.requested.value,
            "link_up": self._link_up,
            "healthy": healthy,
            "health": why,
            "data_quality": dict(report.problems) if report is not None else {},
            "alarms": self.alarms,
            "recommendation": self.desk.recommendation.as_dict() if self.desk.recommendation is not None else None,
            "estimate": estimate_summary(self.cycle.estimator) if self.cycle is not None and self.cycle.estimator is not None else None,
            "cycles": self.summary.cycles,
            "decisions": dict(self.summary.decisions),
            "trust": self._trust_view(),
        }

    def _trust_view(self) -> dict[str, Any] | None:
        """The trust region of the latest cycle record, with how many misses in a row stand the NMPC down, and whether an engineer
        re-enabled it since that record (the region then restarts at the next cycle)."""
        report = self.last_report
        if report is None or not report.record.trust:
            return None
        trust = dict(report.record.trust)
        trust["misses_to_recipe"] = self.settings.nmpc.trust.misses_to_recipe
        trust["reenabled"] = bool(trust.get("stood_down")) and self.cycle is not None and not self.cycle.controller.trust.stood_down
        return trust

    # ------------------------------------------------------------------ the loop

    async def run(self, *, stop: asyncio.Event | None = None) -> RunSummary:
        """Run until the batch is harvested (or ``stop`` is set); returns what happened."""
        stop = stop or asyncio.Event()
        backoff_s = self.settings.reconnect_initial_s
        self._last_cycle_wall_s = time.monotonic()  # a runtime that never cycles is stalled too
        self.running = True
        try:
            while not stop.is_set():
                async with self._io:  # one PLC conversation at a time: a cycle, or an operator's signature
                    outcome = await self._poll()
                if outcome is PollOutcome.ENDED:
                    break
                if outcome is PollOutcome.LINK_DOWN:
                    wait_s, self._auth_wait_s = max(backoff_s, self._auth_wait_s), 0.0
                    await _sleep_or_stop(stop, wait_s)
                    backoff_s = min(2.0 * backoff_s, self.settings.reconnect_max_s)
                    continue
                backoff_s = self.settings.reconnect_initial_s
                if outcome is PollOutcome.STORAGE_DOWN:
                    await _sleep_or_stop(stop, self.settings.safeguards.storage_retry_s)
                elif outcome is PollOutcome.WAITING:
                    await _sleep_or_stop(stop, self.settings.poll_interval_s)
            else:
                self.summary.end_reason = self.summary.end_reason or "stopped"
        finally:
            self.running = False
            try:
                if self._run_started:
                    self.history.end_run(reason=self.summary.end_reason or "interrupted")
            except HistoryUnavailableError as error:
                log.error("history_end_not_recorded", error=str(error))
            finally:
                await self.port.close()
        log.info("runtime_ended", reason=self.summary.end_reason, cycles=self.summary.cycles, process_time_h=self.summary.last_process_time_h)
        return self.summary

    async def _poll(self) -> PollOutcome:
        """Read the PLC once and run the cycle if the batch clock says so."""
        try:
            if not self.port.connected:
                await self.port.connect()
            read_started = time.perf_counter()
            readings = await self.port.read()
            self._read_time_s = time.perf_counter() - read_started
        except PlcLinkError as error:
            self._link_lost(error)
            return PollOutcome.LINK_DOWN
        except PlcMappingError as error:
            if not self._run_started and not self.summary.batches:
                raise  # at start: the tag map does not fit this PLC, refuse (the error names every signal)
            # mid-batch or between batches (a PLC program changed under the runtime): fault and check again, as for a lost link
            self._link_lost(PlcLinkError(f"the tag map no longer fits the PLC: {error}"))
            await self.port.close()
            return PollOutcome.LINK_DOWN
        if not self._link_up:
            self._link_restored()
        try:
            self.history.check_available()  # storage counts as back only once a cycle's records go in (small records can fit on a full disk)
            between_batches = not self.template.pinned and self._follow(readings)
        except HistoryUnavailableError as error:
            self._storage_lost(error)
            return PollOutcome.STORAGE_DOWN
        if between_batches:
            self._last_cycle_wall_s = time.monotonic()  # waiting for the next batch is not a stall
            return PollOutcome.WAITING
        starting = self.cycle is None
        try:
            cycle = await self._start(readings)
        except PlcLinkError as error:  # the start goes on from where it stopped with the next reading
            self._link_lost(error)
            return PollOutcome.LINK_DOWN
        except HistoryUnavailableError as error:
            self._storage_lost(error)
            return PollOutcome.STORAGE_DOWN
        except BatchRefusedError as error:
            if self.template.pinned:
                raise
            return self._refuse(error, readings)
        except StartDeferredError as error:
            self._defer(str(error))
            return PollOutcome.WAITING
        if starting:
            return PollOutcome.WAITING  # the start watched the PLC for a while: the first cycle runs on a fresh scan
        phase = good_number(readings, "Status.Phase")
        if phase == PHASE_HARVESTED:  # pinned (a runtime that follows the PLC ends the batch's run in _follow and waits for the next)
            self.summary.end_reason = "batch harvested"
            self.desk.expire()
            return PollOutcome.ENDED
        if phase == PHASE_IDLE and not math.isfinite(cycle.clock.last_cycle_h):
            self._last_cycle_wall_s = time.monotonic()  # waiting for inoculation is not a stall
            return PollOutcome.WAITING  # not inoculated yet: nothing to control (idle after cycles ran is the cycle's fault)
        verdict = cycle.clock_verdict(readings, wall_s=time.monotonic())
        if verdict.tick is Tick.WAIT:
            return PollOutcome.WAITING
        plan = self._start_plan
        if plan is not None and plan.first_cycle_by_h is not None and self._run_cycles == 0 and verdict.process_time_h > plan.first_cycle_by_h + 1e-6:
            ran_on = BatchRefusedError(
                f"the batch ran on to {verdict.process_time_h:.2f} h before this runtime's first cycle (a new batch must start within "
                f"{plan.first_cycle_by_h:.2f} h of inoculation): restart it to take the batch over; nothing written"
            )
            if not self.template.pinned:
                return self._refuse(ran_on, readings)
            self.summary.end_reason = "refused: the batch ran on before the first cycle"
            raise ran_on
        started = time.perf_counter() - self._read_time_s
        try:
            outcome = await self._cycle(cycle, readings, verdict)
        except PlcLinkError as error:
            self._link_lost(error)
            return PollOutcome.LINK_DOWN
        self.summary.cycle_times_s.append(time.perf_counter() - started)
        return outcome

    # ------------------------------------------------------------------ start

    async def _start(self, readings: Mapping[str, Reading]) -> ControlCycle:
        """Start the batch in hand once: claim the PLC (once per process), plan the start, open the run, reconcile, audit; each step done
        only once across retries."""
        batch = self._run_batch
        if batch is None:
            raise StartDeferredError("no batch in hand")  # _follow chooses one first: not reached
        if self.cycle is not None:
            if self._resume_beat_due:
                await self._beat(self.cycle, self._last_time_h)
                self._resume_beat_due = False
            return self.cycle
        if not self._claimed:
            await self._claim(readings)
            self._claimed = True
        if self._start_plan is None:
            resume = self.history.load_resume(batch.batch_id)
            plan = plan_start(
                readings=readings,
                batch=batch,
                settings=self.settings,
                model=self._model,
                nominal_parameters=self._nominal,
                resume=resume,
                mode_override=self._mode_override,
                takeover=self._takeover,
                follows_plc=not self.template.pinned,
            )
            if self._mode_override is None and resume is None and self._carried_mode is not None:
                plan = replace(plan, requested_mode=self._carried_mode, mode_source="in force when the previous batch ended")
            self._start_plan = plan
        plan = self._start_plan
        now_h = process_time_of(readings)
        if not self._run_started:
            if plan.requested_mode is not self.modes.requested:
                log.warning("mode_restored", requested=plan.requested_mode.value, config=self.settings.mode.value, source=plan.mode_source)
            self.modes.requested = plan.requested_mode
            self.history.start_run(
                batch_id=batch.batch_id,
                requested_mode=plan.requested_mode.value,
                config={**self.settings.model_dump(mode="json"), "batch": batch.model_dump(mode="json")},
            )
            self._run_started = True
            self.summary.batches.append(batch.batch_id)
        if not self._start_recorded:
            self.recorder.reconcile(readings, now_h)
            if plan.taken_over_at_h is not None and self._takeover is not None:
                details = {"signature": self._takeover.as_dict(), "process_time_h": plan.taken_over_at_h, "lab_seq": plan.lab_seq}
                if not self.recorder.audited(now_h, actor=self._takeover.signer.name, action="batch_taken_over", subject=batch.batch_id, details=details):
                    raise RuntimeStartError(f"the take-over cannot be recorded in the audit trail ({self.recorder.audit_problem}); the runtime does not start")
            configuration = {
                "settings_sha256": _sha256(self.settings.model_dump(mode="json")),
                "batch_sha256": _sha256(batch.model_dump(mode="json")),
                "nominal_parameters_sha256": _sha256(self._nominal.tolist()),
                "model_file": self._model_file.as_dict() if self._model_file is not None else None,
                "estimator_config_sha256": _sha256(self.settings.estimator.model_dump(mode="json")),
                "mode": plan.requested_mode.value,
                "mode_from": plan.mode_source,
                "auto_approve": self.settings.auto_approve,
                "start": plan.how,
                "resumed_from_h": plan.resumed_from_h,
                "taken_over_at_h": plan.taken_over_at_h,
                "held_contradictions": dict(plan.held_contradictions or {}),
            }
            if not self.recorder.audited(now_h, actor="runtime", action="config_loaded", subject=batch.batch_id, details=configuration):
                raise RuntimeStartError(f"the audit trail cannot be written ({self.recorder.audit_problem}); the runtime does not start")
            if not self.template.pinned and not self._batch_started_audited(batch, plan, readings, now_h):
                raise RuntimeStartError(f"the audit trail cannot be written ({self.recorder.audit_problem}); the batch does not start")
            self._start_recorded = True
        for signal, floor in (plan.totaliser_floors or {}).items():
            self.quality.expect_at_least(signal, floor)  # a totaliser reset while away is a critical input, not a crash
        self.quality.commit_lab(plan.lab_seq)
        controller = NmpcController(self._model, batch, plan.estimator, self.settings.nmpc, mpc=self._mpc, envelope=self._envelope, fitted=self._fitted)
        if plan.harvest_time_h is not None:
            controller.harvest_time_h = plan.harvest_time_h
        if plan.trust or plan.how != "new batch":  # resumed or taken over mid-batch: a region with no saved width starts narrow
            controller.restore(dict(plan.trust or {}))
        self.cycle = ControlCycle(
            batch=batch,
            settings=self.settings,
            modes=self.modes,
            quality=self.quality,
            estimator=plan.estimator,
            controller=controller,
            clock=plan.clock,
            heartbeat=plan.heartbeat,
            full_forecast=self.settings.screen is not None,
            held_contradictions=plan.held_contradictions,
            fault_cycles=plan.fault_cycles,
        )
        self.summary.resumed_from_h = plan.resumed_from_h
        self.summary.taken_over_at_h = plan.taken_over_at_h
        if plan.resumed_from_h is not None:
            log.info("runtime_resumed", batch_id=batch.batch_id, last_cycle_h=plan.resumed_from_h, next_cycle_h=plan.clock.next_cycle_h, process_time_h=now_h)
        if self.settings.auto_approve:
            log.warning("auto_approve_enabled", reason="every advisory recommendation is approved at once: lockstep tests and demos only")
        log.info("runtime_started", batch_id=batch.batch_id, start=plan.how, mode=plan.requested_mode.value, heartbeat=plan.heartbeat, first_cycle_h=plan.clock.next_cycle_h)
        if plan.beat_now:  # the cycle of this boundary ran before the restart; its heartbeat may not have gone out
            self._resume_beat_due = True
            self._last_time_h = plan.resumed_from_h if plan.resumed_from_h is not None else now_h
            await self._beat(self.cycle, self._last_time_h)
            self._resume_beat_due = False
        return self.cycle

    async def _claim(self, readings: Mapping[str, Reading]) -> None:
        """Refuse to start while another runtime's heartbeat moves at this PLC (watched for ``safeguards.claim_watch_s``)."""
        watch_s = self.settings.safeguards.claim_watch_s
        first = readings.get("MPC.Heartbeat")
        if watch_s <= 0.0 or first is None or not first.good:
            return
        deadline = time.monotonic() + watch_s
        while time.monotonic() < deadline:
            await asyncio.sleep(min(self.settings.poll_interval_s, max(0.0, deadline - time.monotonic())))
            now = (await self.port.read()).get("MPC.Heartbeat")
            if now is not None and now.good and now.value != first.value:
                raise RuntimeStartError(
                    f"MPC.Heartbeat moved from {first.value} to {now.value} while this runtime watched for {watch_s:.1f} s: another runtime holds "
                    "this PLC. Stop it first (docs/runtime.md, section 7: one runtime per PLC); nothing written"
                )

    # ------------------------------------------------------------------ batch after batch (a template that follows the PLC)

    def _follow(self, readings: Mapping[str, Reading]) -> bool:
        """Which batch the PLC runs: end the run in hand at harvest or when the PLC names another batch, and take up a new batch once
        ``Status.Phase`` says it runs. True while there is no batch to run (between batches, a refused batch, an unreadable id or phase)."""
        reading = readings.get("Status.BatchId")
        plc_batch_id = str(reading.value) if reading is not None and reading.good else None
        phase = good_number(readings, "Status.Phase")
        if self._run_batch is not None:
            if plc_batch_id is not None and plc_batch_id != self._run_batch.batch_id:
                self._end_batch(f"the PLC named batch {plc_batch_id}", readings)
            elif phase == PHASE_HARVESTED:
                self._end_batch("batch harvested", readings)
                return True
            elif self.cycle is None and math.isfinite(phase) and int(phase) != PHASE_RUNNING:
                self._end_batch("not started: the PLC's phase left running", readings)  # the batch must be matched to the template running
                return True
            else:
                return False
        if plc_batch_id is None or not math.isfinite(phase):
            self._defer("Status.BatchId or Status.Phase is not Good: the runtime waits for a good scan to know the batch")
            return True
        if int(phase) != PHASE_RUNNING:  # idle or harvested: between batches, nothing to control and nothing written
            return True
        if self._refused is not None and self._refused[0] == plc_batch_id:
            return True  # refused once, with its alarm: the next batch is tried afresh
        problem = batch_id_problem(plc_batch_id)
        if problem is not None:
            self._refuse(BatchRefusedError(f"Status.BatchId {plc_batch_id!r} {problem}: it cannot name a run; nothing written"), readings, batch_id=plc_batch_id)
            return True
        self._run_batch = self.template.for_batch(plc_batch_id)
        self.recorder = self._recorder(plc_batch_id)
        self._deferred = ""
        log.info("batch_found", batch_id=plc_batch_id, process_time_h=process_time_of(readings))
        return False

    def _batch_started_audited(self, batch: BatchConfig, plan: StartPlan, readings: Mapping[str, Reading], now_h: float) -> bool:
        """The ``batch_started`` audit record of a runtime that follows the PLC: the PLC's batch id, the template's digest, how it started."""
        volume_l = good_number(readings, "PV.Volume")
        details = {
            "batch_id": batch.batch_id,
            "template_sha256": _sha256(self.template.model_dump(mode="json")),
            "start": plan.how,
            "process_time_h": now_h if math.isfinite(now_h) else None,
            "volume_l": volume_l if math.isfinite(volume_l) else None,
            "run": len(self.summary.batches),
        }
        if not self.recorder.audited(now_h, actor="runtime", action="batch_started", subject=batch.batch_id, details=details):
            return False
        change = self._link_alarms.clear("batch_refused")
        if change is not None:  # recorded in the new batch's run (and audited)
            log.info("alarm_cleared", code=change.code, batch_id=batch.batch_id)
            self._try_record(lambda: self.recorder.alarms(now_h, [change], logged=True))
        self._refused = None
        log.info("batch_started", batch_id=batch.batch_id, start=plan.how, process_time_h=now_h, run=len(self.summary.batches))
        return True

    def _end_batch(self, reason: str, readings: Mapping[str, Reading]) -> PollOutcome:
        """End the run of the batch in hand (its history run closed with ``reason``, audited) and wait for the next batch with nothing in hand:
        the next one starts with a fresh estimator, trust region, recipe, clock, data checks and state machine, in the mode requested now.

        Raises :class:`HistoryUnavailableError` when the run's end cannot be recorded: tried again at the next poll."""
        batch = self._run_batch
        now_h = process_time_of(readings)
        self.desk.expire()
        if self._run_started:
            self.history.end_run(reason=reason)
        if batch is not None and self._start_recorded:
            cycles = self._run_cycles
            self.recorder.audited(now_h, actor="runtime", action="batch_ended", subject=batch.batch_id, details={"reason": reason, "cycles": cycles})
            log.info("batch_ended", batch_id=batch.batch_id, reason=reason, cycles=cycles, process_time_h=now_h)
        self._carried_mode = self.modes.requested
        self._reset_run()
        return PollOutcome.WAITING

    def _refuse(self, error: RuntimeStartError, readings: Mapping[str, Reading], *, batch_id: str | None = None) -> PollOutcome:
        """The PLC's batch does not match the template (or cannot run with this history): alarm and audit why, close its run if one was
        opened, write nothing, and wait for the PLC to name another batch."""
        refused_id = batch_id or (self._run_batch.batch_id if self._run_batch is not None else "?")
        now_h = process_time_of(readings)
        reason = str(error)
        try:
            if self._run_started:
                self.history.end_run(reason=f"refused: {reason}")
        except HistoryUnavailableError as history_error:
            self._storage_lost(history_error)
        self._reset_run()
        self._refused = (refused_id, reason)
        self.summary.refused_batches.append(refused_id)
        message = f"batch {refused_id} refused: {reason}"
        self.recorder.audited(
            now_h, actor="runtime", action="batch_refused", subject=refused_id, details={"reason": reason, "process_time_h": now_h if math.isfinite(now_h) else None}
        )
        self._link_alarms.clear("batch_refused")  # an earlier batch's refusal: this one's reason replaces it
        self._link_alarms.raise_("batch_refused", message)
        self.recorder.audited(now_h, actor="runtime", action="alarm_raised", subject="batch_refused", details={"message": message})
        log.error("alarm_raised", code="batch_refused", message=message, batch_id=refused_id, process_time_h=now_h)
        return PollOutcome.WAITING

    def _reset_run(self) -> None:
        """Nothing in hand: the next batch starts afresh (the PLC stays claimed; a take-over signature was for the first batch only)."""
        self.cycle = None
        self._start_plan = None
        self._run_started = False
        self._start_recorded = False
        self._run_batch = None
        self._run_cycles = 0
        self._resume_beat_due = False
        self._deferred = ""
        self._takeover = None
        self.modes = ModeMachine(self.settings.mode, max_write_failures=self.settings.max_write_failures)
        self.quality = DataQualityChecker(self.settings.quality)
        self.recorder = self._recorder("")
        self.last_report = None

    def _recorder(self, batch_id: str) -> Recorder:
        """The history and audit records of ``batch_id``'s run (its writes left pending by a killed predecessor are reconciled at its start)."""
        return Recorder(port=self.port, history=self.history, audit=self.recorder.audit, batch_id=batch_id, counts=self.summary.writes)

    def _defer(self, reason: str) -> None:
        if reason != self._deferred:  # once per reason, not once per poll
            log.warning("start_deferred", reason=reason)
            self._deferred = reason

    # ------------------------------------------------------------------ one cycle

    async def _cycle(self, cycle: ControlCycle, readings: Mapping[str, Reading], verdict: ClockVerdict) -> PollOutcome:
        now_h = verdict.process_time_h
        plan = await asyncio.to_thread(cycle.decide, readings, verdict, wall_now=datetime.now(UTC))
        self._last_time_h = now_h
        try:
            self.history.record_scan(now_h, readings, plan.report.problems)
            if plan.lab is not None:
                self.history.record_lab(now_h, plan.lab, used=plan.lab_used)
            for change in plan.changes:
                self.recorder.state_change(now_h, change, requested=self.modes.requested.value)
            resume = cycle.resume_state(plan)
            if resume is not None:
                self.history.save_resume(resume)
            self._storage_restored(readings, now_h)
        except HistoryUnavailableError as error:  # nothing written to the PLC yet: the cycle did not happen
            cycle.abandon(plan)
            self._storage_lost(error)
            return PollOutcome.STORAGE_DOWN
        self.desk.offer(plan.recommendation)
        written, failed, storage_error, link_error = await self._write_plan(plan, now_h)
        extra = {"audit_unavailable": self.recorder.audit_problem} if self.recorder.audit_problem is not None else {}
        outcome = cycle.conclude(
            plan, setpoints_written=written, setpoint_write_failed=failed, extra_alarms=extra, read_time_s=self._read_time_s, write_time_s=self.recorder.write_time_s
        )
        unrecorded = list(outcome.alarm_changes)
        try:
            self.history.commit_cycle(outcome.record, None)  # the state to resume from was saved before the writes
            while unrecorded:
                self.recorder.alarms(now_h, unrecorded[:1])
                unrecorded.pop(0)
        except HistoryUnavailableError as error:
            storage_error = storage_error or error
            self._unrecorded_alarms.extend((now_h, change) for change in unrecorded)  # recorded when storage is back
        self._count(outcome.record)
        self._last_cycle_wall_s = time.monotonic()
        self.last_report = CycleReport(outcome.record, plan.report.problems, tuple(sorted(self.alarms)))
        if self._on_cycle is not None:
            self._on_cycle(self.last_report)
        if link_error is not None:  # the cycle is recorded and its boundary used up: after reconnecting, the next boundary decides afresh
            raise link_error
        if storage_error is not None:
            self._storage_lost(storage_error)
            return PollOutcome.STORAGE_DOWN  # no heartbeat: the PLC's watchdog hands control to its recipe
        if outcome.hand_over_started:
            self.recorder.audited(now_h, actor="runtime", action="heartbeat_withheld", subject="MPC.Heartbeat", details={"reason": self.modes.reason})
        if outcome.beat:
            try:
                await self._beat(cycle, now_h)
            except HistoryUnavailableError as error:  # the heartbeat's record cannot be written: it is not sent
                self._storage_lost(error)
                return PollOutcome.STORAGE_DOWN
        return PollOutcome.CYCLED

    async def _write_plan(self, plan: CyclePlan, now_h: float) -> tuple[bool, bool, HistoryUnavailableError | None, PlcLinkError | None]:
        """The plan's writes in order (a failed group stops the rest), then any automatic approval.

        Returns (setpoints written, setpoint write failed, storage error, link error): a lost link or
        storage ends the writes, and the caller still records the cycle.
        """
        self.recorder.start_timing()
        written = failed = False
        current = None
        try:
            for group in plan.writes:
                current = group
                ok = await self.recorder.write(now_h, group.values)
                if group.setpoints:
                    written, failed = ok, not ok
                if not ok:
                    break
            current = None
            if plan.state is State.ADVISORY and self.settings.auto_approve and plan.recommendation is not None and _plc_accepts(plan):
                try:
                    written = await self._sign(plan.recommendation, AUTO_APPROVER, Meaning.APPROVED, "automatic approval (lockstep tests and demos)", now_h)
                except ApprovalRefusedError as error:
                    log.warning("auto_approval_refused", process_time_h=now_h, reason=str(error))
        except HistoryUnavailableError as error:  # the group in hand was not sent (its intent could not be recorded) or its outcome was lost
            return written and not (current is not None and current.setpoints), False, error, None
        except PlcLinkError as error:  # what went before was written; the group in hand may or may not have reached the PLC
            in_hand = current is not None and current.setpoints
            return written and not in_hand, in_hand, None, error
        return written, failed, None, None

    async def _beat(self, cycle: ControlCycle, now_h: float) -> None:
        value = cycle.next_heartbeat()
        try:
            ok = await self.recorder.write(now_h, {"MPC.Heartbeat": value})
        except (PlcLinkError, HistoryUnavailableError):  # it may or may not have reached the PLC: the next scan says which
            cycle.heartbeat_written(None)
            raise
        cycle.heartbeat_written(value if ok else None)

    # ------------------------------------------------------------------ the operator (advisory mode)

    async def approve(self, recommendation_id: str, digest: str, *, signer: Signer, reason: str) -> Recommendation:
        """Sign and apply the current recommendation, named by its id and content digest: its setpoints are written now, while remote is enabled."""
        return await self._operator_sign(recommendation_id, digest, signer, Meaning.APPROVED, reason)

    async def reject(self, recommendation_id: str, digest: str, *, signer: Signer, reason: str) -> Recommendation:
        """Sign a rejection of the current recommendation, named by its id and content digest; nothing is written to the PLC."""
        return await self._operator_sign(recommendation_id, digest, signer, Meaning.REJECTED, reason)

    def request_mode(self, mode: RequestedMode, *, user: str, reason: str) -> None:
        """Change the requested mode (it takes effect at the next cycle); refused if the audit record cannot be written."""
        if not reason.strip():
            raise ApprovalRefusedError("a mode change needs a reason")
        details = {"from": self.modes.requested.value, "to": mode.value, "reason": reason}
        if not self.recorder.audited(self._last_time_h, actor=user, action="mode_requested", subject="mode", details=details):
            raise ApprovalRefusedError("the audit record could not be written; the mode is unchanged")
        self.modes.request(mode)

    async def acknowledge(self, code: str, *, user: str, reason: str) -> None:
        """An engineer acknowledges a held physical contradiction (audited first); the next cycle checks the signals afresh.

        Between cycles only (the I/O lock): the cycle's cross-checks run in a worker thread.
        """
        if not reason.strip():
            raise ApprovalRefusedError("an acknowledgement needs a reason")
        async with self._io:
            if self.cycle is None or code not in self.cycle.contradictions:
                raise ApprovalRefusedError(f"no physical contradiction {code!r} is held")
            if not self.recorder.audited(self._last_time_h, actor=user, action="contradiction_acknowledged", subject=code, details={"reason": reason}):
                raise ApprovalRefusedError("the audit record could not be written; the contradiction is still held")
            self.cycle.acknowledge(code)

    async def reenable_nmpc(self, *, user: str, reason: str) -> None:
        """An engineer puts the NMPC back in charge after it stood down for the platform recipe (audited first); it plans again from the next cycle.

        Between cycles only (the I/O lock). The trust region restarts at its
        re-enable width (``reenable_width``) and the miss count at 0 (:meth:`controller.nmpc.NmpcController.reenable`).
        """
        if not reason.strip():
            raise ApprovalRefusedError("re-enabling the NMPC needs a reason")
        async with self._io:
            if self.cycle is None or not self.cycle.controller.trust.stood_down:
                raise ApprovalRefusedError("the NMPC has not stood down: nothing to re-enable")
            trust = self.cycle.controller.trust
            details = {"reason": reason, "misses": trust.misses, "width": trust.width, "last_check": trust.checks[-1].describe() if trust.checks else None}
            if not self.recorder.audited(self._last_time_h, actor=user, action="nmpc_reenabled", subject="nmpc", details=details):
                raise ApprovalRefusedError("the audit record could not be written; the NMPC stays stood down")
            self.cycle.controller.reenable()
            log.info("nmpc_reenabled", user=user, process_time_h=self._last_time_h, reason=reason)
            self._save_trust_for_resume()

    def _save_trust_for_resume(self) -> None:
        """The trust region as it is now into the state to resume from, so that a restart before the next cycle does not undo an engineer's
        re-enable (the next cycle saves it anyway; a history that cannot take it now is logged, and the re-enable stays in force)."""
        batch = self._run_batch
        if batch is None or self.cycle is None:
            return
        try:
            saved = self.history.load_resume(batch.batch_id)
            if saved is not None:
                self.history.save_resume(replace(saved, trust=self.cycle.controller.resume_dict()))
        except HistoryUnavailableError as error:
            log.warning("resume_trust_not_saved", error=str(error), process_time_h=self._last_time_h)

    async def _operator_sign(self, recommendation_id: str, digest: str, signer: Signer, meaning: Meaning, reason: str) -> Recommendation:
        if not reason.strip():
            raise ApprovalRefusedError(f"a signature ({meaning.value}) needs a reason")
        async with self._io:
            current = self.desk.signable(recommendation_id, digest, self.modes)
            try:
                readings = await self.port.read()
            except PlcLinkError as error:
                raise ApprovalRefusedError(f"the PLC cannot be read, nothing written: {error}") from error
            now_h, remote = process_time_of(readings), readings.get("Status.RemoteEnabled")
            self.desk.still_current(current, readings, now_h)
            if meaning is Meaning.APPROVED and not (remote is not None and remote.good and remote.value is True):
                raise ApprovalRefusedError("the PLC does not accept setpoints (Status.RemoteEnabled is false); nothing written")
            try:
                await self._sign(current, signer, meaning, reason, now_h)
            except PlcLinkError as error:
                self._link_lost(error)
                raise ApprovalRefusedError(f"the PLC link failed during the write; read the PLC before acting again: {error}") from error
            except HistoryUnavailableError as error:
                self._storage_lost(error)
                raise ApprovalRefusedError(f"the history cannot be written, nothing sent: {error}") from error
            signed = self.desk.recommendation
            if signed is None:
                raise ApprovalRefusedError("the recommendation is gone")
            return signed

    async def _sign(self, recommendation: Recommendation, signer: Signer, meaning: Meaning, reason: str, now_h: float) -> bool:
        """Record the signature (refused if it cannot be), then, for an approval, write its setpoints; whether they were written."""
        signature = Signature(signer, meaning, reason, now_utc(), recommendation.recommendation_id, recommendation.digest, recommendation.made_at_h)
        subject = f"recommendation {recommendation.recommendation_id} made at {recommendation.made_at_h:.2f} h"
        details = {"signature": signature.as_dict(), "recommendation": recommendation.as_dict()}
        if not self.recorder.audited(now_h, actor=signer.name, action=f"recommendation_{meaning.value}", subject=subject, details=details):
            raise ApprovalRefusedError("the signature could not be recorded in the audit trail; nothing done")
        self.desk.apply(recommendation, signature)
        log.info(
            "recommendation_signed",
            meaning=meaning.value,
            signer=signer.name,
            recommendation_id=recommendation.recommendation_id,
            digest=recommendation.digest,
            made_at_h=recommendation.made_at_h,
            reason=reason,
        )
        if meaning is not Meaning.APPROVED:
            return False
        written = await self.recorder.write(now_h, recommendation.setpoint_values(), actor=signer.name)
        if written and recommendation.harvest_now:
            written = await self.recorder.write(now_h, {"SP.HarvestRequest": True}, actor=signer.name)
        if not written:
            raise ApprovalRefusedError("the approval is recorded but the PLC refused the setpoints; see the history's writes")
        return True

    # ------------------------------------------------------------------ records

    def _count(self, record: CycleRecord) -> None:
        summary = self.summary
        summary.cycles += 1
        self._run_cycles += 1
        summary.last_process_time_h = record.process_time_h
        summary.states[record.state] = summary.states.get(record.state, 0) + 1
        summary.decisions[record.source] = summary.decisions.get(record.source, 0) + 1
        if math.isfinite(record.solve_time_s):
            summary.solve_times_s.append(record.solve_time_s)
        if math.isfinite(record.read_time_s):
            summary.read_times_s.append(record.read_time_s)
        if math.isfinite(record.write_time_s):
            summary.write_times_s.append(record.write_time_s)

    def _link_lost(self, error: PlcLinkError) -> None:
        if isinstance(error, PlcAuthError):
            self._auth_wait_s = max(self._auth_wait_s, error.retry_after_s)
        change = self._link_alarms.raise_("plc_link", f"PLC link lost: {error}")
        if self._link_up or change is not None:
            self.summary.link_losses += 1
            log.error("alarm_raised", code="plc_link", message=f"PLC link lost: {error}", process_time_h=self._last_time_h, retry_after_s=self._auth_wait_s or None)
            if self._run_started and change is not None:
                self._try_record(lambda: self.recorder.alarms(self._last_time_h, [change], logged=True))
                state_change = self.modes.evaluate(Conditions(link_up=False))
                self._try_record(lambda: self.recorder.state_change(self._last_time_h, state_change, requested=self.modes.requested.value))
            else:
                self.modes.evaluate(Conditions(link_up=False))
        self._link_up = False

    def _link_restored(self) -> None:
        self._link_up = True
        change = self._link_alarms.clear("plc_link")
        if change is not None:
            log.info("alarm_cleared", code="plc_link", process_time_h=self._last_time_h)
            if self._run_started:
                self._try_record(lambda: self.recorder.alarms(self._last_time_h, [change], logged=True))

    def _storage_lost(self, error: HistoryUnavailableError) -> None:
        message = f"the history cannot be written: {error}. No writes to the PLC, heartbeat withheld (the PLC's recipe takes over) until it can"
        self._storage_problem = str(error)
        if self._link_alarms.raise_("history_unavailable", message) is not None:
            self.summary.storage_losses += 1
            self._storage_lost_at_h = self._last_time_h
            log.error("alarm_raised", code="history_unavailable", message=message, process_time_h=self._last_time_h)
            self.recorder.audited(self._last_time_h, actor="runtime", action="alarm_raised", subject="history_unavailable", details={"message": message})

    def _storage_restored(self, readings: Mapping[str, Reading], now_h: float) -> None:
        """The history took a record again: the storage alarm, raised while nothing could be recorded, goes in now with its clearing,
        and writes left as intents while it was down are reconciled with what the PLC holds."""
        if self._storage_problem is None:
            return
        self.recorder.reconcile(readings, now_h)
        while self._unrecorded_alarms:
            at_h, alarm = self._unrecorded_alarms[0]
            self.recorder.alarms(at_h, [alarm], logged=True)
            self._unrecorded_alarms.pop(0)
        self._storage_problem = None
        change = self._link_alarms.clear("history_unavailable")
        if change is None:
            return
        log.info("alarm_cleared", code="history_unavailable", process_time_h=now_h)
        lost_at_h = self._storage_lost_at_h if math.isfinite(self._storage_lost_at_h) else now_h
        self.history.record_alarm(lost_at_h, change.code, change.message, active=True)
        self.history.record_alarm(now_h, change.code, change.message, active=False)
        self.recorder.audited(now_h, actor="runtime", action="alarm_cleared", subject=change.code, details={"message": change.message, "raised_at_h": lost_at_h})

    def _try_record(self, record: Callable[[], None]) -> None:
        try:
            record()
        except HistoryUnavailableError as error:
            self._storage_lost(error)


def _plc_accepts(plan: CyclePlan) -> bool:
    status = plan.report.accepted
    return status.get("Status.RemoteEnabled") is True and status.get("Status.WatchdogTripped") is False


def _sha256(data: Any) -> str:
    """A digest of JSON-compatible data, to see in the audit trail when a configuration or a model changed."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
