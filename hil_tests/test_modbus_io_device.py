"""The soft PLC's Modbus I/O device and plant-sim's client against it, in one process: the refusals and failures of the field I/O.

Each test serves configs/io/soft-plc-modbus.yaml on a free 127.0.0.1 port
(:class:`simulator.modbus_server.ModbusIoServer`) and talks to it as plant-sim
does, or as a misbehaving client would.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from bioreactor_mpc.demo import free_port
from simulator.io_map import ModbusIoMap, load_io_map
from simulator.modbus_server import ModbusIoServer

pytestmark = pytest.mark.hil

IO_MAP = Path(__file__).resolve().parent.parent / "configs" / "io" / "soft-plc-modbus.yaml"
ILLEGAL_VALUE = 3


def _io_map() -> ModbusIoMap:
    io_map = load_io_map(IO_MAP)
    assert isinstance(io_map, ModbusIoMap)
    return io_map.model_copy(update={"port": free_port()})


@asynccontextmanager
async def _device(io_map: ModbusIoMap) -> AsyncIterator[ModbusIoServer]:
    server = ModbusIoServer(io_map)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30.0))


@pytest.mark.timeout(60)
def test_a_write_of_part_of_a_32_bit_input_is_refused_and_the_plc_scans_the_value_it_had():
    """Half a float32 (or a write straddling two of them) would give the PLC a number that neither side wrote; the PLC server refuses it alike."""
    io_map = _io_map()
    base = io_map.inputs.base_total_l
    assert base.type == "float32" and io_map.word_order_of(base) == "ABCD"
    whole = list(struct.unpack(">HH", struct.pack(">f", 1.5)))

    async def scenario() -> None:
        async with _device(io_map) as device:
            client = AsyncModbusTcpClient("127.0.0.1", port=io_map.port, timeout=5.0, retries=0)
            assert await client.connect()
            try:
                assert not (await client.write_registers(base.address, whole, device_id=io_map.unit_id)).isError()
                for address, registers in ((base.address, [0x4120]), (base.address + 1, [0x0000, 0x3F80]), (io_map.lims.seq.address, [7])):  # type: ignore[union-attr]
                    response = await client.write_registers(address, registers, device_id=io_map.unit_id)
                    assert response.isError() and response.exception_code == ILLEGAL_VALUE, (address, response)
                inputs, lims, _ = await device.read_inputs()
                assert inputs["base_total_l"] == 1.5 and lims is not None and lims["seq"] == 0.0
            finally:
                client.close()

    _run(scenario)
