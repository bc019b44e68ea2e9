"""I/O maps: where the plant's sensors and actuators meet a PLC's field I/O, and how each channel is scaled.

An I/O map is configuration (YAML in ``configs/io/``): the PLC's own tags for
its analog inputs (temperature, load cell, probes, off-gas, flow meters), its
analog and digital outputs (the pumps, the temperature setpoint, the harvest
valve) and the sample tags a LIMS writes. ``plant-sim`` writes the inputs and
reads the outputs through it; the soft PLC (``soft-plc``) serves exactly
these tags and reads them with the same scaling, as a PLC program's scaling
blocks would.

Scaling of an analog channel (:class:`AnalogChannel`):

- ``engineering``: the tag holds the value in engineering units (a Double),
  as a PLC that scales in its I/O module or a fieldbus device presents it;
- ``current_4_20ma``: the tag holds the raw counts of a 4–20 mA channel,
  ``raw_low`` at 4 mA and ``raw_high`` at 20 mA (0 and 27648 by default:
  a Siemens S7 analog module's nominal range), linear in between; over- and
  underrange counts continue the line up to the module's limits
  (``raw_min``/``raw_max``, S7: −4864 = 1.185 mA and 32511 = 22.81 mA), and
  a current below the measurable range reads ``raw_underflow`` (S7: −32768).
  The PLC takes a current outside ``fault_below_ma``–``fault_above_ma``
  (3.8–20.5 mA: NAMUR NE 43's measuring range; a transmitter signals its own
  failure at ≤ 3.6 or ≥ 21 mA) as a failed channel: the value is Bad.

Two protocols, one map layout (``protocol:`` chooses): :class:`OpcUaIoMap`
names each tag by its node id; :class:`ModbusIoMap` gives each a register
address, a number type and a word order (a Modbus I/O device or a PLC's
Modbus server: 4–20 mA counts in an Int16 register, engineering values in
float32 pairs or in scaled integers, the harvest valve in a coil, a
terminal's wire-break status in a coil). The registers are encoded with the
runtime's Modbus codec (:mod:`interfaces.modbus_codec`) on both sides.

This module imports no protocol library: loading and validating a map never
starts a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import Field, model_validator

from interfaces.tagmap import REGISTERS_PER_TYPE, WordOrder
from plant_models.config_loading import FieldError, FrozenConfig, read_yaml_mapping, validate_model
from plant_models.errors import ConfigError

MA_LOW = 4.0
MA_SPAN = 16.0
NOT_YET = 2**32 - 1
"""A clock tag's value before its side has written it (UInt32 maximum)."""
CHANNEL_OF_PV = {
    "PV.Temperature": "temperature_degc",
    "PV.pH": "ph",
    "PV.DO": "do_pct",
    "PV.Volume": "volume_l",
    "PV.BaseTotal": "base_total_l",
    "PV.OUR": "our_mmol_per_l_h",
    "PV.CER": "cer_mmol_per_l_h",
    "PV.Capacitance": "capacitance_pf_per_cm",
    "PV.AgitationSpeed": "agitation_rpm",
}
"""The reference's online signals by the input that carries each (the totalisers are the PLC's own: it integrates the flow meters)."""


class AnalogScaling(FrozenConfig):
    """How an analog channel carries its value: engineering units, or a 4–20 mA channel's raw counts."""

    signal: Literal["engineering", "current_4_20ma"] = Field(default="engineering", description="engineering units (a Double), or 4–20 mA counts (an Int16)")
    eu_low: float = Field(default=0.0, description="engineering value at 4 mA (current_4_20ma)")
    eu_high: float | None = Field(default=None, description="engineering value at 20 mA (current_4_20ma; required there)")
    raw_low: int = Field(default=0, ge=-32768, le=32767, description="counts at 4 mA (S7: 0)")
    raw_high: int = Field(default=27648, ge=-32768, le=32767, description="counts at 20 mA (S7: 27648)")
    raw_min: int = Field(default=-4864, ge=-32768, le=32767, description="lowest counts the module shows before underflow (S7: -4864, 1.185 mA)")
    raw_max: int = Field(default=32511, ge=-32768, le=32767, description="highest counts the module shows before overflow (S7: 32511, 22.81 mA)")
    raw_underflow: int = Field(default=-32768, ge=-32768, le=32767, description="counts shown below the measurable range, a broken wire at 0 mA (S7: -32768)")
    raw_overflow: int = Field(default=32767, ge=-32768, le=32767, description="counts shown above the measurable range (S7: 32767)")
    fault_below_ma: float = Field(
        default=3.8,
        ge=0.0,
        le=4.0,
        description="below this current the PLC takes the channel as failed (NAMUR NE 43's measuring range starts at 3.8 mA; a failed transmitter drives ≤ 3.6)",
    )
    fault_above_ma: float = Field(
        default=20.5, ge=20.0, description="above this current the PLC takes the channel as failed (NAMUR NE 43's measuring range ends at 20.5 mA; failure ≥ 21)"
    )

    @model_validator(mode="after")
    def _scaling(self) -> AnalogScaling:
        if self.signal == "current_4_20ma":
            if self.eu_high is None:
                raise FieldError("eu_high", None, "is required for signal current_4_20ma (the engineering value at 20 mA)")
            if self.eu_high == self.eu_low:
                raise FieldError("eu_high", self.eu_high, f"must differ from eu_low ({self.eu_low})")
            if self.raw_high <= self.raw_low:
                raise FieldError("raw_high", self.raw_high, f"must be above raw_low ({self.raw_low})")
            if not self.raw_min <= self.raw_low < self.raw_high <= self.raw_max:
                raise FieldError("raw_min", self.raw_min, f"must satisfy raw_min <= raw_low < raw_high <= raw_max ({self.raw_low}, {self.raw_high}, {self.raw_max})")
        return self

    @property
    def counts(self) -> bool:
        return self.signal == "current_4_20ma"

    def _eu_span(self) -> float:
        if self.eu_high is None:  # the validator requires it for current_4_20ma
            raise ConfigError("eu_high is required for signal current_4_20ma")
        return self.eu_high - self.eu_low

    def _ma_of(self, value: float) -> float:
        return MA_LOW + MA_SPAN * (value - self.eu_low) / self._eu_span()

    def counts_of_current(self, current_ma: float) -> int:
        """The counts a module shows for ``current_ma`` (clamped at its limits; underflow and overflow beyond them)."""
        raw = self.raw_low + (current_ma - MA_LOW) / MA_SPAN * (self.raw_high - self.raw_low)
        if raw < self.raw_min:
            return self.raw_underflow
        if raw > self.raw_max:
            return self.raw_overflow
        return round(raw)

    def to_raw(self, value: float) -> float | int:
        """What the field device puts on the tag for the engineering ``value``."""
        if not self.counts:
            return float(value)
        return self.counts_of_current(self._ma_of(value))

    def current_ma(self, raw: float) -> float:
        """The loop current the counts stand for (NaN for underflow or overflow)."""
        if raw in (self.raw_underflow, self.raw_overflow):
            return math.nan
        return MA_LOW + (raw - self.raw_low) / (self.raw_high - self.raw_low) * MA_SPAN

    def drive_value(self, raw: float) -> float:
        """What an actuator makes of the drive signal ``raw``: its engineering value, NaN (unusable) outside the channel's fault limits
        (a 4–20 mA output at 3.6 mA is a failed loop to the device as to the PLC, not a small negative flow)."""
        value, good = self.to_engineering(raw)
        return value if good else math.nan

    def to_engineering(self, raw: float) -> tuple[float, bool]:
        """The engineering value of ``raw`` and whether the channel is healthy (a 4–20 mA channel outside its fault limits is not)."""
        if not self.counts:
            value = float(raw)
            return value, math.isfinite(value)
        current = self.current_ma(raw)
        good = math.isfinite(current) and self.fault_below_ma <= current <= self.fault_above_ma
        value = self.eu_low + (current - MA_LOW) / MA_SPAN * self._eu_span() if math.isfinite(current) else math.nan
        return value, good


class AnalogChannel(AnalogScaling):
    """One analog input or output over OPC UA: its tag and its scaling."""

    node: str = Field(min_length=1, description="string node id of the tag in the map's namespace, e.g. IO.AI.TT101")


class DigitalChannel(FrozenConfig):
    """One digital output over OPC UA (a Boolean tag)."""

    node: str = Field(min_length=1, description="string node id of the tag, e.g. IO.DO.XV201")


Analog = TypeVar("Analog", bound=AnalogScaling)
Digital = TypeVar("Digital", bound=FrozenConfig)
Tag = TypeVar("Tag")


class SensorInputs(FrozenConfig, Generic[Analog]):
    """The PLC's analog inputs that the plant drives."""

    temperature_degc: Analog = Field(description="culture temperature (TT)")
    ph: Analog = Field(description="pH probe")
    do_pct: Analog = Field(description="dissolved oxygen probe, % air saturation")
    volume_l: Analog = Field(description="load cell, as working volume [L]")
    base_total_l: Analog = Field(description="base added by the pH loop (the base pump's totaliser or balance) [L]")
    our_mmol_per_l_h: Analog = Field(description="off-gas analyser: oxygen uptake rate")
    cer_mmol_per_l_h: Analog = Field(description="off-gas analyser: CO2 evolution rate")
    capacitance_pf_per_cm: Analog | None = Field(default=None, description="permittivity probe; none where no probe is fitted (PV.Capacitance reads Bad)")
    agitation_rpm: Analog = Field(description="agitator speed feedback")
    feed_flow_lph: Analog = Field(description="nutrient feed flow meter: what the pump delivers; the PLC totalises it")
    glucose_flow_lph: Analog = Field(description="glucose feed flow meter: what the pump delivers; the PLC totalises it")


class ActuatorOutputs(FrozenConfig, Generic[Analog, Digital]):
    """The PLC's outputs that drive the plant."""

    feed_pump_lph: Analog = Field(description="nutrient feed pump speed reference, as flow [L/h]")
    glucose_pump_lph: Analog = Field(description="glucose feed pump speed reference, as flow [L/h]")
    temperature_setpoint_degc: Analog = Field(description="culture temperature setpoint to the jacket's controller [°C]")
    harvest_valve: Digital = Field(description="harvest valve: true opens it and ends the batch")


class LimsTags(FrozenConfig, Generic[Tag]):
    """The PLC's tags a LIMS writes a released result set to (engineering units); ``seq`` last, when the set is complete."""

    seq: Tag = Field(description="an unsigned integer (OPC UA: UInt32): moves when a complete result set is written")
    taken_at_h: Tag
    vcd_1e6_per_ml: Tag
    viability_pct: Tag
    glucose_g_per_l: Tag
    lactate_g_per_l: Tag
    glutamine_mm: Tag
    ammonia_mm: Tag
    titer_g_per_l: Tag
    osmolality_mosm_per_kg: Tag


class VirtualClock(FrozenConfig, Generic[Tag]):
    """Virtual time between a soft PLC and ``plant-sim``: the PLC names the minute it has reached, the plant answers when it has integrated to it.

    A real PLC has no such tags: leave the section out and give ``plant-sim``
    a ``--time-scale`` (1 for real time).
    """

    plc_minute: Tag = Field(description="UInt32 the PLC writes: the batch minute it wants the plant at")
    plant_minute: Tag = Field(description="UInt32 plant-sim writes: the minute the plant has reached (and its inputs are of)")


class OpcUaIoMap(FrozenConfig):
    """Where ``plant-sim`` meets a PLC's field I/O over OPC UA."""

    protocol: Literal["opcua"] = Field(description="opcua: tags by string node id")
    endpoint: str = Field(description="the PLC's OPC UA endpoint for the I/O, e.g. opc.tcp://127.0.0.1:4850/soft-plc-io/")
    namespace_uri: str = Field(min_length=1, description="namespace of the I/O tags; its index is resolved from the server's namespace array")
    inputs: SensorInputs[AnalogChannel]
    outputs: ActuatorOutputs[AnalogChannel, DigitalChannel]
    lims: LimsTags[str] | None = Field(default=None, description="sample tags a LIMS writes (Doubles; seq a UInt32); none: lab results do not reach the PLC")
    clock: VirtualClock[str] | None = Field(default=None, description="virtual time with a soft PLC; none: plant-sim runs on its own clock")

    @model_validator(mode="after")
    def _unique_nodes(self) -> OpcUaIoMap:
        seen: dict[str, str] = {}
        for name, node in self.nodes().items():
            if node in seen:
                raise FieldError(name, node, f"must be a tag of its own; {seen[node]} uses it too")
            seen[node] = name
        return self

    def nodes(self) -> dict[str, str]:
        """Every tag of the map by its field path (``inputs.ph``, ``lims.seq``, ``clock.plc_minute``)."""
        nodes: dict[str, str] = {}
        for section in (self.inputs, self.outputs):
            prefix = "inputs" if section is self.inputs else "outputs"
            for name in type(section).model_fields:
                channel = getattr(section, name)
                if channel is not None:
                    nodes[f"{prefix}.{name}"] = channel.node
        if self.lims is not None:
            nodes.update({f"lims.{name}": getattr(self.lims, name) for name in LimsTags.model_fields})
        if self.clock is not None:
            nodes.update({f"clock.{name}": getattr(self.clock, name) for name in VirtualClock.model_fields})
        return nodes


# ------------------------------------------------------------------ Modbus TCP

ModbusNumberType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64"]
_INTEGER_RANGE = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1), "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}
_TABLE_NAMES = {"holding": "holding register", "input": "input register", "coil": "coil", "discrete": "discrete input"}


class ModbusValue(FrozenConfig):
    """A number in holding registers (the LIMS and clock tags)."""

    address: int = Field(ge=0, le=65535, description="first holding register, zero-based")
    type: ModbusNumberType = Field(description="float32/float64 for lab values; uint32 (or uint16) for seq; uint32 for the clock's minutes")
    word_order: WordOrder | None = Field(default=None, description="byte order over the registers (ABCD, CDAB, BADC, DCBA); default: the map's word_order")

    @property
    def register_count(self) -> int:
        return REGISTERS_PER_TYPE[self.type]


class _ModbusAnalog(AnalogScaling):
    """An analog channel in registers: its address, number type and word order, and for a scaled integer its scale and offset."""

    address: int = Field(ge=0, le=65535, description="first register, zero-based")
    type: ModbusNumberType = Field(description="int16 for 4–20 mA counts; float32/float64 for an engineering value, or an integer type with scale and offset")
    word_order: WordOrder | None = Field(default=None, description="byte order over the registers (ABCD, CDAB, BADC, DCBA); default: the map's word_order")
    scale: float = Field(default=1.0, description="signal engineering with an integer type: engineering value = raw × scale + offset")
    offset: float = Field(default=0.0, description="signal engineering with an integer type: engineering value = raw × scale + offset")

    @model_validator(mode="after")
    def _registers(self) -> _ModbusAnalog:
        if self.counts and self.type != "int16":
            raise FieldError("type", self.type, "must be int16 for signal current_4_20ma (a 4–20 mA channel's raw counts)")
        if (self.scale, self.offset) != (1.0, 0.0) and (self.counts or self.type not in _INTEGER_RANGE):
            raise FieldError("scale", self.scale, "scale and offset apply to signal engineering in an integer type only (a float carries the value itself)")
        if self.scale == 0.0:
            raise FieldError("scale", self.scale, "must not be 0 (engineering value = raw × scale + offset)")
        if self.address + self.register_count - 1 > 65535:
            raise FieldError("address", self.address, f"leaves no room for the {self.register_count} registers of a {self.type} (the last address is 65535)")
        return self

    @property
    def register_count(self) -> int:
        return REGISTERS_PER_TYPE[self.type]

    def number_of(self, raw: float | int) -> float | int:
        """The number the registers carry for the channel's raw value (counts or engineering units).

        An integer register holds the nearest count, saturated at its type's
        limits as a device's register saturates; a value that is not a number
        (a broken engineering channel) is 0 there, as a terminal shows it.
        """
        if self.type not in _INTEGER_RANGE:
            return float(raw)
        low, high = _INTEGER_RANGE[self.type]
        number = raw if self.counts else (raw - self.offset) / self.scale
        if not math.isfinite(number):
            return 0
        return min(high, max(low, round(number)))

    def raw_of(self, number: float | int) -> float:
        """The channel's raw value (counts or engineering units) of the number its registers carry."""
        if self.counts or self.type not in _INTEGER_RANGE:
            return float(number)
        return float(number) * self.scale + self.offset


class ModbusAnalogInput(_ModbusAnalog):
    """An analog input the plant writes: holding registers (a Modbus client can write no other table)."""

    table: Literal["holding"] = Field(default="holding", description="holding registers only: plant-sim writes the inputs, and a Modbus client can write no other table")
    wire_break_coil: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="a coil plant-sim sets while the channel's loop is broken, as an input terminal's status bit (Beckhoff: its error bit); the PLC takes the channel as failed",
    )


class ModbusAnalogOutput(_ModbusAnalog):
    """An analog output the PLC drives and the plant reads."""

    table: Literal["holding", "input"] = Field(default="holding", description="holding registers (read back from an analog output module) or input registers")


class ModbusBit(FrozenConfig):
    """A digital output the PLC drives and the plant reads (the harvest valve)."""

    table: Literal["coil", "discrete"] = Field(default="coil", description="a coil (a digital output read back) or a discrete input")
    address: int = Field(ge=0, le=65535, description="bit address, zero-based")


@dataclass(frozen=True)
class ModbusSlot:
    """What a Modbus I/O map puts at one place: the map's field path, the table, the first address and how many registers (1 for a bit)."""

    path: str
    table: str
    address: int
    count: int

    def describe(self) -> str:
        name = _TABLE_NAMES[self.table]
        return f"{name} {self.address}" if self.count == 1 else f"{name}s {self.address}-{self.address + self.count - 1}"


class ModbusIoMap(FrozenConfig):
    """Where ``plant-sim`` meets a Modbus TCP I/O device, or a PLC's Modbus server holding its simulation area.

    The inputs, their wire-break coils, the LIMS and ``clock.plant_minute``
    are written by plant-sim, so they are in holding registers and coils; the
    outputs and ``clock.plc_minute`` are read.
    """

    protocol: Literal["modbus"] = Field(description="modbus: Modbus TCP, registers by address")
    host: str = Field(min_length=1, description="the I/O device's or PLC's host name or address")
    port: int = Field(default=502, ge=1, le=65535, description="TCP port")
    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id")
    word_order: WordOrder = Field(default="ABCD", description="byte order of every 32/64-bit number that gives none of its own: ABCD (high word first), CDAB, BADC, DCBA")
    inputs: SensorInputs[ModbusAnalogInput]
    outputs: ActuatorOutputs[ModbusAnalogOutput, ModbusBit]
    lims: LimsTags[ModbusValue] | None = Field(
        default=None, description="holding registers a LIMS writes (floats; seq an unsigned integer); none: lab results do not reach the PLC"
    )
    clock: VirtualClock[ModbusValue] | None = Field(default=None, description="virtual time with a soft PLC (uint32 holding registers); none: plant-sim runs on its own clock")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def word_order_of(self, value: ModbusValue | _ModbusAnalog) -> WordOrder:
        return value.word_order or self.word_order

    def slots(self) -> list[ModbusSlot]:
        """Every register span and bit the map uses, with the field that uses it."""
        slots: list[ModbusSlot] = []
        for name in type(self.inputs).model_fields:
            channel: ModbusAnalogInput | None = getattr(self.inputs, name)
            if channel is None:
                continue
            slots.append(ModbusSlot(f"inputs.{name}", channel.table, channel.address, channel.register_count))
            if channel.wire_break_coil is not None:
                slots.append(ModbusSlot(f"inputs.{name}.wire_break_coil", "coil", channel.wire_break_coil, 1))
        for name in ("feed_pump_lph", "glucose_pump_lph", "temperature_setpoint_degc"):
            output: ModbusAnalogOutput = getattr(self.outputs, name)
            slots.append(ModbusSlot(f"outputs.{name}", output.table, output.address, output.register_count))
        slots.append(ModbusSlot("outputs.harvest_valve", self.outputs.harvest_valve.table, self.outputs.harvest_valve.address, 1))
        for section_name, section in (("lims", self.lims), ("clock", self.clock)):
            if section is None:
                continue
            for name in type(section).model_fields:
                value: ModbusValue = getattr(section, name)
                slots.append(ModbusSlot(f"{section_name}.{name}", "holding", value.address, value.register_count))
        return slots

    @model_validator(mode="after")
    def _consistent(self) -> ModbusIoMap:
        for section_name, section in (("lims", self.lims), ("clock", self.clock)):
            if section is None:
                continue
            for name in type(section).model_fields:
                value: ModbusValue = getattr(section, name)
                if section_name == "clock" and value.type != "uint32":
                    raise FieldError(f"{section_name}.{name}.type", value.type, "must be uint32: a batch minute (4294967295 before it is written)")
                if name == "seq" and value.type not in ("uint32", "uint16"):
                    raise FieldError(f"{section_name}.{name}.type", value.type, "must be uint32 or uint16: a count, not a measurement")
                counter = section_name == "clock" or name == "seq"
                if not counter and value.type not in ("float32", "float64"):
                    raise FieldError(f"{section_name}.{name}.type", value.type, "must be float32 or float64: a lab value in engineering units (NaN when not measured)")
        occupied: dict[tuple[str, int], str] = {}
        for slot in self.slots():
            if slot.address + slot.count - 1 > 65535:
                raise FieldError(f"{slot.path}.address", slot.address, f"leaves no room for its {slot.count} registers (the last address is 65535)")
            for address in range(slot.address, slot.address + slot.count):
                other = occupied.setdefault((slot.table, address), slot.path)
                if other != slot.path:
                    field = slot.path if slot.path.endswith("wire_break_coil") else f"{slot.path}.address"
                    raise FieldError(field, slot.address, f"{_TABLE_NAMES[slot.table]} {address} is also used by {other}")
        return self


IoMap = Annotated[OpcUaIoMap | ModbusIoMap, Field(discriminator="protocol")]
"""An I/O map of either protocol (``protocol:`` chooses); its JSON Schema is ``bioreactor-mpc schema``'s ``io-map.schema.json``."""
_MAP_OF_PROTOCOL: dict[str, type[OpcUaIoMap] | type[ModbusIoMap]] = {"opcua": OpcUaIoMap, "modbus": ModbusIoMap}


def load_io_map(path: str | Path) -> OpcUaIoMap | ModbusIoMap:
    """Load and validate an I/O map; a problem is a :class:`~plant_models.errors.ConfigError` naming the file and the field."""
    path = Path(path)
    data = read_yaml_mapping(path)
    protocol = data.get("protocol")
    model = _MAP_OF_PROTOCOL.get(protocol) if isinstance(protocol, str) else None
    if model is None:
        raise ConfigError(f"{path}: invalid configuration (1 problem)\n  {path}: protocol: expected 'opcua' or 'modbus'; got {protocol!r}")
    return validate_model(model, data, source=str(path))
