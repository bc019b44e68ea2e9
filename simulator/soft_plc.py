"""The soft PLC: the reference PLC's logic as a process of its own, its plant behind field I/O (``plant-sim``).

:class:`SoftPlc` is the PLC program: :class:`~simulator.plc_logic.PlcLogic`
(remote/local, watchdog, ranges, recipe, harvest) with a field I/O image
instead of a plant. Each scan takes the raw inputs in the I/O map's scaling
(:mod:`simulator.io_map`), marks a 4–20 mA channel outside its fault limits
Bad (a wire break), as it does a channel whose wire-break status bit is set
(a Modbus map's ``wire_break_coil``), totalises the two flow meters, takes a result set from
the LIMS tags when their ``seq`` moves, and drives the outputs: the pumps,
the temperature setpoint, the harvest valve.

:class:`SoftPlcRunner` serves it: the reference interface to the runtime by
composition with the very servers ``plc-sim`` uses (:class:`~simulator.opcua_server.OpcUaPlcServer`,
:class:`~simulator.modbus_server.ModbusPlcServer`), and the I/O tags to
``plant-sim``: :class:`IoServer`, a small OPC UA server, or for a Modbus I/O
map :class:`~simulator.modbus_server.ModbusIoServer`, a Modbus TCP I/O device
(the map's ``protocol`` chooses). Its clocks:

- **lockstep** (virtual time): as ``plc-sim``, the PLC pauses at every cycle
  boundary until ``MPC.Heartbeat`` moves; between pauses it steps from event
  to event (the hour, the watchdog, the operator's switch, harvest), and at
  each step names the minute on ``clock.plc_minute`` and waits for the plant
  to answer on ``clock.plant_minute``. A plant that does not answer within
  ``plant_timeout_s`` is a missed scan: counted, logged, and the PLC scans the
  inputs it has.
- **free-running** at ``time_scale``: a scan every ``scan_period_s`` of wall
  time on the batch clock ``elapsed × time_scale``; a scan that overruns its
  period misses the next ones: counted and logged (:attr:`SoftPlcRunner.missed_scans`).

The all-in-one probe faults of a simulation config (``kind: probe``) are the
simulated PLC's and are not applied here: at the field I/O the plant-sim's
I/O faults (:mod:`simulator.io_faults`) take their place.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Protocol, cast

import structlog
from asyncua import Server, ua

from controller.config import BatchConfig
from controller.types import LAB_FIELDS, PHASE_RUNNING, LabResult
from simulator.config import SimulationConfig
from simulator.io_map import CHANNEL_OF_PV, NOT_YET, AnalogScaling, DigitalChannel, ModbusIoMap, OpcUaIoMap
from simulator.plant import MINUTES_PER_HOUR
from simulator.plc import SimulatedPlc
from simulator.plc_logic import PlcLogic, TagReading

log = structlog.get_logger(__name__)

OUTPUT_OF_SETPOINT = {"SP.FeedRate": "feed_pump_lph", "SP.GlucoseRate": "glucose_pump_lph", "SP.Temperature": "temperature_setpoint_degc"}


class SoftPlc(PlcLogic):
    """The reference PLC's program on a field I/O image."""

    def __init__(self, *, batch: BatchConfig, simulation: SimulationConfig, io_map: OpcUaIoMap | ModbusIoMap) -> None:
        super().__init__(batch=batch, simulation=simulation)
        self._io = io_map
        self._minute = 0
        self._start_logic(batch)
        self._inoculation_volume_l = batch.inoculation.volume_l
        self._field: dict[str, tuple[float, bool]] = {}
        """Each input's engineering value and health at the last scan."""
        self.feed_total_l = 0.0
        self.glucose_feed_total_l = 0.0
        self._lims_seq = 0
        self.lab_results_rejected = 0
        """LIMS sets refused for a draw time that is no process time (not a number, infinite, before inoculation): not published."""
        self._trend: list[tuple[int, float, float]] = []
        """(minute, load-cell volume, nominal glucose delivered) at every scan: what the recipe needs at a sample's draw time."""
        self._scanned = False

    @property
    def minute(self) -> int:
        return self._minute

    def recipe_volume_l(self) -> float:
        value, good = self._field.get("volume_l", (self._inoculation_volume_l, True))
        return value if good else self._last_good_volume()

    def _last_good_volume(self) -> float:
        return self._trend[-1][1] if self._trend else self._inoculation_volume_l

    def next_event_minute(self) -> int:
        return min(c for c in self._logic_event_minutes() if c > self.minute)

    # ------------------------------------------------------------------ scan

    def scan(self, minute: int, raw_inputs: dict[str, float], lims: dict[str, float] | None = None, broken: frozenset[str] = frozenset()) -> None:
        """One PLC scan at batch ``minute`` with the inputs the plant put on the field I/O (raw, in the map's scaling).

        ``broken``: the channels whose input terminal reports a broken loop in
        its status (a Modbus map's wire-break coil): failed whatever their value.
        """
        if minute < self._minute:
            raise ValueError(f"the batch clock runs forward: scan at minute {minute} after {self._minute}")
        if self.phase != PHASE_RUNNING:
            return
        hours = (minute - self._minute) / MINUTES_PER_HOUR
        for channel, raw in raw_inputs.items():
            spec: AnalogScaling | None = getattr(self._io.inputs, channel)
            if spec is not None:
                value, good = spec.to_engineering(raw)
                self._field[channel] = (value, good and channel not in broken)
        # The flow meters show what the pumps delivered since the last scan; a failed meter adds nothing (the totaliser holds).
        for meter, attribute in (("feed_flow_lph", "feed_total_l"), ("glucose_flow_lph", "glucose_feed_total_l")):
            flow, good = self._field.get(meter, (0.0, False))
            if good and self._scanned:
                setattr(self, attribute, getattr(self, attribute) + max(0.0, flow) * hours)
        self._minute = minute
        self._scanned = True
        volume, good = self._field.get("volume_l", (math.nan, False))
        self._trend.append((minute, volume if good else self._last_good_volume(), self._batch.media.glucose_delivered_g(self.feed_total_l, self.glucose_feed_total_l)))
        self._check_watchdog()
        if lims is not None:
            self._take_lab_result(lims)
        self._run_logic()

    def _take_lab_result(self, lims: dict[str, float]) -> None:
        seq = int(lims["seq"])
        if seq == self._lims_seq or seq == 0:
            return
        self._lims_seq = seq
        taken_at_h = float(lims["taken_at_h"])
        if not (math.isfinite(taken_at_h) and taken_at_h >= 0.0):
            # A set without a draw time cannot be placed in the batch (the runtime's estimator, the recipe's glucose balance):
            # the PLC refuses it whole, Sample.* keep the last published set, and it says so; the LIMS may send it again with a new seq.
            self.lab_results_rejected += 1
            log.warning(
                "soft_plc_lab_result_rejected",
                seq=seq,
                taken_at_h=repr(taken_at_h),
                reason="taken_at_h is not a process time (finite, at or after inoculation)",
                rejected_total=self.lab_results_rejected,
                process_time_h=self.process_time_h,
            )
            return
        result = LabResult(seq=0, taken_at_h=taken_at_h, **{name: float(lims[name]) for name in LAB_FIELDS})
        draw_minute = round(result.taken_at_h * MINUTES_PER_HOUR)
        at_draw = [row for row in self._trend if row[0] <= draw_minute] or self._trend[:1]
        _, volume_l, glucose_g = at_draw[-1]
        self.publish_lab_result(result, volume_l=volume_l, glucose_delivered_g=glucose_g)
        log.info("soft_plc_lab_result", seq=seq, taken_at_h=result.taken_at_h, process_time_h=self.process_time_h)

    def outputs(self) -> dict[str, float | bool]:
        """The actuator outputs in engineering units (the harvest valve opens at harvest; the pumps stop)."""
        harvested = self.phase != PHASE_RUNNING
        values: dict[str, float | bool] = {
            output: 0.0 if harvested and output != "temperature_setpoint_degc" else value for output, value in zip(OUTPUT_OF_SETPOINT.values(), self.active_inputs(), strict=True)
        }
        values["harvest_valve"] = harvested
        return values

    # ----------------------------------------------------------------- reads

    def snapshot(self) -> dict[str, TagReading]:
        """Every readable tag of the reference interface now: the inputs as scanned, the totalisers, the logic's own."""
        now_h = self.process_time_h
        readings: dict[str, TagReading] = {}
        for tag, channel in CHANNEL_OF_PV.items():
            value, good = self._field.get(channel, (0.0, False))
            readings[tag] = TagReading(value if math.isfinite(value) else 0.0, good, now_h)
        readings["PV.FeedTotal"] = TagReading(self.feed_total_l, True, now_h)
        readings["PV.GlucoseFeedTotal"] = TagReading(self.glucose_feed_total_l, True, now_h)
        readings.update(self.logic_readings(now_h))
        return readings


# ------------------------------------------------------------------ I/O server


class IoServer:
    """The soft PLC's field I/O as a small OPC UA server: one variable per tag of the I/O map (``plant-sim`` writes the inputs, reads the outputs)."""

    def __init__(self, io_map: OpcUaIoMap, *, endpoint: str | None = None) -> None:
        self.io_map = io_map
        self.endpoint = endpoint or io_map.endpoint
        self._server = Server()
        self._nodes: dict[str, ua.NodeId] = {}

    def _variant(self, path: str, value: Any) -> ua.Variant:
        section, _, name = path.partition(".")
        if section == "clock" or path == "lims.seq":
            return ua.Variant(int(value), ua.VariantType.UInt32)
        if section == "lims":
            return ua.Variant(float(value), ua.VariantType.Double)
        spec = getattr(getattr(self.io_map, section), name)
        if isinstance(spec, DigitalChannel):
            return ua.Variant(bool(value), ua.VariantType.Boolean)
        if spec.counts:
            return ua.Variant(int(value), ua.VariantType.Int16)
        return ua.Variant(float(value), ua.VariantType.Double)

    async def start(self) -> None:
        server = self._server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("bioreactor-mpc soft PLC field I/O")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = await server.register_namespace(self.io_map.namespace_uri)
        folder = await server.nodes.objects.add_folder(ua.NodeId("IO", index), ua.QualifiedName("IO", index))  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes
        for path, node in self.io_map.nodes().items():
            initial: Any = NOT_YET if path == "clock.plant_minute" else (math.nan if path.startswith("lims.") and path != "lims.seq" else 0)
            if path.startswith("inputs."):
                spec = getattr(self.io_map.inputs, path.partition(".")[2])
                initial = spec.counts_of_current(0.0) if spec.counts else math.nan  # nothing wired yet: a dead loop
            if path == "clock.plc_minute":
                initial = NOT_YET
            variable = await folder.add_variable(ua.NodeId(node, index), ua.QualifiedName(node, index), self._variant(path, initial))  # type: ignore[arg-type]
            await variable.set_writable()
            self._nodes[path] = variable.nodeid
        await server.start()
        log.info("soft_plc_io_started", endpoint=self.endpoint, tags=len(self._nodes))

    async def stop(self) -> None:
        await self._server.stop()

    async def read(self, paths: list[str]) -> dict[str, Any]:
        values = {}
        for path in paths:
            variant = self._server.read_attribute_value(self._nodes[path]).Value
            values[path] = variant.Value if variant is not None else None
        return values

    async def write(self, values: dict[str, Any]) -> None:
        for path, value in values.items():
            await self._server.write_attribute_value(self._nodes[path], ua.DataValue(self._variant(path, value)))

    async def read_inputs(self) -> tuple[dict[str, float], dict[str, float] | None, frozenset[str]]:
        """The raw inputs by channel, the LIMS tags (None without them in the map), and no channel reported broken (OPC UA maps carry no wire-break status)."""
        paths = [path for path in self._nodes if path.startswith("inputs.")]
        values = await self.read(paths)
        inputs = {path.partition(".")[2]: float(value) for path, value in values.items()}
        lims = None
        if self.io_map.lims is not None:
            lims_values = await self.read([path for path in self._nodes if path.startswith("lims.")])
            lims = {path.partition(".")[2]: float(value) for path, value in lims_values.items()}
        return inputs, lims, frozenset()

    async def write_outputs(self, outputs: dict[str, float | bool], *, plc_minute: int | None) -> None:
        raw: dict[str, Any] = {}
        for name, value in outputs.items():
            spec = getattr(self.io_map.outputs, name)
            raw[f"outputs.{name}"] = bool(value) if isinstance(spec, DigitalChannel) else spec.to_raw(float(value))
        if plc_minute is not None and self.io_map.clock is not None:
            raw["clock.plc_minute"] = plc_minute
        await self.write(raw)

    async def plant_minute(self) -> int:
        return int((await self.read(["clock.plant_minute"]))["clock.plant_minute"])


class FieldIoServer(Protocol):
    """The soft PLC's field I/O towards plant-sim: :class:`IoServer` (OPC UA) or :class:`~simulator.modbus_server.ModbusIoServer` (Modbus TCP)."""

    @property
    def io_map(self) -> OpcUaIoMap | ModbusIoMap: ...

    @property
    def endpoint(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def read_inputs(self) -> tuple[dict[str, float], dict[str, float] | None, frozenset[str]]: ...

    async def write_outputs(self, outputs: dict[str, float | bool], *, plc_minute: int | None) -> None: ...

    async def plant_minute(self) -> int: ...


class SoftPlcRunner:
    """Runs a :class:`SoftPlc`: the reference server towards the runtime, the field I/O server towards the plant, and the PLC's clock."""

    def __init__(self, plc: SoftPlc, reference_server: Any, io_server: FieldIoServer) -> None:
        self.plc = plc
        self.reference = reference_server
        self.io = io_server
        self.missed_scans = 0
        self.scans = 0
        self.worst_overrun_s = 0.0
        self.scan_wall_s: list[float] = []

    @staticmethod
    def served(plc: SoftPlc) -> SimulatedPlc:
        """The soft PLC as the protocol servers' constructors type their PLC: they call only the reference interface (snapshot, write, heartbeat, clock), which both have."""
        return cast(SimulatedPlc, plc)

    async def _scan(self, minute: int, *, plant_timeout_s: float | None) -> None:
        begun = time.monotonic()
        await self.io.write_outputs(self.plc.outputs(), plc_minute=minute)
        if plant_timeout_s is not None and self.io.io_map.clock is not None:
            deadline = time.monotonic() + plant_timeout_s
            while await self.io.plant_minute() != minute:
                if time.monotonic() > deadline:
                    self.missed_scans += 1
                    log.warning("soft_plc_plant_late", minute=minute, plant_timeout_s=plant_timeout_s, missed_total=self.missed_scans)
                    break
                await asyncio.sleep(0.001)
        inputs, lims, broken = await self.io.read_inputs()
        self.plc.scan(minute, inputs, lims, broken)
        await self.io.write_outputs(self.plc.outputs(), plc_minute=None)
        self.scans += 1
        self.scan_wall_s.append(time.monotonic() - begun)

    async def run_lockstep(self, *, wall_timeout_s: float = 30.0, plant_timeout_s: float = 10.0) -> None:
        """Virtual time: pause at every cycle boundary until the heartbeat moves (or ``wall_timeout_s``); step the plant event by event in between."""
        self.plc.lockstep = True
        await self._scan(0, plant_timeout_s=plant_timeout_s)
        while self.plc.phase == PHASE_RUNNING:
            self.reference.heartbeat_moved.clear()
            await self.reference.publish()
            try:
                await asyncio.wait_for(self.reference.heartbeat_moved.wait(), timeout=wall_timeout_s)
            except TimeoutError:
                log.warning("lockstep_timeout", process_time_h=self.plc.process_time_h, wall_timeout_s=wall_timeout_s)
            boundary = round(self.plc.next_cycle_boundary_h() * MINUTES_PER_HOUR)
            while self.plc.phase == PHASE_RUNNING and self.plc.minute < boundary:
                await self._scan(min(boundary, self.plc.next_event_minute()), plant_timeout_s=plant_timeout_s)
        await self.io.write_outputs(self.plc.outputs(), plc_minute=self.plc.minute)
        await self.reference.publish()

    async def run_free(self, *, time_scale: float, scan_period_s: float = 0.05, plant_timeout_s: float = 60.0) -> None:
        """A scan every ``scan_period_s`` on the batch clock ``elapsed × time_scale``; overruns are missed scans, counted.

        With the I/O map's clock section the batch starts (the clock at 0)
        when plant-sim first answers, or after ``plant_timeout_s`` without it,
        so the PLC's and the plant's clocks start within one exchange of each other.
        """
        if not time_scale > 0.0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.plc.lockstep = False
        await self.reference.publish()
        if self.io.io_map.clock is not None:
            deadline = time.monotonic() + plant_timeout_s
            while await self.io.plant_minute() == NOT_YET and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        tick = 0
        while self.plc.phase == PHASE_RUNNING:
            minute = max(self.plc.minute, math.floor((time.monotonic() - started) * time_scale / 60.0))
            await self._scan(minute, plant_timeout_s=None)
            await self.reference.publish()
            tick += 1
            late_s = time.monotonic() - (started + tick * scan_period_s)
            if late_s > 0.0:
                missed = 1 + math.floor(late_s / scan_period_s)
                self.missed_scans += missed
                self.worst_overrun_s = max(self.worst_overrun_s, late_s)
                tick += missed
                log.warning("soft_plc_scan_missed", missed=missed, late_s=round(late_s, 3), process_time_h=self.plc.process_time_h, missed_total=self.missed_scans)
            else:
                await asyncio.sleep(-late_s)
        await self.io.write_outputs(self.plc.outputs(), plc_minute=self.plc.minute)
        await self.reference.publish()

    def summary(self) -> dict[str, Any]:
        walls = sorted(self.scan_wall_s)
        return {
            "scans": self.scans,
            "missed_scans": self.missed_scans,
            "worst_overrun_s": round(self.worst_overrun_s, 4),
            "scan_wall_s_median": walls[len(walls) // 2] if walls else None,
            "scan_wall_s_max": walls[-1] if walls else None,
            "process_time_h": self.plc.process_time_h,
            "harvest_reason": self.plc.harvest_reason,
            "lab_results": len(self.plc.published),
            "lab_results_rejected": self.plc.lab_results_rejected,
        }
