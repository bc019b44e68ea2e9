"""A PLC that lays its registers out its own way (CDAB words, scaled 16-bit integers), over Modbus TCP on 127.0.0.1.

- The runtime's port against the simulated PLC serving ``configs/plc/example-modbus-cdab-scaled.yaml``,
  through a proxy that logs every request: reads are one request per table,
  adjacent setpoints go in one write-multiple-registers request.
- pyModbusTCP (not pymodbus) as an independent client of the simulated PLC:
  it reads and writes the registers as docs/plc-interface.md documents them,
  decoded here by hand.
- pyModbusTCP's server as a PLC that is not pymodbus, its registers set word
  by word from the byte patterns, read and written by the port.
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyModbusTCP.client import ModbusClient
from pyModbusTCP.constants import EXP_DATA_ADDRESS
from pyModbusTCP.server import DataBank, DataHandler, ModbusServer
from runtime_harness import free_port

from controller.ports import PlcMappingError, PlcWriteRefusedError
from interfaces.modbus_port import ModbusPort
from interfaces.signals import SIGNALS
from interfaces.tagmap import ModbusTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.modbus_server import ModbusPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
_loaded = load_tag_map(REPO / "configs" / "plc" / "example-modbus-cdab-scaled.yaml")
assert isinstance(_loaded, ModbusTagMap)
EXAMPLE: ModbusTagMap = _loaded
WRITES = (5, 6, 15, 16)


@dataclass(frozen=True)
class Request:
    function: int
    address: int
    count: int


@dataclass
class RequestLog:
    """Every request a client sent through :func:`_start_proxy`, decoded from its PDU."""

    requests: list[Request] = field(default_factory=list)

    def writes(self) -> list[Request]:
        return [request for request in self.requests if request.function in WRITES]

    def reads(self) -> list[Request]:
        return [request for request in self.requests if request.function in (1, 2, 3, 4)]


async def _start_proxy(listen_port: int, target_port: int, log: RequestLog) -> asyncio.Server:
    """A Modbus TCP proxy on 127.0.0.1 that forwards every frame and logs each request's function, address and count."""

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def upstream() -> None:
            try:
                while True:
                    header = await client_reader.readexactly(7)  # MBAP: transaction, protocol, length, unit
                    pdu = await client_reader.readexactly(struct.unpack(">H", header[4:6])[0] - 1)
                    function, address, count = pdu[0], *struct.unpack(">HH", pdu[1:5])
                    log.requests.append(Request(function, address, 1 if function in (5, 6) else count))
                    server_writer.write(header + pdu)
                    await server_writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                server_writer.close()

        async def downstream() -> None:
            try:
                while data := await server_reader.read(4096):
                    client_writer.write(data)
                    await client_writer.drain()
            except ConnectionError:
                pass
            finally:
                client_writer.close()

        await asyncio.gather(upstream(), downstream())

    return await asyncio.start_server(handle, "127.0.0.1", listen_port)


def _float_cdab(low_word: int, high_word: int) -> float:
    """A float32 sent low word first, decoded by hand."""
    return float(struct.unpack(">f", struct.pack(">HH", high_word, low_word))[0])


def test_the_port_reads_and_writes_a_cdab_scaled_plc_in_the_fewest_requests(modbus_port_number, monkeypatch):
    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = ModbusPlcServer(plc, EXAMPLE, port=free_port())
        await server.start()
        log = RequestLog()
        proxy = await _start_proxy(modbus_port_number, server.port, log)
        port = ModbusPort(EXAMPLE, port=modbus_port_number, timeout_s=2.0)
        try:
            await port.connect()
            scanned = plc.snapshot()
            monkeypatch.setattr(plc, "snapshot", lambda: scanned)  # one scan (the probes are noisy), so that the values compare
            await server.publish()
            log.requests.clear()
            readings = await port.read()
            monkeypatch.undo()
            # One request per table: input registers 0-57, holding 0-29, coil 0, discrete inputs 0-2.
            assert sorted((r.function, r.address, r.count) for r in log.requests) == [(1, 0, 1), (2, 0, 3), (3, 0, 30), (4, 0, 58)]
            assert set(readings) == set(SIGNALS)
            # Scaled integers read within half a count of what the PLC scanned; CDAB floats as float32.
            resolution = {"PV.Temperature": 0.01, "PV.pH": 0.001, "PV.DO": 0.1, "PV.AgitationSpeed": 0.1}
            for name, step in resolution.items():
                assert readings[name].good == scanned[name].good
                if scanned[name].good:
                    assert readings[name].value == pytest.approx(scanned[name].value, abs=step / 2 + 1e-9), name
            for name in ("PV.Volume", "PV.FeedTotal", "Status.ProcessTime", "MPC.Pred.HarvestTiter"):
                assert readings[name].value == pytest.approx(scanned[name].value, rel=1e-6, abs=1e-9), name
            assert readings["PV.Volume"].value == pytest.approx(1400.0, abs=10.0)
            assert readings["Status.BatchId"].value == scanned["Status.BatchId"].value and readings["Status.Phase"].value == 1

            # The three setpoints side by side: one write-multiple-registers request of 3 registers, then one read per table.
            plc.set_operator_remote(True)
            log.requests.clear()
            await port.write({"SP.Temperature": 36.5, "SP.FeedRate": 2.5, "SP.GlucoseRate": 0.5})
            assert log.writes() == [Request(16, 0, 3)]
            assert len(log.reads()) == 4  # the read-back
            held = plc.snapshot()
            assert [held[name].value for name in ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature")] == pytest.approx([2.5, 0.5, 36.5], abs=1e-9)
            # Heartbeat (uint32, CDAB) and mode: one request; the recommendation (five floats, two word orders) another.
            log.requests.clear()
            recommendation = {"MPC.Rec.FeedRate": 2.0, "MPC.Rec.GlucoseRate": 0.4, "MPC.Rec.Temperature": 33.0, "MPC.Rec.HarvestTime": 290.0, "MPC.Pred.HarvestTiter": 5.5}
            await port.write({"MPC.Heartbeat": 70000, "MPC.Mode": 2, **recommendation})
            assert log.writes() == [Request(16, 10, 3), Request(16, 20, 10)]
            held = plc.snapshot()
            assert (plc.heartbeat, held["MPC.Mode"].value) == (70000, 2)
            assert [held[name].value for name in recommendation] == pytest.approx(list(recommendation.values()), rel=1e-6)

            # Remote off: the one request is refused (exception 4) and every signal in it is named; nothing changed.
            plc.set_operator_remote(False)
            log.requests.clear()
            with pytest.raises(PlcWriteRefusedError) as refused:
                await port.write({"SP.FeedRate": 3.0, "SP.GlucoseRate": 0.25, "SP.Temperature": 35.0})
            why = "exception 4 (server device failure), answering the one request for holding registers 0-2 (SP.FeedRate, SP.GlucoseRate, SP.Temperature)"
            assert refused.value.refusals == dict.fromkeys(["SP.FeedRate", "SP.GlucoseRate", "SP.Temperature"], why)
            assert log.writes() == [Request(16, 0, 3)]
            assert plc.snapshot()["SP.FeedRate"].value == pytest.approx(2.5)
            # A setpoint out of the equipment's range (38 °C) but inside int16: the PLC applies the request up to it;
            # read back, the two before it count as written and it alone as refused.
            plc.set_operator_remote(True)
            with pytest.raises(PlcWriteRefusedError) as refused:
                await port.write({"SP.FeedRate": 3.0, "SP.GlucoseRate": 0.25, "SP.Temperature": 39.0})
            assert list(refused.value.refusals) == ["SP.Temperature"]
            assert refused.value.refusals["SP.Temperature"].startswith("exception 3 (illegal data value), answering the one request for holding registers 0-2")
            held = plc.snapshot()
            assert [held[name].value for name in ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature")] == pytest.approx([3.0, 0.25, 36.5], abs=1e-9)
            # A value the int16 cannot carry is refused before anything is sent.
            log.requests.clear()
            with pytest.raises(ValueError, match=r"SP.Temperature: 400.0 is outside the range of int16"):
                await port.write({"SP.FeedRate": 1.0, "SP.Temperature": 400.0})
            assert log.requests == []
        finally:
            await port.close()
            proxy.close()
            await proxy.wait_closed()
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_pymodbustcp_reads_and_writes_the_simulated_plc_as_documented(modbus_port_number, monkeypatch):
    """An independent client: the registers of the example map, decoded by hand (CDAB floats, counts × scale + offset)."""

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = ModbusPlcServer(plc, EXAMPLE, port=modbus_port_number)
        await server.start()
        client = ModbusClient(host="127.0.0.1", port=modbus_port_number, unit_id=1, timeout=2.0, auto_open=True)
        try:
            scanned = plc.snapshot()
            monkeypatch.setattr(plc, "snapshot", lambda: scanned)  # one scan (the probes are noisy), so that the values compare
            await server.publish()
            inputs = await asyncio.to_thread(client.read_input_registers, 0, 58)
            monkeypatch.undo()
            assert inputs is not None, client.last_except_as_full_txt
            assert inputs[0] * 0.01 - 50.0 == pytest.approx(scanned["PV.Temperature"].value, abs=0.005 + 1e-9)
            assert inputs[1] * 0.001 == pytest.approx(scanned["PV.pH"].value, abs=0.0005 + 1e-9)
            assert _float_cdab(inputs[4], inputs[5]) == pytest.approx(scanned["PV.Volume"].value, rel=1e-6)
            assert _float_cdab(inputs[18], inputs[19]) == pytest.approx(scanned["Status.ProcessTime"].value, rel=1e-6, abs=1e-9)
            assert inputs[20] + (inputs[21] << 16) == scanned["Sample.Seq"].value and inputs[22] == 1
            assert inputs[47] == 0xFF  # no lab result yet: all eight sample fields not measured
            batch_id = b"".join(word.to_bytes(2, "big") for word in inputs[50:58]).rstrip(b"\0").decode("ascii")
            assert batch_id == scanned["Status.BatchId"].value
            # Writes by hand: the three setpoints in counts, the heartbeat low word first.
            plc.set_operator_remote(True)
            assert await asyncio.to_thread(client.write_multiple_registers, 0, [2500, 500, 3650]), client.last_except_as_full_txt
            assert await asyncio.to_thread(client.write_multiple_registers, 10, [0x1170, 0x0001, 2]), client.last_except_as_full_txt
            held = plc.snapshot()
            assert [held[name].value for name in ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature")] == pytest.approx([2.5, 0.5, 36.5], abs=1e-9)
            assert (plc.heartbeat, held["MPC.Mode"].value) == (70000, 2)
            # 39 °C (3900 counts) is outside the equipment's range: exception 3, the old setpoint stays.
            assert not await asyncio.to_thread(client.write_multiple_registers, 2, [3900])
            assert client.last_except == 3 and plc.snapshot()["SP.Temperature"].value == pytest.approx(36.5)
        finally:
            await asyncio.to_thread(client.close)
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


class _CountingHandler(DataHandler):
    """pyModbusTCP's data handler, keeping every write-multiple-registers request it is given."""

    def __init__(self, data_bank: DataBank) -> None:
        super().__init__(data_bank)
        self.register_writes: list[tuple[int, list[int]]] = []

    def write_h_regs(self, address: int, words_l: list[int], srv_info: Any) -> Any:
        self.register_writes.append((address, list(words_l)))
        return super().write_h_regs(address, words_l, srv_info)


def test_the_port_reads_and_writes_a_plc_that_is_not_pymodbus(modbus_port_number):
    """pyModbusTCP's server holds the example map's registers, set word by word; the port reads them and writes setpoints in one request."""
    bank = DataBank()
    bank.set_input_registers(0, [8650, 7050, 400, 1200])  # 36.5 °C (+50, 0.01), pH 7.05, DO 40.0 %, 120.0 rpm
    bank.set_input_registers(4, [0x0000, 0x44AF])  # PV.Volume 1400.0 (44 AF 00 00), low word first
    bank.set_input_registers(18, [0x8000, 0x42F2, 0x0002, 0x0001, 1])  # ProcessTime 121.25 (42 F2 80 00), Sample.Seq 65538, Phase 1
    bank.set_input_registers(46, [1 << 10, 0xFF])  # PV.Capacitance Bad; no lab field measured
    bank.set_input_registers(50, [0x4252, 0x3031, 0x2D30, 0x3037])  # "BR01-007"
    bank.set_discrete_inputs(0, [True, False, False])
    handler = _CountingHandler(bank)
    server = ModbusServer(host="127.0.0.1", port=modbus_port_number, no_block=True, data_hdl=handler)
    server.start()

    async def scenario() -> None:
        port = ModbusPort(EXAMPLE, port=modbus_port_number, timeout_s=2.0)
        try:
            await port.connect()
            readings = await port.read()
            assert readings["PV.Temperature"].value == pytest.approx(36.5, abs=1e-9) and readings["PV.Temperature"].good
            assert readings["PV.pH"].value == pytest.approx(7.05, abs=1e-9)
            assert (readings["PV.DO"].value, readings["PV.AgitationSpeed"].value) == (pytest.approx(40.0), pytest.approx(120.0))
            assert readings["PV.Volume"].value == 1400.0 and readings["Status.ProcessTime"].value == 121.25
            assert (readings["Sample.Seq"].value, readings["Status.Phase"].value, readings["Status.BatchId"].value) == (65538, 1, "BR01-007")
            assert not readings["PV.Capacitance"].good and math.isnan(readings["PV.Capacitance"].value)
            assert not readings["Sample.VCD"].good and readings["Status.RemoteEnabled"].value is True
            await port.write({"SP.FeedRate": 2.5, "SP.GlucoseRate": 0.5, "SP.Temperature": 36.5})
            await port.write({"MPC.Heartbeat": 70000, "MPC.Mode": 2, "MPC.Rec.HarvestTime": 290.0, "MPC.Pred.HarvestTiter": 5.5})
        finally:
            await port.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        server.stop()
    assert handler.register_writes == [
        (0, [2500, 500, 3650]),
        (10, [0x1170, 0x0001, 2]),
        (26, [0x0000, 0x4391, 0x40B0, 0x0000]),  # 290.0 (43 91 00 00) low word first, 5.5 (40 B0 00 00) high word first (its own order)
    ]
    assert bank.get_holding_registers(0, 3) == [2500, 500, 3650]


class _StrictHandler(DataHandler):
    """pyModbusTCP's data handler for a PLC that answers exception 2 to a read touching a register it does not map."""

    def __init__(self, data_bank: DataBank, mapped: dict[str, set[int]]) -> None:
        super().__init__(data_bank)
        self.mapped = mapped
        self.reads: list[tuple[str, int, int]] = []

    def _read(self, table: str, address: int, count: int, srv_info: Any, read: Any) -> Any:
        self.reads.append((table, address, count))
        if not set(range(address, address + count)) <= self.mapped[table]:
            return DataHandler.Return(exp_code=EXP_DATA_ADDRESS)
        return read(address, count, srv_info)

    def read_i_regs(self, address: int, count: int, srv_info: Any) -> Any:
        return self._read("input", address, count, srv_info, super().read_i_regs)

    def read_h_regs(self, address: int, count: int, srv_info: Any) -> Any:
        return self._read("holding", address, count, srv_info, super().read_h_regs)


def test_a_plc_that_refuses_unmapped_registers_is_read_run_by_run_when_the_map_says_so(modbus_port_number):
    mapped: dict[str, set[int]] = {"input": set(), "holding": set()}
    for tag in EXAMPLE.tags.values():
        if tag.table in mapped:
            mapped[tag.table].update(range(tag.address, tag.address + tag.register_count))
        if tag.bad_when is not None:
            mapped[tag.bad_when.table].add(tag.bad_when.address)
    bank = DataBank()
    bank.set_input_registers(4, [0x0000, 0x44AF])  # PV.Volume 1400.0, low word first
    handler = _StrictHandler(bank, mapped)
    server = ModbusServer(host="127.0.0.1", port=modbus_port_number, no_block=True, data_hdl=handler)
    server.start()
    run_by_run = EXAMPLE.model_copy(update={"read_across_gaps": False})

    async def scenario() -> None:
        # Read as one block per table, the gaps (input 23, 42-45, 48-49; holding 3-9, 13-19) are refused: named at connect.
        port = ModbusPort(EXAMPLE, port=modbus_port_number, timeout_s=2.0)
        with pytest.raises(PlcMappingError) as refused:
            await port.connect()
        assert set(refused.value.problems) == {"input registers 0-57", "holding registers 0-29"}
        assert all("read_across_gaps: false" in problem for problem in refused.value.problems.values())
        # Run by run it fits: one request per run of adjacent mapped registers.
        port = ModbusPort(run_by_run, port=modbus_port_number, timeout_s=2.0)
        try:
            await port.connect()
            handler.reads.clear()
            readings = await port.read()
            assert readings["PV.Volume"].value == 1400.0
            assert sorted(handler.reads) == [
                ("holding", 0, 3),
                ("holding", 10, 3),
                ("holding", 20, 10),
                ("input", 0, 23),
                ("input", 24, 18),
                ("input", 46, 2),
                ("input", 50, 8),
            ]
        finally:
            await port.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        server.stop()
