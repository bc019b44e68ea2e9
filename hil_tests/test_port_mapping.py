"""The ports check the tag map against the PLC when they connect: a map that does not fit is refused before the first cycle, naming every problem.

The simulated PLC serves the reference maps; the ports connect with copies
that name a node that does not exist, declare another type, point a written
signal at a read-only node, or put a signal at an address the PLC does not
serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua.client.ua_client import UaClient

from controller.ports import PlcLinkError, PlcMappingError
from interfaces.modbus_port import ModbusPort
from interfaces.opcua_port import OpcUaPort
from interfaces.signals import SIGNALS
from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.modbus_server import ModbusPlcServer
from simulator.opcua_server import OpcUaPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
OPCUA_MAP = REPO / "configs" / "plc" / "reference-opcua.yaml"
MODBUS_MAP = REPO / "configs" / "plc" / "reference-modbus.yaml"
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"


def _edited(path: Path, directory: Path, edit: Callable[[dict[str, Any]], None]) -> Any:
    """A copy of a reference tag map with ``edit`` applied to its YAML data, loaded (and so validated) like any map."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(data)
    copy = directory / f"edited-{path.name}"
    copy.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_tag_map(copy)


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


# --------------------------------------------------------------------------- OPC UA


def test_reference_opcua_map_fits_the_simulated_plc_in_one_read_request(opcua_endpoint, monkeypatch):
    tag_map = load_tag_map(OPCUA_MAP)
    assert isinstance(tag_map, OpcUaTagMap)
    read_requests: list[int] = []
    read = UaClient.read

    async def counted(self: UaClient, parameters: Any) -> Any:
        read_requests.append(len(parameters.NodesToRead))
        return await read(self, parameters)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = OpcUaPlcServer(plc, tag_map, endpoint=opcua_endpoint)
        await server.start()
        port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
        try:
            monkeypatch.setattr(UaClient, "read", counted)
            await port.connect()
            monkeypatch.undo()
            assert port.connected
            # Every mapped node's five attributes in one Read request, not one request per node.
            assert read_requests == [5 * len(SIGNALS)]
            assert set(await port.read()) == set(SIGNALS)
        finally:
            await port.close()
            await server.stop()

    _run(scenario)


def test_opcua_map_that_does_not_fit_is_refused_naming_every_problem(opcua_endpoint, tmp_path):
    served = load_tag_map(OPCUA_MAP)
    assert isinstance(served, OpcUaTagMap)

    def misfit(data: dict[str, Any]) -> None:
        tags = data["tags"]
        tags["PV.Temperature"]["node"] = "BR01.PV.Temprature"  # a typo: no such node
        tags["PV.Volume"]["type"] = "float"  # the node holds Double, which a float does not hold
        tags["SP.FeedRate"]["type"] = "float"  # a written signal needs the node's own type
        tags["PV.DO"]["node"] = "BR01"  # the object, not a variable
        del tags["PV.AgitationSpeed"]  # optional; its read-only node now gets a written signal
        tags["MPC.Rec.HarvestTime"]["node"] = "BR01.PV.AgitationSpeed"

    tag_map = _edited(OPCUA_MAP, tmp_path, misfit)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = OpcUaPlcServer(plc, served, endpoint=opcua_endpoint)
        await server.start()
        port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
        try:
            with pytest.raises(PlcMappingError) as refused:
                await port.connect()
            problems = refused.value.problems
            assert set(problems) == {"PV.Temperature", "PV.Volume", "SP.FeedRate", "PV.DO", "MPC.Rec.HarvestTime"}
            assert "'ns=2;s=BR01.PV.Temprature' does not exist (BadNodeIdUnknown)" in problems["PV.Temperature"]
            assert "holds Double; the map declares float" in problems["PV.Volume"]
            assert "a written signal needs the node's own type" in problems["SP.FeedRate"] and "(declare double)" in problems["SP.FeedRate"]
            assert "is not a Variable (NodeClass Object)" in problems["PV.DO"]
            assert "is not writable (its AccessLevel lacks CurrentWrite)" in problems["MPC.Rec.HarvestTime"]
            assert "BR01.PV.Temprature" in str(refused.value)  # the message names them too
            assert not port.connected and not isinstance(refused.value, PlcLinkError)  # not a link problem: not retried
        finally:
            await port.close()
            await server.stop()

    _run(scenario)


def test_a_read_signal_may_have_a_narrower_type_than_declared(opcua_endpoint, tmp_path):
    def narrower(data: dict[str, Any]) -> None:  # a PLC with single-precision probes and a 16-bit sample counter
        data["tags"]["PV.pH"]["type"] = "float"
        data["tags"]["Sample.Seq"]["type"] = "uint16"

    served = _edited(OPCUA_MAP, tmp_path, narrower)
    tag_map = load_tag_map(OPCUA_MAP)  # declares double and uint32
    assert isinstance(served, OpcUaTagMap) and isinstance(tag_map, OpcUaTagMap)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = OpcUaPlcServer(plc, served, endpoint=opcua_endpoint)
        await server.start()
        port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
        try:
            await port.connect()
            readings = await port.read()
            assert readings["PV.pH"].good and 6.5 < float(readings["PV.pH"].value) < 7.5
            assert readings["Sample.Seq"].value == 0
        finally:
            await port.close()
            await server.stop()

    _run(scenario)


def test_a_namespace_the_server_does_not_have_is_a_mapping_problem(opcua_endpoint, tmp_path):
    served = load_tag_map(OPCUA_MAP)
    tag_map = _edited(OPCUA_MAP, tmp_path, lambda data: data.update(namespace_uri="urn:example:other-plc"))
    assert isinstance(served, OpcUaTagMap) and isinstance(tag_map, OpcUaTagMap)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = OpcUaPlcServer(plc, served, endpoint=opcua_endpoint)
        await server.start()
        port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=2.0, allow_insecure=True)
        try:
            with pytest.raises(PlcMappingError) as refused:
                await port.connect()
            assert set(refused.value.problems) == {"namespace_uri"}
            assert "no namespace 'urn:example:other-plc'" in refused.value.problems["namespace_uri"]
            assert "urn:bioreactor-mpc:reference-plc" in refused.value.problems["namespace_uri"]  # what it has
            assert not port.connected
        finally:
            await port.close()
            await server.stop()

    _run(scenario)


# --------------------------------------------------------------------------- Modbus


def test_modbus_map_that_does_not_fit_is_refused_naming_every_problem(modbus_port_number, tmp_path):
    served = load_tag_map(MODBUS_MAP)
    assert isinstance(served, ModbusTagMap)

    def misfit(data: dict[str, Any]) -> None:
        data["tags"]["Status.BatchId"]["address"] = 74  # input registers 74-81: the PLC serves up to 77
        data["tags"]["SP.HarvestRequest"]["address"] = 40  # the PLC has coil 0 (and the bits packed with it, 0-15) only

    tag_map = _edited(MODBUS_MAP, tmp_path, misfit)

    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = ModbusPlcServer(plc, served, port=modbus_port_number)
        await server.start()
        port = ModbusPort(tag_map, port=modbus_port_number, timeout_s=2.0)
        try:
            with pytest.raises(PlcMappingError) as refused:
                await port.connect()
            problems = refused.value.problems
            assert problems == {
                "Status.BatchId": "input registers 74-81 answered exception 2 (illegal data address)",
                "SP.HarvestRequest": "coil 40 answered exception 2 (illegal data address)",
            }
            assert not port.connected
            # The reference map, against the same PLC, fits.
            fitting = ModbusPort(served, port=modbus_port_number, timeout_s=2.0)
            await fitting.connect()
            assert set(await fitting.read()) == set(SIGNALS)
            await fitting.close()
        finally:
            await port.close()
            await server.stop()

    _run(scenario)
