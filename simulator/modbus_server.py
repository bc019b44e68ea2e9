"""The simulated PLC served over Modbus TCP (pymodbus), exactly as the tag map and the reference interface say.

The server keeps one register image per Modbus table (input and holding
registers, coils, discrete inputs) covering every mapped value and quality
register. :meth:`ModbusPlcServer.publish` scans the PLC and encodes every
value into it with the shared codec (:mod:`interfaces.modbus_codec`), setting
the quality bit of each Bad value (a failed probe, an unmeasured lab field).
A read may cover anything from a table's first to its last mapped address
(unmapped registers in between read 0, unmapped bits False, up to the next
multiple of 16 for bits, which pymodbus stores 16 to a register); beyond
that it is answered with exception 2.

A client's write to a holding register or coil goes through the PLC's own
logic, and a refused write leaves the old value:

- exception 2 (illegal data address): an address outside the mapped writable
  signals (a gap, a read-only signal, a quality register, an unmapped coil);
- exception 3 (illegal data value): outside the equipment's range, or only
  part of a multi-register value (a 32-bit value must be written whole, in
  one write-multiple-registers request);
- exception 4 (server device failure): refused because remote is disabled.

A request that covers several signals is applied in address order and stops
at the first refused one, whose exception it answers; the signals before it
stay written (Modbus has no per-value status; the runtime's port writes
adjacent signals in one request and reads back which of them were taken).

The encoding is the tag map's, whatever it is: each tag's word order (ABCD,
CDAB, BADC, DCBA), scaled 16- and 32-bit integers (raw = (engineering value
− offset) / scale, rounded), its own addresses. Serving another PLC's layout
is a matter of passing its map (``plc-sim --tag-map``); a value its integer
register cannot carry is published as 0 with its quality bit set.

pymodbus (3.16) keeps a server's registers in its own runtime built from
:class:`~pymodbus.simulator.SimDevice` blocks and offers one hook into them:
the device's ``action`` coroutine, called on every access before the
registers are read or written, which may update them in place or answer with
an :class:`~pymodbus.constants.ExcCodes` exception. The server uses it to
refresh the requested registers from its image on reads and to route writes
through the PLC. Only the map's unit id is served; any other unit id is
answered with exception 11 (gateway target device failed to respond).

The clocks (lockstep and free-running) are :class:`~simulator.clocks.PlcServerClocks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from interfaces.modbus_codec import EncodedWrite, ModbusEncodingError, ModbusLayout
from interfaces.signals import SIGNALS
from interfaces.tagmap import ModbusTag, ModbusTagMap
from plant_models.errors import RemoteDisabledError, SetpointOutOfRangeError
from simulator.clocks import PlcServerClocks
from simulator.plc import SimulatedPlc

log = structlog.get_logger(__name__)

_BIT_TABLES = ("coil", "discrete")
_TABLES = ("coil", "discrete", "holding", "input")
"""pymodbus's order of the four separate blocks of a device: coils, discrete inputs, holding registers, input registers."""
_TABLE_OF_FUNCTION = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding", 4: "input"}
_BITS_PER_REGISTER = 16
_TABLE_NAMES = {"input": "input register", "holding": "holding register", "coil": "coil", "discrete": "discrete input"}


class ModbusPlcServer(PlcServerClocks):
    """A pymodbus TCP server in front of a :class:`~simulator.plc.SimulatedPlc`."""

    def __init__(self, plc: SimulatedPlc, tag_map: ModbusTagMap, *, host: str | None = None, port: int | None = None) -> None:
        super().__init__(plc)
        self.tag_map = tag_map
        self.host = host or tag_map.host
        self.port = port if port is not None else tag_map.port
        self._layout = ModbusLayout(tag_map)
        self._image: dict[str, dict[int, int | bool]] = {table: {} for table in _TABLES}
        self._owner: dict[tuple[str, int], str] = {}
        """Which signal each mapped address belongs to (quality registers are not in it)."""
        for name, tag in tag_map.tags.items():
            for address in range(tag.address, tag.address + tag.register_count):
                self._image[tag.table][address] = False if tag.table in _BIT_TABLES else 0
                self._owner[(tag.table, address)] = name
            if tag.bad_when is not None:
                self._image[tag.bad_when.table][tag.bad_when.address] = 0
        self._server: ModbusTcpServer | None = None

    @property
    def endpoint(self) -> str:
        return f"modbus-tcp://{self.host}:{self.port} unit {self.tag_map.unit_id}"

    async def start(self) -> None:
        """Listen on the map's (or the given) host and port, serving the map's unit id."""
        devices = [SimDevice(id=self.tag_map.unit_id, simdata=self._blocks(), action=self._on_access)]
        if self.tag_map.unit_id != 0:  # pymodbus answers unit ids it does not serve from device 0, or fails with exception 4
            devices.append(SimDevice(id=0, simdata=self._blocks(), action=_answer_other_units))
        await self.publish()
        server = ModbusTcpServer(devices, address=(self.host, self.port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as error:  # pymodbus's way of saying that it cannot listen
            await server.shutdown()
            raise OSError(f"{self.endpoint}: the Modbus server cannot listen (address in use or not local?)") from error
        self._server = server
        log.info("modbus_plc_started", host=self.host, port=self.port, unit_id=self.tag_map.unit_id, signals=len(self.tag_map.tags))

    async def stop(self) -> None:
        """Stop listening and drop every client connection."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()

    async def publish(self) -> None:
        """Scan the PLC and encode every mapped value into the registers, with its quality bit.

        It never yields: a client never reads half a scan.
        """
        snapshot = self.plc.snapshot()
        quality: dict[tuple[str, int], int] = {}
        for name, tag in self.tag_map.tags.items():
            if tag.bad_when is not None:
                quality.setdefault((tag.bad_when.table, tag.bad_when.address), 0)
            reading = snapshot.get(name)
            if reading is None:
                continue
            good = reading.good
            try:
                encoded = self._layout.encode_value(name, reading.value)
            except ModbusEncodingError as error:  # e.g. NaN or an overflow in a scaled integer register: publish 0 and Bad
                log.debug("modbus_value_not_encodable", signal=name, value=reading.value, reason=str(error))
                encoded = EncodedWrite(tag.table, tag.address, registers=(0,) * tag.register_count, bit=False if tag.type == "bool" else None)
                good = False
            self._store(tag, encoded)
            if tag.bad_when is not None and not good:
                quality[(tag.bad_when.table, tag.bad_when.address)] |= 1 << tag.bad_when.bit
        for (table, address), bits in quality.items():
            self._image[table][address] = bits

    # ------------------------------------------------------------------ requests

    def _blocks(self) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
        """One pymodbus block per table spanning its mapped addresses (gaps inside read as 0; writes there are refused)."""
        blocks: list[list[SimData]] = []
        for table in _TABLES:
            addresses = self._image[table]
            if not addresses:  # no signal in this table: a placeholder the action refuses
                placeholder = SimData(0, values=[False], datatype=DataType.BITS) if table in _BIT_TABLES else SimData(0, datatype=DataType.INVALID)
                blocks.append([placeholder])
                continue
            first, last = min(addresses), max(addresses)
            if table in _BIT_TABLES:
                blocks.append([SimData(first, values=[False] * (last - first + 1), datatype=DataType.BITS)])
            else:
                blocks.append([SimData(first, count=last - first + 1, values=0, datatype=DataType.REGISTERS)])
        return blocks[0], blocks[1], blocks[2], blocks[3]

    async def _on_access(self, function_code: int, start_address: int, address: int, count: int, registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        """pymodbus's device action: refresh the registers a read will return, or apply a write through the PLC.

        ``registers`` is pymodbus's whole block for the table, starting at
        ``start_address``; coils and discrete inputs are packed 16 to a
        register, lowest address in bit 0 (and then ``start_address`` and
        ``count`` are in registers, ``address`` in bits).
        """
        table = _TABLE_OF_FUNCTION.get(function_code)
        if table is None or not self._image[table]:
            return ExcCodes.ILLEGAL_ADDRESS
        if values is None:
            self._refresh(table, start_address, address, count, registers)
            return None
        return self._write(table, address, list(values))

    def _refresh(self, table: str, start_address: int, address: int, count: int, registers: list[int]) -> None:
        image = self._image[table]
        if table in _BIT_TABLES:
            first = address // _BITS_PER_REGISTER - start_address
            for index in range(first, first + count):
                base = (start_address + index) * _BITS_PER_REGISTER
                registers[index] = sum(1 << bit for bit in range(_BITS_PER_REGISTER) if image.get(base + bit, False))
            return
        offset = address - start_address
        for index in range(count):
            registers[offset + index] = int(image.get(address + index, 0))

    def _write(self, table: str, address: int, values: list[int] | list[bool]) -> ExcCodes | None:
        """Apply a write request signal by signal, in address order; an exception code refuses it (see the module doc)."""
        span = range(address, address + len(values))
        names: list[str] = []
        for target in span:
            name = self._owner.get((table, target))
            if name is None or not SIGNALS[name].writable:
                what = f"{name} is read-only" if name is not None else "no writable signal is mapped there"
                log.info("modbus_write_refused", table=table, address=target, code=int(ExcCodes.ILLEGAL_ADDRESS), reason=what)
                return ExcCodes.ILLEGAL_ADDRESS
            if not names or names[-1] != name:
                names.append(name)
        for name in names:
            tag = self.tag_map.tags[name]
            if tag.address < span.start or tag.address + tag.register_count > span.stop:
                reason = f"{name} spans {_TABLE_NAMES[table]}s {tag.address}-{tag.address + tag.register_count - 1}: write it whole, in one request"
                log.info("modbus_write_refused", tag=name, table=table, address=tag.address, code=int(ExcCodes.ILLEGAL_VALUE), reason=reason)
                return ExcCodes.ILLEGAL_VALUE
        requested = self._decode_request(table, address, values)
        for name in names:
            tag = self.tag_map.tags[name]
            value = requested[name]
            before = self.plc.heartbeat
            try:
                self.plc.write(name, value)
            except RemoteDisabledError as error:
                log.info("modbus_write_refused", tag=name, value=value, table=table, address=tag.address, code=int(ExcCodes.DEVICE_FAILURE), reason=str(error))
                return ExcCodes.DEVICE_FAILURE
            except (SetpointOutOfRangeError, TypeError, ValueError) as error:
                log.info("modbus_write_refused", tag=name, value=value, table=table, address=tag.address, code=int(ExcCodes.ILLEGAL_VALUE), reason=str(error))
                return ExcCodes.ILLEGAL_VALUE
            for index in range(tag.register_count):
                self._image[table][tag.address + index] = values[tag.address + index - address]
            if self.plc.heartbeat != before:
                self.heartbeat_moved.set()
        return None

    def _decode_request(self, table: str, address: int, values: Sequence[int | bool]) -> dict[str, float | int | bool | str]:
        """Engineering values of the signals a request writes, decoded by the shared codec from the request's registers."""
        raw = {name: dict(registers) for name, registers in self._image.items()}
        raw[table].update({address + index: value for index, value in enumerate(values)})
        return {name: decoded.value for name, decoded in self._layout.decode(raw).items()}

    def _store(self, tag: ModbusTag, encoded: EncodedWrite) -> None:
        image = self._image[tag.table]
        if encoded.bit is not None:
            image[tag.address] = encoded.bit
            return
        for index, register in enumerate(encoded.registers):
            image[tag.address + index] = register


async def _answer_other_units(function_code: int, start_address: int, address: int, count: int, registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes:
    """The device action of every unit id but the served one: as a gateway whose target does not answer."""
    return ExcCodes.GATEWAY_NO_RESPONSE
