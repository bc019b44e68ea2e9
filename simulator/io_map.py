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

This module imports no protocol library: loading and validating a map never
starts a server.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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


class AnalogChannel(FrozenConfig):
    """One analog input or output: its tag and its scaling."""

    node: str = Field(min_length=1, description="string node id of the tag in the map's namespace, e.g. IO.AI.TT101")
    signal: Literal["engineering", "current_4_20ma"] = Field(default="engineering", description="engineering units in a Double, or 4–20 mA counts in an Int16")
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
    def _scaling(self) -> AnalogChannel:
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
            raise ConfigError(f"{self.node}: eu_high is required for signal current_4_20ma")
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

    def to_engineering(self, raw: float) -> tuple[float, bool]:
        """The engineering value of ``raw`` and whether the channel is healthy (a 4–20 mA channel outside its fault limits is not)."""
        if not self.counts:
            value = float(raw)
            return value, math.isfinite(value)
        current = self.current_ma(raw)
        good = math.isfinite(current) and self.fault_below_ma <= current <= self.fault_above_ma
        value = self.eu_low + (current - MA_LOW) / MA_SPAN * self._eu_span() if math.isfinite(current) else math.nan
        return value, good


class DigitalChannel(FrozenConfig):
    """One digital output (a Boolean tag)."""

    node: str = Field(min_length=1, description="string node id of the tag, e.g. IO.DO.XV201")


class SensorInputs(FrozenConfig):
    """The PLC's analog inputs that the plant drives."""

    temperature_degc: AnalogChannel = Field(description="culture temperature (TT)")
    ph: AnalogChannel = Field(description="pH probe")
    do_pct: AnalogChannel = Field(description="dissolved oxygen probe, % air saturation")
    volume_l: AnalogChannel = Field(description="load cell, as working volume [L]")
    base_total_l: AnalogChannel = Field(description="base added by the pH loop (the base pump's totaliser or balance) [L]")
    our_mmol_per_l_h: AnalogChannel = Field(description="off-gas analyser: oxygen uptake rate")
    cer_mmol_per_l_h: AnalogChannel = Field(description="off-gas analyser: CO2 evolution rate")
    capacitance_pf_per_cm: AnalogChannel | None = Field(default=None, description="permittivity probe; none where no probe is fitted (PV.Capacitance reads Bad)")
    agitation_rpm: AnalogChannel = Field(description="agitator speed feedback")
    feed_flow_lph: AnalogChannel = Field(description="nutrient feed flow meter: what the pump delivers; the PLC totalises it")
    glucose_flow_lph: AnalogChannel = Field(description="glucose feed flow meter: what the pump delivers; the PLC totalises it")


class ActuatorOutputs(FrozenConfig):
    """The PLC's outputs that drive the plant."""

    feed_pump_lph: AnalogChannel = Field(description="nutrient feed pump speed reference, as flow [L/h]")
    glucose_pump_lph: AnalogChannel = Field(description="glucose feed pump speed reference, as flow [L/h]")
    temperature_setpoint_degc: AnalogChannel = Field(description="culture temperature setpoint to the jacket's controller [°C]")
    harvest_valve: DigitalChannel = Field(description="harvest valve: true opens it and ends the batch")


class LimsTags(FrozenConfig):
    """The PLC's tags a LIMS writes a released result set to (engineering units, Doubles); ``seq`` last, when the set is complete."""

    seq: str = Field(description="UInt32: moves when a complete result set is written")
    taken_at_h: str
    vcd_1e6_per_ml: str
    viability_pct: str
    glucose_g_per_l: str
    lactate_g_per_l: str
    glutamine_mm: str
    ammonia_mm: str
    titer_g_per_l: str
    osmolality_mosm_per_kg: str


class VirtualClock(FrozenConfig):
    """Virtual time between a soft PLC and ``plant-sim``: the PLC names the minute it has reached, the plant answers when it has integrated to it.

    A real PLC has no such tags: leave the section out and give ``plant-sim``
    a ``--time-scale`` (1 for real time).
    """

    plc_minute: str = Field(description="UInt32 the PLC writes: the batch minute it wants the plant at")
    plant_minute: str = Field(description="UInt32 plant-sim writes: the minute the plant has reached (and its inputs are of)")


class IoMap(FrozenConfig):
    """Where ``plant-sim`` meets a PLC's field I/O (OPC UA)."""

    protocol: Literal["opcua"] = Field(description="opcua (Modbus TCP I/O devices: not yet)")
    endpoint: str = Field(description="the PLC's OPC UA endpoint for the I/O, e.g. opc.tcp://127.0.0.1:4850/soft-plc-io/")
    namespace_uri: str = Field(min_length=1, description="namespace of the I/O tags; its index is resolved from the server's namespace array")
    inputs: SensorInputs
    outputs: ActuatorOutputs
    lims: LimsTags | None = Field(default=None, description="sample tags a LIMS writes; none: lab results do not reach the PLC")
    clock: VirtualClock | None = Field(default=None, description="virtual time with a soft PLC; none: plant-sim runs on its own clock")

    @model_validator(mode="after")
    def _unique_nodes(self) -> IoMap:
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


def load_io_map(path: str | Path) -> IoMap:
    """Load and validate an I/O map; a problem is a :class:`~plant_models.errors.ConfigError` naming the file and the field."""
    path = Path(path)
    return validate_model(IoMap, read_yaml_mapping(path), source=str(path))
