"""Tag maps: where each logical signal lives on a PLC, how it is encoded and scaled.

A tag map is configuration (YAML in ``configs/plc/``): a PLC that names or
scales its tags differently is a new file, not new code. The defaults map the
reference interface exactly (``shared/reference-plc.md``):
``configs/plc/reference-opcua.yaml`` and ``configs/plc/reference-modbus.yaml``.

Scaling: engineering value = raw value × ``scale`` + ``offset``, for real
signals only (the runtime works in the reference units of
:data:`interfaces.signals.SIGNALS`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from interfaces.signals import SIGNALS, Kind
from plant_models.config_loading import FrozenConfig, read_yaml_mapping, validate_model
from plant_models.errors import ConfigError

OpcUaType = Literal["double", "float", "uint32", "int32", "uint16", "int16", "boolean", "string"]
ModbusType = Literal["float32", "float64", "uint16", "int16", "uint32", "int32", "string", "bool"]
ModbusTable = Literal["input", "holding", "coil", "discrete"]

_TYPES_FOR_KIND: dict[Kind, frozenset[str]] = {
    Kind.REAL: frozenset({"double", "float", "float32", "float64", "uint32", "int32", "uint16", "int16"}),
    Kind.UNSIGNED: frozenset({"uint32", "uint16"}),
    Kind.INTEGER: frozenset({"int32", "int16", "uint32", "uint16"}),
    Kind.BOOLEAN: frozenset({"boolean", "bool"}),
    Kind.TEXT: frozenset({"string"}),
}
REGISTERS_PER_TYPE: dict[str, int] = {"float32": 2, "float64": 4, "uint16": 1, "int16": 1, "uint32": 2, "int32": 2}


class _Scaled(FrozenConfig):
    scale: float = Field(default=1.0, description="engineering value = raw × scale + offset")
    offset: float = Field(default=0.0, description="engineering value = raw × scale + offset")

    @model_validator(mode="after")
    def _nonzero_scale(self) -> _Scaled:
        if self.scale == 0.0:
            raise ValueError("scale must not be 0")
        return self

    @property
    def scaled(self) -> bool:
        return (self.scale, self.offset) != (1.0, 0.0)

    def to_engineering(self, raw: Any) -> Any:
        """The engineering value of a raw one; an unscaled tag (every non-real signal) passes it through unchanged."""
        return raw * self.scale + self.offset if self.scaled else raw

    def to_raw(self, value: Any) -> Any:
        """The raw value of an engineering one; an unscaled tag passes it through unchanged."""
        return (value - self.offset) / self.scale if self.scaled else value


class OpcUaTag(_Scaled):
    node: str = Field(min_length=1, description="string node id in the map's namespace, e.g. 'BR01.PV.Temperature'")
    type: OpcUaType = Field(description="the variable's data type; writes use it as the explicit variant type")


class QualityBit(FrozenConfig):
    """A status bit in a register: set means the value is Bad (or not measured)."""

    table: Literal["input", "holding"] = "input"
    address: int = Field(ge=0, le=65535, description="register address, zero-based")
    bit: int = Field(ge=0, le=15, description="bit number, 0 = least significant")


class ModbusTag(_Scaled):
    table: ModbusTable = Field(description="input registers, holding registers, coils or discrete inputs")
    address: int = Field(ge=0, le=65535, description="first register or bit, zero-based")
    type: ModbusType = Field(description="encoding: 32/64-bit values span 2/4 registers in the map's word order")
    length: int | None = Field(default=None, ge=2, le=240, description="characters, for type 'string' (two per register)")
    bad_when: QualityBit | None = Field(default=None, description="the quality bit that marks this value Bad")

    @property
    def register_count(self) -> int:
        if self.type == "bool":
            return 1
        if self.type == "string":
            return ((self.length or 0) + 1) // 2
        return REGISTERS_PER_TYPE[self.type]


def _check_signal_names(names: list[str], *, kinds: dict[str, str], scaled: dict[str, bool]) -> None:
    problems = []
    for name in names:
        if name not in SIGNALS:
            guess = difflib.get_close_matches(name, list(SIGNALS), n=1)
            problems.append(f"tags.{name}: unknown signal" + (f"; did you mean '{guess[0]}'?" if guess else ""))
            continue
        signal = SIGNALS[name]
        if kinds[name] not in _TYPES_FOR_KIND[signal.kind]:
            allowed = ", ".join(sorted(_TYPES_FOR_KIND[signal.kind]))
            problems.append(f"tags.{name}: type '{kinds[name]}' cannot carry a {signal.kind.value} signal (expected one of {allowed})")
        if signal.kind is not Kind.REAL and scaled[name]:
            problems.append(f"tags.{name}: scale and offset apply to real signals only")
    missing = [name for name, signal in SIGNALS.items() if signal.required and name not in names]
    if missing:
        problems.append(f"tags: required signals missing: {', '.join(missing)}")
    if problems:
        raise ValueError("; ".join(problems))


class OpcUaTagMap(FrozenConfig):
    protocol: Literal["opcua"]
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="server endpoint URL, e.g. opc.tcp://127.0.0.1:4840/bioreactor")
    namespace_uri: str = Field(min_length=1, description="namespace of the node ids; its index is resolved from the server, never assumed")
    tags: dict[str, OpcUaTag]

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaTagMap:
        _check_signal_names(
            list(self.tags), kinds={n: t.type for n, t in self.tags.items()}, scaled={n: t.scaled for n, t in self.tags.items()}
        )
        seen: dict[str, str] = {}
        for name, tag in self.tags.items():
            if tag.node in seen:
                raise ValueError(f"tags.{name}: node '{tag.node}' is also mapped to {seen[tag.node]}")
            seen[tag.node] = name
        return self


class ModbusTagMap(FrozenConfig):
    protocol: Literal["modbus"]
    host: str = Field(min_length=1, description="PLC host name or address")
    port: int = Field(default=502, ge=1, le=65535, description="TCP port")
    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id")
    word_order: Literal["big", "little"] = Field(default="big", description="'big': high word first (ABCD)")
    tags: dict[str, ModbusTag]

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTagMap:
        _check_signal_names(
            list(self.tags), kinds={n: t.type for n, t in self.tags.items()}, scaled={n: t.scaled for n, t in self.tags.items()}
        )
        occupied: dict[tuple[str, int], str] = {}

        def occupy(table: str, first: int, count: int, owner: str) -> None:
            for address in range(first, first + count):
                if (table, address) in occupied and occupied[(table, address)] != owner:
                    raise ValueError(f"{owner}: {table} address {address} is also used by {occupied[(table, address)]}")
                occupied[(table, address)] = owner

        for name, tag in self.tags.items():
            boolean = tag.type == "bool"
            if boolean != (tag.table in ("coil", "discrete")):
                raise ValueError(f"tags.{name}: type '{tag.type}' does not fit table '{tag.table}' (booleans live in coils or discrete inputs)")
            if SIGNALS[name].writable and tag.table not in ("holding", "coil"):
                raise ValueError(f"tags.{name}: a written signal must be in holding registers or coils, not '{tag.table}'")
            if tag.type == "string" and (tag.length is None or tag.length % 2):
                raise ValueError(f"tags.{name}: a string needs an even 'length' in characters")
            occupy(tag.table, tag.address, tag.register_count, f"tags.{name}")
        for name, tag in self.tags.items():
            if tag.bad_when is not None:
                occupy(tag.bad_when.table, tag.bad_when.address, 1, f"the quality register {tag.bad_when.table} {tag.bad_when.address}")
        return self


TagMap = OpcUaTagMap | ModbusTagMap


def load_tag_map(path: str | Path) -> TagMap:
    """Load a tag map; its ``protocol`` field (``opcua`` or ``modbus``) chooses the schema."""
    path = Path(path)
    data = read_yaml_mapping(path)
    protocol = data.get("protocol")
    models: dict[str, type[OpcUaTagMap] | type[ModbusTagMap]] = {"opcua": OpcUaTagMap, "modbus": ModbusTagMap}
    if protocol not in models:
        raise ConfigError(f"{path}: protocol: expected 'opcua' or 'modbus'; got {protocol!r}")
    return validate_model(models[protocol], data, source=str(path))
