"""plant-sim over Modbus TCP: the soft PLC's field I/O as a Modbus I/O device (configs/io/soft-plc-modbus.yaml, docs/hil.md).

Two processes on 127.0.0.1, ``soft-plc`` (reference interface over Modbus
TCP, field I/O over Modbus TCP, lockstep) and ``plant-sim``; the test plays
the runtime through the production Modbus port (it moves the heartbeat every
hour, writes setpoints, asks for harvest) and reads the I/O device's
registers as a second client, with every pause. Held against:

- the registers, decoded here by hand (S7 counts, scaled integers, a float32
  pair in CDAB): what the PLC serves is the map's scaling of exactly them;
- the plant's true trajectory (plant-sim's report): the PLC's values are the
  truth within the instruments' noise and one count;
- the setpoints the test wrote: the plant received them through the output
  registers (4–20 mA counts, a float32 in BADC) and the harvest valve's coil;
  the PLC's totaliser integrates the flow meter plant-sim writes back;
- two wire breaks: 3.6 mA on an S7-style counts channel (the value shows
  it) and a broken loop on a Beckhoff-style scaled channel (its value reads
  0, in range: only the wire-break coil tells).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hil_processes import REPO, scenario
from pymodbus.client import AsyncModbusTcpClient

from bioreactor_mpc.demo import free_port, wait_for_listener
from controller.ports import Reading
from interfaces.modbus_port import ModbusPort
from interfaces.tagmap import ModbusTagMap, load_tag_map
from simulator.config import load_simulation

pytestmark = pytest.mark.hil

IO_MAP = REPO / "configs" / "io" / "soft-plc-modbus.yaml"
REFERENCE_MAP = REPO / "configs" / "plc" / "reference-modbus.yaml"
COUNTS_AT_20_MA = 27648
"""An S7 analog module's counts at 20 mA (0 at 4 mA)."""
HARVEST_H = 10
SETPOINTS = {"SP.FeedRate": 0.8, "SP.GlucoseRate": 0.15, "SP.Temperature": 35.0}
"""Written at 1 h; the recipe's own (the PLC's start values) hold before."""
FAULTS = ("wire_break:temperature_degc:3.6@3-5", "wire_break:do_pct@6-8")
IO_REGISTERS = 14
"""The inputs occupy holding registers 0-13 of the map; the wire-break coils are 0 (DO) and 1 (agitation)."""


@dataclass(frozen=True)
class Pause:
    """What the test saw at one lockstep pause: the PLC's reference interface and the I/O device's input registers and coils."""

    hour: int
    readings: dict[str, Reading]
    registers: list[int]
    coils: list[bool]

    def value(self, signal: str) -> float:
        return float(self.readings[signal].value)

    def good(self, signal: str) -> bool:
        return self.readings[signal].good


@dataclass(frozen=True)
class ModbusIoRun:
    pauses: list[Pause]
    plant: dict[str, Any]
    soft_plc: dict[str, Any]
    trajectory: list[dict[str, float]]
    lab: list[dict[str, str]]
    wall_s: float


def _signed(register: int) -> int:
    return register - 0x10000 if register >= 0x8000 else register


def _float_cdab(low_word: int, high_word: int) -> float:
    """A float32 whose low word comes first (CDAB), decoded by hand."""
    value: float = struct.unpack(">f", struct.pack(">HH", high_word, low_word))[0]
    return value


async def _paused_at(port: ModbusPort, hour: int, deadline: float) -> dict[str, Reading]:
    """The PLC's tags once it pauses at ``hour`` (at 0: once plant-sim's first inputs are scanned: the load cell reads Good)."""
    while True:
        readings = await port.read()
        if float(readings["Status.ProcessTime"].value) >= hour and readings["PV.Volume"].good:
            return readings
        if time.monotonic() > deadline:
            raise AssertionError(f"the soft PLC did not pause at {hour} h")
        await asyncio.sleep(0.01)


async def _drive(reference_port: int, io_port: int, deadline: float) -> list[Pause]:
    """Play the runtime for :data:`HARVEST_H` hours, reading the I/O device at every pause; then ask for harvest."""
    tag_map = load_tag_map(REFERENCE_MAP)
    assert isinstance(tag_map, ModbusTagMap)
    port = ModbusPort(tag_map, host="127.0.0.1", port=reference_port, timeout_s=5.0)
    device = AsyncModbusTcpClient("127.0.0.1", port=io_port, timeout=5.0, retries=0)
    await port.connect()
    assert await device.connect()
    pauses = []
    try:
        for hour in range(HARVEST_H + 1):
            readings = await _paused_at(port, hour, deadline)
            registers = await device.read_holding_registers(0, count=IO_REGISTERS, device_id=1)
            coils = await device.read_coils(0, count=2, device_id=1)
            assert not registers.isError() and not coils.isError()
            pauses.append(Pause(hour, readings, list(registers.registers), list(coils.bits[:2])))
            if hour == 1:
                await port.write(SETPOINTS)
            if hour == HARVEST_H:
                await port.write({"SP.HarvestRequest": True})
            await port.write({"MPC.Heartbeat": hour + 1})  # at the end of every cycle, as the runtime does: the PLC's pause ends
    finally:
        await port.close()
        device.close()
    return pauses


def _run(directory: Path) -> ModbusIoRun:
    simulation = scenario(directory)
    reference_port, io_port = free_port(), free_port()
    io_endpoint = f"127.0.0.1:{io_port}"
    cli = [sys.executable, "-m", "bioreactor_mpc", "--log-json"]
    commands = {
        "soft-plc": [
            *cli,
            "soft-plc",
            "--protocol",
            "modbus",
            "--endpoint",
            f"127.0.0.1:{reference_port}",
            "--scenario",
            str(simulation),
            "--io",
            str(IO_MAP),
            "--io-endpoint",
            io_endpoint,
            "--lockstep-timeout-s",
            "20",
            "--summary",
            str(directory / "soft-plc.json"),
            "--linger-s",
            "0.5",
        ],
        "plant-sim": [*cli, "plant-sim", "--io", str(IO_MAP), "--io-endpoint", io_endpoint, "--scenario", str(simulation), "--report-dir", str(directory)],
    }
    commands["plant-sim"] += ["--report-stem", "plant", "--wall-timeout-s", "60", *(argument for fault in FAULTS for argument in ("--fault", fault))]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: (directory / f"{name}.log").open("wb") for name in commands}
    started = time.monotonic()
    try:
        processes["soft-plc"] = subprocess.Popen(commands["soft-plc"], stdout=logs["soft-plc"], stderr=subprocess.STDOUT, start_new_session=True)
        for port in (reference_port, io_port):
            wait_for_listener(port, processes["soft-plc"], directory / "soft-plc.log")
        processes["plant-sim"] = subprocess.Popen(commands["plant-sim"], stdout=logs["plant-sim"], stderr=subprocess.STDOUT, start_new_session=True)
        pauses = asyncio.run(asyncio.wait_for(_drive(reference_port, io_port, time.monotonic() + 45.0), timeout=60.0))
        for name in ("plant-sim", "soft-plc"):
            status = processes[name].wait(timeout=30)
            assert status == 0, f"{name} exited with {status}; see {directory / (name + '.log')}"
        wall_s = time.monotonic() - started
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for handle in logs.values():
            handle.close()
    with (directory / "plant-trajectories.csv").open(encoding="utf-8") as handle:
        trajectory = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    with (directory / "plant-lab.csv").open(encoding="utf-8") as handle:
        lab = list(csv.DictReader(handle))
    return ModbusIoRun(
        pauses=pauses,
        plant=json.loads((directory / "plant-kpis.json").read_text()),
        soft_plc=json.loads((directory / "soft-plc.json").read_text()),
        trajectory=trajectory,
        lab=lab,
        wall_s=wall_s,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ModbusIoRun:
    return _run(tmp_path_factory.mktemp("modbus-io"))


def _truth(run: ModbusIoRun, hour: float, prefix: str) -> float:
    row = next(row for row in run.trajectory if abs(row["process_time_h"] - hour) < 1e-9)
    column = next(name for name in row if name.startswith(prefix))
    return row[column]


@pytest.mark.timeout(120)
def test_the_batch_runs_to_the_requested_harvest_over_modbus_io_with_nothing_missed(run):
    assert run.plant["timing"]["ended"] == "harvest", "the harvest valve's coil reached the plant"
    assert run.plant["kpis"]["harvest_time_h"] == pytest.approx(HARVEST_H)
    assert run.soft_plc["missed_scans"] == 0 and run.plant["timing"]["missed_exchanges"] == 0
    assert [pause.hour for pause in run.pauses] == list(range(HARVEST_H + 1))
    assert all(float(pause.readings["Status.ProcessTime"].value) == pause.hour for pause in run.pauses)


def test_the_plc_serves_the_map_s_scaling_of_the_registers_plant_sim_wrote(run):
    checked = 0
    for pause in run.pauses:
        r = pause.registers
        if pause.good("PV.Temperature"):
            assert pause.value("PV.Temperature") == pytest.approx(_signed(r[0]) * 50.0 / COUNTS_AT_20_MA, abs=1e-4)
        assert pause.value("PV.pH") == pytest.approx(2.0 + _signed(r[1]) * 10.0 / COUNTS_AT_20_MA, abs=1e-5)
        if pause.good("PV.DO"):
            assert pause.value("PV.DO") == pytest.approx(_signed(r[2]) * 0.01, abs=1e-4), "a scaled int16: 0.01 % a count"
        assert pause.value("PV.Volume") == pytest.approx(_signed(r[3]) * 2500.0 / COUNTS_AT_20_MA, abs=1e-3)
        assert pause.value("PV.OUR") == pytest.approx(_float_cdab(r[6], r[7]), rel=1e-6), "a float32, low word first"
        assert pause.value("PV.AgitationSpeed") == pytest.approx(r[11] * 0.1, abs=1e-4), "a scaled uint16: 0.1 rpm a count"
        checked += 1
    assert checked == HARVEST_H + 1


def test_the_plc_s_values_are_the_plant_s_truth_within_noise_and_one_count(run):
    noise = load_simulation(REPO / "configs" / "simulate" / "platform.yaml").simulation.noise.online
    for pause in run.pauses[1:]:
        volume_l = _truth(run, pause.hour, "state.volume")
        assert pause.value("PV.Volume") == pytest.approx(volume_l, abs=5.0 * noise.volume_l + 2500.0 / COUNTS_AT_20_MA)
        if pause.good("PV.Temperature"):
            temperature_degc = _truth(run, pause.hour, "state.temperature")
            assert pause.value("PV.Temperature") == pytest.approx(temperature_degc, abs=5.0 * noise.temperature_degc + 50.0 / COUNTS_AT_20_MA)


def test_the_plant_receives_the_setpoints_through_the_output_registers(run):
    """Feed 0.8 L/h is 1106 counts (0.80006 L/h), glucose 0.15 L/h 829 counts (0.14992 L/h): what the plant applies, to the count; 35 °C a float32 in BADC, exactly."""
    feed_lph = round(SETPOINTS["SP.FeedRate"] / 20.0 * COUNTS_AT_20_MA) * 20.0 / COUNTS_AT_20_MA
    glucose_lph = round(SETPOINTS["SP.GlucoseRate"] / 5.0 * COUNTS_AT_20_MA) * 5.0 / COUNTS_AT_20_MA
    for hour in (1.5, 4.0, 9.75):
        assert _truth(run, hour, "feed_rate") == pytest.approx(feed_lph, abs=1e-6)
        assert _truth(run, hour, "glucose_rate") == pytest.approx(glucose_lph, abs=1e-6)
        assert _truth(run, hour, "temperature_setpoint") == SETPOINTS["SP.Temperature"]
    # The PLC's totaliser integrates the flow meter that plant-sim writes with what the pump delivered.
    totals = [pause.value("PV.FeedTotal") for pause in run.pauses]
    for hour in range(2, HARVEST_H + 1):
        assert totals[hour] - totals[hour - 1] == pytest.approx(feed_lph, abs=20.0 / COUNTS_AT_20_MA)


def test_a_wire_break_at_3_6_ma_shows_in_the_counts_and_reads_bad(run):
    for pause in run.pauses:
        broken = 3 <= pause.hour < 5
        assert pause.good("PV.Temperature") is not broken, f"{pause.hour} h"
        if broken:
            assert _signed(pause.registers[0]) == round(-0.4 / 16.0 * COUNTS_AT_20_MA), "3.6 mA on an S7 module: -691 counts"


def test_a_broken_loop_on_a_scaled_channel_reads_bad_only_through_its_wire_break_coil(run):
    for pause in run.pauses:
        broken = 6 <= pause.hour < 8
        assert pause.coils[0] is broken and pause.good("PV.DO") is not broken, f"{pause.hour} h"
        if broken:
            assert pause.registers[2] == 0, "the terminal shows 0 %: a value in range, Bad only by its status bit"
    assert all(pause.good("PV.pH") and pause.good("PV.Volume") for pause in run.pauses)


def test_the_lab_result_reaches_the_plc_through_the_lims_registers(run):
    assert run.lab, "the first sample, drawn at inoculation, is released within 3-5 h"
    first = run.lab[0]
    released_h = next(pause.hour for pause in run.pauses if int(pause.value("Sample.Seq")) >= 1)
    assert released_h <= 6
    at_release = run.pauses[released_h]
    assert at_release.value("Sample.TakenAt") == pytest.approx(float(first["taken_at_h"]), rel=1e-6)
    for tag, name in (("Sample.Glucose", "glucose_g_per_l"), ("Sample.Titer", "titer_g_per_l"), ("Sample.VCD", "vcd_1e6_per_ml")):
        assert at_release.value(tag) == pytest.approx(float(first[name]), rel=1e-6), "float32 registers both ways"


def test_the_run_fits_the_default_suite(run):
    """Two process starts and eleven lockstep hours: well under 30 s on a loaded 2-core machine (docs/hil.md records the measure)."""
    assert run.wall_s < 30.0, f"{run.wall_s:.1f} s"
