"""``plant-sim``: the plant as an I/O simulator, a client of a PLC's field I/O over OPC UA or Modbus TCP.

:class:`PlantSimulator` is the sans-I/O core: the plant model with the
seed's true parameters, its instruments (:func:`simulator.plc.online_values`)
and its lab (:class:`~simulator.lims.Lims`), exactly the pieces the all-in-one
``plc-sim`` uses, so a seed gives the same truth, draw times and assay noise.
It takes the PLC's actuator outputs, integrates, and gives the raw values of
the PLC's inputs in the PLC's own scaling (:mod:`simulator.io_map`), with the
I/O faults of :mod:`simulator.io_faults` applied on the way.

:func:`run_plant_io` moves the data through :class:`PlcIoClient` (OPC UA) or
:class:`ModbusPlcIoClient` (Modbus TCP, the registers encoded with the
runtime's codec, :mod:`interfaces.modbus_codec`), as the map's ``protocol``
says: it reads the outputs, integrates and writes the inputs (and released
lab results, through the LIMS tags) either

- in **virtual time** with a soft PLC (the map's ``clock``): the plant
  integrates to the minute the PLC names and answers with the minute it
  reached; nothing is lost however slow either side is; or
- **free-running** at ``time_scale`` plant seconds per wall second (1: real
  time), exchanging every ``exchange_period_s``: an exchange that overruns
  its period makes the plant hold the PLC's outputs longer than it should;
  it is counted (:attr:`PlantRunReport.missed_exchanges`) and logged, never
  hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog
from asyncua import Client, ua
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from controller.types import LAB_FIELDS, UINT32_MAX, LabResult
from interfaces.modbus_codec import MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ, EncodedWrite, from_registers, to_registers, write_requests
from interfaces.modbus_port import exception_reason
from plant_models.errors import BioreactorMPCError
from simulator.batch import plant_of, true_parameter_factors
from simulator.config import FeedLotFault, LoadedSimulation
from simulator.io_faults import FrozenInput, IoFault, PumpDegraded, StuckActuator, WireBreak
from simulator.io_map import CHANNEL_OF_PV, NOT_YET, AnalogScaling, ModbusAnalogOutput, ModbusIoMap, ModbusSlot, ModbusValue, OpcUaIoMap
from simulator.lims import Lims
from simulator.plant import MINUTES_PER_HOUR, Plant
from simulator.plc import InstrumentNoise, online_values

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ActuatorCommand:
    """The PLC's outputs in engineering units, as ``plant-sim`` read them."""

    feed_pump_lph: float
    glucose_pump_lph: float
    temperature_setpoint_degc: float
    harvest_valve: bool

    def value(self, channel: str) -> float:
        return float(getattr(self, channel))


ANALOG_OUTPUTS = ("feed_pump_lph", "glucose_pump_lph", "temperature_setpoint_degc")
PUMP_OUTPUTS = ("feed_pump_lph", "glucose_pump_lph")


@dataclass
class UnusableOutput:
    """An analog output whose drive signal was unusable (not a number: a NaN float, 4–20 mA counts at underflow or overflow), over the run.

    What the plant did instead: a pump stops (0 L/h); the jacket holds the
    last valid temperature setpoint.
    """

    episodes: int = 0
    """Stretches of consecutive exchanges that read it unusable."""
    exchanges: int = 0
    """Exchanges (commands read from the PLC) that read it unusable."""
    plant_minutes: int = 0
    """Plant minutes integrated with the substitute."""
    since_h: float | None = None
    """Process time the current episode began; None while the signal is usable."""

    def as_dict(self) -> dict[str, float | int | None]:
        return {"episodes": self.episodes, "exchanges": self.exchanges, "plant_h": self.plant_minutes / MINUTES_PER_HOUR, "unusable_since_h": self.since_h}


class PlantSimulator:
    """The plant, its instruments and its lab behind a PLC's field I/O, on the plant's 1-minute grid."""

    def __init__(self, loaded: LoadedSimulation, io_map: OpcUaIoMap | ModbusIoMap, faults: Sequence[IoFault] = ()) -> None:
        truth_rng, sampling_rng, lab_rng, online_rng = (np.random.default_rng(child) for child in np.random.SeedSequence(loaded.simulation.seed).spawn(4))
        self._loaded = loaded
        self._io = io_map
        self.faults = tuple(faults)
        model = plant_of(loaded)
        self._true_parameters = model.true_parameters(loaded.batch, true_parameter_factors(loaded.simulation, truth_rng))
        self._feed_strength_index = model.parameter_index(model.feed_strength_parameter)
        self.plant = Plant(model, model.initial_state(loaded.batch), self._true_parameters)
        self.lims = Lims(loaded.simulation, sampling_rng, lab_rng)
        self._instruments = InstrumentNoise(online_rng)
        self.harvested = False
        self.released: list[LabResult] = []
        """Every lab result the LIMS released, in order (``seq`` is the LIMS's count)."""
        self._stuck: dict[str, float] = {}
        self._frozen_raw: dict[str, float] = {}
        self._applied = np.zeros(3)
        """The inputs over the last integrated stretch: what the pumps delivered, what the flow meters show."""
        self._started = False
        self.unusable_outputs = {channel: UnusableOutput() for channel in ANALOG_OUTPUTS}
        """Each analog output's unusable drive signals over the run (what plant-sim's report lists)."""
        self._last_valid_temperature_degc = loaded.batch.inoculation.temperature_degc
        """What the jacket holds when its setpoint signal is unusable: the last valid one (the inoculation temperature before any)."""

    # ----------------------------------------------------------------- plant

    def advance_to(self, minute: int, command: ActuatorCommand) -> None:
        """Integrate to ``minute`` with the PLC's outputs held (a valve opened for harvest ends the batch instead)."""
        if self.harvested:
            return
        if command.harvest_valve and not self._actuator_stuck("harvest_valve"):
            self.harvested = True
            log.info("plant_harvested", process_time_h=self.plant.process_time_h)
            return
        command, unusable = self._usable(command)
        if not self._started:
            self._started = True
            self._applied = self._plant_inputs(command)
            self._events()
        while self.plant.minute < minute:
            stop = min(minute, self._next_event_minute())
            self._applied = self._plant_inputs(command)
            for channel in unusable:
                self.unusable_outputs[channel].plant_minutes += stop - self.plant.minute
            self.plant.integrate(stop - self.plant.minute, self._applied)
            self._events()

    def _usable(self, command: ActuatorCommand) -> tuple[ActuatorCommand, list[str]]:
        """What the devices make of the PLC's outputs: an unusable pump signal stops the pump, an unusable temperature setpoint leaves the last valid one.

        Counts each output's unusable commands; logs each episode's start and end, once.
        """
        now_h = self.plant.process_time_h
        unusable: list[str] = []
        for channel in ANALOG_OUTPUTS:
            record = self.unusable_outputs[channel]
            value = command.value(channel)
            if math.isfinite(value):
                if record.since_h is not None:
                    log.info("plant_output_usable_again", output=channel, value=value, process_time_h=now_h, unusable_for_h=now_h - record.since_h)
                    record.since_h = None
                continue
            unusable.append(channel)
            record.exchanges += 1
            if record.since_h is None:
                record.since_h = now_h
                record.episodes += 1
                if channel in PUMP_OUTPUTS:
                    log.warning("plant_output_unusable", output=channel, value=repr(value), process_time_h=now_h, episode=record.episodes, action="pump stopped (0 L/h)")
                else:
                    held = self._last_valid_temperature_degc
                    log.warning("plant_output_unusable", output=channel, value=repr(value), process_time_h=now_h, episode=record.episodes, action=f"jacket holds {held:g} degC")
        if math.isfinite(command.temperature_setpoint_degc):
            self._last_valid_temperature_degc = command.temperature_setpoint_degc
        if not unusable and command.feed_pump_lph >= 0.0 and command.glucose_pump_lph >= 0.0:
            return command, unusable
        usable = ActuatorCommand(  # a stopped pump for an unusable signal; and a pump does not run backwards
            feed_pump_lph=0.0 if "feed_pump_lph" in unusable else max(0.0, command.feed_pump_lph),
            glucose_pump_lph=0.0 if "glucose_pump_lph" in unusable else max(0.0, command.glucose_pump_lph),
            temperature_setpoint_degc=self._last_valid_temperature_degc if "temperature_setpoint_degc" in unusable else command.temperature_setpoint_degc,
            harvest_valve=command.harvest_valve,
        )
        return usable, unusable

    def _next_event_minute(self) -> int:
        now = self.plant.minute
        candidates = [*self.lims.event_minutes()]
        for fault in self._loaded.simulation.faults:
            if isinstance(fault, FeedLotFault):
                candidates.append(round(fault.start_h * MINUTES_PER_HOUR))
        for io_fault in self.faults:
            for edge_h in (io_fault.start_h, io_fault.end_h):
                if edge_h is not None:
                    candidates.append(round(edge_h * MINUTES_PER_HOUR))
        later = [c for c in candidates if c > now]
        return min(later) if later else UINT32_MAX

    def _events(self) -> None:
        now_h = self.plant.process_time_h
        strength = 1.0
        for fault in self._loaded.simulation.faults:
            if isinstance(fault, FeedLotFault) and fault.start_h <= now_h:
                strength = fault.strength
        parameters = self._true_parameters.copy()
        parameters[self._feed_strength_index] *= strength
        if not np.array_equal(parameters, self.plant.parameters):
            self.plant.set_parameters(parameters)
        for sample in self.lims.due(self.plant.minute):
            self.released.append(LabResult(**{**sample.result.__dict__, "seq": len(self.released) + 1}))
        media = self._loaded.batch.media
        self.lims.draw_due(self.plant, self._applied, media.glucose_delivered_g(self.plant.feed_total_l, self.plant.glucose_feed_total_l))

    def _plant_inputs(self, command: ActuatorCommand) -> np.ndarray:
        """What reaches the culture from now on: the commands, through stuck and degraded actuators.

        A stuck actuator keeps what it did over the stretch before its fault began.
        """
        now_h = self.plant.process_time_h
        values: dict[str, float] = {}
        for index, channel in enumerate(ANALOG_OUTPUTS):
            value = command.value(channel)
            if self._actuator_stuck(channel):
                value = self._stuck.setdefault(channel, float(self._applied[index]) if self._started else value)
            else:
                self._stuck.pop(channel, None)
            for fault in self.faults:
                if isinstance(fault, PumpDegraded) and fault.channel == channel and fault.active(now_h):
                    value *= fault.delivery_fraction
            values[channel] = value
        return np.array([values["feed_pump_lph"], values["glucose_pump_lph"], values["temperature_setpoint_degc"]])

    def _actuator_stuck(self, channel: str) -> bool:
        now_h = self.plant.process_time_h
        return any(isinstance(fault, StuckActuator) and fault.channel == channel and fault.active(now_h) for fault in self.faults)

    # ---------------------------------------------------------------- inputs

    def input_values(self) -> dict[str, float]:
        """What each of the PLC's inputs measures now, in engineering units (no I/O fault applied); the flow meters show the last stretch's flows."""
        pv = online_values(self.plant, self._applied, self._loaded.simulation.noise.online, self._loaded.simulation.plc, self._instruments, running=not self.harvested)
        values = {channel: pv[tag] for tag, channel in CHANNEL_OF_PV.items()}
        values["feed_flow_lph"] = float(self._applied[0])
        values["glucose_flow_lph"] = float(self._applied[1])
        return values

    def raw_inputs(self) -> dict[str, float | int]:
        """The raw value of every mapped input in the PLC's scaling, with the I/O faults active now."""
        now_h = self.plant.process_time_h
        raw: dict[str, float | int] = {}
        for channel, value in self.input_values().items():
            spec: AnalogScaling | None = getattr(self._io.inputs, channel)
            if spec is None:
                continue
            wire = next((f for f in self.faults if isinstance(f, WireBreak) and f.channel == channel and f.active(now_h)), None)
            if wire is not None:
                raw[channel] = spec.counts_of_current(wire.current_ma) if spec.counts else math.nan
            else:
                raw[channel] = spec.to_raw(value)
            if any(isinstance(f, FrozenInput) and f.channel == channel and f.active(now_h) for f in self.faults):
                raw[channel] = self._frozen_raw.setdefault(channel, raw[channel])
            else:
                self._frozen_raw.pop(channel, None)
        return raw

    def broken_inputs(self) -> frozenset[str]:
        """The inputs whose loop is broken now (a wire break active): what an input terminal's status bit reports."""
        now_h = self.plant.process_time_h
        return frozenset(f.channel for f in self.faults if isinstance(f, WireBreak) and f.active(now_h) and getattr(self._io.inputs, f.channel) is not None)


# ------------------------------------------------------------------ network


@dataclass
class PlantRunReport:
    """How a ``plant-sim`` run went, for its summary and the tests."""

    exchanges: int = 0
    missed_exchanges: int = 0
    """Free-running: exchange deadlines that passed while an exchange was still running (outputs held longer than they should)."""
    worst_overrun_s: float = 0.0
    exchange_wall_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    ended: str = ""
    io_error: str = ""
    """Why the run stopped before harvest on the PLC's side (its I/O refused or stopped answering, its clock went back): the plant so far is kept."""


class PlcIo(Protocol):
    """The PLC's field I/O as plant-sim uses it, whatever the protocol."""

    async def read_command(self) -> tuple[ActuatorCommand, int | None]:
        """The actuator outputs in engineering units, and the PLC's minute (virtual time) or None."""
        ...

    async def write_inputs(self, raw: dict[str, float | int], *, broken: frozenset[str], plant_minute: int | None) -> None:
        """The inputs' raw values (and the wire-break status of those that carry one), then the plant's minute, last."""
        ...

    async def write_lab_result(self, result: LabResult) -> None:
        """A released result set on the PLC's LIMS tags: the values first, ``seq`` last (the PLC takes the set when ``seq`` moves)."""
        ...


class IoDeviceError(BioreactorMPCError, ConnectionError):
    """The PLC's I/O refused a request or did not answer it: which request, which fields of the map, why."""


class PlcIoClient:
    """The PLC's I/O tags of an :class:`~simulator.io_map.OpcUaIoMap` over an asyncua client."""

    def __init__(self, client: Client, io_map: OpcUaIoMap) -> None:
        self._client = client
        self._io = io_map
        self._nodes: dict[str, ua.NodeId] = {}

    async def resolve(self) -> None:
        index = await self._client.get_namespace_index(self._io.namespace_uri)
        self._nodes = {path: ua.NodeId(ua.String(node), ua.Int16(index)) for path, node in self._io.nodes().items()}

    async def read_command(self) -> tuple[ActuatorCommand, int | None]:
        outputs = self._io.outputs
        paths = [f"outputs.{name}" for name in (*ANALOG_OUTPUTS, "harvest_valve")]
        if self._io.clock is not None:
            paths.append("clock.plc_minute")
        values = await self._client.read_values([self._client.get_node(self._nodes[path]) for path in paths])
        engineering = [getattr(outputs, name).drive_value(raw) for name, raw in zip(ANALOG_OUTPUTS, values[:3], strict=True)]
        command = ActuatorCommand(engineering[0], engineering[1], engineering[2], bool(values[3]))
        return command, (int(values[4]) if self._io.clock is not None else None)

    async def write_inputs(self, raw: dict[str, float | int], *, broken: frozenset[str] = frozenset(), plant_minute: int | None) -> None:
        """``broken`` is not written: an OPC UA map carries no wire-break status (the value shows the broken loop)."""
        nodes, values = [], []
        for channel, value in raw.items():
            spec: AnalogScaling = getattr(self._io.inputs, channel)
            nodes.append(self._client.get_node(self._nodes[f"inputs.{channel}"]))
            values.append(ua.DataValue(ua.Variant(int(value), ua.VariantType.Int16) if spec.counts else ua.Variant(float(value), ua.VariantType.Double)))
        if plant_minute is not None and self._io.clock is not None:
            nodes.append(self._client.get_node(self._nodes["clock.plant_minute"]))
            values.append(ua.DataValue(ua.Variant(plant_minute, ua.VariantType.UInt32)))
        await self._client.write_values(nodes, values)

    async def write_lab_result(self, result: LabResult) -> None:
        if self._io.lims is None:
            return
        names = ["taken_at_h", *LAB_FIELDS]
        nodes = [self._client.get_node(self._nodes[f"lims.{name}"]) for name in names]
        await self._client.write_values(nodes, [ua.DataValue(ua.Variant(float(getattr(result, name)), ua.VariantType.Double)) for name in names])
        await self._client.write_values([self._client.get_node(self._nodes["lims.seq"])], [ua.DataValue(ua.Variant(result.seq, ua.VariantType.UInt32))])


@dataclass(frozen=True)
class _Read:
    table: str
    start: int
    count: int


class ModbusPlcIoClient:
    """The PLC's I/O registers and coils of a :class:`~simulator.io_map.ModbusIoMap` over a pymodbus TCP client.

    Numbers are encoded and decoded by the runtime's codec
    (:func:`~interfaces.modbus_codec.to_registers`, :func:`~interfaces.modbus_codec.from_registers`)
    in each value's word order; inputs in adjacent registers are written in
    one request (:func:`~interfaces.modbus_codec.write_requests`), the
    plant's minute and a lab set's ``seq`` after everything else. A refused
    request raises :class:`IoDeviceError` naming the registers, the map's
    fields and the exception.
    """

    def __init__(self, client: AsyncModbusTcpClient, io_map: ModbusIoMap, *, timeout_s: float = 5.0) -> None:
        self._client = client
        self._io = io_map
        self._timeout_s = timeout_s
        self._slots = {slot.path: slot for slot in io_map.slots()}
        # The PLC's minute first, then the outputs: the soft PLC names a minute together with the outputs for it and changes
        # them only once the plant has answered, so outputs read after the minute are that minute's. Read the other way round
        # (one table's span in one request), a PLC that moved on between the requests gave the new minute with the old outputs.
        clock = [self._slots["clock.plc_minute"]] if io_map.clock is not None else []
        self._reads = [*_reads_covering(clock), *_reads_covering([self._slots[f"outputs.{name}"] for name in (*ANALOG_OUTPUTS, "harvest_valve")])]

    async def _send(self, what: str, request: Callable[[], Awaitable[ModbusPDU]]) -> ModbusPDU:
        """``request()``'s answer; a refusal, a timeout or a lost connection (pymodbus raises that one as it builds the request) is an :class:`IoDeviceError`."""
        try:
            response = await asyncio.wait_for(request(), self._timeout_s)
        except (TimeoutError, ModbusException, OSError) as error:
            raise IoDeviceError(f"{self._io.endpoint} unit {self._io.unit_id}: {what}: no answer ({error})") from error
        if response.isError():
            raise IoDeviceError(f"{self._io.endpoint} unit {self._io.unit_id}: {what}: refused with {exception_reason(int(getattr(response, 'exception_code', 0)))}")
        return response

    async def read_command(self) -> tuple[ActuatorCommand, int | None]:
        raw: dict[str, dict[int, int | bool]] = {"holding": {}, "input": {}, "coil": {}, "discrete": {}}
        unit = self._io.unit_id
        functions = {
            "holding": self._client.read_holding_registers,
            "input": self._client.read_input_registers,
            "coil": self._client.read_coils,
            "discrete": self._client.read_discrete_inputs,
        }
        for read in self._reads:
            what = f"reading {ModbusSlot('', read.table, read.start, read.count).describe()}"
            response = await self._send(what, functools.partial(functions[read.table], read.start, count=read.count, device_id=unit))
            values = response.bits if read.table in ("coil", "discrete") else response.registers
            raw[read.table].update({read.start + index: values[index] for index in range(read.count)})

        def number_of(table: str, value: ModbusValue | ModbusAnalogOutput) -> float | int:
            """The number a value's registers hold, in its type and word order."""
            registers = [int(raw[table][value.address + index]) for index in range(value.register_count)]
            return from_registers(registers, value.type, self._io.word_order_of(value))

        outputs = self._io.outputs
        engineering = []
        for name in ANALOG_OUTPUTS:
            channel: ModbusAnalogOutput = getattr(outputs, name)
            engineering.append(channel.drive_value(channel.raw_of(number_of(channel.table, channel))))
        valve = bool(raw[outputs.harvest_valve.table][outputs.harvest_valve.address])
        plc_minute = int(number_of("holding", self._io.clock.plc_minute)) if self._io.clock is not None else None
        return ActuatorCommand(engineering[0], engineering[1], engineering[2], valve), plc_minute

    async def _write(self, encoded: Mapping[str, EncodedWrite]) -> None:
        unit = self._io.unit_id
        for request in write_requests(encoded):
            write = request.write
            where = ModbusSlot("", write.table, write.address, max(1, len(write.registers))).describe()
            what = f"writing {where} ({', '.join(request.signals)})"
            if write.bit is not None:
                await self._send(what, functools.partial(self._client.write_coil, write.address, write.bit, device_id=unit))
            else:
                await self._send(what, functools.partial(self._client.write_registers, write.address, list(write.registers), device_id=unit))

    def _value(self, path: str, value: ModbusValue, number: float | int) -> tuple[str, EncodedWrite]:
        return path, EncodedWrite("holding", value.address, registers=to_registers(number, value.type, self._io.word_order_of(value)))

    async def write_inputs(self, raw: dict[str, float | int], *, broken: frozenset[str] = frozenset(), plant_minute: int | None) -> None:
        encoded: dict[str, EncodedWrite] = {}
        for name, value in raw.items():
            channel = getattr(self._io.inputs, name)
            registers = to_registers(channel.number_of(value), channel.type, self._io.word_order_of(channel))
            encoded[f"inputs.{name}"] = EncodedWrite("holding", channel.address, registers=registers)
            if channel.wire_break_coil is not None:
                encoded[f"inputs.{name}.wire_break_coil"] = EncodedWrite("coil", channel.wire_break_coil, bit=name in broken)
        await self._write(encoded)
        if plant_minute is not None and self._io.clock is not None:
            await self._write(dict([self._value("clock.plant_minute", self._io.clock.plant_minute, plant_minute)]))

    async def write_lab_result(self, result: LabResult) -> None:
        lims = self._io.lims
        if lims is None:
            return
        await self._write(dict(self._value(f"lims.{name}", getattr(lims, name), float(getattr(result, name))) for name in ("taken_at_h", *LAB_FIELDS)))
        await self._write(dict([self._value("lims.seq", lims.seq, result.seq)]))


def _reads_covering(slots: Sequence[ModbusSlot]) -> list[_Read]:
    """One read per table from its first to its last wanted address, split at the protocol's limits (125 registers or 2000 bits a request)."""
    spans: dict[str, set[int]] = {}
    for slot in slots:
        spans.setdefault(slot.table, set()).update(range(slot.address, slot.address + slot.count))
    reads: list[_Read] = []
    for table, addresses in sorted(spans.items()):
        limit = MAX_BITS_PER_READ if table in ("coil", "discrete") else MAX_REGISTERS_PER_READ
        first, last = min(addresses), max(addresses)
        reads.extend(_Read(table, start, min(limit, last + 1 - start)) for start in range(first, last + 1, limit))
    return reads


@contextlib.asynccontextmanager
async def connect_io(io_map: OpcUaIoMap | ModbusIoMap, *, timeout_s: float = 5.0) -> AsyncIterator[PlcIo]:
    """A connected client of the PLC's field I/O for the map's protocol; closed on leaving."""
    if isinstance(io_map, OpcUaIoMap):
        async with Client(io_map.endpoint, timeout=timeout_s) as client:
            io = PlcIoClient(client, io_map)
            await io.resolve()
            yield io
        return
    modbus = AsyncModbusTcpClient(io_map.host, port=io_map.port, name=f"plant-sim {io_map.endpoint}", timeout=timeout_s, retries=0, reconnect_delay=0)
    try:
        connected = await asyncio.wait_for(modbus.connect(), timeout_s)
        if not connected:
            raise IoDeviceError(f"{io_map.endpoint} unit {io_map.unit_id}: cannot connect to the Modbus I/O device")
        yield ModbusPlcIoClient(modbus, io_map, timeout_s=timeout_s)
    finally:
        modbus.close()


async def run_plant_io(
    simulator: PlantSimulator,
    io_map: OpcUaIoMap | ModbusIoMap,
    *,
    time_scale: float | None = None,
    exchange_period_s: float = 0.1,
    wall_timeout_s: float = 3600.0,
    poll_s: float = 0.002,
    stop: asyncio.Event | None = None,
) -> PlantRunReport:
    """Drive the plant against the PLC until harvest, ``stop`` or ``wall_timeout_s``: virtual time when ``time_scale`` is None, else free-running."""
    if time_scale is None and io_map.clock is None:
        raise ValueError("virtual time needs the I/O map's clock section (a soft PLC); a real PLC needs a time scale (1 for real time)")
    if time_scale is not None and not time_scale > 0.0:
        raise ValueError(f"time_scale must be positive, got {time_scale}")
    report = PlantRunReport()
    started = time.monotonic()
    released = 0
    async with connect_io(io_map) as io:

        async def exchange(minute: int, command: ActuatorCommand, *, answer_minute: bool) -> None:
            nonlocal released
            begun = time.monotonic()
            simulator.advance_to(minute, command)
            raw = simulator.raw_inputs()
            while released < len(simulator.released):
                await io.write_lab_result(simulator.released[released])
                released += 1
            await io.write_inputs(raw, broken=simulator.broken_inputs(), plant_minute=simulator.plant.minute if answer_minute else None)
            report.exchanges += 1
            report.exchange_wall_s.append(time.monotonic() - begun)

        try:
            await _drive(
                io,
                simulator,
                report,
                exchange,
                started=started,
                time_scale=time_scale,
                exchange_period_s=exchange_period_s,
                wall_timeout_s=wall_timeout_s,
                poll_s=poll_s,
                stop=stop,
                io_map=io_map,
            )
        except (IoDeviceError, OSError) as error:  # the plant so far is the caller's to report: the error is in the report, not lost with it
            report.io_error = str(error)
            report.ended = "the PLC's I/O failed"
            log.error("plant_io_failed", error=str(error), process_time_h=simulator.plant.process_time_h, exchanges=report.exchanges)
        report.ended = report.ended or ("harvest" if simulator.harvested else "stopped")
    report.wall_s = time.monotonic() - started
    return report


async def _drive(
    io: PlcIo,
    simulator: PlantSimulator,
    report: PlantRunReport,
    exchange: Callable[..., Awaitable[None]],
    *,
    started: float,
    time_scale: float | None,
    exchange_period_s: float,
    wall_timeout_s: float,
    poll_s: float,
    stop: asyncio.Event | None,
    io_map: OpcUaIoMap | ModbusIoMap,
) -> None:
    """:func:`run_plant_io`'s loop: exchange with the PLC until harvest, ``stop`` or the wall timeout."""
    while not simulator.harvested and (stop is None or not stop.is_set()):
        if time.monotonic() - started > wall_timeout_s:
            report.ended = f"wall timeout {wall_timeout_s:g} s"
            break
        command, plc_minute = await io.read_command()
        if time_scale is None:
            plc_minute = NOT_YET if plc_minute is None else plc_minute
            if plc_minute != NOT_YET and report.exchanges and plc_minute < simulator.plant.minute:
                raise IoDeviceError(
                    f"{io_map.endpoint}: the PLC's minute went back from {simulator.plant.minute} to {plc_minute}: "
                    "the PLC restarted its batch clock under a running plant; start plant-sim again with it"
                )
            if command.harvest_valve or (plc_minute != NOT_YET and (plc_minute > simulator.plant.minute or not report.exchanges)):
                await exchange(plc_minute if plc_minute != NOT_YET else 0, command, answer_minute=True)
            else:
                await asyncio.sleep(poll_s)
            continue
        tick = report.exchanges + report.missed_exchanges
        minute = math.floor((time.monotonic() - started) * time_scale / 60.0)
        await exchange(minute, command, answer_minute=io_map.clock is not None)
        next_deadline = started + (tick + 1) * exchange_period_s
        late_s = time.monotonic() - next_deadline
        if late_s > 0.0:
            missed = 1 + math.floor(late_s / exchange_period_s)
            report.missed_exchanges += missed
            report.worst_overrun_s = max(report.worst_overrun_s, late_s)
            log.warning("plant_exchange_missed", missed=missed, late_s=round(late_s, 3), process_time_h=simulator.plant.process_time_h, missed_total=report.missed_exchanges)
        else:
            await asyncio.sleep(-late_s)
