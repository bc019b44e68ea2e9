"""docs/plc-interface.md's tables of the reference interface say what the signal catalogue and the reference tag maps say."""

from __future__ import annotations

import re
from pathlib import Path

from interfaces.signals import SIGNALS
from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "plc-interface.md"


def _table(header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header``, cells stripped of spaces and backquotes."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_signal_table_is_the_catalogue_and_the_opcua_map():
    tag_map = load_tag_map(REPO / "configs" / "plc" / "reference-opcua.yaml")
    assert isinstance(tag_map, OpcUaTagMap)
    rows = _table("| signal | browse path under `BR01` |")
    assert [row[0] for row in rows] == list(SIGNALS)
    for name, path, opcua_type, runtime, unit, meaning in rows:
        tag = tag_map.tags[name]
        assert tag.node == f"BR01.{name}" and path == name.replace(".", "/"), name
        assert opcua_type == tag.type, name
        assert runtime == ("writes" if SIGNALS[name].writable else "reads"), name
        assert (unit == "—") == (SIGNALS[name].unit == ""), name
        assert meaning, name


def test_the_register_table_is_the_modbus_map():
    tag_map = load_tag_map(REPO / "configs" / "plc" / "reference-modbus.yaml")
    assert isinstance(tag_map, ModbusTagMap)
    rows = _table("| table | address | registers | signal |")
    assert sorted(row[3] for row in rows) == sorted(tag_map.tags)
    for table, address, registers, name, encoding, bad_when in rows:
        tag = tag_map.tags[name]
        assert (table, int(address), int(registers)) == (tag.table, tag.address, tag.register_count), name
        assert encoding.split(",")[0] == tag.type, name
        if tag.bad_when is None:
            assert bad_when == "—", name
        else:
            assert re.fullmatch(rf"input register {tag.bad_when.address} bit {tag.bad_when.bit}", bad_when), name
