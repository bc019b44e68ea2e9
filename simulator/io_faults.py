"""Faults at the PLC's field I/O, injected by ``plant-sim`` on the batch clock.

- ``wire_break``: a 4–20 mA input's loop opens: the channel shows
  ``current_ma`` (3.6, NAMUR NE 43's failure signal, or 0, a dead loop);
- ``frozen_input``: an input keeps the raw value it had when the fault began
  (a hung transmitter, a stuck fieldbus value);
- ``stuck_actuator``: an output's device keeps doing what it did when the
  fault began, whatever the PLC commands (a seized valve, a pump whose speed
  reference no longer reaches it);
- ``pump_degraded``: a pump delivers ``delivery_fraction`` of its command
  (a worn tube: 0.8 delivers 20 % less); its flow meter shows what it delivers.

Each is active from ``start_h`` to ``end_h`` (or the end of the batch), in
a scenario file (``faults:``, :class:`IoFaultScenario`) or on the command line
(:func:`parse_fault`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from plant_models.config_loading import FieldError, FrozenConfig, read_yaml_mapping, validate_model
from plant_models.errors import ConfigError
from simulator.io_map import ActuatorOutputs, SensorInputs

INPUT_CHANNELS = tuple(SensorInputs.model_fields)
OUTPUT_CHANNELS = tuple(ActuatorOutputs.model_fields)
PUMP_CHANNELS = ("feed_pump_lph", "glucose_pump_lph")


class _Window(FrozenConfig):
    start_h: float = Field(ge=0.0, description="process time the fault begins [h]")
    end_h: float | None = Field(default=None, description="process time it ends [h]; none: to the end of the batch")

    @model_validator(mode="after")
    def _ordered(self) -> _Window:
        if self.end_h is not None and self.end_h <= self.start_h:
            raise FieldError("end_h", self.end_h, f"must be after start_h ({self.start_h}), or none for the rest of the batch")
        return self

    def active(self, time_h: float) -> bool:
        return self.start_h <= time_h and (self.end_h is None or time_h < self.end_h)


def _check_channel(channel: str, allowed: tuple[str, ...], what: str) -> None:
    if channel not in allowed:
        raise FieldError("channel", channel, f"must be {what}: one of {', '.join(allowed)}")


class WireBreak(_Window):
    kind: Literal["wire_break"]
    channel: str = Field(description="an input of the I/O map (inputs.<name>) with signal current_4_20ma")
    current_ma: float = Field(default=3.6, ge=0.0, lt=4.0, description="the loop current while broken: 3.6 (NAMUR NE 43) or 0")

    @model_validator(mode="after")
    def _input(self) -> WireBreak:
        _check_channel(self.channel, INPUT_CHANNELS, "an input")
        return self


class FrozenInput(_Window):
    kind: Literal["frozen_input"]
    channel: str

    @model_validator(mode="after")
    def _input(self) -> FrozenInput:
        _check_channel(self.channel, INPUT_CHANNELS, "an input")
        return self


class StuckActuator(_Window):
    kind: Literal["stuck_actuator"]
    channel: str

    @model_validator(mode="after")
    def _output(self) -> StuckActuator:
        _check_channel(self.channel, OUTPUT_CHANNELS, "an output")
        return self


class PumpDegraded(_Window):
    kind: Literal["pump_degraded"]
    channel: str
    delivery_fraction: float = Field(default=0.8, ge=0.0, le=1.5, description="delivered / commanded flow (0.8: 20 % less)")

    @model_validator(mode="after")
    def _pump(self) -> PumpDegraded:
        _check_channel(self.channel, PUMP_CHANNELS, "a pump")
        return self


IoFault = Annotated[WireBreak | FrozenInput | StuckActuator | PumpDegraded, Field(discriminator="kind")]


class IoFaultScenario(FrozenConfig):
    """A scenario file of I/O faults."""

    faults: list[IoFault] = Field(default_factory=list)


def load_fault_scenario(path: str | Path) -> IoFaultScenario:
    path = Path(path)
    return validate_model(IoFaultScenario, read_yaml_mapping(path), source=str(path))


_SPEC = re.compile(r"^(?P<kind>[a-z_]+):(?P<channel>[a-z_]+)(?::(?P<value>[0-9.]+))?@(?P<start>[0-9.]+)(?:-(?P<end>[0-9.]+))?$")


def parse_fault(spec: str) -> WireBreak | FrozenInput | StuckActuator | PumpDegraded:
    """A fault from the command line: ``KIND:CHANNEL[:VALUE]@START_H[-END_H]``.

    ``VALUE`` is the current of a wire break (mA) or the delivery fraction of a
    degraded pump: ``wire_break:temperature_degc:0@100-120``,
    ``pump_degraded:feed_pump_lph:0.8@48``, ``stuck_actuator:glucose_pump_lph@72``.
    """
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ConfigError(f"--fault {spec!r}: expected KIND:CHANNEL[:VALUE]@START_H[-END_H], e.g. wire_break:temperature_degc:3.6@100-120")
    data: dict[str, object] = {"kind": match["kind"], "channel": match["channel"], "start_h": float(match["start"])}
    if match["end"] is not None:
        data["end_h"] = float(match["end"])
    if match["value"] is not None:
        value_field = {"wire_break": "current_ma", "pump_degraded": "delivery_fraction"}.get(match["kind"])
        if value_field is None:
            raise ConfigError(f"--fault {spec!r}: {match['kind']} takes no value (only wire_break's current and pump_degraded's fraction do)")
        data[value_field] = float(match["value"])
    scenario = validate_model(IoFaultScenario, {"faults": [data]}, source=f"--fault {spec!r}")
    return scenario.faults[0]
