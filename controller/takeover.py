"""How the runtime starts on a PLC: a new batch, a batch it has history for, or a running batch it must take over.

:func:`plan_start` looks at the PLC's first scan and the history's resume
state and returns a :class:`StartPlan` (the estimator to run, when the first
cycle is, the mode) or refuses with :class:`RuntimeStartError`. It does no
I/O: the runtime reads the PLC, loads the resume state and records the start.

- **New batch** (no history for it, and the batch clock within
  ``fresh_start_within_h`` of inoculation): the estimator starts from the
  inoculation record.
- **Resume** (the history has this batch): the estimator's saved state, filtered
  on with the settings and nominal kinetics the runtime was started with (the
  ones it audits), and the next cycle at the boundary after the last one.
- **Take-over** (the PLC runs the batch well past inoculation and the history
  has no record of it: an empty, lost or new history file): refused, because
  an estimate from inoculation would be days out of date (a probe saw VCD 3.5
  against 18.5 and a harvest requested on day 8). An engineer can override it
  with a signature; the estimator then starts *now* from the PLC's current
  readings and the latest lab result it holds (:func:`state_from_readings`),
  with the configured initial uncertainty widened by ``takeover_sd_scale``.

When the batch file is a template that follows the PLC's batch id
(``follows_plc``), a new batch whose ``PV.Volume`` at inoculation contradicts
the template's inoculation volume is refused (:func:`check_inoculation`), and
every refusal that concerns the PLC's batch rather than the runtime's own
configuration is a :class:`BatchRefusedError`: the runtime alarms, writes
nothing and waits for the next batch instead of stopping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from controller.advisory import Signer
from controller.clock import TIME_TOLERANCE_H, BatchClock, process_time_of
from controller.config import BatchConfig
from controller.estimator import ExtendedKalmanEstimator
from controller.modes import RequestedMode
from controller.plausibility import PlausibilityChecker
from controller.ports import ResumeState, ScannedValue, good_number
from controller.quality import SAMPLE_SIGNALS, DataQualityChecker
from controller.runtime_config import RuntimeSettings
from controller.types import LAB_FIELDS, PHASE_RUNNING
from plant_models.cho import GLUCOSE_G_PER_MOL, LACTATE_G_PER_MOL, STATE_INDEX, CultureModel
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)


class RuntimeStartError(BioreactorMPCError, RuntimeError):
    """The runtime cannot start on this PLC with this history (wrong batch, history ahead of the PLC, a running batch without its history)."""


class BatchRefusedError(RuntimeStartError):
    """The PLC's batch cannot be run with this template and history (its inoculation contradicts the template, a reused id, a running batch
    without its history). A runtime that follows the PLC alarms and waits for the next batch; a pinned one stops."""


class StartDeferredError(BioreactorMPCError, RuntimeError):
    """This scan cannot decide how to start (the phase or the clock is not Good): the runtime waits for a good one."""


TAKEOVER_LAB_MAX_AGE_H = 36.0
"""A take-over starts from a lab result drawn at most this long ago."""
TAKEOVER_LAB_RANGES: dict[str, tuple[float, float, str]] = {
    "vcd_1e6_per_ml": (0.05, 100.0, "1e6 cells/mL"),
    "viability_pct": (5.0, 100.0, "%"),
    "glucose_g_per_l": (0.0, 50.0, "g/L"),
    "lactate_g_per_l": (0.0, 20.0, "g/L"),
    "glutamine_mm": (0.0, 50.0, "mM"),
    "ammonia_mm": (0.0, 50.0, "mM"),
    "titer_g_per_l": (0.0, 30.0, "g/L"),
    "osmolality_mosm_per_kg": (150.0, 900.0, "mOsm/kg"),
}
"""What a take-over accepts from the PLC's lab fields: outside these, a unit or a scaling is wrong (cells/mL for 1e6/mL, a fraction for %)."""


@dataclass(frozen=True)
class TakeoverApproval:
    """An engineer's signed decision to take over a running batch without its history (checked against the user store by the caller)."""

    signer: Signer
    reason: str
    signed_utc: str

    def as_dict(self) -> dict[str, str]:
        return {"signer": self.signer.name, "printed_name": self.signer.full_name, "role": self.signer.role, "reason": self.reason, "signed_utc": self.signed_utc}


@dataclass(frozen=True)
class StartPlan:
    how: str
    """``new batch``, ``resumed`` or ``taken over``."""
    estimator: ExtendedKalmanEstimator
    clock: BatchClock
    lab_seq: int
    """The last lab result set already in the estimate (``Sample.Seq``)."""
    requested_mode: RequestedMode
    mode_source: str
    heartbeat: int
    """``MPC.Heartbeat`` as the PLC holds it: the runtime counts on from there."""
    harvest_time_h: float | None = None
    """The resumed plan's harvest time."""
    totaliser_floors: Mapping[str, float] | None = None
    """Totaliser values the estimator has seen: a reading below one went back while the runtime was away."""
    resumed_from_h: float | None = None
    taken_over_at_h: float | None = None
    beat_now: bool = False
    """The last cycle before a restart ran at this boundary; its heartbeat may not have gone out."""
    first_cycle_by_h: float | None = None
    """A new batch's first cycle must run by then (else the batch ran on without the runtime, and needs a take-over)."""
    held_contradictions: Mapping[str, str] | None = None
    fault_cycles: int = 0
    trust: Mapping[str, Any] | None = None
    """The resumed trust region (``TrustRegion.to_dict``)."""


def choose_mode(override: RequestedMode | None, resume: ResumeState | None, configured: RequestedMode) -> tuple[RequestedMode, str]:
    """The requested mode: the command line's, else the one in force when the runtime stopped, else the config's; and where it came from."""
    if override is not None:
        return override, "command line"
    if resume is not None and resume.requested_mode is not None:
        return RequestedMode(resume.requested_mode), "history (in force when the runtime stopped)"
    return configured, "config"


def plan_start(
    *,
    readings: Mapping[str, ScannedValue],
    batch: BatchConfig,
    settings: RuntimeSettings,
    model: CultureModel,
    nominal_parameters: np.ndarray,
    resume: ResumeState | None,
    mode_override: RequestedMode | None = None,
    takeover: TakeoverApproval | None = None,
    follows_plc: bool = False,
) -> StartPlan:
    """Decide how to start from the PLC's first scan and the history's resume state; refuses with :class:`RuntimeStartError`.

    ``follows_plc``: ``batch`` is the template with the PLC's batch id, so a new batch must match the template at inoculation
    (:func:`check_inoculation`). A refusal about the PLC's batch is a :class:`BatchRefusedError`.
    """
    batch_id = readings.get("Status.BatchId")
    if batch_id is not None and not batch_id.good:
        raise StartDeferredError("Status.BatchId is not Good in this scan: the runtime waits for a good scan to check the batch")
    if batch_id is None or str(batch_id.value) != batch.batch_id:
        shown = None if batch_id is None else batch_id.value
        raise RuntimeStartError(
            f"the PLC runs batch {shown!r} (status {'Good' if batch_id is not None and batch_id.good else 'Bad'}) but this runtime is configured for "
            f"{batch.batch_id!r}; nothing written"
        )
    lockstep = readings.get("Sim.Lockstep")
    if settings.auto_approve and not (lockstep is not None and lockstep.value is True):
        raise RuntimeStartError("auto_approve is for simulated PLCs in lockstep only (Sim.Lockstep is not true); nothing written")
    beat = readings.get("MPC.Heartbeat")
    heartbeat = int(beat.value) if beat is not None and beat.good and not isinstance(beat.value, str) and math.isfinite(float(beat.value)) else 0
    now_h = process_time_of(readings)
    mode, mode_source = choose_mode(mode_override, resume, settings.mode)
    safeguards = settings.safeguards
    clock = BatchClock(
        batch.cycle_period_h,
        lost_cycle_every_s=safeguards.clock_lost_cycle_every_s,
        frozen_after_s=safeguards.clock_frozen_after_periods * batch.cycle_period_h * 3600.0,
    )
    if resume is not None:
        if takeover is not None:
            log.warning("takeover_ignored", batch_id=batch.batch_id, signer=takeover.signer.name, reason="the history has this batch: the runtime resumes it")
        if math.isfinite(now_h) and resume.last_cycle_h > now_h + TIME_TOLERANCE_H:
            raise BatchRefusedError(
                f"the history has batch {resume.batch_id} up to {resume.last_cycle_h:.2f} h but the PLC's batch clock reads {now_h:.2f} h: "
                "a new batch with a reused id, or a PLC whose clock was reset? Start with a new history file; nothing written"
            )
        estimator = ExtendedKalmanEstimator.from_dict(resume.estimator, model, config=settings.estimator, nominal_parameters=nominal_parameters)
        hand_over = settings.fault_hand_over_cycles
        withheld = hand_over is not None and resume.fault_cycles >= hand_over  # the last cycle withheld its heartbeat on purpose
        clock.resume_after(resume.last_cycle_h)
        totalisers = resume.estimator.get("totalisers") or {}
        floors = {signal: float(totalisers[key]) for signal, key in (("PV.FeedTotal", "feed_total_l"), ("PV.GlucoseFeedTotal", "glucose_feed_total_l")) if key in totalisers}
        return StartPlan(
            how="resumed",
            estimator=estimator,
            clock=clock,
            lab_seq=resume.lab_seq,
            requested_mode=mode,
            mode_source=mode_source,
            heartbeat=heartbeat,
            harvest_time_h=resume.harvest_time_h,
            totaliser_floors=floors,
            resumed_from_h=resume.last_cycle_h,
            beat_now=math.isfinite(now_h) and now_h < clock.next_cycle_h - TIME_TOLERANCE_H and not withheld,
            held_contradictions=resume.held_contradictions,
            fault_cycles=resume.fault_cycles,
            trust=resume.trust,
        )
    phase = good_number(readings, "Status.Phase")
    if not math.isfinite(phase) or (int(phase) == PHASE_RUNNING and not math.isfinite(now_h)):
        raise StartDeferredError("Status.Phase or the batch clock is not Good in this scan: the runtime cannot tell a new batch from a running one, and waits for a good scan")
    if int(phase) != PHASE_RUNNING or now_h <= safeguards.fresh_start_within_h + TIME_TOLERANCE_H:
        if follows_plc and int(phase) == PHASE_RUNNING:
            check_inoculation(readings, batch, settings, now_h=now_h)
        estimator = ExtendedKalmanEstimator.from_batch(model, batch, nominal_parameters, settings.estimator)
        held_seq = good_number(readings, "Sample.Seq")
        return StartPlan(
            how="new batch",
            estimator=estimator,
            clock=clock,
            lab_seq=int(held_seq) if math.isfinite(held_seq) else 0,  # a result the PLC holds before inoculation is the previous batch's
            requested_mode=mode,
            mode_source=mode_source,
            heartbeat=heartbeat,
            first_cycle_by_h=safeguards.fresh_start_within_h,
        )
    if takeover is None:
        raise BatchRefusedError(
            f"the PLC runs batch {batch.batch_id} at {now_h:.2f} h but the history has no record of it (an empty, lost or new history file): "
            "an estimate from inoculation would be out of date. Start the runtime on the batch's history, or have an engineer take the batch "
            "over with a signature (bioreactor-mpc run --take-over-as NAME --reason TEXT); nothing written"
        )
    x_now, seq = state_from_readings(readings, batch, now_h=now_h)
    _check_volume_balance(readings, batch, settings)
    estimator = ExtendedKalmanEstimator(model, nominal_parameters, x_now, settings.estimator, start_time_h=now_h)
    estimator.widen(safeguards.takeover_sd_scale)
    clock.start_at(now_h)
    return StartPlan(how="taken over", estimator=estimator, clock=clock, lab_seq=seq, requested_mode=mode, mode_source=mode_source, heartbeat=heartbeat, taken_over_at_h=now_h)


def check_inoculation(readings: Mapping[str, ScannedValue], batch: BatchConfig, settings: RuntimeSettings, *, now_h: float) -> None:
    """Refuse a new batch whose ``PV.Volume`` contradicts the template's inoculation volume (plus what was fed since) beyond the volume
    balance's tolerance (``plausibility.volume_tolerance_l`` / ``volume_tolerance_fraction``): the balance is kept from the template's volume
    for the whole batch, so such a batch would be a held contradiction from its first cycle. Not this template's batch: a
    :class:`BatchRefusedError` saying why. A volume that is not Good is left to the first cycle's checks (a fault, nothing written)."""
    report = DataQualityChecker(settings.quality).check(readings)
    if "PV.Volume" in report.problems or not report.usable:
        return
    for contradiction in PlausibilityChecker(batch, settings.plausibility).check(report.observation()):
        if contradiction.code == "volume_balance":
            raise BatchRefusedError(
                f"batch {batch.batch_id} at {now_h:.2f} h does not match the batch template: {contradiction.message}. "
                f"PV.Volume at inoculation must be the template's inoculation.volume_l ({batch.inoculation.volume_l:g} L) within the volume balance's "
                "tolerance (plausibility.volume_tolerance_l, volume_tolerance_fraction): another reactor, process or template? Nothing written; "
                "the runtime waits for a batch that matches"
            )


def _check_volume_balance(readings: Mapping[str, ScannedValue], batch: BatchConfig, settings: RuntimeSettings) -> None:
    """Refuse a take-over whose PV.Volume contradicts the feed and base totals (a mis-scaled tag would seed the estimate)."""
    report = DataQualityChecker(settings.quality).check(readings)
    if not report.usable:
        raise RuntimeStartError(f"taking over batch {batch.batch_id} needs good critical inputs; failed: {', '.join(report.critical)}; nothing written")
    for contradiction in PlausibilityChecker(batch, settings.plausibility).check(report.observation()):
        if contradiction.code == "volume_balance":
            raise RuntimeStartError(f"taking over batch {batch.batch_id}: {contradiction.message}; fix the tag map or the load cell first, nothing written")


def state_from_readings(readings: Mapping[str, ScannedValue], batch: BatchConfig, *, now_h: float) -> tuple[np.ndarray, int]:
    """The culture's state now from the PLC's online values and the latest lab result it holds; and that result's ``Sample.Seq``.

    Needs a lab result with viable cell density and viability; a metabolite
    the lab did not measure keeps its inoculation value (the widened
    uncertainty covers it, and the next lab result corrects it).
    """

    seq_value = good_number(readings, "Sample.Seq")
    lab = dict(zip(LAB_FIELDS, (good_number(readings, signal) for signal in SAMPLE_SIGNALS), strict=True))
    if not math.isfinite(seq_value) or seq_value < 1 or not (math.isfinite(lab["vcd_1e6_per_ml"]) and math.isfinite(lab["viability_pct"])):
        raise RuntimeStartError(
            f"taking over batch {batch.batch_id} at {now_h:.2f} h needs a lab result with viable cell density and viability at the PLC "
            "(Sample.Seq at least 1, Sample.VCD and Sample.Viability good); there is none: nothing written"
        )
    taken_h = good_number(readings, "Sample.TakenAt")
    if not (math.isfinite(taken_h) and taken_h <= now_h + TIME_TOLERANCE_H and now_h - taken_h <= TAKEOVER_LAB_MAX_AGE_H):
        raise RuntimeStartError(
            f"taking over batch {batch.batch_id} at {now_h:.2f} h needs a lab result drawn within {TAKEOVER_LAB_MAX_AGE_H:.0f} h; the PLC's was drawn at "
            f"{taken_h!r} h: wait for the next result, nothing written"
        )
    implausible = [
        f"{name} {lab[name]!r} outside [{low}, {high}] {unit}"
        for name, (low, high, unit) in TAKEOVER_LAB_RANGES.items()
        if math.isfinite(lab[name]) and not low <= lab[name] <= high
    ]
    volume_l = good_number(readings, "PV.Volume")
    if not (math.isfinite(volume_l) and 0.5 * batch.inoculation.volume_l <= volume_l <= batch.equipment.max_working_volume_l):
        implausible.append(f"PV.Volume {volume_l!r} outside [{0.5 * batch.inoculation.volume_l:g}, {batch.equipment.max_working_volume_l:g}] L")
    if implausible:
        raise RuntimeStartError(f"taking over batch {batch.batch_id}: implausible readings (units or scaling wrong?): {'; '.join(implausible)}; nothing written")
    x = batch.inoculation.initial_state()
    viable = lab["vcd_1e6_per_ml"]
    viability = min(max(lab["viability_pct"], 1.0), 100.0)
    x[STATE_INDEX["viable_cells"]] = viable
    x[STATE_INDEX["dead_cells"]] = viable * (100.0 - viability) / viability
    for field, state in (("glucose_g_per_l", "glucose"), ("glutamine_mm", "glutamine"), ("lactate_g_per_l", "lactate"), ("ammonia_mm", "ammonia"), ("titer_g_per_l", "titer")):
        if math.isfinite(lab[field]) and lab[field] >= 0.0:
            x[STATE_INDEX[state]] = lab[field]
    osmolality = lab["osmolality_mosm_per_kg"]
    if math.isfinite(osmolality):
        metabolites = (
            x[STATE_INDEX["glucose"]] * 1000.0 / GLUCOSE_G_PER_MOL
            + x[STATE_INDEX["lactate"]] * 1000.0 / LACTATE_G_PER_MOL
            + x[STATE_INDEX["glutamine"]]
            + x[STATE_INDEX["ammonia"]]
        )
        x[STATE_INDEX["other_osmolytes"]] = max(osmolality - metabolites, 0.0)
    x[STATE_INDEX["galactosylated_titer"]] = 0.5 * x[STATE_INDEX["titer"]]
    x[STATE_INDEX["volume"]] = volume_l
    temperature = good_number(readings, "PV.Temperature")
    if math.isfinite(temperature):
        x[STATE_INDEX["temperature"]] = temperature
    base = good_number(readings, "PV.BaseTotal")
    x[STATE_INDEX["base_added"]] = base if math.isfinite(base) and base >= 0.0 else 0.0
    return x, int(seq_value)
