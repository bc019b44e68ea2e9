"""The reference PLC's own logic, without a plant: what a PLC program does whatever sits behind its field I/O.

Remote/local, the heartbeat watchdog, the equipment's ranges on setpoint
writes, the local platform recipe, the batch phases and harvest, the
``MPC.*`` registers and the ``Sample.*`` registers a published lab result
fills. Two PLCs are built on it: :class:`~simulator.plc.SimulatedPlc` (the
all-in-one ``plc-sim``, with the plant in the same object) and
:class:`~simulator.soft_plc.SoftPlc` (a soft PLC whose plant is ``plant-sim``
behind an I/O interface). A subclass gives the batch clock (:attr:`minute`)
and the volume the recipe's feed stop sees.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.config import BatchConfig
from controller.quality import SAMPLE_SIGNALS, SETPOINT_SIGNALS
from controller.recipe import PlatformRecipe
from controller.types import LAB_FIELDS, PHASE_HARVESTED, PHASE_RUNNING, UINT32_MAX, LabResult, Setpoints
from plant_models.errors import RemoteDisabledError, SetpointOutOfRangeError
from simulator.config import OperatorLocalFault, PlcConfig, SimulationConfig
from simulator.plant import MINUTES_PER_HOUR

LAB_FIELD_BY_TAG = dict(zip(SAMPLE_SIGNALS, LAB_FIELDS, strict=True))
RECOMMENDATION_TAGS = ("MPC.Rec.FeedRate", "MPC.Rec.GlucoseRate", "MPC.Rec.Temperature", "MPC.Rec.HarvestTime", "MPC.Pred.HarvestTiter")


@dataclass(frozen=True)
class TagReading:
    """One scanned value: what an OPC UA DataValue or a Modbus register block carries."""

    value: float | int | bool | str
    good: bool
    scanned_at_h: float


class PlcLogic(ABC):
    """The reference PLC's logic on a batch clock that a subclass keeps."""

    def __init__(self, *, batch: BatchConfig, simulation: SimulationConfig) -> None:
        self._simulation = simulation
        self._plc: PlcConfig = simulation.plc
        self.lockstep = False
        """Set by a server that pauses the plant at every cycle boundary (``Sim.Lockstep``)."""
        self._operator_switch_remote = self._plc.remote_enabled_at_start
        self._heartbeat = 0
        self._mode = 0
        self._recommendation = dict.fromkeys(RECOMMENDATION_TAGS, 0.0)
        self._sample_seq = 0
        self._batch = batch

    @property
    @abstractmethod
    def minute(self) -> int:
        """The batch clock: whole minutes since inoculation."""

    @abstractmethod
    def recipe_volume_l(self) -> float:
        """The working volume the local recipe's feed stop sees."""

    def _start_logic(self, batch: BatchConfig) -> None:
        """Start ``batch`` at process time 0: recipe, setpoints, ranges, watchdog, empty sample registers."""
        self._batch = batch
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
        self.published: list[LabResult] = []
        self.published_at_h: list[float] = []
        """Process time each of :attr:`published` appeared on the Sample.* tags."""

    # ----------------------------------------------------------------- clock

    @property
    def process_time_h(self) -> float:
        return self.minute / MINUTES_PER_HOUR

    @property
    def remote_enabled(self) -> bool:
        return self._operator_remote() and not self.watchdog_tripped and self.phase == PHASE_RUNNING

    @property
    def heartbeat(self) -> int:
        return self._heartbeat

    def next_cycle_boundary_h(self) -> float:
        return (self.minute // self.cycle_minutes + 1) * self.cycle_minutes / MINUTES_PER_HOUR

    def _logic_event_minutes(self) -> list[int]:
        """The minutes at which the logic itself acts: every hour (the recipe), the latest harvest, the watchdog, the operator's switch."""
        candidates = [(self.minute // MINUTES_PER_HOUR + 1) * MINUTES_PER_HOUR, self._latest_harvest_minute]
        if not self.watchdog_tripped:
            candidates.append(self._heartbeat_minute + self._watchdog_minutes)
        for fault in self._simulation.faults:
            if isinstance(fault, OperatorLocalFault):
                for edge_h in (fault.start_h, fault.end_h):
                    if edge_h is not None:
                        candidates.append(round(edge_h * MINUTES_PER_HOUR))
        return candidates

    def active_inputs(self) -> np.ndarray:
        """The actuator outputs now: nutrient feed L/h, glucose feed L/h, temperature setpoint °C."""
        return np.array([self._setpoints["SP.FeedRate"], self._setpoints["SP.GlucoseRate"], self._setpoints["SP.Temperature"]])

    # ---------------------------------------------------------------- events

    def _check_watchdog(self) -> None:
        if not self.watchdog_tripped and self.minute - self._heartbeat_minute >= self._watchdog_minutes:
            self.watchdog_tripped = True

    def _run_logic(self) -> None:
        """Harvest at the latest allowed time; in local, the recipe's setpoints and its own harvest."""
        if self.phase != PHASE_RUNNING:
            return
        if self.minute >= self._latest_harvest_minute:
            self._harvest("latest allowed harvest time reached")
            return
        if not self.remote_enabled:
            recipe = self.recipe.setpoints(self.process_time_h, volume_l=self.recipe_volume_l())
            self._setpoints = {"SP.FeedRate": recipe.feed_rate_lph, "SP.GlucoseRate": recipe.glucose_rate_lph, "SP.Temperature": recipe.temperature_degc}
            if recipe.harvest:
                self._harvest("local recipe")

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

    def publish_lab_result(self, result: LabResult, *, volume_l: float, glucose_delivered_g: float) -> None:
        """Put a lab result set on the ``Sample.*`` tags (``Sample.Seq`` moves) and hand it to the local recipe.

        ``volume_l`` and ``glucose_delivered_g`` are the values at the draw.
        """
        self._sample_seq = (self._sample_seq + 1) & UINT32_MAX
        published = LabResult(**{**result.__dict__, "seq": self._sample_seq})
        self._sample_registers = {"Sample.TakenAt": published.taken_at_h}
        for tag, name in LAB_FIELD_BY_TAG.items():
            self._sample_registers[tag] = getattr(published, name)
        self.published.append(published)
        self.published_at_h.append(self.process_time_h)
        self.recipe.on_lab_result(published, volume_l=volume_l, glucose_delivered_g=glucose_delivered_g)

    # ----------------------------------------------------------------- reads

    def logic_readings(self, now_h: float) -> dict[str, TagReading]:
        """Every readable tag the logic itself holds (all but the online ``PV.*``), scanned at ``now_h``."""
        readings: dict[str, TagReading] = {}
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
