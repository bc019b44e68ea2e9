"""The soft PLC's Modbus I/O device and plant-sim's client against it, in one process: the refusals and failures of the field I/O.

Each test serves configs/io/soft-plc-modbus.yaml on a free 127.0.0.1 port
(:class:`simulator.modbus_server.ModbusIoServer`) and talks to it as plant-sim
does, or as a misbehaving client would.
"""

from __future__ import annotations

import asyncio
import csv
import json
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from pymodbus.client import AsyncModbusTcpClient

from bioreactor_mpc.cli import EXIT_USER_ERROR, main
from bioreactor_mpc.demo import free_port
from simulator.config import load_simulation
from simulator.io_map import ModbusIoMap, load_io_map
from simulator.modbus_server import ModbusIoServer
from simulator.plant_io import ModbusPlcIoClient, PlantRunReport, PlantSimulator, run_plant_io

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
IO_MAP = REPO / "configs" / "io" / "soft-plc-modbus.yaml"
ILLEGAL_VALUE = 3


@pytest.fixture(autouse=True)
def logging_as_found() -> Iterator[None]:
    """The CLI configures structlog onto the captured stdout; the next test starts from the configuration found before it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


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


RECIPE_OUTPUTS: dict[str, float | bool] = {"feed_pump_lph": 0.0, "glucose_pump_lph": 0.0, "temperature_setpoint_degc": 36.5, "harvest_valve": False}


async def _plant_at(device: ModbusIoServer, minute: int, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while await device.plant_minute() != minute:
        assert time.monotonic() < deadline, f"plant-sim did not answer minute {minute}"
        await asyncio.sleep(0.005)


def _plant_sim_against(io_map: ModbusIoMap, tmp_path: Path, script: Callable[[ModbusIoServer], Awaitable[None]]) -> int:
    """``plant-sim`` (the command, as a user runs it) against an I/O device served in a thread of its own, where ``script`` plays the PLC;
    the device stays up after the script until plant-sim has ended. Returns plant-sim's exit status."""
    ready, done = threading.Event(), threading.Event()
    failures: list[Exception] = []

    async def plc() -> None:
        async with _device(io_map) as device:
            ready.set()
            await script(device)
            while not done.is_set():
                await asyncio.sleep(0.01)

    def serve() -> None:
        try:
            asyncio.run(plc())
        except Exception as error:  # noqa: BLE001 - handed to the test's thread
            failures.append(error)
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10.0)
    try:
        status = main(
            ["plant-sim", "--io", str(IO_MAP), "--io-endpoint", f"127.0.0.1:{io_map.port}", "--report-dir", str(tmp_path), "--report-stem", "plant", "--wall-timeout-s", "20"]
        )
    finally:
        done.set()
        thread.join(10.0)
    assert not failures, failures
    return status


@pytest.mark.timeout(60)
def test_a_soft_plc_restarted_under_plant_sim_stops_it_naming_the_restart_and_the_plant_so_far_is_reported(tmp_path, capsys):
    """Found by restarting the PLC's clock (minute 60, then 0) under plant-sim: it polled, silent, until its wall timeout (an hour by
    default) while the new PLC scanned a plant that never answered; and a plant-sim whose I/O failed wrote no report of the plant so far."""
    io_map = _io_map()

    async def restart(device: ModbusIoServer) -> None:
        await device.write_outputs(RECIPE_OUTPUTS, plc_minute=60)
        await _plant_at(device, 60)
        await device.write_outputs(RECIPE_OUTPUTS, plc_minute=0)  # the restarted PLC's first scan

    started = time.monotonic()
    status = _plant_sim_against(io_map, tmp_path, restart)
    assert status == EXIT_USER_ERROR and time.monotonic() - started < 10.0, "at once, not at the 20-s wall timeout"
    error = capsys.readouterr().err
    assert "the PLC's minute went back from 60 to 0" in error and str(tmp_path) in error, error
    with (tmp_path / "plant-trajectories.csv").open(encoding="utf-8") as handle:
        hours = [float(row["process_time_h"]) for row in csv.DictReader(handle)]
    assert hours[-1] == pytest.approx(1.0), "the plant's hour before the restart is kept"
    summary = json.loads((tmp_path / "plant-kpis.json").read_text(encoding="utf-8"))
    assert "went back" in summary["timing"]["io_error"]


@pytest.mark.timeout(60)
def test_a_device_that_goes_away_mid_batch_ends_the_run_with_the_plant_so_far_kept():
    io_map = _io_map()
    simulator = PlantSimulator(load_simulation(REPO / "configs" / "simulate" / "platform.yaml"), io_map)

    async def scenario() -> PlantRunReport:
        async with _device(io_map) as device:
            await device.write_outputs(RECIPE_OUTPUTS, plc_minute=0)
            running = asyncio.create_task(run_plant_io(simulator, io_map, wall_timeout_s=20.0))
            await _plant_at(device, 0)
            await device.write_outputs(RECIPE_OUTPUTS, plc_minute=90)
            await _plant_at(device, 90)
        return await running  # the device is gone: plant-sim's next read finds no answer

    report = asyncio.run(asyncio.wait_for(scenario(), 30.0))
    assert report.ended == "the PLC's I/O failed" and f"127.0.0.1:{io_map.port} unit 1" in report.io_error, report
    assert simulator.plant.minute == 90 and report.exchanges == 2


@pytest.mark.timeout(60)
def test_unusable_outputs_over_modbus_stop_the_pump_hold_the_jacket_and_are_reported_not_a_traceback(tmp_path, capsys):
    """Feed pump counts at underflow (−32768) and a NaN float32 temperature setpoint in the output registers for two PLC hours.

    plant-sim crashed on the first such exchange (``ValueError: plant inputs
    must be 3 finite numbers``, a traceback and no report). A pump whose drive
    signal is unusable stops and the jacket holds its last valid setpoint;
    the episode is counted in the KPI file and logged once at each end.
    """
    io_map = _io_map()
    valid: dict[str, float | bool] = {"feed_pump_lph": 1.0, "glucose_pump_lph": 0.1, "temperature_setpoint_degc": 35.0, "harvest_valve": False}
    # −10 L/h on a 0–20 L/h channel is −4 mA: below the module's range, it shows underflow; a NaN float32 passes as it is.
    unusable = {**valid, "feed_pump_lph": -10.0, "temperature_setpoint_degc": float("nan")}
    assert io_map.outputs.feed_pump_lph.to_raw(-10.0) == io_map.outputs.feed_pump_lph.raw_underflow == -32768

    async def episode(device: ModbusIoServer) -> None:
        for minute, outputs in ((0, valid), (60, valid), (120, unusable), (180, unusable), (240, valid)):
            await device.write_outputs(outputs, plc_minute=minute)
            await _plant_at(device, minute)
        await device.write_outputs({**valid, "harvest_valve": True}, plc_minute=300)

    assert _plant_sim_against(io_map, tmp_path, episode) == 0
    summary = json.loads((tmp_path / "plant-kpis.json").read_text(encoding="utf-8"))
    assert summary["timing"]["ended"] == "harvest"
    unusable_for = {"episodes": 1, "exchanges": 2, "plant_h": 2.0, "unusable_since_h": None}
    assert summary["unusable_outputs"] == {
        "feed_pump_lph": unusable_for,
        "glucose_pump_lph": {"episodes": 0, "exchanges": 0, "plant_h": 0.0, "unusable_since_h": None},
        "temperature_setpoint_degc": unusable_for,
    }
    with (tmp_path / "plant-trajectories.csv").open(encoding="utf-8") as handle:
        rows = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]

    def column(row: dict[str, float], prefix: str) -> float:
        return next(value for name, value in row.items() if name.startswith(prefix))

    counts_lph = round(1.0 / 20.0 * 27648) * 20.0 / 27648  # 1 L/h to the count on the S7-style channel
    for row in rows[1:]:
        within = 1.0 < row["process_time_h"] <= 3.0
        assert column(row, "feed_rate") == pytest.approx(0.0 if within else counts_lph, abs=1e-6), row["process_time_h"]
        assert column(row, "temperature_setpoint") == 35.0, "the jacket held the last valid setpoint"
    logged = capsys.readouterr().err
    assert logged.count("plant_output_unusable") == 2 and logged.count("plant_output_usable_again") == 2, "one line per output at each end of the episode, none per exchange"


@pytest.mark.timeout(60)
def test_the_outputs_plant_sim_reads_are_those_of_the_minute_it_reads_though_the_plc_moves_on_between_its_requests():
    """plant-sim read the outputs and the PLC's minute in two requests, outputs first: a PLC that named the next minute (with its
    new outputs) between them gave the new minute with the old outputs, and the plant ran that hour on the previous setpoints."""
    io_map = _io_map()
    before: dict[str, float | bool] = {**RECIPE_OUTPUTS, "feed_pump_lph": 1.0}
    after: dict[str, float | bool] = {**RECIPE_OUTPUTS, "feed_pump_lph": 2.0, "temperature_setpoint_degc": 34.0}

    async def scenario() -> list[tuple[float, float, int | None]]:
        async with _device(io_map) as device:
            await device.write_outputs(before, plc_minute=60)
            client = AsyncModbusTcpClient("127.0.0.1", port=io_map.port, timeout=5.0, retries=0)
            assert await client.connect()
            try:
                io = ModbusPlcIoClient(client, io_map)
                read_holding = client.read_holding_registers
                requests = 0

                async def plc_moves_on_after_the_first_request(address: int, **kwargs: Any) -> Any:
                    nonlocal requests
                    response = await read_holding(address, **kwargs)
                    requests += 1
                    if requests == 1:
                        await device.write_outputs(after, plc_minute=120)  # the PLC's next scan, between plant-sim's two requests
                    return response

                client.read_holding_registers = plc_moves_on_after_the_first_request  # type: ignore[method-assign]
                seen = []
                for _ in range(2):
                    command, minute = await io.read_command()
                    seen.append((command.feed_pump_lph, command.temperature_setpoint_degc, minute))
                assert requests >= 3, "the minute and the outputs in requests of their own"
                return seen
            finally:
                client.close()

    seen = asyncio.run(asyncio.wait_for(scenario(), 30.0))
    feed_after_lph = round(2.0 / 20.0 * 27648) * 20.0 / 27648
    assert seen[-1] == (pytest.approx(feed_after_lph), 34.0, 120)
    # The plant is at minute 60: a read of minute 60 makes no exchange, whichever outputs came with it; minute 120 must bring its own.
    for feed_lph, temperature_degc, minute in seen:
        assert minute in (60, 120)
        if minute == 120:
            assert (feed_lph, temperature_degc) == (pytest.approx(feed_after_lph), 34.0), f"minute 120 read with the outputs of minute 60: {seen}"
