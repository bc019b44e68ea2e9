"""The Modbus codec against known register patterns: every word order and number type, scaled integers, and writes grouped into requests.

The expected registers are written out by hand from the byte patterns PLC
manuals give (123.456 as float32 is 42 F6 E9 79; a DCBA device sends 79 E9
F6 42), not computed with the code under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from interfaces.modbus_codec import EncodedWrite, ModbusEncodingError, ModbusLayout, write_requests
from interfaces.tagmap import ModbusTagMap, load_tag_map
from plant_models.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "plc"
REFERENCE = yaml.safe_load((CONFIGS / "reference-modbus.yaml").read_text(encoding="utf-8"))
FREE = 100
"""An input register address no reference signal uses: the tag under test moves there."""


def _map(tags: dict[str, dict[str, Any]], **settings: Any) -> ModbusTagMap:
    """The reference map with some tags replaced and map settings changed."""
    data = {**REFERENCE, **settings, "tags": {**REFERENCE["tags"], **tags}}
    return ModbusTagMap.model_validate(data)


def _raw(table: str, address: int, registers: list[int]) -> dict[str, dict[int, int | bool]]:
    raw: dict[str, dict[int, int | bool]] = {name: dict.fromkeys(range(200), 0) for name in ("input", "holding")}
    raw.update({name: dict.fromkeys(range(16), False) for name in ("coil", "discrete")})
    raw[table].update({address + i: register for i, register in enumerate(registers)})
    return raw


# (type, value, {word order: registers in address order})
KNOWN = [
    ("float32", 123.456, {"ABCD": [0x42F6, 0xE979], "CDAB": [0xE979, 0x42F6], "BADC": [0xF642, 0x79E9], "DCBA": [0x79E9, 0xF642]}),
    ("float32", -2.5, {"ABCD": [0xC020, 0x0000], "CDAB": [0x0000, 0xC020], "BADC": [0x20C0, 0x0000], "DCBA": [0x0000, 0x20C0]}),
    (
        "float64",
        123.456,
        {
            "ABCD": [0x405E, 0xDD2F, 0x1A9F, 0xBE77],
            "CDAB": [0xBE77, 0x1A9F, 0xDD2F, 0x405E],
            "BADC": [0x5E40, 0x2FDD, 0x9F1A, 0x77BE],
            "DCBA": [0x77BE, 0x9F1A, 0x2FDD, 0x5E40],
        },
    ),
    ("uint32", 0x12345678, {"ABCD": [0x1234, 0x5678], "CDAB": [0x5678, 0x1234], "BADC": [0x3412, 0x7856], "DCBA": [0x7856, 0x3412]}),
    ("int32", -123456789, {"ABCD": [0xF8A4, 0x32EB], "CDAB": [0x32EB, 0xF8A4], "BADC": [0xA4F8, 0xEB32], "DCBA": [0xEB32, 0xA4F8]}),
    ("uint16", 0x1234, {"ABCD": [0x1234], "CDAB": [0x1234], "BADC": [0x3412], "DCBA": [0x3412]}),
    ("int16", -2, {"ABCD": [0xFFFE], "CDAB": [0xFFFE], "BADC": [0xFEFF], "DCBA": [0xFEFF]}),
]
CASES = [(data_type, value, order, registers) for data_type, value, orders in KNOWN for order, registers in orders.items()]


@pytest.mark.parametrize(("data_type", "value", "order", "registers"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_every_word_order_and_type_encodes_and_decodes_the_manual_pattern(data_type, value, order, registers):
    layout = ModbusLayout(_map({"PV.Volume": {"table": "input", "address": FREE, "type": data_type, "word_order": order}}))
    assert list(layout.encode_value("PV.Volume", value).registers) == registers
    decoded = layout.decode(_raw("input", FREE, registers))["PV.Volume"].value
    assert decoded == (pytest.approx(value, rel=1e-7) if data_type == "float32" else value)


@pytest.mark.parametrize(("map_order", "registers"), [("big", [0x42F6, 0xE979]), ("little", [0xE979, 0x42F6]), ("DCBA", [0x79E9, 0xF642])])
def test_a_tag_without_its_own_word_order_takes_the_maps(map_order, registers):
    layout = ModbusLayout(
        _map(
            {"PV.Volume": {"table": "input", "address": FREE, "type": "float32"}, "PV.OUR": {"table": "input", "address": FREE + 2, "type": "float32", "word_order": "CDAB"}},
            word_order=map_order,
        )
    )
    assert list(layout.encode_value("PV.Volume", 123.456).registers) == registers
    assert list(layout.encode_value("PV.OUR", 123.456).registers) == [0xE979, 0x42F6]  # its own order, whatever the map's


def test_the_reference_map_encodes_as_before_high_word_first():
    layout = ModbusLayout(_map({}))
    assert list(layout.encode("SP.Temperature", 36.5).registers) == [0x4212, 0x0000]
    assert list(layout.encode("MPC.Heartbeat", 70000).registers) == [0x0001, 0x1170]
    assert list(layout.encode("MPC.Mode", 2).registers) == [0x0002]


def test_scaled_integers_carry_engineering_values_and_refuse_what_does_not_fit():
    layout = ModbusLayout(
        _map(
            {
                "SP.Temperature": {"table": "holding", "address": 4, "type": "int16", "scale": 0.01},
                "SP.FeedRate": {"table": "holding", "address": 0, "type": "uint16", "scale": 0.001, "word_order": "BADC"},
                "PV.Temperature": {"table": "input", "address": 0, "type": "uint16", "scale": 0.01, "offset": -50.0, "bad_when": {"address": 63, "bit": 0}},
                "PV.DO": {"table": "input", "address": 4, "type": "int32", "scale": 0.001, "offset": 10.0, "word_order": "CDAB", "bad_when": {"address": 63, "bit": 2}},
            }
        )
    )
    assert list(layout.encode("SP.Temperature", 36.5).registers) == [3650]  # 0x0E42
    assert list(layout.encode("SP.Temperature", -12.34).registers) == [0xFB2E]  # -1234, two's complement
    assert list(layout.encode("SP.FeedRate", 2.5).registers) == [0xC409]  # 2500 = 0x09C4, bytes swapped
    assert list(layout.encode_value("PV.Temperature", 36.5).registers) == [8650]  # (36.5 + 50) / 0.01
    assert list(layout.encode_value("PV.DO", -90.0).registers) == [0x7960, 0xFFFE]  # (-90 - 10) / 0.001 = -100000 = 0xFFFE7960, low word first
    raw = _raw("input", 0, [8650])
    raw["input"].update({4: 0x7960, 5: 0xFFFE})
    raw["holding"].update({4: 0xFB2E, 0: 0xC409})
    decoded = layout.decode(raw)
    assert decoded["PV.Temperature"].value == pytest.approx(36.5, abs=1e-9)
    assert decoded["PV.DO"].value == pytest.approx(-90.0, abs=1e-9)
    assert decoded["SP.Temperature"].value == pytest.approx(-12.34, abs=1e-9)
    assert decoded["SP.FeedRate"].value == pytest.approx(2.5, abs=1e-9)
    # A value the register cannot carry is refused before anything is sent, naming the tag and both ranges.
    with pytest.raises(ModbusEncodingError, match=r"^SP.Temperature: 400.0 is outside the range of int16 \[-32768, 32767\] \(× 0.01 \+ 0: \[-327.68, 327.67\]\)$"):
        layout.encode("SP.Temperature", 400.0)
    with pytest.raises(ModbusEncodingError, match=r"^SP.FeedRate: -0.01 is outside the range of uint16 \[0, 65535\] \(× 0.001 \+ 0: \[0, 65.535\]\)$"):
        layout.encode("SP.FeedRate", -0.01)
    assert list(layout.encode("SP.Temperature", 327.67).registers) == [32767]  # the edge itself fits


def test_adjacent_holding_registers_are_written_in_one_request_per_block():
    layout = ModbusLayout(_map({}))
    values: dict[str, float | bool] = {
        "MPC.Rec.HarvestTime": 290.0,
        "SP.Temperature": 36.0,
        "SP.HarvestRequest": True,
        "SP.FeedRate": 2.5,
        "MPC.Mode": 2,
        "SP.GlucoseRate": 0.5,
        "MPC.Heartbeat": 7,
        "MPC.Rec.FeedRate": 2.0,
    }
    requests = write_requests({name: layout.encode(name, value) for name, value in values.items()})
    shape = [(r.write.table, r.write.address, len(r.write.registers), r.signals) for r in requests]
    assert shape == [
        ("coil", 0, 0, ("SP.HarvestRequest",)),
        ("holding", 0, 6, ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature")),
        ("holding", 10, 3, ("MPC.Heartbeat", "MPC.Mode")),
        ("holding", 20, 2, ("MPC.Rec.FeedRate",)),  # 22-25 not written: 26 starts a block of its own
        ("holding", 26, 2, ("MPC.Rec.HarvestTime",)),
    ]
    setpoints = requests[1].write.registers
    assert setpoints[0:2] == layout.encode("SP.FeedRate", 2.5).registers and setpoints[4:6] == layout.encode("SP.Temperature", 36.0).registers
    # A gap splits: SP.FeedRate and SP.Temperature without SP.GlucoseRate between them are two requests.
    apart = write_requests({name: layout.encode(name, value) for name, value in {"SP.Temperature": 36.0, "SP.FeedRate": 2.5}.items()})
    assert [(r.write.address, r.signals) for r in apart] == [(0, ("SP.FeedRate",)), (4, ("SP.Temperature",))]


def test_a_block_stops_at_the_123_registers_one_request_carries_and_never_splits_a_value():
    # No reference signal set comes near the limit; write_requests takes any encoded values: 40 float64s in a row.
    encoded = {f"value{i}": EncodedWrite("holding", 4 * i, registers=(i, i, i, i)) for i in range(40)}
    requests = write_requests(encoded)
    assert [(r.write.address, len(r.write.registers), len(r.signals)) for r in requests] == [(0, 120, 30), (120, 40, 10)]
    assert requests[1].write.registers[:4] == (30, 30, 30, 30)


@pytest.mark.parametrize(
    ("tag", "change", "message"),
    [
        ("PV.Volume", {"word_order": "ADCB"}, "tags.PV.Volume.word_order"),
        ("Status.BatchId", {"word_order": "CDAB"}, "tags.Status.BatchId.word_order: applies to numbers only, not 'string'"),
        ("SP.HarvestRequest", {"word_order": "DCBA"}, "tags.SP.HarvestRequest.word_order: applies to numbers only, not 'bool'"),
        ("SP.Temperature", {"type": "int16", "scale": 0.0}, "tags.SP.Temperature.scale: must not be 0"),
        ("MPC.Mode", {"scale": 0.5}, "tags.MPC.Mode: scale and offset apply to real signals only"),
    ],
)
def test_a_wrong_word_order_or_scale_names_the_tag_and_field(tmp_path, tag, change, message):
    data = yaml.safe_load((CONFIGS / "reference-modbus.yaml").read_text(encoding="utf-8"))
    data["tags"][tag].update(change)
    path = tmp_path / "plc.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_tag_map(path)
    assert str(path) in str(error.value) and message in str(error.value), str(error.value)


def test_the_example_map_loads_with_its_word_orders_and_scales():
    tag_map = load_tag_map(CONFIGS / "example-modbus-cdab-scaled.yaml")
    assert isinstance(tag_map, ModbusTagMap)
    assert tag_map.word_order_of(tag_map.tags["PV.Volume"]) == "CDAB" and tag_map.word_order_of(tag_map.tags["MPC.Pred.HarvestTiter"]) == "ABCD"
    layout = ModbusLayout(tag_map)
    requests = write_requests({name: layout.encode(name, value) for name, value in {"SP.FeedRate": 2.5, "SP.GlucoseRate": 0.5, "SP.Temperature": 36.5}.items()})
    assert [(r.write.address, r.write.registers) for r in requests] == [(0, (2500, 500, 3650))]


def test_reads_cover_each_table_in_one_request_or_run_by_run_when_the_map_says_so():
    across = ModbusLayout(_map({}))
    assert [(b.table, b.start, b.count) for b in across.blocks()] == [("coil", 0, 1), ("discrete", 0, 3), ("holding", 0, 30), ("input", 0, 78)]
    runs = ModbusLayout(_map({}, read_across_gaps=False))
    assert [(b.table, b.start, b.count) for b in runs.blocks()] == [
        ("coil", 0, 1),
        ("discrete", 0, 3),
        ("holding", 0, 6),  # the setpoints
        ("holding", 10, 3),  # heartbeat and mode
        ("holding", 20, 10),  # the recommendation
        ("input", 0, 24),  # online values and the process time
        ("input", 30, 18),  # the lab result
        ("input", 60, 5),  # Sample.Seq, Status.Phase and the two quality registers
        ("input", 70, 8),  # Status.BatchId
    ]
