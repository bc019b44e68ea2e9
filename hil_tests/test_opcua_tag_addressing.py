"""The OPC UA port reaches tags the way real PLCs expose them: browse paths, numeric node ids, several namespaces; against the simulated PLC.

The simulated PLC serves either the reference map (string ids in one
namespace) or a vendor-style map (numeric ids in a second namespace for the
online values); the runtime's map addresses the same variables by browse path
or by those ids, and reads and writes what the PLC holds.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua.client.ua_client import UaClient

from controller.ports import PlcLinkError, PlcMappingError
from interfaces.opcua_port import OpcUaPort
from interfaces.signals import SIGNALS
from interfaces.tagmap import OpcUaTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.opcua_server import OpcUaPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
REFERENCE_MAP = REPO / "configs" / "plc" / "reference-opcua.yaml"
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
VENDOR = "urn:example:vendor-plc"
PV_SIGNALS = [name for name in SIGNALS if name.startswith("PV.")]


def _map(directory: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> OpcUaTagMap:
    data = yaml.safe_load(REFERENCE_MAP.read_text(encoding="utf-8"))
    edit(data)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tag_map = load_tag_map(path)
    assert isinstance(tag_map, OpcUaTagMap)
    return tag_map


def _by_browse_path(data: dict[str, Any]) -> None:
    for name, tag in data["tags"].items():
        del tag["node"]
        tag["browse_path"] = "/".join(["BR01", *name.split(".")])


def _vendor_ids(data: dict[str, Any]) -> None:
    """The online values as a vendor PLC numbers them: i=1001... in the vendor's namespace."""
    data["namespaces"] = {"vendor": VENDOR}
    for number, name in enumerate(PV_SIGNALS, start=1001):
        data["tags"][name] = {"node": number, "namespace": "vendor", "type": data["tags"][name]["type"]}


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_browse_paths_reach_every_signal_with_one_translate_request(opcua_endpoint, tmp_path, monkeypatch):
    served = load_tag_map(REFERENCE_MAP)
    assert isinstance(served, OpcUaTagMap)
    by_path = _map(tmp_path, "by-path", _by_browse_path)
    translate_requests: list[int] = []
    translate = UaClient.translate_browsepaths_to_nodeids

    async def counted(self: UaClient, paths: Any) -> Any:
        translate_requests.append(len(paths))
        return await translate(self, paths)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        plc.set_operator_remote(True)
        server = OpcUaPlcServer(plc, served, endpoint=opcua_endpoint)
        await server.start()
        reference = OpcUaPort(served, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
        port = OpcUaPort(by_path, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
        try:
            monkeypatch.setattr(UaClient, "translate_browsepaths_to_nodeids", counted)
            await port.connect()
            monkeypatch.undo()
            assert translate_requests == [len(SIGNALS)]
            await reference.connect()
            by_id, by_name = await reference.read(), await port.read()
            assert set(by_name) == set(SIGNALS)
            for name in ("Status.BatchId", "Status.Phase", "Sample.Seq", "SP.FeedRate", "Status.ProcessTime"):
                assert by_name[name].value == by_id[name].value, name
            assert by_name["PV.Temperature"].good and 30.0 < float(by_name["PV.Temperature"].value) < 40.0
            await port.write({"SP.FeedRate": 1.25, "MPC.Heartbeat": 7})
            assert plc.snapshot()["SP.FeedRate"].value == 1.25 and plc.heartbeat == 7
        finally:
            await port.close()
            await reference.close()
            await server.stop()

    _run(scenario)


def test_numeric_ids_in_a_second_namespace_and_a_browse_path_through_it(opcua_endpoint, tmp_path):
    served = _map(tmp_path, "vendor-served", _vendor_ids)

    def runtime(data: dict[str, Any]) -> None:
        _vendor_ids(data)
        data["tags"]["PV.Volume"] = {"browse_path": "BR01/PV/vendor:Volume", "type": "double"}  # the folders are the PLC's, the variable the vendor's

    tag_map = _map(tmp_path, "vendor-runtime", runtime)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = OpcUaPlcServer(plc, served, endpoint=opcua_endpoint)
        await server.start()
        port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
        try:
            await port.connect()
            readings = await port.read()
            truth = plc.snapshot()
            assert set(readings) == set(SIGNALS)
            assert math.isclose(float(readings["PV.Volume"].value), float(truth["PV.Volume"].value), rel_tol=0.01)
            assert math.isclose(float(readings["PV.FeedTotal"].value), float(truth["PV.FeedTotal"].value), abs_tol=1e-9)
            assert readings["Status.BatchId"].value == truth["Status.BatchId"].value
        finally:
            await port.close()
            await server.stop()

    _run(scenario)


def test_an_address_the_plc_does_not_have_is_a_mapping_problem_naming_it(opcua_endpoint, tmp_path):
    served = load_tag_map(REFERENCE_MAP)
    assert isinstance(served, OpcUaTagMap)

    def misfit(data: dict[str, Any]) -> None:
        data["tags"]["PV.Temperature"] = {"browse_path": "BR01/PV/Temprature", "type": "double"}  # a typo
        data["tags"]["PV.DO"] = {"browse_path": "BR01/PV", "type": "double"}  # the folder
        data["tags"]["PV.pH"] = {"node": 1001, "type": "double"}  # no numeric ids in the reference namespace

    misfitting = _map(tmp_path, "misfit", misfit)
    other_namespace = _map(tmp_path, "other-namespace", _vendor_ids)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = OpcUaPlcServer(plc, served, endpoint=opcua_endpoint)
        await server.start()
        try:
            port = OpcUaPort(misfitting, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
            with pytest.raises(PlcMappingError) as refused:
                await port.connect()
            problems = refused.value.problems
            assert set(problems) == {"PV.Temperature", "PV.DO", "PV.pH"}
            assert "browse path 'BR01/PV/Temprature' (from the Objects folder) leads to no node (BadNoMatch)" in problems["PV.Temperature"]
            assert "(browse path 'BR01/PV') is not a Variable (NodeClass Object)" in problems["PV.DO"]
            assert "'ns=2;i=1001' does not exist (BadNodeIdUnknown)" in problems["PV.pH"]
            assert not port.connected and not isinstance(refused.value, PlcLinkError)

            port = OpcUaPort(other_namespace, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
            with pytest.raises(PlcMappingError) as refused:
                await port.connect()
            assert set(refused.value.problems) == {"namespaces.vendor"}
            assert f"the server has no namespace {VENDOR!r}" in refused.value.problems["namespaces.vendor"]
        finally:
            await server.stop()

    _run(scenario)
