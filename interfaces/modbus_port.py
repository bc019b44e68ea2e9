"""The PLC port over Modbus TCP (pymodbus client).

- :meth:`ModbusPort.connect` checks the tag map against the PLC before the
  port counts as connected: it reads the map's blocks once (the requests of
  one :meth:`ModbusPort.read`); where the PLC answers a block with an
  exception that says the map does not fit (illegal function, illegal data
  address, illegal data value), it reads each mapped signal and quality
  register of that block alone to name them, and raises
  :class:`~controller.ports.PlcMappingError` with every problem. Modbus has no
  types and no access rights to ask for: a register that exists but holds
  something else, or refuses writes, is not found here.
- :meth:`ModbusPort.read` reads the tag map's blocks (one request per Modbus
  table, or per run of adjacent mapped registers where the map says
  ``read_across_gaps: false``, split at the protocol's limits:
  :meth:`ModbusLayout.blocks`) and
  decodes every mapped signal with the shared codec. Modbus carries no
  timestamps (``source_time`` is None); a value whose quality bit is set reads
  Bad, so does a non-finite real that has no quality bit, and a Bad real
  reads NaN (its registers are meaningless), as over OPC UA.
- :meth:`ModbusPort.write` encodes every value first (NaN, ±Inf, a value
  outside its register type and a non-writable signal are refused before
  anything is sent), then sends the fewest requests
  (:func:`~interfaces.modbus_codec.write_requests`): one write multiple
  registers (function 16) for each run of signals in adjacent holding
  registers, so that a 32-bit value always arrives whole and adjacent
  setpoints arrive together, write single coil (function 5) for a bit. An
  exception response refuses that request only; the others are still sent.
  Everything is read back: accepted values compared register by register,
  and of a refused request of several signals those that hold what was
  written count as written, the others as refused.
- One request is in flight at a time (an :class:`asyncio.Lock`), each with a
  timeout. pymodbus's own retries and automatic reconnection are disabled: a
  write is never sent twice (a harvest request must not be repeated), and
  after a link error the caller reads the PLC again and decides. A broken
  client is dropped and replaced by a new one on the next :meth:`connect`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from controller.ports import PlcLinkError, PlcMappingError, PlcWriteMismatchError, PlcWriteRefusedError, Reading, Value
from interfaces.modbus_codec import Block, EncodedWrite, ModbusLayout, WriteRequest, registers_by_address, write_requests
from interfaces.signals import SIGNALS, Kind
from interfaces.tagmap import ModbusTagMap
from plant_models.errors import ConfigError

log = structlog.get_logger(__name__)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
"""The Modbus exception codes (Modbus application protocol v1.1b3, section 7)."""
_TABLE_NAMES = {"input": "input register", "holding": "holding register", "coil": "coil", "discrete": "discrete input"}
_LINK_ERRORS = (OSError, TimeoutError, asyncio.TimeoutError, ModbusException)
_MAPPING_EXCEPTIONS = frozenset({1, 2, 3})
"""Exception codes that answer a read because of what was asked (function, address, count), not because of the PLC's state."""
RawTables = dict[str, dict[int, int | bool]]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (how a Modbus endpoint is given on the command line) as its two parts."""
    host, _, port_text = endpoint.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"Modbus endpoint {endpoint!r}: expected host:port, e.g. 127.0.0.1:5020")
    return host, int(port_text)


def exception_reason(code: int) -> str:
    """How a refusal is named: ``exception 3 (illegal data value)``."""
    return f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"


class ModbusPort:
    """:class:`~controller.ports.PlcPort` over Modbus TCP."""

    def __init__(self, tag_map: ModbusTagMap, *, host: str | None = None, port: int | None = None, timeout_s: float = 5.0) -> None:
        if not timeout_s > 0.0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.tag_map = tag_map
        self.host = host or tag_map.host
        self.port = port if port is not None else tag_map.port
        self.timeout_s = timeout_s
        self._layout = ModbusLayout(tag_map)
        self._blocks = self._layout.blocks()
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        return f"modbus-tcp://{self.host}:{self.port} unit {self.tag_map.unit_id}"

    @property
    def connected(self) -> bool:
        """Whether a client is connected (as far as it knows: a silent PLC shows as a timeout on the next request)."""
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Connect with a new client (a failed one is never reused) and check the tag map against the PLC.

        Raises :class:`PlcLinkError` when the PLC cannot be reached or does not
        answer, :class:`PlcMappingError` naming every signal (or quality
        register) the PLC answers with illegal function, address or value;
        after either the port is not connected.
        """
        async with self._lock:
            self._drop_client()
            client = AsyncModbusTcpClient(
                self.host,
                port=self.port,
                name=f"bioreactor-mpc {self.host}:{self.port}",
                timeout=self.timeout_s,
                retries=0,  # a request is sent once: a write (a harvest request) must never be repeated
                reconnect_delay=0,  # no automatic reconnection: the caller reconnects, with a new client
            )
            try:
                connected = await asyncio.wait_for(client.connect(), self.timeout_s)
            except _LINK_ERRORS as error:
                client.close()
                raise PlcLinkError(f"{self.endpoint}: cannot connect: {error!r}") from error
            if not connected:
                client.close()
                raise PlcLinkError(f"{self.endpoint}: cannot connect (refused or timed out after {self.timeout_s} s)")
            self._client = client
            checked = False
            try:
                problems = await self._mapping_problems()
                checked = True
            finally:
                if not checked:  # a link error (the client is already dropped) or a cancellation
                    self._drop_client()
            if problems:
                self._drop_client()
                raise PlcMappingError(problems)
        log.info("modbus_connected", host=self.host, port=self.port, unit_id=self.tag_map.unit_id, blocks_checked=len(self._blocks))

    async def close(self) -> None:
        self._drop_client()

    async def read(self) -> dict[str, Reading]:
        """Every mapped signal, from one read request per block."""
        async with self._lock:
            raw = await self._read_blocks()
        readings = {}
        for name, decoded in self._layout.decode(raw).items():
            value: Any = decoded.value
            good = decoded.good
            if SIGNALS[name].kind is Kind.REAL:
                if self.tag_map.tags[name].bad_when is None and not math.isfinite(value):
                    good = False  # without a quality bit, NaN is how a register says "no value" (Sample.TakenAt before the first result)
                if not good:
                    value = math.nan
            readings[name] = Reading(value, good, None)
        return readings

    async def write(self, values: Mapping[str, Value]) -> None:
        """Write the signals in the fewest requests (adjacent holding registers in one) and verify them by reading back.

        Raises :class:`KeyError` (not a writable signal of this map) or
        :class:`ValueError` (not finite, wrong kind, outside its register
        type) before anything is sent; :class:`PlcWriteRefusedError` naming
        every signal the PLC did not take (the others were written: a request
        the PLC answered with an exception is read back, and those of its
        signals that hold the written registers count as written, as a PLC
        that applies a request in address order up to the refused value
        leaves them); :class:`PlcWriteMismatchError` when an accepted value
        reads back differently; :class:`PlcLinkError` when the link failed
        (the message says which signals were written, which are unknown and
        which were not sent).
        """
        encoded = {name: self._layout.encode(name, value) for name, value in values.items()}
        requests = write_requests(encoded)
        refused: list[tuple[WriteRequest, str]] = []
        written: list[str] = []
        async with self._lock:
            for index, request in enumerate(requests):
                refused_names = {name: reason for done, reason in refused for name in done.signals}
                unsent = [name for later in requests[index + 1 :] for name in later.signals]
                try:
                    client = self._link()
                except PlcLinkError as error:
                    raise PlcLinkError(f"{error}; {_progress(written, refused_names, None, list(request.signals) + unsent)}") from error
                try:
                    response = await self._send(client, _write_call(request.write, self.tag_map.unit_id))
                except PlcLinkError as error:
                    raise PlcLinkError(f"{error}; {_progress(written, refused_names, _carried(request), unsent)}") from error
                if response.isError():
                    refused.append((request, exception_reason(_exception_code(response))))
                else:
                    written.extend(request.signals)
            refusals: dict[str, str] = {}
            if written or any(len(request.signals) > 1 for request, _ in refused):
                try:
                    raw = await self._read_blocks()
                except PlcLinkError as error:
                    parts = [f"written but not verified: {', '.join(written)}"] if written else []
                    uncertain = [name for request, _ in refused if len(request.signals) > 1 for name in request.signals]
                    if uncertain:
                        parts.append(f"in a refused request, taken or not: {', '.join(uncertain)}")
                    alone = [request.signals[0] for request, _ in refused if len(request.signals) == 1]
                    if alone:
                        parts.append(f"refused: {', '.join(alone)}")
                    raise PlcLinkError(f"{error}; {'; '.join(parts)}") from error
                mismatched = [name for name in written if not _holds(raw, encoded[name])]
                if mismatched:
                    back = self._layout.decode(raw)
                    details = "; ".join(f"{name} ({_where(encoded[name])}) wrote {values[name]!r}, reads {back[name].value!r}" for name in mismatched)
                    raise PlcWriteMismatchError(f"{self.endpoint}: written values read back differently: {details}")
                for request, reason in refused:
                    refusals.update(_refused_signals(request, reason, raw, encoded))
            else:
                refusals = {name: reason for request, reason in refused for name in request.signals}
        if refusals:
            raise PlcWriteRefusedError(refusals)

    # ------------------------------------------------------------------ helpers

    def _link(self) -> AsyncModbusTcpClient:
        """The connected client, or :class:`PlcLinkError` (a client whose link the PLC closed is dropped)."""
        client = self._client
        if client is None:
            raise PlcLinkError(f"{self.endpoint}: not connected")
        if not client.connected:  # noticed before sending, rather than as a failed request
            self._drop_client()
            raise PlcLinkError(f"{self.endpoint}: the link was closed by the PLC")
        return client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def _send(self, client: AsyncModbusTcpClient, send: Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]) -> ModbusPDU:
        """One request and its answer within the timeout; a link failure drops the client."""
        try:
            return await asyncio.wait_for(send(client), self.timeout_s)
        except _LINK_ERRORS as error:
            self._drop_client()
            raise PlcLinkError(f"{self.endpoint}: no answer within {self.timeout_s} s or the link failed: {error!r}") from error

    async def _read_blocks(self) -> RawTables:
        raw: RawTables = {}
        for block in self._blocks:
            response = await self._send(self._link(), _read_call(block, self.tag_map.unit_id))
            if response.isError():
                raise PlcLinkError(f"{self.endpoint}: reading {_span(block)} answered {exception_reason(_exception_code(response))}; does the tag map match the PLC?")
            raw.setdefault(block.table, {}).update(self._values(block, response))
        return raw

    def _values(self, block: Block, response: ModbusPDU) -> dict[int, int | bool]:
        """A block's answer by address; a short answer is a :class:`PlcLinkError` (the client is dropped: the stream may be out of step)."""
        values = response.bits if block.table in ("coil", "discrete") else response.registers
        try:
            return registers_by_address(block, values)
        except ValueError as error:
            self._drop_client()
            raise PlcLinkError(f"{self.endpoint}: {error}") from error

    async def _mapping_problems(self) -> dict[str, str]:
        """What is wrong with each mapped signal on this PLC: empty when the map fits (one request per block, more only where one is refused)."""
        problems: dict[str, str] = {}
        for block in self._blocks:
            response = await self._send(self._link(), _read_call(block, self.tag_map.unit_id))
            if not response.isError():
                self._values(block, response)
                continue
            code = _exception_code(response)
            if code not in _MAPPING_EXCEPTIONS:
                raise PlcLinkError(f"{self.endpoint}: reading {_span(block)} answered {exception_reason(code)}")
            found = await self._refused_in(block)
            if not found:
                found = {
                    _span(block): f"answered {exception_reason(code)}, though each mapped signal in it reads alone: "
                    "the PLC does not serve the unmapped addresses between them, which the port reads as one block "
                    "(read_across_gaps: false in the tag map reads each run of adjacent signals alone)"
                }
            for name, problem in found.items():
                problems[name] = f"{problems[name]}; {problem}" if name in problems else problem
        return problems

    async def _refused_in(self, block: Block) -> dict[str, str]:
        """The signals of ``block`` whose own registers (or bits), or whose quality register, the PLC refuses to read."""
        problems: dict[str, list[str]] = {}
        for name, tag in self.tag_map.tags.items():
            if tag.table == block.table and block.start <= tag.address < block.start + block.count:
                own = Block(tag.table, tag.address, tag.register_count)
                reason = await self._read_refusal(own)
                if reason is not None:
                    problems.setdefault(name, []).append(f"{_span(own)} answered {reason}")
        quality_owners: dict[int, list[str]] = {}
        for name, tag in self.tag_map.tags.items():
            if tag.bad_when is not None and tag.bad_when.table == block.table and block.start <= tag.bad_when.address < block.start + block.count:
                quality_owners.setdefault(tag.bad_when.address, []).append(name)
        for address, owners in quality_owners.items():
            quality = Block(block.table, address, 1)
            reason = await self._read_refusal(quality)
            if reason is not None:
                for name in owners:
                    problems.setdefault(name, []).append(f"its quality register ({_span(quality)}) answered {reason}")
        return {name: "; ".join(found) for name, found in problems.items()}

    async def _read_refusal(self, block: Block) -> str | None:
        """Why the PLC refuses to read ``block`` (an exception of :data:`_MAPPING_EXCEPTIONS`), or None when it answers."""
        response = await self._send(self._link(), _read_call(block, self.tag_map.unit_id))
        if not response.isError():
            self._values(block, response)
            return None
        code = _exception_code(response)
        if code not in _MAPPING_EXCEPTIONS:
            raise PlcLinkError(f"{self.endpoint}: reading {_span(block)} answered {exception_reason(code)}")
        return exception_reason(code)


def _read_call(block: Block, unit: int) -> Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]:
    def send(client: AsyncModbusTcpClient) -> Awaitable[ModbusPDU]:
        functions = {
            "input": client.read_input_registers,
            "holding": client.read_holding_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }
        return functions[block.table](block.start, count=block.count, device_id=unit)

    return send


def _write_call(request: EncodedWrite, unit: int) -> Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]:
    def send(client: AsyncModbusTcpClient) -> Awaitable[ModbusPDU]:
        if request.bit is not None:
            return client.write_coil(request.address, request.bit, device_id=unit)
        return client.write_registers(request.address, list(request.registers), device_id=unit)

    return send


def _progress(written: list[str], refusals: Mapping[str, str], in_flight: str | None, unsent: list[str]) -> str:
    """What a write interrupted by a link failure did, for the caller who must read the PLC again."""
    parts = []
    if in_flight is not None:
        parts.append(f"the write of {in_flight} may or may not have been applied")
    if written:
        parts.append(f"written: {', '.join(written)}")
    if refusals:
        parts.append(f"refused: {', '.join(refusals)}")
    if unsent:
        parts.append(f"not sent: {', '.join(unsent)}")
    return "; ".join(parts) + "; read the PLC again"


def _holds(raw: RawTables, request: EncodedWrite) -> bool:
    """Whether the PLC holds exactly the registers (or the bit) that were written."""
    table = raw[request.table]
    if request.bit is not None:
        return bool(table[request.address]) == request.bit
    return all(int(table[request.address + i]) == register for i, register in enumerate(request.registers))


def _refused_signals(request: WriteRequest, reason: str, raw: RawTables, encoded: Mapping[str, EncodedWrite]) -> dict[str, str]:
    """The signals of a request the PLC answered with an exception that it did not take, each with why.

    A request of one signal refuses it. In a request of several, those that
    read back as written were taken (a PLC applies such a request in address
    order up to the refused value, or not at all); if every one reads back as
    written, all are named: the PLC refused the request, whichever value it
    meant.
    """
    if len(request.signals) == 1:
        return {request.signals[0]: reason}
    why = f"{reason}, answering the one request for {_request_span(request)} ({', '.join(request.signals)})"
    taken = [name for name in request.signals if _holds(raw, encoded[name])]
    if len(taken) == len(request.signals):
        return dict.fromkeys(request.signals, why)
    return {name: why for name in request.signals if name not in taken}


def _carried(request: WriteRequest) -> str:
    """The signals of a request and where: ``SP.FeedRate, SP.GlucoseRate (holding registers 0-3)``."""
    return f"{', '.join(request.signals)} ({_request_span(request)})"


def _where(request: EncodedWrite) -> str:
    """Where a signal's value starts: ``holding register 4``."""
    return f"{_TABLE_NAMES[request.table]} {request.address}"


def _request_span(request: WriteRequest) -> str:
    """Where a request writes: ``holding register 4`` for one signal, ``holding registers 0-5`` for several."""
    if len(request.signals) == 1:
        return _where(request.write)
    return _span(Block(request.write.table, request.write.address, len(request.write.registers)))


def _span(block: Block) -> str:
    """``input registers 0-77``, ``coil 5``."""
    table = _TABLE_NAMES[block.table]
    return f"{table} {block.start}" if block.count == 1 else f"{table}s {block.start}-{block.start + block.count - 1}"


def _exception_code(response: ModbusPDU) -> int:
    return int(getattr(response, "exception_code", 0))
