"""OPC UA tag maps address a tag as a real PLC exposes it: a string or numeric node id, or a browse path, in one of several namespaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from interfaces.tagmap import OpcUaTagMap, load_tag_map, split_browse_path
from plant_models.errors import ConfigError

REFERENCE = Path(__file__).resolve().parent.parent / "configs" / "plc" / "reference-opcua.yaml"


def _map(tmp_path: Path, edit: Any) -> OpcUaTagMap:
    data = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    tag_map = load_tag_map(path)
    assert isinstance(tag_map, OpcUaTagMap)
    return tag_map


def _refused(tmp_path: Path, edit: Any) -> str:
    with pytest.raises(ConfigError) as refused:
        _map(tmp_path, edit)
    return str(refused.value)


def test_numeric_ids_browse_paths_and_named_namespaces_load(tmp_path):
    def edit(data: dict[str, Any]) -> None:
        data["namespaces"] = {"s7": "http://www.siemens.com/simatic-s7-opcua", "di": "http://opcfoundation.org/UA/DI/"}
        data["tags"]["PV.Temperature"] = {"node": 6021, "type": "double"}
        data["tags"]["PV.pH"] = {"node": '"DB_BR01"."pH"', "namespace": "s7", "type": "float"}
        data["tags"]["PV.DO"] = {"browse_path": "di:DeviceSet/BR01/PV/DO", "type": "double"}
        data["tags"]["PV.Volume"] = {"browse_path": "DataBlocksGlobal/DB&/1/Volume", "namespace": "s7", "type": "double"}
        data["tags"]["PV.OUR"] = {"node": 6021, "namespace": "s7", "type": "double"}  # the same number in another namespace is another node

    tag_map = _map(tmp_path, edit)
    temperature, ph, do, volume = (tag_map.tags[name] for name in ("PV.Temperature", "PV.pH", "PV.DO", "PV.Volume"))
    assert temperature.node == 6021 and isinstance(temperature.node, int) and temperature.browse_path is None
    assert tag_map.namespace_of(temperature) == "urn:bioreactor-mpc:reference-plc"
    assert tag_map.namespace_of(ph) == "http://www.siemens.com/simatic-s7-opcua"
    assert do.node is None and split_browse_path(do.browse_path or "") == [("di", "DeviceSet"), (None, "BR01"), (None, "PV"), (None, "DO")]
    assert split_browse_path(volume.browse_path or "") == [(None, "DataBlocksGlobal"), (None, "DB/1"), (None, "Volume")]
    assert tag_map.namespace_uris() == ["urn:bioreactor-mpc:reference-plc", "http://www.siemens.com/simatic-s7-opcua", "http://opcfoundation.org/UA/DI/"]


def test_a_string_that_looks_like_a_number_stays_a_string_id(tmp_path):
    tag_map = _map(tmp_path, lambda data: data["tags"].update({"PV.pH": {"node": "6021", "type": "double"}}))
    assert tag_map.tags["PV.pH"].node == "6021"


def test_browse_path_escapes_and_mistakes():
    assert split_browse_path("a&:b/c&&d") == [(None, "a:b"), (None, "c&d")]
    assert split_browse_path("ns:a:b") == [("ns", "a:b")]  # only the first ':' names a namespace
    for bad in ("/BR01/PV", "BR01//PV", "BR01/PV/", "s7:/PV", "BR01/PV&"):
        with pytest.raises(ValueError, match="browse path"):
            split_browse_path(bad)


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ({"node": "BR01.PV.pH", "browse_path": "BR01/PV/pH", "type": "double"}, "give either node (a node id) or browse_path"),
        ({"type": "double"}, "give either node (a node id) or browse_path"),
        ({"node": -1, "type": "double"}, "tags.PV.pH.node"),
        ({"node": 4294967296, "type": "double"}, "tags.PV.pH.node"),
        ({"node": True, "type": "double"}, "tags.PV.pH.node"),
        ({"node": "ns=3;i=6021", "type": "double"}, "a numeric identifier is an integer"),
        ({"node": "BR01.PV.pH", "namespace": "vendor", "type": "double"}, "tags.PV.pH.namespace: is not a name in namespaces (none defined)"),
        ({"browse_path": "vendor:BR01/pH", "type": "double"}, "names namespace vendor, not a name in namespaces (none defined)"),
        ({"browse_path": "BR01//pH", "type": "double"}, "an empty browse name"),
    ],
)
def test_an_address_that_cannot_be_meant_is_refused_at_load(tmp_path, tag, expected):
    message = _refused(tmp_path, lambda data: data["tags"].update({"PV.pH": tag}))
    assert expected in message
    assert "tags.PV.pH" in message


def test_two_signals_on_one_address_are_refused(tmp_path):
    def edit(data: dict[str, Any]) -> None:
        data["tags"]["PV.OUR"] = {"browse_path": "BR01/PV/CER", "type": "double"}
        data["tags"]["PV.CER"] = {"browse_path": "BR01/PV/CER", "type": "double"}

    assert "tags.PV.CER.browse_path: is also the browse path of tags.PV.OUR" in _refused(tmp_path, edit)


def test_namespace_names_are_checked(tmp_path):
    message = _refused(tmp_path, lambda data: data.update(namespaces={"1bad": "urn:x"}))
    assert "namespaces.1bad" in message and "a letter followed by" in message


def test_the_json_schema_describes_the_addressing():
    schema = OpcUaTagMap.model_json_schema()
    tag = schema["$defs"]["OpcUaTag"]["properties"]
    assert {"type": "integer", "minimum": 0, "maximum": 4294967295} in tag["node"]["anyOf"]
    assert {"type": "string"} in tag["node"]["anyOf"]
    assert "browse_path" in tag and "namespace" in tag
    assert schema["properties"]["namespaces"]["additionalProperties"] == {"type": "string"}
