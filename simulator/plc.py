"""The simulated reference PLC: the plant plus the PLC's own logic, on a virtual batch clock.

It serves exactly the tags of ``shared/reference-plc.md`` (by their logical
names; the OPC UA and Modbus servers map them to nodes and registers) and
implements its behaviour: range checks that reject and keep the old setpoint,
writes refused while remote is disabled, the heartbeat watchdog, the local
platform recipe, offline samples published hours after they are drawn, and
harvest. Choices where the reference is silent are in ``docs/plc-simulator.md``.

Time only moves when :meth:`SimulatedPlc.advance_to` is called, so a batch
runs as fast as the model integrates, and a server can pace it in lockstep or
at any time scale.

One batch after another: after harvest, :meth:`SimulatedPlc.next_batch`
inoculates the next batch (a new ``Status.BatchId``, process time 0, a fresh
plant, recipe and sampling schedule, the watchdog armed afresh); the PLC's
``MPC.*`` registers and ``Sample.Seq`` keep their values, as a PLC's memory does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.config import BatchConfig
from controller.quality import SAMPLE_SIGNALS, SETPOINT_SIGNALS
from controller.recipe import PlatformRecipe
from controller.types import LAB_FIELDS, PHASE_HARVESTED, PHASE_RUNNING, UINT32_MAX, LabResult, Setpoints
from plant_models.errors import RemoteDisabledError, SetpointOutOfRangeError
from simulator.config import (
    PV_TAGS,
    FeedLotFault,
    LabMissingFault,
    LabValueFault,
    OperatorLocalFault,
    PlcConfig,
    ProbeFault,
    SimulationConfig,
)
from simulator.plant import MINUTES_PER_HOUR, Plant
from simulator.plants.base import EquationPlant

LAB_FIELD_BY_TAG = dict(zip(SAMPLE_SIGNALS, LAB_FIELDS, strict=True))
RECOMMENDATION_TAGS = ("MPC.Rec.FeedRate", "MPC.Rec.GlucoseRate", "MPC.Rec.Temperature", "MPC.Rec.HarvestTime", "MPC.Pred.HarvestTiter")


@dataclass(frozen=True)
class TagReading:
    """One scanned value: what an OPC UA DataValue or a Modbus register block carries."""

    value: float | int | bool | str
    good: bool
    scanned_at_h: float


@dataclass(frozen=True)
class _PendingSample:
    draw_index: int
    draw_minute: int
    publish_minute: int
    result: LabResult
    volume_l: float
    glucose_delivered_g: float


class SimulatedPlc:
    """A reference PLC in front of a simulated plant."""

    def __init__(
        self,
        *,
        model: EquationPlant,
        batch: BatchConfig,
        simulation: SimulationConfig,
        true_parameters: np.ndarray,
        rng_streams: tuple[np.random.Generator, np.random.Generator, np.random.Generator],
    ) -> None:
        self._model = model
        self._simulation = simulation
        self._plc: PlcConfig = simulation.plc
        self._sampling_rng, self._lab_rng, self._online_rng = rng_streams
        self._true_parameters = np.asarray(true_parameters, dtype=float).copy()

        self.lockstep = False
        """Set by a server that pauses the plant at every cycle boundary (``Sim.Lockstep``)."""
        self._operator_switch_remote = self._plc.remote_enabled_at_start
        self._heartbeat = 0
        self._mode = 0
        self._recommendation = dict.fromkeys(RECOMMENDATION_TAGS, 0.0)
        self._sample_seq = 0
        self._feed_strength_index = model.parameter_index(model.feed_strength_parameter)
        self._inoculate(batch)

    def _inoculate(self, batch: BatchConfig) -> None:
        """Start ``batch`` at process time 0: a fresh plant, recipe, setpoints, sampling schedule and watchdog."""
        self._batch = batch
        self.plant = Plant(self._model, self._model.initial_state(batch), self._true_parameters)
        self.recipe = PlatformRecipe(batch.recipe, batch.media, batch.equipment, batch.inoculation.volume_l)

        cycle_minutes = round(batch.cycle_period_h * MINUTES_PER_HOUR)
        timeout_h = self._plc.watchdog_timeout_h if self._plc.watchdog_timeout_h is not None else 2.0 * batch.cycle_period_h
        self.cycle_minutes = cycle_minutes
        self._watchdog_minutes = max(1, round(timeout_h * MINUTES_PER_HOUR))
        self._latest_harvest_minute = round(batch.limits.latest_harvest_h * MINUTES_PER_HOUR)

        self.phase = PHASE_RUNNING
        self.harvest_reason: str | None = None
        self.watchdog_tripped = False
        self._heartbeat_minute = 0
        self._harvest_request = False
        first = self.recipe.setpoints(0.0)
        self._setpoints = {"SP.FeedRate": first.feed_rate_lph, "SP.GlucoseRate": first.glucose_rate_lph, "SP.Temperature": first.temperature_degc}
        self._ranges = {
            "SP.FeedRate": (0.0, batch.equipment.feed_rate_max_lph),
            "SP.GlucoseRate": (0.0, batch.equipment.glucose_rate_max_lph),
            "SP.Temperature": (batch.equipment.temperature_min_degc, batch.equipment.temperature_max_degc),
        }

        self._sample_registers: dict[str, float] = {"Sample.TakenAt": math.nan, **dict.fromkeys(SAMPLE_SIGNALS, math.nan)}
        self._pending: list[_PendingSample] = []
        self._next_draw_index = 0
        self._next_draw_minute = self._schedule_draw(0)
        self.published: list[LabResult] = []
        self.published_at_h: list[float] = []
        """Process time each of :attr:`published` appeared on the Sample.* tags."""
        self._frozen_readings: dict[str, TagReading] = {}
        self._last_good_pv: dict[str, float] = {}
        self._process_events()

    def next_batch(self, batch: BatchConfig) -> None:
        """Inoculate the next batch after this one's harvest (the turnaround is the caller's wait): ``Status.BatchId`` becomes ``batch``'s,
        the process time 0, the phase running. The plant's true kinetics stay; ``batch`` may differ in its inoculation (a wrong volume).

        Raises :class:`RuntimeError` while a batch runs: a PLC inoculates an empty, cleaned reactor.
        """
        if self.phase == PHASE_RUNNING:
            raise RuntimeError(f"batch {self._batch.batch_id} is still running at {self.process_time_h:.2f} h: harvest it first")
        self._inoculate(batch)

    # ----------------------------------------------------------------- clock

    @property
    def minute(self) -> int:
        return self.plant.minute

    @property
    def process_time_h(self) -> float:
        return self.plant.process_time_h

    @property
    def remote_enabled(self) -> bool:
        return self._operator_remote() and not self.watchdog_tripped and self.phase == PHASE_RUNNING

    @property
    def heartbeat(self) -> int:
        return self._heartbeat

    def next_cycle_boundary_h(self) -> float:
        return (self.minute // self.cycle_minutes + 1) * self.cycle_minutes / MINUTES_PER_HOUR

    def advance_to(self, process_time_h: float) -> None:
        """Run the plant and the PLC logic up to ``process_time_h`` (or harvest, whichever comes first)."""
        target = round(process_time_h * MINUTES_PER_HOUR)
        while self.minute < target and self.phase == PHASE_RUNNING:
            stop = min(target, self._next_event_minute())
            self.plant.integrate(stop - self.minute, self._active_inputs())
            self._process_events()

    def _next_event_minute(self) -> int:
        candidates = [
            (self.minute // MINUTES_PER_HOUR + 1) * MINUTES_PER_HOUR,
            self._next_draw_minute,
            self._latest_harvest_minute,
        ]
        candidates += [sample.publish_minute for sample in self._pending]
        if not self.watchdog_tripped:
            candidates.append(self._heartbeat_minute + self._watchdog_minutes)
        for fault in self._simulation.faults:
            if isinstance(fault, FeedLotFault | OperatorLocalFault):
                for edge_h in (fault.start_h, getattr(fault, "end_h", None)):
                    if edge_h is not None:
                        candidates.append(round(edge_h * MINUTES_PER_HOUR))
        return min(c for c in candidates if c > self.minute)

    def _active_inputs(self) -> np.ndarray:
        return np.array([self._setpoints["SP.FeedRate"], self._setpoints["SP.GlucoseRate"], self._setpoints["SP.Temperature"]])

    # ---------------------------------------------------------------- events

    def _process_events(self) -> None:
        now_h = self.process_time_h
        self._apply_feed_lot(now_h)
        if not self.watchdog_tripped and self.minute - self._heartbeat_minute >= self._watchdog_minutes:
            self.watchdog_tripped = True
        while self._pending and self._pending[0].publish_minute <= self.minute:
            self._publish(self._pending.pop(0))
        while self._next_draw_minute <= self.minute:
            self._draw_sample()
        if self.phase != PHASE_RUNNING:
            return
        if self.minute >= self._latest_harvest_minute:
            self._harvest("latest allowed harvest time reached")
            return
        if not self.remote_enabled:
            recipe = self.recipe.setpoints(now_h, volume_l=self.plant.volume_l)
            self._setpoints = {"SP.FeedRate": recipe.feed_rate_lph, "SP.GlucoseRate": recipe.glucose_rate_lph, "SP.Temperature": recipe.temperature_degc}
            if recipe.harvest:
                self._harvest("local recipe")

    def _apply_feed_lot(self, now_h: float) -> None:
        strength = 1.0
        for fault in self._simulation.faults:
            if isinstance(fault, FeedLotFault) and fault.start_h <= now_h:
                strength = fault.strength
        parameters = self._true_parameters.copy()
        parameters[self._feed_strength_index] *= strength
        if not np.array_equal(parameters, self.plant.parameters):
            self.plant.set_parameters(parameters)

    def _operator_remote(self) -> bool:
        now_h = self.process_time_h
        for fault in self._simulation.faults:
            if isinstance(fault, OperatorLocalFault) and fault.start_h <= now_h and (fault.end_h is None or now_h < fault.end_h):
                return False
        return self._operator_switch_remote

    def _harvest(self, reason: str) -> None:
        self.phase = PHASE_HARVESTED
        self.harvest_reason = reason
        self._harvest_request = False

    # --------------------------------------------------------------- samples

    def _schedule_draw(self, index: int) -> int:
        sampling = self._simulation.sampling
        nominal_h = sampling.first_draw_h + index * sampling.interval_h
        jitter_h = self._sampling_rng.uniform(-sampling.draw_jitter_h, sampling.draw_jitter_h)
        return max(self.plant.minute if index else 0, round((nominal_h + jitter_h) * MINUTES_PER_HOUR))

    def _draw_sample(self) -> None:
        sampling = self._simulation.sampling
        index = self._next_draw_index
        observed = self.plant.observables_now(self._active_inputs())
        truth = {
            "vcd_1e6_per_ml": observed["viable_cells"],
            "viability_pct": observed["viability"],
            "glucose_g_per_l": observed["glucose"],
            "lactate_g_per_l": observed["lactate"],
            "glutamine_mm": observed["glutamine"],
            "ammonia_mm": observed["ammonia"],
            "titer_g_per_l": observed["titer"],
            "osmolality_mosm_per_kg": observed["osmolality"],
        }
        measured = self._lab_measurement(truth)
        for fault in self._simulation.faults:
            if isinstance(fault, LabValueFault) and fault.draw_index == index:
                measured[fault.field] *= fault.factor
            elif isinstance(fault, LabMissingFault) and fault.draw_index == index:
                measured[fault.field] = math.nan
        delay_h = self._sampling_rng.uniform(sampling.result_delay_min_h, sampling.result_delay_max_h)
        pending = _PendingSample(
            draw_index=index,
            draw_minute=self.minute,
            publish_minute=self.minute + max(1, round(delay_h * MINUTES_PER_HOUR)),
            result=LabResult(seq=0, taken_at_h=self.process_time_h, **measured),
            volume_l=self.plant.volume_l,
            glucose_delivered_g=self._batch.media.glucose_delivered_g(self.plant.feed_total_l, self.plant.glucose_feed_total_l),
        )
        self._pending.append(pending)
        self._pending.sort(key=lambda sample: sample.publish_minute)
        if sampling.sample_volume_l > 0.0:
            self.plant.remove_sample(sampling.sample_volume_l)
        self._next_draw_index += 1
        self._next_draw_minute = self._schedule_draw(self._next_draw_index)

    def _lab_measurement(self, truth: dict[str, float]) -> dict[str, float]:
        noise = self._simulation.noise.lab
        relative = {
            "vcd_1e6_per_ml": noise.vcd_relative,
            "glucose_g_per_l": noise.glucose_relative,
            "lactate_g_per_l": noise.lactate_relative,
            "glutamine_mm": noise.glutamine_relative,
            "ammonia_mm": noise.ammonia_relative,
            "titer_g_per_l": noise.titer_relative,
            "osmolality_mosm_per_kg": noise.osmolality_relative,
        }
        draws = self._lab_rng.standard_normal(len(LAB_FIELDS))
        measured: dict[str, float] = {}
        for draw, name in zip(draws, LAB_FIELDS, strict=True):
            value = float(truth[name])
            if name == "viability_pct":
                measured[name] = float(min(100.0, max(0.0, value + noise.viability_pct * draw)))
            else:
                # An assay never reports a negative concentration; it reports zero.
                measured[name] = float(max(0.0, value * (1.0 + relative[name] * draw)))
        return measured

    def _publish(self, sample: _PendingSample) -> None:
        self._sample_seq = (self._sample_seq + 1) & UINT32_MAX
        result = LabResult(**{**sample.result.__dict__, "seq": self._sample_seq})
        self._sample_registers = {"Sample.TakenAt": result.taken_at_h}
        for tag, name in LAB_FIELD_BY_TAG.items():
            self._sample_registers[tag] = getattr(result, name)
        self.published.append(result)
        self.published_at_h.append(self.process_time_h)
        self.recipe.on_lab_result(result, volume_l=sample.volume_l, glucose_delivered_g=sample.glucose_delivered_g)

    # ----------------------------------------------------------------- reads

    def snapshot(self) -> dict[str, TagReading]:
        """Scan every readable tag now, with the quality and scan time a real PLC would attach."""
        now_h = self.process_time_h
        readings: dict[str, TagReading] = {}
        for tag, value in self._online_values().items():
            readings[tag] = self._faulted_reading(tag, value, now_h)
        readings["Sample.Seq"] = TagReading(self._sample_seq, True, now_h)
        for tag, value in self._sample_registers.items():
            readings[tag] = TagReading(value, math.isfinite(value), now_h)
        readings["Status.ProcessTime"] = TagReading(now_h, True, now_h)
        readings["Status.BatchId"] = TagReading(self._batch.batch_id, True, now_h)
        readings["Status.Phase"] = TagReading(self.phase, True, now_h)
        readings["Status.RemoteEnabled"] = TagReading(self.remote_enabled, True, now_h)
        readings["Status.WatchdogTripped"] = TagReading(self.watchdog_tripped, True, now_h)
        for tag, value in self._setpoints.items():
            readings[tag] = TagReading(value, True, now_h)
        readings["SP.HarvestRequest"] = TagReading(self._harvest_request, True, now_h)
        readings["MPC.Heartbeat"] = TagReading(self._heartbeat, True, now_h)
        readings["MPC.Mode"] = TagReading(self._mode, True, now_h)
        for tag, value in self._recommendation.items():
            readings[tag] = TagReading(value, True, now_h)
        readings["Sim.Lockstep"] = TagReading(self.lockstep, True, now_h)
        return readings

    def _online_values(self) -> dict[str, float]:
        noise = self._simulation.noise.online
        observed = self.plant.observables_now(self._active_inputs())
        z = self._online_rng.standard_normal(len(PV_TAGS))
        running = self.phase == PHASE_RUNNING
        values = {
            "PV.Temperature": observed["temperature"] + noise.temperature_degc * z[0],
            "PV.pH": self._plc.ph_setpoint + noise.ph * z[1],
            "PV.DO": self._plc.do_setpoint_pct + noise.do_pct * z[2],
            "PV.Volume": observed["volume"] + noise.volume_l * z[3],
            "PV.FeedTotal": self.plant.feed_total_l,
            "PV.GlucoseFeedTotal": self.plant.glucose_feed_total_l,
            "PV.BaseTotal": max(0.0, observed["base_added"] + noise.base_total_l * z[6]),
            "PV.OUR": observed["our"] * (1.0 + noise.our_relative * z[7]) if running else 0.0,
            "PV.CER": observed["cer"] * (1.0 + noise.cer_relative * z[8]) if running else 0.0,
            "PV.Capacitance": observed["capacitance"] * (1.0 + noise.capacitance_relative * z[9]),
            "PV.AgitationSpeed": self._plc.agitation_rpm if running else 0.0,
        }
        return {tag: float(value) for tag, value in values.items()}

    def _faulted_reading(self, tag: str, value: float, now_h: float) -> TagReading:
        active = [
            fault
            for fault in self._simulation.faults
            if isinstance(fault, ProbeFault) and fault.tag == tag and fault.start_h <= now_h and (fault.end_h is None or now_h < fault.end_h)
        ]
        if not active:
            self._frozen_readings.pop(tag, None)
            self._last_good_pv[tag] = value
            return TagReading(value, True, now_h)
        mode = active[-1].mode
        if mode == "bad":
            return TagReading(self._last_good_pv.get(tag, 0.0), False, now_h)
        if mode == "nan":
            return TagReading(math.nan, True, now_h)
        frozen = self._frozen_readings.setdefault(tag, TagReading(self._last_good_pv.get(tag, value), True, now_h))
        if mode == "frozen":
            return TagReading(frozen.value, True, now_h)
        return frozen  # stale: value and scan time both stop

    # ---------------------------------------------------------------- writes

    def write_setpoint(self, tag: str, value: float) -> None:
        """Write ``SP.FeedRate``, ``SP.GlucoseRate`` or ``SP.Temperature`` as the runtime would."""
        if tag not in self._ranges:
            raise KeyError(f"{tag!r} is not a writable setpoint; expected one of {', '.join(self._ranges)}")
        if not self.remote_enabled:
            raise RemoteDisabledError(f"{tag}: remote is disabled, write refused", tag=tag)
        low, high = self._ranges[tag]
        if not (math.isfinite(value) and low <= value <= high):
            raise SetpointOutOfRangeError(f"{tag}: {value!r} outside [{low}, {high}], old setpoint kept", tag=tag)
        self._setpoints[tag] = float(value)

    def write_setpoints(self, setpoints: Setpoints) -> None:
        for tag, value in zip(SETPOINT_SIGNALS, (setpoints.feed_rate_lph, setpoints.glucose_rate_lph, setpoints.temperature_degc), strict=True):
            self.write_setpoint(tag, value)
        if setpoints.harvest:
            self.request_harvest(True)

    def request_harvest(self, value: bool) -> None:
        if not self.remote_enabled:
            raise RemoteDisabledError("SP.HarvestRequest: remote is disabled, write refused", tag="SP.HarvestRequest")
        self._harvest_request = bool(value)
        if self._harvest_request:
            self._harvest("harvest requested by the runtime")

    def write_heartbeat(self, value: int) -> None:
        if not 0 <= value <= UINT32_MAX:
            raise SetpointOutOfRangeError(f"MPC.Heartbeat: {value!r} is not a UInt32", tag="MPC.Heartbeat")
        if value != self._heartbeat:
            self._heartbeat = value
            self._heartbeat_minute = self.minute
            self.watchdog_tripped = False

    def write_mode(self, value: int) -> None:
        if value not in (0, 1, 2):
            raise SetpointOutOfRangeError(f"MPC.Mode: {value!r} is not 0 (off), 1 (advisory) or 2 (closed loop)", tag="MPC.Mode")
        self._mode = value

    def write_recommendation(self, tag: str, value: float) -> None:
        if tag not in self._recommendation:
            raise KeyError(f"{tag!r} is not a recommendation tag; expected one of {', '.join(self._recommendation)}")
        if not math.isfinite(value):
            raise SetpointOutOfRangeError(f"{tag}: {value!r} is not a finite number", tag=tag)
        self._recommendation[tag] = float(value)

    def set_operator_remote(self, remote: bool) -> None:
        """The operator's remote/local switch on the HMI."""
        self._operator_switch_remote = remote

    def write(self, tag: str, value: Any) -> None:
        """Write any writable tag by its logical name (what a protocol server calls)."""
        if tag in self._ranges:
            self.write_setpoint(tag, float(value))
        elif tag == "SP.HarvestRequest":
            self.request_harvest(bool(value))
        elif tag == "MPC.Heartbeat":
            self.write_heartbeat(int(value))
        elif tag == "MPC.Mode":
            self.write_mode(int(value))
        else:
            self.write_recommendation(tag, float(value))
