"""The runtime's Modbus port against the simulated PLC on 127.0.0.1: block reads, checked and verified writes, link loss, and the same PLC over OPC UA."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from controller.ports import PlcLinkError, PlcWriteMismatchError, PlcWriteRefusedError, Reading
from interfaces.modbus_port import ModbusPort
from interfaces.opcua_port import OpcUaPort
from interfaces.signals import SIGNALS, Kind
from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.modbus_server import ModbusPlcServer
from simulator.opcua_server import OpcUaPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent


def _load(path: Path, kind: type[ModbusTagMap | OpcUaTagMap]) -> Any:
    tag_map = load_tag_map(path)
    if not isinstance(tag_map, kind):
        raise TypeError(f"{path} is not a {kind.__name__}")
    return tag_map


TAG_MAP: ModbusTagMap = _load(REPO / "configs" / "plc" / "reference-modbus.yaml", ModbusTagMap)
OPCUA_TAG_MAP: OpcUaTagMap = _load(REPO / "configs" / "plc" / "reference-opcua.yaml", OpcUaTagMap)
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
FAULTS = REPO / "configs" / "simulate" / "faults.yaml"


def _float32(value: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", value))[0])


def test_port_reads_writes_and_survives_a_lost_link(modbus_port_number):
    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = ModbusPlcServer(plc, TAG_MAP, port=modbus_port_number)
        await server.start()
        port = ModbusPort(TAG_MAP, port=modbus_port_number, timeout_s=2.0)
        try:
            await port.connect()
            readings = await port.read()
            assert set(readings) == set(SIGNALS)
            assert readings["PV.Volume"].good and readings["PV.Volume"].value == pytest.approx(1400.0, abs=10.0)
            assert readings["Sample.Seq"].value == 0 and readings["Status.Phase"].value == 1
            assert readings["Status.BatchId"].value == plc.snapshot()["Status.BatchId"].value
            assert readings["PV.Temperature"].source_time is None  # Modbus carries no timestamps
            # No lab result yet: the sample fields are not measured, NaN and Bad; Sample.TakenAt has no quality bit.
            assert math.isnan(float(readings["Sample.VCD"].value)) and not readings["Sample.VCD"].good
            # Accepted writes are verified by reading back; refused ones are named with the PLC's exception.
            plc.set_operator_remote(True)
            await port.write({"SP.FeedRate": 2.5, "SP.Temperature": 36.0, "MPC.Heartbeat": 7, "MPC.Mode": 2, "MPC.Rec.HarvestTime": 290.1})
            assert (plc.snapshot()["SP.FeedRate"].value, plc.heartbeat, plc.snapshot()["MPC.Mode"].value) == (2.5, 7, 2)
            assert plc.snapshot()["MPC.Rec.HarvestTime"].value == _float32(290.1)
            # SP.GlucoseRate and SP.Temperature (holding registers 2-5) go in one request, which the PLC applies in address order
            # up to the refused value: read back, SP.GlucoseRate counts as written and only SP.Temperature as refused.
            with pytest.raises(PlcWriteRefusedError) as refused:
                await port.write({"SP.GlucoseRate": 0.5, "SP.Temperature": 99.0, "MPC.Mode": 9})
            assert refused.value.refusals == {
                "SP.Temperature": "exception 3 (illegal data value), answering the one request for holding registers 2-5 (SP.GlucoseRate, SP.Temperature)",
                "MPC.Mode": "exception 3 (illegal data value)",
            }
            assert plc.snapshot()["SP.GlucoseRate"].value == 0.5 and plc.snapshot()["SP.Temperature"].value == 36.0
            plc.set_operator_remote(False)
            with pytest.raises(PlcWriteRefusedError, match=r"SP.FeedRate: exception 4 \(server device failure\)"):
                await port.write({"SP.FeedRate": 1.0})
            # Refused before anything is sent: a value that is not finite, or that its register cannot carry; a signal that is not written.
            plc.set_operator_remote(True)
            with pytest.raises(ValueError, match="SP.GlucoseRate: nan is not finite"):
                await port.write({"SP.FeedRate": 1.0, "SP.GlucoseRate": math.nan})
            with pytest.raises(ValueError, match="outside the range of uint32"):
                await port.write({"SP.FeedRate": 1.0, "MPC.Heartbeat": -1})
            assert plc.snapshot()["SP.FeedRate"].value == 2.5
            with pytest.raises(KeyError, match="not a writable signal"):
                await port.write({"PV.Volume": 1.0})
            # The link goes: reads fail at once; after the server is back a new connect works.
            await server.stop()
            await asyncio.sleep(0.05)
            with pytest.raises(PlcLinkError, match="closed by the PLC"):
                await port.read()
            assert not port.connected
            with pytest.raises(PlcLinkError, match="not connected"):
                await port.write({"SP.FeedRate": 1.0})
            with pytest.raises(PlcLinkError, match="cannot connect"):
                await port.connect()
            server = ModbusPlcServer(plc, TAG_MAP, port=modbus_port_number)
            await server.start()
            await port.connect()
            assert (await port.read())["MPC.Heartbeat"].value == 7
        finally:
            await port.close()
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_value_the_plc_does_not_hold_after_accepting_it_is_a_mismatch(modbus_port_number, monkeypatch):
    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = ModbusPlcServer(plc, TAG_MAP, port=modbus_port_number)
        await server.start()
        port = ModbusPort(TAG_MAP, port=modbus_port_number, timeout_s=2.0)
        accept = plc.write

        def accept_but_hold_another(tag: str, value: object) -> None:  # a PLC that clamps silently
            accept(tag, value)
            if tag == "SP.FeedRate":
                plc.write_setpoint(tag, 1.25)

        monkeypatch.setattr(plc, "write", accept_but_hold_another)

        async def scan_continuously() -> None:
            while True:
                await server.publish()
                await asyncio.sleep(0)

        scanner = asyncio.create_task(scan_continuously())
        try:
            await port.connect()
            plc.set_operator_remote(True)
            with pytest.raises(PlcWriteMismatchError, match=r"SP.FeedRate \(holding register 0\) wrote 2.5, reads 1.25"):
                await port.write({"SP.FeedRate": 2.5})
        finally:
            scanner.cancel()
            await port.close()
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def _zeros_answer(pdu: bytes) -> bytes:
    """The answer to a read request (function 1-4) whose every bit or register is 0."""
    function, count = pdu[0], struct.unpack(">H", pdu[3:5])[0]
    data = bytes((count + 7) // 8) if function in (1, 2) else bytes(2 * count)
    return bytes([function, len(data)]) + data


def _answer_reads_only(received: bytearray) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A Modbus TCP server that answers every read with zeros and every other request with silence (kept in ``received``)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)  # MBAP: transaction, protocol, length, unit
                transaction, _, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                function = pdu[0]
                if function not in (1, 2, 3, 4):
                    received.extend(header + pdu)
                    continue
                answer = _zeros_answer(pdu)
                writer.write(struct.pack(">HHHB", transaction, 0, len(answer) + 1, unit) + answer)
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    return serve


def test_a_silent_plc_is_a_link_error_and_a_write_is_sent_once(modbus_port_number):
    async def scenario() -> None:
        received = bytearray()

        async def listen_silently(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                received.extend(data)
            writer.close()

        # A PLC that accepts the connection and never answers: the connect's check of the map times out.
        silent = await asyncio.start_server(listen_silently, "127.0.0.1", modbus_port_number)
        port = ModbusPort(TAG_MAP, port=modbus_port_number, timeout_s=0.3)
        try:
            with pytest.raises(PlcLinkError, match="no answer within 0.3 s"):
                await port.connect()
            assert not port.connected
        finally:
            silent.close()
            await silent.wait_closed()
        # A PLC that answers reads (the connect's check passes) and falls silent on a write: the write is sent once.
        received.clear()
        reads_only = await asyncio.start_server(_answer_reads_only(received), "127.0.0.1", modbus_port_number)
        try:
            await port.connect()
            with pytest.raises(PlcLinkError, match=r"the write of SP.FeedRate \(holding register 0\) may or may not have been applied.*not sent: SP.Temperature"):
                await port.write({"SP.FeedRate": 2.5, "SP.Temperature": 36.0})
            assert not port.connected
            await asyncio.sleep(0.5)  # any retry would have been sent by now
            # One write-multiple-registers request: MBAP header (7 bytes) + function 16, address 0, 2 registers, 4 bytes of data.
            assert len(received) == 7 + 10 and received[7] == 16
            with pytest.raises(PlcLinkError):
                await port.read()
        finally:
            await port.close()
            reads_only.close()
            await reads_only.wait_closed()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_the_same_plc_reads_the_same_over_opcua_and_modbus(modbus_port_number, opcua_endpoint, monkeypatch):
    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(FAULTS))
        scan = plc.snapshot
        modbus_server = ModbusPlcServer(plc, TAG_MAP, port=modbus_port_number)
        opcua_server = OpcUaPlcServer(plc, OPCUA_TAG_MAP, endpoint=opcua_endpoint)
        await modbus_server.start()
        await opcua_server.start()
        modbus = ModbusPort(TAG_MAP, port=modbus_port_number, timeout_s=2.0)
        opcua = OpcUaPort(OPCUA_TAG_MAP, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)

        async def compare() -> dict[str, Reading]:
            snapshot = scan()
            monkeypatch.setattr(plc, "snapshot", lambda: snapshot)  # both servers publish the same scan
            await modbus_server.publish()
            await opcua_server.publish()
            over_modbus, over_opcua = await modbus.read(), await opcua.read()
            assert set(over_modbus) == set(over_opcua) == set(SIGNALS)
            for name in SIGNALS:
                by_modbus, by_opcua = over_modbus[name], over_opcua[name]
                assert by_modbus.good == by_opcua.good, name
                if SIGNALS[name].kind is Kind.REAL and not by_opcua.good:
                    assert math.isnan(float(by_modbus.value)) and math.isnan(float(by_opcua.value)), name  # a Bad real is meaningless: both ports say NaN
                elif SIGNALS[name].kind is Kind.REAL:
                    assert by_modbus.value == _float32(float(by_opcua.value)), name
                else:
                    assert by_modbus.value == by_opcua.value, name
            return over_modbus

        try:
            await modbus.connect()
            await opcua.connect()
            at_start = await compare()  # no lab result yet: every sample field is Bad, Sample.TakenAt included
            assert not any(reading.good for name, reading in at_start.items() if name.startswith("Sample.") and name != "Sample.Seq")
            plc.advance_to(198.0)  # a Bad probe and an unmeasured lab field
            later = await compare()
            assert not later["PV.Capacitance"].good and not later["Sample.Titer"].good and later["Sample.VCD"].good
        finally:
            await modbus.close()
            await opcua.close()
            await modbus_server.stop()
            await opcua_server.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_link_lost_while_reading_back_a_refused_request_says_what_is_known(modbus_port_number):
    """A PLC that refuses every write (exception 4) and drops the link at the read-back: refused alone, or uncertain in a shared request."""

    async def scenario() -> None:
        state = {"refused": 0}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    header = await reader.readexactly(7)
                    transaction, _, length, unit = struct.unpack(">HHHB", header)
                    pdu = await reader.readexactly(length - 1)
                    function = pdu[0]
                    if function in (5, 6, 15, 16):
                        state["refused"] += 1
                        answer = bytes([function | 0x80, 4])
                    elif state["refused"]:
                        break  # the read-back after a refusal: the link goes
                    else:
                        answer = _zeros_answer(pdu)
                    writer.write(struct.pack(">HHHB", transaction, 0, len(answer) + 1, unit) + answer)
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            writer.close()

        plc = await asyncio.start_server(serve, "127.0.0.1", modbus_port_number)
        port = ModbusPort(TAG_MAP, port=modbus_port_number, timeout_s=1.0)
        try:
            await port.connect()
            with pytest.raises(PlcLinkError, match=r"in a refused request, taken or not: SP.FeedRate, SP.GlucoseRate; refused: MPC.Mode$"):
                await port.write({"SP.FeedRate": 2.5, "SP.GlucoseRate": 0.5, "MPC.Mode": 2})
            assert state["refused"] == 2  # one request for holding registers 0-3, one for 12
        finally:
            await port.close()
            plc.close()
            await plc.wait_closed()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
