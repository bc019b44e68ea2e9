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

:class:`ModbusIoServer` is the soft PLC's field I/O as a Modbus I/O device
(a :class:`~simulator.io_map.ModbusIoMap`'s registers and coils, for
``plant-sim``) on the same register image, blocks and listener
(:func:`register_blocks`, :func:`refresh_registers`, :func:`serve_image`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Sequence

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from controller.types import LAB_FIELDS
from interfaces.modbus_codec import EncodedWrite, ModbusEncodingError, ModbusLayout, from_registers, to_registers
from interfaces.signals import SIGNALS
from interfaces.tagmap import ModbusTag, ModbusTagMap, WordOrder
from plant_models.errors import RemoteDisabledError, SetpointOutOfRangeError
from simulator.clocks import PlcServerClocks
from simulator.io_map import NOT_YET, ModbusAnalogInput, ModbusAnalogOutput, ModbusIoMap, ModbusSlot, ModbusValue
from simulator.plc import SimulatedPlc

log = structlog.get_logger(__name__)

_BIT_TABLES = ("coil", "discrete")
_TABLES = ("coil", "discrete", "holding", "input")
"""pymodbus's order of the four separate blocks of a device: coils, discrete inputs, holding registers, input registers."""
_TABLE_OF_FUNCTION = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding", 4: "input"}
_BITS_PER_REGISTER = 16
_TABLE_NAMES = {"input": "input register", "holding": "holding register", "coil": "coil", "discrete": "discrete input"}
LAB_TAGS = ("taken_at_h", *LAB_FIELDS)
"""The LIMS values of an I/O map, ``seq`` aside."""


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
        await self.publish()
        self._server = await serve_image(self._image, self._write, unit_id=self.tag_map.unit_id, host=self.host, port=self.port, endpoint=self.endpoint)
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


class ModbusIoServer:
    """The soft PLC's field I/O as a Modbus TCP device: the registers and coils of a :class:`~simulator.io_map.ModbusIoMap`.

    plant-sim writes the inputs (holding registers), their wire-break coils,
    the LIMS registers and ``clock.plant_minute``; a write anywhere else (an
    output, the PLC's minute, a gap) is refused with exception 2, as a device
    refuses a write to its read-only data; a write that covers only part of a
    32- or 64-bit value is refused with exception 3, as the PLC server does
    (the PLC would scan a number torn between two writes). The soft PLC puts its outputs and
    its minute into the image directly and reads the inputs from it, decoded
    with the runtime's codec in each value's word order.
    """

    def __init__(self, io_map: ModbusIoMap, *, host: str | None = None, port: int | None = None) -> None:
        self.io_map = io_map
        self.host = host or io_map.host
        self.port = port if port is not None else io_map.port
        self._image: RegisterImage = {table: {} for table in _TABLES}
        self._writable: dict[tuple[str, int], ModbusSlot] = {}
        """What plant-sim may write, by place: the inputs, their wire-break coils, the LIMS and the plant's minute (each a value a write must cover whole)."""
        for slot in io_map.slots():
            for address in range(slot.address, slot.address + slot.count):
                self._image[slot.table][address] = False if slot.table in _BIT_TABLES else 0
                if slot.path.startswith(("inputs.", "lims.")) or slot.path == "clock.plant_minute":
                    self._writable[(slot.table, address)] = slot
        for name in type(io_map.inputs).model_fields:
            channel: ModbusAnalogInput | None = getattr(io_map.inputs, name)
            if channel is not None:  # nothing wired yet: a dead loop
                self._store(channel.address, channel.number_of(channel.counts_of_current(0.0) if channel.counts else math.nan), channel.type, io_map.word_order_of(channel))
        if io_map.lims is not None:
            for name in LAB_TAGS:
                value: ModbusValue = getattr(io_map.lims, name)
                self._store(value.address, math.nan, value.type, io_map.word_order_of(value))
        if io_map.clock is not None:
            for value in (io_map.clock.plc_minute, io_map.clock.plant_minute):
                self._store(value.address, NOT_YET, value.type, io_map.word_order_of(value))
        self._server: ModbusTcpServer | None = None

    @property
    def endpoint(self) -> str:
        return f"modbus-tcp://{self.host}:{self.port} unit {self.io_map.unit_id}"

    async def start(self) -> None:
        self._server = await serve_image(self._image, self._write, unit_id=self.io_map.unit_id, host=self.host, port=self.port, endpoint=self.endpoint)
        log.info(
            "soft_plc_io_started",
            endpoint=self.endpoint,
            registers=len(self._image["holding"]) + len(self._image["input"]),
            bits=len(self._image["coil"]) + len(self._image["discrete"]),
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()

    def _write(self, table: str, address: int, values: list[int] | list[bool]) -> ExcCodes | None:
        """plant-sim's write: only to the inputs, the wire-break coils, the LIMS and the plant's clock, and never half a 32/64-bit value."""
        refused = [target for target in range(address, address + len(values)) if (table, target) not in self._writable]
        if refused:
            log.info(
                "modbus_io_write_refused",
                table=table,
                address=refused[0],
                code=int(ExcCodes.ILLEGAL_ADDRESS),
                reason="not an input, a wire-break coil, a LIMS or the plant's clock register",
            )
            return ExcCodes.ILLEGAL_ADDRESS
        span = range(address, address + len(values))
        for slot in dict.fromkeys(self._writable[(table, target)] for target in span):
            if slot.address < span.start or slot.address + slot.count > span.stop:  # half a 32/64-bit value: the PLC would scan a torn number
                reason = f"{slot.path} spans {slot.describe()}: write it whole, in one request"
                log.info("modbus_io_write_refused", table=table, address=slot.address, code=int(ExcCodes.ILLEGAL_VALUE), reason=reason)
                return ExcCodes.ILLEGAL_VALUE
        for index, value in enumerate(values):
            self._image[table][address + index] = bool(value) if table in _BIT_TABLES else int(value)
        return None

    # ---------------------------------------------------------------- the PLC's side

    def _store(self, address: int, number: float | int, data_type: str, word_order: WordOrder, table: str = "holding") -> None:
        for index, register in enumerate(to_registers(number, data_type, word_order)):
            self._image[table][address + index] = register

    def _number(self, table: str, address: int, count: int, data_type: str, word_order: WordOrder) -> float | int:
        return from_registers([int(self._image[table][address + index]) for index in range(count)], data_type, word_order)

    async def read_inputs(self) -> tuple[dict[str, float], dict[str, float] | None, frozenset[str]]:
        """The raw inputs by channel (counts or engineering units), the LIMS registers (None without them), and the channels whose wire-break coil is set."""
        inputs: dict[str, float] = {}
        broken: set[str] = set()
        for name in type(self.io_map.inputs).model_fields:
            channel: ModbusAnalogInput | None = getattr(self.io_map.inputs, name)
            if channel is None:
                continue
            inputs[name] = channel.raw_of(self._number("holding", channel.address, channel.register_count, channel.type, self.io_map.word_order_of(channel)))
            if channel.wire_break_coil is not None and self._image["coil"][channel.wire_break_coil]:
                broken.add(name)
        lims = None
        if self.io_map.lims is not None:
            lims = {}
            for name in ("seq", *LAB_TAGS):
                value: ModbusValue = getattr(self.io_map.lims, name)
                lims[name] = float(self._number("holding", value.address, value.register_count, value.type, self.io_map.word_order_of(value)))
        return inputs, lims, frozenset(broken)

    async def write_outputs(self, outputs: dict[str, float | bool], *, plc_minute: int | None) -> None:
        """The PLC's outputs (engineering units) into the output registers and the valve's bit; the minute it wants the plant at."""
        for name, value in outputs.items():
            if name == "harvest_valve":
                valve = self.io_map.outputs.harvest_valve
                self._image[valve.table][valve.address] = bool(value)
                continue
            channel: ModbusAnalogOutput = getattr(self.io_map.outputs, name)
            self._store(channel.address, channel.number_of(channel.to_raw(float(value))), channel.type, self.io_map.word_order_of(channel), table=channel.table)
        if plc_minute is not None and self.io_map.clock is not None:
            clock = self.io_map.clock.plc_minute
            self._store(clock.address, plc_minute, clock.type, self.io_map.word_order_of(clock))

    async def plant_minute(self) -> int:
        if self.io_map.clock is None:
            return NOT_YET
        clock = self.io_map.clock.plant_minute
        return int(self._number("holding", clock.address, clock.register_count, clock.type, self.io_map.word_order_of(clock)))


async def _answer_other_units(function_code: int, start_address: int, address: int, count: int, registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes:
    """The device action of every unit id but the served one: as a gateway whose target does not answer."""
    return ExcCodes.GATEWAY_NO_RESPONSE


# ------------------------------------------------------------------ the register image, shared by the servers


RegisterImage = dict[str, dict[int, int | bool]]
"""A server's registers by table (coil, discrete, holding, input) and address: what its clients read."""
DeviceAction = Callable[[int, int, int, int, list[int], list[int] | list[bool] | None], Coroutine[None, None, ExcCodes | None]]
WriteAction = Callable[[str, int, list[int] | list[bool]], ExcCodes | None]
"""A server's own handling of a write request: (table, first address, values); an exception code refuses it."""


def register_blocks(image: RegisterImage) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    """One pymodbus block per table spanning its mapped addresses (gaps inside read as 0; writes there are the device action's to refuse)."""
    blocks: list[list[SimData]] = []
    for table in _TABLES:
        addresses = image[table]
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


def refresh_registers(image: dict[int, int | bool], table: str, start_address: int, address: int, count: int, registers: list[int]) -> None:
    """Copy a table's image into pymodbus's block before a read (bits packed 16 to a register, lowest address in bit 0)."""
    if table in _BIT_TABLES:
        first = address // _BITS_PER_REGISTER - start_address
        for index in range(first, first + count):
            base = (start_address + index) * _BITS_PER_REGISTER
            registers[index] = sum(1 << bit for bit in range(_BITS_PER_REGISTER) if image.get(base + bit, False))
        return
    offset = address - start_address
    for index in range(count):
        registers[offset + index] = int(image.get(address + index, 0))


async def serve_image(image: RegisterImage, write: WriteAction, *, unit_id: int, host: str, port: int, endpoint: str) -> ModbusTcpServer:
    """A listening pymodbus TCP server for ``image``: reads answered from the image, writes handed to ``write``; other unit ids answer exception 11."""

    async def action(function_code: int, start_address: int, address: int, count: int, registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        """pymodbus's device action: refresh the registers a read will return, or hand a write over.

        ``registers`` is pymodbus's whole block for the table, starting at
        ``start_address``; coils and discrete inputs are packed 16 to a
        register, lowest address in bit 0 (and then ``start_address`` and
        ``count`` are in registers, ``address`` in bits).
        """
        table = _TABLE_OF_FUNCTION.get(function_code)
        if table is None or not image[table]:
            return ExcCodes.ILLEGAL_ADDRESS
        if values is None:
            refresh_registers(image[table], table, start_address, address, count, registers)
            return None
        return write(table, address, list(values))

    devices = [SimDevice(id=unit_id, simdata=register_blocks(image), action=action)]
    if unit_id != 0:  # pymodbus answers unit ids it does not serve from device 0, or fails with exception 4
        devices.append(SimDevice(id=0, simdata=register_blocks(image), action=_answer_other_units))
    server = ModbusTcpServer(devices, address=(host, port))
    try:
        await server.serve_forever(background=True)
    except RuntimeError as error:  # pymodbus's way of saying that it cannot listen
        await server.shutdown()
        raise OSError(f"{endpoint}: the Modbus server cannot listen (address in use or not local?)") from error
    return server
