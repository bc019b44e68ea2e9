"""The simulated PLC's OPC UA address space as a PLC engineer browses it: folders, analog items with ranges and units, its identity, timestamps.

Browsed with asyncua's client on 127.0.0.1. The expected ranges come from the
batch config (the equipment's), the unit ids from UNECE Recommendation 20 as
OPC UA Part 8 packs them (written out here, not computed), the version from
the installed package's metadata.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from interfaces.signals import SIGNALS, Kind
from interfaces.tagmap import OpcUaTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import ProbeFault, load_simulation
from simulator.opcua_server import OpcUaPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
_TAG_MAP = load_tag_map(REPO / "configs" / "plc" / "reference-opcua.yaml")
assert isinstance(_TAG_MAP, OpcUaTagMap)
TAG_MAP: OpcUaTagMap = _TAG_MAP
NAMESPACE = "urn:bioreactor-mpc:reference-plc"

ANALOG_ITEM_TYPE = ua.NodeId(2368)
BASE_DATA_VARIABLE_TYPE = ua.NodeId(63)
FOLDER_TYPE = ua.NodeId(61)
UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
UNIT_IDS = {
    "°C": 4408652,
    "L": 5002322,
    "L/h": 4535090,
    "g/L": 18252,
    "mM": 5059379,
    "h": 4740434,
    "%": 20529,
    "% air saturation": 20529,
    "rpm": 5394509,
    "pH": 4404786,
}
"""UNECE common codes CEL, LTR, E32, GL, M33, HUR, P1, P1, RPM, C62 (one) as OPC UA UnitIds (Part 8: the code's ASCII bytes, most significant first)."""


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


async def _browse_names(node: Any) -> dict[str, Any]:
    return {(await child.read_browse_name()).Name: child for child in await node.get_children()}


def test_folders_group_the_signals_and_keep_the_reference_node_ids(opcua_endpoint):
    async def scenario() -> None:
        loaded = load_simulation(PLATFORM)
        plc, _ = build_simulated_plc(loaded)
        server = OpcUaPlcServer(plc, TAG_MAP, endpoint=opcua_endpoint, batch=loaded.batch)
        await server.start()
        try:
            async with Client(opcua_endpoint, timeout=5) as client:
                index = await client.get_namespace_index(NAMESPACE)
                objects = await _browse_names(client.nodes.objects)
                unit = objects["BR01"]
                assert unit.nodeid == ua.NodeId("BR01", index)
                groups = await _browse_names(unit)
                assert set(groups) == {"PV", "SP", "Sample", "Status", "MPC", "Sim"}
                for name, folder in groups.items():
                    assert await folder.read_type_definition() == FOLDER_TYPE, name
                    assert folder.nodeid == ua.NodeId(f"BR01.{name}", index)
                mpc = await _browse_names(groups["MPC"])
                assert set(mpc) == {"Heartbeat", "Mode", "Rec", "Pred"}
                assert set(await _browse_names(mpc["Rec"])) == {"FeedRate", "GlucoseRate", "Temperature", "HarvestTime"}
                assert set(await _browse_names(groups["PV"])) == {name.removeprefix("PV.") for name in SIGNALS if name.startswith("PV.")}
                # Every signal: its browse path from Objects, in the reference namespace, leads to the reference node id.
                for name in SIGNALS:
                    path = ["BR01", *name.split(".")]
                    node = await client.nodes.objects.get_child([f"{index}:{part}" for part in path])
                    assert node.nodeid == ua.NodeId(f"BR01.{name}", index), name
                    assert (await node.read_browse_name()) == ua.QualifiedName(path[-1], index)
        finally:
            await server.stop()

    _run(scenario)


def test_real_signals_are_analog_items_with_ranges_and_units(opcua_endpoint):
    async def scenario() -> None:
        loaded = load_simulation(PLATFORM)
        equipment, limits = loaded.batch.equipment, loaded.batch.limits
        plc, _ = build_simulated_plc(loaded)
        plc.set_operator_remote(True)
        server = OpcUaPlcServer(plc, TAG_MAP, endpoint=opcua_endpoint, batch=loaded.batch)
        await server.start()
        try:
            async with Client(opcua_endpoint, timeout=5) as client:
                index = await client.get_namespace_index(NAMESPACE)
                ranges: dict[str, ua.Range] = {}
                for name, signal in SIGNALS.items():
                    node = client.get_node(ua.NodeId(f"BR01.{name}", index))
                    if signal.kind is not Kind.REAL:
                        assert await node.read_type_definition() == BASE_DATA_VARIABLE_TYPE, name
                        assert await node.get_properties() == [], name
                        continue
                    assert await node.read_type_definition() == ANALOG_ITEM_TYPE, name
                    assert await node.read_data_type() == ua.NodeId(ua.ObjectIds.Double), name
                    properties = {(await p.read_browse_name()).Name: await p.read_value() for p in await node.get_properties()}
                    assert set(properties) == {"EURange", "EngineeringUnits"}, name
                    eu_range, units = properties["EURange"], properties["EngineeringUnits"]
                    assert isinstance(eu_range, ua.Range) and eu_range.Low < eu_range.High, name
                    assert isinstance(units, ua.EUInformation) and units.NamespaceUri == UNECE, name
                    if signal.unit in UNIT_IDS:
                        assert units.UnitId == UNIT_IDS[signal.unit], name
                    else:  # no UNECE code: OPC UA's -1, the symbol still shown
                        assert units.UnitId == -1 and units.DisplayName.Text, name
                    ranges[name] = eu_range
                assert (ranges["SP.FeedRate"].Low, ranges["SP.FeedRate"].High) == (0.0, equipment.feed_rate_max_lph)
                assert (ranges["SP.GlucoseRate"].Low, ranges["SP.GlucoseRate"].High) == (0.0, equipment.glucose_rate_max_lph)
                assert (ranges["SP.Temperature"].Low, ranges["SP.Temperature"].High) == (equipment.temperature_min_degc, equipment.temperature_max_degc)
                assert ranges["PV.Volume"].High == equipment.max_working_volume_l
                assert ranges["Status.ProcessTime"].High == limits.latest_harvest_h
                # The setpoints' EURange is what the PLC accepts: its ends go through, a step beyond is refused.
                feed = client.get_node(ua.NodeId("BR01.SP.FeedRate", index))
                await feed.write_value(ua.DataValue(ua.Variant(ranges["SP.FeedRate"].High, ua.VariantType.Double)))
                with pytest.raises(ua.UaStatusCodeError) as refused:
                    await feed.write_value(ua.DataValue(ua.Variant(ranges["SP.FeedRate"].High * 1.01, ua.VariantType.Double)))
                assert refused.value.code == ua.StatusCodes.BadOutOfRange
                temperature = client.get_node(ua.NodeId("BR01.SP.Temperature", index))
                await temperature.write_value(ua.DataValue(ua.Variant(ranges["SP.Temperature"].Low, ua.VariantType.Double)))
                with pytest.raises(ua.UaStatusCodeError):
                    await temperature.write_value(ua.DataValue(ua.Variant(ranges["SP.Temperature"].Low - 0.1, ua.VariantType.Double)))
                # A value the PLC only reports is not writable (its AccessLevel says so), whoever asks.
                with pytest.raises(ua.UaStatusCodeError) as refused:
                    await client.get_node(ua.NodeId("BR01.PV.Temperature", index)).write_value(ua.DataValue(ua.Variant(37.0, ua.VariantType.Double)))
                assert refused.value.code == ua.StatusCodes.BadNotWritable
        finally:
            await server.stop()

    _run(scenario)


def test_the_server_names_itself_not_asyncua(opcua_endpoint):
    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        server = OpcUaPlcServer(plc, TAG_MAP, endpoint=opcua_endpoint)
        await server.start()
        try:
            async with Client(opcua_endpoint, timeout=5) as client:
                build = await client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_BuildInfo)).read_value()
                assert build.ProductUri == "urn:bioreactor-mpc:plc-sim"
                assert build.ManufacturerName == "bioreactor-mpc project"
                assert build.ProductName == "bioreactor-mpc simulated reference PLC"
                assert build.SoftwareVersion == importlib.metadata.version("bioreactor-mpc")
                assert build.BuildNumber == importlib.metadata.version("bioreactor-mpc")
                assert datetime(2020, 1, 1, tzinfo=UTC) < build.BuildDate.replace(tzinfo=UTC) <= datetime.now(UTC)
                server_array = await client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerArray)).read_value()
                namespaces = await client.get_namespace_array()
                endpoints = await client.get_endpoints()
                applications = {endpoint.Server.ApplicationUri for endpoint in endpoints}
                assert applications == {server_array[0]} == {namespaces[1]} == {server.application_uri}
                assert server.application_uri.endswith(":bioreactor-mpc:plc-sim") and "freeopcua" not in server.application_uri
                assert {endpoint.Server.ProductUri for endpoint in endpoints} == {"urn:bioreactor-mpc:plc-sim"}
                assert {endpoint.Server.ApplicationType for endpoint in endpoints} == {ua.ApplicationType.Server}
        finally:
            await server.stop()

    _run(scenario)


def test_source_timestamps_are_the_moment_each_value_was_scanned(opcua_endpoint):
    """Every scan is stamped with its own time, even in the same plant minute (where the instruments show the minute's value); a value
    from the next minute is a new one; a stale probe keeps its scan's timestamp while the plant moves on."""
    loaded = load_simulation(PLATFORM)
    stale = ProbeFault(kind="probe", tag="PV.Capacitance", mode="stale", start_h=1.0)
    loaded = loaded.model_copy(update={"simulation": loaded.simulation.model_copy(update={"faults": [stale]})})

    async def scenario() -> None:
        plc, _ = build_simulated_plc(loaded)
        server = OpcUaPlcServer(plc, TAG_MAP, endpoint=opcua_endpoint)
        await server.start()
        try:
            async with Client(opcua_endpoint, timeout=5) as client:
                index = await client.get_namespace_index(NAMESPACE)
                temperature = client.get_node(ua.NodeId("BR01.PV.Temperature", index))
                capacitance = client.get_node(ua.NodeId("BR01.PV.Capacitance", index))
                process_time = client.get_node(ua.NodeId("BR01.Status.ProcessTime", index))
                seen: list[tuple[float, datetime]] = []
                for _ in range(3):  # the plant's clock stands still: several scans in one plant minute
                    before = datetime.now(UTC)
                    await server.publish()
                    after = datetime.now(UTC)
                    value = await temperature.read_data_value()
                    stamp = value.SourceTimestamp.replace(tzinfo=UTC)
                    assert before <= stamp <= after
                    seen.append((value.Value.Value, stamp))
                    await asyncio.sleep(0.02)
                assert len({value for value, _ in seen}) == 1  # the probe shows the minute's value, however often it is scanned ...
                assert seen[0][1] < seen[1][1] < seen[2][1]  # ... each scan with its own timestamp
                assert (await process_time.read_value()) == 0.0
                plc.advance_to(1.0 / 60.0)
                await server.publish()
                assert (await temperature.read_value()) != seen[0][0]  # the next minute's noise

                plc.advance_to(1.0)  # the stale fault starts: the probe's last scan is now
                await server.publish()
                frozen = await capacitance.read_data_value()
                for hours in (1.5, 2.0):
                    plc.advance_to(hours)
                    await asyncio.sleep(0.02)
                    before = datetime.now(UTC)
                    await server.publish()
                    again = await capacitance.read_data_value()
                    assert again.Value.Value == frozen.Value.Value and again.SourceTimestamp == frozen.SourceTimestamp
                    fresh = await temperature.read_data_value()
                    assert fresh.SourceTimestamp.replace(tzinfo=UTC) >= before > frozen.SourceTimestamp.replace(tzinfo=UTC)
                    assert math.isclose(await process_time.read_value(), hours)
        finally:
            await server.stop()

    _run(scenario)
