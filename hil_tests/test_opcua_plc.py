"""The simulated PLC over OPC UA on 127.0.0.1: namespace, statuses, timestamps, the PLC's write logic, lockstep."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asyncua import Client, ua

from interfaces.tagmap import OpcUaTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.opcua_server import OpcUaPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
TAG_MAP = load_tag_map(REPO / "configs" / "plc" / "reference-opcua.yaml")
FAULTS = REPO / "configs" / "simulate" / "faults.yaml"


async def _nodes(client: Client, tag_map: OpcUaTagMap) -> dict[str, ua.NodeId]:
    index = await client.get_namespace_index(tag_map.namespace_uri)
    return {name: ua.NodeId(tag.node, index) for name, tag in tag_map.tags.items()}


async def _write(client: Client, node: ua.NodeId, value: object, variant: ua.VariantType) -> ua.StatusCode:
    try:
        await client.get_node(node).write_value(ua.DataValue(ua.Variant(value, variant)))
    except ua.UaStatusCodeError as error:
        return ua.StatusCode(error.code)
    return ua.StatusCode(ua.StatusCodes.Good)


def test_reads_writes_and_lockstep_over_opcua(opcua_endpoint):
    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(FAULTS))
        endpoint = opcua_endpoint
        server = OpcUaPlcServer(plc, TAG_MAP, endpoint=endpoint)
        await server.start()
        clock = asyncio.create_task(server.run_lockstep(wall_timeout_s=10.0))
        try:
            async with Client(endpoint, timeout=5) as client:
                nodes = await _nodes(client, TAG_MAP)
                names = list(nodes)
                values = await client.read_values([client.get_node(nodes[n]) for n in names])
                by_name = dict(zip(names, values, strict=True))
                assert by_name["Status.ProcessTime"] == 0.0 and by_name["Status.BatchId"] == plc.snapshot()["Status.BatchId"].value
                assert by_name["Status.Phase"] == 1 and by_name["Sample.Seq"] == 0
                data = await client.get_node(nodes["PV.Volume"]).read_data_value()
                assert data.StatusCode.is_good() and abs(data.SourceTimestamp.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=5)
                assert data.Value.VariantType == ua.VariantType.Double
                # The PLC's logic answers writes: refused while local, range-checked while remote.
                plc.set_operator_remote(False)
                assert (await _write(client, nodes["SP.Temperature"], 33.0, ua.VariantType.Double)).value == ua.StatusCodes.BadUserAccessDenied
                plc.set_operator_remote(True)
                assert (await _write(client, nodes["SP.Temperature"], 99.0, ua.VariantType.Double)).value == ua.StatusCodes.BadOutOfRange
                assert (await _write(client, nodes["SP.Temperature"], 36.0, ua.VariantType.Double)).is_good()
                assert plc.snapshot()["SP.Temperature"].value == 36.0
                assert (await client.get_node(nodes["SP.Temperature"]).read_value()) == 36.0
                # Lockstep: the plant waits at t = 0 until the heartbeat moves, then runs one cycle and waits again.
                await asyncio.sleep(0.3)
                assert plc.process_time_h == 0.0
                assert (await _write(client, nodes["MPC.Heartbeat"], 1, ua.VariantType.UInt32)).is_good()
                for _ in range(100):
                    if await client.get_node(nodes["Status.ProcessTime"]).read_value() == 1.0:
                        break
                    await asyncio.sleep(0.05)
                assert await client.get_node(nodes["Status.ProcessTime"]).read_value() == 1.0
                # Run to the Bad capacitance window of the fault batch (150-200 h): the value reads Bad.
                for beat in range(2, 200):
                    await _write(client, nodes["MPC.Heartbeat"], beat, ua.VariantType.UInt32)
                    while (await client.get_node(nodes["Status.ProcessTime"]).read_value()) < beat:
                        await asyncio.sleep(0.005)
                    if beat >= 152:
                        break
                capacitance = await client.get_node(nodes["PV.Capacitance"]).read_data_value(raise_on_bad_status=False)
                assert capacitance.StatusCode.is_bad()
                glucose = await client.get_node(nodes["Sample.Glucose"]).read_data_value(raise_on_bad_status=False)
                assert glucose.StatusCode.is_good() and math.isfinite(glucose.Value.Value)
        finally:
            clock.cancel()
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
