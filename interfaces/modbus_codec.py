"""Modbus register layout of a tag map: which blocks to read, how to decode them, how to encode a write.

Pure functions over register values, so that the port (network) and the
simulated PLC (server) share one encoding and it is tested without a socket.
Number conversion is pymodbus's own (``convert_to_registers`` /
``convert_from_registers``) in each tag's word order: pymodbus's ``big`` for
ABCD and BADC, ``little`` for CDAB and DCBA, and for BADC and DCBA the two
bytes of every register swapped, which pymodbus does not offer
(:func:`to_registers`, :func:`from_registers`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pymodbus.client.mixin import ModbusClientMixin

from interfaces.signals import SIGNALS
from interfaces.tagmap import ModbusTag, ModbusTagMap, WordOrder

_DATATYPE = ModbusClientMixin.DATATYPE
_PYMODBUS_TYPES = {
    "float32": _DATATYPE.FLOAT32,
    "float64": _DATATYPE.FLOAT64,
    "uint16": _DATATYPE.UINT16,
    "int16": _DATATYPE.INT16,
    "uint32": _DATATYPE.UINT32,
    "int32": _DATATYPE.INT32,
    "string": _DATATYPE.STRING,
}
_PYMODBUS_WORD_ORDER: dict[WordOrder, Literal["big", "little"]] = {"ABCD": "big", "CDAB": "little", "BADC": "big", "DCBA": "little"}
_BYTES_SWAPPED = frozenset({"BADC", "DCBA"})
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
MAX_REGISTERS_PER_WRITE = 123
"""Write multiple registers (function 16) carries at most 123 registers (Modbus application protocol v1.1b3, 6.12)."""


class ModbusEncodingError(ValueError):
    """A value cannot be encoded in its tag's type (out of the integer range, not finite, wrong kind)."""


@dataclass(frozen=True)
class DecodedValue:
    value: float | int | bool | str
    good: bool


@dataclass(frozen=True)
class Block:
    table: str
    start: int
    count: int


@dataclass(frozen=True)
class EncodedWrite:
    table: str
    address: int
    registers: tuple[int, ...] = ()
    bit: bool | None = None


@dataclass(frozen=True)
class WriteRequest:
    """One Modbus write request and the signals it carries: adjacent holding registers (function 16) or one coil (function 5)."""

    write: EncodedWrite
    signals: tuple[str, ...]


def write_requests(encoded: Mapping[str, EncodedWrite]) -> list[WriteRequest]:
    """The fewest requests that write ``encoded``: signals in adjacent holding registers share one write-multiple-registers request.

    In address order; a block stops at a gap and at the 123 registers one
    request carries; a coil is a request of its own. A 32-bit value is never
    split between requests.
    """
    requests: list[WriteRequest] = []
    for name, write in sorted(encoded.items(), key=lambda item: (item[1].table, item[1].address)):
        last = requests[-1] if requests else None
        if (
            last is not None
            and write.bit is None
            and last.write.bit is None
            and last.write.table == write.table
            and last.write.address + len(last.write.registers) == write.address
            and len(last.write.registers) + len(write.registers) <= MAX_REGISTERS_PER_WRITE
        ):
            joined = EncodedWrite(write.table, last.write.address, registers=last.write.registers + write.registers)
            requests[-1] = WriteRequest(joined, (*last.signals, name))
        else:
            requests.append(WriteRequest(write, (name,)))
    return requests


class ModbusLayout:
    """The read blocks, decoding and encoding of one Modbus tag map."""

    def __init__(self, tag_map: ModbusTagMap) -> None:
        self.tag_map = tag_map
        self._tags = dict(tag_map.tags)

    def blocks(self) -> list[Block]:
        """The reads that cover every mapped value and quality register, split at the protocol's limits.

        One per table, from its first to its last mapped address; with the
        map's ``read_across_gaps`` false, one per run of adjacent mapped
        addresses instead.
        """
        spans: dict[str, set[int]] = {}
        for tag in self._tags.values():
            spans.setdefault(tag.table, set()).update(range(tag.address, tag.address + tag.register_count))
            if tag.bad_when is not None:
                spans.setdefault(tag.bad_when.table, set()).add(tag.bad_when.address)
        blocks = []
        for table, addresses in sorted(spans.items()):
            limit = MAX_BITS_PER_READ if table in ("coil", "discrete") else MAX_REGISTERS_PER_READ
            runs = _runs(sorted(addresses)) if not self.tag_map.read_across_gaps else [(min(addresses), max(addresses))]
            for first, last in runs:
                for start in range(first, last + 1, limit):
                    blocks.append(Block(table, start, min(limit, last + 1 - start)))
        return blocks

    def decode(self, raw: Mapping[str, Mapping[int, int | bool]]) -> dict[str, DecodedValue]:
        """Values of every mapped signal from ``raw[table][address]`` (as read by :meth:`blocks`)."""
        decoded = {}
        for name, tag in self._tags.items():
            decoded[name] = DecodedValue(self._value(tag, raw), self._good(tag, raw))
        return decoded

    def encode(self, name: str, value: float | bool | str) -> EncodedWrite:
        """The registers or bit that write ``value`` (engineering units) to the writable signal ``name``."""
        if name not in self._tags or not SIGNALS[name].writable:
            raise KeyError(f"{name} is not a writable signal of this tag map")
        if isinstance(value, float) and not math.isfinite(value):
            raise ModbusEncodingError(f"{name}: {value!r} is not finite; a setpoint must be a number")
        return self.encode_value(name, value)

    def encode_value(self, name: str, value: float | bool | str) -> EncodedWrite:
        """The registers or bit that carry ``value`` for any mapped signal: what a server publishes (NaN allowed for floats)."""
        tag = self._tags[name]
        if tag.type == "bool":
            if not isinstance(value, bool):
                raise ModbusEncodingError(f"{name}: expected a boolean, got {value!r}")
            return EncodedWrite(tag.table, tag.address, bit=value)
        if tag.type == "string":
            text = str(value).encode("ascii", errors="replace")[: tag.length].ljust(tag.length or 0, b"\0").decode("ascii")
            return EncodedWrite(tag.table, tag.address, registers=tuple(ModbusClientMixin.convert_to_registers(text, _DATATYPE.STRING)))
        if isinstance(value, str | bool):
            raise ModbusEncodingError(f"{name}: expected a number, got {value!r}")
        raw: float = tag.to_raw(float(value))
        if tag.type in ("float32", "float64"):
            encoded: float | int = raw
        else:
            bits = int(tag.type[-2:])
            low, high = (0, 2**bits - 1) if tag.type.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if not (math.isfinite(raw) and low <= round(raw) <= high):
                raise ModbusEncodingError(f"{name}: {value!r} is outside the range of {_range_text(tag, low, high)}")
            encoded = round(raw)  # a scaled integer holds the nearest count
        return EncodedWrite(tag.table, tag.address, registers=to_registers(encoded, tag.type, self.tag_map.word_order_of(tag)))

    # ------------------------------------------------------------------ decoding

    def _value(self, tag: ModbusTag, raw: Mapping[str, Mapping[int, int | bool]]) -> float | int | bool | str:
        table = raw[tag.table]
        if tag.type == "bool":
            return bool(table[tag.address])
        registers = [int(table[address]) for address in range(tag.address, tag.address + tag.register_count)]
        if tag.type == "string":
            return _text(registers)
        return tag.to_engineering(from_registers(registers, tag.type, self.tag_map.word_order_of(tag)))

    @staticmethod
    def _good(tag: ModbusTag, raw: Mapping[str, Mapping[int, int | bool]]) -> bool:
        if tag.bad_when is None:
            return True
        register = int(raw[tag.bad_when.table][tag.bad_when.address])
        return not (register >> tag.bad_when.bit) & 1


def _runs(addresses: Sequence[int]) -> list[tuple[int, int]]:
    """The first and last address of each run of consecutive ``addresses`` (sorted)."""
    runs: list[tuple[int, int]] = []
    for address in addresses:
        if runs and runs[-1][1] + 1 == address:
            runs[-1] = (runs[-1][0], address)
        else:
            runs.append((address, address))
    return runs


def to_registers(value: float | int, data_type: str, word_order: WordOrder) -> tuple[int, ...]:
    """The registers, in address order, that carry a number of ``data_type`` (float32, int16, …) in ``word_order``."""
    registers = ModbusClientMixin.convert_to_registers(value, _PYMODBUS_TYPES[data_type], word_order=_PYMODBUS_WORD_ORDER[word_order])
    return tuple(_swap_bytes(registers) if word_order in _BYTES_SWAPPED else registers)


def from_registers(registers: Sequence[int], data_type: str, word_order: WordOrder) -> float | int:
    """The number of ``data_type`` that ``registers`` (in address order) carry in ``word_order``."""
    ordered = _swap_bytes(registers) if word_order in _BYTES_SWAPPED else list(registers)
    value = ModbusClientMixin.convert_from_registers(ordered, _PYMODBUS_TYPES[data_type], word_order=_PYMODBUS_WORD_ORDER[word_order])
    if not isinstance(value, int | float):
        raise TypeError(f"{data_type} decoded as {type(value).__name__}, not a number")
    return value


def _swap_bytes(registers: Sequence[int]) -> list[int]:
    """Each register with its two bytes exchanged: what BADC and DCBA add to pymodbus's word orders."""
    return [((register & 0xFF) << 8) | ((register >> 8) & 0xFF) for register in registers]


def _range_text(tag: ModbusTag, low: int, high: int) -> str:
    """``int16 [-32768, 32767]``, and for a scaled tag the engineering range: ``int16 [-32768, 32767] (× 0.1 + 0: [-3276.8, 3276.7])``."""
    plain = f"{tag.type} [{low}, {high}]"
    if not tag.scaled:
        return plain
    ends = sorted((tag.to_engineering(low), tag.to_engineering(high)))
    return f"{plain} (× {tag.scale:g} + {tag.offset:g}: [{ends[0]:g}, {ends[1]:g}])"


def _text(registers: Sequence[int]) -> str:
    """ASCII text, two characters per register, first in the high byte, NUL-padded: as :meth:`ModbusLayout.encode_value` writes it.

    The word order applies to numbers only (characters run in address order
    whatever the map's word order). A byte that is not ASCII reads as U+FFFD
    rather than failing the whole read.
    """
    data = b"".join((register & 0xFFFF).to_bytes(2, "big") for register in registers)
    return data.rstrip(b"\0").decode("ascii", errors="replace")


def registers_by_address(block: Block, values: Sequence[int | bool]) -> dict[int, int | bool]:
    """A block's read result keyed by address, for :meth:`ModbusLayout.decode`."""
    if len(values) < block.count:
        raise ValueError(f"{block.table} block at {block.start}: expected {block.count} values, got {len(values)}")
    return {block.start + i: values[i] for i in range(block.count)}
