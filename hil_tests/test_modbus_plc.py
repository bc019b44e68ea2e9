"""The simulated PLC over Modbus TCP on 127.0.0.1: the reference register map, quality bits, the PLC's write logic, lockstep."""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from interfaces.modbus_codec import ModbusLayout, registers_by_address
from interfaces.tagmap import ModbusTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.modbus_server import ModbusPlcServer
from simulator.plc import PHASE_HARVESTED, SimulatedPlc

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
TAG_MAP = load_tag_map(REPO / "configs" / "plc" / "reference-modbus.yaml")
assert isinstance(TAG_MAP, ModbusTagMap)
LAYOUT = ModbusLayout(TAG_MAP)
FAULTS = REPO / "configs" / "simulate" / "faults.yaml"
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
UNIT = 1


def _float32(value: float) -> float:
    """``value`` rounded to float32, as the registers carry it."""
    return float(struct.unpack(">f", struct.pack(">f", value))[0])


def _registers(value: float) -> list[int]:
    """A float32 as two registers, high word first ("ABCD"), computed independently of pymodbus."""
    return list(struct.unpack(">HH", struct.pack(">f", value)))


@asynccontextmanager
async def _serving(simulation: Path, port: int) -> AsyncIterator[tuple[SimulatedPlc, ModbusPlcServer, AsyncModbusTcpClient]]:
    """A simulated PLC served on ``port``, and a plain pymodbus client connected to it."""
    plc, _ = build_simulated_plc(load_simulation(simulation))
    server = ModbusPlcServer(plc, TAG_MAP, port=port)
    await server.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0, reconnect_delay=0)
    try:
        assert await client.connect()
        yield plc, server, client
    finally:
        client.close()
        await server.stop()


async def _read_all(client: AsyncModbusTcpClient) -> dict[str, dict[int, int | bool]]:
    raw: dict[str, dict[int, int | bool]] = {}
    for block in LAYOUT.blocks():
        read = {
            "input": client.read_input_registers,
            "holding": client.read_holding_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[block.table]
        response = await read(block.start, count=block.count, device_id=UNIT)
        assert not response.isError(), f"{block}: {response}"
        values = response.bits if block.table in ("coil", "discrete") else response.registers
        raw.setdefault(block.table, {}).update(registers_by_address(block, values))
    return raw


def _exception(response: ModbusPDU) -> int | None:
    return int(response.exception_code) if response.isError() else None


async def _process_time_h(client: AsyncModbusTcpClient) -> float:
    response = await client.read_input_registers(22, count=2, device_id=UNIT)
    return float(struct.unpack(">f", struct.pack(">HH", *response.registers))[0])


async def _wait_for_process_time(client: AsyncModbusTcpClient, target_h: float) -> float:
    """The process time once it reaches ``target_h``, or after two seconds."""
    for _ in range(200):
        if (now_h := await _process_time_h(client)) >= target_h:
            return now_h
        await asyncio.sleep(0.01)
    return await _process_time_h(client)


def test_every_signal_reads_as_the_plc_scanned_it_with_quality_bits(modbus_port_number, monkeypatch):
    async def scenario() -> None:
        async with _serving(FAULTS, modbus_port_number) as (plc, server, client):
            plc.advance_to(198.0)  # the capacitance probe is Bad (150-200 h); the day-8 titer was not measured
            snapshot = plc.snapshot()
            monkeypatch.setattr(plc, "snapshot", lambda: snapshot)  # one scan, so that the values compare exactly
            await server.publish()
            raw = await _read_all(client)
            decoded = LAYOUT.decode(raw)
            assert set(decoded) == set(TAG_MAP.tags) == set(snapshot)
            for name, value in decoded.items():
                expected = snapshot[name]
                if isinstance(expected.value, float):
                    assert math.isnan(value.value) if math.isnan(expected.value) else value.value == _float32(expected.value), name
                else:
                    assert value.value == expected.value, name
                if TAG_MAP.tags[name].bad_when is not None:
                    assert value.good == expected.good, name
            # The quality registers of the reference: bit 9 of 63 (PV.Capacitance), bit 6 of 64 (Sample.Titer).
            assert (raw["input"][63], raw["input"][64]) == (1 << 9, 1 << 6)
            assert not snapshot["PV.Capacitance"].good and math.isnan(snapshot["Sample.Titer"].value)
            # Word order and addresses, computed without the codec: float32 ABCD, uint32 high word first, ASCII high byte first.
            assert [raw["input"][6], raw["input"][7]] == _registers(snapshot["PV.Volume"].value)
            assert [raw["input"][22], raw["input"][23]] == _registers(198.0)
            assert [raw["input"][60], raw["input"][61]] == [0, snapshot["Sample.Seq"].value] and raw["input"][62] == 1
            batch_id = b"".join(struct.pack(">H", raw["input"][address]) for address in range(70, 78))
            assert batch_id.rstrip(b"\0").decode("ascii") == snapshot["Status.BatchId"].value
            assert [raw["discrete"][0], raw["discrete"][1], raw["discrete"][2]] == [False, True, False]  # remote off: the watchdog tripped
            # Outside the mapped tables: exception 2 (illegal data address); another unit id: exception 11.
            assert _exception(await client.read_input_registers(0, count=79, device_id=UNIT)) == 2
            assert _exception(await client.read_holding_registers(30, count=1, device_id=UNIT)) == 2
            assert _exception(await client.read_input_registers(0, count=2, device_id=UNIT + 1)) == 11

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_writes_go_through_the_plc_logic(modbus_port_number):
    async def scenario() -> None:
        async with _serving(PLATFORM, modbus_port_number) as (plc, _server, client):
            temperature_before = plc.snapshot()["SP.Temperature"].value
            # Refused while local (exception 4), before the range is checked; outside the range (exception 3); the old value stays.
            plc.set_operator_remote(False)
            assert _exception(await client.write_registers(4, _registers(99.0), device_id=UNIT)) == 4
            plc.set_operator_remote(True)
            assert _exception(await client.write_registers(4, _registers(99.0), device_id=UNIT)) == 3
            assert plc.snapshot()["SP.Temperature"].value == temperature_before
            assert (await client.read_holding_registers(4, count=2, device_id=UNIT)).registers == _registers(temperature_before)
            assert _exception(await client.write_registers(4, _registers(36.0), device_id=UNIT)) is None
            assert plc.snapshot()["SP.Temperature"].value == 36.0
            assert (await client.read_holding_registers(4, count=2, device_id=UNIT)).registers == _registers(36.0)
            # Half a float is refused (exception 3), whichever half; unmapped and read-only addresses answer exception 2.
            assert _exception(await client.write_register(4, 0x4210, device_id=UNIT)) == 3
            assert _exception(await client.write_registers(5, [0], device_id=UNIT)) == 3
            assert _exception(await client.write_registers(6, [0], device_id=UNIT)) == 2
            assert _exception(await client.write_coil(1, True, device_id=UNIT)) == 2
            assert _exception(await client.write_registers(4, _registers(35.0), device_id=UNIT + 1)) == 11
            assert plc.snapshot()["SP.Temperature"].value == 36.0
            # Integer signals: the mode is range-checked; the heartbeat is a uint32, high word first.
            assert _exception(await client.write_registers(12, [5], device_id=UNIT)) == 3
            assert _exception(await client.write_registers(12, [2], device_id=UNIT)) is None
            assert _exception(await client.write_registers(10, [1, 2], device_id=UNIT)) is None
            assert plc.heartbeat == 65538 and plc.snapshot()["MPC.Mode"].value == 2
            # A request over several signals applies them in address order and stops at the first refused one.
            assert _exception(await client.write_registers(0, _registers(2.0) + _registers(0.5), device_id=UNIT)) is None
            assert (plc.snapshot()["SP.FeedRate"].value, plc.snapshot()["SP.GlucoseRate"].value) == (2.0, 0.5)
            assert _exception(await client.write_registers(0, _registers(3.0) + _registers(99.0), device_id=UNIT)) == 3
            assert (plc.snapshot()["SP.FeedRate"].value, plc.snapshot()["SP.GlucoseRate"].value) == (3.0, 0.5)
            # The harvest request ends the batch; then remote is disabled and setpoints are refused.
            assert _exception(await client.write_coil(0, True, device_id=UNIT)) is None
            assert plc.phase == PHASE_HARVESTED
            assert _exception(await client.write_registers(0, _registers(1.0), device_id=UNIT)) == 4

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_lockstep_pauses_until_the_heartbeat_moves(modbus_port_number):
    async def scenario() -> None:
        async with _serving(PLATFORM, modbus_port_number) as (plc, server, client):
            clock = asyncio.create_task(server.run_lockstep(wall_timeout_s=10.0))
            try:
                # The plant waits at t = 0 until the heartbeat moves, then runs one cycle and waits again.
                await asyncio.sleep(0.3)
                assert plc.process_time_h == 0.0 and await _process_time_h(client) == 0.0
                assert _exception(await client.write_registers(10, [0, 1], device_id=UNIT)) is None
                assert await _wait_for_process_time(client, 1.0) == 1.0
                # Rewriting the same value is not a heartbeat.
                assert _exception(await client.write_registers(10, [0, 1], device_id=UNIT)) is None
                await asyncio.sleep(0.3)
                assert await _process_time_h(client) == 1.0
                assert _exception(await client.write_registers(10, [0, 2], device_id=UNIT)) is None
                assert await _wait_for_process_time(client, 2.0) == 2.0
            finally:
                clock.cancel()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_lockstep_resumes_after_the_wall_timeout_and_free_running_advances(modbus_port_number):
    async def scenario() -> None:
        async with _serving(PLATFORM, modbus_port_number) as (plc, server, client):
            clock = asyncio.create_task(server.run_lockstep(wall_timeout_s=0.05))
            await asyncio.sleep(0.5)
            clock.cancel()
            assert await _process_time_h(client) >= 2.0  # a real plant does not wait for the runtime
            started_h, started_wall = plc.process_time_h, time.monotonic()
            clock = asyncio.create_task(server.run_free(time_scale=36_000.0))  # 10 plant hours per wall second
            await asyncio.sleep(0.5)
            clock.cancel()
            elapsed_wall_s = time.monotonic() - started_wall
            advanced_h = await _process_time_h(client) - started_h
            assert 2.0 <= advanced_h <= 10.0 * elapsed_wall_s + 0.01  # never ahead of the wall clock (to the plant minute)

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
