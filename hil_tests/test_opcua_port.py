"""The runtime's OPC UA port against the simulated PLC on 127.0.0.1: one-request reads, checked and verified writes, link loss."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from controller.ports import PlcLinkError, PlcWriteRefusedError
from interfaces.opcua_port import OpcUaPort
from interfaces.signals import SIGNALS
from interfaces.tagmap import OpcUaTagMap, load_tag_map
from plant_models.errors import ConfigError
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.opcua_server import OpcUaPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
_LOADED = load_tag_map(REPO / "configs" / "plc" / "reference-opcua.yaml")
if not isinstance(_LOADED, OpcUaTagMap):
    raise TypeError("reference-opcua.yaml is not an OPC UA tag map")
TAG_MAP: OpcUaTagMap = _LOADED
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"


def test_security_none_needs_an_explicit_opt_in():
    with pytest.raises(ConfigError, match="allow_insecure=True"):
        OpcUaPort(TAG_MAP)


def test_port_reads_writes_and_survives_a_lost_link(opcua_endpoint):
    async def scenario() -> None:
        plc, _ = build_simulated_plc(load_simulation(PLATFORM))
        endpoint = opcua_endpoint
        server = OpcUaPlcServer(plc, TAG_MAP, endpoint=endpoint)
        await server.start()
        port = OpcUaPort(TAG_MAP, endpoint=endpoint, timeout_s=2.0, allow_insecure=True)
        try:
            await port.connect()
            readings = await port.read()
            assert set(readings) == set(SIGNALS)
            assert readings["PV.Volume"].good and readings["PV.Volume"].value == pytest.approx(1400.0, abs=10.0)
            assert readings["Sample.Seq"].value == 0 and readings["Status.Phase"].value == 1
            assert readings["PV.Temperature"].source_time is not None
            # Accepted writes are verified by reading back; refused ones are named with the PLC's status.
            plc.set_operator_remote(True)
            await port.write({"SP.FeedRate": 2.5, "SP.Temperature": 36.0, "MPC.Heartbeat": 7, "MPC.Mode": 2})
            assert (plc.snapshot()["SP.FeedRate"].value, plc.heartbeat) == (2.5, 7)
            with pytest.raises(PlcWriteRefusedError) as refused:
                await port.write({"SP.GlucoseRate": 0.5, "SP.Temperature": 99.0})
            assert refused.value.refusals == {"SP.Temperature": "BadOutOfRange"}
            assert plc.snapshot()["SP.GlucoseRate"].value == 0.5 and plc.snapshot()["SP.Temperature"].value == 36.0
            plc.set_operator_remote(False)
            with pytest.raises(PlcWriteRefusedError, match="SP.FeedRate: BadUserAccessDenied"):
                await port.write({"SP.FeedRate": 1.0})
            with pytest.raises(ValueError, match="not finite"):
                await port.write({"SP.FeedRate": math.nan})
            with pytest.raises(KeyError, match="not a writable signal"):
                await port.write({"PV.Volume": 1.0})
            # The link goes: reads fail within the timeout; after the server is back a new connect works.
            await server.stop()
            with pytest.raises(PlcLinkError):
                await port.read()
            assert not port.connected
            with pytest.raises(PlcLinkError):
                await port.connect()
            server = OpcUaPlcServer(plc, TAG_MAP, endpoint=endpoint)
            await server.start()
            await port.connect()
            assert (await port.read())["MPC.Heartbeat"].value == 7
        finally:
            await port.close()
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
