"""I/O maps and I/O faults: validation with errors that name the field, 4–20 mA scaling as an S7 module shows it, Modbus registers, the JSON Schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from bioreactor_mpc.cli import main
from interfaces.modbus_codec import from_registers, to_registers
from plant_models.errors import ConfigError
from simulator.io_faults import PumpDegraded, WireBreak, load_fault_scenario, parse_fault
from simulator.io_map import AnalogChannel, ModbusAnalogInput, ModbusIoMap, OpcUaIoMap, load_io_map

REPO = Path(__file__).resolve().parent.parent
SOFT_PLC_MAP = REPO / "configs" / "io" / "soft-plc-opcua.yaml"
MODBUS_MAP = REPO / "configs" / "io" / "soft-plc-modbus.yaml"
COUNTS_PER_SPAN = 27648
"""An S7 analog input's nominal range: 0 counts at 4 mA, 27648 at 20 mA."""


def _edited(tmp_path: Path, edit, source: Path = SOFT_PLC_MAP) -> Path:
    data = yaml.safe_load(source.read_text())
    edit(data)
    path = tmp_path / "io.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "io").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_io_map_loads(path):
    io_map = load_io_map(path)
    if isinstance(io_map, OpcUaIoMap):
        assert len(set(io_map.nodes().values())) == len(io_map.nodes())
    else:
        places = [(slot.table, address) for slot in io_map.slots() for address in range(slot.address, slot.address + slot.count)]
        assert len(set(places)) == len(places)


def test_a_4_20_ma_input_is_scaled_as_an_s7_module_shows_it():
    channel = AnalogChannel(node="IO.AI.TT101", signal="current_4_20ma", eu_low=0.0, eu_high=50.0)
    assert channel.to_raw(0.0) == 0 and channel.to_raw(50.0) == COUNTS_PER_SPAN
    assert channel.to_raw(25.0) == COUNTS_PER_SPAN // 2
    value, good = channel.to_engineering(channel.to_raw(36.8))
    assert good and value == pytest.approx(36.8, abs=50.0 / COUNTS_PER_SPAN)  # one count of resolution
    # A broken loop: 3.6 mA (a transmitter's failure signal) is below the measuring range, 0 mA below the module's: both Bad.
    at_3_6 = channel.counts_of_current(3.6)
    assert at_3_6 == round(-0.4 / 16.0 * COUNTS_PER_SPAN) and not channel.to_engineering(at_3_6)[1]
    assert channel.counts_of_current(0.0) == -32768
    value, good = channel.to_engineering(-32768)
    assert not good and math.isnan(value)
    assert channel.to_engineering(channel.counts_of_current(20.4))[1] and not channel.to_engineering(channel.counts_of_current(20.6))[1]


def test_an_engineering_channel_passes_the_value_through():
    channel = AnalogChannel(node="IO.AI.OUR")
    assert channel.to_raw(1.234) == 1.234 and channel.to_engineering(1.234) == (1.234, True)
    assert not channel.to_engineering(math.nan)[1]


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        (lambda d: d["inputs"]["temperature_degc"].pop("eu_high"), "inputs.temperature_degc", "eu_high"),
        (lambda d: d["inputs"]["ph"].update(colour="red"), "inputs.ph.colour", "unknown field"),
        (lambda d: d["outputs"]["feed_pump_lph"].update(node="IO.AI.TT101"), "outputs.feed_pump_lph", "must be a tag of its own"),
        (lambda d: d["inputs"].pop("volume_l"), "inputs.volume_l", "required"),
        (lambda d: d.update(protocol="profinet"), "protocol", "opcua"),
    ],
)
def test_a_bad_io_map_fails_naming_the_field(tmp_path, edit, field, expected):
    with pytest.raises(ConfigError) as error:
        load_io_map(_edited(tmp_path, edit))
    message = str(error.value)
    assert field in message and expected in message and str(tmp_path / "io.yaml") in message


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        (lambda d: d["inputs"]["ph"].update(address=0), "inputs.ph.address", "holding register 0 is also used by inputs.temperature_degc"),
        (lambda d: d["inputs"]["base_total_l"].update(address=3), "inputs.base_total_l.address", "holding register 3 is also used by inputs.volume_l"),
        (lambda d: d["inputs"]["ph"].update(wire_break_coil=8), "outputs.harvest_valve.address", "coil 8 is also used by inputs.ph.wire_break_coil"),
        (lambda d: d["inputs"]["ph"].update(type="float32"), "inputs.ph.type", "must be int16 for signal current_4_20ma"),
        (lambda d: d["inputs"]["ph"].update(scale=0.1), "inputs.ph.scale", "integer type only"),
        (lambda d: d["inputs"]["base_total_l"].update(scale=0.1), "inputs.base_total_l.scale", "integer type only"),
        (lambda d: d["inputs"]["ph"].update(table="input"), "inputs.ph.table", "plant-sim writes the inputs"),
        (lambda d: d["inputs"]["ph"].update(word_order="big"), "inputs.ph.word_order", "ABCD"),
        (lambda d: d["outputs"]["feed_pump_lph"].update(wire_break_coil=5), "outputs.feed_pump_lph.wire_break_coil", "unknown field"),
        (lambda d: d["outputs"]["harvest_valve"].update(table="holding"), "outputs.harvest_valve.table", "coil"),
        (lambda d: d["outputs"]["temperature_setpoint_degc"].update(address=65535), "outputs.temperature_setpoint_degc.address", "leaves no room"),
        (lambda d: d["lims"]["seq"].update(type="float32"), "lims.seq.type", "uint32 or uint16"),
        (lambda d: d["lims"]["titer_g_per_l"].update(type="int16"), "lims.titer_g_per_l.type", "float32 or float64"),
        (lambda d: d["clock"]["plant_minute"].update(type="uint16"), "clock.plant_minute.type", "uint32"),
        (lambda d: d.pop("host"), "host", "required"),
        (lambda d: d.update(endpoint="opc.tcp://127.0.0.1:4850/"), "endpoint", "unknown field"),
    ],
)
def test_a_bad_modbus_io_map_fails_naming_the_field(tmp_path, edit, field, expected):
    with pytest.raises(ConfigError) as error:
        load_io_map(_edited(tmp_path, edit, MODBUS_MAP))
    message = str(error.value)
    assert field in message and expected in message and str(tmp_path / "io.yaml") in message


def test_faults_from_the_command_line_and_a_scenario_file(tmp_path):
    wire = parse_fault("wire_break:temperature_degc:0@100-120")
    assert isinstance(wire, WireBreak) and (wire.current_ma, wire.start_h, wire.end_h) == (0.0, 100.0, 120.0)
    assert wire.active(100.0) and not wire.active(120.0)
    pump = parse_fault("pump_degraded:feed_pump_lph@48")
    assert isinstance(pump, PumpDegraded) and pump.delivery_fraction == 0.8 and pump.end_h is None
    for spec, expected in [
        ("wire_break:feed_pump_lph@1", "must be an input"),
        ("pump_degraded:temperature_setpoint_degc@1", "must be a pump"),
        ("stuck_actuator:feed_pump_lph:3@1", "takes no value"),
        ("frozen_input:ph@5-4", "must be after start_h"),
        ("wire_break temperature", "expected KIND:CHANNEL"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            parse_fault(spec)
    path = tmp_path / "faults.yaml"
    path.write_text("faults:\n  - {kind: stuck_actuator, channel: harvest_valve, start_h: 10}\n  - {kind: frozen_input, channel: ph, start_h: 1, end_h: 2}\n")
    assert [fault.kind for fault in load_fault_scenario(path).faults] == ["stuck_actuator", "frozen_input"]


def test_a_modbus_channel_carries_counts_scaled_integers_and_floats_in_its_word_order():
    counts = ModbusAnalogInput(address=0, type="int16", signal="current_4_20ma", eu_low=0.0, eu_high=50.0)
    assert counts.number_of(counts.to_raw(25.0)) == COUNTS_PER_SPAN // 2 and counts.number_of(counts.counts_of_current(3.6)) == -691
    scaled = ModbusAnalogInput(address=0, type="int16", scale=0.01)
    assert scaled.number_of(36.789) == 3679 and scaled.raw_of(3679) == pytest.approx(36.79)
    assert scaled.number_of(400.0) == 32767 and scaled.number_of(math.nan) == 0, "a register saturates; a broken engineering channel shows 0 (its status bit tells)"
    io_map = load_io_map(MODBUS_MAP)
    assert isinstance(io_map, ModbusIoMap)
    our = io_map.inputs.our_mmol_per_l_h
    registers = to_registers(our.number_of(1.5), our.type, io_map.word_order_of(our))
    assert registers == (0x0000, 0x3FC0), "CDAB: 1.5 is 0x3FC00000, low word first"
    assert from_registers(registers, our.type, "CDAB") == 1.5


def test_the_schema_command_writes_the_io_map_and_fault_schemas(tmp_path):
    assert main(["schema", "--output-dir", str(tmp_path)]) == 0
    schema = json.loads((tmp_path / "io-map.schema.json").read_text())
    protocols = {branch["$ref"].rsplit("/", 1)[-1] for branch in schema["oneOf"]}
    assert protocols == {"OpcUaIoMap", "ModbusIoMap"} and schema["discriminator"]["propertyName"] == "protocol"
    assert {"inputs", "outputs", "lims", "clock", "host", "word_order"} <= set(schema["$defs"]["ModbusIoMap"]["properties"])
    assert "wire_break_coil" in schema["$defs"]["ModbusAnalogInput"]["properties"]
    faults = json.loads((tmp_path / "io-faults.schema.json").read_text())
    assert "wire_break" in json.dumps(faults)
    assert (tmp_path / "tag-map-modbus.schema.json").exists(), "one command writes every config's schema"
